"""Access control over real sockets (docs/security.md, protocol §3.7, §3.8).

The issue's words: "A client restricted to account A must never receive a byte of
account B's records: not a key and not a value." A desk holds orders and positions of
accounts A and B; everything that is not A's carries a marker (``SECRET-B``, or
``SECRET-Q`` in a collection the trader may not read). A trader's token reads orders
and positions with ``where={"account":"A"}``. Over TCP, WebSocket (the token in the
``Authorization`` header, or in ``auth`` as the first message) and HTTP, every byte
the trader receives is kept and searched for the markers, every frame's key is checked
against the keys that were ever in its view, and its copy must equal the filtered
state at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import socket
import subprocess
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlencode

import aiohttp
import jwt
import msgspec
import pytest

from statecast import Change, Server
from statecast.tokens import mint
from tests.helpers import CMD, TIMEOUT, Frame, ServeProcess, frames_of, free_port

SECRET = "statecast-access-tests-secret-0123456789"  # >= 32 bytes: HS256 only
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"
READS = ["orders", "positions"]
A_ONLY = {"account": "A"}
# Bytes that only records outside the trader's view carry.
MARKERS = (b"SECRET-B", b"SECRET-Q", b'"account":"B"')

Kind = Literal["tcp", "ws-header", "ws-auth"]
KINDS: tuple[Kind, ...] = ("tcp", "ws-header", "ws-auth")
Key = tuple[str, str]


# ---------------------------------------------------------------------------
# Tokens


def token(
    sub: str = "alice",
    *,
    read: Sequence[str] | str | None = READS,
    publish: Sequence[str] | str | None = (),
    where: Mapping[str, object] | None = A_ONLY,
    ttl: float = 600,
    secret: str = SECRET,
) -> str:
    """A token signed with ``secret``: by default, the trader of account A."""
    return mint(secret=secret, sub=sub, read=read, publish=publish, where=where, ttl=ttl)


def admin_token(ttl: float = 600) -> str:
    return token("admin", read=None, publish=None, where=None, ttl=ttl)


def _b64(obj: object) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# Claims of the right signature and the wrong shape: each makes the token invalid.
ODD_CLAIMS: dict[str, dict[str, object]] = {
    "exp is a string": {"exp": "tomorrow"},
    "exp is a boolean": {"exp": True},
    "exp is infinite": {"exp": float("inf")},
    "sub is a number": {"sub": 7},
    "sub is empty": {"sub": ""},
    "sub is too long": {"sub": "a" * 300},
    "sub has a newline": {"sub": "alice\nroot"},
    "read is a bare name": {"read": "orders"},
    "read holds a number": {"read": ["orders", 1]},
    "publish is an object": {"publish": {"orders": True}},
    "where is a list": {"where": [{"account": "A"}]},
    "where holds NaN": {"where": {"account": float("nan")}},
    "nbf is a string": {"nbf": "now"},
    "iat is a list": {"iat": [1]},
    "aud it was not meant for": {"aud": "another-service"},
}


def signed(claims: Mapping[str, object], **changes: object) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jwt.encode({**claims, **changes}, SECRET, "HS256")


def bad_tokens() -> dict[str, str]:
    """Tokens the server must refuse, by what is wrong with them."""
    now = int(time.time())
    good = token()
    header, payload, signature = good.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    wider = {"sub": "alice", "read": "*", "publish": "*", "exp": now + 600}
    claims = {"sub": "alice", "read": READS, "where": A_ONLY, "publish": [], "exp": now + 600}
    with warnings.catch_warnings():  # PyJWT may warn that the key is short for HS384
        warnings.simplefilter("ignore")
        hs384 = jwt.encode(claims, SECRET, "HS384")
    return {
        "signature altered": f"{header}.{payload}.{flipped}",
        "claims widened, signature kept": f"{header}.{_b64(wider)}.{signature}",
        "expired": mint(
            secret=SECRET, sub="alice", read=READS, publish=(), where=A_ONLY, ttl=60, now=now - 600
        ),
        "not yet valid (nbf)": jwt.encode({**claims, "nbf": now + 3600}, SECRET, "HS256"),
        "another secret": token(secret=OTHER_SECRET),
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(wider)}.",
        "alg HS384 with the same secret": hs384,
        "no exp": jwt.encode({"sub": "alice", "read": "*"}, SECRET, "HS256"),
        **{f"signed, but {what}": signed(claims, **odd) for what, odd in ODD_CLAIMS.items()},
        "garbage": "this is not a token",
        "three dots of garbage": "a.b.c",
        "empty": "",
        "too long": "a" * 9000 + "." + "b" * 10 + "." + "c",
    }


# ---------------------------------------------------------------------------
# The desk: a server, and a model of its state


def value(account: object, note: str, **more: object) -> dict[str, object]:
    return {"account": account, "note": note, **more}


class Desk:
    """A server and a model of its state; every publish goes through :meth:`publish`,
    which also remembers every key that was ever in the trader's view."""

    def __init__(self, send: Callable[[list[Change]], int], server: Server | None = None) -> None:
        self._send = send
        self.server = server
        self.model: dict[Key, Any] = {}
        self.ever_in_view: set[Key] = set()
        self.sentinels = 0
        self.seq = 0

    @staticmethod
    def in_view(key: Key, val: object, where: Mapping[str, object] = A_ONLY) -> bool:
        return key[0] in READS and matches(where, val)

    def publish(self, changes: list[Change]) -> int:
        self.seq = self._send(changes)
        for c in changes:
            k = (c.collection, c.key)
            if c.delete:
                self.model.pop(k, None)
            else:
                self.model[k] = c.value
                if self.in_view(k, c.value):
                    self.ever_in_view.add(k)
        return self.seq

    async def apublish(self, changes: list[Change]) -> int:
        return await asyncio.to_thread(self.publish, changes)

    def filtered(self, where: Mapping[str, object] = A_ONLY) -> dict[Key, Any]:
        return {k: v for k, v in self.model.items() if self.in_view(k, v, where)}

    def seed(self) -> None:
        changes = []
        for n in range(20):
            changes += [
                Change("orders", f"ORD-A-{n}", value("A", f"PUBLIC-A-{n}", qty=n)),
                Change("orders", f"SECRET-B-ORD-{n}", value("B", f"SECRET-B-{n}", qty=n)),
                Change("positions", f"POS-A-{n}", value("A", f"PUBLIC-A-pos-{n}")),
                Change("positions", f"SECRET-B-POS-{n}", value("B", f"SECRET-B-pos-{n}")),
                # An unreadable collection: account A, but never for the trader.
                Change("quotes", f"SECRET-Q-{n}", value("A", f"SECRET-Q-{n}")),
            ]
        for n in range(6):  # even: in A now; odd: in B now
            acct = "A" if n % 2 == 0 else "B"
            changes.append(Change("orders", f"MOVE-{n}", move_value(acct, n, 0)))
        # Values that look like A's to a careless matcher, and are not.
        changes += [
            Change("orders", "SECRET-B-scalar", "SECRET-B-a string, account A"),
            Change("orders", "SECRET-B-list", ["SECRET-B", {"account": "A"}]),
            Change("orders", "SECRET-B-noacct", {"note": "SECRET-B-noacct"}),
            Change("orders", "SECRET-B-null", value(None, "SECRET-B-null")),
            Change("orders", "SECRET-B-lower", value("a", "SECRET-B-lower")),
            Change("orders", "SECRET-B-space", value("A ", "SECRET-B-space")),
            Change("orders", "SECRET-B-array", value(["A"], "SECRET-B-array")),
            Change("orders", "SECRET-B-nested", value({"in": ["A"]}, "SECRET-B-nested")),
            Change("orders", "SECRET-B-true", value(True, "SECRET-B-true")),
            # A key whose JSON holds ',"value":' and an A-looking value, escaped.
            Change("orders", 'SECRET-B-K","value":{"account":"A"}', value("B", "SECRET-B-k")),
            Change("positions", "SECRET-B-nested-field", {"x": {"account": "A"}, "n": "SECRET-B"}),
        ]
        self.publish(changes)

    def churn(self, rnd: int) -> None:
        """Several publishes, as separate batches, that move records between A and B,
        touch B's records, delete some, and touch the unreadable collection."""
        self.publish(
            [
                Change("orders", "ORD-A-0", value("A", f"PUBLIC-A-0-r{rnd}", qty=rnd)),
                Change("orders", "SECRET-B-ORD-0", value("B", f"SECRET-B-0-r{rnd}", qty=rnd)),
            ]
        )
        # Every MOVE record changes account: A -> B and B -> A.
        moves = []
        for n in range(6):
            now_a = (n + rnd) % 2 == 1
            moves.append(Change("orders", f"MOVE-{n}", move_value("A" if now_a else "B", n, rnd)))
        self.publish(moves)
        # Created in B then moved into A within one batch, and the other way round.
        self.publish(
            [
                Change("orders", f"HOP-IN-{rnd}", value("B", f"SECRET-B-hop-{rnd}")),
                Change("orders", f"HOP-IN-{rnd}", value("A", f"PUBLIC-A-hop-{rnd}")),
                Change("orders", f"HOP-OUT-{rnd}", value("A", f"PUBLIC-A-hop-{rnd}")),
                Change("orders", f"HOP-OUT-{rnd}", value("B", f"SECRET-B-hop-{rnd}")),
            ]
        )
        # B only: created, updated, deleted; deletes of keys that never existed.
        self.publish([Change("positions", f"SECRET-B-NEW-{rnd}", value("B", "SECRET-B-new"))])
        self.publish([Change("positions", f"SECRET-B-NEW-{rnd}", value("B", "SECRET-B-new2"))])
        self.publish(
            [
                Change("positions", f"SECRET-B-NEW-{rnd}", delete=True),
                Change("orders", f"SECRET-B-GHOST-{rnd}", delete=True),
                Change("orders", f"SECRET-B-ORD-{1 + rnd % 5}", delete=True),
            ]
        )
        # An A record leaves the view by becoming something that matches nothing, and
        # another is deleted.
        self.publish(
            [
                Change("orders", f"ORD-A-{10 + rnd}", value(None, f"SECRET-B-nulled-{rnd}")),
                Change("positions", f"POS-A-{10 + rnd}", delete=True),
            ]
        )
        self.publish([Change("quotes", "SECRET-Q-0", value("A", f"SECRET-Q-r{rnd}"))])

    def sentinel(self) -> str:
        """Publish a record in A's view; frames are in order, so once the trader has
        it, it has everything published before."""
        self.sentinels += 1
        key = f"SENTINEL-{self.sentinels}"
        self.publish([Change("orders", key, value("A", key))])
        return key


