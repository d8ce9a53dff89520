from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast.core.fanout import Fanout
from statecast.core.protocol import Change, prepare_changes
from statecast.core.state import State
from statecast.core.view import View
from tests.helpers import FakeSubscriber
from tests.peer import Peer, new_engine, publish


def test_one_blob_per_group_per_flush_shared_by_all() -> None:
    scheduled: list[object] = []
    fan = Fanout(scheduled.append)
    state = State()
    subs = [FakeSubscriber() for _ in range(5)]
    for s in subs:
        fan.join(s, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1), Change("b", "1", 2)])))
    fan.publish(state.apply(prepare_changes([Change("a", "2", 3)])))
    assert len(scheduled) == 1  # one flush scheduled for both publishes
    fan.flush()
    assert all(len(s.blobs) == 1 for s in subs)
    assert all(s.blobs[0] is subs[0].blobs[0] for s in subs)  # encoded once, not per subscriber
    assert [f["seq"] for f in subs[0].frames()] == [1, 2, 3]
    assert fan.flushed_seq == 3
    assert fan.deliveries == 15


def test_groups_by_selection() -> None:
    fan = Fanout()
    state = State()
    only_a, a_and_b, everything = FakeSubscriber(), FakeSubscriber(), FakeSubscriber()
    fan.join(only_a, View(frozenset({"a"})))
    fan.join(a_and_b, View(frozenset({"a", "b"})))
    fan.join(everything, View())
    fan.publish(
        state.apply(
            prepare_changes([Change("a", "1", 1), Change("b", "1", 2), Change("c", "1", 3)])
        )
    )
    fan.publish(state.apply(prepare_changes([Change("c", "2", 4)])))
    fan.flush()
    assert [f["seq"] for f in only_a.frames()] == [1]
    assert [f["seq"] for f in a_and_b.frames()] == [1, 2]
    assert [f["seq"] for f in everything.frames()] == [1, 2, 3, 4]
    assert fan.subscriber_count == 3


def test_leave_and_nobody_listening() -> None:
    fan = Fanout()
    state = State()
    sub = FakeSubscriber()
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1)])))
    assert fan.flushed_seq == 1  # nothing queued with no subscriber
    fan.join(sub, View())
    fan.leave(sub, View())
    fan.leave(sub, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 2)])))
    fan.flush()
    assert sub.blobs == []
    assert fan.subscriber_count == 0
    assert fan.flushed_seq == 2


def test_delete_frames() -> None:
    fan = Fanout()
    state = State()
    sub = FakeSubscriber()
    fan.join(sub, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1), Change("a", "1", delete=True)])))
    fan.flush()
    assert sub.frames() == [
        {"type": "change", "seq": 1, "collection": "a", "key": "1", "value": 1},
        {"type": "change", "seq": 2, "collection": "a", "key": "1", "deleted": True},
    ]


def test_a_scheduled_flush_hands_out_whole_batches_of_about_flush_bytes() -> None:
    """§7: a subscriber that keeps up never has more than about FLUSH_BYTES handed to it
    in one go, however much was published at once; batches stay whole (§5.3)."""
    from statecast.core.fanout import FLUSH_BYTES  # noqa: PLC0415

    def seqs_of(blob: bytes) -> list[int]:
        return [msgspec.json.decode(line)["seq"] for line in blob.splitlines()]

    scheduled: list[Callable[[], None]] = []
    fan = Fanout(scheduled.append)
    state = State()
    sub = FakeSubscriber()
    fan.join(sub, View())
    big = "x" * 100_000
    for b in range(30):  # 30 batches of 3 changes of ~100 KB: ~9 MB
        batch = prepare_changes([Change("c", f"{b}-{i}", big) for i in range(3)])
        fan.publish(state.apply(batch))
    steps = 0
    while scheduled:
        scheduled.pop(0)()
        steps += 1
    assert steps > 5
    assert all(len(blob) <= FLUSH_BYTES + 3 * 100_200 for blob in sub.blobs)
    seqs = [s for blob in sub.blobs for s in seqs_of(blob)]
    assert seqs == list(range(1, 91))
    assert all(seqs_of(blob)[0] % 3 == 1 for blob in sub.blobs)  # whole batches
    assert fan.flushed_seq == 90


