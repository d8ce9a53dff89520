"""Fairness: one client's publish-to-change latency while others flood the server.

For statecast and, side by side, a private Redis (persistence off): a probe client
publishes one small change and times how long its subscription takes to see it, over
and over, while load generators (separate processes, so that they are not the probe's
bottleneck) pipeline flat out:

* idle: no load;
* ping x1, ping x2: one and two connections pipelining ``ping`` (Redis: ``PING``);
* publish x1, publish x2: one and two connections pipelining small publishes to
  another collection (Redis: ``PUBLISH`` to another channel).

Each generator reads (and counts) its answers, so the server is never held back by an
unread socket; their rate is printed, with the CPU each process used, to show where
the time went. Targets for statecast: p50 < 5 ms and max < 100 ms in every phase.

    python bench/fairness.py [--seconds 3] [--no-redis]
"""

from __future__ import annotations

import argparse
import math
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from common import RedisProcess, StatecastProcess, cpu_seconds, machine

LOADER = r"""
import socket, sys, threading, time
port, mode, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
units = {
    "statecast-ping": b"ping\n",
    "statecast-publish":
        b'{"op":"publish","changes":[{"collection":"load","key":"k","value":1}]}\n',
    "redis-ping": b"*1\r\n$4\r\nPING\r\n",
    "redis-publish": b"*3\r\n$7\r\nPUBLISH\r\n$4\r\nload\r\n$1\r\nx\r\n",
}
unit = units[mode]
end_mark = b"\r\n" if mode.startswith("redis") else b"\n"
buf = unit * (65536 // len(unit))
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
answers = 0
def read():
    global answers
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                return
            answers += data.count(end_mark)
    except OSError:
        return
reader = threading.Thread(target=read, daemon=True)
reader.start()
sent = 0
start = time.monotonic()
try:
    while time.monotonic() - start < seconds:
        s.sendall(buf)
        sent += len(buf) // len(unit)
except OSError:
    pass
elapsed = time.monotonic() - start
time.sleep(0.2)
print(f"{sent} {answers} {elapsed:.3f}", flush=True)
s.close()
"""


@dataclass
class Phase:
    name: str
    loads: list[str]  # "ping" / "publish", one per generator process
    latencies_ns: list[int] = field(default_factory=list)
    lost: int = 0  # probes that got no change within the probe timeout
    load_rates: list[float] = field(default_factory=list)  # answers/s per generator
    server_cpu: float = 0.0  # cores busy
    loader_cpu: float = 0.0  # cores busy, all generators

    def pct(self, p: float) -> float:
        lat = sorted(self.latencies_ns)
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ns) / 1e6 if self.latencies_ns else float("nan")


PHASES = [
    ("idle", []),
    ("ping x1", ["ping"]),
    ("ping x2", ["ping", "ping"]),
    ("publish x1", ["publish"]),
    ("publish x2", ["publish", "publish"]),
    ("ping+publish", ["ping", "publish"]),
]
PROBE_TIMEOUT = 5.0


class Drain:
    """Reads and discards everything a socket receives (the probe publisher's acks)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            return


class Probe:
    """Publishes one change, waits for its subscription to deliver it; the latency."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind = kind
        self.sub = socket.create_connection(("127.0.0.1", port))
        self.pub = socket.create_connection(("127.0.0.1", port))
        for s in (self.sub, self.pub):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        if kind == "statecast":
            self.sub.sendall(b'{"op":"subscribe","collections":["probe"]}\n')
            self._wait(b'"subscribed"')
        else:
            self.sub.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$5\r\nprobe\r\n")
            self._wait(b"subscribe")
        self.buf = b""
        Drain(self.pub)
        self.n = 0

    def _wait(self, marker: bytes, timeout: float = PROBE_TIMEOUT) -> bool:
        self.sub.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if time.monotonic() > deadline:
                return False
            try:
                chunk = self.sub.recv(1 << 16)
            except TimeoutError:
                return False
            if not chunk:
                raise ConnectionError("the probe's subscription was closed")
            self.buf += chunk
        self.buf = self.buf[self.buf.index(marker) + len(marker) :]
        return True

    def once(self) -> int | None:
        """One round trip in nanoseconds (None: lost)."""
        self.n += 1
        tag = b"p%dq" % self.n
        if self.kind == "statecast":
            msg = (
                b'{"op":"publish","changes":[{"collection":"probe","key":"p","value":"'
                + tag
                + b'"}]}\n'
            )
        else:
            msg = b"*3\r\n$7\r\nPUBLISH\r\n$5\r\nprobe\r\n$%d\r\n%s\r\n" % (len(tag), tag)
        t0 = time.perf_counter_ns()
        self.pub.sendall(msg)
        ok = self._wait(tag)
        t1 = time.perf_counter_ns()
        return t1 - t0 if ok else None

    def close(self) -> None:
        self.sub.close()
        self.pub.close()


