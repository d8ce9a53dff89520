"""Conflated subscriptions (§3.9) and the conflating slow-consumer policy (§7), with
bytes and objects only: emissions are driven by hand (``emit_conflated``)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast.core.engine import Engine
from statecast.core.protocol import Change
from statecast.stores.memory import MemoryStore
from tests.helpers import Frame
from tests.peer import Peer, by_type, new_engine, publish


def test_one_frame_per_key_per_interval_with_the_newest_value() -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "subscribe", "conflate": 0.1, "id": 1})
    assert peer.frames() == [
        {"type": "subscribed", "seq": 0, "epoch": engine.epoch, "id": 1, "conflate": 0.1}
    ]
    for i in range(100):
        publish(engine, Change("quotes", "NVDA", {"bid": i}), Change("quotes", "AAPL", i))
        engine.fanout.flush()
    assert peer.frames() == []  # nothing until the interval is over
    engine.fanout.emit_conflated()
    assert peer.frames() == [
        {"type": "change", "seq": 199, "collection": "quotes", "key": "NVDA", "value": {"bid": 99}},
        {"type": "change", "seq": 200, "collection": "quotes", "key": "AAPL", "value": 99},
    ]
    engine.fanout.emit_conflated()
    assert peer.frames() == []


def test_deletes_are_never_lost_and_keys_that_came_and_went_never_show() -> None:
    engine = new_engine()
    publish(engine, Change("c", "a", 1), Change("c", "b", 1))
    peer = Peer(engine)
    peer.send({"op": "sync", "live": True, "conflate": 1})
    peer.pump()
    assert peer.frames()[-1]["conflate"] == 1
    publish(engine, Change("c", "a", delete=True))  # deleted
    publish(engine, Change("c", "b", delete=True), Change("c", "b", 2))  # deleted, re-created
    publish(engine, Change("c", "x", 1), Change("c", "x", delete=True))  # came and went
    engine.fanout.flush()
    engine.fanout.emit_conflated()
    assert peer.frames() == [
        {"type": "change", "seq": 3, "collection": "c", "key": "a", "deleted": True},
        {"type": "change", "seq": 5, "collection": "c", "key": "b", "value": 2},
    ]


def test_a_conflated_filtered_subscriber_sees_exactly_its_view() -> None:
    """A Centrifugo bug let filtered subscribers on delta streams receive every
    publication: here a conflated filtered stream carries nothing outside the view, and a
    record that moved out still arrives as a delete."""
    engine = new_engine()
    publish(engine, Change("o", "1", {"acc": "A"}), Change("o", "2", {"acc": "B"}))
    peer = Peer(engine)
    peer.send({"op": "sync", "live": True, "conflate": 0.5, "where": {"acc": "A"}})
    peer.pump()
    assert [f["key"] for f in by_type(peer.frames(), "record")] == ["1"]
    publish(engine, Change("o", "1", {"acc": "B"}))  # moves out
    publish(engine, Change("o", "2", {"acc": "B", "n": 1}))  # never in view
    publish(engine, Change("o", "3", {"acc": "A"}), Change("o", "3", {"acc": "B"}))  # in, out
    engine.fanout.flush()
    engine.fanout.emit_conflated()
    assert peer.frames() == [
        {"type": "change", "seq": 3, "collection": "o", "key": "1", "deleted": True}
    ]


def test_a_subscriber_joining_mid_interval_gets_nothing_it_already_has() -> None:
    engine = new_engine()
    first = Peer(engine)
    first.send({"op": "subscribe", "conflate": 0.2})
    publish(engine, Change("c", "k", 1))
    engine.fanout.flush()  # the first one's interval has begun
    second = Peer(engine)
    second.frames()
    second.send({"op": "subscribe", "conflate": 0.2})
    second.frames()
    publish(engine, Change("c", "j", 2))
    engine.fanout.flush()
    engine.fanout.emit_conflated()
    assert [f["key"] for f in by_type(first.frames(), "change")] == ["k", "j"]
    assert [f["key"] for f in by_type(second.frames(), "change")] == ["j"]
    publish(engine, Change("c", "z", 3))
    engine.fanout.flush()
    engine.fanout.emit_conflated()  # merged: one blob for both now
    assert by_type(first.frames(), "change") == by_type(second.frames(), "change")


def test_bad_conflate_values_are_bad_requests() -> None:
    peer = Peer(new_engine())
    peer.frames()
    for req in (
        {"op": "subscribe", "conflate": 0},
        {"op": "subscribe", "conflate": 3600},
        {"op": "sync", "conflate": 1},
        {"op": "subscribe", "conflate": "fast"},
    ):
        peer.send(req)
        (err,) = peer.frames()
        assert err["code"] == "bad_request", req


def test_a_slow_subscriber_is_conflated_until_it_drains_then_gets_every_change() -> None:
    engine = new_engine()
    publish(engine, Change("q", "a", 0))
    peer = Peer(engine)
    peer.send({"op": "subscribe"})
    peer.frames()
    assert peer.session.degrade()
    peer.collect()
    assert peer.frames() == [{"type": "conflating", "on": True}]
    for i in range(1, 50):
        publish(engine, Change("q", "a", i), Change("q", "b", i))
        engine.fanout.flush()
    assert peer.frames() == []
    peer.session.restore()  # drained: what was held, then every change again
    peer.collect()
    assert peer.frames() == [
        {"type": "change", "seq": 98, "collection": "q", "key": "a", "value": 49},
        {"type": "change", "seq": 99, "collection": "q", "key": "b", "value": 49},
        {"type": "conflating", "on": False},
    ]
    publish(engine, Change("q", "a", 50))
    engine.fanout.flush()
    assert [f["seq"] for f in peer.frames()] == [100]


# -- property ------------------------------------------------------------------------

KEYS = ["k0", "k1", "k2", "k3"]
change_st = st.one_of(
    st.builds(
        lambda k, a, n: Change("c", k, {"acc": a, "n": n}),
        st.sampled_from(KEYS),
        st.sampled_from(["A", "B"]),
        st.integers(0, 3),
    ),
    st.builds(lambda k: Change("c", k, delete=True), st.sampled_from(KEYS)),
)
step_st = st.one_of(
    st.tuples(st.just("publish"), st.lists(change_st, min_size=1, max_size=3)),
    st.tuples(st.just("flush"), st.none()),
    st.tuples(st.just("emit"), st.none()),
)


def visible(state: dict[str, Any], where: dict[str, Any] | None) -> dict[str, Any]:
    if where is None:
        return dict(state)
    return {k: v for k, v in state.items() if isinstance(v, dict) and v.get("acc") == where["acc"]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_st, max_size=40), st.sampled_from([None, {"acc": "A"}]))
def test_a_conflated_copy_is_the_state_after_every_blob(
    steps: list[tuple[str, Any]], where: dict[str, Any] | None
) -> None:
    """After each blob, a conflated copy equals the (filtered) state at the last flushed
    seq: never half a batch, never a value older than one it showed, never a key
    outside its view; at the end it equals the state."""
    engine = Engine(MemoryStore(1000))
    peer = Peer(engine)
    peer.frames()
    req: dict[str, Any] = {"op": "subscribe", "conflate": 0.1}
    if where:
        req["where"] = where
    peer.send(req)
    peer.frames()
    history: list[dict[str, Any]] = [{}]
    copy: dict[str, Any] = {}
    last_seq: dict[str, int] = {}
    for kind, arg in [*steps, ("flush", None), ("emit", None)]:
        if kind == "publish":
            publish(engine, *arg)
            for c in arg:
                state = dict(history[-1])
                if c.delete:
                    state.pop(c.key, None)
                else:
                    state[c.key] = c.value
                history.append(state)
        elif kind == "flush":
            engine.fanout.flush()
        else:
            engine.fanout.emit_conflated()
            frames: list[Frame] = peer.frames()
            seqs = [f["seq"] for f in frames]
            assert seqs == sorted(set(seqs))
            for f in frames:
                assert f["seq"] > last_seq.get(f["key"], 0)  # never older than shown
                last_seq[f["key"]] = f["seq"]
                if f.get("deleted"):
                    assert f["key"] in copy  # never a key it did not have
                    del copy[f["key"]]
                else:
                    copy[f["key"]] = f["value"]
            assert copy == visible(history[engine.fanout.flushed_seq], where)
    assert copy == visible(history[-1], where)
