"""Hostile clients over real sockets: one regression test per finding of the attack
review (poison values, crashes on client input, fairness, backpressure, big flushes,
leaks without the cycle collector, bounds for idle and stalled clients, small protocol
slips, and a replica fed garbage).

No test asserts on time: every wait is bounded by a multiple of ``TIMEOUT``, and the
assertions are on frames, codes, counts and bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from statecast import Change, Replica, Server
from tests.helpers import TIMEOUT, LineClient, ServeProcess, frames_of, wait_for

Frame = dict[str, Any]
MiB = 1 << 20

# Answers that end a request (§3): every request line gets exactly one of them.
TERMINAL = frozenset({"ack", "pong", "subscribed", "error", "stats", "authed", "snapshot_end"})

# Invalid UTF-8: a byte that is never UTF-8, an encoded surrogate, an overlong NUL.
BAD_UTF8 = [b"\xff", b"\xed\xa0\x80", b"\xc0\x80"]


# -- helpers -----------------------------------------------------------------------------


def strict_frames(data: bytes) -> list[Frame]:
    """Every line of ``data`` as a frame, checking §9's promise on the way: valid UTF-8,
    no raw control character (no CR, no tab: one compact line), one JSON object."""
    out = []
    for line in data.split(b"\n"):
        if not line:
            continue
        line.decode("utf-8")  # strict: no invalid UTF-8, no encoded surrogate
        bad = [b for b in line if b < 0x20]
        assert not bad, f"raw control bytes {bad!r} in frame {line[:200]!r}"
        obj = msgspec.json.decode(line)
        assert isinstance(obj, dict), line[:200]
        out.append(obj)
    return out


def raw_lines(data: bytes) -> list[bytes]:
    return [ln for ln in data.split(b"\n") if ln]


def recv_until(sock: socket.socket, marker: bytes, timeout: float = TIMEOUT) -> bytes:
    """Bytes up to and including the first line holding ``marker`` (bounded)."""
    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        cut = buf.find(marker)
        if cut >= 0:
            end = buf.find(b"\n", cut)
            if end >= 0:
                return buf[: end + 1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {buf[-300:]!r}")
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError(f"closed before {marker!r}; got {buf[-300:]!r}")
        buf += chunk


def read_to_eof(sock: socket.socket, timeout: float = TIMEOUT, limit: int = 256 * MiB) -> bytes:
    """Everything until the peer closes (EOF or reset); fails if it stays open."""
    sock.settimeout(timeout)
    chunks = []
    total = 0
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"still open after {timeout}s")
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"still open after {timeout}s") from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        assert total < limit
    return b"".join(chunks)


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes ``sock`` within ``timeout`` (reading what comes)."""
    try:
        read_to_eof(sock, timeout)
    except AssertionError:
        return False
    return True


def rst_close(sock: socket.socket) -> None:
    """Close with a reset (linger on, timeout 0): the client vanishes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def bad_log_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Log records that betray a crash: an error, a traceback, an ``internal`` error.
    (asyncio debug mode's "Executing <Handle> took 0.1 seconds" is the machine's load;
    it names the task's coroutine, which may be a test whose name says "internal".)"""
    return [r for r in caplog.records if not _slow_callback(r) and _betrays_a_crash(r)]


def _slow_callback(r: logging.LogRecord) -> bool:
    return (
        r.name.startswith("asyncio")
        and r.levelno < logging.ERROR
        and not r.exc_info
        and r.getMessage().startswith("Executing ")
    )


def _betrays_a_crash(r: logging.LogRecord) -> bool:
    message = r.getMessage().lower()
    return bool(
        r.levelno >= logging.ERROR
        or r.exc_info
        or "traceback" in message
        or "internal" in message
        or r.name.startswith("asyncio")
    )


def assert_clean_log(caplog: pytest.LogCaptureFixture) -> None:
    bad = bad_log_records(caplog)
    assert bad == [], [(r.name, r.levelname, r.getMessage()[:300]) for r in bad]
    assert "Traceback" not in caplog.text


def http_base(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.http_port}"