def run_phase(kind: str, port: int, pid: int, phase: Phase, seconds: float) -> None:
    warmup = 0.5
    loaders = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                LOADER,
                str(port),
                f"{kind}-{load}",
                str(warmup + seconds + 0.3),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for load in phase.loads
    ]
    probe = Probe(kind, port)
    try:
        time.sleep(warmup)
        cpu0 = cpu_seconds(pid)
        loader_cpu0 = sum(cpu_seconds(p.pid) for p in loaders)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            latency = probe.once()
            if latency is None:
                phase.lost += 1
            else:
                phase.latencies_ns.append(latency)
            time.sleep(0.001)
        elapsed = time.monotonic() - t0
        phase.server_cpu = (cpu_seconds(pid) - cpu0) / elapsed
        try:
            phase.loader_cpu = (sum(cpu_seconds(p.pid) for p in loaders) - loader_cpu0) / elapsed
        except OSError:  # a loader finished already
            phase.loader_cpu = float("nan")
    finally:
        probe.close()
        for p in loaders:
            out, _ = p.communicate(timeout=30)
            _sent, answers, took = out.split()
            phase.load_rates.append(int(answers) / float(took))


def run(kind: str, seconds: float) -> list[Phase]:
    srv: StatecastProcess | RedisProcess
    srv = StatecastProcess() if kind == "statecast" else RedisProcess()
    pid = srv.pid if isinstance(srv, StatecastProcess) else srv.proc.pid
    phases = [Phase(name, loads) for name, loads in PHASES]
    try:
        for phase in phases:
            run_phase(kind, srv.port, pid, phase, seconds)
    finally:
        srv.stop()
    return phases


def fmt(x: float) -> str:
    return "      -" if math.isnan(x) else f"{x:7.2f}"


def ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b <= 0:
        return "    -"
    return f"{a / b:5.1f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="probing time per phase")
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    sc = run("statecast", args.seconds)
    rd = None if args.no_redis else run("redis", args.seconds)

    print("\n== publish-to-change latency of a probe client while others flood (ms)")
    print(
        f"{'phase':<13} | {'statecast p50':>13} {'p99':>7} {'max':>7} {'lost':>4} | "
        f"{'redis p50':>9} {'p99':>7} {'max':>7} | {'ratio p50':>9} {'p99':>6} {'max':>6} | target"
    )
    for i, s in enumerate(sc):
        r = rd[i] if rd else None
        ok = s.pct(0.5) < 5 and s.max_ms < 100 and s.lost == 0
        print(
            f"{s.name:<13} | {fmt(s.pct(0.5)):>13} {fmt(s.pct(0.99))} {fmt(s.max_ms)} "
            f"{s.lost:>4} | "
            + (
                f"{fmt(r.pct(0.5)):>9} {fmt(r.pct(0.99))} {fmt(r.max_ms)} | "
                f"{ratio(s.pct(0.5), r.pct(0.5)):>9} {ratio(s.pct(0.99), r.pct(0.99)):>6} "
                f"{ratio(s.max_ms, r.max_ms):>6} | "
                if r
                else f"{'-':>9} {'-':>7} {'-':>7} | {'-':>9} {'-':>6} {'-':>6} | "
            )
            + ("ok" if ok else "MISSED (p50 < 5 ms, max < 100 ms)")
        )
    print("\n== the load: answers/s per flooding connection; CPU in cores busy")
    print(
        f"{'phase':<13} | {'statecast load/s':>22} {'server':>6} {'loaders':>7} | "
        f"{'redis load/s':>22} {'server':>6} {'loaders':>7} | probes sc/redis"
    )
    for i, s in enumerate(sc):
        r = rd[i] if rd else None
        sc_rates = " ".join(f"{x:,.0f}" for x in s.load_rates) or "-"
        rd_rates = " ".join(f"{x:,.0f}" for x in r.load_rates) if r and r.load_rates else "-"
        print(
            f"{s.name:<13} | {sc_rates:>22} {s.server_cpu:6.2f} {s.loader_cpu:7.2f} | "
            + (f"{rd_rates:>22} {r.server_cpu:6.2f} {r.loader_cpu:7.2f} | " if r else "- | ")
            + f"{len(s.latencies_ns)}/{len(r.latencies_ns) if r else '-'}"
        )


if __name__ == "__main__":
    main()
