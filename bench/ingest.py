"""Publish ingest against Redis, in one run: changes per second acknowledged.

    python bench/ingest.py [--changes 1000000] [--batch 1000] [--value-size 200]
                           [--connections 1,4,16] [--rounds 3] [--store both]

Two comparisons, each at 1, 4 and 16 publishing connections:

* durable: statecast with its SQLite store (``synchronous=full``: an ``ack`` means the
  batch is committed and fsynced) against a private ``redis-server`` with
  ``--appendonly yes --appendfsync always`` (a reply means the command is in the
  fsynced AOF), both in a temporary directory on the same disk;
* in memory: statecast's memory store against ``redis-server`` without persistence.

The same client drives both: one process of its own (forked before the servers are
timed), one non-blocking socket per connection in one epoll loop, every request
encoded before the clock starts. Statecast gets ``publish`` requests of ``--batch``
changes (the collection ``orders``, keys ``O-00000000`` ..., values of about
``--value-size`` bytes of JSON); Redis gets the same keys and the same JSON texts as
pipelined ``SET`` commands, ``--batch`` per write. Each connection keeps at most
``--window`` requests (or pipelines) unanswered; the batches are dealt round robin to
the connections. Every run starts a fresh server on an empty database or AOF, and the
runs of a comparison are interleaved (the order alternates from round to round), so
that the machine's noise falls on both sides alike. The client's and the servers' CPU
time is reported with each run: a client far below one core is not the bottleneck
(``--profile-client`` prints where its time goes).

``--store memory`` or ``--store sqlite`` runs only that comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import multiprocessing
import os
import pstats
import select
import shutil
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from common import StatecastProcess, cpu_seconds, encode, free_port, machine
from load import record_value

# -- the workload --------------------------------------------------------------------------


@dataclass
class Workload:
    """The same changes, encoded for each server: one request per batch."""

    changes: int
    batch: int
    statecast: list[bytes]  # one publish line per batch
    redis: list[bytes]  # one pipeline of SETs per batch


def workload(changes: int, batch: int, value_size: int) -> Workload:
    sc: list[bytes] = []
    rd: list[bytes] = []
    for b in range(0, changes, batch):
        keys = [f"O-{i:08d}" for i in range(b, min(changes, b + batch))]
        values = [encode(record_value(i, value_size)) for i in range(b, b + len(keys))]
        sc.append(
            b'{"op":"publish","changes":['
            + b",".join(
                b'{"collection":"orders","key":"%s","value":%s}' % (k.encode(), v)
                for k, v in zip(keys, values, strict=True)
            )
            + b"]}\n"
        )
        rd.append(
            b"".join(
                b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k.encode(), len(v), v)
                for k, v in zip(keys, values, strict=True)
            )
        )
    return Workload(changes, batch, sc, rd)


# -- the client: one process, one epoll loop ------------------------------------------------


@dataclass
class Job:
    """What the client sends: ``requests`` over ``connections`` sockets to ``port``,
    at most ``window`` unanswered per socket; an answer is ``lines_per_reply`` lines
    (a statecast ack is one, a pipeline of SETs one ``+OK`` per SET); ``hello``: the
    server greets first (statecast)."""

    port: int
    requests: list[bytes]
    connections: int
    window: int
    lines_per_reply: int
    hello: bool


class _Conn:
    __slots__ = ("acked", "lines", "next", "partial", "requests", "sock", "view", "written")

    def __init__(self, sock: socket.socket, requests: list[bytes]) -> None:
        self.sock = sock
        self.requests = requests
        self.next = 0  # the next request to send
        self.view: memoryview | None = None  # what is left of the request being sent
        self.written = 0  # requests sent whole
        self.acked = 0  # requests answered whole
        self.lines = 0  # reply lines counted towards the next answer

    @property
    def done(self) -> bool:
        return self.acked == len(self.requests)

    def read(self, lines_per_reply: int) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise RuntimeError("the server closed the connection")
        if b"error" in data or data.startswith(b"-") or b"\n-" in data:
            raise RuntimeError(f"error reply: {data[:300]!r}")
        n = self.lines + data.count(b"\n")
        self.acked += n // lines_per_reply
        self.lines = n % lines_per_reply

    def write(self, window: int) -> bool:
        """Send what the window allows; whether there is more to send now."""
        while self.written - self.acked < window and (
            self.view is not None or self.next < len(self.requests)
        ):
            if self.view is None:
                self.view = memoryview(self.requests[self.next])
                self.next += 1
            try:
                sent = self.sock.send(self.view)
            except BlockingIOError:
                return True
            self.view = self.view[sent:]
            if not self.view:
                self.view = None
                self.written += 1
        return self.view is not None


def connect(job: Job) -> list[_Conn]:
    conns = []
    for c in range(job.connections):
        s = socket.create_connection(("127.0.0.1", job.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if job.hello:  # statecast's hello line
            f = s.makefile("rb")
            assert b'"hello"' in f.readline()
            f.close()
        s.setblocking(False)
        conns.append(_Conn(s, job.requests[c :: job.connections]))
    return conns


def drive(job: Job) -> tuple[float, float]:
    """Send every request, until every one is answered: (seconds, client CPU seconds)."""
    conns = connect(job)
    ep = select.epoll()
    by_fd = {c.sock.fileno(): c for c in conns}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
    left = len(conns)
    cpu0 = os.times()
    t0 = time.perf_counter()
    while left:
        for fd, ev in ep.poll():
            c = by_fd[fd]
            if ev & select.EPOLLIN:
                c.read(job.lines_per_reply)
                if c.done:
                    left -= 1
                    ep.unregister(fd)
                    continue
            blocked = c.write(job.window)
            more = c.next < len(c.requests) and c.written - c.acked < job.window
            ep.modify(fd, select.EPOLLIN | (select.EPOLLOUT if blocked or more else 0))
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    for c in conns:
        c.sock.close()
    ep.close()
    return elapsed, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)


def _client_main(out: Connection, job: Job, profile: bool) -> None:
    try:
        if profile:
            prof = cProfile.Profile()
            result = prof.runcall(drive, job)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
            out.send((result, text.getvalue()))
        else:
            out.send((drive(job), ""))
    except BaseException as exc:
        out.send(exc)
        raise


def run_client(job: Job, *, profile: bool = False) -> tuple[float, float, str]:
    """The client in a process of its own (forked: the requests are not copied):
    (seconds, client CPU seconds, its profile)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_client_main, args=(send, job, profile))
    p.start()
    send.close()
    got = recv.recv()
    p.join()
    if isinstance(got, BaseException):
        raise got
    (elapsed, cpu), prof = got
    return elapsed, cpu, prof