def http_get(url: str, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def http_post(url: str, body: bytes, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


async def ws_messages(ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[Frame]:
    """Every frame of every text message (frames of one message are split by ``\\n``),
    each checked like :func:`strict_frames`."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            return
        data = msg.data.encode()
        assert not data.endswith(b"\n"), "no newline after a message's last frame (§10)"
        for f in strict_frames(data):
            yield f


async def ws_read_until(frames: AsyncIterator[Frame], ftype: str) -> list[Frame]:
    out = []
    async with asyncio.timeout(TIMEOUT):
        async for f in frames:
            out.append(f)
            if f["type"] == ftype:
                return out
    raise AssertionError(f"the WebSocket closed before a {ftype} frame: {out[-3:]}")


def publish_line(changes: list[Frame] | bytes, rid: object = None) -> bytes:
    body = changes if isinstance(changes, bytes) else msgspec.json.encode(changes)
    tail = b"" if rid is None else b',"id":' + msgspec.json.encode(rid)
    return b'{"op":"publish","changes":' + body + tail + b"}\n"


def raw_change(collection: bytes, key: bytes, value: bytes) -> bytes:
    return b'{"collection":"' + collection + b'","key":"' + key + b'","value":' + value + b"}"


@pytest.fixture
def srv(caplog: pytest.LogCaptureFixture) -> Iterator[Server]:
    """A memory-store server with its HTTP port, its log captured from here on."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory", port=0, http_port=0, heartbeat=None, shutdown_grace=2
    ).start_in_thread()
    try:
        yield s
    finally:
        s.stop_in_thread(timeout=30)


# == 1. Poison values ====================================================================

PRETTY = (
    b'{"changes":[{"collection":"c","key":"k","value":{\n"x":1}},\n'
    b'  {"collection":"c","key":"deep","value":{\n    "a" : [ 1,\r\n 2.50 ],\n'
    b'\t"s" : "two  words\\n, a tab\\t",\n    "o" : { }\n}\n}\n]}'
)
PRETTY_STORED = {b"k": b'{"x":1}', b"deep": b'{"a":[1,2.50],"s":"two  words\\n, a tab\\t","o":{}}'}


def test_pretty_printed_http_publish_is_stored_compact(srv: Server) -> None:
    """Finding 1: a pretty-printed POST /v1/publish is stored compact, so every frame
    that carries it (change over TCP and WebSocket, record of a sync and of
    /v1/snapshot) is one line."""
    sub = LineClient(srv.port)
    live = LineClient(srv.port)
    try:
        assert sub.request({"op": "subscribe", "id": "s"})["type"] == "subscribed"
        live.send({"op": "sync", "live": True, "id": "l"})
        live.read_until("snapshot_end")

        async def main() -> tuple[list[Frame], bytes]:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(http_base(srv) + "/ws") as ws:
                    frames = ws_messages(ws)
                    await ws_read_until(frames, "hello")
                    await ws.send_str('{"op":"subscribe","id":"w"}')
                    await ws_read_until(frames, "subscribed")
                    async with http.post(http_base(srv) + "/v1/publish", data=PRETTY) as r:
                        assert r.status == 200, await r.text()
                        assert (await r.json())["type"] == "ack"
                    ws_changes = [await anext(frames), await anext(frames)]
                async with http.get(http_base(srv) + "/v1/snapshot") as r:
                    assert r.status == 200
                    snapshot = await r.read()
            return ws_changes, snapshot

        ws_changes, snapshot = asyncio.run(main())
        assert [f["type"] for f in ws_changes] == ["change", "change"]

        def check(lines: list[bytes], kind: bytes) -> None:
            got = {}
            for line in lines:
                strict_frames(line)
                if line.startswith(b'{"type":"' + kind + b'"'):
                    f = msgspec.json.decode(line)
                    value = line[line.index(b',"value":') + 9 : -1]
                    got[f["key"].encode()] = value
            assert got == PRETTY_STORED, lines

        sub_data = recv_until(sub.sock, b'"key":"deep"')
        check(raw_lines(sub_data), b"change")
        live_data = recv_until(live.sock, b'"key":"deep"')
        check(raw_lines(live_data), b"change")
        check(raw_lines(snapshot), b"record")
        with LineClient(srv.port) as fresh:
            fresh.send(b"sync\n")
            check(raw_lines(recv_until(fresh.sock, b"snapshot_end")), b"record")
    finally:
        sub.close()
        live.close()


def test_raw_cr_and_tabs_over_tcp_and_ws_are_stored_compact(srv: Server) -> None:
    """Finding 1: raw CR and tabs between the tokens of a value (over TCP, and in a
    WebSocket message) are whitespace, removed: what subscribers get is one line."""
    sub = LineClient(srv.port)
    try:
        assert sub.request({"op": "subscribe"})["type"] == "subscribed"
        value = b'\t{\r"a"\t:\r[1,\t\r2]\r,\t"s":"x y"\r}\r'
        with LineClient(srv.port) as pub:
            pub.send(publish_line(b"[" + raw_change(b"c", b"tcp", value) + b"]", 1))
            assert pub.read() == {"type": "ack", "seq": 1, "id": 1}

        async def over_ws() -> None:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(http_base(srv) + "/ws") as ws,
            ):
                frames = ws_messages(ws)
                await ws_read_until(frames, "hello")
                line = publish_line(b"[" + raw_change(b"c", b"ws", value) + b"]", 2)
                await ws.send_str(line.decode())
                assert (await ws_read_until(frames, "ack"))[-1]["seq"] == 2

        asyncio.run(over_ws())
        data = recv_until(sub.sock, b'"key":"ws"')
        lines = raw_lines(data)
        strict_frames(data)
        assert lines == [
            b'{"type":"change","seq":1,"collection":"c","key":"tcp","value":{"a":[1,2],"s":"x y"}}',
            b'{"type":"change","seq":2,"collection":"c","key":"ws","value":{"a":[1,2],"s":"x y"}}',
        ]
    finally:
        sub.close()


@pytest.mark.parametrize("bad", BAD_UTF8, ids=["ff", "surrogate", "overlong"])
@pytest.mark.parametrize("transport", ["tcp", "ws-binary", "http"])
def test_invalid_utf8_value_is_refused_naming_the_change(
    srv: Server, caplog: pytest.LogCaptureFixture, transport: str, bad: bytes
) -> None:
    """Finding 1: invalid UTF-8 in a value is bad_request naming the change, over every
    transport, and nothing of its batch is applied."""
    good = raw_change(b"c", b"good", b"1")
    batches = [
        (b"[" + raw_change(b"c", b"k", b'"a' + bad + b'b"') + b"]", "changes[0]"),
        (b"[" + good + b"," + raw_change(b"c", b"k", b'{"x":"' + bad + b'"}') + b"]", "changes[1]"),
        (b"[" + good + b"," + raw_change(b"c", b"k", b'["' + bad + b'"]') + b"]", "changes[1]"),
    ]
    answers: list[tuple[int, Frame]] = []
    if transport == "tcp":
        with LineClient(srv.port) as c:
            for i, (changes, _) in enumerate(batches):
                c.send(publish_line(changes, i))
                answers.append((400, c.read()))
            assert c.request({"op": "ping", "id": "p"})["seq"] == 0  # still usable
    elif transport == "ws-binary":

        async def main() -> None:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(http_base(srv) + "/ws") as ws,
            ):
                frames = ws_messages(ws)
                await ws_read_until(frames, "hello")
                for i, (changes, _) in enumerate(batches):
                    await ws.send_bytes(publish_line(changes, i))
                    answers.append((400, (await ws_read_until(frames, "error"))[-1]))

        asyncio.run(main())
    else:
        for changes, _ in batches:
            status, body = http_post(
                http_base(srv) + "/v1/publish", b'{"changes":' + changes + b"}"
            )
            answers.append((status, msgspec.json.decode(body)))
    for (status, answer), (_, where) in zip(answers, batches, strict=True):
        assert status == 400
        assert answer["type"] == "error", answer
        assert answer["code"] == "bad_request", answer
        assert answer["message"].startswith(where), answer
    assert srv.seq == 0  # nothing applied
    assert_clean_log(caplog)


# == 2. No internal error, no traceback, from client input ===============================

TCP_POISON = [
    # invalid UTF-8 in a key, an op, an id, a collection name, a where filter
    *(publish_line(b"[" + raw_change(b"c", b"k" + b, b"1") + b"]") for b in BAD_UTF8),
    *(publish_line(b"[" + raw_change(b"c" + b, b"k", b"1") + b"]") for b in BAD_UTF8),
    *(b'{"op":"pi' + b + b'ng","id":1}\n' for b in BAD_UTF8),
    *(b'{"op":"' + b + b'"}\n' for b in BAD_UTF8),
    *(b'{"op":"ping","id":"' + b + b'"}\n' for b in BAD_UTF8),
    *(b'{"op":"sync","collections":["c' + b + b'"]}\n' for b in BAD_UTF8),
    *(b'{"op":"subscribe","collections":["' + b + b'"]}\n' for b in BAD_UTF8),
    *(b'{"op":"sync","where":{"f' + b + b'":1}}\n' for b in BAD_UTF8),
    *(b'{"op":"sync","where":{"f":{"in":["' + b + b'"]}}}\n' for b in BAD_UTF8),
    *(b'{"op":"subscribe","epoch":"' + b + b'"}\n' for b in BAD_UTF8),
    *(b'{"op":"auth","token":"' + b + b'"}\n' for b in BAD_UTF8),
    *(b + b"ping\n" for b in BAD_UTF8),
    *(b"ping" + b + b"\n" for b in BAD_UTF8),
    *(b"{" + b + b"\n" for b in BAD_UTF8),
]


def deep(n: int, kind: str = "array") -> bytes:
    if kind == "array":
        return b"[" * n + b"1" + b"]" * n
    return b'{"a":' * n + b"1" + b"}" * n


DEEP_VALUES = [
    deep(n, kind) for n in (65, 1000, 1001, 5000, 100_000) for kind in ("array", "object")
]


def fenced(c: LineClient, line: bytes, fence: str) -> list[Frame]:
    """Send ``line`` and a ping fence; the frames that came before the fence's pong."""
    c.send(line)
    c.send({"op": "ping", "id": fence})
    got: list[Frame] = []
    while True:
        f = c.read()
        if f["type"] == "pong" and f.get("id") == fence:
            return got
        got.append(f)


async def ws_fenced(
    ws: aiohttp.ClientWebSocketResponse, frames: AsyncIterator[Frame], line: bytes, fence: str
) -> list[Frame]:
    try:
        await ws.send_str(line.decode())
    except UnicodeDecodeError:
        await ws.send_bytes(line)
    await ws.send_str(f'{{"op":"ping","id":"{fence}"}}')
    got: list[Frame] = []
    async with asyncio.timeout(TIMEOUT):
        async for f in frames:
            if f["type"] == "pong" and f.get("id") == fence:
                return got
            got.append(f)
    raise AssertionError(f"the WebSocket closed before the fence {fence}: {got[-3:]}")


def one_answer(got: list[Frame], line: bytes, allowed: frozenset[str]) -> None:
    """Exactly one answer to ``line``: bad_request, or one of ``allowed`` types."""
    answers = [f for f in got if f["type"] in TERMINAL]
    assert len(answers) == 1, (line[:100], got)
    a = answers[0]
    kind = a["code"] if a["type"] == "error" else a["type"]
    assert kind in allowed, (line[:100], got)


BAD = frozenset({"bad_request"})


