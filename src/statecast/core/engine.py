"""The engine: one store, one fan-out, and the rules that join them. No I/O.

Every transport (TCP, WebSocket, HTTP) and the embedding API go through one
engine, so they share the same state, change log and fan-out.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from statecast.core.fanout import Fanout
from statecast.core.protocol import PreparedChange
from statecast.core.state import Record, Snapshot
from statecast.core.store import Store
from statecast.errors import ProtocolError

__all__ = ["Engine", "PublishDone"]

# Called once per publish, on the loop thread: with the batch's last seq, or the error.
PublishDone = Callable[[int | ProtocolError], None]


class Engine:
    def __init__(
        self,
        store: Store,
        schedule: Callable[[Callable[[], None]], object] | None = None,
        timer: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.store = store
        self.fanout = Fanout(schedule, timer=timer)
        self.fanout.flushed_seq = store.state.seq
        self.changes_published = 0
        self.publishes_failed = 0
        self.snapshots = 0  # snapshots started, on any transport
        self.errors: collections.Counter[str] = collections.Counter()  # error frames by code
        # Requests refused by a limit (§7), by limit: statecast_limit_hits_total.
        self.limit_hits: collections.Counter[str] = collections.Counter()

    @property
    def seq(self) -> int:
        return self.store.state.seq

    @property
    def epoch(self) -> str:
        return self.store.epoch

    def publish(self, batch: Sequence[PreparedChange], done: PublishDone) -> None:
        """Commit a validated batch through the store; once committed, install it
        in the state and the log, queue it for subscribers, and call ``done``.

        With the memory store all of this happens before ``publish`` returns; with a
        durable store, once the batch is on disk (§3.3: the ack means committed).
        """

        def committed(records: list[Record] | None, error: ProtocolError | None) -> None:
            if records is None:
                self.publishes_failed += 1
                assert error is not None
                done(error)
                return
            self.install(records)
            done(records[-1].seq)

        self.store.submit(batch, committed)

    def install(self, records: list[Record]) -> None:
        """A committed batch becomes part of the state and the log, and is queued for
        subscribers: at once, whole (§5.3). Also the store's ``Install`` callback, for
        batches committed elsewhere (another node of a cluster)."""
        store = self.store
        store.state.install(records)
        # The fan-out first: it takes the versions the changes replaced (Record.before),
        # which the log lets go of for changes that leave it at once (retain < batch).
        self.fanout.publish(records)
        store.log.extend(records)
        self.changes_published += len(records)

    def snapshot(self, selection: frozenset[str] | None) -> Snapshot:
        """A snapshot at the current seq.

        Queued changes are flushed first, so that ``flushed_seq == seq``: a
        subscriber that catches up to the snapshot's seq can join the fan-out at
        once without a duplicate (§5.2).
        """
        self.fanout.flush()
        self.snapshots += 1
        return self.store.state.snapshot(selection)

    def sync_point(self) -> int:
        """Flush queued changes and return the seq a new subscription starts at."""
        self.fanout.flush()
        return self.fanout.flushed_seq

    def read_log(self, after: int, limit: int) -> list[Record]:
        return self.store.log.read(after, limit)

    def log_covers(self, after: int) -> bool:
        return self.store.log.covers(after)
