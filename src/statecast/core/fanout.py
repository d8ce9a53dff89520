"""Fan-out: every change encoded once, then handed to subscribers in few writes.

Subscribers are grouped by their :class:`~statecast.core.view.View`: the collections
and the where filter they chose (docs/protocol.md §3.1, §3.2, §3.7). Changes applied
since the last flush are joined into one blob per view, and each subscriber of the
view gets that one blob: one ``deliver`` (one socket write) per subscriber per flush,
however many changes the flush holds. A batch is never split across flushes, so its
frames reach each subscriber back to back (§5.3). No I/O: the transports implement
:class:`Subscriber`.

Where filters are evaluated once per change and distinct filter, never per
subscriber (:class:`~statecast.core.filters.FilterSet`): for each change the flush
knows whether the record was in each filter's view before (the version it replaced,
``Record.before``) and whether it is now, and sends the change, a delete (it moved
out), or nothing (§3.7).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Protocol

from msgspec.json import encode as _encode_json

from statecast.core.conflate import ConflatedGroup, Timer, next_tick
from statecast.core.filters import FilterSet, Where
from statecast.core.frames import delete_line
from statecast.core.state import Record
from statecast.core.view import View

__all__ = ["FLUSH_BYTES", "Fanout", "Subscriber"]

# §7: one scheduled flush hands out about this many bytes of frames (whole batches),
# and leaves the rest for the next loop turn: what waits for a subscriber that keeps
# up stays under --max-pending plus this, however much was published at once.
FLUSH_BYTES = 1 << 20


class Subscriber(Hashable, Protocol):
    def deliver(self, blob: bytes) -> None:
        """Send ``blob`` (whole frames) or drop the subscription; must not raise."""


def _before_json(rec: Record | None) -> bytes | None:
    """The value the version a change replaced held (None: absent or deleted)."""
    return None if rec is None else rec.value_json()


class Fanout:
    def __init__(
        self,
        schedule: Callable[[Callable[[], None]], object] | None = None,
        *,
        timer: Timer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # ``schedule(fn)`` runs fn soon on the same thread (loop.call_soon); without
        # it, the owner calls flush() itself. ``timer(delay, fn)`` (loop.call_later)
        # runs conflated emissions (conflate.py); without it, emit_conflated() does.
        self._schedule = schedule
        self._timer = timer
        self._clock = clock
        self._conflated: dict[tuple[View, float], list[ConflatedGroup]] = {}
        self._group_of: dict[Subscriber, ConflatedGroup] = {}
        self._emits_scheduled: set[tuple[View, float]] = set()
        # §7 --slow-consumer conflate: subscribers that fell behind, each with a group of
        # its own that is never emitted on a timer: taken whole when it has drained.
        self._held: dict[Subscriber, ConflatedGroup] = {}
        self._scheduled = False
        self._pending: list[Record] = []
        # The version each pending change replaced, taken when it was queued: the
        # change log lets go of it once the change falls out of the log.
        self._pending_before: list[Record | None] = []
        self._batch_ends: list[int] = []  # len(_pending) after each queued batch
        self._groups: dict[View, dict[Subscriber, None]] = {}
        self._filters = FilterSet()  # the distinct where filters of the groups
        self.flushed_seq = 0  # every change <= this has been handed to subscribers
        self.deliveries = 0  # change frames handed to subscribers, in total
        self.bytes_delivered = 0
        # Called after each flush with the seconds its oldest change waited since it
        # was published (metrics: publish-to-send latency).
        self.on_flush: Callable[[float], None] | None = None
        self._pending_since = 0.0

    @property
    def subscriber_count(self) -> int:
        return sum(len(g) for g in self._groups.values()) + len(self._group_of) + len(self._held)

    @property
    def views(self) -> int:
        """Distinct views: blobs built per flush."""
        return len(self._groups)

    def join(self, sub: Subscriber, view: View, conflate: float | None = None) -> None:
        """Add a subscriber that has every change up to ``flushed_seq`` already;
        ``conflate``: at most one frame per key per that many seconds (conflate.py)."""
        if conflate is not None:
            self._join_conflated(sub, view, conflate)
            return
        group = self._groups.get(view)
        if group is None:
            group = self._groups[view] = {}
            if view.where is not None:
                self._refilter()
        group[sub] = None

    def leave(self, sub: Subscriber, view: View) -> None:
        held = self._held.pop(sub, None)
        if held is not None:
            if held.view.where is not None:
                self._refilter()
            return
        cgroup = self._group_of.pop(sub, None)
        if cgroup is not None:
            self._leave_conflated(sub, cgroup)
            return
        group = self._groups.get(view)
        if group is None:
            return
        group.pop(sub, None)
        if not group:
            del self._groups[view]
            if view.where is not None:
                self._refilter()

    def _refilter(self) -> None:
        wheres = {v.where for v in self._groups if v.where is not None}
        wheres.update(v.where for v, _ in self._conflated if v.where is not None)
        wheres.update(g.view.where for g in self._held.values() if g.view.where is not None)
        self._filters.update(wheres)

    # -- conflation (conflate.py) -------------------------------------------------
    def _join_conflated(self, sub: Subscriber, view: View, interval: float) -> None:
        key = (view, interval)
        groups = self._conflated.get(key)
        if groups is None:
            groups = self._conflated[key] = []
        # A group whose interval has begun holds changes this subscriber has already:
        # it joins one that has just emitted, or starts its own.
        group = next((g for g in groups if not g.pending), None)
        if group is None:
            group = ConflatedGroup(view, interval)
            groups.append(group)
            if view.where is not None and len(groups) == 1:
                self._refilter()
        group.subs[sub] = None
        self._group_of[sub] = group

    def _leave_conflated(self, sub: Subscriber, group: ConflatedGroup) -> None:
        group.subs.pop(sub, None)
        if group.subs:
            return
        key = (group.view, group.interval)
        groups = self._conflated.get(key, [])
        if group in groups:
            groups.remove(group)
        if not groups:
            self._conflated.pop(key, None)
            if group.view.where is not None:
                self._refilter()

    def conflating(self, sub: Subscriber) -> float | None:
        """The interval ``sub`` is conflated at (None: it gets every change)."""
        group = self._group_of.get(sub)
        return None if group is None else group.interval

    def hold(self, sub: Subscriber, view: View) -> None:
        """§7 --slow-consumer conflate: ``sub`` (joined with ``view``) fell behind: from
        now on keep only the newest state of each key it has not been sent, until
        :meth:`release`."""
        self.leave(sub, view)
        self._held[sub] = ConflatedGroup(view, 0.0)
        if view.where is not None:
            self._refilter()

    def release(self, sub: Subscriber) -> bytes:
        """``sub`` has drained: the frames of what changed while it was held (the
        caller writes them, then joins it again)."""
        group = self._held.pop(sub, None)
        if group is None:
            return b""
        blob, n = group.blob()
        self.deliveries += n
        self.bytes_delivered += len(blob)
        if group.view.where is not None:
            self._refilter()
        return blob

    def _absorb_conflated(
        self,
        records: list[Record],
        befores: list[Record | None],
        vectors: tuple[list[tuple[bool, ...]], list[tuple[bool, ...]]] | None,
    ) -> None:
        index = {w: j for j, w in enumerate(self._filters.filters)}
        for key, groups in self._conflated.items():
            for group in groups:
                due = self._absorb(group, records, befores, vectors, index)
                if due and key not in self._emits_scheduled and self._timer is not None:
                    self._emits_scheduled.add(key)
                    self._timer(next_tick(self._clock(), key[1]), partial(self._emit, key))
        for group in self._held.values():
            self._absorb(group, records, befores, vectors, index)

    @staticmethod
    def _absorb(
        group: ConflatedGroup,
        records: list[Record],
        befores: list[Record | None],
        vectors: tuple[list[tuple[bool, ...]], list[tuple[bool, ...]]] | None,
        index: dict[Where, int],
    ) -> bool:
        """Hand one flush to a conflated group; whether it has something to emit."""
        view = group.view
        where = view.where
        j = -1 if where is None else index[where]
        due = False
        for i, rec in enumerate(records):
            if not view.selects(rec.collection):
                continue
            if j < 0:
                b = befores[i]
                was_in = b is not None and not b.deleted
                now_in = not rec.deleted
            else:
                assert vectors is not None
                now_in = vectors[0][i][j]
                was_in = vectors[1][i][j]
            due = group.absorb(rec, was_in, now_in) or due
        return due

    def _emit(self, key: tuple[View, float]) -> None:
        """One interval is over: every group of this view and interval hands out the
        newest state of what changed; then they merge (all just emitted)."""
        self._emits_scheduled.discard(key)
        groups = self._conflated.get(key)
        if not groups:
            return
        for group in groups:
            if not group.pending:
                continue
            blob, n = group.blob()
            if not n:
                continue
            subs = list(group.subs)
            self.deliveries += n * len(subs)
            self.bytes_delivered += len(blob) * len(subs)
            for sub in subs:
                sub.deliver(blob)
        if len(groups) > 1:
            first = groups[0]
            for other in groups[1:]:
                for sub in other.subs:
                    first.subs[sub] = None
                    self._group_of[sub] = first
            del groups[1:]

    def emit_conflated(self) -> None:
        """Emit every conflated group now (without a timer: tests, and shutdown)."""
        for key in list(self._conflated):
            self._emit(key)

    def publish(self, records: Sequence[Record]) -> None:
        """Queue changes just applied to the state, in seq order."""
        if not records:
            return
        if not self._groups and not self._conflated and not self._held and not self._pending:
            # Nobody listens: nothing to encode. A subscriber that joins later
            # catches up from the change log up to flushed_seq first.
            self.flushed_seq = records[-1].seq
            return
        if not self._pending:
            self._pending_since = time.perf_counter()
        self._pending.extend(records)
        self._pending_before.extend(
            [b if isinstance(b, Record) else None for b in (r.before for r in records)]
        )
        self._batch_ends.append(len(self._pending))
        if not self._scheduled and self._schedule is not None:
            self._scheduled = True
            self._schedule(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._scheduled = False
        self.flush(FLUSH_BYTES)
        if self._pending and self._schedule is not None:
            self._scheduled = True  # the rest on a later loop turn
            self._schedule(self._scheduled_flush)

    def flush(self, max_bytes: int | None = None) -> None:
        """Hand queued changes to the subscribers: every one, or whole batches up to
        about ``max_bytes`` (at least one batch)."""
        if not self._pending:
            return
        n = len(self._pending)
        if max_bytes is not None:
            n = self._cut(max_bytes)
        records = self._pending[:n]
        befores = self._pending_before[:n]
        if n == len(self._pending):
            self._pending, self._pending_before, self._batch_ends = [], [], []
        else:
            del self._pending[:n]
            del self._pending_before[:n]
            self._batch_ends = [end - n for end in self._batch_ends if end > n]
        self.flushed_seq = records[-1].seq
        lines = [r.change_line() for r in records]  # encode once, for everyone
        everything: bytes | None = None
        filtered: dict[Where, list[int]] | None = None
        vectors = self._vectors(records, befores) if len(self._filters) else None
        for view, group in list(self._groups.items()):
            cols, where = view.collections, view.where
            if where is not None:
                if filtered is None:
                    assert vectors is not None
                    filtered = self._moves(vectors)
                picked = [
                    lines[i] if i >= 0 else _delete_line(records[~i])
                    for i in filtered[where]
                    if cols is None or records[i if i >= 0 else ~i].collection in cols
                ]
                if not picked:
                    continue
                blob = b"".join(picked)
                n = len(picked)
            elif cols is None:
                if everything is None:
                    everything = b"".join(lines)
                blob = everything
                n = len(lines)
            else:
                picked = [ln for r, ln in zip(records, lines, strict=True) if r.collection in cols]
                if not picked:
                    continue
                blob = b"".join(picked)
                n = len(picked)
            subs = list(group)
            self.deliveries += n * len(subs)
            self.bytes_delivered += len(blob) * len(subs)
            for sub in subs:
                sub.deliver(blob)
        if self._conflated or self._held:
            self._absorb_conflated(records, befores, vectors)
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - self._pending_since)

    def _cut(self, max_bytes: int) -> int:
        """How many pending records make whole batches of about ``max_bytes``."""
        size = 0
        start = 0
        pending = self._pending
        for end in self._batch_ends:
            size += sum([len(r.line) for r in pending[start:end]])
            start = end
            if size >= max_bytes:
                return end
        return len(pending)

    def _vectors(
        self, records: list[Record], befores: list[Record | None]
    ) -> tuple[list[tuple[bool, ...]], list[tuple[bool, ...]]]:
        """Per change, whether each distinct filter matches its new value and the
        value it replaced: each value decoded once, each filter tried once (§3.7)."""
        vector = self._filters.vector
        now = [vector(rec.value_json()) for rec in records]
        was = [vector(_before_json(b)) for b in befores]
        return now, was

    def _moves(
        self, vectors: tuple[list[tuple[bool, ...]], list[tuple[bool, ...]]]
    ) -> dict[Where, list[int]]:
        """For each distinct filter, what its subscribers get of this flush, in order:
        ``i`` for the change frame of ``records[i]`` (in view now), ``~i`` for a
        delete of its key (it moved out), nothing when it was never in view (§3.7)."""
        filters = self._filters.filters
        out: dict[Where, list[int]] = {w: [] for w in filters}
        outs = [out[w] for w in filters]
        for i, (now, was) in enumerate(zip(*vectors, strict=True)):
            for j, lst in enumerate(outs):
                if now[j]:
                    lst.append(i)
                elif was[j]:
                    lst.append(~i)
        return out


def _delete_line(rec: Record) -> bytes:
    """§3.7: the change frame a filtered subscriber gets when a record moves out of its
    view (for a delete, the change itself)."""
    if rec.deleted:
        return rec.line
    return delete_line(rec.seq, rec.collection, _encode_json(rec.key))