def test_invalid_utf8_anywhere_is_bad_request_not_internal(
    srv: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 2 (and §9): a request line with invalid UTF-8 anywhere (key, op, id,
    collection name, where filter, a field the server does not know) is bad_request
    over TCP, WebSocket and HTTP; never internal, never a traceback."""
    with LineClient(srv.port) as c:
        for i, line in enumerate(TCP_POISON):
            one_answer(fenced(c, line, f"fence{i}"), line, BAD)

    async def over_ws() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(http_base(srv) + "/ws") as ws,
        ):
            frames = ws_messages(ws)
            await ws_read_until(frames, "hello")
            for i, line in enumerate(TCP_POISON):
                one_answer(await ws_fenced(ws, frames, line, f"fence{i}"), line, BAD)

    asyncio.run(over_ws())
    for b in BAD_UTF8:
        for body in [
            b'{"changes":[' + raw_change(b"c", b"k" + b, b"1") + b"]}",
            b'{"changes":[' + raw_change(b"c" + b, b"k", b"1") + b"]}",
            b'{"changes":[' + raw_change(b"c", b"k", b"1") + b'],"id":"' + b + b'"}',
            b'{"op":"' + b + b'","changes":[' + raw_change(b"c", b"k", b"1") + b"]}",
        ]:
            status, answer = http_post(http_base(srv) + "/v1/publish", body)
            assert status == 400, (body, answer)
            assert msgspec.json.decode(answer)["code"] == "bad_request"
        # (the HTTP stack decodes a query leniently: the server never sees the bytes)
        status, answer = http_get(http_base(srv) + f"/v1/snapshot?collections=c%{b[0]:02X}")
        assert status == 400, answer
        status, answer = http_get(http_base(srv) + f"/v1/snapshot?where=%7B%22%{b[0]:02X}%22:1%7D")
        assert status in (200, 400), answer
    assert srv.seq == 0
    assert_clean_log(caplog)


def test_invalid_utf8_in_an_ignored_field_is_bad_request(
    srv: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """§9: "a request line that is not valid UTF-8 ... gets bad_request", also when the
    bytes sit in a field the server ignores (msgspec skips unknown fields unchecked)."""
    lines = [b'{"op":"ping","extra":"' + b + b'"}\n' for b in BAD_UTF8]
    lines += [b'{"op":"ping","extra":{"' + b + b'":[1]}}\n' for b in BAD_UTF8]
    with LineClient(srv.port) as c:
        for i, line in enumerate(lines):
            one_answer(fenced(c, line, f"fence{i}"), line, BAD)
    for b in BAD_UTF8:
        body = b'{"changes":[' + raw_change(b"c", b"k", b"1") + b'],"x":"' + b + b'"}'
        status, answer = http_post(http_base(srv) + "/v1/publish", body)
        assert status == 400, (body, answer)
    assert srv.seq == 0
    assert_clean_log(caplog)


def test_deeply_nested_values_are_bad_request_not_internal(
    srv: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 2: a value nested 1,000+ deep (over TCP, WebSocket, and HTTP, where it
    must be 400 and not 500) is bad_request; nothing is applied, nothing is logged."""
    # (line, what may answer it): deep in an unknown field is fine as long as it parses.
    cases: list[tuple[bytes, frozenset[str]]] = []
    for v in DEEP_VALUES:
        cases.append((publish_line(b"[" + raw_change(b"c", b"k", v) + b"]"), BAD))
        cases.append((b'{"op":"ping","id":' + v + b"}\n", BAD))  # deep in an id
        cases.append((b'{"op":"sync","where":{"a":' + v + b"}}\n", BAD))  # deep in a filter
        cases.append((b'{"op":"ping","junk":' + v + b"}\n", BAD | {"pong"}))  # unknown field
    with LineClient(srv.port) as c:
        for i, (line, allowed) in enumerate(cases):
            one_answer(fenced(c, line, f"fence{i}"), line, allowed)

    async def over_ws() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(http_base(srv) + "/ws") as ws,
        ):
            frames = ws_messages(ws)
            await ws_read_until(frames, "hello")
            for i, (line, allowed) in enumerate(cases):
                got = await ws_fenced(ws, frames, line, f"fence{i}")
                one_answer(got, line, allowed)

    asyncio.run(over_ws())
    for v in DEEP_VALUES:
        for body in [
            b'{"changes":[' + raw_change(b"c", b"k", v) + b"]}",
            b'{"changes":[' + raw_change(b"c", b"k", b"1") + b'],"id":' + v + b"}",
        ]:
            status, answer = http_post(http_base(srv) + "/v1/publish", body)
            assert status == 400, (body[:80], status, answer[:200])
            assert msgspec.json.decode(answer)["code"] == "bad_request"
        body = b'{"changes":[' + raw_change(b"c", b"k", b"1") + b'],"junk":' + v + b"}"
        status, answer = http_post(http_base(srv) + "/v1/publish", body)
        assert status in (200, 400), (body[:80], status, answer[:200])
        where = urllib.parse.quote(b'{"a":' + v + b"}")
        status, answer = http_get(http_base(srv) + "/v1/snapshot?where=" + where)
        assert status == 400, (v[:40], status, answer[:200])
    # 64 levels is fine (§9), and stored as sent.
    with LineClient(srv.port) as c:
        before = c.request({"op": "ping"})["seq"]
        c.send(publish_line(b"[" + raw_change(b"c", b"k64", deep(64)) + b"]", 1))
        assert c.read()["type"] == "ack"
        c.send(b"sync\n")
        records = [f for f in c.read_until("snapshot_end") if f.get("key") == "k64"]
        assert len(records) == 1
    assert srv.seq == before + 1
    assert_clean_log(caplog)


# == 3. Fairness: floods must not starve others, nor pile up answers ===================


