"""Interleavings of the rolling-writes fan-out (docs/fanout.md) and the state's
``lines``, from an adversarial review.

Core only: bytes and objects, no sockets. Tests whose docstring starts with "Found:"
showed a defect that the review found (each failed before its fix); the others guard
behaviour the fan-out must keep.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast.core import filters as filters_module
from statecast.core.fanout import FLUSH_BYTES, Fanout
from statecast.core.filters import Where, parse_where
from statecast.core.protocol import Change, prepare_changes
from statecast.core.state import Snapshot, State, encode_batch
from statecast.core.view import View
from tests.helpers import FakeSubscriber, Frame, frames_of
from tests.peer import Peer, new_engine, publish

Key = tuple[str, str]
Model = dict[Key, Any]


def _seqs(blob: bytes) -> list[int]:
    return [int(msgspec.json.decode(line)["seq"]) for line in blob.splitlines()]


def _changes(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f["type"] == "change"]


# -- found: a snapshot or subscribe seals everything queued into one generation ----------


def test_a_snapshot_mid_round_keeps_writes_near_flush_bytes() -> None:
    """Found: ``engine.seal()`` (every ``sync`` and ``subscribe``) seals everything queued
    into ONE generation, ignoring FLUSH_BYTES and the "nothing more is sealed while about
    FLUSH_BYTES is unwritten" rule (docs/fanout.md, protocol §7).

    Interleaving: two subscribers; a burst of 30 batches (~9 MB) is queued; a step seals
    one ~1 MiB generation and writes it to the first subscriber only. While that
    generation is unwritten to the second, steps seal nothing more (``_unsent`` >=
    FLUSH_BYTES), so the rest (~8 MB) stays queued. Now a client sends ``sync``: the
    engine's snapshot calls ``seal()`` -> ``_seal(None)``: one ~8 MB generation.
    Expected: no write bigger than about FLUSH_BYTES plus one batch (§7 "whole batches
    of at most about 1 MiB in one write"; a subscriber that keeps up is never cut off).
    Before the fix: the first subscriber's next write is the whole ~8 MB generation
    (``_blob_after`` always takes at least one generation), which by itself is about
    --max-pending: the next write finds a subscriber that reads at full speed over the
    limit and cuts it off (or holds it). ``_unsent`` jumps to ~9 MB as well.
    Fix: seal in bounded pieces, ``while self._pending: self._seal(FLUSH_BYTES)`` in
    ``seal()`` (whole batches, so ``flushed_seq`` still reaches the state's seq); and
    ``Engine.sync_point`` need not seal at all (``subscribe`` may answer with
    ``flushed_seq``: the queued changes then reach it through the fan-out).
    """
    engine = new_engine()
    fan = engine.fanout
    first, second = FakeSubscriber(), FakeSubscriber()
    fan.join(first, View())
    fan.join(second, View())
    big = "x" * 100_000
    for b in range(30):  # 30 batches of 3 changes of ~100 KB
        publish(engine, *[Change("c", f"{b}-{i}", big) for i in range(3)])
    fan.step(1)  # seals ~1 MiB, writes it to `first`
    fan.step(0)  # `second` still waits for it: nothing more sealed
    assert fan.flushed_seq < 90
    snap = engine.snapshot(None)  # a `sync` arrives
    snap.close()
    assert fan.flushed_seq == 90
    while any(not s.blobs or _seqs(s.blobs[-1])[-1] < 90 for s in (first, second)):
        fan.step(1)
    batch = 3 * 100_200
    sizes = [len(b) for s in (first, second) for b in s.blobs]
    assert max(sizes) <= FLUSH_BYTES + batch, f"a write of {max(sizes)} bytes"


# -- found: heartbeats (§4.3) of a held subscriber ---------------------------------------


def _slow_rig() -> tuple[Any, Peer, list[Peer]]:
    """An engine, a subscriber that is held by the next write it gets (like a TCP
    connection over --max-pending under --slow-consumer conflate), and two others."""
    engine = new_engine()
    slow = Peer(engine)
    slow.send({"op": "subscribe"})
    others = [Peer(engine) for _ in range(2)]
    for p in others:
        p.send({"op": "subscribe"})
    return engine, slow, others


def test_a_held_subscribers_heartbeat_seq_is_what_its_last_write_carried() -> None:
    """Found: the commit promises "a held slow consumer keeps what its last write
    carried" (§4.3: a heartbeat's seq is what was written to that connection), but
    ``hold()`` calls ``leave()``, which drops the subscriber from ``_gen_of``, and
    ``seq_of()`` then answers ``flushed_seq``.

    Interleaving: the slow subscriber is written seq 1; seqs 2-3 are published; the
    write that carries them finds it behind and holds it (the write is lost, its changes
    go to the held state). The server's heartbeat timer still sends heartbeats to it
    (``session.joined`` stays true while degraded), with ``seq_of``.
    Expected: heartbeat seq 1. Before the fix: 3; and after the restore the client reads frames
    with seqs 2 and 3 after a heartbeat that said every change up to 3 had been written.
    Fix: remember in ``hold()`` the seq the subscriber had (``gen.seq`` of the generation
    it was written from, or ``flushed_seq`` if that was the newest), e.g. in a
    ``_held_seq`` dict, and have ``seq_of`` answer it while the subscriber is held.
    """
    engine, slow, _ = _slow_rig()
    publish(engine, Change("q", "a", 1))
    engine.fanout.flush()
    assert [f["seq"] for f in _changes(slow.frames())] == [1]

    def deliver(blob: bytes) -> None:  # over --max-pending: held, the blob not written
        assert slow.session.degrade()
        slow.collect()

    slow.deliver = deliver  # type: ignore[method-assign]
    publish(engine, Change("q", "b", 2), Change("q", "a", 3))
    engine.fanout.flush()
    assert slow.session.degraded
    heartbeat = engine.fanout.seq_of(slow)  # what send_heartbeat() would say now
    slow.session.restore()
    slow.collect()
    later = [f["seq"] for f in _changes(slow.frames())]
    assert later == [2, 3]
    assert heartbeat == 1, f"heartbeat says {heartbeat}, then seqs {later} are written"


def test_a_conflated_subscribers_heartbeat_does_not_claim_what_it_was_not_sent() -> None:
    """Found (older than 2bfd88c, but now contradicting the new §4.3 wording "S is the seq
    up to which every change has been written to this connection"): ``seq_of`` answers
    ``flushed_seq`` for a ``conflate: SECONDS`` subscriber, whose changes since its last
    emission have not been written. Interleaving: conflated subscriber, a change is
    sealed, a heartbeat goes out before the interval ends, then the emission.
    Expected: heartbeat seq below the emitted frame's seq (0 here). Before the fix: heartbeat
    seq 1, then a frame with seq 1. A client that resumes ``from`` the heartbeat's seq
    after a disconnect misses that key's newest value. Fix: a group remembers
    ``flushed_seq`` at its last emission (at join for a new subscriber), and ``seq_of``
    answers that for its subscribers.
    """
    engine = new_engine()
    peer = Peer(engine)
    peer.send({"op": "subscribe", "conflate": 1})
    peer.frames()
    publish(engine, Change("q", "a", 1))
    engine.fanout.flush()
    heartbeat = engine.fanout.seq_of(peer)
    engine.fanout.emit_conflated()
    emitted = [f["seq"] for f in _changes(peer.frames())]
    assert emitted == [1]
    assert all(s > heartbeat for s in emitted), f"heartbeat {heartbeat}, then {emitted}"


# -- found: heartbeat seq below the subscription point -----------------------------------


def test_a_heartbeat_seq_never_falls_below_where_the_subscriber_joined() -> None:
    """Found (minor): when changes are published with nobody listening, the fast path in
    ``publish()`` moves ``flushed_seq`` but not the newest generation's ``seq`` (the
    same happens at start-up: ``Engine`` sets ``flushed_seq`` to a loaded store's seq,
    while ``_gens`` is ``[_Gen(0)]``). A subscriber joins that stale generation.
    Once a newer generation is sealed and not yet written to it, ``seq_of`` answers the
    stale ``gen.seq``.
    Interleaving: 3 changes, nobody listening; subscribe (``subscribed`` seq 3; a
    heartbeat now says 3); a 4th change is sealed, its write still to come.
    Expected: heartbeat >= 3 (and heartbeats of one connection never go backwards).
    Before the fix: 0. Fix: keep ``_gens[-1].seq == flushed_seq``: in the fast path (nobody is
    at any generation then) ``self._gens = [_Gen(seq)]; self._unsent = 0``, and a
    ``Fanout`` method that the Engine uses to set the start seq.
    """
    engine = new_engine()
    for i in range(3):
        publish(engine, Change("q", str(i), i))
    peer = Peer(engine)
    peer.send({"op": "subscribe", "id": 1})
    (subscribed,) = peer.frames()[1:]
    assert subscribed["seq"] == 3
    first = engine.fanout.seq_of(peer)
    assert first == 3
    publish(engine, Change("q", "x", 4))
    engine.fanout.step(0)  # sealed; this subscriber's turn is still to come
    second = engine.fanout.seq_of(peer)
    assert second >= first, f"heartbeats {first}, then {second}"


# -- found: a conflated group is skipped when a subscriber is cut off in its emission ----


def test_a_conflated_emission_reaches_every_group_when_one_subscriber_is_cut_off() -> None:
    """Found (in ``_emit``, unchanged by 2bfd88c, but it breaks the conflated guarantees
    the brief asks about): ``_emit`` iterates ``groups`` while a ``deliver`` may remove
    a group from that very list (a conflated subscriber that falls behind is cut off:
    ``session.fail`` -> ``leave`` -> ``_leave_conflated`` -> ``groups.remove``).
    Interleaving: one view and interval, three groups (each later subscriber joined while
    the earlier groups had pending changes); at the emission, the only subscriber of
    the first group is cut off by its own deliver. The list shifts, so the second group
    is skipped (not emitted, its pending kept), and then the third (emitted, empty) is
    merged INTO the second.
    Expected: the other two subscribers get the newest state now, once.
    Before the fix: the second gets nothing at this emission, and at the next one the third
    subscriber gets again frames it already had (same seqs: a duplicate, which
    the replica treats as lost track and resyncs). Fix: ``for group in list(groups)``,
    then re-read ``self._conflated.get(key)`` and merge only groups with no pending.
    """
    timers: list[tuple[float, Callable[[], None]]] = []
    fan = Fanout(timer=lambda delay, fn: timers.append((delay, fn)), clock=lambda: 0.0)
    state = State()

    class CutOff(FakeSubscriber):
        def deliver(self, blob: bytes) -> None:
            fan.leave(self, View())  # slow_consumer: session.fail() leaves the fan-out

    cut, second, third = CutOff(), FakeSubscriber(), FakeSubscriber()
    fan.join(cut, View(), conflate=1.0)
    fan.publish(state.apply(prepare_changes([Change("q", "a", 1)])))
    fan.flush()
    fan.join(second, View(), conflate=1.0)  # the first group has pending: a group of its own
    fan.publish(state.apply(prepare_changes([Change("q", "b", 2)])))
    fan.flush()
    fan.join(third, View(), conflate=1.0)  # a third group
    fan.publish(state.apply(prepare_changes([Change("q", "c", 3)])))
    fan.flush()
    fan.emit_conflated()
    assert [f["seq"] for f in second.frames()] == [2, 3]
    assert [f["seq"] for f in third.frames()] == [3]
    fan.publish(state.apply(prepare_changes([Change("q", "d", 4)])))
    fan.flush()
    fan.emit_conflated()
    assert [f["seq"] for f in third.frames()] == [3, 4]


# -- found (minor): publish-to-send latency of the rest of a partly sealed queue ---------


def test_latency_of_a_generation_counts_from_its_own_oldest_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found (minor, metrics): ``_pending_since`` is only set when a publish finds the
    queue empty. When a step seals part of the queue (``_seal(FLUSH_BYTES)``), the rest
    keeps the time of the first part's oldest change, so the histogram
    (statecast_publish_to_send_seconds) over-reports the next generation by as long as
    the queue was non-empty. Interleaving: a ~1.2 MB batch at t=0, a small one at t=10,
    one step (t=10) seals and writes the first, the next (t=10.5) the second.
    Expected for the second generation: 0.5 s. Before the fix: 10.5 s. Fix: after a partial
    seal, set ``_pending_since`` to the queueing time of the first batch left (keep one
    time per batch beside ``_batch_ends``)."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])  # the clock fanout.py reads
    fan = Fanout()
    seen: list[float] = []
    fan.on_flush = seen.append
    state = State()
    sub = FakeSubscriber()
    fan.join(sub, View())
    big = "x" * 400_000
    fan.publish(state.apply(prepare_changes([Change("c", str(i), big) for i in range(3)])))
    now[0] = 10.0
    fan.publish(state.apply(prepare_changes([Change("c", "small", 1)])))
    fan.step()  # the first batch (> FLUSH_BYTES) alone is sealed, and written
    assert seen == [10.0]
    now[0] = 10.5
    fan.step()  # then the second
    assert seen == [10.0, pytest.approx(0.5)]


# -- guards: what must hold ------------------------------------------------------------


def test_a_write_cut_short_by_flush_bytes_then_held_loses_nothing() -> None:
    """§7: a write that carries only part of what is sealed (about FLUSH_BYTES) and finds
    its subscriber behind: everything after where the write started goes into the held
    state, also the generations the write did not carry."""
    engine, slow, others = _slow_rig()
    big = "y" * 300_000
    for b in range(6):  # 6 generations of ~600 KB: a write takes at most two
        publish(engine, Change("c", f"k{b}", big), Change("c", "n", b))
        engine.fanout.seal()
    held = [False]

    def deliver(blob: bytes) -> None:
        if not held[0]:
            held[0] = True
            assert slow.session.degrade()
            slow.collect()

    slow.deliver = deliver  # type: ignore[method-assign]
    engine.fanout.step(1)  # the slow one first
    engine.fanout.flush()
    slow.session.restore()
    slow.collect()
    got = _changes(slow.frames())
    assert sorted((f["key"], f["seq"]) for f in got) == sorted(
        [(f"k{b}", 2 * b + 1) for b in range(6)] + [("n", 12)]
    )
    for p in others:
        assert [f["seq"] for f in _changes(p.frames())] == list(range(1, 13))


def test_a_write_that_closes_the_last_subscriber_of_another_view() -> None:
    """A deliver() that makes a subscriber of ANOTHER view leave while both wait at the
    oldest generation (a Subscriber may do anything but raise; the existing test covers
    only a victim of the same view). The fan-out must not raise, and the victim gets
    nothing more. (Found: with subscribers kept per view in a generation, this raised
    KeyError: ``leave()`` had dropped the victim's view after ``_write`` listed it.)"""
    fan = Fanout()
    state = State()
    victim = FakeSubscriber()

    class Closer(FakeSubscriber):
        def deliver(self, blob: bytes) -> None:
            super().deliver(blob)
            fan.leave(victim, View(frozenset({"x"})))

    closer, other = Closer(), FakeSubscriber()
    fan.join(closer, View())
    fan.join(victim, View(frozenset({"x"})))
    fan.join(other, View(frozenset({"x", "y"})))
    fan.publish(state.apply(prepare_changes([Change("x", "1", 1)])))
    fan.step()
    assert victim.blobs == []
    assert [f["seq"] for f in other.frames()] == [1]
    assert fan.subscriber_count == 2


def test_equal_views_share_one_blob_per_generation() -> None:
    """Views equal but not the same object (every session builds its own): one group,
    one blob built per generation, shared by all of them."""
    fan = Fanout()
    state = State()
    subs = [FakeSubscriber() for _ in range(4)]
    for s in subs:
        fan.join(s, View(frozenset({"a"}), parse_where({"n": {"in": [1, 2]}})))
    assert fan.views == 1
    fan.publish(
        state.apply(prepare_changes([Change("a", "1", {"n": 1}), Change("b", "1", {"n": 1})]))
    )
    fan.publish(state.apply(prepare_changes([Change("a", "1", {"n": 3})])))
    fan.flush()
    assert all(s.blobs == [subs[0].blobs[0]] for s in subs)
    assert all(s.blobs[0] is subs[0].blobs[0] for s in subs)
    assert subs[0].frames() == [
        {"type": "change", "seq": 1, "collection": "a", "key": "1", "value": {"n": 1}},
        {"type": "change", "seq": 3, "collection": "a", "key": "1", "deleted": True},
    ]


def test_a_filter_dropped_and_added_again_between_seal_and_blob() -> None:
    """A generation keeps the filters in use when it was sealed: a subscriber of a where
    filter that left (the filter dropped) and came back equal but as another object,
    between a generation's seal and its lazy blob, still gets exactly its view."""
    fan = Fanout()
    state = State()
    wa = parse_where({"acc": "A"})
    assert wa is not None
    other = Where(dict(wa._conds), _token=filters_module._CONSTRUCT)
    assert other == wa
    assert other is not wa
    a, b, late = FakeSubscriber(), FakeSubscriber(), FakeSubscriber()
    fan.join(a, View(None, parse_where({"acc": "B"})))
    fan.join(b, View(None, wa))
    fan.publish(state.apply(prepare_changes([Change("x", "1", {"acc": "A"})])))
    fan.step(0)  # sealed with both filters
    fan.leave(b, View(None, wa))  # its filter is dropped
    fan.join(late, View(None, other))  # and comes back, another object
    fan.publish(state.apply(prepare_changes([Change("x", "1", {"acc": "B"})])))
    fan.step(0)
    fan.publish(state.apply(prepare_changes([Change("x", "2", {"acc": "A"})])))
    fan.flush()
    assert [(f["seq"], f.get("deleted", False)) for f in a.frames()] == [(2, False)]
    assert b.blobs == []
    assert [(f["seq"], f.get("deleted", False)) for f in late.frames()] == [
        (2, True),  # moved out of its view
        (3, False),
    ]


def test_a_huge_batch_is_one_generation_and_one_write() -> None:
    """A batch larger than FLUSH_BYTES is never split (§5.3): one generation, one write
    per subscriber, and the batches behind it follow in later writes."""
    fan = Fanout()
    state = State()
    subs = [FakeSubscriber() for _ in range(3)]
    for s in subs:
        fan.join(s, View())
    big = "z" * 200_000
    fan.publish(state.apply(prepare_changes([Change("c", str(i), big) for i in range(8)])))
    fan.publish(state.apply(prepare_changes([Change("c", "after", 1)])))
    for _ in range(6):
        fan.step(2)
    for s in subs:
        assert [_seqs(b) for b in s.blobs] == [list(range(1, 9)), [9]]


def test_a_thousand_subscribers_each_get_one_write_per_round() -> None:
    """Huge subscriber counts: one round is ceil(n / STEP_WRITES) steps; every change is
    written once to each subscriber, and nothing is left sealed afterwards."""
    fan = Fanout()
    state = State()
    subs = [FakeSubscriber() for _ in range(1000)]
    for s in subs:
        fan.join(s, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1)])))
    steps = 0
    while any(not s.blobs for s in subs):
        fan.step()
        steps += 1
        if steps == 5:  # mid-round: a change goes out with the next writes
            fan.publish(state.apply(prepare_changes([Change("a", "2", 2)])))
    assert steps == 16
    while any(_seqs(s.blobs[-1])[-1] < 2 for s in subs):
        fan.step()
    for s in subs:
        assert [seq for b in s.blobs for seq in _seqs(b)] == [1, 2]
    assert sum(len(s.blobs) for s in subs) == 1000 + 5 * 64
    fan.step()
    assert fan._gens_behind() is False
    assert fan._unsent == 0


