"""Cluster: statecast nodes on one NATS JetStream stream (docs/cluster.md), each figure
beside its single-server peer from the same run.

1. latency from a publish on node A to its delivery to subscribers of node B, beside a
   publish and its delivery on one node (memory store): light (10 subscribers, 1,000
   changes/s) and loaded (100 subscribers, 10,000 changes/s);
2. acked publish throughput through JetStream (batches of 100), beside the SQLite
   store's; and two nodes publishing at once;
3. fan-out to 1,000 subscribers on each of two nodes, beside 2,000 on one node;
4. start-up of a node whose stream holds a checkpoint of 1,000,000 records, beside the
   SQLite store's start-up with as many records.

Needs ``nats-server`` (Debian's nats-server package); starts its own on a free port
with a temporary store directory.

    python bench/cluster.py [--quick] [--skip latency,ingest,fanout,startup]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    Counter,
    StatecastProcess,
    cpu_seconds,
    free_port,
    machine,
    new_loop,
    print_result,
)
from fanout import change_lines, connect_all, fanout_result, publish_windowed, wait_counts
from load import publish_all, publish_lines
from startup import wait_ping


class NatsServerProcess:
    """``nats-server -js`` on a free loopback port with a store directory of its own."""

    def __init__(self, store_dir: Path) -> None:
        exe = self.exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(exe).exists():
            raise FileNotFoundError("nats-server is not installed")
        self.port = free_port()
        self.log = (store_dir / "nats-server.log").open("wb")
        self.proc = subprocess.Popen(
            [exe, "-js", "-sd", str(store_dir), "-p", str(self.port), "-a", "127.0.0.1"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.2)  # JetStream is up right after the listener
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def version(self) -> str:
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True, check=False)
        return str(out.stdout).strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def node(url: str, stream: str, *args: str) -> StatecastProcess:
    return StatecastProcess("--store", url, "--nats-stream", stream, *args)


# The publisher and the reader of the Python latency benchmark this one was built with
# (bench/latency.py now uses a C reader, for one node against Redis).
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


# -- 1. latency ---------------------------------------------------------------------------
def latency_run(
    publish_to: StatecastProcess,
    subscribe_to: StatecastProcess,
    *,
    n_subs: int,
    rate: int,
    seconds: float,
    sample_every: int,
) -> dict[str, Any]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n_subs):
            s = socket.create_connection(("127.0.0.1", subscribe_to.port))
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
            [
                sys.executable,
                "-c",
                PUBLISHER,
                str(publish_to.port),
                str(rate),
                str(seconds),
                str(per_tick),
            ]
        )
        t0 = time.perf_counter()
        latencies, frames, closed = read_subscribers(
            socks, sampled, time.monotonic() + seconds + 1.0, 0.001
        )
        elapsed = time.perf_counter() - t0
        pub.wait()
    finally:
        for s in socks:
            s.close()
    skip = len(latencies) // max(1, int(seconds))  # the first second: warming up
    lat = sorted(latencies[skip:])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6 if lat else float("nan")

    return {
        "subscribers": n_subs,
        f"changes/s (batches of {per_tick} every 1 ms)": rate,
        "deliveries/s achieved": frames / elapsed,
        "latency samples": len(lat),
        "p50 ms": pct(0.50),
        "p99 ms": pct(0.99),
        "max ms": lat[-1] / 1e6 if lat else float("nan"),
        "subscribers cut off": closed,
    }


def bench_latency(url: str, args: argparse.Namespace) -> None:
    """Light (the hop itself) and loaded (100 subscribers, 10,000 changes/s)."""
    for n_subs, rate in ((10, 1000), (args.lat_subscribers, args.rate)):
        kw = {"n_subs": n_subs, "rate": rate, "seconds": args.seconds, "sample_every": 5}
        single = StatecastProcess()
        try:
            one = latency_run(single, single, **kw)
        finally:
            single.stop()
        a, b = node(url, f"lat{rate}"), node(url, f"lat{rate}")
        try:
            two = latency_run(a, b, **kw)
        finally:
            a.stop()
            b.stop()
        print_result("latency, publish on node A -> subscribers of node B (NATS)", two)
        print_result("latency, publish -> subscribers, one node (memory store)", one)
        print(
            f"== ratio cluster/single: p50 {two['p50 ms'] / one['p50 ms']:.2f}, "
            f"p99 {two['p99 ms'] / one['p99 ms']:.2f}",
            flush=True,
        )


# -- 2. ingest ----------------------------------------------------------------------------
def bench_ingest(url: str, args: argparse.Namespace) -> None:
    lines = publish_lines(args.changes, 100, args.value_size)
    a = node(url, "ingest")
    try:
        cpu0 = cpu_seconds(a.pid)
        elapsed = publish_all(a.port, lines)
        cpu = (cpu_seconds(a.pid) - cpu0) / elapsed
    finally:
        a.stop()
    nats_rate = args.changes / elapsed
    # Two nodes publishing at once, every publish racing the other node's.
    a, b = node(url, "ingest2"), node(url, "ingest2")
    half = len(lines) // 2
    times: list[float] = []
    try:
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=lambda p, ls: times.append(publish_all(p, ls)), args=(p, ls))
            for p, ls in ((a.port, lines[:half]), (b.port, lines[half:]))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        both = time.perf_counter() - t0
    finally:
        a.stop()
        b.stop()
    with tempfile.TemporaryDirectory() as tmp:
        srv = StatecastProcess("--store", "sqlite", "--data-dir", tmp)
        try:
            sqlite_elapsed = publish_all(srv.port, lines)
        finally:
            srv.stop()
    sqlite_rate = args.changes / sqlite_elapsed
    print_result(
        "acked publish ingest, one node, NATS JetStream store",
        {
            "changes": args.changes,
            "batch": 100,
            "value bytes": args.value_size,
            "publishes in flight (one connection)": 8,
            "seconds": elapsed,
            "changes/s": nats_rate,
            "node CPU (cores busy)": cpu,
        },
    )
    print_result(
        "acked publish ingest, two nodes at once (one connection each)",
        {"changes": half * 2 * 100, "seconds": both, "changes/s": half * 2 * 100 / both},
    )
    print_result(
        "acked publish ingest, SQLite store (synchronous=full)",
        {"changes": args.changes, "seconds": sqlite_elapsed, "changes/s": sqlite_rate},
    )
    print(f"== ratio nats/sqlite: {nats_rate / sqlite_rate:.2f}", flush=True)


# -- 3. fan-out ---------------------------------------------------------------------------
async def fanout_run(
    publish_to: StatecastProcess,
    subscribe_to: list[StatecastProcess],
    n_subs: int,
    n_changes: int,
    size: int,
) -> dict[str, Any]:
    subs: list[Counter] = []
    for srv in subscribe_to:
        subs += await connect_all(n_subs, srv.port, b"\n", b'{"op":"subscribe"}\n')
    await wait_counts(subs, 2)  # hello, subscribed
    reader, writer = await asyncio.open_connection("127.0.0.1", publish_to.port)
    await reader.readline()
    lines = change_lines(n_changes, 100, size)
    pids = {s.pid for s in [publish_to, *subscribe_to]}
    t0 = time.perf_counter()
    cpu0 = sum(cpu_seconds(p) for p in pids)
    await publish_windowed(reader, writer, lines)
    await wait_counts(subs, 2 + n_changes)
    elapsed = time.perf_counter() - t0
    cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / elapsed
    writer.close()
    for s in subs:
        s.transport.close()  # type: ignore[union-attr]
    return fanout_result(
        len(subs),
        n_changes,
        elapsed,
        sum(s.bytes for s in subs),
        cpu,
        **{"nodes": len(subscribe_to), "publish batch": 100},
    )


def bench_fanout(url: str, args: argparse.Namespace) -> None:
    loop = new_loop()
    n = args.fanout_subscribers
    a, b = node(url, "fanout"), node(url, "fanout")
    try:
        two = loop.run_until_complete(fanout_run(a, [a, b], n, args.fanout_changes, 200))
    finally:
        a.stop()
        b.stop()
    single = StatecastProcess()
    try:
        one = loop.run_until_complete(fanout_run(single, [single], 2 * n, args.fanout_changes, 200))
    finally:
        single.stop()
    loop.close()
    print_result(f"fan-out, {n:,} subscribers on each of two nodes (NATS)", two)
    print_result(f"fan-out, {2 * n:,} subscribers on one node (memory store)", one)
    print(f"== ratio two nodes/one node: {two['deliveries/s'] / one['deliveries/s']:.2f}")


# -- 4. start-up --------------------------------------------------------------------------
def manifests(url: str, stream: str) -> list[dict[str, Any]]:
    """The checkpoint manifests in a stream (with the nats-py client)."""
    import nats  # noqa: PLC0415 (only this benchmark needs it)
    import nats.js.errors  # noqa: PLC0415

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        out: list[dict[str, Any]] = []
        seq = 1
        try:
            while True:
                try:
                    subject = stream.removesuffix("_ckpt") + ".ckpt"
                    m = await js.get_msg(stream, seq=seq, next=True, subject=subject)
                except nats.js.errors.NotFoundError:
                    return out
                out.append(json.loads(m.data or b"{}"))
                seq = (m.seq or seq) + 1
        finally:
            await nc.close()

    return asyncio.run(read())


def timed_start(args: list[str], port: int) -> tuple[float, subprocess.Popen[bytes]]:
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statecast",
            "serve",
            "--port",
            str(port),
            "--http-port",
            "off",
            "--heartbeat",
            "0",
            "--log-level",
            "warning",
            *args,
        ]
    )
    wait_ping(port, timeout=300)
    return time.perf_counter() - t0, p


def wait_checkpoint(
    url: str, stream: str, records: int, at_most: int, wait: float
) -> dict[str, Any] | None:
    """The newest manifest of a checkpoint holding ``records`` records, written at seq
    ``at_most`` or before (waiting ``wait`` seconds for one)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ready = [m for m in manifests(url, f"{stream}_ckpt") if m["records"] >= records]
        ready = [m for m in ready if m["seq"] <= at_most]
        if ready:
            return max(ready, key=lambda m: int(m["seq"]))
        time.sleep(0.5)
    return None