class Flood:
    """A client that pipelines one request line flat out on its own connection, and
    reads (and throws away) the answers when ``read``."""

    def __init__(self, port: int, line: bytes, *, read: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.settimeout(None)
        self.received = 0  # bytes of answers
        self.sent = 0
        self._stop = threading.Event()
        self._buf = line * max(1, (1 << 16) // len(line))
        self._threads = [threading.Thread(target=self._send, daemon=True)]
        if read:
            self._threads.append(threading.Thread(target=self._recv, daemon=True))
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                self.sock.sendall(self._buf)
                self.sent += len(self._buf)

    def _recv(self) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return
                self.received += len(chunk)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(TIMEOUT)
        rst_close(self.sock)


FLOOD_LINES = {
    "ping": b"ping\n",
    "json-ping": b'{"op":"ping","id":1}\n',
    "publish": publish_line([{"collection": "flood", "key": "k", "value": {"n": 1}}]),
    "nonsense": b"x\n",
}


@pytest.mark.parametrize(
    "floods",
    [("ping",), ("ping", "ping"), ("publish",), ("publish", "publish"), ("ping", "publish")],
    ids="+".join,
)
def test_flooding_clients_do_not_starve_a_probe(srv: Server, floods: tuple[str, ...]) -> None:
    """Finding 3: while connections pipeline pings or small publishes flat out, another
    client's publish -> change round trips still complete (each within TIMEOUT; counted,
    not timed)."""
    probes = 30
    sub = LineClient(srv.port)
    pub = LineClient(srv.port)
    flooders = [Flood(srv.port, FLOOD_LINES[name]) for name in floods]
    try:
        assert sub.request({"op": "subscribe", "collections": ["probe"]})["type"] == "subscribed"
        wait_for(lambda: all(f.received > 1 * MiB for f in flooders), "the floods to run")
        before = [f.received for f in flooders]
        done = 0
        for i in range(probes):
            deadline = time.monotonic() + TIMEOUT
            pub.send(publish_line([{"collection": "probe", "key": f"p{i}", "value": i}], i))
            while (answer := pub.read()).get("id") != i:
                assert time.monotonic() < deadline, f"probe {i}: no ack within {TIMEOUT}s"
            assert answer["type"] == "ack", answer
            while sub.read().get("key") != f"p{i}":
                assert time.monotonic() < deadline, f"probe {i}: no change within {TIMEOUT}s"
            assert time.monotonic() < deadline, f"probe {i} took more than {TIMEOUT}s"
            done += 1
        assert done == probes
        # The floods ran all along (they were not the ones starved, either).
        assert all(f.received > b for f, b in zip(flooders, before, strict=True))
    finally:
        for flood in flooders:
            flood.close()
        sub.close()
        pub.close()


class RssWatch:
    """Samples a process's resident memory; ``peak`` is the most seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def close(self) -> None:
        self._stop.set()
        self._t.join(TIMEOUT)


def serve(tmp: Path, *args: str) -> ServeProcess:
    return ServeProcess(tmp, "--heartbeat", "off", *args)


def stop_serve(proc: ServeProcess) -> str:
    if proc.p.poll() is None:
        proc.p.send_signal(signal.SIGTERM)
    try:
        proc.p.wait(TIMEOUT * 3)
    except subprocess.TimeoutExpired:
        proc.p.kill()
        proc.p.wait(TIMEOUT)
    with contextlib.suppress(AttributeError):
        proc._reader.join(TIMEOUT)
    if proc.p.stdout is not None:
        proc.p.stdout.close()
    return "".join(proc.lines)


def stuff(
    port: int, line: bytes, conns: int, per_conn: int, *, watch: RssWatch, abort_growth: int
) -> list[socket.socket]:
    """Open ``conns`` connections that each send up to ``per_conn`` bytes of ``line``
    and never read; stop when every one is sent or none makes progress any more (the
    server stopped reading them all), or when the server grows past ``abort_growth``
    (to protect the machine). Returns the sockets, still open."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(conns)]
    for s in socks:
        s.setblocking(False)
    buf = line * ((1 << 16) // len(line))
    offset = [0] * conns  # within buf, so that every line stays whole
    sent = [0] * conns
    idle_rounds = 0
    deadline = time.monotonic() + TIMEOUT * 6
    while time.monotonic() < deadline and watch.growth < abort_growth:
        progress = False
        for i, s in enumerate(socks):
            if sent[i] >= per_conn:
                continue
            try:
                n = s.send(buf[offset[i] :])
            except BlockingIOError:
                continue
            sent[i] += n
            offset[i] = (offset[i] + n) % len(buf)
            progress = True
        if all(n >= per_conn for n in sent):
            break
        if progress:
            idle_rounds = 0
        else:
            idle_rounds += 1
            if idle_rounds > 200:  # about 2 s without any socket taking a byte
                break
            time.sleep(0.01)
    return socks


@pytest.mark.parametrize("line", [b"x\n", b"ping\n"], ids=["nonsense", "ping"])
def test_clients_that_never_read_cannot_grow_the_server(tmp_path: Path, line: bytes) -> None:
    """Finding 3: 100 connections each send 10 MB of requests and never read their
    answers: the server stops reading each once its answers pile up, so its memory
    grows by less than 64 MB, and it still answers a probe."""
    proc = serve(tmp_path, "--store", "memory")
    socks: list[socket.socket] = []
    watch = RssWatch(proc.p.pid)
    try:
        with LineClient(proc.port) as warm:  # warm up: the first connection's costs
            assert warm.request({"op": "ping"})["type"] == "pong"
        watch.base = watch.peak = watch.rss()
        socks = stuff(proc.port, line, 100, 10 * MiB, watch=watch, abort_growth=1024 * MiB)
        with LineClient(proc.port) as probe:
            assert probe.request({"op": "ping", "id": "probe"}) == {
                "type": "pong",
                "seq": 0,
                "id": "probe",
            }
        growth = watch.growth
        assert growth < 64 * MiB, f"the server grew by {growth / MiB:.0f} MB"
    finally:
        watch.close()
        for s in socks:
            rst_close(s)
        out = stop_serve(proc)
    assert "Traceback" not in out, out[-3000:]


# == 4. Durable publish backpressure =====================================================


class PublishFlood(Flood):
    """Pipelines small publishes flat out (all different keys), counting acks."""

    def __init__(self, port: int, name: str, value_bytes: int = 100) -> None:
        pad = "v" * value_bytes
        lines = b"".join(
            publish_line([{"collection": "flood", "key": f"{name}-{i}", "value": {"p": pad}}])
            for i in range(1000)
        )
        self.acks = 0
        self.byes = 0
        self.limit: int | None = None  # bytes to send, then stop
        super().__init__(port, lines)

    def _send(self) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set() and (self.limit is None or self.sent < self.limit):
                self.sock.sendall(self._buf)
                self.sent += len(self._buf)

    def _recv(self) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return
                self.received += len(chunk)
                data = tail + chunk
                self.acks += data.count(b'"type":"ack"')
                self.byes += data.count(b'"type":"bye"')
                tail = data[-20:]
                self.acks -= tail.count(b'"type":"ack"')
                self.byes -= tail.count(b'"type":"bye"')


def wait_stalled(floods: list[PublishFlood], limit: int, rounds: int = 8) -> int:
    """Until no flooder's bytes get taken any more (``rounds`` polls of 0.25 s in a row),
    or ``limit`` more bytes were taken, or TIMEOUT * 3; the bytes taken meanwhile."""
    start = last = sum(f.sent for f in floods)
    still = 0
    deadline = time.monotonic() + TIMEOUT * 3
    while time.monotonic() < deadline and still < rounds and last - start < limit:
        time.sleep(0.25)
        now = sum(f.sent for f in floods)
        still = still + 1 if now == last else 0
        last = now
    return last - start


def test_durable_publish_flood_keeps_memory_bounded(tmp_path: Path) -> None:
    """Finding 4: four clients pipeline publishes to the SQLite store flat out, first
    while it commits, then while another process holds the database's write lock (its
    commits wait): the publishes waiting for their commit are bounded (--max-inflight,
    --max-inflight-total: at the bound, reading pauses), so the server's memory stays
    bounded, and once the lock is gone every publish is acked.

    --retain is small so that the change log (bounded by design, and 1M changes by
    default) is not what is measured."""
    db = tmp_path / "x.db"
    proc = serve(
        tmp_path, "--store", f"sqlite:{db}", "--retain", "1000", "--sqlite-busy-timeout", "120"
    )
    watch = RssWatch(proc.p.pid)
    floods: list[PublishFlood] = []
    lock = None
    try:
        floods = [PublishFlood(proc.port, f"c{n}") for n in range(4)]
        wait_for(lambda: sum(f.acks for f in floods) > 20_000, "the flood to be acked", TIMEOUT * 3)
        lock = sqlite3.connect(db, isolation_level=None, timeout=TIMEOUT)
        lock.execute("BEGIN IMMEDIATE")  # commits wait (busy timeout) while we hold it
        acks = sum(f.acks for f in floods)
        taken = wait_stalled(floods, limit=1024 * MiB)
        growth = watch.growth
        assert growth < 300 * MiB, f"the server grew by {growth / MiB:.0f} MB"
        assert taken < 1024 * MiB, "the server kept reading publishes it could not commit"
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        wait_for(lambda: sum(f.acks for f in floods) > acks + 1000, "acks after the lock")
        with LineClient(proc.port) as probe:
            assert probe.request({"op": "ping", "id": "probe"})["type"] == "pong"
        growth = watch.growth
        assert growth < 300 * MiB, f"the server grew by {growth / MiB:.0f} MB"
    finally:
        if lock is not None:
            lock.close()
        watch.close()
        for f in floods:
            f.close()
        out = stop_serve(proc)
    assert "Traceback" not in out, out[-3000:]


def test_sigterm_under_a_durable_publish_flood_exits_promptly(tmp_path: Path) -> None:
    """Finding 4: SIGTERM while four clients flood the SQLite store with publishes: the
    server stops reading at once, says bye, and exits 0 within --shutdown-grace plus a
    few seconds (bounded here by grace + TIMEOUT)."""
    grace = 2.0
    proc = serve(tmp_path, "--store", f"sqlite:{tmp_path}/x.db", "--shutdown-grace", str(grace))
    floods: list[PublishFlood] = []
    try:
        floods = [PublishFlood(proc.port, f"c{n}") for n in range(4)]
        wait_for(lambda: sum(f.acks for f in floods) > 2000, "the flood to be acked")
        proc.p.send_signal(signal.SIGTERM)
        try:
            code = proc.p.wait(grace + TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        assert code is not None, f"still running {grace + TIMEOUT:.0f}s after SIGTERM"
        assert code == 0
        # Every flooder heard bye (or was cut after the grace).
        wait_for(lambda: all(f.byes or not f._threads[1].is_alive() for f in floods), "bye")
    finally:
        for f in floods:
            f.close()
        out = stop_serve(proc)
    assert "Traceback" not in out, out[-3000:]


# == 5. One big flush must not cut subscribers that keep up ===============================


class Reader:
    """A subscriber that reads as fast as it can, counting change frames."""

    def __init__(self, port: int, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.changes = 0
        self.errors: list[bytes] = []
        self.closed = False
        self.bytes = 0
        self._buf = b""
        self.sock.sendall(request)
        recv_until(self.sock, b'"type":"s')  # subscribed / snapshot_begin
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        self.sock.settimeout(TIMEOUT * 6)
        try:
            while True:
                chunk = self.sock.recv(1 << 22)
                if not chunk:
                    break
                self.bytes += len(chunk)
                buf = self._buf + chunk
                lines = buf.split(b"\n")
                self._buf = lines.pop()
                for ln in lines:
                    if ln.startswith(b'{"type":"change"'):
                        self.changes += 1
                    elif ln.startswith(b'{"type":"error"'):
                        self.errors.append(ln)
        except OSError:
            pass
        self.closed = True

    def close(self) -> None:
        rst_close(self.sock)
        self._t.join(TIMEOUT)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_one_big_flush_does_not_cut_subscribers_that_keep_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, store: str
) -> None:
    """Finding 5: 60 pipelined publishes of ~950 KB each (under --max-line), three
    subscribers reading as fast as they can: none gets slow_consumer. The cut is for
    bytes *waiting* beyond --max-pending, not for one large flush."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory" if store == "memory" else f"sqlite:{tmp_path}/x.db",
        port=0,
        http_port=None,
        heartbeat=None,
    ).start_in_thread()
    readers: list[Reader] = []
    try:
        readers = [Reader(s.port, b'{"op":"subscribe"}\n') for _ in range(2)]
        readers.append(Reader(s.port, b'{"op":"sync","live":true}\n'))
        n = 60
        lines = b"".join(
            publish_line([{"collection": "big", "key": f"k{i}", "value": "x" * 950_000}], i)
            for i in range(n)
        )
        assert max(len(ln) for ln in raw_lines(lines)) < MiB
        with LineClient(s.port) as pub:
            sender = threading.Thread(target=pub.sock.sendall, args=(lines,), daemon=True)
            sender.start()
            acks = [pub.read() for _ in range(n)]
            sender.join(TIMEOUT)
        assert [a["type"] for a in acks] == ["ack"] * n, acks[-1]
        wait_for(
            lambda: all(r.changes == n or r.errors or r.closed for r in readers),
            "every subscriber to get every change",
            TIMEOUT * 3,
        )
        assert [r.errors for r in readers] == [[], [], []]
        assert [r.changes for r in readers] == [n, n, n]
        assert s.stats()["slow_consumer_disconnects"] == 0
    finally:
        for r in readers:
            r.close()
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)


# == 6. Closed connections are freed without the cycle collector =========================


def describe_alive(refs: list[tuple[str, weakref.ref[Any]]]) -> list[str]:
    """What still holds the objects that should be gone (for the failure message)."""
    out = []
    for name, ref in refs:
        obj = ref()
        if obj is None:
            continue
        holders = sorted({type(r).__name__ for r in gc.get_referrers(obj)} - {"list", "frame"})
        out.append(f"{name} held by {holders}")
        del obj
    return out


def test_closed_connections_are_freed_without_the_cycle_collector() -> None:
    """Finding 6: with the cycle collector off, the Session and the connection object
    of every closed connection (TCP and WebSocket; idle, subscribed, mid-snapshot,
    mid-line, reset or closed cleanly) are freed by reference counting alone."""
    # Heartbeats on: a subscriber whose client closed its socket cleanly (FIN) is kept
    # until a write fails (§3.6: `nc` closes its side and still gets `watch` output),
    # and a heartbeat is the write that finds it gone.
    s = Server(store="memory", port=0, http_port=0, heartbeat=0.2).start_in_thread()
    s.publish([Change("big", f"r{i}", {"pad": "x" * 1000}) for i in range(3000)])
    gc.collect()
    gc.disable()
    try:
        for round_ in range(2):
            refs = asyncio.run(open_use_and_close(s, rst=round_ == 1))
            wait_for(lambda: len(s.connections) == 0, "every connection to close")

            def freed(refs: list[tuple[str, weakref.ref[Any]]] = refs) -> bool:
                return all(r() is None for _, r in refs)

            try:
                wait_for(freed, "the closed connections freed")
            except AssertionError:
                raise AssertionError(
                    f"round {round_}: still alive without gc: {describe_alive(refs)}"
                ) from None
    finally:
        gc.enable()
        gc.collect()
        s.stop_in_thread(timeout=30)


TCP_KINDS: list[tuple[str, bytes]] = [
    ("idle", b""),
    ("ping", b"ping\n"),
    ("bad", b"x\n"),
    ("subscribe", b'{"op":"subscribe"}\n'),
    ("watch", b'{"op":"sync","live":true}\n'),
    ("mid-snapshot", b"sync\n"),
    ("publish", publish_line([{"collection": "c", "key": "k", "value": 1}])),
    ("half-line", b'{"op":"publish","changes":[{"coll'),
]


async def open_use_and_close(srv: Server, *, rst: bool) -> list[tuple[str, weakref.ref[Any]]]:
    """Open connections of every kind, take weak references to their connection and
    Session objects on the server, then close them all; the references."""
    socks = []
    for _, req in TCP_KINDS:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(req)
        recv_until(sock, b'"hello"')
        socks.append(sock)
    async with aiohttp.ClientSession() as http:
        wss = []
        for req in [b"", b"ping", b'{"op":"subscribe"}', b"sync"]:
            ws = await http.ws_connect(http_base(srv) + "/ws", max_msg_size=0)
            await ws.receive(TIMEOUT)  # hello
            if req:
                await ws.send_str(req.decode())
                await ws.receive(TIMEOUT)
            wss.append(ws)
        expected = len(socks) + len(wss)
        await asyncio.to_thread(
            wait_for, lambda: len(srv.connections) == expected, "the connections to open"
        )
        refs: list[tuple[str, weakref.ref[Any]]] = []
        for conn in list(srv.connections):
            name = type(conn).__name__
            refs.append((name, weakref.ref(conn)))
            session = conn.session
            if session is not None:
                refs.append((f"{name}.session", weakref.ref(session)))
            del session
        del conn
        for sock in socks:
            if rst:
                rst_close(sock)
            else:
                sock.close()
        for ws in wss:
            await ws.close()
    return refs


# == 7. Bounds for idle and stalled clients ==============================================


def test_max_connections_refuses_the_one_too_many(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: with --max-connections 3, the 4th connection gets an error with code
    too_many_connections and is closed, while /healthz and /metrics still answer; once
    one closes, a new one is served."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory", port=0, http_port=0, heartbeat=None, max_connections=3
    ).start_in_thread()
    clients: list[LineClient] = []
    try:
        clients = [LineClient(s.port) for _ in range(3)]
        for c in clients:
            assert c.request({"op": "ping"})["type"] == "pong"
        extra = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        extra.sendall(b'{"op":"ping","id":"extra"}\n')
        data = read_to_eof(extra, TIMEOUT * 2)
        extra.close()
        frames = strict_frames(data)
        errors = [f for f in frames if f["type"] == "error"]
        assert [f["code"] for f in errors] == ["too_many_connections"], frames
        assert not [f for f in frames if f["type"] == "pong"], frames
        # The HTTP port's endpoints are not client connections.
        assert http_get(http_base(s) + "/healthz")[0] == 200
        status, metrics = http_get(http_base(s) + "/metrics")
        assert status == 200
        assert b"statecast_connections" in metrics

        # The WebSocket counts too: refused one way or the other.
        async def ws_extra() -> str:
            async with aiohttp.ClientSession() as http:
                try:
                    ws = await http.ws_connect(http_base(s) + "/ws")
                except aiohttp.WSServerHandshakeError as exc:
                    return f"http {exc.status}"
                async with ws:
                    text = ""
                    async with asyncio.timeout(TIMEOUT):
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                text += msg.data + "\n"
                    return text

        answer = asyncio.run(ws_extra())
        assert "too_many_connections" in answer or answer == "http 503", answer
        clients.pop().close()
        wait_for(lambda: len(s.connections) == 2, "a slot to free up")
        with LineClient(s.port) as again:
            assert again.request({"op": "ping"})["type"] == "pong"
    finally:
        for c in clients:
            c.close()
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)


class Dribbler:
    """Sends ``head``, then ``body`` one byte every ``every`` seconds (over and over)
    until stopped or refused; nothing more when ``body`` is empty."""

    def __init__(self, sock: socket.socket, head: bytes, body: bytes, every: float) -> None:
        self.sock = sock
        self.sock.sendall(head)
        self._stop = threading.Event()
        self.refused = False
        self.sent = 0

        def run() -> None:
            i = 0
            if not body:  # the head only, then silence
                return
            while not self._stop.wait(every):
                try:
                    self.sock.send(body[i % len(body) : i % len(body) + 1])
                except OSError:
                    self.refused = True
                    return
                i += 1
                self.sent += 1

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(TIMEOUT)


def test_request_timeout_closes_a_slow_line_on_tcp(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: --request-timeout: a client that dribbles a request line (a byte every
    half second, never a newline) is closed; a silent connection with no line begun is
    not (that is --idle-timeout's business, off here)."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory",
        port=0,
        http_port=None,
        heartbeat=None,
        request_timeout=1.0,
        idle_timeout=None,
    ).start_in_thread()
    try:
        quiet = LineClient(s.port)
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        d = Dribbler(sock, b'{"op":"publish","changes":[{"collection":"c","key":"', b"k", 0.5)
        try:
            assert is_closed(sock, TIMEOUT * 2), "a dribbled request line kept its connection"
        finally:
            d.stop()
            sock.close()
        assert quiet.request({"op": "ping"})["type"] == "pong"  # untouched
        quiet.close()
    finally:
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)


@pytest.mark.parametrize("where", ["headers", "body", "no body", "no chunk"])
def test_request_timeout_closes_a_slowloris_on_http(
    caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """Finding 7: --request-timeout on the HTTP port: a request whose headers (or body)
    come a byte every half second is closed. So is one whose head is complete and whose
    body never comes (found by an adversarial run: it stayed open for good)."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory", port=0, http_port=0, heartbeat=None, request_timeout=1.0
    ).start_in_thread()
    try:
        sock = socket.create_connection(("127.0.0.1", s.http_port), timeout=TIMEOUT)
        if where == "headers":
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            body = b"X-Slow: " + b"a" * 1000
        elif where == "no body":
            head = b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            body = b""
        elif where == "no chunk":
            head = b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            body = b""
        else:
            head = (
                b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n"
            )
            body = b'{"changes":[' + b" " * 100000
        d = Dribbler(sock, head, body, 0.5)
        try:
            assert is_closed(sock, TIMEOUT * 3), "a slowloris request kept its connection"
        finally:
            d.stop()
            sock.close()
        assert http_get(http_base(s) + "/healthz")[0] == 200
    finally:
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)


def test_idle_timeout_closes_silent_unsubscribed_connections_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 7: --idle-timeout closes a connection with no subscription that sends
    nothing; a subscribed one (silent too: no heartbeat) stays and gets its changes."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory", port=0, http_port=0, heartbeat=None, idle_timeout=1.0
    ).start_in_thread()
    try:
        sub = LineClient(s.port)
        assert sub.request({"op": "subscribe"})["type"] == "subscribed"

        async def ws_subscribed() -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
            http = aiohttp.ClientSession()
            ws = await http.ws_connect(http_base(s) + "/ws")
            await ws.receive(TIMEOUT)
            await ws.send_str('{"op":"subscribe"}')
            await ws.receive(TIMEOUT)
            return http, ws

        idle = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        assert is_closed(idle, TIMEOUT * 3), "an idle connection was not closed"
        idle.close()
        # Once more, so that the subscriber has been silent for two idle timeouts.
        idle = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        assert is_closed(idle, TIMEOUT * 3), "an idle connection was not closed"
        idle.close()
        s.put("c", "k", 1)
        assert sub.read()["type"] == "change"  # the subscriber is still there
        sub.close()
    finally:
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)


