"""The engine: one store, one fan-out, and the rules that join them. No I/O.

Every transport (TCP, WebSocket, HTTP) and the embedding API go through one
engine, so they share the same state, change log and fan-out.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from statecast.core.fanout import Fanout
from statecast.core.frames import RequestId
from statecast.core.protocol import PreparedChange
from statecast.core.state import Record, Snapshot
from statecast.core.store import Position, SourceStore, Store
from statecast.errors import Forbidden, ProtocolError

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
        # Collections that follow a source (a PostgreSQL table, docs/postgres.md) -> what
        # they follow: only the source writes them; a publish to one is forbidden.
        self.read_only: dict[str, str] = {}

    @property
    def seq(self) -> int:
        return self.store.state.seq

    @property
    def epoch(self) -> str:
        return self.store.epoch

    def check_writable(self, collections: Iterable[str], rid: RequestId = None) -> None:
        """Raise ``Forbidden`` if a collection follows a source (only it writes there)."""
        read_only = self.read_only
        if not read_only:
            return
        for name in collections:
            source = read_only.get(name)
            if source is not None:
                raise Forbidden(
                    f"collection {name!r} follows {source} and is read-only: change the "
                    "table in PostgreSQL instead",
                    request_id=rid,
                )

    def publish(
        self,
        batch: Sequence[PreparedChange],
        done: PublishDone,
        position: Position | None = None,
    ) -> None:
        """Commit a validated batch through the store; once committed, install it
        in the state and the log, queue it for subscribers, and call ``done``.

        With the memory store all of this happens before ``publish`` returns; with a
        durable store, once the batch is on disk (§3.3: the ack means committed).

        ``position`` (a source's batches only) is committed with the batch, by a
        :class:`~statecast.core.store.SourceStore` (the server checked the store is
        one); the batch may then be empty, and ``done`` gets the current seq.
        """

        def committed(records: list[Record] | None, error: ProtocolError | None) -> None:
            if records is None:
                self.publishes_failed += 1
                assert error is not None
                done(error)
                return
            if not records:  # a position alone
                done(self.store.state.seq)
                return
            self.install(records)
            done(records[-1].seq)

        if position is None:
            self.store.submit(batch, committed)
        else:
            cast(SourceStore, self.store).submit_source(batch, committed, position)

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
