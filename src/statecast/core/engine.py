"""The engine: one store, one fan-out, and the rules that join them. No I/O.

Every transport (TCP, WebSocket, HTTP) and the embedding API go through one
engine, so they share the same state, change log and fan-out.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from statecast.core.dedupe import DEFAULT_KEEP, DEFAULT_WINDOW, Dedupe
from statecast.core.fanout import Fanout
from statecast.core.frames import RequestId
from statecast.core.protocol import Conditions, PreparedChange, check_conditions
from statecast.core.state import Record, Snapshot
from statecast.core.store import AlreadyApplied, Position, SourceStore, Store
from statecast.errors import Conflict, Forbidden, ProtocolError

__all__ = ["Duplicate", "Engine", "PublishDone"]

# Called once per publish, on the loop thread: with the batch's last seq (a Duplicate
# when it was applied before under its idempotency key), or the error.
PublishDone = Callable[[int | ProtocolError], None]


class Duplicate(int):
    """The answer to a publish whose idempotency key was seen within the dedupe window
    (§3.3): the seq of the first ack. Nothing was applied again. (An ``int``, so that
    callers that only want the seq need not care.)"""


class _Publish:
    __slots__ = ("batch", "conditions", "done", "key", "keys", "position", "rid")

    def __init__(
        self,
        batch: Sequence[PreparedChange],
        done: PublishDone,
        *,
        position: Position | None,
        conditions: Conditions | None,
        key: str | None,
        rid: RequestId,
    ) -> None:
        self.batch = batch
        self.done = done
        self.position = position
        self.conditions = conditions
        self.key = key
        self.rid = rid
        self.keys: dict[str, set[str]] | None = None  # the records it writes (_keys_of)


def _keys_of(job: _Publish) -> dict[str, set[str]]:
    """The keys a batch writes, by collection (computed once per publish)."""
    keys = job.keys
    if keys is None:
        batch = job.batch
        names = {c[0] for c in batch}
        if len(names) == 1:
            keys = {names.pop(): {c[1] for c in batch}}
        else:
            keys = {}
            for c in batch:
                keys.setdefault(c[0], set()).add(c[1])
        job.keys = keys
    return keys


def _condition_keys(job: _Publish) -> dict[str, set[str]]:
    """The keys a batch's if_seq conditions name, by collection."""
    conditions = job.conditions
    assert conditions is not None
    if len(conditions) == len(job.batch):
        return _keys_of(job)  # every change has one
    out: dict[str, set[str]] = {}
    batch = job.batch
    for i, _ in conditions:
        out.setdefault(batch[i][0], set()).add(batch[i][1])
    return out


class _InFlight:
    """The records written by batches submitted and not yet committed (§3.3.2: a
    publish whose conditions name one of them waits). Sets per collection, so that
    the usual operations run at C speed: a batch's keys are added and removed with
    one set operation, and a conditional publish is checked with one ``isdisjoint``;
    ``_shared`` counts the extra batches of a key written by several at once."""

    __slots__ = ("_by_name", "_shared")

    def __init__(self) -> None:
        self._by_name: dict[str, set[str]] = {}
        self._shared: dict[tuple[str, str], int] = {}

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def hold(self, keys: dict[str, set[str]]) -> None:
        by_name = self._by_name
        for name, ks in keys.items():
            held = by_name.get(name)
            if held is None:
                by_name[name] = set(ks)
                continue
            if not held.isdisjoint(ks):
                shared = self._shared
                for k in held.intersection(ks):
                    shared[(name, k)] = shared.get((name, k), 0) + 1
            held.update(ks)

    def let_go(self, keys: dict[str, set[str]]) -> None:
        by_name = self._by_name
        for name, ks in keys.items():
            held = by_name[name]
            shared = self._shared
            if shared:
                stay = set()
                for sk, n in list(shared.items()):
                    if sk[0] == name and sk[1] in ks:
                        stay.add(sk[1])  # still written by another batch in flight
                        if n == 1:
                            del shared[sk]
                        else:
                            shared[sk] = n - 1
                held.difference_update(ks - stay if stay else ks)
            else:
                held.difference_update(ks)
            if not held:
                del by_name[name]

    def touches(self, keys: dict[str, set[str]]) -> bool:
        by_name = self._by_name
        for name, ks in keys.items():
            held = by_name.get(name)
            if held is not None and not held.isdisjoint(ks):
                return True
        return False


