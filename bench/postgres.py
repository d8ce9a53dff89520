"""The PostgreSQL source (docs/postgres.md): latency, bulk throughput, initial load.

Each part starts a private PostgreSQL 15 (``tests/sources/pgserver.py``: a free port, a
temporary directory, ``fsync=off``) and ``statecast serve --source ... --store memory`` in a
process of its own, as in production.

* ``latency``: a writer process commits ``--rate`` transactions a second (default 1,000),
  each of 3 rows (an execution inserted, its order updated, the position upserted), for
  ``--seconds``; ``--subscribers`` (100) TCP subscribers receive every change. Latency is
  from the moment the writer's COMMIT returns to the moment a subscriber has the
  transaction's last change (every subscriber is sampled).
* ``bulk``: one ``UPDATE`` of every row of a ``--rows`` (1,000,000) row table, in one
  transaction, while ``pg_recvlogical`` drains a second pgoutput slot of the same
  publication to ``/dev/null``: rows per second each (statecast: from the COMMIT's return
  until the batch is applied, ``ping`` seq; pg_recvlogical: from its start, right after the
  COMMIT, until it exits at the transaction's end LSN, ``--endpos``).
* ``load``: statecast's start on a ``--rows`` row table: from the process start until it
  listens (the load done), and the load itself as statecast logs it.

    python bench/postgres.py [--part latency|bulk|load|all] [--rows N] [--rate N]
                             [--subscribers N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import cpu_seconds, free_port, machine, print_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests/
from tests.sources.pgserver import PgServer

SETTINGS: dict[str, str | int] = {
    "shared_buffers": "512MB",
    "max_wal_size": "8GB",
    "logical_decoding_work_mem": "256MB",
}

DESK = (
    "CREATE TABLE orders (id text PRIMARY KEY, account text NOT NULL, symbol text NOT NULL,"
    " side text NOT NULL, qty int NOT NULL, filled int NOT NULL, px numeric(12, 2) NOT NULL,"
    " status text NOT NULL, updated timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE executions (id text PRIMARY KEY, order_id text NOT NULL, qty int NOT NULL,"
    " px numeric(12, 2) NOT NULL, at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE positions (account text, symbol text, qty int NOT NULL, ptx bigint NOT NULL,"
    " PRIMARY KEY (account, symbol))",
)


class Statecast:
    """``statecast serve --source`` in a process of its own (memory store)."""

    def __init__(self, url: str, tables: str, *extra: str) -> None:
        self.port = free_port()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "statecast",
                "serve",
                *("--port", str(self.port), "--http-port", "off", "--heartbeat", "0"),
                *("--store", "memory", "--source", url, "--tables", tables),
                *("--retain", "100000", "--log-level", "info", *extra),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 600
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self.listening = time.monotonic() - self.started
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError("statecast did not start:\n" + "".join(self.lines))
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def seq(self, sock: socket.socket, reader: Any) -> int:
        sock.sendall(b'{"op":"ping"}\n')
        while True:
            line = reader.readline()
            if b'"pong"' in line:
                return int(re.search(rb'"seq":(\d+)', line).group(1))  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


# -- latency -------------------------------------------------------------------------------

WRITER = r"""
import sys, time, psycopg2
dsn, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conn = psycopg2.connect(dsn)
conn.autocommit = True
cur = conn.cursor()
accounts = [f"ACC-{i}" for i in range(6)]
symbols = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "AMD", "INTC", "ORCL"]
start = time.monotonic()
out = []
n = 0
while True:
    target = start + n / rate
    now = time.monotonic()
    if now - start >= seconds:
        break
    if target > now:
        time.sleep(target - now)
    n += 1
    order = f"ORD-{n % 2000}"
    account, symbol = accounts[n % 6], symbols[n % 10]
    # One round trip: the three statements in one transaction.
    cur.execute(
        "BEGIN;"
        f"INSERT INTO executions (id, order_id, qty, px) VALUES ('E-{n}', '{order}', 100, 101.25);"
        f"UPDATE orders SET filled = filled + 100, status = 'partially_filled', updated = now()"
        f" WHERE id = '{order}';"
        f"INSERT INTO positions VALUES ('{account}', '{symbol}', 100, {n})"
        f" ON CONFLICT (account, symbol) DO UPDATE SET qty = positions.qty + 100, ptx = {n};"
        "COMMIT"
    )
    out.append(f"{n} {time.monotonic_ns()}")