def move_value(acct: str, n: int, rnd: int) -> dict[str, object]:
    note = f"PUBLIC-A-move-{n}-{rnd}" if acct == "A" else f"SECRET-B-move-{n}-{rnd}"
    return value(acct, note)


def matches(where: Mapping[str, object] | None, val: object) -> bool:
    """The §3.7 semantics, for the filters these tests use (strings and ``in``)."""
    if where is None:
        return True
    if not isinstance(val, dict):
        return False
    for field, cond in where.items():
        allowed = cond["in"] if isinstance(cond, dict) else [cond]
        got = val.get(field, ...)
        if not isinstance(got, str) or got not in allowed:
            return False
    return True


def embedded(**settings: Any) -> Server:
    options: dict[str, Any] = {
        "store": "memory",
        "port": 0,
        "http_port": 0,
        "heartbeat": None,
        "shutdown_grace": 2,
        "auth_secret": SECRET,
    }
    options.update(settings)
    return Server(**options).start_in_thread()


@pytest.fixture
def desk() -> Iterator[Desk]:
    srv = embedded()
    d = Desk(srv.publish, srv)
    d.seed()
    try:
        yield d
    finally:
        srv.stop_in_thread(timeout=30)


def server_of(desk: Desk) -> Server:
    assert desk.server is not None
    return desk.server


# ---------------------------------------------------------------------------
# Clients that keep every byte they receive


