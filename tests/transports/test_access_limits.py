"""Limits on what one user or connection may ask (docs/protocol.md §7, §3.8), over
real sockets: each is answered with its own error code, counted in ``/metrics``, and
leaves every other connection served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, cast

import msgspec
import pytest
import yarl

from statecast import Change, Server
from tests.helpers import TIMEOUT, Frame
from tests.transports.test_access import (
    KINDS,
    Clients,
    Conn,
    Kind,
    admin_token,
    embedded,
    is_key,
    token,
)


def metric(text: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def metrics(clients: Clients) -> str:
    status, _, body = await clients.get("/metrics")
    assert status == 200
    return body.decode()


def limit_hits(text: str, limit: str) -> float:
    return metric(text, f'statecast_limit_hits_total{{limit="{limit}"}}')


def errors(text: str, code: str) -> float:
    return metric(text, f'statecast_errors_total{{code="{code}"}}')


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    settings: dict[str, Any] = getattr(request, "param", {})
    srv = embedded(**settings)
    try:
        yield srv
    finally:
        srv.stop_in_thread(timeout=30)


def settings(**kw: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("server", [kw], indirect=True)


async def open_or_refused(clients: Clients, kind: Kind, tok: str) -> Conn | None:
    """An authenticated connection, or None if it got too_many_connections and was
    closed."""
    if kind == "ws-header":
        conn = await clients.raw(kind, bearer=tok)
        first = await conn.frame()
    else:
        conn = await clients.raw(kind)
        first = await conn.request({"op": "auth", "token": tok, "id": "a"})
    if first["type"] == "authed":
        return conn
    assert first["type"] == "error", first
    assert first["code"] == "too_many_connections", first
    assert await conn.closed_by_server()
    return None


async def admitted(clients: Clients, kind: Kind, tok: str) -> Conn:
    """A connection that is admitted, trying again while it is refused (the server
    releases a closed connection's place once it has seen the close)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    for _ in range(int(TIMEOUT / 0.02)):
        conn = await open_or_refused(clients, kind, tok)
        if conn is not None:
            return conn
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    raise AssertionError("never admitted")


# ---------------------------------------------------------------------------
# Connections per user


@settings(max_connections_per_user=2)
@pytest.mark.parametrize("kind", KINDS)
def test_connections_per_user(server: Server, kind: Kind) -> None:
    async def main() -> None:
        async with Clients.of(server) as clients:
            alice = token("alice")
            first = await open_or_refused(clients, "tcp", alice)
            second = await open_or_refused(clients, "ws-auth", alice)
            assert first is not None
            assert second is not None
            assert await open_or_refused(clients, kind, alice) is None
            # Others are not affected, and the two keep working.
            bob = [await open_or_refused(clients, k, token("bob")) for k in ("tcp", "ws-header")]
            assert None not in bob
            for conn in (first, second):
                assert (await conn.request({"op": "ping"}))["type"] == "pong"
            # After one closes, one new connection is admitted, and only one.
            await first.close()
            third = await admitted(clients, kind, alice)  # once the server saw the close
            assert (await third.request({"op": "ping"}))["type"] == "pong"
            assert await open_or_refused(clients, "tcp", alice) is None
            text = await metrics(clients)
            assert limit_hits(text, "connections_per_user") >= 2
            assert errors(text, "too_many_connections") == limit_hits(text, "connections_per_user")

    asyncio.run(main())


@settings(max_connections_per_user=2)
def test_refreshes_do_not_count_and_expired_connections_are_released(server: Server) -> None:
    async def main() -> None:
        async with Clients.of(server) as clients:
            short = token("carol", ttl=2)
            conn = await open_or_refused(clients, "tcp", short)
            assert conn is not None
            for _ in range(3):  # a refresh is not a new connection
                authed = await conn.request({"op": "auth", "token": token("carol", ttl=2)})
                assert authed["type"] == "authed"
            other = await open_or_refused(clients, "ws-auth", short)
            assert other is not None
            assert await open_or_refused(clients, "tcp", token("carol")) is None
            # Both end with their tokens; then their places are free again.
            for c in (conn, other):
                assert [f["code"] for f in await c.rest()] == ["token_expired"]
            a = await admitted(clients, "tcp", token("carol"))
            b = await open_or_refused(clients, "ws-header", token("carol"))
            assert a is not None
            assert b is not None
            assert await open_or_refused(clients, "ws-auth", token("carol")) is None

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Publish size


def change(key: str, val: object) -> Frame:
    return {"collection": "orders", "key": key, "value": val}


@settings(max_changes=3, max_value=100)
@pytest.mark.parametrize("kind", [*KINDS, "http"])
def test_publish_size_limits(server: Server, kind: str) -> None:
    fits = {"p": "x" * 92}  # 100 bytes as stored
    too_big = {"p": "x" * 93}  # 101
    assert len(msgspec.json.encode(fits)) == 100
    refused_batches: list[tuple[list[Frame], str, str]] = [
        ([change(f"k{i}", i) for i in range(4)], "max_changes", "at most 3"),
        ([change("a", 1), change("b", too_big)], "max_value", "changes[1]"),
        ([change("a", "y" * 99)], "max_value", "changes[0]"),
    ]

    async def publish(clients: Clients, conn: Conn | None, body: Frame) -> Frame:
        if conn is None:
            status, _, data = await clients.post("/v1/publish", body, admin_token())
            answer: Frame = json.loads(data)
            assert status == (200 if answer["type"] == "ack" else 413), data
            return answer
        return await conn.request({"op": "publish", **body})

    async def main() -> None:
        async with Clients.of(server) as clients:
            conn = None if kind == "http" else await clients.open(cast(Kind, kind), admin_token())
            seq = server.seq
            for changes, limit, fragment in refused_batches:
                before = limit_hits(await metrics(clients), limit)
                err = await publish(clients, conn, {"changes": changes, "id": 5})
                assert err["type"] == "error", err
                assert err["code"] == "too_large", err
                assert fragment in err["message"], err
                assert limit_hits(await metrics(clients), limit) == before + 1
                assert server.seq == seq  # nothing of the batch
            # Within the limits: three changes, a value of exactly 100 bytes, and a
            # pretty-printed one that is 100 bytes once compact.
            ok = await publish(
                clients,
                conn,
                {"changes": [change("a", fits), change("b", 2), change("c", 3)]},
            )
            assert ok["type"] == "ack", ok
            assert server.seq == seq + 3
            if conn is not None:  # still open
                assert (await conn.request({"op": "ping"}))["seq"] == seq + 3
                spaced = b'{"op":"publish","changes":[{"collection":"orders","key":"d",'
                spaced += b'"value":{ "p" :  "' + b"x" * 92 + b'" }}]}\n'
                await conn.send(spaced)
                assert (await conn.frame())["type"] == "ack"
            state = await clients.full_state()
            assert ("orders", "k0") not in state
            assert ("orders", "a") in state

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Auth timeout


@settings(auth_timeout=1)
def test_silent_connections_are_closed_after_the_auth_timeout(server: Server) -> None:
    async def main() -> None:
        async with Clients.of(server) as clients:
            authed = await clients.open("tcp", token())
            await authed.send({"op": "subscribe"})
            assert (await authed.frame())["type"] == "subscribed"
            silent = [await clients.raw("tcp"), await clients.raw("ws-auth")]
            partial = await clients.raw("tcp")
            await partial.send(b'{"op":"auth","tok')  # never finished
            malformed = await clients.raw("ws-auth")
            assert (await malformed.request({"op": "auth", "token": 1}))["code"] == "bad_request"
            for conn in [*silent, partial, malformed]:
                frames = await conn.rest()
                assert [f["code"] for f in frames] == ["unauthorized"], frames
                assert "no auth within 1s" in frames[0]["message"]
            # The authenticated connection, older than all of them, is still served.
            assert (await authed.request({"op": "ping"}))["type"] == "pong"
            await asyncio.to_thread(server.put, "orders", "O-1", {"account": "A"})
            assert (await authed.frame())["key"] == "O-1"
            assert limit_hits(await metrics(clients), "auth_timeout") == 4

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Request rate


@settings(max_request_rate=0.01, request_burst=5)
@pytest.mark.parametrize("kind", KINDS)
def test_a_burst_beyond_the_bucket_is_rate_limited_and_others_are_not(
    server: Server, kind: Kind
) -> None:
    async def main() -> None:
        async with Clients.of(server) as clients:
            engine = token("engine", read=None, publish=["orders"], where=None)
            conn = await clients.open(kind, engine)  # the auth took one of the five
            pings = [{"op": "ping", "id": i} for i in range(10)]
            await conn.send(b"".join(msgspec.json.encode(p) + b"\n" for p in pings))
            frames = [await conn.frame() for _ in pings]
            expected_pongs = 4 if kind != "ws-header" else 5  # a header is not a request
            assert [f["type"] for f in frames] == ["pong"] * expected_pongs + ["error"] * (
                10 - expected_pongs
            )
            assert [f["id"] for f in frames] == list(range(10))
            assert {f["code"] for f in frames if f["type"] == "error"} == {"rate_limited"}
            # Still open; publishes beyond the bucket are refused whole.
            seq = server.seq
            await conn.send({"op": "publish", "changes": [change("x", 1)], "id": "p"})
            err = await conn.frame()
            assert (err["code"], err["id"]) == ("rate_limited", "p")
            assert server.seq == seq
            # Other connections, of the same user and of others, have their own bucket.
            for other in (engine, token("bob")):
                c = await clients.open("tcp", other)
                await c.send(b'{"op":"ping"}\n' * 4)
                assert [(await c.frame())["type"] for _ in range(4)] == ["pong"] * 4
            text = await metrics(clients)
            assert limit_hits(text, "rate") == 11 - expected_pongs
            assert errors(text, "rate_limited") == 11 - expected_pongs

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Malformed auth and where


MALFORMED_AUTH: list[tuple[bytes, str]] = [
    (b'{"op":"auth"}', "token"),
    (b'{"op":"auth","token":12}', "$.token"),
    (b'{"op":"auth","token":null}', "$.token"),
    (b'{"op":"auth","token":["a","b"]}', "$.token"),
    (b'{"op":"auth","token":{"t":1}}', "$.token"),
    (b'{"op":"auth","token":"x","id":[1]}', "$.id"),
    (b'{"op":"auth","token":"x","id":1.5}', "$.id"),
]


@pytest.mark.parametrize("kind", ["tcp", "ws-auth"])
def test_a_malformed_auth_is_bad_request_naming_the_field(server: Server, kind: Kind) -> None:
    async def main() -> None:
        async with Clients.of(server) as clients:
            watcher = await clients.open("tcp", token())
            assert (await watcher.request({"op": "subscribe"}))["type"] == "subscribed"
            conn = await clients.raw(kind)
            for line, field in MALFORMED_AUTH:
                await conn.send(line + b"\n")
                err = await conn.frame()
                assert err["type"] == "error", (line, err)
                assert err["code"] == "bad_request", (line, err)
                assert field in err["message"], (line, err)
            # Still open, and it may still authenticate.
            authed = await conn.request({"op": "auth", "token": token(), "id": 1})
            assert authed["type"] == "authed", authed
            # A malformed refresh is a bad_request too, and keeps the grant.
            assert (await conn.request({"op": "auth", "token": 5}))["code"] == "bad_request"
            assert (await conn.request({"op": "ping"}))["type"] == "pong"
            # The others were served all along.
            await asyncio.to_thread(server.put, "orders", "O-1", {"account": "A"})
            assert (await watcher.frame())["key"] == "O-1"

    asyncio.run(main())


MALFORMED_WHERE: list[tuple[object, str]] = [
    ([1], "where: must be an object"),
    ("A", "where: must be an object"),
    (5, "where: must be an object"),
    (True, "where: must be an object"),
    ({"account": {"gt": "A"}}, "where.account: unknown operator 'gt'"),
    ({"account": {"in": ["A"], "nin": ["B"]}}, "where.account: unknown operator 'nin'"),
    ({"account": {"in": "A"}}, "where.account: 'in' must be a list"),
    ({"account": {"in": {"A": 1}}}, "where.account: 'in' must be a list"),
    ({"account": {"in": None}}, "where.account: 'in' must be a list"),
    ({"account": {"x": {"y": 1}}}, "where.account: unknown operator 'x'"),
    ({"account": {"in": [["A"]]}}, "where.account.in[0]"),
    ({"account": {"in": [{"a": 1}]}}, "where.account.in[0]"),
    ({"account": ["A", "B"]}, "where.account"),
    ({"account": {}}, "where.account"),
    ({"account": {"in": [f"A{i}" for i in range(1001)]}}, "where.account: 'in' has 1001"),
    ({f"f{i}": 1 for i in range(33)}, "where: 33 fields"),
    ({"x" * 129: 1}, "where: field name"),
    ({"": 1}, "where: field name"),
    ({"account": "A" * 1025}, "where.account: a string is longer"),
    ({"account": {"in": ["A", "A" * 1025]}}, "where.account.in[1]"),
]


def where_id(case: tuple[object, str]) -> str:
    return case[1][:40]


@pytest.mark.parametrize("op", ["sync", "subscribe"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_malformed_where_is_bad_request_naming_the_field(
    server: Server, kind: Kind, op: str
) -> None:
    server.publish([Change("orders", "O-1", {"account": "A"}), Change("orders", "O-2", {})])

    async def main() -> None:
        async with Clients.of(server) as clients:
            watcher = await clients.open("ws-auth", admin_token())
            assert (await watcher.request({"op": "subscribe"}))["type"] == "subscribed"
            for tok in (token(), admin_token()):  # with a where in the token, and without
                conn = await clients.open(kind, tok)
                for i, (where, fragment) in enumerate(MALFORMED_WHERE):
                    err = await conn.request({"op": op, "where": where, "id": i})
                    assert err["type"] == "error", (where, err)
                    assert (err["code"], err["id"]) == ("bad_request", i), (where, err)
                    assert fragment in err["message"], (where, err)
                # Still open, not subscribed by any of them: a valid one works.
                await conn.send({"op": "sync", "live": True, "where": {"account": "A"}})
                frames = await conn.until("snapshot_end")
                assert [f["key"] for f in frames if f["type"] == "record"] == ["O-1"]
            key = "O-3"
            await asyncio.to_thread(server.put, "orders", key, {"account": "A"})
            assert [f["key"] for f in await watcher.until(is_key(key))] == [key]
            text = await metrics(clients)
            assert errors(text, "bad_request") == 2 * len(MALFORMED_WHERE)

    asyncio.run(main())


def test_a_malformed_where_over_http_is_400_naming_the_field(server: Server) -> None:
    async def main() -> None:
        async with Clients.of(server) as clients:
            cases = [(json.dumps(w), fragment) for w, fragment in MALFORMED_WHERE]
            cases.append(("{not json", "where: not JSON"))
            for query, fragment in cases:
                if len(query) > 4000:
                    # A URL is one HTTP request line, at most 8,190 bytes: the largest
                    # filters cannot travel in a query string (the HTTP parser says 400).
                    continue
                status, headers, body = await clients.get("/v1/snapshot", token(), where=query)
                assert status == 400, (query, body)
                assert headers["Content-Type"].startswith("application/json")
                err = json.loads(body)
                assert err["code"] == "bad_request"
                assert fragment in err["message"], (query, err)
            for collections in ("", ",", "bad name", "orders,bad/name"):
                status, _, body = await clients.get(
                    "/v1/snapshot", admin_token(), collections=collections
                )
                assert status == 400, (collections, body)
            status, _, _ = await clients.get("/v1/snapshot", token(), where='{"account":"A"}')
            assert status == 200

    asyncio.run(main())


def test_a_where_nested_too_deeply_over_http_is_400(server: Server) -> None:
    """Like a request line over TCP (§9: JSON nested too deeply to parse is
    ``bad_request``, never ``internal``), ``?where=`` nested a thousand levels deep is
    a 400 with a JSON error body, not a 500."""

    async def main() -> None:
        async with Clients.of(server) as clients:
            conn = await clients.open("tcp", token())
            deep = "[" * 1200 + "]" * 1200
            err = await conn.request({"op": "ping"})
            await conn.send(b'{"op":"sync","where":' + deep.encode() + b"}\n")
            err = await conn.frame()
            assert err["code"] == "bad_request", err
            # Brackets unescaped, so that the URL stays within one HTTP request line.
            url = yarl.URL(f"{clients.base}/v1/snapshot?where={deep}", encoded=True)
            headers = {"Authorization": f"Bearer {token()}"}
            async with asyncio.timeout(TIMEOUT), clients.http.get(url, headers=headers) as r:
                body = await r.read()
                answer = (r.status, r.headers.get("Content-Type", "").split(";")[0])
            assert answer == (400, "application/json"), body[:200]
            assert json.loads(body)["code"] == "bad_request"
            assert (await conn.request({"op": "ping"}))["type"] == "pong"

    asyncio.run(main())
