from __future__ import annotations

from collections.abc import Callable

import msgspec

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
