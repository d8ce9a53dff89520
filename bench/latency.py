"""Latency from publish to receipt, at N subscribers and a steady publish rate.

A publisher process sends a batch every millisecond (10 changes: 10,000 changes/s by
default), each change carrying its send time (CLOCK_MONOTONIC, shared by every process
on the machine). All N subscribers receive everything; every k-th one also reads the
send times out of its frames, so latencies are sampled across the whole fan-out order.

    python bench/latency.py [--subscribers 1000] [--rate 10000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import select
import socket
import subprocess
import sys
import time

from common import StatecastProcess, cpu_seconds, machine, print_result

PUBLISHER = r"""
import socket, sys, threading, time, msgspec
port, rate, per_tick = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
seconds = float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def drain():
    while s.recv(1 << 16):
        pass
threading.Thread(target=drain, daemon=True).start()
tick = per_tick / rate
start = time.monotonic()
n = 0
i = 0
while True:
    target = start + n * tick
    now = time.monotonic()
    if now - start >= seconds:
        break
    if target > now:
        time.sleep(target - now)
    t = time.monotonic_ns()
    value = {"t": t, "bid": 101.25, "ask": 101.27, "qty": 300}
    changes = [{"collection": "quotes", "key": f"Q{(i + j) % 500}", "value": value}
               for j in range(per_tick)]
    i += per_tick
    s.sendall(msgspec.json.encode({"op": "publish", "changes": changes}) + b"\n")
    n += 1
time.sleep(0.5)
s.close()
"""

T_RE = re.compile(rb'"t":(\d+)')


def read_subscribers(
    socks: list[socket.socket], sampled: set[int], stop_at: float, cycle: float
) -> tuple[list[int], int, int]:
    """Read every socket until ``stop_at``; latencies of sampled sockets' changes.

    A plain epoll loop rather than asyncio: one Python process must keep up with
    1,000 sockets and millions of frames a second on a machine whose other core runs
    the server. Each round reads every ready socket once, then waits out the rest of
    ``cycle`` so that frames gather in the socket buffers; a measured latency therefore
    includes up to one cycle of the reader's own delay.
    """
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    partial = {fd: b"" for fd in by_fd}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    latencies: list[int] = []
    frames = 0
    closed = 0
    while (now := time.monotonic()) < stop_at:
        t_round = now
        for fd, _ in ep.poll(0.01):
            try:
                data = by_fd[fd].recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                ep.unregister(fd)
                closed += 1
                continue
            frames += data.count(b"\n")
            if fd in sampled:
                received = time.monotonic_ns()
                buf = partial[fd] + data
                cut = buf.rfind(b"\n") + 1
                partial[fd] = buf[cut:]
                latencies.extend(received - int(t) for t in T_RE.findall(buf, 0, cut))
        rest = cycle - (time.monotonic() - t_round)
        if rest > 0:
            time.sleep(rest)
    ep.close()
    return latencies, frames, closed


def run(
    *,
    n_subs: int,
    rate: int,
    seconds: float,
    sample_every: int,
    flush_interval: float,
    cycle: float,
) -> dict[str, object]:
    srv = StatecastProcess("--flush-interval", str(flush_interval))
    socks: list[socket.socket] = []
    try:
        for _ in range(n_subs):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b'{"op":"subscribe"}\n')
            f = s.makefile("rb")
            assert b"hello" in f.readline()
            assert b"subscribed" in f.readline()
            f.close()
            s.setblocking(False)
            socks.append(s)
        sampled = {s.fileno() for i, s in enumerate(socks) if i % sample_every == 0}
        per_tick = max(1, rate // 1000)
        pub = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(srv.port), str(rate), str(seconds), str(per_tick)]
        )
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(srv.pid)
        latencies, frames, closed = read_subscribers(
            socks, sampled, time.monotonic() + seconds + 1.0, cycle
        )
        elapsed = time.perf_counter() - t0
        server_cpu = (cpu_seconds(srv.pid) - cpu0) / elapsed
        pub.wait()
    finally:
        for s in socks:
            s.close()
        srv.stop()
    # Leave out the first second: connections warming up.
    skip = len(latencies) // max(1, int(seconds))
    lat = sorted(latencies[skip:])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6 if lat else float("nan")

    return {
        "subscribers": n_subs,
        "target changes/s": rate,
        "publish batch (every 1 ms)": per_tick,
        "server --flush-interval": flush_interval,
        "reader cycle ms": cycle * 1000,
        "deliveries/s achieved": frames / elapsed,
        "latency samples": len(lat),
        "p50 ms": pct(0.50),
        "p90 ms": pct(0.90),
        "p99 ms": pct(0.99),
        "p99.9 ms": pct(0.999),
        "max ms": lat[-1] / 1e6 if lat else float("nan"),
        "subscribers cut off": closed,
        "server CPU (cores busy)": server_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--flush-interval", type=float, default=0.0)
    ap.add_argument("--reader-cycle", type=float, default=0.002, help="seconds")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    result = run(
        n_subs=args.subscribers,
        rate=args.rate,
        seconds=args.seconds,
        sample_every=args.sample_every,
        flush_interval=args.flush_interval,
        cycle=args.reader_cycle,
    )
    print_result("latency, publish to receipt", result)


if __name__ == "__main__":
    main()
