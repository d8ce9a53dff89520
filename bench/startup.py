"""SQLite store: start-up time with 1,000,000 records, and durable ingest.

Fills a fresh SQLite store with N records over the TCP publish op (every ack means
committed to disk: that is the durable ingest figure), stops the server, then times a
new server from its start until it answers a ping with the whole state loaded.

    python bench/startup.py [--records 1000000] [--value-size 200] [--retain 1000000]
"""

from __future__ import annotations

import argparse
import os
import socket
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--retain", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="where to put the database (default: a temp dir)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        db = Path(tmp) / "bench.db"
        port = free_port()
        p = start(db, port, args.retain)
        wait_ping(port)
        lines = publish_lines(args.records, 1000, args.value_size)
        ingest = publish_all(port, lines)
        p.terminate()
        p.wait(60)
        size = db.stat().st_size
        port = free_port()
        t0 = time.perf_counter()
        p = start(db, port, args.retain)
        wait_ping(port)
        startup = time.perf_counter() - t0
        rss = rss_bytes(p.pid)
        p.terminate()
        p.wait(60)
    print_result(
        "SQLite store (synchronous=full)",
        {
            "records": args.records,
            "retained changes": min(args.retain, args.records),
            "durable ingest, changes/s (batches of 1000)": args.records / ingest,
            "database file, MB": size / 1e6,
            "start-up to first pong, seconds": startup,
            "server RSS after start-up, MB": rss / 1e6,
            "cpu cores": os.cpu_count() or 0,
        },
    )


if __name__ == "__main__":
    main()
