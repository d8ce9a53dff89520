"""The engine: one store, one fan-out, and the rules that join them. No I/O.

Every transport (TCP now, WebSocket later) and the embedding API go through one
engine, so they share the same state, change log and fan-out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from statecast.fanout import Fanout, Selection
from statecast.protocol import PreparedChange
from statecast.state import Record, Snapshot
from statecast.store import Store

__all__ = ["Engine"]


class Engine:
    def __init__(
        self,
        store: Store,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.store = store
        self.fanout = Fanout(schedule)
        self.fanout.flushed_seq = store.state.seq
        self.changes_published = 0

    @property
    def seq(self) -> int:
        return self.store.state.seq

    @property
    def epoch(self) -> str:
        return self.store.epoch

    def publish(self, batch: Sequence[PreparedChange]) -> int:
        """Apply a validated batch, queue it for subscribers, return its last seq."""
        records = self.store.apply(batch)
        self.changes_published += len(records)
        self.fanout.publish(records)
        return records[-1].seq

    def snapshot(self, selection: Selection) -> Snapshot:
        """A snapshot at the current seq.

        Queued changes are flushed first, so that ``flushed_seq == seq``: a
        subscriber that catches up to the snapshot's seq can join the fan-out at
        once without a duplicate (§5.2).
        """
        self.fanout.flush()
        return self.store.state.snapshot(selection)

    def sync_point(self) -> int:
        """Flush queued changes and return the seq a new subscription starts at."""
        self.fanout.flush()
        return self.fanout.flushed_seq

    def read_log(self, after: int, limit: int) -> list[Record]:
        return self.store.log.read(after, limit)

    def log_covers(self, after: int) -> bool:
        return self.store.log.covers(after)