# -- rolling writes (docs/fanout.md, "Rolling writes") ---------------------------------


def test_a_change_published_during_a_round_goes_out_with_the_next_writes() -> None:
    """A round over 200 subscribers takes four steps of 64 writes. A change published
    after the first step reaches the rest in that same round, together with the first
    change, and the first 64 at their next write: nobody waits two rounds."""
    fan = Fanout()
    state = State()
    subs = [FakeSubscriber() for _ in range(200)]
    for s in subs:
        fan.join(s, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1)])))
    fan.step(64)
    assert [len(s.blobs) for s in subs[:64]] == [1] * 64
    assert all(not s.blobs for s in subs[64:])
    fan.publish(state.apply(prepare_changes([Change("a", "2", 2)])))
    steps = 0
    while any(len(s.frames()) < 2 for s in subs):
        fan.step(64)
        steps += 1
    assert steps == 4  # 136 more, then the first 64 again: one round
    assert all(len(s.blobs) == 1 for s in subs[64:])  # both changes in one write
    assert len({id(s.blobs[0]) for s in subs[64:]}) == 3  # joined once per step
    for s in subs[:64]:
        assert [f["seq"] for f in s.frames()] == [1, 2]
    assert fan.deliveries == 400
    assert fan.step(64) == 0.0
    assert sum(len(s.blobs) for s in subs) == 264  # nothing more to write


def test_a_heartbeat_seq_is_what_the_subscriber_was_written() -> None:
    """§4.3: a heartbeat says every change up to its seq has been sent: for a
    subscriber whose write is still to come in this round, that is its last write."""
    fan = Fanout()
    state = State()
    first, second = FakeSubscriber(), FakeSubscriber()
    fan.join(first, View())
    fan.join(second, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1)])))
    fan.step(1)
    assert fan.flushed_seq == 1
    assert fan.seq_of(first) == 1
    assert fan.seq_of(second) == 0  # sealed, not written to it yet
    fan.step(1)
    assert fan.seq_of(second) == 1
    assert fan.seq_of(FakeSubscriber()) == 1  # not joined: the sealed seq


def test_a_subscriber_that_leaves_or_is_cut_off_while_others_are_written_to() -> None:
    fan = Fanout()
    state = State()

    class Cutter(FakeSubscriber):
        def deliver(self, blob: bytes) -> None:
            super().deliver(blob)
            fan.leave(victim, View())  # a write that closes another connection

    cutter, victim, last = Cutter(), FakeSubscriber(), FakeSubscriber()
    for s in (cutter, victim, last):
        fan.join(s, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1)])))
    fan.flush()
    assert victim.blobs == []
    assert [f["seq"] for f in last.frames()] == [1]
    assert fan.subscriber_count == 2
    fan.publish(state.apply(prepare_changes([Change("a", "1", 2)])))
    fan.flush()
    assert [f["seq"] for f in last.frames()] == [1, 2]


def test_generations_wait_out_the_flush_interval() -> None:
    """--flush-interval: at least that long between two generations sealed; a step
    that may not seal yet says how long to wait, and the scheduler comes back then."""
    now = [100.0]
    scheduled: list[Callable[[], None]] = []
    timers: list[tuple[float, Callable[[], None]]] = []
    fan = Fanout(
        scheduled.append,
        timer=lambda delay, fn: timers.append((delay, fn)),
        clock=lambda: now[0],
        min_interval=0.010,
    )
    state = State()
    sub = FakeSubscriber()
    fan.join(sub, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1)])))
    scheduled.pop()()
    assert len(sub.blobs) == 1
    now[0] += 0.004
    fan.publish(state.apply(prepare_changes([Change("a", "1", 2)])))
    scheduled.pop()()
    assert len(sub.blobs) == 1  # not sealed yet
    assert not scheduled
    ((delay, wake),) = timers
    assert delay == pytest.approx(0.006)
    now[0] += delay
    wake()
    scheduled.pop()()
    assert [f["seq"] for f in sub.frames()] == [1, 2]


