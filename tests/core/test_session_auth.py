"""Access control in the session (§3.8), driven with bytes only: the grant of a token
decides what a connection may sync, subscribe to and publish, and for how long."""

from __future__ import annotations

from typing import Any

import pytest

from statecast.core.frames import RequestId
from statecast.core.policy import Grant
from statecast.core.protocol import Change
from statecast.core.session import Limits
from statecast.errors import TooManyConnections, Unauthorized
from tests.peer import Peer, by_type, new_engine, publish

ALICE = Grant(
    sub="alice",
    read=frozenset({"orders", "positions"}),
    publish=frozenset(),
    where={"account": "A"},
    exp=1000.0,
)
ENGINE = Grant(sub="engine", read=None, publish=frozenset({"orders"}), where=None, exp=1000.0)
RISK = Grant(sub="risk", read=None, publish=frozenset(), where=None, exp=1000.0)


class FakeVerifier:
    """Tokens are grant names; ``now`` is the test's clock."""

    def __init__(self) -> None:
        self.grants = {
            "alice": ALICE,
            "engine": ENGINE,
            "risk": RISK,
            "alice-later": Grant(
                sub="alice",
                read=frozenset({"orders", "positions"}),
                publish=frozenset(),
                where={"account": "A"},
                exp=5000.0,
            ),
            "alice-wider": Grant(sub="alice", read=None, publish=None, where=None, exp=5000.0),
            "bob": Grant(sub="bob", read=None, publish=None, where=None, exp=5000.0),
        }

    def verify(self, token: object, now: float | None = None, *, rid: RequestId = None) -> Grant:
        grant = self.grants.get(str(token))
        if grant is None:
            raise Unauthorized("invalid token", request_id=rid)
        if now is not None and grant.expired(now):
            raise Unauthorized("token expired", request_id=rid)
        return grant


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def authed_peer(token: str | None, clock: Clock | None = None, **options: Any) -> Peer:
    engine = options.pop("engine", None) or new_engine()
    clock = clock or Clock()
    peer = Peer(engine, auth=FakeVerifier(), now=clock, monotonic=clock, **options)
    peer.frames()  # hello
    if token is not None:
        peer.send({"op": "auth", "token": token, "id": "a"})
    return peer


def test_authed_frame_says_what_the_token_grants() -> None:
    peer = authed_peer("alice")
    assert peer.frames() == [
        {
            "type": "authed",
            "sub": "alice",
            "read": ["orders", "positions"],
            "where": {"account": "A"},
            "publish": [],
            "exp": 1000,
            "id": "a",
        }
    ]


@pytest.mark.parametrize(
    "first",
    [b"sync\n", b'{"op":"ping"}\n', b'{"op":"publish","changes":[]}\n', b"nonsense\n"],
)
def test_anything_before_auth_is_unauthorized_and_closes(first: bytes) -> None:
    peer = authed_peer(None)
    peer.send(first)
    (err,) = peer.frames()
    assert err["code"] == "unauthorized"
    assert "authenticate first" in err["message"]
    assert peer.session.closing


def test_a_bad_token_is_unauthorized_and_closes() -> None:
    peer = authed_peer("forged")
    (err,) = peer.frames()
    assert err == {"type": "error", "code": "unauthorized", "message": "invalid token", "id": "a"}
    assert peer.session.closing


def test_a_malformed_auth_is_bad_request_naming_the_field() -> None:
    peer = authed_peer(None)
    peer.send({"op": "auth", "token": 12})
    (err,) = peer.frames()
    assert err["code"] == "bad_request"
    assert "$.token" in err["message"]
    assert not peer.session.closing  # it may still authenticate (within auth_timeout)


def test_the_token_where_is_anded_into_every_sync_and_cannot_be_widened() -> None:
    engine = new_engine()
    publish(
        engine,
        Change("orders", "o1", {"account": "A", "side": "buy"}),
        Change("orders", "o2", {"account": "B", "side": "buy"}),
        Change("orders", "o3", {"account": "A", "side": "sell"}),
        Change("quotes", "q1", {"account": "A"}),
    )
    peer = authed_peer("alice", engine=engine)
    peer.frames()
    # Asking for more (another account, every collection) still gets only its view.
    peer.send({"op": "sync", "where": {"account": {"in": ["A", "B"]}}})
    peer.pump()
    assert [f["key"] for f in by_type(peer.frames(), "record")] == ["o1", "o3"]
    peer.send({"op": "sync", "where": {"side": "sell"}})
    peer.pump()
    assert [f["key"] for f in by_type(peer.frames(), "record")] == ["o3"]
    peer.send({"op": "sync", "where": {"account": "B"}})  # disjoint: nothing at all
    peer.pump()
    assert by_type(peer.frames(), "record") == []


def test_reading_a_collection_outside_the_claims_is_forbidden() -> None:
    peer = authed_peer("alice")
    peer.frames()
    peer.send({"op": "subscribe", "collections": ["quotes"], "id": 2})
    (err,) = peer.frames()
    assert err["code"] == "forbidden"
    assert "quotes" in err["message"]
    assert not peer.session.closing


