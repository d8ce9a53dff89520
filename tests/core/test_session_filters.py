"""Where-filtered sync and subscriptions (§3.7), driven with bytes only.

The isolation rule checked throughout: a subscriber never receives a byte about a
record that was never in its view: not its value, not its key, not that it changed.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast.core.engine import Engine
from statecast.core.protocol import Change
from statecast.core.state import Record
from statecast.stores.memory import MemoryStore
from tests.helpers import Frame
from tests.peer import Peer, by_type, new_engine, publish

A = {"account": "A"}


def order(account: str, n: int = 0) -> dict[str, Any]:
    return {"account": account, "n": n}


def test_filtered_sync_sends_only_matching_records_and_no_count() -> None:
    engine = new_engine()
    publish(engine, Change("orders", "o1", order("A")), Change("orders", "o2", order("B")))
    publish(engine, Change("orders", "o3", "not an object"), Change("orders", "o4", {"n": 1}))
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "sync", "where": A, "id": 1})
    peer.pump()
    frames = peer.frames()
    assert frames[0] == {"type": "snapshot_begin", "seq": 4, "epoch": engine.epoch, "id": 1}
    assert [f["key"] for f in by_type(frames, "record")] == ["o1"]
    assert frames[-1] == {"type": "snapshot_end", "seq": 4, "count": 1, "id": 1}


def test_records_move_in_and_out_of_a_live_view() -> None:
    engine = new_engine()
    publish(engine, Change("orders", "o1", order("A")), Change("orders", "o2", order("B")))
    peer = Peer(engine)
    peer.send({"op": "sync", "where": A, "live": True})
    peer.pump()
    peer.frames()
    publish(engine, Change("orders", "o1", order("B", 1)))  # moves out
    publish(engine, Change("orders", "o2", order("A", 2)))  # moves in
    publish(engine, Change("orders", "o9", order("B", 3)))  # never in view
    publish(engine, Change("orders", "o9", delete=True))  # never in view
    publish(engine, Change("orders", "o2", delete=True))  # in view, deleted
    engine.fanout.flush()
    assert peer.frames() == [
        {"type": "change", "seq": 3, "collection": "orders", "key": "o1", "deleted": True},
        {"type": "change", "seq": 4, "collection": "orders", "key": "o2", "value": order("A", 2)},
        {"type": "change", "seq": 7, "collection": "orders", "key": "o2", "deleted": True},
    ]


def test_one_blob_per_distinct_filter_whatever_the_order_of_its_fields() -> None:
    engine = new_engine()
    peers = [Peer(engine) for _ in range(3)]
    peers[0].send({"op": "subscribe", "where": {"account": "A", "desk": "x"}})
    peers[1].send({"op": "subscribe", "where": {"desk": "x", "account": {"in": ["A"]}}})
    peers[2].send({"op": "subscribe", "where": {"account": "B"}})
    assert engine.fanout.views == 2
    publish(engine, Change("o", "1", {"account": "A", "desk": "x"}))
    engine.fanout.flush()
    assert len(by_type(peers[0].frames(), "change")) == 1
    assert len(by_type(peers[1].frames(), "change")) == 1
    assert by_type(peers[2].frames(), "change") == []


def test_resume_sends_moves_that_happened_while_away() -> None:
    engine = new_engine()
    publish(engine, Change("orders", "o1", order("A")), Change("orders", "o2", order("B")))
    publish(engine, Change("orders", "o1", order("B")))  # seq 3: o1 moves out
    publish(engine, Change("orders", "o2", order("B", 5)))  # seq 4: never in view
    publish(engine, Change("orders", "o3", order("A")))  # seq 5: moves in
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "subscribe", "from": 2, "epoch": engine.epoch, "where": A})
    peer.pump()
    assert peer.frames() == [
        {"type": "subscribed", "seq": 2, "epoch": engine.epoch},
        {"type": "change", "seq": 3, "collection": "orders", "key": "o1", "deleted": True},
        {"type": "change", "seq": 5, "collection": "orders", "key": "o3", "value": order("A")},
    ]


def test_filtered_resume_across_a_restart_is_refused_only_when_it_cannot_be_exact() -> None:
    """After a restart, the first logged change of a key does not know the version it
    replaced (Record.before); a filtered resume through such a change that is now
    outside the view cannot tell "moved out" from "never in": resync_required."""
    engine = new_engine()
    store = engine.store
    publish(engine, Change("orders", "o1", order("A")))  # 1
    publish(engine, Change("orders", "o1", order("B")))  # 2: moved out
    publish(engine, Change("orders", "o2", order("A")))  # 3
    # What a store loading its log from disk knows: nothing before the first change
    # of each key in the log.
    for rec in store.log.read(0, 10):
        if rec.seq == 2:
            rec.before = msgspec.UNSET
    store.log.unknown_until = 3
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "subscribe", "from": 1, "epoch": engine.epoch, "where": A, "id": 1})
    (err,) = peer.frames()
    assert err["code"] == "resync_required"
    assert "cannot resume" in err["message"]
    # From seq 2 on, nothing ambiguous is left: it resumes.
    peer.send({"op": "subscribe", "from": 2, "epoch": engine.epoch, "where": A, "id": 2})
    peer.pump()
    frames = peer.frames()
    assert frames[0]["type"] == "subscribed"
    assert [f["key"] for f in frames[1:]] == ["o2"]


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ([1], "where: must be an object"),
        ({"a": {"gt": 1}}, "where.a: unknown operator 'gt'"),
        ({"a": {"in": 1}}, "where.a: 'in' must be a list"),
        ({"a": {"b": 1}}, "where.a"),
        ({"a": [1, 2]}, "where.a"),
        ({"a": {"in": list(range(1001))}}, "where.a"),
    ],
)
def test_malformed_where_is_bad_request_naming_the_field(where: object, fragment: str) -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "subscribe", "where": where, "id": 7})
    (err,) = peer.frames()
    assert err["code"] == "bad_request"
    assert err["id"] == 7
    assert fragment in err["message"]
    assert not peer.session.closing
    assert engine.fanout.subscriber_count == 0


# -- property: every filtered copy equals the filtered model at every seq --------

ACCOUNTS = ["A", "B", "C"]
KEYS = [f"k{i}" for i in range(6)]
FILTERS: list[dict[str, Any] | None] = [
    None,
    {"account": "A"},
    {"account": {"in": ["A", "B"]}},
    {"account": "C", "flag": True},
]

change_st = st.one_of(
    st.builds(
        lambda k, a, f: Change("orders", k, {"account": a, "flag": f}),
        st.sampled_from(KEYS),
        st.sampled_from(ACCOUNTS),
        st.booleans(),
    ),
    st.builds(lambda k: Change("orders", k, delete=True), st.sampled_from(KEYS)),
    st.builds(lambda k: Change("orders", k, [1]), st.sampled_from(KEYS)),  # not an object
)
# A step: publish a batch, or start a subscriber (sync live, or resume from a seq).
step_st = st.one_of(
    st.tuples(st.just("publish"), st.lists(change_st, min_size=1, max_size=3)),
    st.tuples(st.just("sync"), st.sampled_from(range(len(FILTERS)))),
    st.tuples(st.just("resume"), st.sampled_from(range(len(FILTERS)))),
    st.tuples(st.just("flush"), st.none()),
)


def matches(where: dict[str, Any] | None, value: object) -> bool:
    if where is None:
        return True
    if not isinstance(value, dict):
        return False
    for field, cond in where.items():
        if field not in value:
            return False
        allowed = cond["in"] if isinstance(cond, dict) else [cond]
        got = value[field]
        # JSON equality: true is not 1 (the data here holds strings and booleans).
        if not any(got == a and type(got) is type(a) for a in allowed):
            return False
    return True


def view_at(
    history: list[dict[str, object]], seq: int, where: dict[str, Any] | None
) -> dict[str, object]:
    return {k: v for k, v in history[seq].items() if matches(where, v)}


class Follower:
    """A filtered client's copy, checked after every frame."""

    def __init__(
        self, peer: Peer, where: dict[str, Any] | None, seq: int, copy: dict[str, object]
    ) -> None:
        self.peer, self.where, self.seq, self.copy = peer, where, seq, copy

    def check(self, history: list[dict[str, object]]) -> None:
        for f in self.peer.frames():
            self.apply(f, history)

    def apply(self, f: Frame, history: list[dict[str, object]]) -> None:
        if f["type"] == "snapshot_begin":
            self.copy = {}
        elif f["type"] == "record":
            self.copy[f["key"]] = f["value"]
            assert matches(self.where, f["value"]), f
        elif f["type"] == "snapshot_end":
            self.seq = f["seq"]
            assert self.copy == view_at(history, self.seq, self.where)
        elif f["type"] == "change":
            assert f["seq"] > self.seq, (f, self.seq)
            self.seq = f["seq"]
            if f.get("deleted"):
                # A filtered client never gets a delete of a key it never had: that
                # would leak the key. (Without a filter, every change comes, deletes
                # of missing keys too.)
                assert self.where is None or f["key"] in self.copy, f
                self.copy.pop(f["key"], None)
            else:
                assert matches(self.where, f["value"]), f
                self.copy[f["key"]] = f["value"]
            assert self.copy == view_at(history, self.seq, self.where), f
        elif f["type"] == "subscribed":
            assert f["seq"] == self.seq
        else:
            raise AssertionError(f"unexpected frame {f}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_st, min_size=1, max_size=40))
def test_every_filtered_copy_equals_the_filtered_state(steps: list[tuple[str, Any]]) -> None:
    engine = Engine(MemoryStore(1000))
    history: list[dict[str, object]] = [{}]  # the model state at each seq
    followers: list[Follower] = []
    for kind, arg in steps:
        if kind == "publish":
            publish(engine, *arg)
            for c in arg:
                state = dict(history[-1])
                if c.delete:
                    state.pop(c.key, None)
                else:
                    state[c.key] = c.value
                history.append(state)
        elif kind == "sync":
            peer = Peer(engine)
            peer.frames()
            where = FILTERS[arg]
            peer.send({"op": "sync", "live": True, **({"where": where} if where else {})})
            peer.pump()
            followers.append(Follower(peer, where, 0, {}))
        elif kind == "resume" and followers:
            # A client that had the view at some earlier seq resumes from there.
            old = followers[len(history) % len(followers)]
            seq = old.seq
            peer = Peer(engine)
            peer.frames()
            req: dict[str, Any] = {"op": "subscribe", "from": seq, "epoch": engine.epoch}
            if old.where:
                req["where"] = old.where
            peer.send(req)
            peer.pump()
            followers.append(Follower(peer, old.where, seq, view_at(history, seq, old.where)))
        else:
            engine.fanout.flush()
        for f in followers:
            f.check(history)
    engine.fanout.flush()
    for f in followers:
        f.check(history)
        assert f.seq <= len(history) - 1
        # Changes after its last frame were all outside its view: its copy is current.
        assert f.copy == view_at(history, len(history) - 1, f.where)


def test_record_before_is_the_replaced_version_and_is_dropped_with_the_log() -> None:
    engine = new_engine(retain=2)
    publish(engine, Change("c", "k", 1))
    publish(engine, Change("c", "k", 2))
    first, second = engine.store.log.read(0, 2)
    assert first.before is None
    assert second.before is first
    publish(engine, Change("c", "k", 3))  # the first change falls out of the log
    assert first.before is msgspec.UNSET
    assert isinstance(second.before, Record)