def test_publish_to_send_latency_is_observed_once_a_generation_reached_everyone() -> None:
    fan = Fanout()
    seen: list[float] = []
    fan.on_flush = seen.append
    state = State()
    subs = [FakeSubscriber() for _ in range(3)]
    for s in subs:
        fan.join(s, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1)])))
    fan.step(2)
    fan.step(0)
    assert seen == []  # one subscriber still waits for it
    fan.step(1)
    fan.step(0)
    assert len(seen) == 1
    assert seen[0] >= 0


def test_a_subscriber_held_by_the_write_that_found_it_behind_loses_nothing() -> None:
    """§7 --slow-consumer conflate: the write that finds a subscriber behind holds it;
    what that write carried, and what was sealed after it, is in what it gets when it
    has drained."""
    engine = new_engine()
    slow = Peer(engine)
    slow.send({"op": "subscribe"})
    others = [Peer(engine) for _ in range(3)]
    for p in others:
        p.send({"op": "subscribe"})

    def deliver(blob: bytes) -> None:
        assert slow.session.degrade()
        slow.collect()

    slow.deliver = deliver  # type: ignore[method-assign]
    slow.frames()
    publish(engine, Change("q", "a", 1), Change("q", "b", 1))
    engine.fanout.step(1)  # the slow one first: held
    publish(engine, Change("q", "a", 2))
    engine.fanout.flush()
    assert slow.frames() == [{"type": "conflating", "on": True}]
    slow.session.restore()
    slow.collect()
    assert slow.frames() == [
        {"type": "change", "seq": 2, "collection": "q", "key": "b", "value": 1},
        {"type": "change", "seq": 3, "collection": "q", "key": "a", "value": 2},
        {"type": "conflating", "on": False},
    ]
    for p in others:
        assert [f["seq"] for f in p.frames() if f["type"] == "change"] == [1, 2, 3]


# A property over random interleavings of publishes, partial steps, joins (by sync or
# subscribe, filtered or not), leaves and slow-consumer holds: every copy ends equal to
# its view of the state, every plain subscriber's seqs only rise, none sees half a batch.

ACCOUNTS = ["A", "B"]
prop_change_st = st.one_of(
    st.builds(
        lambda c, k, a, n: Change(c, k, {"acc": a, "n": n}),
        st.sampled_from(["x", "y"]),
        st.sampled_from(["k0", "k1", "k2"]),
        st.sampled_from(ACCOUNTS),
        st.integers(0, 9),
    ),
    st.builds(
        lambda c, k: Change(c, k, delete=True),
        st.sampled_from(["x", "y"]),
        st.sampled_from(["k0", "k1", "k2"]),
    ),
)
REQUESTS: list[dict[str, Any]] = [
    {"op": "subscribe"},
    {"op": "sync", "live": True},
    {"op": "sync", "live": True, "where": {"acc": "A"}},
    {"op": "sync", "live": True, "collections": ["x"]},
    {"op": "sync", "live": True, "collections": ["y"], "where": {"acc": "B"}},
]
action_st = st.one_of(
    st.tuples(st.just("publish"), st.lists(prop_change_st, min_size=1, max_size=4)),
    st.tuples(st.just("step"), st.integers(0, 3)),
    st.tuples(st.just("flush"), st.none()),
    st.tuples(st.just("join"), st.integers(0, len(REQUESTS) - 1)),
    st.tuples(st.just("leave"), st.integers(0, 7)),
    st.tuples(st.just("hold"), st.integers(0, 7)),
    st.tuples(st.just("restore"), st.integers(0, 7)),
)


