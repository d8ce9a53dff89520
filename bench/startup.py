"""SQLite store: start-up time with 1,000,000 records and 1,000,000 retained changes.

Fills a fresh SQLite store with N records over the TCP publish op (every ack means
committed to disk: that is the durable ingest figure), then times new servers on that
database, from their start until they answer a ping with the whole state loaded:

* ``after a stop (unfolded)``: the first server is stopped (SIGTERM) right after the
  last ack, so the log rows it had not folded into the records table yet (after a
  burst, nearly all of them) are replayed at start;
* ``after kill -9 (unfolded)``: the same, but the server is killed with SIGKILL, so
  SQLite also recovers its write-ahead log at start;
* ``folded``: a server that was left running until its fold had caught up (the
  records table holds every change) and then stopped.

With ``--passes 2`` every record is published twice (the second time with another
value), so that the retained changes are all updates, and after the burst the records
table holds the first values while the log holds the second ones: the start loads
1,000,000 records and then replays up to 1,000,000 changes over them.

    python bench/startup.py [--records 1000000] [--value-size 200] [--retain 1000000]
                            [--passes 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import free_port, machine, print_result, rss_bytes
from load import publish_all, publish_lines


def start(db: Path, port: int, retain: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statecast",
            "serve",
            "--port",
            str(port),
            "--http-port",
            "off",
            "--store",
            f"sqlite:{db}",
            "--retain",
            str(retain),
            "--heartbeat",
            "0",
            "--log-level",
            "warning",
        ]
    )


def wait_ping(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(b"ping\n")
                if b'"pong"' in f.readline():
                    return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("the server did not answer")


def meta(db: Path) -> dict[str, str]:
    """The store's meta rows, read beside a running server (WAL readers never block)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())


def unfolded(db: Path) -> int:
    m = meta(db)
    return int(m["seq"]) - int(m["folded_seq"])


def timed_start(db: Path, retain: int) -> tuple[float, int, subprocess.Popen[bytes]]:
    """Start a server on ``db``: (seconds to the first pong, RSS, the process)."""
    port = free_port()
    t0 = time.perf_counter()
    p = start(db, port, retain)
    wait_ping(port)
    return time.perf_counter() - t0, rss_bytes(p.pid), p


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    p.send_signal(sig)
    p.wait(120)


def fill(db: Path, port: int, args: argparse.Namespace) -> float:
    """Publish the records (``--passes`` times): the durable ingest, changes/s."""
    ingest = 0.0
    for n in range(args.passes):
        if n:  # the records table catches up with the pass before
            while unfolded(db):
                time.sleep(0.1)
        lines = publish_lines(args.records, 1000, args.value_size + n)
        ingest += publish_all(port, lines)
    return float(args.passes * args.records / ingest)


def crash_copy(db: Path, p: subprocess.Popen[bytes]) -> Path:
    """A copy of the files as a kill -9 now would leave them (the database and its
    WAL; not the shared-memory index, which SQLite then rebuilds from the WAL), taken
    while the server is frozen by SIGSTOP."""
    crashed = db.parent / "crashed"
    crashed.mkdir()
    p.send_signal(signal.SIGSTOP)
    for name in (db.name, f"{db.name}-wal"):
        if (db.parent / name).exists():
            shutil.copy(db.parent / name, crashed / name)
    p.send_signal(signal.SIGCONT)
    return crashed / db.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--retain", type=int, default=1_000_000)
    ap.add_argument("--passes", type=int, default=1, help="publish every record this often")
    ap.add_argument("--dir", default=None, help="where to put the database (default: a temp dir)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    result: dict[str, object] = {
        "records": args.records,
        "retained changes": min(args.retain, args.passes * args.records),
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        db = Path(tmp) / "bench.db"
        port = free_port()
        p = start(db, port, args.retain)
        wait_ping(port)
        result["durable ingest, changes/s (batches of 1000)"] = fill(db, port, args)
        result["unfolded at the last ack"] = unfolded(db)
        crashed = crash_copy(db, p)
        stop(p)
        result["database file after the stop, MB"] = db.stat().st_size / 1e6

        seconds, _, p = timed_start(crashed, args.retain)
        result["start-up after kill -9 (unfolded), s"] = seconds
        stop(p, signal.SIGKILL)
        shutil.rmtree(crashed.parent)

        left = unfolded(db)
        seconds, rss, p = timed_start(db, args.retain)
        result["changes replayed at that start"] = left
        result["start-up after a stop (unfolded), s"] = seconds
        result["server RSS after start-up, MB"] = rss / 1e6
        t0 = time.perf_counter()
        while unfolded(db):
            time.sleep(0.1)
        result["fold caught up after, s"] = time.perf_counter() - t0
        stop(p)

        seconds, _, p = timed_start(db, args.retain)
        result["start-up, folded, s"] = seconds
        stop(p)
        result["database file, folded, MB"] = db.stat().st_size / 1e6
    result["cpu cores"] = os.cpu_count() or 0
    print_result("SQLite store (synchronous=full)", result)


if __name__ == "__main__":
    main()