def bench_startup(url: str, args: argparse.Namespace) -> None:
    records, retain = args.records, args.retain
    # Every record, then updates until a checkpoint of all of them is `retain` changes old
    # (a starting node loads the newest such checkpoint, and the log after it).
    fill = publish_lines(records, 1000, args.value_size)
    more = publish_lines(retain, 1000, args.value_size)  # updates of the same keys
    stream = "startup"
    a = node(url, stream, "--retain", str(retain))
    try:
        ingest = publish_all(a.port, fill)
        tip = records
        cp = None
        for _ in range(4):
            publish_all(a.port, more)
            tip += retain
            cp = wait_checkpoint(url, stream, records, tip - retain, wait=30 if _ == 3 else 5)
            if cp is not None:
                break
        assert cp is not None, "no checkpoint of every record was written"
    finally:
        a.stop()
    lines = fill + more
    seconds, p = timed_start(
        ["--store", url, "--nats-stream", stream, "--retain", str(retain)], port := free_port()
    )
    with socket.create_connection(("127.0.0.1", port)) as s:
        hello = json.loads(s.makefile("rb").readline())
    p.terminate()
    p.wait(60)
    assert hello["seq"] == tip, hello
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        sq = StatecastProcess("--store", f"sqlite:{db}", "--retain", str(retain))
        try:
            publish_all(sq.port, lines)
        finally:
            sq.stop()
        sqlite_seconds, p = timed_start(
            ["--store", f"sqlite:{db}", "--retain", str(retain)], free_port()
        )
        p.terminate()
        p.wait(60)
    print_result(
        "start-up of a node from a checkpoint (NATS)",
        {
            "records in the checkpoint": cp["records"],
            "checkpoint bytes": cp["bytes"],
            "checkpoint messages": cp["chunks"],
            "changes replayed after it": tip - cp["seq"],
            "--retain": retain,
            "filling ingest, changes/s (batches of 1000)": records / ingest,
            "start-up to first pong, seconds": seconds,
        },
    )
    print_result(
        "start-up, SQLite store, same records and retain",
        {"start-up to first pong, seconds": sqlite_seconds},
    )
    print(f"== ratio nats/sqlite: {seconds / sqlite_seconds:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--skip", default="", help="comma-separated: latency,ingest,fanout,startup")
    ap.add_argument("--lat-subscribers", type=int, default=100)
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--changes", type=int, default=500_000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--fanout-subscribers", type=int, default=1000)
    ap.add_argument("--fanout-changes", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--retain", type=int, default=100_000)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.changes, args.fanout_changes = 3, 50_000, 1000
        args.fanout_subscribers, args.records, args.retain = 100, 50_000, 10_000
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        nats_server = NatsServerProcess(Path(tmp))
        try:
            print(f"machine: {machine()}")
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"load average before the run (other work on the machine): {load}")
            print(f"{nats_server.version()}, JetStream file storage, 1 replica")
            if "latency" not in skip:
                bench_latency(nats_server.url, args)
            if "ingest" not in skip:
                bench_ingest(nats_server.url, args)
            if "fanout" not in skip:
                bench_fanout(nats_server.url, args)
            if "startup" not in skip:
                bench_startup(nats_server.url, args)
        finally:
            nats_server.stop()


if __name__ == "__main__":
    main()