def big_state(srv: Server, records: int, pad: int = 1000) -> None:
    for start in range(0, records, 1000):
        srv.publish(
            [
                Change("big", f"r{i}", {"i": i, "pad": "x" * pad})
                for i in range(start, min(records, start + 1000))
            ]
        )


def stalled_sync(port: int) -> socket.socket:
    """A client that asks for a snapshot and never reads it (a tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b'{"op":"sync","id":"stuck"}\n')
    return sock


def test_snapshot_timeout_cuts_a_sync_that_never_reads(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: --snapshot-timeout: a sync that stops reading (the state is far larger
    than the socket buffers) is cut with slow_consumer, and its snapshot released."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory", port=0, http_port=None, heartbeat=None, snapshot_timeout=1.0
    ).start_in_thread()
    try:
        big_state(s, 30_000)
        sock = stalled_sync(s.port)
        try:
            wait_for(lambda: s.stats()["open_snapshots"] == 1, "the snapshot to open")
            wait_for(
                lambda: s.stats()["open_snapshots"] == 0,
                "the stalled snapshot to be cut",
                TIMEOUT * 3,
            )
            data = read_to_eof(sock, TIMEOUT)
        finally:
            sock.close()
        lines = raw_lines(data)
        assert b'"snapshot_end"' not in data
        assert b'"code":"slow_consumer"' in lines[-1], lines[-1][:300]
    finally:
        s.stop_in_thread(timeout=30)


def test_max_snapshot_retained_bounds_old_versions(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: --max-snapshot-retained: overwriting every key while a sync does not
    read keeps old versions alive for its snapshot; past the bound the snapshot is cut,
    and /metrics reports statecast_snapshot_retained_bytes."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory",
        port=0,
        http_port=0,
        heartbeat=None,
        snapshot_timeout=None,
        max_snapshot_retained=4 * MiB,
    ).start_in_thread()
    try:
        big_state(s, 20_000)
        sock = stalled_sync(s.port)
        try:
            wait_for(lambda: s.stats()["open_snapshots"] == 1, "the snapshot to open")
            status, metrics = http_get(http_base(s) + "/metrics")
            assert status == 200
            assert b"statecast_snapshot_retained_bytes" in metrics
            for round_ in range(3):  # 3 x 20 MB of old versions, were they all kept
                for start in range(0, 20_000, 1000):
                    s.publish(
                        [
                            Change("big", f"r{i}", {"round": round_, "pad": "y" * 1000})
                            for i in range(start, start + 1000)
                        ]
                    )
            wait_for(
                lambda: s.stats()["open_snapshots"] == 0, "the snapshot to be cut", TIMEOUT * 3
            )
            data = read_to_eof(sock, TIMEOUT)
        finally:
            sock.close()
        assert b'"snapshot_end"' not in data
        last = strict_frames(raw_lines(data)[-1])[0]
        assert last["type"] == "error", last
        assert last["code"] != "internal", last
        status, metrics = http_get(http_base(s) + "/metrics")
        m = re.search(rb"^statecast_snapshot_retained_bytes (\S+)$", metrics, re.M)
        assert m is not None, metrics[-2000:]
        assert float(m.group(1)) <= 4 * MiB
    finally:
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)


# == 8. Small ones =======================================================================


def http_raw(port: int, request: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send one raw HTTP request (it should say Connection: close); all of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_to_eof(sock, timeout)


def test_head_snapshot_has_no_body(srv: Server, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 8: HEAD /v1/snapshot answers the headers only, with no body (a body after
    a HEAD answer is read as the next response by a keep-alive client)."""
    big_state(srv, 2000)
    answer = http_raw(
        srv.http_port, b"HEAD /v1/snapshot HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, answer[:500]
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"x-statecast-seq: 2000" in head.lower(), head
    assert body == b"", body[:200]

    async def keep_alive() -> None:  # the next request on the connection is intact
        async with aiohttp.ClientSession() as http:
            async with http.head(http_base(srv) + "/v1/snapshot") as r:
                assert r.status == 200
            async with http.get(http_base(srv) + "/healthz") as r:
                assert r.status == 200
                assert await r.json() == {"status": "alive"}

    asyncio.run(keep_alive())
    wait_for(lambda: srv.stats()["open_snapshots"] == 0, "HEAD's snapshots released")
    assert_clean_log(caplog)


@pytest.mark.parametrize(
    ("request_", "want"),
    [
        (b"ping", "pong"),
        (b'{"op":"ping","id":7}', "pong"),
        (b"ping\r", "pong"),
        (b"ping\nping", "pong pong"),
        (b"sync", "snapshot_end"),
        (publish_line([{"collection": "c", "key": "k", "value": 1}], 1)[:-1], "ack"),
        (b"x", "error"),
    ],
)
def test_last_line_without_newline_is_answered(srv: Server, request_: bytes, want: str) -> None:
    """Finding 8: ``printf ping | nc -N``: the last request line, not ended by a newline
    before the client closes its side, is answered, then the connection is closed."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
    try:
        sock.sendall(request_)
        sock.shutdown(socket.SHUT_WR)
        frames = strict_frames(read_to_eof(sock, TIMEOUT))
    finally:
        sock.close()
    assert frames[0]["type"] == "hello"
    answers = [f["type"] for f in frames if f["type"] in TERMINAL]
    assert answers == want.split(), frames


def test_oversize_websocket_message_gets_too_large_then_1009(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 8: a WebSocket message longer than --max-line gets an error frame with
    code too_large, then the close code 1009 (message too big)."""
    caplog.set_level(logging.INFO)
    s = Server(store="memory", port=0, http_port=0, heartbeat=None, max_line=4096).start_in_thread()
    try:

        async def main() -> tuple[list[Frame], int | None]:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(http_base(s) + "/ws") as ws,
            ):
                frames = ws_messages(ws)
                await ws_read_until(frames, "hello")
                big = publish_line([{"collection": "c", "key": "k", "value": "x" * 8000}])
                await ws.send_str(big.decode())
                async with asyncio.timeout(TIMEOUT):
                    got = [f async for f in frames]
                return got, ws.close_code

        frames, code = asyncio.run(main())
        assert [(f["type"], f.get("code")) for f in frames] == [("error", "too_large")], frames
        assert code == 1009
        assert s.seq == 0
    finally:
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)


