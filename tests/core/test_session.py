"""The per-connection protocol core, driven with bytes only (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from statecast.core.protocol import Change
from statecast.core.session import Limits
from tests.peer import Peer, by_type, new_engine, publish


def test_hello_first() -> None:
    engine = new_engine()
    publish(engine, Change("a", "1", 1))
    (hello,) = Peer(engine).frames()
    assert hello == {
        "type": "hello",
        "server": "statecast",
        "version": "test",
        "protocol": 1,
        "epoch": engine.epoch,
        "seq": 1,
    }


def test_hello_says_the_heartbeat_period() -> None:
    """§2, §4.3: with heartbeats on, the hello says how often, so that a client can tell
    a connection that went silent; with them off, the field is left out (above)."""
    (hello,) = Peer(new_engine(), limits=Limits(heartbeat=10.0)).frames()
    assert hello["heartbeat"] == 10.0


def test_sync_streams_in_steps_and_ends_with_count() -> None:
    engine = new_engine()
    for i in range(1000):
        publish(engine, Change("a", f"k{i}", i))
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "sync", "id": "s1"})
    assert peer.frames() == [
        {"type": "snapshot_begin", "seq": 1000, "epoch": engine.epoch, "id": "s1", "count": 1000}
    ]
    steps = 0
    while peer.session.streaming:
        peer.session.pump(500)
        peer.collect()
        steps += 1
    assert steps > 1
    frames = peer.frames()
    assert len(by_type(frames, "record")) == 1000
    assert frames[-1] == {"type": "snapshot_end", "seq": 1000, "count": 1000, "id": "s1"}


def test_requests_wait_for_the_stream_and_are_answered_in_order() -> None:
    engine = new_engine()
    for i in range(50):
        publish(engine, Change("a", f"k{i}", i))
    peer = Peer(engine)
    peer.frames()
    peer.send(b'sync\n{"op":"ping","id":2}\n')
    peer.pump(100)
    types = [f["type"] for f in peer.frames()]
    assert types[0] == "snapshot_begin"
    assert types[-2:] == ["snapshot_end", "pong"]


def test_live_sync_has_no_gap_and_no_duplicate() -> None:
    engine = new_engine()
    for i in range(200):
        publish(engine, Change("a", f"k{i}", i))
    peer = Peer(engine)
    peer.send({"op": "sync", "live": True})
    # Changes land while the snapshot streams: they must come after it, once each.
    while peer.session.streaming:
        peer.session.pump(300)
        peer.collect()
        publish(engine, Change("a", "k0", "x"), Change("b", "new", 1))
        engine.fanout.flush()
    for i in range(5):
        publish(engine, Change("a", f"later{i}", i))
    engine.fanout.flush()
    frames = peer.frames()
    end = next(f for f in frames if f["type"] == "snapshot_end")
    assert end["seq"] == 200
    changes = by_type(frames, "change")
    assert [c["seq"] for c in changes] == list(range(201, engine.seq + 1))
    assert peer.session.joined


def test_subscribe_from_catches_up_then_goes_live() -> None:
    engine = new_engine()
    for i in range(30):
        publish(engine, Change("a", f"k{i}", i))
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "subscribe", "from": 10, "epoch": engine.epoch, "id": 1})
    peer.pump()
    publish(engine, Change("a", "z", 0))
    engine.fanout.flush()
    frames = peer.frames()
    assert frames[0] == {"type": "subscribed", "seq": 10, "epoch": engine.epoch, "id": 1}
    assert [f["seq"] for f in frames[1:]] == list(range(11, 32))


def test_subscribe_now_and_filter() -> None:
    engine = new_engine()
    publish(engine, Change("a", "1", 1))
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "subscribe", "collections": ["b"]})
    publish(engine, Change("a", "2", 2), Change("b", "1", 3))
    engine.fanout.flush()
    frames = peer.frames()
    assert frames[0]["type"] == "subscribed"
    assert frames[0]["seq"] == 1
    assert frames[1:] == [{"type": "change", "seq": 3, "collection": "b", "key": "1", "value": 3}]


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        ({"op": "subscribe", "from": 1, "id": 4}, "no longer retained"),
        ({"op": "subscribe", "epoch": "other", "id": 4}, "not this server's history"),
        ({"op": "subscribe", "from": 999, "id": 4}, "ahead of this server"),
    ],
)
def test_resync_required_keeps_the_connection_usable(
    request_: dict[str, Any], fragment: str
) -> None:
    engine = new_engine(retain=5)
    for i in range(20):
        publish(engine, Change("a", f"k{i}", i))
    peer = Peer(engine)
    peer.frames()
    peer.send(request_)
    (err,) = peer.frames()
    assert err["type"] == "error"
    assert err["code"] == "resync_required"
    assert err["id"] == 4
    assert fragment in err["message"]
    assert not peer.session.closing
    peer.send({"op": "subscribe", "from": 15})  # still allowed: the first one failed
    peer.pump()
    assert [f["seq"] for f in peer.frames()] == [15, 16, 17, 18, 19, 20]


def test_second_live_subscription_is_refused() -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    peer.send(b"watch\n")
    peer.pump()
    peer.send({"op": "subscribe", "id": 2})
    peer.send({"op": "sync", "live": True, "id": 3})
    peer.send({"op": "sync", "id": 4})  # a plain sync may be repeated
    peer.pump()
    frames = peer.frames()
    errors = by_type(frames, "error")
    assert [(e["code"], e["id"]) for e in errors] == [("bad_request", 2), ("bad_request", 3)]
    assert by_type(frames, "snapshot_end")[-1]["id"] == 4


def test_publish_acks_and_invalid_batch_applies_nothing() -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    peer.send(
        {
            "op": "publish",
            "id": 1,
            "changes": [
                {"collection": "o", "key": "1", "value": {"q": 1}},
                {"collection": "o", "key": "2", "value": 2},
            ],
        }
    )
    peer.send(
        {
            "op": "publish",
            "id": 2,
            "changes": [
                {"collection": "o", "key": "3", "value": 3},
                {"collection": "o", "key": ""},
            ],
        }
    )
    ack, err = peer.frames()
    assert ack == {"type": "ack", "seq": 2, "id": 1}
    assert err["code"] == "bad_request"
    assert err["id"] == 2
    assert engine.seq == 2
    assert engine.store.state.get("o", "3") is None


def test_bad_input_gets_errors_and_the_connection_lives_on() -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    peer.send(b'nonsense\n{"op":\n\xff\xfe\xfd\n{"op":"sync","collections":"a"}\n\n  \nping\n')
    frames = peer.frames()
    assert [f["type"] for f in frames] == ["error", "error", "error", "error", "pong"]
    assert all(f["code"] == "bad_request" for f in frames[:4])
    assert not peer.session.closing


def test_oversized_line_closes_after_too_large() -> None:
    engine = new_engine()
    peer = Peer(engine, max_line=1024)
    peer.frames()
    peer.send(b"ping\n" + b"x" * 2000)
    frames = peer.frames()
    assert [f["type"] for f in frames] == ["pong", "error"]
    assert frames[1]["code"] == "too_large"
    assert peer.session.closing
    peer.send(b"\nping\n")
    assert peer.frames() == []


def test_catch_up_that_falls_out_of_the_log_is_a_slow_consumer() -> None:
    engine = new_engine(retain=50)
    for i in range(40):
        publish(engine, Change("a", f"k{i}", i))
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "subscribe", "from": 0})
    for i in range(100):  # the log moves on before the catch-up reads anything
        publish(engine, Change("a", f"k{i}", i))
    engine.fanout.flush()
    peer.pump()
    frames = peer.frames()
    assert frames[-1]["code"] == "slow_consumer"
    assert peer.session.closing
    assert engine.fanout.subscriber_count == 0


def test_close_releases_snapshot_and_subscription() -> None:
    engine = new_engine()
    for i in range(500):
        publish(engine, Change("a", f"k{i}", i))
    syncing, live = Peer(engine), Peer(engine)
    syncing.send(b"sync\n")
    syncing.session.pump(100)
    live.send(b"subscribe\n")
    assert engine.store.state.open_snapshots == 1
    assert engine.fanout.subscriber_count == 1
    syncing.session.close()
    live.session.close()
    assert engine.store.state.open_snapshots == 0
    assert engine.fanout.subscriber_count == 0


def test_shutdown_says_bye() -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    peer.send(b"watch\n")
    peer.pump()
    peer.session.shutdown()
    peer.collect()
    assert peer.frames()[-1] == {"type": "bye", "reason": "shutdown"}
    assert peer.session.closing
    assert engine.fanout.subscriber_count == 0