class Engine:
    def __init__(
        self,
        store: Store,
        schedule: Callable[[Callable[[], None]], object] | None = None,
        timer: Callable[[float, Callable[[], None]], object] | None = None,
        *,
        flush_interval: float = 0.0,
        dedupe_window: float = DEFAULT_WINDOW,
        dedupe_keep: int = DEFAULT_KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.fanout = Fanout(schedule, timer=timer, min_interval=flush_interval)
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
        # §3.3 idempotency keys and preconditions.
        self.clock = clock  # wall clock: the keys' times outlive the process
        self.dedupe = Dedupe(dedupe_window, dedupe_keep)
        self.dedupe.load(store.idempotency_keys())
        self.duplicates = 0  # publishes answered as duplicates
        self.conflicts = 0  # publishes refused because an if_seq did not hold
        # A publish is *decided* (checked against its key and preconditions, then
        # submitted) in arrival order, once nothing it depends on is still being
        # committed: the batch of its key, or a batch writing a record one of its
        # if_seq conditions names. Until then it waits, and so do the publishes after
        # it (an order that is the same on every connection). With a store that
        # commits at once, nothing ever waits.
        self._waiting: collections.deque[_Publish] = collections.deque()
        self._keys_committing: set[str] = set()
        # Records written by batches submitted and not yet committed, tracked once a
        # publish with conditions has been seen (until then, such a publish waits for
        # every batch in flight: ``_untracked``).
        self._track = False
        self._inflight = _InFlight()
        self._untracked = 0
        self._draining = False

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
        *,
        conditions: Conditions | None = None,
        key: str | None = None,
        rid: RequestId = None,
    ) -> None:
        """Commit a validated batch through the store; once committed, install it
        in the state and the log, queue it for subscribers, and call ``done``.

        With the memory store all of this happens before ``publish`` returns; with a
        durable store, once the batch is on disk (§3.3: the ack means committed).

        §3.3: a batch whose idempotency ``key`` was committed before (within the
        dedupe window) is not applied again: ``done`` gets :class:`Duplicate` with
        the first ack's seq. One whose ``conditions`` (change index, if_seq) do not
        all hold against the state it would be applied on gets :class:`Conflict`,
        and nothing of it is applied.

        ``position`` (a source's batches only) is committed with the batch, by a
        :class:`~statecast.core.store.SourceStore` (the server checked the store is
        one); the batch may then be empty, and ``done`` gets the current seq.
        """
        job = _Publish(batch, done, position=position, conditions=conditions, key=key, rid=rid)
        if self._waiting or not self._may_start(job):
            self._waiting.append(job)
            return
        self._start(job)

    def _may_start(self, job: _Publish) -> bool:
        """Whether nothing ``job`` is decided on is still being committed."""
        if job.key is not None and job.key in self._keys_committing:
            return False  # a retry: it waits for the outcome of the first
        if job.conditions is not None and not self.store.decides_at_commit:
            if not self._track:
                self._track = True  # from now on, track what batches in flight write
            if self._untracked:
                return False
            if self._inflight and self._inflight.touches(_condition_keys(job)):
                return False
        return True

    def _start(self, job: _Publish) -> None:
        """Decide ``job`` (its key, then its conditions), then submit it."""
        key = job.key
        now = 0.0
        if key is not None:
            now = self.clock()
            seq = self.dedupe.seq_of(key, now)
            if seq is not None:
                self.duplicates += 1
                job.done(Duplicate(seq))
                return
        if job.conditions is not None and not self.store.decides_at_commit:
            conflict = self._check(job.batch, job.conditions, job.rid)
            if conflict is not None:
                self.conflicts += 1
                job.done(conflict)
                return
        self._submit(job, now)

    def _submit(self, job: _Publish, now: float) -> None:
        batch, key, done = job.batch, job.key, job.done
        store = self.store
        tracked = untracked = False
        if not store.commits_at_once:
            if self._track:
                tracked = True
                self._inflight.hold(_keys_of(job))
            else:
                untracked = True
                self._untracked += 1
        if key is not None:
            self._keys_committing.add(key)

        def committed(records: list[Record] | None, error: ProtocolError | None) -> None:
            if tracked:
                self._inflight.let_go(_keys_of(job))
            elif untracked:
                self._untracked -= 1
            if key is not None:
                self._keys_committing.discard(key)
            if records is None:
                assert error is not None
                if isinstance(error, AlreadyApplied):  # decided by the store (a cluster)
                    self.duplicates += 1
                    if key is not None:
                        self.dedupe.add(key, error.seq, now)
                    done(Duplicate(error.seq))
                elif isinstance(error, Conflict):
                    self.conflicts += 1
                    error.request_id = job.rid
                    done(error)
                else:
                    self.publishes_failed += 1
                    done(error)
            elif not records:  # a position alone
                done(self.store.state.seq)
            else:
                self.install(records)
                seq = records[-1].seq
                if key is not None:
                    self.dedupe.add(key, seq, now)
                done(seq)
            if self._waiting:
                self._drain()

        if job.position is not None:
            cast(SourceStore, store).submit_source(batch, committed, job.position)
        elif key is not None or job.conditions is not None:
            store.submit(batch, committed, None if key is None else (key, now), job.conditions)
        else:
            store.submit(batch, committed)

    def _drain(self) -> None:
        """Decide the publishes that waited, in order, as far as they may start."""
        if self._draining:
            return
        self._draining = True
        try:
            waiting = self._waiting
            while waiting and self._may_start(waiting[0]):
                self._start(waiting.popleft())
        finally:
            self._draining = False

    def _check(
        self, batch: Sequence[PreparedChange], conditions: Conditions, rid: RequestId
    ) -> Conflict | None:
        """§3.3.2: the first condition of a batch that does not hold, as the error."""
        miss = self.store.state.first_mismatch(batch, conditions)
        if miss is None:
            return None
        i, expected, current = miss
        return check_conditions(batch, [(i, expected)], lambda _c, _k: current, rid)

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

        Queued changes are sealed first, so that ``flushed_seq == seq``: a
        subscriber that catches up to the snapshot's seq can join the fan-out at
        once without a duplicate (§5.2).
        """
        self.fanout.seal()
        self.snapshots += 1
        return self.store.state.snapshot(selection)

    def sync_point(self) -> int:
        """Seal queued changes and return the seq a new subscription starts at."""
        self.fanout.seal()
        return self.fanout.flushed_seq

    def read_log(self, after: int, limit: int) -> list[Record]:
        return self.store.log.read(after, limit)

    def log_covers(self, after: int) -> bool:
        return self.store.log.covers(after)