# -- property: the fan-out alone, with deliver() callbacks that re-enter it -------------

ACCS = ["A", "B"]
change_st = st.one_of(
    st.builds(
        lambda c, k, a: Change(c, k, {"acc": a}),
        st.sampled_from(["x", "y"]),
        st.sampled_from(["k0", "k1", "k2"]),
        st.sampled_from(ACCS),
    ),
    st.builds(
        lambda c, k: Change(c, k, delete=True),
        st.sampled_from(["x", "y"]),
        st.sampled_from(["k0", "k1", "k2"]),
    ),
)
# Each view as arguments: a fresh View (and, for the last, a fresh Where) every join.
VIEW_ARGS: list[tuple[list[str] | None, dict[str, str] | None]] = [
    (None, None),
    (["x"], None),
    (None, {"acc": "A"}),
    (["y"], {"acc": "B"}),
]
# What a deliver() may do to the fan-out: cut off or hold its own subscriber (a TCP or
# WebSocket write over --max-pending), or leave, join or restore another (closing
# connections, new ones). No write holds another subscriber (transports/output.py).
REENTRY = ["leave_self", "hold_self", "hold_self", "leave_other", "join_new", "restore_other"]
fan_action_st = st.one_of(
    st.tuples(st.just("publish"), st.lists(change_st, min_size=1, max_size=4), st.just(0)),
    st.tuples(st.just("step"), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("publish"), st.lists(change_st, min_size=1, max_size=4), st.just(0)),
    st.tuples(st.just("step"), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("arm"), st.integers(0, 7), st.integers(0, 8 * len(REENTRY) - 1)),
    st.tuples(st.just("seal"), st.none(), st.just(0)),
    st.tuples(st.just("join"), st.integers(0, len(VIEW_ARGS) - 1), st.just(0)),
    st.tuples(st.just("leave"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("hold"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("restore"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("arm"), st.integers(0, 7), st.integers(0, 8 * len(REENTRY) - 1)),
)


def _fresh_view(i: int) -> View:
    cols, where = VIEW_ARGS[i]
    w = parse_where(where)
    if w is not None:  # equal, not the same object: the fan-out must not care
        w = Where(dict(w._conds), _token=filters_module._CONSTRUCT)
    return View(None if cols is None else frozenset(cols), w)


def _in_view(view_i: int, key: Key, value: Any) -> bool:
    cols, where = VIEW_ARGS[view_i]
    return (cols is None or key[0] in cols) and (where is None or value["acc"] == where["acc"])


class _Sub:
    """A subscriber with its copy, what it was written, and an armed re-entry."""

    def __init__(self, rig: _FanRig, view_i: int) -> None:
        self.rig = rig
        self.view_i = view_i
        self.view = _fresh_view(view_i)
        self.copy: Model = {}
        self.blobs: list[bytes] = []
        self.held = False
        self.gone = False
        self.armed: tuple[str, int] | None = None
        self.last = 0  # the last seq it has (caught up to, or written)
        self.written = 0  # the last seq written to it
        self.batches: set[int] = set()
        self.heartbeat = 0  # the last seq_of() seen while joined and not held

    def deliver(self, blob: bytes) -> None:
        assert not self.gone, "written after it left"
        assert not self.held, "written while held"
        armed, self.armed = self.armed, None
        if armed is not None:
            kind, j = armed
            if kind == "leave_self":  # cut off: the blob is not written
                self.rig.leave(self)
                return
            if kind == "hold_self":  # over --max-pending: held, the blob is not written
                self.rig.hold(self)
                return
            self.rig.reenter(kind, j)
        self.take(blob, plain=True)

    def take(self, blob: bytes, *, plain: bool) -> None:
        self.blobs.append(blob)
        frames = frames_of(blob)
        seqs = [f["seq"] for f in frames]
        assert seqs == sorted(set(seqs)), seqs
        assert not seqs or seqs[0] > self.last, (self.last, seqs)
        assert not seqs or seqs[0] > self.heartbeat, ("after a heartbeat", self.heartbeat, seqs)
        if plain:
            batches = {self.rig.batch_of[s] for s in seqs}
            assert not batches & self.batches, "half a batch in an earlier write"
            self.batches |= batches
        filtered = VIEW_ARGS[self.view_i][1] is not None
        for f in frames:
            assert f["type"] == "change"
            self.last = self.written = f["seq"]
            k = (f["collection"], f["key"])
            if f.get("deleted"):
                # §3.7: a filtered view gets a delete only for a record it had.
                assert not filtered or k in self.copy, ("delete of a key never in view", k)
                self.copy.pop(k, None)
            else:
                assert _in_view(self.view_i, k, f["value"])
                self.copy[k] = f["value"]


class _FanRig:
    def __init__(self) -> None:
        self.fan = Fanout()
        self.state = State()
        self.model: Model = {}
        self.history: dict[int, Model] = {0: {}}  # the model at each batch's last seq
        self.batch_of: dict[int, int] = {}
        self.subs: list[_Sub] = []

    def publish(self, changes: list[Change]) -> None:
        records = self.state.apply(prepare_changes(changes))
        for c, r in zip(changes, records, strict=True):
            self.batch_of[r.seq] = records[-1].seq
            if c.delete:
                self.model.pop((c.collection, c.key), None)
            else:
                self.model[(c.collection, c.key)] = c.value
        self.history[records[-1].seq] = dict(self.model)
        self.fan.publish(records)

    def view_at(self, view_i: int, seq: int) -> Model:
        return {k: v for k, v in self.history[seq].items() if _in_view(view_i, k, v)}

    def join(self, view_i: int) -> _Sub:
        """A subscriber that caught up to flushed_seq (from the log), then joins."""
        sub = _Sub(self, view_i)
        seq = self.fan.flushed_seq
        sub.copy = self.view_at(view_i, seq)
        sub.last = sub.heartbeat = seq
        self.subs.append(sub)
        self.fan.join(sub, sub.view)
        return sub

    def pick(self, n: int) -> _Sub | None:
        live = [s for s in self.subs if not s.gone]
        return live[n % len(live)] if live else None

    def leave(self, sub: _Sub) -> None:
        sub.gone = True
        self.fan.leave(sub, sub.view)

    def hold(self, sub: _Sub) -> None:
        if not sub.held:
            sub.held = True
            self.fan.hold(sub, sub.view)

    def restore(self, sub: _Sub) -> None:
        if sub.held:
            sub.held = False
            sub.take(self.fan.release(sub), plain=False)
            sub.batches.clear()  # seqs skip: a batch's rest may come in the next write
            self.fan.join(sub, sub.view)
            sub.heartbeat = self.fan.seq_of(sub)

    def reenter(self, kind: str, j: int) -> None:
        other = self.pick(j)
        if kind == "join_new":
            self.join(j % len(VIEW_ARGS))
        elif other is None:
            return
        elif kind == "leave_other":
            self.leave(other)
        elif kind == "restore_other":
            self.restore(other)

    def check_heartbeats(self) -> None:
        """§4.3, for every joined subscriber that is not held: seq_of is at least the
        last seq written to it, at most flushed_seq; nothing written later is older.
        (Held subscribers, and seq_of below the join point: separate tests above.)"""
        for s in self.subs:
            if s.gone or s.held:
                continue
            hb = self.fan.seq_of(s)
            assert s.written <= hb <= self.fan.flushed_seq, (s.written, hb, self.fan.flushed_seq)
            s.heartbeat = max(s.heartbeat, hb)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(st.integers(0, len(VIEW_ARGS) - 1), min_size=1, max_size=5),
    st.lists(fan_action_st, min_size=4, max_size=60),
)
def test_reentrant_rolling_writes_keep_every_copy_exact(
    first: list[int], actions: list[tuple[str, Any, int]]
) -> None:
    """Random interleavings of publishes, partial steps, seals (a snapshot or subscribe
    mid-round), joins at flushed_seq (with pending changes not sealed yet), leaves,
    holds and restores, also from inside deliver() (a write that cuts off or holds its
    own subscriber, or leaves, holds, restores or joins another): every copy ends equal
    to its view, seqs only rise, no batch is split, heartbeats hold."""
    rig = _FanRig()
    fan = rig.fan
    for view_i in first:
        rig.join(view_i)
    for kind, arg, extra in actions:
        if kind == "publish":
            rig.publish(arg)
        elif kind == "step":
            fan.step(arg)
        elif kind == "seal":
            fan.seal()
        elif kind == "join":
            rig.join(arg)
        elif kind == "arm":
            sub = rig.pick(arg)
            if sub is not None:
                sub.armed = (REENTRY[extra % len(REENTRY)], extra // len(REENTRY))
        else:
            sub = rig.pick(arg)
            if sub is not None:
                {"leave": rig.leave, "hold": rig.hold, "restore": rig.restore}[kind](sub)
        rig.check_heartbeats()
    for s in rig.subs:
        s.armed = None
    fan.flush()
    for s in rig.subs:
        if not s.gone:
            rig.restore(s)
    fan.flush()
    rig.check_heartbeats()
    live = [s for s in rig.subs if not s.gone]
    assert fan.subscriber_count == len(live)
    for s in live:
        assert s.copy == rig.view_at(s.view_i, rig.state.seq)
    assert not fan._gens_behind()


# -- the state's `lines` beside its slots (58c6d29) ------------------------------------

state_action_st = st.one_of(
    st.tuples(st.just("apply"), st.lists(change_st, min_size=1, max_size=5)),
    st.tuples(st.just("open"), st.none()),
    st.tuples(st.just("close"), st.integers(0, 3)),
    st.tuples(st.just("read"), st.integers(0, 3)),
)


def _check_lines(state: State) -> None:
    for coll in state.collections.values():
        assert coll.lines == [r.line for r in coll.slots], coll.name
        assert len(coll.index) == len(coll.slots)
        assert all(coll.slots[p].key == k for k, p in coll.index.items())


def _snapshot_contents(lines: list[bytes]) -> Model:
    out: Model = {}
    for line in lines:
        f = msgspec.json.decode(line)
        assert f["type"] == "record"
        out[(f["collection"], f["key"])] = f["value"]
    return out


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(state_action_st, max_size=40), st.booleans())
def test_state_lines_follow_slots_in_every_mutation(
    actions: list[tuple[str, Any]], loaded: bool
) -> None:
    """``lines[i] == slots[i].line`` after installs (new key, overwrite, delete by swap
    or by tombstone), loads, and the release of the last snapshot (tombstones removed);
    every snapshot read through the ``lines`` fast path is exact at its seq."""
    state = State()
    model: Model = {}
    if loaded:  # a store recovering (sqlite, nats): State.load, by collection
        first = [Change("x", "k0", {"acc": "A"}), Change("x", "k1", {"acc": "B"})]
        first.append(Change("y", "k0", {"acc": "A"}))
        state.load(encode_batch(prepare_changes(first), 1), 3)
        model = {(c.collection, c.key): c.value for c in first}
    _check_lines(state)
    history: dict[int, Model] = {state.seq: dict(model)}
    snaps: list[tuple[Snapshot, list[bytes]]] = []
    for kind, arg in actions:
        if kind == "apply":
            state.apply(prepare_changes(arg))
            for c in arg:
                if c.delete:
                    model.pop((c.collection, c.key), None)
                else:
                    model[(c.collection, c.key)] = c.value
            history[state.seq] = dict(model)
        elif kind == "open":
            snaps.append((state.snapshot(), []))
        elif snaps:
            i = arg % len(snaps)
            snap, got = snaps[i]
            if kind == "read":
                got += snap.read(200)
                if snap.done:
                    assert _snapshot_contents(got) == history[snap.seq]
            else:
                snap.close()
            if snap.done:
                del snaps[i]
        _check_lines(state)
    for snap, got in snaps:
        rest = got + snap.read(1 << 30)
        assert snap.done
        assert _snapshot_contents(rest) == history[snap.seq]
    _check_lines(state)
    assert state.open_snapshots == 0
    assert not any(c.tombstones for c in state.collections.values())
    assert {(n, r.key) for n, c in state.collections.items() for r in c.records()} == set(model)


def test_counters() -> None:
    """Deliveries and bytes count each frame written to each subscriber once, with
    rolling writes as with one flush."""
    fan = Fanout()
    state = State()
    subs = [FakeSubscriber() for _ in range(5)]
    for s in subs:
        fan.join(s, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1), Change("a", "2", 2)])))
    fan.step(2)
    fan.publish(state.apply(prepare_changes([Change("a", "3", 3)])))
    fan.flush()
    got = collections.Counter(len(frames_of(b"".join(s.blobs))) for s in subs)
    assert got == {3: 5}
    assert fan.deliveries == 15
    assert fan.bytes_delivered == sum(len(b) for s in subs for b in s.blobs)
