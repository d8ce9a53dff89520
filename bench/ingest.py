"""Publish ingest: changes per second acknowledged through the TCP publish op.

python bench/ingest.py [--changes 1000000] [--batch 1000] [--value-size 200]
"""

from __future__ import annotations

import argparse
import tempfile

from common import StatecastProcess, machine, print_result
from load import publish_all, publish_lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--changes", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--store", default="memory", help="memory, or sqlite (in a temp dir)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    lines = publish_lines(args.changes, args.batch, args.value_size)
    with tempfile.TemporaryDirectory() as tmp:
        srv = StatecastProcess("--store", args.store, "--data-dir", tmp)
        try:
            elapsed = publish_all(srv.port, lines)
        finally:
            srv.stop()
    print_result(
        f"publish ingest over TCP ({args.store} store)",
        {
            "changes": args.changes,
            "batch": args.batch,
            "value bytes": args.value_size,
            "seconds": elapsed,
            "changes/s": args.changes / elapsed,
        },
    )


if __name__ == "__main__":
    main()
