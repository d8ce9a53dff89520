"""What idempotency keys and ``if_seq`` preconditions cost (protocol §3.3.1, §3.3.2):
ingest with a key on every publish and an ``if_seq`` on every change, against the same
changes without them, in one run.

    python bench/guards.py [--changes 1000000] [--batch 1000] [--value-size 200]
                           [--connections 1,4,16] [--rounds 3] [--store both]

The workload is ``ingest.py``'s (the same client, servers and interleaving): batches of
``--batch`` new orders. The guarded requests add ``"idempotency_key":"bench-<n>"`` to
each publish and ``"if_seq":0`` (the record must not exist yet) to each change, which
holds for every change: so every guarded publish is checked and applied, nothing is
refused. A fresh server per run, on an empty database; plain and guarded runs
alternate, their order swapped from round to round. The target (issue 14): guarded
ingest at least 0.85x plain ingest, at every connection count, on both stores.
"""

from __future__ import annotations

import argparse
import statistics

from common import machine
from ingest import Run, Workload, _range, one_run, workload


def guarded(w: Workload) -> Workload:
    """The same batches with a key per publish and ``if_seq: 0`` on every change."""
    requests = []
    for n, line in enumerate(w.statecast):
        assert line.startswith(b'{"op":"publish","changes":[')
        body = line.replace(b'"value":', b'"if_seq":0,"value":')
        keyed = b'{"op":"publish","idempotency_key":"bench-%d",' % n
        requests.append(body.replace(b'{"op":"publish",', keyed, 1))
    return Workload(w.changes, w.batch, requests, w.redis)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--changes", type=int, default=1_000_000, help="changes per run")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--connections", default="1,4,16")
    ap.add_argument("--window", type=int, default=8, help="unanswered requests per connection")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", choices=["both", "sqlite", "memory"], default="both")
    args = ap.parse_args()
    counts = [int(c) for c in args.connections.split(",")]
    kinds = ["memory", "sqlite"] if args.store == "both" else [args.store]
    print(f"machine: {machine()}")
    print(
        f"{args.changes:,} changes per run, batches of {args.batch}, values of about "
        f"{args.value_size} bytes, window {args.window}, {args.rounds} rounds, interleaved",
        flush=True,
    )
    plain = workload(args.changes, args.batch, args.value_size)
    loads = {"plain": plain, "guarded": guarded(plain)}
    results: dict[tuple[str, str, int], list[Run]] = {}
    for rnd in range(args.rounds):
        for kind in kinds:
            system = f"statecast-{kind}"
            for n in counts:
                order = ["plain", "guarded"] if rnd % 2 == 0 else ["guarded", "plain"]
                for name in order:
                    run, _ = one_run(system, loads[name], n, args.window, profile=False)
                    results.setdefault((kind, name, n), []).append(run)
                    print(
                        f"round {rnd + 1} {kind:<6} {name:<7} {n:>2} conn: "
                        f"{run.rate(plain.changes):>9,.0f} changes/s  {run.seconds:6.2f} s  "
                        f"server {run.server_cpu / run.seconds:.2f} cores  "
                        f"client {run.client_cpu / run.seconds:.2f} cores",
                        flush=True,
                    )
    print()
    for kind in kinds:
        print(f"== {kind} store: guarded (key + if_seq on every change) vs plain")
        print(f"   {'conns':>5}  {'plain changes/s':>34}  {'guarded changes/s':>34}  ratio")
        for n in counts:
            a = [r.rate(plain.changes) for r in results[(kind, "plain", n)]]
            b = [r.rate(plain.changes) for r in results[(kind, "guarded", n)]]
            ratios = [y / x for x, y in zip(a, b, strict=True)]
            print(
                f"   {n:>5}  {_range(a):>34}  {_range(b):>34}  "
                f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})"
            )
        print()


if __name__ == "__main__":
    main()
