"""Latency from publish to receipt: statecast beside Redis pub/sub, in the same run.

For each load (N subscribers, a steady rate of changes), one publisher process sends a
batch every millisecond (rate/1000 changes; at 1,000/s one), each value carrying its
send time (``time.monotonic_ns()``, CLOCK_MONOTONIC, one clock for every process on
the machine): statecast gets one ``publish`` of the batch, Redis the same values as
``PUBLISH``es in one write. The N subscribers are one C program (``latency_reader.c``,
built here with ``cc -O2`` into a temporary directory): one epoll loop that records
receipt minus send for every delivery and reports its own CPU time, so it can be seen
not to be the bottleneck. The first second is left out.

    python bench/latency.py                       # the three loads of issue 11
    python bench/latency.py --quick               # the same, 4 s each (make bench)
    python bench/latency.py --subscribers 100 --rate 10000 [--seconds 10]
    python bench/latency.py --also-src /tmp/other/src   # also that code (A/B), same run
    python bench/latency.py --priority            # on a shared machine (root), see below

On a small shared machine the processes are pinned (server on core 0, reader and
publisher on core 1), and ``--priority`` puts them ahead of other sessions' work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RedisProcess, StatecastProcess, cpu_seconds, machine, print_result

HERE = Path(__file__).parent
LOADS = [(100, 10_000), (1000, 1000), (1000, 2000)]  # issue 11, item 6
SKIP = 1.0  # seconds left out at the start
PIN = True  # --no-pin: let the scheduler place the processes
SERVER_CPU, CLIENT_CPU = {0}, {1}

PUBLISHER = r"""
import socket, sys, threading, time, msgspec
proto, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
per_tick = max(1, rate // 1000)
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def drain():  # acks, or Redis's subscriber counts
    while s.recv(1 << 16):
        pass
threading.Thread(target=drain, daemon=True).start()
encode = msgspec.json.encode
tick = per_tick / rate
start = time.monotonic()
n = i = 0
while time.monotonic() - start < seconds:
    delay = start + n * tick - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    value = {"t": time.monotonic_ns(), "bid": 101.25, "ask": 101.27, "qty": 300}
    keys = [f"Q{(i + j) % 500}" for j in range(per_tick)]
    if proto == "redis":
        v = encode(value)
        cmd = b"*3\r\n$7\r\nPUBLISH\r\n$6\r\nquotes\r\n$%d\r\n%s\r\n" % (len(v), v)
        s.sendall(cmd * per_tick)
    else:
        changes = [{"collection": "quotes", "key": k, "value": value} for k in keys]
        s.sendall(encode({"op": "publish", "changes": changes}) + b"\n")
    i += per_tick
    n += 1
time.sleep(0.5)
s.close()
"""


def raise_priority() -> None:
    """--priority: this process and its children in a scheduling group of their own
    at nice -20 (needs root). Linux's autogroups share the CPU between sessions, so a
    plain ``nice`` does not help against the other sessions' processes."""
    try:
        if os.getsid(0) != os.getpid():
            os.setsid()
        with open("/proc/self/autogroup", "w") as f:
            f.write("-20")
        os.nice(-20)
    except OSError as exc:
        print(f"--priority: {exc}")


def build_reader(tmp: str) -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    exe = os.path.join(tmp, "latency_reader")
    subprocess.run([cc, "-O2", "-o", exe, str(HERE / "latency_reader.c")], check=True)
    return exe


def pin(pid: int, cpus: set[int]) -> None:
    """The server on one core, the reader and the publisher on the other: on a small
    machine they would otherwise take turns on the same core, and what is measured
    would be the scheduler."""
    if PIN and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(pid, cpus)


def measure(
    reader: str, proto: str, port: int, pid: int, *, n: int, rate: int, seconds: float
) -> dict[str, Any]:
    """One load against one running server: the reader's figures and the server's CPU."""
    pin(pid, SERVER_CPU)
    rd = subprocess.Popen(
        [reader, proto, str(port), str(n), str(seconds + 0.5), str(SKIP)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert rd.stdout is not None
    pin(rd.pid, CLIENT_CPU)
    if rd.stdout.readline().strip() != "ready":
        raise RuntimeError(f"latency_reader did not subscribe ({proto})")
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    pub = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, proto, str(port), str(rate), str(seconds)]
    )
    pin(pub.pid, CLIENT_CPU)
    out = rd.stdout.read()
    server_cpu = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
    rd.wait()
    pub.wait()
    fields = dict(kv.split("=") for kv in out.split())
    measured = seconds + 0.5 - SKIP
    return {
        "deliveries/s (measured part)": int(fields["samples"]) / measured,
        "p50 ms": float(fields["p50_ms"]),
        "p90 ms": float(fields["p90_ms"]),
        "p99 ms": float(fields["p99_ms"]),
        "p99.9 ms": float(fields["p99.9_ms"]),
        "max ms": float(fields["max_ms"]),
        "subscribers cut off": int(fields["closed"]),
        "server CPU (cores busy)": server_cpu,
        "reader CPU (cores busy)": float(fields["cpu_cores"]),
        "reader bytes per recv": int(fields["bytes"]) / max(1, int(fields["recvs"])),
    }


def statecast(
    reader: str, n: int, rate: int, seconds: float, src: str | None, *, pacing: str = "throughput"
) -> dict[str, Any]:
    env = os.environ.get("PYTHONPATH")
    if src is not None:  # the server process inherits it
        os.environ["PYTHONPATH"] = src
    try:
        srv = StatecastProcess(*(() if pacing == "throughput" else ("--flush-pacing", pacing)))
    finally:
        if src is not None:
            if env is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = env
    try:
        return measure(reader, "statecast", srv.port, srv.pid, n=n, rate=rate, seconds=seconds)
    finally:
        srv.stop()


def redis(reader: str, n: int, rate: int, seconds: float) -> dict[str, Any]:
    srv = RedisProcess()
    try:
        return measure(reader, "redis", srv.port, srv.proc.pid, n=n, rate=rate, seconds=seconds)
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subscribers", type=int, help="one load (with --rate) instead of the three")
    ap.add_argument("--rate", type=int, default=10_000, help="changes/s")
    ap.add_argument("--seconds", type=float, default=10.0, help="of publishing, per run")
    ap.add_argument("--quick", action="store_true", help="4 s per run")
    ap.add_argument("--no-redis", action="store_true")
    # The Python reader sampled every k-th subscriber; the C reader reads them all.
    ap.add_argument("--sample-every", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    ap.add_argument("--priority", action="store_true", help="nice -20, own autogroup (root)")
    ap.add_argument("--also-src", help="also run the server from this source tree (A/B)")
    ap.add_argument(
        "--pacing",
        choices=["throughput", "latency", "both"],
        default="both",
        help="statecast's --flush-pacing (both: one run of each, beside Redis)",
    )
    args = ap.parse_args()
    global PIN
    PIN = not args.no_pin
    if args.priority:
        raise_priority()
    seconds = 4.0 if args.quick else args.seconds
    loads = LOADS if args.subscribers is None else [(args.subscribers, args.rate)]
    print(f"machine: {machine()}")
    rows: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        reader = build_reader(tmp)
        for n, rate in loads:
            load = f"{n} x {rate:,}/s"
            name = f"{n} subscribers x {rate:,} changes/s, {seconds:g} s"
            pacings = ["throughput", "latency"] if args.pacing == "both" else [args.pacing]
            systems = [f"statecast/{p}" for p in pacings]
            if args.also_src:
                systems.append(args.also_src)
            if not args.no_redis:
                systems.append("redis")
            for system in systems:
                if system == "redis":
                    result = redis(reader, n, rate, seconds)
                elif system.startswith("statecast/"):
                    result = statecast(reader, n, rate, seconds, None, pacing=system.split("/")[1])
                else:
                    result = statecast(reader, n, rate, seconds, system)
                print_result(f"{system} latency, {name}", result)
                rows.append((load, system, result))
    print("== publish to receipt, ms (same run)")
    by_load = {(load, system): r for load, system, r in rows}
    for load, system, r in rows:
        ratio = ""
        if system != "redis" and (load, "redis") in by_load:
            ratio = f"   p99 / redis p99 {r['p99 ms'] / by_load[load, 'redis']['p99 ms']:.2f}"
        print(
            f"   {load:<14} {system:<22} p50 {r['p50 ms']:7.2f}  p90 {r['p90 ms']:7.2f}  "
            f"p99 {r['p99 ms']:7.2f}  max {r['max ms']:7.2f}{ratio}"
        )


if __name__ == "__main__":
    main()
