"""Fan-out: every change encoded once, then handed to subscribers in few writes.

Subscribers are grouped by their :class:`~statecast.core.view.View`: the collections
and the where filter they chose (docs/protocol.md §3.1, §3.2, §3.7). Queued changes are
sealed, whole batches at a time, into a *generation*: one list of frames, joined into
one blob per view on first use. A subscriber gets one ``deliver`` (one socket write)
with every generation it has not had yet, however many changes they hold, so its
frames arrive in seq order and a batch is never split (§5.3). No I/O: the transports
implement :class:`Subscriber`.

The writes roll (docs/fanout.md, "Rolling writes"): each step seals what was queued
since the step before, then writes to the subscribers that have waited longest, at
most :data:`STEP_WRITES` of them, and gives the loop back. A change published while
the server writes to a thousand subscribers is then sealed at the next step and goes
out with the subscribers' next writes, instead of waiting for a flush to all of them
to end before its own flush starts: it waits at most one round over the subscribers,
not two.

Where filters are evaluated once per change and distinct filter, never per
subscriber (:class:`~statecast.core.filters.FilterSet`): for each change a generation
knows whether the record was in each filter's view before (the version it replaced,
``Record.before``) and whether it is now, and sends the change, a delete (it moved
out), or nothing (§3.7).
"""

from __future__ import annotations

import itertools
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

__all__ = ["FLUSH_BYTES", "STEP_WRITES", "Fanout", "Subscriber"]

# §7: one write hands a subscriber about this many bytes of frames at most (whole
# generations; a generation holds whole batches of about this size), and what is
# sealed but not yet written to every subscriber stays about this size: what waits for
# a subscriber that keeps up stays under --max-pending plus this, however much was
# published at once.
FLUSH_BYTES = 1 << 20

# One step of the fan-out writes to at most this many subscribers, then gives the loop
# back (reads, acks, snapshot steps) before the next step: with a few microseconds per
# write, about 0.2 ms. Fewer means more loop turns per round, more means a change
# sealed during a round waits longer for the next step to pick it up.
STEP_WRITES = 64