MALFORMED_HTTP = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\nConnection: close\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\nConnection: close\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\nConnection: close\r\n\r\n",
    b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
    b"Connection: close\r\n\r\nhello!",
    b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",  # no key
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: !!!\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /v1/snapshot?where=%7B HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /v1/snapshot?where="
    + urllib.parse.quote(deep(1000)).encode()
    + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"\xff\xfe\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
    # Found by an adversarial run: a body that does not decompress was a 500 with two
    # tracebacks (now 400, "the request body cannot be read").
    b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: 7\r\nConnection: close\r\n\r\nnotgzip",
    b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\n"
    b"Content-Length: 2\r\nConnection: close\r\n\r\nxx",
    b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n7\r\nnotgzip\r\n0\r\n\r\n",
]


def incident_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO
        and (r.name.startswith(("statecast", "aiohttp")) or r.levelno >= logging.WARNING)
        and not (r.name.startswith("asyncio") and r.getMessage().startswith("Executing "))
    ]


def test_malformed_http_requests_log_no_traceback(
    srv: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 8: malformed HTTP requests are answered (4xx) or closed, and log at most
    one INFO line each: no ERROR, no traceback."""
    caplog.clear()
    for i, request_ in enumerate(MALFORMED_HTTP):
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(request_)
                sock.shutdown(socket.SHUT_WR)
            answer = read_to_eof(sock, TIMEOUT)
        if answer:
            assert re.match(rb"HTTP/1\.[01] [45]\d\d ", answer), (i, request_[:60], answer[:200])
        records = incident_records(caplog)
        assert all(r.levelno <= logging.INFO and not r.exc_info for r in records), (
            i,
            request_[:60],
            [(r.name, r.levelname, r.getMessage()[:200]) for r in records],
        )
        assert len(records) <= 1, (i, request_[:60], [r.getMessage()[:200] for r in records])
        caplog.clear()
    assert http_get(http_base(srv) + "/healthz")[0] == 200
    assert "Traceback" not in caplog.text


def test_clients_leaving_mid_snapshot_log_no_traceback(
    srv: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 8: clients that vanish (reset or close) in the middle of a snapshot, over
    GET /v1/snapshot, WebSocket and TCP, cost at most one INFO line each."""
    big_state(srv, 20_000)
    caplog.clear()
    incidents = 0
    for i in range(6):
        for path in (b"/v1/snapshot", b"/ws", b"tcp"):
            if path == b"tcp":
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
                sock.sendall(b"sync\n")
            else:
                sock = socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT)
                if path == b"/ws":
                    sock.sendall(
                        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"
                    )
                    got_hello = b""
                    while b'"hello"' not in got_hello:
                        got_hello += sock.recv(1 << 16)
                    sock.sendall(
                        b"\x81\x84abcd"
                        + bytes(a ^ b for a, b in zip(b"sync", b"abcd", strict=True))
                    )
                else:
                    sock.sendall(b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\n\r\n")
            got = 0
            while got < 300_000:
                got += len(sock.recv(1 << 16))
            if i % 2:
                rst_close(sock)
            else:
                sock.close()
            incidents += 1
    wait_for(lambda: srv.stats()["open_snapshots"] == 0, "every snapshot released")
    wait_for(lambda: len(srv.connections) == 0, "every connection closed")
    records = incident_records(caplog)
    assert all(r.levelno <= logging.INFO and not r.exc_info for r in records), [
        (r.name, r.levelname, r.getMessage()[:200]) for r in records
    ]
    assert len(records) <= incidents, [r.getMessage()[:200] for r in records]
    assert "Traceback" not in caplog.text


# == 9. A replica fed garbage fails loudly ===============================================


class FakeServer:
    """A statecast look-alike on a free port: each connection gets a hello, then
    whatever ``script(n, request)`` returns for the first request (n counts the
    connections from 0); the connection then stays open until the client leaves."""

    def __init__(self, script: Callable[[int, Frame], list[bytes]]) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(w)
        n = self.connections
        self.connections += 1
        epoch = f"epoch{n}"  # a new history each time: the replica does a full sync
        try:
            w.write(
                b'{"type":"hello","server":"statecast","version":"0.1.0","protocol":1,'
                b'"epoch":"' + epoch.encode() + b'","seq":2}\n'
            )
            line = b""
            while not line.strip():  # (a client may send empty lines: §1 ignores them)
                line = await r.readline()
                if not line:
                    return
            request = msgspec.json.decode(line)
            for chunk in self.script(n, request):
                w.write(chunk.replace(b"EPOCH", epoch.encode()))
                await w.drain()
                await asyncio.sleep(0.05)
            while await r.read(1 << 16):
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()
            self._tasks.discard(task)
            self._writers.discard(w)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for w in list(self._writers):
            w.close()  # the handlers see the end of their streams and return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TIMEOUT):
                await asyncio.gather(*self._tasks, return_exceptions=True)


def snapshot_frames(rid: object, *extra: bytes) -> list[bytes]:
    r = msgspec.json.encode(rid)
    return [
        b'{"type":"snapshot_begin","seq":2,"epoch":"EPOCH","count":1,"id":' + r + b"}\n",
        b'{"type":"record","seq":1,"collection":"c","key":"a","value":1}\n',
        *extra,
        b'{"type":"snapshot_end","seq":2,"count":1,"id":' + r + b"}\n",
    ]


GARBAGE = {
    "bad-json": b'{"type":"change","seq":3,"collection":"c",,"key"}\n',
    "truncated-json": b'{"type":"change","seq":3,"collection":"c","key":"b","val\n',
    "invalid-utf8-key": b'{"type":"change","seq":3,"collection":"c","key":"\xff","value":1}\n',
    "invalid-utf8-value": (
        b'{"type":"change","seq":3,"collection":"c","key":"b","value":"\xed\xa0\x80"}\n'
    ),
    "invalid-utf8-type": b'{"type":"chan\xc0\x80ge","seq":3}\n',
}
# Valid JSON, but not a frame this client may skip: a known type it cannot read.
UNREADABLE = {
    "not-an-object": b"[1,2,3]\n",
    "key-not-a-string": b'{"type":"change","seq":3,"collection":"c","key":5,"value":1}\n',
    "seq-not-a-number": b'{"type":"change","seq":"3","collection":"c","key":"b","value":1}\n',
}


def run_replica_against(bad: bytes, when: str) -> tuple[list[tuple[str, str]], int, int]:
    """A replica against a fake server whose first connection sends ``bad`` inside the
    snapshot or once live; later connections serve a good snapshot. Runs until the
    replica is live on a later connection (bounded), then stops it (which must not
    raise). The statuses it reported, the connections made, its full syncs."""

    def script(n: int, request: Frame) -> list[bytes]:
        rid = request.get("id")
        if n > 0:  # later connections serve a good snapshot and then stay quiet
            return snapshot_frames(rid)
        if when == "in-snapshot":
            return snapshot_frames(rid, bad.replace(b'"type":"change"', b'"type":"record"'))
        good = b'{"type":"change","seq":3,"collection":"c","key":"ok","value":3}\n'
        return [*snapshot_frames(rid), good, bad.replace(b'"seq":3', b'"seq":4')]

    async def main() -> tuple[list[tuple[str, str]], int, int]:
        fake = FakeServer(script)
        await fake.start()
        statuses: list[tuple[str, str]] = []
        replica = Replica(
            f"tcp://127.0.0.1:{fake.port}",
            min_backoff=0.01,
            max_backoff=0.05,
            on_status=lambda status, detail: statuses.append((status, detail)),
        )
        try:
            await replica.start()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TIMEOUT * 2):
                    while fake.connections < 2 or replica.status != "live":  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
        finally:
            try:
                async with asyncio.timeout(TIMEOUT):
                    await replica.stop()
            finally:
                await fake.close()
        return statuses, fake.connections, replica.full_syncs

    return asyncio.run(main())


