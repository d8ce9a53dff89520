"""The client library over TLS and with access tokens (§3.8), against real servers.

Certificates are made here with trustme; tokens are minted with statecast.tokens. The
server checks token expiry about once a second, so the refresh tests use 3-second
tokens and only assert that a connection is still alive after its first token's
``exp``.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

import statecast
from statecast import Change, Client, Replica, Server
from statecast.client import Authed, parse_address
from statecast.client.connection import refresh_delay
from statecast.core.frames import ChangeFrame, Record, SnapshotEnd
from statecast.tokens import mint
from tests.helpers import TIMEOUT

SECRET = "correct horse battery staple, 32+ bytes long"


@dataclass
class Certs:
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    cert: Path
    key: Path
    wrong_name_cert: Path  # signed by ca, but for example.com only
    wrong_name_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    other = ca.issue_cert("example.com")
    c = Certs(
        ca=d / "ca.pem",
        other_ca=d / "other-ca.pem",
        cert=d / "cert.pem",
        key=d / "key.pem",
        wrong_name_cert=d / "wrong-cert.pem",
        wrong_name_key=d / "wrong-key.pem",
    )
    ca.cert_pem.write_to_path(str(c.ca))
    trustme.CA().cert_pem.write_to_path(str(c.other_ca))
    server_cert.private_key_pem.write_to_path(str(c.key))
    with open(c.cert, "wb") as f:
        for pem in server_cert.cert_chain_pems:
            f.write(pem.bytes())
    other.private_key_pem.write_to_path(str(c.wrong_name_key))
    with open(c.wrong_name_cert, "wb") as f:
        for pem in other.cert_chain_pems:
            f.write(pem.bytes())
    return c


def start(**settings: Any) -> Server:
    options: dict[str, Any] = {
        "store": "memory",
        "http_port": None,
        "port": 0,
        "heartbeat": None,
        **settings,
    }
    return Server(**options).start_in_thread()


@pytest.fixture
def tls_server(certs: Certs) -> Iterator[Server]:
    srv = start(tls_cert=str(certs.cert), tls_key=str(certs.key))
    yield srv
    srv.stop_in_thread(timeout=30)


@pytest.fixture
def auth_server() -> Iterator[Server]:
    srv = start(auth_secret=SECRET)
    yield srv
    srv.stop_in_thread(timeout=30)


def token(
    sub: str = "alice",
    *,
    ttl: float = 3600,
    read: Any = "*",
    publish: Any = "*",
    where: dict[str, object] | None = None,
    now: float | None = None,
) -> str:
    return mint(secret=SECRET, sub=sub, read=read, publish=publish, where=where, ttl=ttl, now=now)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    """Run a test body on a fresh loop, bounded."""

    async def bounded() -> None:
        async with asyncio.timeout(TIMEOUT * 6):
            await coro()

    asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT * 3
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def past(exp: float, margin: float = 1.5) -> None:
    """Until the server has surely checked a token that expired at ``exp``."""
    await asyncio.sleep(max(0.0, exp + margin - time.time()))


# -- TLS ------------------------------------------------------------------------------
def test_tls_sync_publish_and_replica(tls_server: Server, certs: Certs) -> None:
    url = f"tls://127.0.0.1:{tls_server.port}"
    tls_server.put("orders", "O-1", {"qty": 1})

    async def body() -> None:
        async with Client(url, ca_file=certs.ca) as c:
            assert c.tls
            assert await c.publish([Change("orders", "O-2", {"qty": 2})]) == 2
            frames = [f async for f in c.sync(collections=["orders"])]
            assert sorted(f.key for f in frames if isinstance(f, Record)) == ["O-1", "O-2"]
            assert isinstance(frames[-1], SnapshotEnd)
        # ssl= gives full control: here, a context that trusts the CA, for "localhost".
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        async with Client(f"tls://localhost:{tls_server.port}", ssl=ctx) as c:
            assert await c.ping() == 2
        async with Replica(url, ca_file=certs.ca, min_backoff=0.02) as r:
            await r.wait_synced()
            assert r.snapshot() == {"orders": {"O-1": {"qty": 1}, "O-2": {"qty": 2}}}
            await asyncio.to_thread(tls_server.put, "orders", "O-3", {"qty": 3})
            await until(lambda: r.seq == 3, "the change over TLS")
            assert r.get("orders", "O-3") == {"qty": 3}

    run(body)
    with statecast.BlockingClient(url, ca_file=str(certs.ca)) as bc:
        assert bc.publish(Change("orders", "O-4", 4)) == 4
    with statecast.BlockingReplica(url, ca_file=str(certs.ca)) as br:
        br.wait_synced(timeout=TIMEOUT)
        assert br.get("orders", "O-4") == 4


def test_tls_certificate_failures_say_so(tls_server: Server, certs: Certs) -> None:
    port = tls_server.port

    async def body() -> None:
        with pytest.raises(statecast.ConnectionClosed, match="certificate verification failed"):
            await Client(f"tls://127.0.0.1:{port}", ca_file=certs.other_ca).connect()
        # No ca_file: the system's CAs, which do not know a test CA.
        with pytest.raises(statecast.ConnectionClosed, match="system's CAs") as info:
            await Client(f"tls://127.0.0.1:{port}").connect()
        assert "TLS handshake" in str(info.value)

    run(body)
    srv = start(tls_cert=str(certs.wrong_name_cert), tls_key=str(certs.wrong_name_key))
    try:

        async def wrong_name() -> None:
            with pytest.raises(statecast.ConnectionClosed, match="mismatch") as info:
                await Client(f"tls://127.0.0.1:{srv.port}", ca_file=certs.ca).connect()
            assert "certificate verification failed" in str(info.value)

        run(wrong_name)
    finally:
        srv.stop_in_thread(timeout=30)


def test_tcp_against_tls_and_tls_against_tcp_fail_fast(
    tls_server: Server, certs: Certs, server: Server
) -> None:
    async def body() -> None:
        t0 = time.monotonic()
        with pytest.raises(statecast.ConnectionClosed, match="TLS") as info:
            await Client(f"tcp://127.0.0.1:{tls_server.port}").connect()
        assert "tls://" in str(info.value)
        with pytest.raises(statecast.ConnectionClosed, match="did not answer in TLS") as info:
            await Client(f"tls://127.0.0.1:{server.port}", ca_file=certs.ca).connect()
        assert "tcp://" in str(info.value)
        # Neither waits for the connect timeout.
        assert time.monotonic() - t0 < TIMEOUT

    run(body)


def test_the_http_port_serves_https_with_the_same_certificate(certs: Certs) -> None:
    srv = start(tls_cert=str(certs.cert), tls_key=str(certs.key), http_port=0)
    try:

        async def body() -> None:
            ctx = ssl.create_default_context(cafile=str(certs.ca))
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"https://127.0.0.1:{srv.http_port}/healthz", ssl=ctx) as resp,
            ):
                assert resp.status == 200
                assert resp.url.scheme == "https"

        run(body)
    finally:
        srv.stop_in_thread(timeout=30)


def test_urls_and_settings_are_checked_before_connecting(certs: Certs, tmp_path: Path) -> None:
    assert parse_address("tls://db.example:9000") == ("tls", "db.example", 9000)
    assert parse_address("tls://db.example").port == 8989
    assert parse_address("localhost:9000") == ("tcp", "localhost", 9000)
    assert parse_address("tcp://[::1]:9000").host == "::1"
    assert str(parse_address("TLS://[::1]:9000")) == "tls://[::1]:9000"
    for url in ("ws://h:8990/ws", "wss://h:8990/ws", "http://h:8990", "https://h"):
        with pytest.raises(statecast.ConfigError, match=r"use tcp://HOST:PORT or tls://") as info:
            Client(url)
        assert url in str(info.value)
    for url, message in (
        ("ftp://h:1", "unsupported URL scheme 'ftp'"),
        ("tcp://h:99999", "invalid port"),
        ("tcp://h:0", "invalid port"),
        ("tcp://h:1/path", "no path"),
        ("tcp://user:pw@h:1", "no user"),
        ("", "invalid server URL"),
        ("tcp://h :1", "whitespace"),
    ):
        with pytest.raises(statecast.ConfigError, match=message) as info:
            Client(url)
        assert repr(url) in str(info.value)
    with pytest.raises(statecast.ConfigError, match=r"plain TCP.*did you mean tls://h:1"):
        Client("tcp://h:1", ca_file=certs.ca)
    with pytest.raises(statecast.ConfigError, match="not both"):
        Client("tls://h:1", ca_file=certs.ca, ssl=ssl.create_default_context())
    with pytest.raises(statecast.ConfigError, match="cannot load the CA file"):
        Client("tls://h:1", ca_file=tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(statecast.ConfigError, match=r"junk\.pem"):
        Client("tls://h:1", ca_file=tmp_path / "junk.pem")
    with pytest.raises(statecast.ConfigError, match="not both"):
        Client("tcp://h:1", token="t", token_provider=lambda: "t")
    with pytest.raises(statecast.ConfigError, match="non-empty"):
        Client("tcp://h:1", token=" ")
    # The replica and the blocking wrappers check the same, at once, not on connect.
    with pytest.raises(statecast.ConfigError, match="plain TCP"):
        Replica("tcp://h:1", ca_file=certs.ca)
    with pytest.raises(statecast.ConfigError, match="WebSocket"):
        statecast.BlockingClient("ws://h:1")
    with pytest.raises(statecast.ConfigError, match="not both"):
        statecast.BlockingReplica("tcp://h:1", token="t", token_provider=lambda: "t")


# -- tokens ---------------------------------------------------------------------------
def test_token_is_sent_after_hello_and_authed_is_kept(auth_server: Server) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"

    async def body() -> None:
        t = token(read=["positions", "orders"], publish=[], where={"account": "ACC-1"})
        async with Client(url, token=t) as c:
            assert c.authed == Authed(
                sub="alice",
                read=["orders", "positions"],
                where={"account": "ACC-1"},
                publish=[],
                exp=c.authed.exp if c.authed else 0,
                id=c.authed.id if c.authed else None,
            )
            assert c.authed is not None
            assert c.authed.exp is not None
            assert 3500 < c.authed.exp - time.time() <= 3601
            with pytest.raises(statecast.Forbidden, match="may not publish"):
                await c.publish([Change("orders", "O-1", 1)])
            assert await c.ping() == 0  # still connected
        with pytest.raises(statecast.Unauthorized, match="malformed token"):
            await Client(url, token="not-a-token").connect()
        with pytest.raises(statecast.Unauthorized, match="bad token signature"):
            await Client(
                url, token=mint(secret="x" * 40, sub="eve", read="*", publish="*", ttl=60)
            ).connect()
        expired = token(ttl=10, now=time.time() - 100)
        with pytest.raises(statecast.Unauthorized, match="expired"):
            await Client(url, token=expired).connect()
        # Without a token, the hello comes, and the first request is refused.
        async with Client(url) as c:
            assert c.authed is None
            with pytest.raises(statecast.Unauthorized, match="authenticate first"):
                await c.ping()

    run(body)


def test_a_token_for_a_server_without_auth_is_an_error(server: Server) -> None:
    async def body() -> None:
        with pytest.raises(statecast.BadRequest, match="does not use access tokens"):
            await Client(f"tcp://127.0.0.1:{server.port}", token=token()).connect()

    run(body)


def test_token_provider_refreshes_before_expiry(auth_server: Server) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"
    calls = itertools.count()

    def sync_provider() -> str:
        next(calls)
        return token(ttl=3)

    async def async_provider() -> str:
        next(calls)
        await asyncio.sleep(0)
        return token(ttl=3)

    async def body() -> None:
        for collection, provider in (("a", sync_provider), ("b", async_provider)):
            async with Client(url, token_provider=provider) as c:
                assert c.authed is not None
                assert c.authed.exp is not None
                first_exp = c.authed.exp
                live = c.sync(collections=[collection], live=True)
                assert [type(f).__name__ async for f in _take(live, 2)] == [
                    "SnapshotBegin",
                    "SnapshotEnd",
                ]
                await past(first_exp)
                # Still the same connection, authenticated with a later token.
                assert c.refreshes >= 1
                assert c.authed.exp is not None
                assert c.authed.exp > first_exp
                assert await c.publish([Change(collection, "O-1", {"qty": 1})]) >= 1
                change = await anext(live)
                assert isinstance(change, ChangeFrame)
                assert change.key == "O-1"
        assert next(calls) >= 4

    run(body)


async def _take(frames: Any, n: int) -> Any:
    for _ in range(n):
        yield await anext(frames)


def test_a_failed_refresh_is_retried_before_expiry(
    auth_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"
    calls = itertools.count()

    def flaky() -> str:
        if next(calls) == 1:  # the first refresh fails
            raise OSError("the identity provider is briefly down")
        return token(ttl=3)

    async def body() -> None:
        async with Client(url, token_provider=flaky) as c:
            assert c.authed is not None
            assert c.authed.exp is not None
            first_exp = c.authed.exp
            await past(first_exp)
            assert await c.ping() == 0
            assert c.refreshes >= 1

    with caplog.at_level("WARNING", logger="statecast.client"):
        run(body)
    assert "briefly down" in caplog.text
    assert "retrying" in caplog.text
    assert next(calls) >= 3


def test_refresh_delay() -> None:
    assert refresh_delay(3600) == pytest.approx(2880)  # at 80% of the lifetime
    assert refresh_delay(20) == pytest.approx(15)  # at least 5 s before the end
    assert refresh_delay(3) == pytest.approx(1.5)  # short tokens: halfway
    assert refresh_delay(0) == refresh_delay(-5) == 0


def test_a_provider_that_fails_is_an_error_at_connect(auth_server: Server) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"

    def broken() -> str:
        raise RuntimeError("the identity provider is down")

    async def body() -> None:
        with pytest.raises(statecast.StatecastError, match="identity provider is down"):
            await Client(url, token_provider=broken).connect()
        with pytest.raises(statecast.StatecastError, match="returned NoneType"):
            await Client(url, token_provider=lambda: None).connect()  # type: ignore[arg-type,return-value]

    run(body)


def test_replica_with_a_provider_stays_live_across_expiry(auth_server: Server) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"
    auth_server.put("orders", "O-1", 1)

    async def body() -> None:
        async with Replica(url, token_provider=lambda: token(ttl=3), min_backoff=0.02) as r:
            await r.wait_synced()
            assert r.authed is not None
            assert r.authed.exp is not None
            await past(r.authed.exp)
            await asyncio.to_thread(auth_server.put, "orders", "O-2", 2)
            await until(lambda: r.get("orders", "O-2") == 2, "a change after the first exp")
            assert r.status == "live"
            assert (r.reconnects, r.full_syncs) == (0, 1)

    run(body)


def test_replica_reconnects_with_a_fresh_token_when_refresh_is_refused(
    auth_server: Server,
) -> None:
    """Each token has another subject, so the server refuses every refresh
    (forbidden): the connection ends with token_expired, and the replica reconnects
    with a fresh token and resumes (the view is the same)."""
    url = f"tcp://127.0.0.1:{auth_server.port}"
    n = itertools.count()
    statuses: list[tuple[str, str]] = []
    auth_server.put("orders", "O-1", 1)

    async def body() -> None:
        async with Replica(
            url,
            token_provider=lambda: token(f"user-{next(n)}", ttl=3),
            min_backoff=0.02,
            on_status=lambda s, d: statuses.append((s, d)),
        ) as r:
            await r.wait_synced()
            await until(lambda: r.resumes >= 1, "a resume after token_expired")
            assert any("token_expired" in d for s, d in statuses if s == "reconnecting")
            await asyncio.to_thread(auth_server.put, "orders", "O-2", 2)
            await until(lambda: r.get("orders", "O-2") == 2, "a change after the reconnect")
            assert r.full_syncs == 1
            assert r.status == "live"

    run(body)


def test_replica_with_a_static_token_reports_and_keeps_retrying(auth_server: Server) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"
    statuses: list[tuple[str, str]] = []
    auth_server.put("orders", "O-1", 1)

    async def body() -> None:
        async with Replica(
            url,
            token=token(ttl=3),
            min_backoff=0.02,
            max_backoff=0.2,
            on_status=lambda s, d: statuses.append((s, d)),
        ) as r:
            await r.wait_synced()

            def refused() -> bool:
                return any(s == "reconnecting" and "unauthorized" in d for s, d in statuses)

            await until(refused, "the expired token to be refused")
            await until(lambda: r.reconnects >= 3, "retries")
            assert any("token_expired" in d for s, d in statuses)
            assert r.snapshot() == {"orders": {"O-1": 1}}  # what it had, kept

    run(body)


def test_replica_restricted_by_where_holds_only_its_records() -> None:
    # Heartbeats on: a filtered replica must not take their seq for a gap.
    srv = start(auth_secret=SECRET, heartbeat=0.2)
    url = f"tcp://127.0.0.1:{srv.port}"
    seen: list[ChangeFrame] = []

    def publish_mix(round_: int) -> None:
        for i in range(20):
            account = f"ACC-{i % 3 + 1}"
            srv.put("orders", f"O-{i}", {"account": account, "round": round_})
            srv.put("quotes", f"Q-{i}", {"account": "ACC-1", "round": round_})

    try:
        publish_mix(0)

        async def body() -> None:
            t = token(read=["orders"], publish=[], where={"account": "ACC-1"})
            async with Replica(url, token=t, on_change=seen.append, min_backoff=0.02) as r:
                await r.wait_synced()
                assert set(r["orders"]) == {f"O-{i}" for i in range(0, 20, 3)}
                await asyncio.to_thread(publish_mix, 1)
                # O-0 moves out of the view, O-1 into it: a delete and a change.
                await asyncio.to_thread(srv.put, "orders", "O-0", {"account": "ACC-2"})
                await asyncio.to_thread(srv.put, "orders", "O-1", {"account": "ACC-1"})
                last = await asyncio.to_thread(srv.delete, "orders", "O-3")
                await until(lambda: r.seq == last, "the last change")
                await asyncio.sleep(0.5)  # a few heartbeats
                expected = {f"O-{i}": {"account": "ACC-1", "round": 1} for i in range(6, 20, 3)}
                expected["O-1"] = {"account": "ACC-1"}
                assert r.snapshot() == {"orders": expected}
                assert (r.full_syncs, r.reconnects) == (1, 0)

        run(body)
    finally:
        srv.stop_in_thread(timeout=30)
    assert seen
    for change in seen:
        assert change.collection == "orders"
        assert change.deleted or change.value["account"] == "ACC-1", change


def test_replica_full_syncs_when_the_token_grants_another_view(auth_server: Server) -> None:
    """The first token filters ACC-1, every later one ACC-2: refreshes are refused
    (a refresh may not change 'where'), and after token_expired the replica reconnects
    into another view, so it must sync in full, not resume."""
    url = f"tcp://127.0.0.1:{auth_server.port}"
    n = itertools.count()
    for i in range(6):
        auth_server.put("orders", f"O-{i}", {"account": f"ACC-{i % 2 + 1}"})

    def provider() -> str:
        account = "ACC-1" if next(n) == 0 else "ACC-2"
        return token(ttl=3, read=["orders"], publish=[], where={"account": account})

    async def body() -> None:
        async with Replica(url, token_provider=provider, min_backoff=0.02) as r:
            await r.wait_synced()
            assert set(r["orders"]) == {"O-0", "O-2", "O-4"}
            await until(lambda: r.full_syncs == 2, "a full sync into the new view")
            assert set(r["orders"]) == {"O-1", "O-3", "O-5"}
            assert r.resumes == 0

    run(body)


def test_blocking_wrappers_pass_tokens_through(auth_server: Server) -> None:
    url = f"tcp://127.0.0.1:{auth_server.port}"
    with statecast.BlockingClient(url, token=token()) as c:
        assert c.authed is not None
        assert c.authed.sub == "alice"
        assert c.publish(Change("orders", "O-1", 1)) == 1
        assert c.authenticate(token()).sub == "alice"
    with statecast.BlockingReplica(url, token_provider=lambda: token(sub="bob")) as r:
        r.wait_synced(timeout=TIMEOUT)
        assert r.get("orders", "O-1") == 1
        assert r.authed is not None
        assert r.authed.sub == "bob"