# -- the servers ------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(tmp: str, *, aof: bool) -> Iterator[tuple[int, int]]:
    """A private redis-server in ``tmp``: (port, pid). With ``aof``, every write is in
    the fsynced AOF before its reply (``appendfsync always``); AOF rewrites and RDB
    snapshots are off, so that no fork competes with the benchmark."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "always", "--auto-aof-rewrite-percentage", "0"]
        if aof
        else ["--appendonly", "no"]
    )
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "", *persistence],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


@contextlib.contextmanager
def statecast_server(tmp: str, *, durable: bool) -> Iterator[tuple[int, int]]:
    store = f"sqlite:{tmp}/ingest.db" if durable else "memory"
    srv = StatecastProcess("--store", store)  # --retain: the default, 1,000,000 changes
    try:
        yield srv.port, srv.pid
    finally:
        srv.stop()


def unfolded(db: Path) -> int:
    """How many committed changes the SQLite store has not folded into its records
    table yet (read beside the running server)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        meta = dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())
    return int(meta["seq"]) - int(meta.get("folded_seq") or meta["seq"])


@dataclass
class Run:
    system: str
    connections: int
    seconds: float
    client_cpu: float
    server_cpu: float
    note: str = ""

    def rate(self, changes: int) -> float:
        return changes / self.seconds