def check_failed_loudly(statuses: list[tuple[str, str]], connections: int, when: str) -> None:
    kinds = [s for s, _ in statuses]
    assert "reconnecting" in kinds, f"never reported an error: {statuses}"
    assert connections >= 2, f"never reconnected: {statuses}"
    first_error = kinds.index("reconnecting")
    assert statuses[first_error][1], statuses  # says why
    if when == "live":
        # It went live on the first connection, and left it because of the garbage.
        assert "live" in kinds[:first_error], statuses
    else:
        assert "live" not in kinds[:first_error], statuses
    assert kinds[-1] == "stopped"


@pytest.mark.parametrize("when", ["in-snapshot", "live"])
@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_replica_fed_a_malformed_frame_reports_and_reconnects(garbage: str, when: str) -> None:
    """Finding 9: a server that sends hello, then a malformed frame (bad JSON, invalid
    UTF-8) during the snapshot or once live: the replica reports an error status and
    reconnects, is never left ``live`` on a stream it stopped reading, and ``stop()``
    does not raise."""
    statuses, connections, syncs = run_replica_against(GARBAGE[garbage], when)
    check_failed_loudly(statuses, connections, when)
    assert syncs >= 1


@pytest.mark.parametrize("when", ["in-snapshot", "live"])
@pytest.mark.parametrize("garbage", list(UNREADABLE))
def test_replica_does_not_skip_a_known_frame_it_cannot_read(garbage: str, when: str) -> None:
    """Finding 9, the quiet variant: valid JSON that is not a frame the client may
    skip (not an object; a change or record whose fields have the wrong types) must
    not be dropped silently, or the replica stays ``live`` without that change."""
    statuses, connections, _ = run_replica_against(UNREADABLE[garbage], when)
    check_failed_loudly(statuses, connections, when)