class Conn:
    """One connection, TCP or WebSocket: frames in order, and every byte received."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.raw = bytearray()
        self.eof = False
        self.hello: Frame = {}
        self._frames: deque[Frame] = deque()

    async def send(self, request: Frame | bytes | str) -> None:
        raise NotImplementedError

    async def _fill(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def _take(self, data: bytes) -> None:
        self.raw += data
        self._frames.extend(frames_of(data))

    async def frame(self) -> Frame:
        """The next frame; ``EOFError`` once the server closed the connection."""
        async with asyncio.timeout(TIMEOUT):
            while not self._frames:
                if self.eof:
                    raise EOFError(f"{self.kind}: connection closed by the server")
                await self._fill()
        return self._frames.popleft()

    async def until(self, pred: Callable[[Frame], bool] | str) -> list[Frame]:
        """Frames up to and including the first that ``pred`` accepts (or of that type)."""
        test = (lambda f: f["type"] == pred) if isinstance(pred, str) else pred
        out = []
        while True:
            f = await self.frame()
            out.append(f)
            if test(f):
                return out

    async def request(self, request: Frame) -> Frame:
        await self.send(request)
        return await self.frame()

    async def rest(self) -> list[Frame]:
        """Every frame until the server closes the connection."""
        out = []
        while True:
            try:
                out.append(await self.frame())
            except EOFError:
                return out

    async def closed_by_server(self) -> bool:
        """Whether the server closes the connection (within TIMEOUT) with nothing more."""
        return await self.rest() == []


class TcpConn(Conn):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__("tcp")
        self.reader = reader
        self.writer = writer

    async def send(self, request: Frame | bytes | str) -> None:
        if isinstance(request, dict):
            data = msgspec.json.encode(request) + b"\n"
        else:
            data = request.encode() if isinstance(request, str) else request
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _fill(self) -> None:
        try:
            line = await self.reader.readline()
        except ConnectionError:
            line = b""
        if not line or not line.endswith(b"\n"):
            self.raw += line
            self.eof = True
            return
        self._take(line)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class WsConn(Conn):
    def __init__(self, kind: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        super().__init__(kind)
        self.ws = ws

    async def send(self, request: Frame | bytes | str) -> None:
        if isinstance(request, dict):
            text = msgspec.json.encode(request).decode()
        else:
            text = request.decode() if isinstance(request, bytes) else request
        with contextlib.suppress(ConnectionError):
            await self.ws.send_str(text.rstrip("\n"))

    async def _fill(self) -> None:
        msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.TEXT:
            self._take(msg.data.encode() + b"\n")
        elif msg.type == aiohttp.WSMsgType.BINARY:
            self._take(bytes(msg.data) + b"\n")
        else:
            self.eof = True

    async def close(self) -> None:
        await self.ws.close()


class Clients:
    """Opens connections to one server, and closes them all at the end."""

    def __init__(self, port: int, http_port: int | None) -> None:
        self.port = port
        self.http_port = http_port
        self._conns: list[Conn] = []
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def of(cls, srv: Server) -> Clients:
        return cls(srv.port, srv.http_port)

    async def __aenter__(self) -> Clients:
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self._conns:
            with contextlib.suppress(Exception):
                await c.close()
        assert self._http is not None
        await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def raw(self, kind: Kind, bearer: str | None = None) -> Conn:
        """A connection that has read its ``hello`` and sent nothing."""
        conn: Conn
        async with asyncio.timeout(TIMEOUT):
            if kind == "tcp":
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, limit=1 << 22
                )
                conn = TcpConn(reader, writer)
            else:
                headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
                ws = await self.http.ws_connect(self.base + "/ws", headers=headers, max_msg_size=0)
                conn = WsConn(kind, ws)
        self._conns.append(conn)
        conn.hello = await conn.frame()
        assert conn.hello["type"] == "hello", conn.hello
        return conn

    async def open(self, kind: Kind, tok: str) -> Conn:
        """An authenticated connection: the token as ``auth`` (tcp, ws-auth) or in the
        upgrade's ``Authorization`` header (ws-header)."""
        if kind == "ws-header":
            conn = await self.raw(kind, bearer=tok)
            authed = await conn.frame()
        else:
            conn = await self.raw(kind)
            authed = await conn.request({"op": "auth", "token": tok, "id": "auth"})
        assert authed["type"] == "authed", authed
        return conn

    async def get(
        self, path: str, tok: str | None = None, **query: str
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = {} if tok is None else {"Authorization": f"Bearer {tok}"}
        url = self.base + path + ("?" + urlencode(query) if query else "")
        async with asyncio.timeout(TIMEOUT), self.http.get(url, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    async def post(
        self, path: str, body: object, tok: str | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = {} if tok is None else {"Authorization": f"Bearer {tok}"}
        async with (
            asyncio.timeout(TIMEOUT),
            self.http.post(self.base + path, json=body, headers=headers) as r,
        ):
            return r.status, dict(r.headers), await r.read()

    async def seq(self) -> int:
        """The server's seq, from an admin connection."""
        conn = await self.open("tcp", admin_token())
        pong = await conn.request({"op": "ping"})
        await conn.close()
        return int(pong["seq"])

    async def full_state(self) -> dict[Key, Any]:
        """Everything, through an admin token (to check the model against)."""
        conn = await self.open("tcp", admin_token())
        await conn.send({"op": "sync"})
        copy: dict[Key, Any] = {}
        apply(copy, await conn.until("snapshot_end"))
        await conn.close()
        return copy


def apply(copy: dict[Key, Any], frames: Sequence[Frame]) -> None:
    """A replica: snapshot records and live changes, upserts and deletes."""
    for f in frames:
        if f["type"] in ("record", "change"):
            k = (f["collection"], f["key"])
            if f.get("deleted"):
                copy.pop(k, None)
            else:
                copy[k] = f["value"]


def assert_no_marker(data: bytes | bytearray, what: str = "") -> None:
    for marker in MARKERS:
        assert marker not in data, f"{what}: {marker!r} leaked in {bytes(data)[:2000]!r}"


def assert_keys_were_in_view(frames: Sequence[Frame], desk: Desk) -> None:
    for f in frames:
        if "key" in f:
            k = (f["collection"], f["key"])
            assert k in desk.ever_in_view, f"a frame about a key never in view: {f}"


def is_key(key: str) -> Callable[[Frame], bool]:
    return lambda f: f.get("key") == key


# ---------------------------------------------------------------------------
# Isolation: snapshot, live, resume, reconnect, widening, forbidden collections


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_holds_only_the_view(desk: Desk, kind: Kind) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.open(kind, token())
            await conn.send({"op": "sync", "id": 1})
            frames = await conn.until("snapshot_end")
            begin = frames[0]
            assert begin["type"] == "snapshot_begin"
            # A filtered snapshot announces no count: it would tell about B's records.
            assert begin.get("count") is None
            copy: dict[Key, Any] = {}
            apply(copy, frames)
            assert copy == desk.filtered()
            assert frames[-1]["count"] == len(copy)
            assert_keys_were_in_view(frames, desk)
            # The same without naming collections, and naming exactly the readable ones.
            await conn.send({"op": "sync", "collections": ["positions"]})
            frames = await conn.until("snapshot_end")
            assert {f["key"] for f in frames if f["type"] == "record"} == {
                k for c, k in desk.filtered() if c == "positions"
            }
            assert_no_marker(conn.raw, kind)
            assert await clients.full_state() == desk.model  # the model is right

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_live_changes_hold_only_the_view(desk: Desk, kind: Kind) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.open(kind, token())
            await conn.send({"op": "sync", "live": True})
            frames = await conn.until("snapshot_end")
            for rnd in range(1, 4):
                await asyncio.to_thread(desk.churn, rnd)
            key = await asyncio.to_thread(desk.sentinel)
            frames += await conn.until(is_key(key))
            copy: dict[Key, Any] = {}
            apply(copy, frames)
            assert copy == desk.filtered()
            assert_keys_were_in_view(frames, desk)
            # Records that moved out arrived as deletes, with no value.
            moved_out = [f for f in frames if f.get("key", "").startswith(("MOVE-", "HOP-OUT-"))]
            assert any(f.get("deleted") for f in moved_out)
            assert_no_marker(conn.raw, kind)

    asyncio.run(main())


@pytest.mark.parametrize("retain", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_moves_out_of_the_view_reach_live_subscribers_whatever_the_retain(
    kind: Kind, retain: int
) -> None:
    """§3.7: a live filtered subscriber gets a delete for every record that stops
    matching, however few changes the server retains for resume (``--retain``: 0, or
    fewer than the changes of one batch)."""
    srv = embedded(retain=retain)
    desk = Desk(srv.publish, srv)

    async def main() -> None:
        async with Clients.of(srv) as clients:
            conn = await clients.open(kind, token())
            await conn.send({"op": "sync", "live": True})
            frames = await conn.until("snapshot_end")
            # One batch of three moves out, then single ones, then back in and out.
            await desk.apublish(
                [Change("orders", f"MOVE-{n}", move_value("B", n, 1)) for n in (2, 4, 0)]
            )
            await desk.apublish([Change("orders", "ORD-A-5", value("B", "SECRET-B-o5"))])
            await desk.apublish([Change("orders", "MOVE-0", move_value("A", 0, 2))])
            await desk.apublish([Change("orders", "MOVE-0", move_value("B", 0, 3))])
            key = await asyncio.to_thread(desk.sentinel)
            frames += await conn.until(is_key(key))
            copy: dict[Key, Any] = {}
            apply(copy, frames)
            assert_no_marker(conn.raw, kind)
            stale = sorted(k for c, k in set(copy) - set(desk.filtered()))
            assert stale == [], f"records that left the view are still in the copy: {stale}"
            assert copy == desk.filtered()

    try:
        desk.seed()
        asyncio.run(main())
    finally:
        srv.stop_in_thread(timeout=30)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_moves_while_away_and_reconnect(desk: Desk, kind: Kind) -> None:
    async def main() -> None:
        srv = server_of(desk)
        async with Clients.of(srv) as clients:
            conn = await clients.open(kind, token())
            await conn.send({"op": "sync", "live": True})
            frames = await conn.until("snapshot_end")
            await asyncio.to_thread(desk.churn, 1)
            key = await asyncio.to_thread(desk.sentinel)
            frames += await conn.until(is_key(key))
            last = frames[-1]["seq"]
            copy: dict[Key, Any] = {}
            apply(copy, frames)
            raw = bytes(conn.raw)
            await conn.close()
            # Away: records move between A and B, B's records change.
            for rnd in (2, 3):
                await asyncio.to_thread(desk.churn, rnd)
            conn = await clients.open(kind, token())
            await conn.send({"op": "subscribe", "from": last, "epoch": srv.epoch, "id": "r"})
            key = await asyncio.to_thread(desk.sentinel)
            resumed = await conn.until(is_key(key))
            assert resumed[0] == {"type": "subscribed", "seq": last, "epoch": srv.epoch, "id": "r"}
            apply(copy, resumed)
            assert copy == desk.filtered()
            assert_keys_were_in_view(frames + resumed, desk)
            assert_no_marker(raw + conn.raw, kind)
            # Live again after the resume.
            await asyncio.to_thread(desk.churn, 4)
            key = await asyncio.to_thread(desk.sentinel)
            live = await conn.until(is_key(key))
            apply(copy, live)
            assert copy == desk.filtered()
            assert_no_marker(conn.raw, kind)
            await conn.close()
            # Reconnect and sync afresh.
            conn = await clients.open(kind, token())
            await conn.send({"op": "sync"})
            fresh: dict[Key, Any] = {}
            apply(fresh, await conn.until("snapshot_end"))
            assert fresh == desk.filtered()
            assert_no_marker(conn.raw, kind)

    asyncio.run(main())


WIDER_WHERES: list[object] = [
    {"account": {"in": ["A", "B"]}},
    {"account": "B"},
    {"note": "SECRET-B-1"},
    {"account": {"in": ["B"]}, "note": {"in": ["SECRET-B-0", "PUBLIC-A-0"]}},
    {},
    None,
]


def narrowed(desk: Desk, where: object) -> dict[Key, Any]:
    """What the trader sees with ``where`` in its request: its view AND the request."""
    if not isinstance(where, dict) or not where:
        return desk.filtered()
    return {k: v for k, v in desk.filtered().items() if matches(where, v)}


@pytest.mark.parametrize("kind", KINDS)
def test_a_where_in_the_request_never_widens_the_view(desk: Desk, kind: Kind) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.open(kind, token())
            for where in WIDER_WHERES:
                await conn.send({"op": "sync", "where": where})
                frames = await conn.until("snapshot_end")
                got: dict[Key, Any] = {}
                apply(got, frames)
                assert got == narrowed(desk, where), where
            # Live, with a widening where: only A's changes.
            await conn.send(
                {"op": "subscribe", "where": {"account": {"in": ["A", "B"]}}, "id": "s"}
            )
            assert (await conn.frame())["type"] == "subscribed"
            await asyncio.to_thread(desk.churn, 1)
            key = await asyncio.to_thread(desk.sentinel)
            live = await conn.until(is_key(key))
            assert_keys_were_in_view(live, desk)
            assert_no_marker(conn.raw, kind)

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_collections_it_may_not_read_are_forbidden_and_nothing_is_sent(
    desk: Desk, kind: Kind
) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.open(kind, token())
            requests: list[Frame] = [
                {"op": "sync", "collections": ["orders", "quotes"], "id": 1},
                {"op": "sync", "collections": ["quotes"], "live": True, "id": 2},
                {"op": "subscribe", "collections": ["quotes"], "id": 3},
                {"op": "subscribe", "collections": ["positions", "fills"], "from": 0, "id": 4},
                {"op": "stats", "id": 5},
            ]
            for req in requests:
                err = await conn.request(req)
                assert err["type"] == "error", (req, err)
                assert err["code"] == "forbidden", (req, err)
                assert err["id"] == req["id"]
            assert (await conn.request({"op": "ping", "id": 6}))["type"] == "pong"
            # The failed live requests did not subscribe it: it may subscribe now, and
            # a change to the unreadable collection reaches it not.
            assert (await conn.request({"op": "subscribe", "id": 7}))["type"] == "subscribed"
            await desk.apublish([Change("quotes", "SECRET-Q-1", value("A", "SECRET-Q-new"))])
            key = await asyncio.to_thread(desk.sentinel)
            frames = await conn.until(is_key(key))
            assert [f["key"] for f in frames] == [key]
            assert_no_marker(conn.raw, kind)

    asyncio.run(main())


def test_http_snapshot_holds_only_the_view(desk: Desk) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            tok = token()
            bodies = b""
            status, headers, body = await clients.get("/v1/snapshot", tok)
            assert status == 200
            assert "X-Statecast-Count" not in headers  # it would count B's records
            copy: dict[Key, Any] = {}
            frames = frames_of(body)
            apply(copy, frames)
            assert copy == desk.filtered()
            assert frames[-1] == {
                "type": "snapshot_end",
                "seq": desk.seq,
                "count": len(desk.filtered()),
            }
            bodies += body
            for where in WIDER_WHERES:
                query = {} if where is None else {"where": json.dumps(where)}
                status, _, body = await clients.get("/v1/snapshot", tok, **query)
                assert status == 200, body
                got: dict[Key, Any] = {}
                apply(got, frames_of(body))
                assert got == narrowed(desk, where), where
                bodies += body
            status, _, body = await clients.get("/v1/snapshot", tok, collections="orders")
            got = {}
            apply(got, frames_of(body))
            assert got == {k: v for k, v in desk.filtered().items() if k[0] == "orders"}
            bodies += body
            for collections in ("quotes", "orders,quotes", "positions,fills"):
                status, headers, body = await clients.get(
                    "/v1/snapshot", tok, collections=collections
                )
                assert status == 403, body
                assert headers["Content-Type"].startswith("application/json")
                err = json.loads(body)
                assert err["type"] == "error"
                assert err["code"] == "forbidden"
                bodies += body
            assert_no_marker(bodies, "http")
            # HEAD: the headers alone, with no count either, and the same refusals.
            for query, tok_, status in [
                ({}, tok, 200),
                ({"where": json.dumps({"account": {"in": ["A", "B"]}})}, tok, 200),
                ({}, None, 401),
                ({"collections": "quotes"}, tok, 403),
            ]:
                url = clients.base + "/v1/snapshot?" + urlencode(query)
                headers = {} if tok_ is None else {"Authorization": f"Bearer {tok_}"}
                async with asyncio.timeout(TIMEOUT), clients.http.head(url, headers=headers) as r:
                    assert r.status == status, (query, r.status)
                    assert "X-Statecast-Count" not in r.headers
                    assert_no_marker(await r.read(), "HEAD")

    asyncio.run(main())


# ---------------------------------------------------------------------------
# After a restart with the SQLite store


class Proc:
    """``statecast serve`` with the SQLite store and auth, TCP and HTTP ports."""

    def __init__(self, tmp: Path, db: Path) -> None:
        self.http_port = free_port()
        self.proc = ServeProcess(
            tmp,
            "--store",
            f"sqlite:{db}",
            "--auth-secret",
            SECRET,
            "--http-port",
            str(self.http_port),
            "--heartbeat",
            "off",
            "--shutdown-grace",
            "2",
        )

    def clients(self) -> Clients:
        return Clients(self.proc.port, self.http_port)

    def stop(self) -> None:
        code, out = self.proc.stop()
        assert code == 0, out


class TcpPublisher:
    """Publishes through an admin connection (for a server in another process)."""

    def __init__(self) -> None:
        self.port = 0

    def __call__(self, changes: list[Change]) -> int:
        body = {
            "op": "publish",
            "changes": [
                {"collection": c.collection, "key": c.key, "delete": True}
                if c.delete
                else {"collection": c.collection, "key": c.key, "value": c.value}
                for c in changes
            ],
        }
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as s:
            f = s.makefile("rb")
            f.readline()  # hello
            s.sendall(msgspec.json.encode({"op": "auth", "token": admin_token()}) + b"\n")
            assert b'"authed"' in f.readline()
            s.sendall(msgspec.json.encode(body) + b"\n")
            ack = msgspec.json.decode(f.readline())
            f.close()
        assert ack["type"] == "ack", ack
        return int(ack["seq"])


class RestartRun:
    """A trader of A against ``statecast serve`` with the SQLite store: a copy made
    before a restart, resumed from several points after it."""

    def __init__(self, tmp: Path, kind: Kind) -> None:
        self.tmp = tmp
        self.db = tmp / "desk.db"
        self.kind = kind
        self.publisher = TcpPublisher()
        self.desk = Desk(self.publisher)
        self.proc = self.start()
        self.outcomes: list[str] = []  # per resume: "resumed" or "resync"
        self.raw = b""  # every byte the trader received
        self.epoch = ""

    def start(self) -> Proc:
        proc = Proc(self.tmp, self.db)
        self.publisher.port = proc.proc.port
        return proc

    def restart(self) -> None:
        self.proc.stop()
        self.proc = self.start()

    async def before_restart(self) -> tuple[dict[Key, Any], list[int]]:
        """A live copy, and the seqs it could resume from."""
        desk = self.desk
        async with self.proc.clients() as clients:
            conn = await clients.open(self.kind, token())
            self.epoch = str(conn.hello["epoch"])
            await conn.send({"op": "sync", "live": True})
            frames = await conn.until("snapshot_end")
            points = [frames[-1]["seq"]]
            await asyncio.to_thread(desk.churn, 1)  # creates, moves, deletes
            points.append(desk.seq)
            # From here on, only rewrites of keys whose previous version is in the log.
            await desk.apublish([Change("orders", "ORD-A-1", value("A", "PUBLIC-A-r"))])
            await desk.apublish(
                [
                    Change("orders", "MOVE-0", move_value("B", 0, 9)),
                    Change("orders", "MOVE-1", move_value("A", 1, 9)),
                    Change("orders", "SECRET-B-ORD-7", value("B", "SECRET-B-r")),
                ]
            )
            key = await asyncio.to_thread(desk.sentinel)
            frames += await conn.until(is_key(key))
            copy: dict[Key, Any] = {}
            apply(copy, frames)
            assert copy == desk.filtered()
            self.raw += bytes(conn.raw)
            return copy, points

    async def resume(self, clients: Clients, point: int, replica: dict[Key, Any]) -> None:
        """Resume from ``point`` a copy that was exact at ``point`` or later; on
        resync_required, sync afresh. Either way the copy ends equal to the view."""
        desk, epoch = self.desk, self.epoch
        conn = await clients.open(self.kind, token())
        assert conn.hello["epoch"] == epoch  # the SQLite store keeps its history
        await conn.send({"op": "subscribe", "from": point, "epoch": epoch, "id": "r"})
        first = await conn.frame()
        if first["type"] == "error":
            assert first["code"] == "resync_required", first
            self.outcomes.append("resync")
            await conn.send({"op": "sync", "live": True})
            replica.clear()
            apply(replica, await conn.until("snapshot_end"))
            assert replica == desk.filtered()
        else:
            assert first == {"type": "subscribed", "seq": point, "epoch": epoch, "id": "r"}
            self.outcomes.append("resumed")
        key = await asyncio.to_thread(desk.sentinel)
        frames = await conn.until(is_key(key))
        assert_keys_were_in_view(frames, desk)
        apply(replica, frames)
        assert replica == desk.filtered(), (point, self.outcomes)
        self.raw += bytes(conn.raw)
        await conn.close()

    async def after_restart(self, copy: dict[Key, Any], points: list[int]) -> None:
        async with self.proc.clients() as clients:
            for point in [0, *points]:
                await self.resume(clients, point, dict(copy))
            # Changes made after the restart, then a resume across them.
            conn = await clients.open(self.kind, token())
            await conn.send({"op": "sync", "live": True})
            frames = await conn.until("snapshot_end")
            mine: dict[Key, Any] = {}
            apply(mine, frames)
            self.raw += bytes(conn.raw)
            await conn.close()
            await asyncio.to_thread(self.desk.churn, 5)
            await self.resume(clients, frames[-1]["seq"], mine)
            assert await clients.full_state() == self.desk.model


@pytest.mark.parametrize("kind", ["tcp", "ws-auth"])
def test_filtered_resume_after_a_restart_is_exact_or_resync(tmp_path: Path, kind: Kind) -> None:
    """With the SQLite store, a change loaded from disk may not know the version it
    replaced: a filtered resume through it either resumes exactly or is refused with
    resync_required, and never sends a byte of B's."""
    run = RestartRun(tmp_path, kind)
    try:
        run.desk.seed()
        copy, points = asyncio.run(run.before_restart())
        run.restart()
        asyncio.run(run.after_restart(copy, points))
    finally:
        run.proc.proc.stop()
    assert_no_marker(run.raw, f"{kind} across a restart")
    # From the last point before the restart only keys whose previous version the log
    # holds changed, and after the restart every change knows its previous version:
    # both must resume, not refuse.
    assert run.outcomes[len(points)] == "resumed", run.outcomes
    assert run.outcomes[-1] == "resumed", run.outcomes


# ---------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize("what", list(bad_tokens()))
@pytest.mark.parametrize("kind", ["tcp", "ws-auth"])
def test_a_bad_token_is_unauthorized_and_closes(desk: Desk, kind: Kind, what: str) -> None:
    bad = bad_tokens()[what]

    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.raw(kind)
            await conn.send({"op": "auth", "token": bad, "id": "t"})
            err = await conn.frame()
            assert err["type"] == "error", err
            assert err["code"] == "unauthorized", err
            assert err["id"] == "t"
            if bad:
                assert bad not in err["message"]  # never echo the token
            # Then closed: even a request sent now gets nothing.
            await conn.send({"op": "sync"})
            assert await conn.closed_by_server()
            assert_no_marker(conn.raw, what)

    asyncio.run(main())


# HTTP parses header lines of at most 8,190 bytes: a longer token is refused by the
# HTTP parser itself (400) before statecast sees it.
@pytest.mark.parametrize("what", [w for w in bad_tokens() if w != "too long"])
def test_a_bad_bearer_token_is_401_over_http(desk: Desk, what: str) -> None:
    bad = bad_tokens()[what]

    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            tok = bad or " "
            for status, headers, body in [
                await clients.get("/v1/snapshot", tok),
                await clients.get("/ws", tok),  # the upgrade is refused before it starts
                await clients.post(
                    "/v1/publish",
                    {"changes": [{"collection": "orders", "key": "X", "value": 1}]},
                    tok,
                ),
            ]:
                assert status == 401, body
                assert headers["Content-Type"].startswith("application/json")
                err = json.loads(body)
                assert err["type"] == "error"
                assert err["code"] == "unauthorized"
                assert_no_marker(body, what)
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await clients.raw("ws-header", bearer=tok)
            assert exc.value.status == 401
            assert await clients.seq() == desk.seq  # nothing was published

    asyncio.run(main())


FIRST_REQUESTS: list[Frame | bytes] = [
    {"op": "sync"},
    {"op": "sync", "live": True, "where": A_ONLY},
    {"op": "subscribe", "from": 0},
    {"op": "ping"},
    {"op": "stats"},
    {"op": "publish", "changes": [{"collection": "orders", "key": "X", "value": 1}]},
    b"sync\n",
    b"watch\n",
    b"nonsense\n",
    b"{not json\n",
    b'["auth"]\n',
]


@pytest.mark.parametrize("first", FIRST_REQUESTS, ids=lambda r: str(r)[:40])
@pytest.mark.parametrize("kind", ["tcp", "ws-auth"])
def test_anything_but_auth_first_is_unauthorized_and_closes(
    desk: Desk, kind: Kind, first: Frame | bytes
) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.raw(kind)
            # Sent together with a valid auth: the first request decides.
            data = first if isinstance(first, bytes) else msgspec.json.encode(first) + b"\n"
            auth = msgspec.json.encode({"op": "auth", "token": token()}) + b"\n"
            await conn.send(data + auth if kind == "tcp" else data)
            frames = await conn.rest()
            assert [f["code"] for f in frames] == ["unauthorized"], frames
            assert_no_marker(conn.raw, kind)
            assert await clients.seq() == desk.seq

    asyncio.run(main())


def test_http_without_a_token_is_401(desk: Desk) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            body = {"changes": [{"collection": "orders", "key": "X", "value": 1}]}
            for status, _, data in [
                await clients.get("/v1/snapshot"),
                await clients.post("/v1/publish", body),
            ]:
                assert status == 401
                assert json.loads(data)["code"] == "unauthorized"
                assert_no_marker(data)
            async with clients.http.get(
                clients.base + "/v1/snapshot", headers={"Authorization": f"Basic {token()}"}
            ) as r:
                assert r.status == 401
            assert await clients.seq() == desk.seq

    asyncio.run(main())


def test_a_token_whose_where_is_not_a_filter_is_refused_everywhere(desk: Desk) -> None:
    """§3.8: a token is accepted whole or not at all. ``auth`` refuses a token whose
    ``where`` claim is not a valid filter (unauthorized, closed); over HTTP the same
    token must be refused the same way (401 unauthorized) on every endpoint, and a
    publish with it must apply nothing."""
    bad = token("engine", read=None, publish=None, where={"account": {"gt": "A"}})

    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.raw("tcp")
            err = await conn.request({"op": "auth", "token": bad})
            assert err["code"] == "unauthorized", err
            assert await conn.closed_by_server()
            seq = await clients.seq()
            answers = {}
            status, _, body = await clients.get("/v1/snapshot", bad)
            answers["GET /v1/snapshot"] = (status, json.loads(body).get("code"))
            status, _, body = await clients.post(
                "/v1/publish",
                {"changes": [{"collection": "orders", "key": "SHOULD-NOT", "value": 1}]},
                bad,
            )
            answers["POST /v1/publish"] = (status, json.loads(body).get("code"))
            answers["seq after the publish"] = (await clients.seq(), None)
            assert answers == {
                "GET /v1/snapshot": (401, "unauthorized"),
                "POST /v1/publish": (401, "unauthorized"),
                "seq after the publish": (seq, None),
            }

    asyncio.run(main())


@pytest.mark.parametrize("kind", [*KINDS, "http"])
def test_publishing_outside_the_claim_is_forbidden_and_applies_nothing(
    desk: Desk, kind: str
) -> None:
    engine = token("engine", read=None, publish=["orders"], where=None)
    trader = token()  # publishes nothing
    batches: list[tuple[str, list[Frame], str]] = [
        (
            engine,
            [
                {"collection": "orders", "key": "ORD-A-0", "value": value("A", "forged")},
                {"collection": "positions", "key": "POS-A-0", "value": value("A", "forged")},
            ],
            "positions",
        ),
        (engine, [{"collection": "quotes", "key": "Q", "delete": True}], "quotes"),
        (trader, [{"collection": "orders", "key": "ORD-A-0", "value": 1}], "orders"),
    ]

    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            before = await clients.full_state()
            seq = await clients.seq()
            for tok, changes, name in batches:
                body = {"op": "publish", "changes": changes, "id": 3}
                if kind == "http":
                    status, _, data = await clients.post("/v1/publish", body, tok)
                    assert status == 403, data
                    err = json.loads(data)
                else:
                    conn = await clients.open(cast(Kind, kind), tok)
                    err = await conn.request(body)
                    assert err["id"] == 3
                    # Still open, and still allowed what the token allows.
                    assert (await conn.request({"op": "ping"}))["seq"] == seq
                    await conn.close()
                assert err["code"] == "forbidden", err
                assert name in err["message"]
            assert await clients.seq() == seq
            assert await clients.full_state() == before
            # What the claim allows goes through.
            ok = {"changes": [{"collection": "orders", "key": "ORD-A-0", "value": 1}]}
            status, _, data = await clients.post("/v1/publish", ok, engine)
            assert status == 200, data

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Refresh and expiry


async def wait_until(unix_time: float) -> None:
    """Sleep until the wall clock passes ``unix_time`` (a few seconds at most)."""
    delay = unix_time - time.time()
    assert delay < TIMEOUT, delay
    await asyncio.sleep(max(0.0, delay))


def exp_of(tok: str) -> float:
    return float(jwt.decode(tok, options={"verify_signature": False})["exp"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_refresh_keeps_the_connection_past_the_first_exp(desk: Desk, kind: Kind) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            short = token(ttl=2)
            conn = await clients.open(kind, short)
            assert (await conn.request({"op": "subscribe", "id": 1}))["type"] == "subscribed"
            fresh = token(ttl=120)
            authed = await conn.request({"op": "auth", "token": fresh, "id": "r"})
            assert authed["type"] == "authed", authed
            assert authed["exp"] == int(exp_of(fresh))
            # Past the first token's end, and a tick or two more.
            await wait_until(exp_of(short) + 2.5)
            key = await asyncio.to_thread(desk.sentinel)
            frames = await conn.until(is_key(key))
            assert [f["type"] for f in frames] == ["change"]
            assert (await conn.request({"op": "ping"}))["type"] == "pong"
            assert_no_marker(conn.raw, kind)

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_refresh_for_another_sub_or_wider_is_forbidden_and_the_old_grant_stays(
    desk: Desk, kind: Kind
) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            short = token(ttl=2)
            conn = await clients.open(kind, short)
            assert (await conn.request({"op": "subscribe"}))["type"] == "subscribed"
            for other in [
                token("bob", ttl=120),
                token("alice", read=None, where=None, ttl=120),  # wider
                token("alice", where={"account": {"in": ["A", "B"]}}, ttl=120),
                token("alice", where=None, ttl=120),
            ]:
                err = await conn.request({"op": "auth", "token": other, "id": "x"})
                assert (err["type"], err["code"]) == ("error", "forbidden"), err
            # Still the old grant: still filtered, then ended at its exp.
            await asyncio.to_thread(desk.churn, 1)
            key = await asyncio.to_thread(desk.sentinel)
            frames = await conn.until(is_key(key))
            assert_keys_were_in_view(frames, desk)
            rest = await conn.rest()
            assert [f.get("code") for f in rest] == ["token_expired"], rest
            assert time.time() >= exp_of(short)
            assert_no_marker(conn.raw, kind)

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_expiry_without_refresh_closes_with_token_expired(desk: Desk, kind: Kind) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            short = token(ttl=2)
            live = await clients.open(kind, short)
            await live.send({"op": "sync", "live": True})
            await live.until("snapshot_end")
            idle = await clients.open(kind, short)  # authenticated, asks nothing
            for conn in (live, idle):
                rest = await conn.rest()
                assert [f["type"] for f in rest] == ["error"], rest
                assert rest[0]["code"] == "token_expired"
                assert time.time() >= exp_of(short)
            # The expired token is now refused as a new auth.
            conn = await clients.raw("tcp")
            err = await conn.request({"op": "auth", "token": short})
            assert err["code"] == "unauthorized"
            assert "expired" in err["message"]

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Open endpoints, and safe defaults


def test_metrics_health_and_readiness_need_no_token_and_hold_no_record(desk: Desk) -> None:
    async def main() -> None:
        async with Clients.of(server_of(desk)) as clients:
            conn = await clients.open("tcp", token())  # some traffic to count
            await conn.send({"op": "sync", "live": True})
            await conn.until("snapshot_end")
            await conn.request({"op": "stats"})
            await asyncio.to_thread(desk.churn, 1)
            for path in ("/healthz", "/readyz", "/metrics"):
                for tok in (None, "garbage"):
                    status, _, body = await clients.get(path, tok)
                    assert status == 200, (path, body)
                    assert_no_marker(body, path)
                    for _, key in desk.model:
                        assert key.encode() not in body, (path, key)
            _, _, metrics = await clients.get("/metrics")
            for marker in (b"ORD-A", b"POS-A", b"MOVE-", b"PUBLIC-A", b"SENTINEL"):
                assert marker not in metrics
            assert b'statecast_errors_total{code="forbidden"} 1.0' in metrics

    asyncio.run(main())


def served(proc: ServeProcess) -> None:
    """Wait until the server answers on 127.0.0.1 (its SIGTERM handler is installed
    then: the "listening" line comes a moment before it)."""
    with (
        socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT) as s,
        s.makefile("rb") as f,
    ):
        assert f.readline().startswith(b'{"type":"hello"')


def test_listening_beyond_loopback_needs_auth_or_insecure(tmp_path: Path) -> None:
    base = [*CMD, "serve", "--port", "0", "--http-port", "off", "--store", "memory"]
    # Never started, so nothing listens: the check is on the settings.
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        r = subprocess.run(
            [*base, "--host", host],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 3,
            check=False,
        )
        assert r.returncode == 2, (host, r.stdout, r.stderr)
        assert "--insecure" in r.stderr
        assert "--auth-secret" in r.stderr
    # With --insecure it starts and warns (traffic only over 127.0.0.1).
    proc = ServeProcess(tmp_path, "--host", "0.0.0.0", "--insecure", "--store", "memory")
    served(proc)
    code, out = proc.stop()
    assert code == 0, out
    warnings = [ln for ln in out.splitlines() if "WARNING" in ln]
    assert any("--insecure" in ln and "0.0.0.0" in ln for ln in warnings), out
    # Loopback needs neither.
    proc = ServeProcess(tmp_path, "--host", "127.0.0.1", "--store", "memory")
    served(proc)
    code, out = proc.stop()
    assert code == 0
    assert "--insecure" not in out


# ---------------------------------------------------------------------------
# Randomized: publishes moving records between accounts, random filters and resumes


ACCOUNTS = ("A", "B", "C")
DESKS = ("X", "Y")
TOKEN_WHERES: list[dict[str, object] | None] = [
    {"account": "A"},
    {"account": {"in": ["A", "C"]}},
    {"account": "B", "desk": "X"},
    None,
]
REQUEST_WHERES: list[dict[str, object] | None] = [
    None,
    {"account": "A"},
    {"desk": "Y"},
    {"account": {"in": ["B", "C"]}},
    {"account": "Z"},  # with any token's where: nothing at all
]


class Watcher:
    """One filtered client of the randomized test: its filters, a replica, the keys
    that were ever in its view, and the frames not applied yet."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n = n
        self.token_where = rng.choice(TOKEN_WHERES)
        self.request_where = rng.choice(REQUEST_WHERES)
        self.collections = rng.choice([None, ["orders"], ["orders", "positions"]])
        self.copy: dict[Key, Any] = {}
        self.ever: set[Key] = set()
        self.positions: list[int] = []  # seqs since its last sync at which it was exact
        self.conn: Conn | None = None
        self.reader: asyncio.Task[None] | None = None
        self.frames: list[Frame] = []
        self.arrived = asyncio.Event()  # set by the reader at each frame

    def sees(self, key: Key, val: object) -> bool:
        if key[0] not in (self.collections or READS):
            return False
        return matches(self.token_where, val) and matches(self.request_where, val)

    def token(self) -> str:
        return token(f"w{self.n}", read=READS, where=self.token_where)

    def request(self) -> dict[str, object]:
        req: dict[str, object] = {}
        if self.collections is not None:
            req["collections"] = self.collections
        if self.request_where is not None:
            req["where"] = self.request_where
        return req

    def check(self, frames: Sequence[Frame]) -> None:
        """Every key was in its view once, every value is in its view."""
        for f in frames:
            if "key" in f:
                k = (f["collection"], f["key"])
                assert k in self.ever, f"watcher {self.n} got a key never in its view: {f}"
                if "value" in f:
                    assert self.sees(k, f["value"]), f"watcher {self.n}: outside its view: {f}"

    def take(self) -> None:
        """Check and apply the frames received so far."""
        frames, self.frames = self.frames, []
        self.check(frames)
        apply(self.copy, frames)

    async def read(self, conn: Conn) -> None:
        while True:
            try:
                f = await conn.frame()
            except TimeoutError:
                continue  # a quiet while: keep reading
            except EOFError:
                return
            self.frames.append(f)
            self.arrived.set()

    async def wait_for(self, pred: Callable[[Frame], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not any(pred(f) for f in self.frames):
                assert self.reader is not None
                assert not self.reader.done(), f"watcher {self.n} was disconnected"
                self.arrived.clear()
                await self.arrived.wait()


def random_change(rng: random.Random, n: int) -> Change:
    collection = rng.choice(["orders", "orders", "positions", "quotes"])
    key = f"K{rng.randrange(12)}"
    r = rng.random()
    if r < 0.15:
        return Change(collection, key, delete=True)
    if r < 0.22:
        return Change(collection, key, rng.choice([None, "A", ["A"], {"account": ["A"]}]))
    acct, dsk = rng.choice(ACCOUNTS), rng.choice(DESKS)
    return Change(collection, key, {"account": acct, "desk": dsk, "n": n, "tag": f"T{acct}{dsk}"})


class RandomRun:
    """Random publishes moving records between accounts, watchers with random
    filters that disconnect and resume from random points; after each round every
    watcher's copy equals the model filtered by its view."""

    def __init__(self, seed: int, srv: Server) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.srv = srv
        self.model: dict[Key, Any] = {}
        self.watchers = [Watcher(i, self.rng) for i in range(6)]
        self.n = 0

    def publish(self, changes: list[Change]) -> int:
        seq = self.srv.publish(changes)
        for c in changes:
            k = (c.collection, c.key)
            if c.delete:
                self.model.pop(k, None)
                continue
            self.model[k] = c.value
            for w in self.watchers:
                if w.sees(k, c.value):
                    w.ever.add(k)
        return seq

    async def connect(self, clients: Clients, w: Watcher) -> None:
        conn = await clients.open("tcp", w.token())
        if w.positions and self.rng.random() < 0.8:
            # Any seq since its last sync: its copy was exact there and is exact at a
            # later seq now (a change it has applied already is harmless again).
            point = self.rng.choice(w.positions)
            req = {"op": "subscribe", "from": point, "epoch": self.srv.epoch, **w.request()}
            first = await conn.request(req)
            assert first["type"] == "subscribed", first  # the memory store keeps it all
        else:
            await conn.send({"op": "sync", "live": True, **w.request()})
            frames = await conn.until("snapshot_end")
            w.check(frames)
            w.copy = {}
            apply(w.copy, frames)
            w.positions = [frames[-1]["seq"]]
        w.conn = conn
        w.reader = asyncio.create_task(w.read(conn))

    async def disconnect(self, w: Watcher) -> None:
        assert w.conn is not None
        assert w.reader is not None
        await w.conn.close()
        w.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await w.reader
        w.take()
        w.conn = w.reader = None

    async def settle(self, rnd: int) -> None:
        """A batch with a sentinel in every view (each account and desk), then wait
        until every connected watcher has it (or, seeing none, answers a ping)."""
        sentinels = [
            Change("orders", f"S{rnd}-{a}{d}", {"account": a, "desk": d, "sentinel": rnd})
            for a in ACCOUNTS
            for d in DESKS
        ]
        seq = await asyncio.to_thread(self.publish, sentinels)
        for w in self.watchers:
            if w.conn is None:
                continue
            if any(w.sees((c.collection, c.key), c.value) for c in sentinels):
                await w.wait_for(lambda f: str(f.get("key", "")).startswith(f"S{rnd}-"))
            else:  # it sees nothing at all: a round trip shows nothing was sent
                await w.conn.send({"op": "ping", "id": f"p{rnd}"})
                await w.wait_for(lambda f: f.get("id") == f"p{rnd}")
            w.take()
            expected = {k: v for k, v in self.model.items() if w.sees(k, v)}
            assert w.copy == expected, f"watcher {w.n} (seed {self.seed}, round {rnd})"
            w.positions.append(seq)

    async def run(self, rounds: int) -> None:
        rng = self.rng
        async with Clients(self.srv.port, None) as clients:
            for w in self.watchers:
                await self.connect(clients, w)
            for rnd in range(rounds):
                for _ in range(rng.randrange(1, 6)):
                    batch = [random_change(rng, self.n + i) for i in range(rng.randrange(1, 5))]
                    self.n += len(batch)
                    await asyncio.to_thread(self.publish, batch)
                    w = rng.choice(self.watchers)
                    if w.conn is not None and rng.random() < 0.3:
                        await self.disconnect(w)
                await self.settle(rnd)
                for w in self.watchers:
                    if w.conn is None:
                        await self.connect(clients, w)
            for w in self.watchers:
                await self.disconnect(w)
            assert await clients.full_state() == self.model


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_randomized_filtered_clients_over_tcp(seed: int) -> None:
    srv = embedded(http_port=None)
    try:
        asyncio.run(RandomRun(seed, srv).run(rounds=12))
    finally:
        srv.stop_in_thread(timeout=30)
