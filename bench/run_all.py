"""Runs every benchmark of docs/performance.md, one after the other.

python bench/run_all.py        (or: make bench)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RUNS = [
    ["fanout.py", "--subscribers", "1000", "--changes", "20000", "--batch", "100"],
    ["fanout.py", "--subscribers", "1000", "--changes", "5000", "--batch", "1", "--no-redis"],
    ["ws_fanout.py", "--subscribers", "1000", "--changes", "5000", "--batch", "100"],
    ["snapshot.py", "--records", "1000000", "--value-size", "200"],
    ["ingest.py", "--changes", "1000000", "--batch", "1000", "--store", "memory"],
    ["ingest.py", "--changes", "1000000", "--batch", "1000", "--store", "sqlite"],
    ["startup.py", "--records", "1000000", "--retain", "1000000"],
    ["latency.py", "--quick"],
]


def main() -> int:
    for args in RUNS:
        print(f"\n$ python bench/{' '.join(args)}", flush=True)
        r = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], cwd=HERE, check=False)
        if r.returncode:
            return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
