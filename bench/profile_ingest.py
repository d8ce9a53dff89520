"""Where a publish's time goes on the server, per change, with no sockets.

    python bench/profile_ingest.py [--changes 300000] [--batch 1000] [--value-size 200]
                                   [--repeat 3] [--stages] [--profile]
                                   [--against OTHER/src]

Feeds the request lines of ``ingest.py``'s workload (the same keys and values) to a
:class:`~statecast.core.session.Session` on an engine with the memory store (the
default ``--retain`` of a server, 1,000,000 changes), in reads of 64 KiB as a socket
would hand them over, and reads back the acks. Reports the process's CPU time per
change, best of ``--repeat`` (a fresh engine each time).

``--against OTHER/src`` alternates runs of this code with runs of another checkout's
(``git worktree add /tmp/base HEAD``) in the same process, and prints both: the figure
to decide by on a noisy machine.

``--stages`` times each step of the hot path on its own (the same lines, in the order
``Session._handle`` and ``Engine.publish`` run them), so that the figures add up to
about the whole; ``--profile`` runs cProfile over one pass.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from ingest import workload
from statecast.core import accel
from statecast.core.engine import Engine
from statecast.core.frames import Ack
from statecast.core.frames import encode as encode_ack
from statecast.core.framing import LineReader
from statecast.core.protocol import PublishRequest, conditions_of, parse_request, prepare_changes
from statecast.core.session import Limits, Session
from statecast.core.state import Record, encode_batch
from statecast.core.values import plain_line
from statecast.stores.memory import MemoryStore

READ = 1 << 16
T = TypeVar("T")


class _Sink:
    def deliver(self, blob: bytes) -> None:
        pass


Versions = tuple[type[Engine], type[Session], type[MemoryStore], type[Limits]]
THIS: Versions = (Engine, Session, MemoryStore, Limits)


def other_version(src: str) -> Versions:
    """The same classes imported from another checkout's ``src`` (for example a git
    worktree of HEAD), beside this one's in the same process: runs of the two can then
    alternate, and the machine's noise falls on both alike."""
    ours = {k: m for k, m in sys.modules.items() if k.split(".")[0] == "statecast"}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, src)
    try:
        eng = importlib.import_module("statecast.core.engine")
        ses = importlib.import_module("statecast.core.session")
        mem = importlib.import_module("statecast.stores.memory")
    finally:
        sys.path.remove(src)
        for k in [k for k in sys.modules if k.split(".")[0] == "statecast"]:
            del sys.modules[k]
        sys.modules.update(ours)
    assert mem.__file__ is not None
    assert mem.__file__.startswith(src), mem.__file__
    return eng.Engine, ses.Session, mem.MemoryStore, ses.Limits


def whole(lines: list[bytes], version: Versions = THIS) -> float:
    """CPU seconds to ingest ``lines`` through a Session, as a transport does."""
    engine_t, session_t, store_t, limits_t = version
    engine = engine_t(store_t(1_000_000))
    session = session_t(engine, _Sink(), version="bench", limits=limits_t(max_line=1 << 24))
    session.data_to_send()
    stream = b"".join(lines)
    chunks = [stream[i : i + READ] for i in range(0, len(stream), READ)]
    acks = 0
    t0 = time.process_time()
    for chunk in chunks:
        session.receive_data(chunk)
        out = session.data_to_send()
        acks += out.count(b"\n")
    t = time.process_time() - t0
    assert acks == len(lines), (acks, len(lines))
    return t


def each(fn: Callable[[T], None], items: list[T]) -> None:
    for item in items:
        fn(item)


def stages(lines: list[bytes], changes: int) -> dict[str, float]:
    """µs per change of each step of ``Session._handle`` for a publish, timed on its
    own over all the lines (in the order the session runs them)."""
    stripped = [line[:-1] for line in lines]
    stream = b"".join(lines)
    out: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], T]) -> T:
        t0 = time.process_time()
        r = fn()
        out[name] = (time.process_time() - t0) / changes * 1e6
        return r

    def split() -> None:
        reader = LineReader(1 << 24)
        for i in range(0, len(stream), READ):
            reader.feed(stream[i : i + READ])
            while reader.next_line() is not None:
                pass

    timed("read and split lines (LineReader)", split)
    reqs = timed("parse_request (msgspec decode)", lambda: [parse_request(x) for x in stripped])
    pubs = [r for r in reqs if isinstance(r, PublishRequest)]
    if accel.speedups is None:  # the C fast path settles these lines without it
        timed("plain_line (§9, one scan per line)", lambda: [plain_line(x) for x in stripped])
    batches = timed(
        "prepare_changes (§9, key JSON)",
        lambda: [prepare_changes(r, line=x) for r, x in zip(pubs, stripped, strict=True)],
    )
    timed("conditions_of (if_seq)", lambda: [conditions_of(r.changes) for r in pubs])
    store = MemoryStore(1_000_000)
    state, log = store.state, store.log

    def enc() -> list[list[Record]]:
        recs, seq = [], 1
        for b in batches:
            recs.append(encode_batch(b, seq))
            seq += len(b)
        return recs

    recs = timed("encode_batch (record frames, Records)", enc)
    timed("State.install", lambda: each(state.install, recs))
    timed("ChangeLog.extend", lambda: each(log.extend, recs))
    engine = Engine(MemoryStore(1_000_000))
    got: list[object] = []
    timed(
        "Engine.publish, all of it (the four above, fan-out)",
        lambda: each(lambda b: engine.publish(b, got.append), batches),
    )
    timed("the ack (encode)", lambda: [encode_ack(Ack(i, None, False)) for i in range(len(lines))])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--changes", type=int, default=300_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--against", metavar="SRC", help="alternate with the code in SRC")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    lines = workload(args.changes, args.batch, args.value_size).statecast  # ingest.py's
    assert isinstance(parse_request(lines[0][:-1]), PublishRequest)
    print(f"C speedups (statecast.core.accel): {'on' if accel.speedups else 'off'}")
    if args.against:
        other = other_version(args.against)
        ours_t: list[float] = []
        theirs: list[float] = []
        for _ in range(args.repeat):
            ours_t.append(whole(lines))
            theirs.append(whole(lines, other))
        a, b = min(ours_t) / args.changes * 1e6, min(theirs) / args.changes * 1e6
        print(
            f"whole session, best of {args.repeat} alternated: this {a:.3f} µs of CPU per "
            f"change, {args.against}: {b:.3f} (this/that {a / b:.2f}; medians "
            f"{statistics.median(ours_t) / statistics.median(theirs):.2f})"
        )
    else:
        best = min(whole(lines) for _ in range(args.repeat))
        print(
            f"whole session: {best / args.changes * 1e6:.3f} µs of CPU per change "
            f"({args.changes / best:,.0f} changes/s), best of {args.repeat}"
        )
    if args.stages:
        runs = [stages(lines, args.changes) for _ in range(args.repeat)]
        for name in runs[0]:
            print(f"  {name:<58} {min(r[name] for r in runs):6.3f} µs/change")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(whole, lines)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