class _Gen:
    """A generation: changes sealed together (whole batches, in seq order), the blob
    each view gets of them (built on first use), and the subscribers whose last write
    ended with this generation (they have every change up to ``seq``)."""

    __slots__ = (
        "befores",
        "blobs",
        "filters",
        "lines",
        "moves",
        "records",
        "seq",
        "since",
        "size",
        "subs",
        "vectors",
    )

    def __init__(
        self,
        seq: int,
        records: list[Record] | None = None,
        befores: list[Record | None] | None = None,
        *,
        since: float | None = None,
        filters: tuple[Where, ...] = (),
        vectors: tuple[list[tuple[bool, ...]], list[tuple[bool, ...]]] | None = None,
    ) -> None:
        self.seq = seq
        self.records = records or []
        self.befores = befores or []
        self.lines = [r.change_line() for r in self.records]  # encode once, for everyone
        self.size = sum(map(len, self.lines))
        self.since = since  # perf_counter() when its oldest change was queued
        # The filters in use when it was sealed, and per change whether each matches
        # the new value and the replaced one (§3.7): a subscriber joins at the newest
        # generation, so its filter is in every generation it is written later.
        self.filters = filters
        self.vectors = vectors
        self.moves: dict[Where, list[int]] | None = None
        self.blobs: dict[View, tuple[bytes, int]] = {}
        # By view (the fan-out's one object per distinct view), its subscribers here.
        self.subs: dict[View, dict[Subscriber, None]] = {}


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
        min_interval: float = 0.0,
    ) -> None:
        # ``schedule(fn)`` runs fn soon on the same thread (a FlushPacer, or
        # loop.call_soon); without it, the owner calls step() or flush() itself.
        # ``timer(delay, fn)`` (loop.call_later) runs conflated emissions (conflate.py)
        # and waits out ``min_interval``; without it, emit_conflated() does, and
        # generations are sealed whenever a step runs.
        self._schedule = schedule
        self._timer = timer
        self._clock = clock
        # --flush-interval: least seconds between two generations sealed (§7).
        self._min_interval = min_interval
        self._last_seal = -float("inf")
        self._conflated: dict[tuple[View, float], list[ConflatedGroup]] = {}
        self._group_of: dict[Subscriber, ConflatedGroup] = {}
        self._emits_scheduled: set[tuple[View, float]] = set()
        # §7 --slow-consumer conflate: subscribers that fell behind, each with a group of
        # its own that is never emitted on a timer: taken whole when it has drained.
        self._held: dict[Subscriber, ConflatedGroup] = {}
        self._scheduled = False  # a step is scheduled (or waits for min_interval)
        self._pending: list[Record] = []
        # The version each pending change replaced, taken when it was queued: the
        # change log lets go of it once the change falls out of the log.
        self._pending_before: list[Record | None] = []
        self._batch_ends: list[int] = []  # len(_pending) after each queued batch
        self._batch_since: list[float] = []  # perf_counter() when each was queued
        self._groups: dict[View, dict[Subscriber, None]] = {}
        self._canon: dict[View, View] = {}  # each view of _groups, as the one object used
        self._filters = FilterSet()  # the distinct where filters of the groups
        # Generations sealed, oldest first; the last is the newest, where subscribers
        # join. One that no subscriber's last write ended with is dropped from the front.
        self._gens: list[_Gen] = [_Gen(0)]
        # Each joined subscriber's generation (the last it was written) and view.
        self._gen_of: dict[Subscriber, tuple[_Gen, View]] = {}
        # While a subscriber is written to: who, and the generation it is written from
        # (for hold()).
        self._writing_sub: Subscriber | None = None
        self._writing_from: _Gen | None = None
        self._unsent = 0  # bytes of the generations after the first
        self.flushed_seq = 0  # every change <= this is sealed (§5.2: where a join starts)
        self.deliveries = 0  # change frames handed to subscribers, in total
        self.bytes_delivered = 0
        # Called with the seconds from a generation's oldest change being queued to the
        # last subscriber's write of it (metrics: publish-to-send latency).
        self.on_flush: Callable[[float], None] | None = None

    @property
    def subscriber_count(self) -> int:
        return sum(len(g) for g in self._groups.values()) + len(self._group_of) + len(self._held)

    @property
    def views(self) -> int:
        """Distinct views: blobs built per generation."""
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
            self._canon[view] = view
            if view.where is not None:
                self._refilter()
        group[sub] = None
        view = self._canon[view]  # one object per distinct view
        newest = self._gens[-1]
        if newest.seq != self.flushed_seq:
            # flushed_seq moved with nobody joined (or the engine set it): a generation
            # at it, so that seq_of() never says less than the subscriber has.
            newest = _Gen(self.flushed_seq)
            if self._gen_of:
                self._gens.append(newest)
            else:
                self._gens = [newest]
                self._unsent = 0
        at = newest.subs.get(view)
        if at is None:
            at = newest.subs[view] = {}
        at[sub] = None
        self._gen_of[sub] = (newest, view)

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
        place = self._gen_of.pop(sub, None)
        if place is not None:
            gen, cview = place
            at = gen.subs[cview]
            del at[sub]
            if not at:
                del gen.subs[cview]
        group = self._groups.get(view)
        if group is None:
            return
        group.pop(sub, None)
        if not group:
            del self._groups[view]
            del self._canon[view]
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
        :meth:`release`. What was sealed since its last write (the generations after
        it, and the write that found it behind) goes into that state first."""
        place = self._gen_of.get(sub)
        gen = None if place is None else place[0]
        if sub is self._writing_sub:
            # Held by its own write: what that write carried is lost too, so it counts
            # from the generation it was written from.
            gen = self._writing_from
        missed = [] if gen is None else self._gens[self._gens.index(gen) + 1 :]
        self.leave(sub, view)
        group = self._held[sub] = ConflatedGroup(view, 0.0)
        if view.where is not None:
            self._refilter()
        for g in missed:
            index = {w: j for j, w in enumerate(g.filters)}
            self._absorb(group, g.records, g.befores, g.vectors, index)

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
        # A copy: a deliver that cuts off a group's last subscriber removes the group.
        for group in list(groups):
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
        groups = self._conflated.get(key)
        if groups and len(groups) > 1 and not any(g.pending for g in groups):
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

    def seq_of(self, sub: Subscriber) -> int:
        """§4.3: the seq up to which ``sub`` has been written every change of its view
        (a heartbeat's seq): a conflated or held subscriber has everything before its
        group's oldest waiting change; one that is not joined, ``flushed_seq``."""
        place = self._gen_of.get(sub)
        if place is not None:
            return self.flushed_seq if place[0] is self._gens[-1] else place[0].seq
        group = self._held.get(sub) or self._group_of.get(sub)
        if group is not None and group.pending:
            return group.base_seq  # the rest waits in its conflated state
        return self.flushed_seq

    def publish(self, records: Sequence[Record]) -> None:
        """Queue changes just applied to the state, in seq order."""
        if not records:
            return
        if not self._groups and not self._conflated and not self._held and not self._pending:
            # Nobody listens: nothing to encode. A subscriber that joins later
            # catches up from the change log up to flushed_seq first.
            self.flushed_seq = records[-1].seq
            return
        self._pending.extend(records)
        self._pending_before.extend(
            [b if isinstance(b, Record) else None for b in (r.before for r in records)]
        )
        self._batch_ends.append(len(self._pending))
        self._batch_since.append(time.perf_counter())
        if not self._scheduled and self._schedule is not None:
            self._scheduled = True
            self._schedule(self._scheduled_step)

    def _scheduled_step(self) -> None:
        self._scheduled = False
        wait = self.step()
        if self._schedule is None:
            return
        if self._gens_behind() or (self._pending and wait <= 0):
            self._scheduled = True  # the rest on a later loop turn
            self._schedule(self._scheduled_step)
        elif self._pending and self._timer is not None:
            self._scheduled = True  # --flush-interval: seal when it has passed
            self._timer(wait, self._wake)

    def _wake(self) -> None:
        if self._schedule is not None:
            self._schedule(self._scheduled_step)

    def step(self, writes: int = STEP_WRITES) -> float:
        """One step: seal what is queued (whole batches of about FLUSH_BYTES, while less
        than that is sealed and unwritten), then write to the ``writes`` subscribers
        that have waited longest. Returns how long --flush-interval keeps what is still
        queued from being sealed (0: it is not)."""
        wait = 0.0
        if self._pending and self._unsent < FLUSH_BYTES:
            wait = self._last_seal + self._min_interval - self._clock()
            if wait <= 0 or self._timer is None:
                self._seal(FLUSH_BYTES)
                wait = 0.0
        self._write(writes, FLUSH_BYTES)
        return wait

    def flush(self) -> None:
        """Seal everything queued and write it to every subscriber, now (shutdown, §8;
        a snapshot or a join only needs it sealed: :meth:`seal`)."""
        if self._pending:
            self._seal(None)
        self._write(None, None)

    def seal(self) -> None:
        """Seal everything queued, so that ``flushed_seq`` is the state's seq (§5.2); the
        writes follow in the next steps. Generations of about FLUSH_BYTES, as a step
        makes them: a subscriber's write stays that size (§7)."""
        while self._pending:
            self._seal(FLUSH_BYTES)

    def _gens_behind(self) -> bool:
        """Whether some subscriber has not been written every sealed generation."""
        self._trim()
        return len(self._gens) > 1

    def _seal(self, max_bytes: int | None) -> None:
        """Queued changes become a generation: all, or whole batches of about
        ``max_bytes`` (at least one)."""
        n = len(self._pending) if max_bytes is None else self._cut(max_bytes)
        records = self._pending[:n]
        befores = self._pending_before[:n]
        if n == len(self._pending):
            since = self._batch_since[0]
            self._pending, self._pending_before, self._batch_ends = [], [], []
            self._batch_since = []
        else:
            del self._pending[:n]
            del self._pending_before[:n]
            since = self._batch_since[0]
            whole = self._batch_ends.index(n) + 1  # batches sealed
            self._batch_ends = [end - n for end in self._batch_ends[whole:]]
            del self._batch_since[:whole]
        self.flushed_seq = records[-1].seq
        self._last_seal = self._clock()
        vectors = self._vectors(records, befores) if len(self._filters) else None
        gen = _Gen(
            self.flushed_seq,
            records,
            befores,
            since=since,
            filters=self._filters.filters,
            vectors=vectors,
        )
        if self._gen_of:
            self._gens.append(gen)
            self._unsent += gen.size
        else:
            self._gens = [gen]  # nobody to write it to
            self._unsent = 0
        if self._conflated or self._held:
            self._absorb_conflated(records, befores, vectors)

    def _trim(self) -> None:
        """Drop the oldest generations while no subscriber's last write ended with
        them: the next one has then been written to everyone."""
        gens = self._gens
        while len(gens) > 1 and not gens[0].subs:
            del gens[0]
            first = gens[0]
            self._unsent -= first.size
            if self.on_flush is not None and first.since is not None:
                self.on_flush(time.perf_counter() - first.since)

    def _write(self, writes: int | None, max_bytes: int | None) -> None:
        """Write to the subscribers that have waited longest (whose last write ended
        with the oldest generation), at most ``writes`` of them: each gets every newer
        generation, or as many as fit in about ``max_bytes``, in one blob per view.

        The subscribers of one view are moved to their new generation together, with
        dict operations that run at C speed, before their writes: per subscriber, only
        the ``deliver`` call is Python. A write that cuts its subscriber off leaves from
        the new generation; one that holds it (§7) is told by ``_writing_from``
        which generation it was written from."""
        left = len(self._gen_of) if writes is None else writes
        gen_of = self._gen_of
        deliveries = nbytes = 0
        self._trim()
        while len(self._gens) > 1 and left > 0:
            oldest = self._gens[0]
            for view, waiting in list(oldest.subs.items()):
                if left <= 0:
                    break
                if not waiting:
                    continue  # its last subscriber left during an earlier write
                last, blob, n = self._blob_after(view, max_bytes)
                if len(waiting) <= left:
                    batch = list(waiting)
                    oldest.subs.pop(view, None)
                else:
                    batch = list(itertools.islice(waiting, left))
                    for sub in batch:
                        del waiting[sub]
                left -= len(batch)
                at = last.subs.get(view)
                if at is None:
                    last.subs[view] = dict.fromkeys(batch)
                else:
                    at.update(dict.fromkeys(batch))
                place = (last, view)
                gen_of.update(dict.fromkeys(batch, place))
                if not n:
                    continue
                self._writing_from = oldest
                gone = 0
                for sub in batch:
                    if gen_of.get(sub) is place:
                        self._writing_sub = sub
                        sub.deliver(blob)
                    else:
                        gone += 1  # cut off by an earlier write of this batch
                self._writing_sub = self._writing_from = None
                deliveries += n * (len(batch) - gone)
                nbytes += len(blob) * (len(batch) - gone)
            self._trim()
        self.deliveries += deliveries
        self.bytes_delivered += nbytes

    def _blob_after(self, view: View, max_bytes: int | None) -> tuple[_Gen, bytes, int]:
        """What a subscriber of ``view`` whose last write ended with the oldest
        generation gets next: the generations after it (as many as fit in about
        ``max_bytes``, at least one), the last of them, its blob and its frame count."""
        gens = self._gens
        parts: list[bytes] = []
        n = size = 0
        last = gens[1]
        for i in range(1, len(gens)):
            gen = gens[i]
            if max_bytes is not None and i > 1 and size + gen.size > max_bytes:
                break
            size += gen.size
            last = gen
            blob, k = self._view_blob(gen, view)
            if k:
                parts.append(blob)
                n += k
        return last, parts[0] if len(parts) == 1 else b"".join(parts), n

    def _view_blob(self, gen: _Gen, view: View) -> tuple[bytes, int]:
        """The frames of ``gen`` for the subscribers of ``view``, and how many there
        are (built once per generation and view)."""
        got = gen.blobs.get(view)
        if got is not None:
            return got
        cols, where = view.collections, view.where
        records, lines = gen.records, gen.lines
        if where is not None:
            if gen.moves is None:
                assert gen.vectors is not None
                gen.moves = self._moves(gen.filters, gen.vectors)
            picked = [
                lines[i] if i >= 0 else _delete_line(records[~i])
                for i in gen.moves[where]
                if cols is None or records[i if i >= 0 else ~i].collection in cols
            ]
        elif cols is None:
            picked = lines
        else:
            picked = [ln for r, ln in zip(records, lines, strict=True) if r.collection in cols]
        got = gen.blobs[view] = (b"".join(picked), len(picked))
        return got

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

    @staticmethod
    def _moves(
        filters: tuple[Where, ...],
        vectors: tuple[list[tuple[bool, ...]], list[tuple[bool, ...]]],
    ) -> dict[Where, list[int]]:
        """For each distinct filter, what its subscribers get of a generation, in
        order: ``i`` for the change frame of ``records[i]`` (in view now), ``~i`` for a
        delete of its key (it moved out), nothing when it was never in view (§3.7)."""
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