sys.stdout.write("\n".join(out) + "\n")
"""

PTX = re.compile(rb'"ptx":(\d+)')


def latency(rate: int, seconds: float, subscribers: int) -> dict[str, object]:
    with PgServer(settings=SETTINGS) as pg:
        pg.execute(
            *DESK,
            "INSERT INTO orders SELECT 'ORD-' || i, 'ACC-' || (i % 6), 'AAPL', 'buy', 1000000,"
            " 0, 101.25, 'open' FROM generate_series(0, 1999) i",
        )
        sc = Statecast(pg.url, "orders,executions,positions")
        socks = []
        try:
            for _ in range(subscribers):
                s = socket.create_connection(("127.0.0.1", sc.port))
                s.sendall(b'{"op":"subscribe"}\n')
                f = s.makefile("rb")
                assert b"hello" in f.readline()
                assert b"subscribed" in f.readline()
                f.close()
                s.setblocking(False)
                socks.append(s)
            cpu0 = cpu_seconds(sc.proc.pid)
            t0 = time.monotonic()
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, pg.dsn, str(rate), str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            received = read_all(socks, time.monotonic() + seconds + 3.0)
            out, _ = writer.communicate(timeout=60)
            elapsed = time.monotonic() - t0
            cpu = (cpu_seconds(sc.proc.pid) - cpu0) / elapsed
        finally:
            for s in socks:
                s.close()
            sc.stop()
    committed = {int(a): int(b) for a, b in (line.split() for line in out.split("\n") if line)}
    # Leave out the first second: connections and caches warming up.
    warm = int(rate)
    lat = sorted(
        (at - committed[tx]) / 1e6
        for tx, at in received
        if tx in committed and tx > warm and at >= committed[tx] - 5_000_000
    )
    missing = len(committed) * subscribers - len(received)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        "transactions/s (3 rows each)": len(committed) / seconds,
        "subscribers": subscribers,
        "deliveries": len(received) * 3,
        "transactions not received": missing,
        "samples (after the first second)": len(lat),
        "p50 ms": pct(0.50),
        "p90 ms": pct(0.90),
        "p99 ms": pct(0.99),
        "max ms": lat[-1] if lat else float("nan"),
        "statecast CPU (cores busy)": cpu,
    }


def read_all(socks: list[socket.socket], stop_at: float) -> list[tuple[int, int]]:
    """(transaction, time received) of each position change, on every subscriber."""
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    partial = dict.fromkeys(by_fd, b"")
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    out: list[tuple[int, int]] = []
    while time.monotonic() < stop_at:
        for fd, _ in ep.poll(0.01):
            try:
                data = by_fd[fd].recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                ep.unregister(fd)
                continue
            now = time.monotonic_ns()
            buf = partial[fd] + data
            cut = buf.rfind(b"\n") + 1
            partial[fd] = buf[cut:]
            out.extend((int(tx), now) for tx in PTX.findall(buf, 0, cut))
    ep.close()
    return out


# -- bulk ----------------------------------------------------------------------------------


def recvlogical(pg: PgServer) -> str:
    found = pg.bin_dir / "pg_recvlogical"
    if found.exists():
        return str(found)
    exe = shutil.which("pg_recvlogical")
    if exe is None:
        raise FileNotFoundError("pg_recvlogical is not installed")
    return exe


def bulk(rows: int) -> dict[str, object]:
    with PgServer(settings=SETTINGS) as pg:
        pg.execute(
            DESK[0],
            "INSERT INTO orders SELECT 'ORD-' || i, 'ACC-' || (i % 6), 'SYM' || (i % 12), 'buy',"
            f" 1000, 0, (i % 10000) / 100.0, 'open' FROM generate_series(1, {rows}) i",
            "VACUUM ANALYZE orders",
        )
        sc = Statecast(pg.url, "orders")
        conn = pg.connect()
        try:
            cur = conn.cursor()
            cur.execute("SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')")
            client = socket.create_connection(("127.0.0.1", sc.port))
            reader = client.makefile("rb")
            reader.readline()  # hello
            before = sc.seq(client, reader)
            t0 = time.monotonic()
            cur.execute("UPDATE orders SET filled = filled + 1, status = 'partially_filled'")
            committed = time.monotonic()
            cur.execute("SELECT pg_current_wal_lsn()")
            end = cur.fetchone()[0]  # type: ignore[index]
            started = time.monotonic()
            recv = subprocess.Popen(
                [
                    recvlogical(pg),
                    *("-h", pg.host, "-p", str(pg.port), "-U", pg.user, "-d", pg.dbname),
                    *("--slot", "bench_recv", "--start", "--endpos", end, "-F", "0"),
                    *("-o", "proto_version=1", "-o", "publication_names=statecast"),
                    *("-f", "/dev/null", "--no-loop"),
                ],
                stderr=subprocess.PIPE,
                text=True,
            )
            done_recv: list[float] = []

            def wait_recv() -> None:
                recv.wait(3600)
                done_recv.append(time.monotonic() - started)

            waiter = threading.Thread(target=wait_recv)
            waiter.start()
            while sc.seq(client, reader) < before + rows:
                time.sleep(0.01)
            statecast_s = time.monotonic() - committed
            waiter.join(3600)
            recv_s = done_recv[0]
            client.close()
            if recv.returncode != 0:
                raise RuntimeError(
                    f"pg_recvlogical failed: {recv.stderr.read() if recv.stderr else ''}"
                )
        finally:
            conn.close()
            sc.stop()
    return {
        "rows updated in one transaction": rows,
        "UPDATE took s": committed - t0,
        "statecast: commit to applied s": statecast_s,
        "statecast rows/s": rows / statecast_s,
        "pg_recvlogical (pgoutput to /dev/null) s": recv_s,
        "pg_recvlogical rows/s": rows / recv_s,
        "statecast / pg_recvlogical": recv_s / statecast_s,
    }


# -- load ----------------------------------------------------------------------------------


def load(rows: int) -> dict[str, object]:
    with PgServer(settings=SETTINGS) as pg:
        pg.execute(
            DESK[0],
            "INSERT INTO orders SELECT 'ORD-' || i, 'ACC-' || (i % 6), 'SYM' || (i % 12), 'buy',"
            f" 1000, 0, (i % 10000) / 100.0, 'open' FROM generate_series(1, {rows}) i",
            "VACUUM ANALYZE orders",
        )
        sc = Statecast(pg.url, "orders")
        try:
            logged = next(
                (
                    float(m.group(1))
                    for line in sc.lines
                    if (m := re.search(r"in ([\d.]+)s; streaming", line))
                ),
                float("nan"),
            )
        finally:
            sc.stop()
    return {
        "rows": rows,
        "process start to listening s": sc.listening,
        "load (slot, COPY, batches applied) s": logged,
        "rows/s": rows / logged,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=["latency", "bulk", "load", "all"], default="all")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    print(f"machine: {machine()}, {os.cpu_count()} cores")
    if args.part in ("latency", "all"):
        print_result(
            "postgres: commit to delivery", latency(args.rate, args.seconds, args.subscribers)
        )
    if args.part in ("bulk", "all"):
        print_result("postgres: bulk UPDATE beside pg_recvlogical", bulk(args.rows))
    if args.part in ("load", "all"):
        print_result("postgres: initial load", load(args.rows))


if __name__ == "__main__":
    main()