# == Found by the fuzzer =================================================================

HUGE_NUMBERS = [b"1e400", b"-1e400", b"1" + b"0" * 5000, b"1" * 250 + b"e60"]


@pytest.mark.parametrize(
    "number", HUGE_NUMBERS, ids=["1e400", "-1e400", "5001-digits", "250-digits-e60"]
)
def test_a_number_out_of_range_does_not_break_filtered_views(
    srv: Server, caplog: pytest.LogCaptureFixture, number: bytes
) -> None:
    """Fuzz finding: a value holding ``1e400`` or an integer of 5,001 digits, which no
    client can decode (msgspec, JavaScript), stalled the fan-out of every subscriber
    when checked against a where filter. §9 now refuses such a number on the way in
    (``bad_request`` naming the change); everything after it works, filtered or not,
    over TCP and HTTP."""
    plain = LineClient(srv.port)
    filtered = LineClient(srv.port)
    try:
        assert plain.request({"op": "subscribe"})["type"] == "subscribed"
        sub = filtered.request({"op": "subscribe", "where": {"account": "A"}})
        assert sub["type"] == "subscribed"
        with LineClient(srv.port) as pub:
            bad = b'{"account":' + number + b"}"
            pub.send(publish_line(b"[" + raw_change(b"c", b"k0", bad) + b"]", 0))
            refused = pub.read()
            assert refused["code"] == "bad_request", refused
            assert refused["message"].startswith("changes[0]: invalid value: a number out of")
            good = b'{"account":"A"}'
            pub.send(publish_line(b"[" + raw_change(b"c", b"k1", good) + b"]", 1))
            assert pub.read()["type"] == "ack"
        assert plain.read()["key"] == "k1"
        assert filtered.read()["key"] == "k1"
        with LineClient(srv.port) as c:
            for where in [{"account": "A"}, {"account": 4}, {"account": {"in": [1, "A"]}}]:
                c.send({"op": "sync", "where": where, "id": "w"})
                frames = c.read_until("snapshot_end")
                keys = [f["key"] for f in frames if f["type"] == "record"]
                assert keys == (["k1"] if "A" in str(where) else []), (where, frames)
                query = urllib.parse.quote(msgspec.json.encode(where))
                status, body = http_get(http_base(srv) + "/v1/snapshot?where=" + query)
                assert status == 200, body[:300]
                assert strict_frames(body)[-1]["type"] == "snapshot_end"
    finally:
        plain.close()
        filtered.close()
    assert_clean_log(caplog)


def test_request_timeout_leaves_a_websocket_that_sent_requests_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--request-timeout times HTTP requests, not a WebSocket's frames: a WebSocket
    that subscribed and then pings now and then stays open well past the timeout and
    gets its changes (it used to be closed request_timeout seconds after it first sent
    anything, with no frame: CI caught it on a slow run of the fan-out stress test)."""
    caplog.set_level(logging.INFO)
    s = Server(
        store="memory", port=0, http_port=0, heartbeat=None, request_timeout=1.0
    ).start_in_thread()
    try:

        async def main() -> list[str]:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(http_base(s) + "/ws") as ws,
            ):
                assert frames_of((await ws.receive(TIMEOUT)).data.encode())[0]["type"] == "hello"
                await ws.send_str('{"op":"subscribe"}')
                got = [f["type"] for f in frames_of((await ws.receive(TIMEOUT)).data.encode())]
                for i in range(6):  # 3 s: three request timeouts
                    await asyncio.sleep(0.5)
                    await ws.send_str(f'{{"op":"ping","id":{i}}}')
                    got += [f["type"] for f in frames_of((await ws.receive(TIMEOUT)).data.encode())]
                s.publish([Change("c", "k", value=1)])
                got += [f["type"] for f in frames_of((await ws.receive(TIMEOUT)).data.encode())]
                return got

        assert asyncio.run(main()) == ["subscribed", *["pong"] * 6, "change"]
    finally:
        s.stop_in_thread(timeout=30)
    assert_clean_log(caplog)