def _view_of(state: dict[tuple[str, str], Any], req: dict[str, Any]) -> dict[tuple[str, str], Any]:
    cols, where = req.get("collections"), req.get("where")
    return {
        k: v
        for k, v in state.items()
        if (cols is None or k[0] in cols) and (where is None or v["acc"] == where["acc"])
    }


class _Rig:
    """An engine, the state as the test computes it, and the peers with their copies."""

    def __init__(self) -> None:
        self.engine = new_engine()
        self.state: dict[tuple[str, str], Any] = {}
        self.batch_of: dict[int, int] = {}  # seq -> the seq that ended its batch
        self.peers: list[tuple[Peer, dict[str, Any], dict[tuple[str, str], Any]]] = []
        self.gone: set[int] = set()
        self.last: dict[int, int] = {}  # the last change seq each peer got
        self.batches: dict[int, set[int]] = collections.defaultdict(set)  # each one had

    def publish(self, changes: list[Change]) -> None:
        first = publish(self.engine, *changes) - len(changes) + 1
        for j, c in enumerate(changes):
            self.batch_of[first + j] = first + len(changes) - 1
            if c.delete:
                self.state.pop((c.collection, c.key), None)
            else:
                self.state[(c.collection, c.key)] = c.value

    def join(self, req: dict[str, Any]) -> None:
        peer = Peer(self.engine)
        peer.send(req)
        peer.pump()
        # A plain subscribe starts from the state it has (here: the state now).
        self.peers.append((peer, req, dict(self.state) if req["op"] == "subscribe" else {}))

    def act(self, kind: str, n: int) -> None:
        """leave, hold or restore the n-th peer (modulo), if it is still there."""
        if not self.peers or (i := n % len(self.peers)) in self.gone:
            return
        peer = self.peers[i][0]
        if kind == "leave":
            peer.session.close()
            self.gone.add(i)
        elif kind == "hold":
            peer.session.degrade()
        else:
            peer.session.restore()
        peer.collect()

    def read(self, i: int) -> None:
        peer, _, copy = self.peers[i]
        frames = peer.frames()
        changes = [f for f in frames if f["type"] in ("record", "change")]
        if not any(f["type"] == "conflating" for f in frames) and not peer.session.degraded:
            # Plain delivery: seqs rise, and what a batch brings arrives in one read.
            got = [f["seq"] for f in changes if f["type"] == "change"]
            assert got == sorted(set(got))
            assert not got or got[0] > self.last.get(i, 0)
            batches = {self.batch_of[s] for s in got}
            assert not batches & self.batches[i]
            self.batches[i] |= batches
        for f in changes:
            if f["type"] == "change":
                self.last[i] = f["seq"]
            k = (f["collection"], f["key"])
            if f.get("deleted"):
                copy.pop(k, None)
            else:
                copy[k] = f["value"]

    def read_all(self) -> None:
        for i in range(len(self.peers)):
            if i not in self.gone:
                self.read(i)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action_st, max_size=50))
def test_rolling_writes_keep_every_copy_exact(actions: list[tuple[str, Any]]) -> None:
    rig = _Rig()
    fanout = rig.engine.fanout
    for kind, arg in actions:
        if kind == "publish":
            rig.publish(arg)
        elif kind == "step":
            fanout.step(arg)
        elif kind == "flush":
            fanout.flush()
        elif kind == "join":
            rig.join(REQUESTS[arg])
        else:
            rig.act(kind, arg)
        rig.read_all()
    fanout.flush()
    for i, (peer, req, copy) in enumerate(rig.peers):
        if i not in rig.gone:
            peer.session.restore()
            peer.collect()
            rig.read(i)
            assert copy == _view_of(rig.state, req)