def test_publishing_outside_the_claims_is_forbidden_and_applies_nothing() -> None:
    engine = new_engine()
    alice = authed_peer("alice", engine=engine)
    alice.frames()
    alice.send({"op": "publish", "changes": [{"collection": "orders", "key": "x", "value": 1}]})
    assert alice.frames()[0]["code"] == "forbidden"
    eng = authed_peer("engine", engine=engine)
    eng.frames()
    eng.send(
        {
            "op": "publish",
            "id": 9,
            "changes": [
                {"collection": "orders", "key": "x", "value": 1},
                {"collection": "positions", "key": "y", "value": 1},
            ],
        }
    )
    (err,) = eng.frames()
    assert err["code"] == "forbidden"
    assert "positions" in err["message"]
    assert engine.seq == 0  # nothing of the batch
    eng.send({"op": "publish", "changes": [{"collection": "orders", "key": "x", "value": 1}]})
    assert eng.frames()[0]["type"] == "ack"


def test_stats_only_for_a_token_that_reads_everything() -> None:
    peer = authed_peer("alice")
    peer.frames()
    peer.send({"op": "stats", "id": 1})
    assert peer.frames()[0]["code"] == "forbidden"


def test_expiry_closes_with_token_expired_unless_refreshed() -> None:
    clock = Clock()
    peer = authed_peer("alice", clock)
    peer.frames()
    peer.send({"op": "subscribe"})
    peer.frames()
    clock.now = 999.0
    peer.tick()
    assert peer.frames() == []
    peer.send({"op": "auth", "token": "alice-later", "id": "r"})  # refresh: same sub
    assert peer.frames()[0]["exp"] == 5000
    clock.now = 1500.0
    peer.tick()
    assert peer.frames() == []
    assert not peer.session.closing
    clock.now = 5000.0
    peer.tick()
    (err,) = peer.frames()
    assert err["code"] == "token_expired"
    assert peer.session.closing


@pytest.mark.parametrize(("token", "code"), [("bob", "forbidden"), ("alice-wider", "forbidden")])
def test_a_refresh_may_not_change_sub_or_widen(token: str, code: str) -> None:
    peer = authed_peer("alice")
    peer.frames()
    peer.send({"op": "auth", "token": token})
    (err,) = peer.frames()
    assert err["code"] == code
    assert not peer.session.closing
    assert peer.session.grant is ALICE


def test_auth_timeout() -> None:
    clock = Clock()
    peer = authed_peer(None, clock, limits=Limits(auth_timeout=5))
    clock.now += 4
    peer.tick()
    assert peer.frames() == []
    clock.now += 1
    peer.tick()
    (err,) = peer.frames()
    assert err["code"] == "unauthorized"
    assert "no auth within 5s" in err["message"]
    assert peer.session.closing


def test_connections_per_user_are_admitted_and_released() -> None:
    admitted: list[str] = []

    def admit(grant: Grant) -> None:
        if admitted.count(grant.sub) >= 1:
            raise TooManyConnections(f"{grant.sub!r} already has 1 connection")
        admitted.append(grant.sub)

    def release(grant: Grant) -> None:
        admitted.remove(grant.sub)

    first = authed_peer("alice", admit=admit, release=release)
    second = authed_peer("alice", admit=admit, release=release)
    (err,) = second.frames()
    assert err["code"] == "too_many_connections"
    assert second.session.closing
    first.session.close()
    assert admitted == []


def test_rate_limit_refuses_requests_beyond_the_bucket() -> None:
    clock = Clock()
    peer = authed_peer(None, clock, limits=Limits(rate=2.0, burst=3))
    peer.send({"op": "auth", "token": "risk"})
    peer.frames()
    peer.send(b'{"op":"ping","id":1}\n{"op":"ping","id":2}\n{"op":"ping","id":3}\n')
    frames = peer.frames()
    assert [f["type"] for f in frames] == ["pong", "pong", "error"]
    assert frames[2]["code"] == "rate_limited"
    assert frames[2]["id"] == 3
    clock.now += 1.0  # two more tokens
    peer.send(b'{"op":"ping"}\n{"op":"ping"}\n{"op":"ping"}\n')
    assert [f["type"] for f in peer.frames()] == ["pong", "pong", "error"]


def test_limits_on_a_publish() -> None:
    peer = authed_peer(None, limits=Limits(max_changes=2, max_value=10))
    peer.send({"op": "auth", "token": "engine"})
    peer.frames()
    three = [{"collection": "orders", "key": str(i), "value": i} for i in range(3)]
    peer.send({"op": "publish", "changes": three})
    err = peer.frames()[0]
    assert err["code"] == "too_large"
    assert "at most 2" in err["message"]
    peer.send(
        {"op": "publish", "changes": [{"collection": "orders", "key": "k", "value": "x" * 20}]}
    )
    err = peer.frames()[0]
    assert err["code"] == "too_large"
    assert "changes[0]" in err["message"]
    assert peer.session._engine.seq == 0


def test_without_auth_the_auth_op_is_a_bad_request() -> None:
    peer = Peer(new_engine())
    peer.frames()
    peer.send({"op": "auth", "token": "x"})
    assert peer.frames()[0]["code"] == "bad_request"