def one_run(
    system: str, w: Workload, connections: int, window: int, profile: bool
) -> tuple[Run, str]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        server: Callable[[], contextlib.AbstractContextManager[tuple[int, int]]]
        if system.startswith("redis"):
            requests, per_reply, hello = w.redis, w.batch, False
            server = lambda: redis_server(tmp, aof=system == "redis-aof")  # noqa: E731
        else:
            requests, per_reply, hello = w.statecast, 1, True
            server = lambda: statecast_server(tmp, durable=system == "statecast-sqlite")  # noqa: E731
        with server() as (port, pid):
            cpu0 = cpu_seconds(pid)
            job = Job(port, requests, connections, window, per_reply, hello)
            elapsed, client_cpu, prof = run_client(job, profile=profile)
            server_cpu = cpu_seconds(pid) - cpu0
            note = ""
            if system == "statecast-sqlite":
                note = f"unfolded at the last ack: {unfolded(Path(tmp) / 'ingest.db'):,}"
    return Run(system, connections, elapsed, client_cpu, server_cpu, note), prof


# -- main ------------------------------------------------------------------------------------

PAIRS = {
    "sqlite": ("statecast-sqlite", "redis-aof"),
    "memory": ("statecast-memory", "redis"),
}
TITLES = {
    "sqlite": "durable: statecast SQLite (synchronous=full) vs Redis AOF appendfsync always",
    "memory": "in memory: statecast memory store vs Redis without persistence",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--changes", type=int, default=1_000_000, help="changes per run")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--connections", default="1,4,16")
    ap.add_argument("--window", type=int, default=8, help="unanswered requests per connection")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", choices=["both", "sqlite", "memory"], default="both")
    ap.add_argument("--profile-client", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.connections.split(",")]
    kinds = ["sqlite", "memory"] if args.store == "both" else [args.store]
    print(f"machine: {machine()}")
    print(
        f"{args.changes:,} changes per run, batches of {args.batch}, values of about "
        f"{args.value_size} bytes, window {args.window} per connection, "
        f"{args.rounds} rounds, interleaved",
        flush=True,
    )
    w = workload(args.changes, args.batch, args.value_size)
    results: dict[tuple[str, int], list[Run]] = {}
    for rnd in range(args.rounds):
        for kind in kinds:
            for n in counts:
                pair = PAIRS[kind] if rnd % 2 == 0 else PAIRS[kind][::-1]
                for system in pair:
                    run, prof = one_run(system, w, n, args.window, args.profile_client)
                    results.setdefault((system, n), []).append(run)
                    print(
                        f"round {rnd + 1} {system:<17} {n:>2} conn: "
                        f"{run.rate(w.changes):>9,.0f} changes/s  {run.seconds:6.2f} s  "
                        f"server {run.server_cpu / run.seconds:.2f} cores  "
                        f"client {run.client_cpu / run.seconds:.2f} cores  {run.note}",
                        flush=True,
                    )
                    if prof:
                        print(prof)
    print()
    for kind in kinds:
        ours, theirs = PAIRS[kind]
        print(f"== {TITLES[kind]}")
        print(
            f"   {'conns':>5}  {ours + ' changes/s':>34}  {theirs + ' changes/s':>30}  "
            f"{'ratio (per round)':>24}"
        )
        for n in counts:
            a = [r.rate(w.changes) for r in results[(ours, n)]]
            b = [r.rate(w.changes) for r in results[(theirs, n)]]
            ratios = [x / y for x, y in zip(a, b, strict=True)]
            print(
                f"   {n:>5}  {_range(a):>34}  {_range(b):>30}  "
                f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})"
            )
        client = max(
            r.client_cpu / r.seconds
            for k, rs in results.items()
            for r in rs
            if k[0] in (ours, theirs)
        )
        print(f"   the client used at most {client:.2f} cores in any run")
        print()


def _range(xs: list[float]) -> str:
    return f"{min(xs):,.0f}-{max(xs):,.0f} (med {statistics.median(xs):,.0f})"


if __name__ == "__main__":
    main()
