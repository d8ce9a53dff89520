from __future__ import annotations

from statecast.core.fanout import Fanout
from statecast.core.protocol import Change, prepare_changes
from statecast.core.state import State
from statecast.core.view import View
from tests.helpers import FakeSubscriber


def test_one_blob_per_group_per_flush_shared_by_all() -> None:
    scheduled: list[object] = []
    fan = Fanout(scheduled.append)
    state = State()
    subs = [FakeSubscriber() for _ in range(5)]
    for s in subs:
        fan.join(s, View())
    fan.publish(state.apply(prepare_changes([Change("a", "1", 1), Change("b", "1", 2)])))
    fan.publish(state.apply(prepare_changes([Change("a", "2", 3)])))
    assert scheduled == [fan.flush]  # one flush scheduled for both publishes
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
