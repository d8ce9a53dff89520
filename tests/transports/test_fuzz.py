"""Fuzzing every transport with hostile requests: mutated valid requests (publish, sync,
subscribe, ping, auth, where filters), random bytes, invalid UTF-8, deep nesting, huge
numbers, odd ids.

What must hold whatever the input:

* one answer per request line (counted between ping fences: a request line gets
  exactly one ``ack``, ``pong``, ``subscribed``, ``stats``, ``authed``,
  ``snapshot_end`` or ``error``);
* never ``internal``, never a 5xx, never a traceback in the log;
* every frame a client receives is one line of valid UTF-8 JSON, with no raw control
  character;
* a replica following the whole time (``sync`` with ``live``) equals a fresh sync at
  the end.

``test_fuzz_hypothesis`` runs a bounded number of Hypothesis examples;
``test_fuzz_seeded`` (slow) sends at least 100,000 seeded random inputs to a real
``statecast serve`` process over TCP, WebSocket and HTTP at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast import Server
from tests.helpers import TIMEOUT, LineClient, ServeProcess, free_port, wait_for

MiB = 1 << 20
TERMINAL = frozenset({"ack", "pong", "subscribed", "error", "stats", "authed", "snapshot_end"})


class AnyFrame(msgspec.Struct):
    """Any frame, read without converting numbers (a value may hold ``1e400``)."""

    type: str
    id: msgspec.Raw = msgspec.Raw()
    code: str | None = None
    seq: int | None = None
    collection: str | None = None
    key: str | None = None
    value: msgspec.Raw = msgspec.Raw()
    deleted: bool = False


_frame_decoder = msgspec.json.Decoder(AnyFrame)


def check_frame(line: bytes) -> AnyFrame:
    """One frame line, checked: valid UTF-8, no raw control character, one JSON object;
    never an ``internal`` error."""
    line.decode("utf-8")  # strict
    assert not any(b < 0x20 for b in line), f"raw control character in {line[:300]!r}"
    frame = _frame_decoder.decode(line)
    assert frame.code != "internal", line[:300]
    return frame


def expected_answers(data: bytes) -> int:
    """How many answers the request bytes ``data`` (ending in a newline) ask for: one
    per line that is not blank (§1: empty lines are ignored)."""
    return sum(1 for seg in data.split(b"\n") if seg.strip())


# -- the generator ---------------------------------------------------------------------

COLLECTIONS = ["c0", "c1", "c2", "orders", "a.b-c_d", "x" * 128]
BAD_COLLECTIONS = ["", "x" * 129, "with space", "ümlaut", "a/b", "*"]
KEYS = [
    *(f"k{i}" for i in range(12)),
    "é",
    "🙂",
    "with space",
    'quote"d',
    "back\\slash",
    "x" * 1024,
]
BAD_KEYS = ["", "x" * 1025]
RAW_NUMBERS = [
    b"0",
    b"-0",
    b"2.50",
    b"1e400",
    b"-1e400",
    b"1E5",
    b"0.1e-400",
    b"1.0000000000000000000001",
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"1" + b"0" * 5000,
    b"-" + b"9" * 4301,
]
RAW_STRINGS = [
    b'""',
    b'"\\u0000"',
    b'"\\ud800"',  # lone surrogate escape
    b'"\\udc00x"',
    b'"\\ud83d\\ude00"',  # a valid pair
    b'"tab\\tnewline\\n"',
    b'"\\/\\b\\f"',
    b'"' + "🙂é".encode() + b'"',
]
INVALID_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xed\xa0\x80",
    b"\xc0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xe2\x82",
]
ODD_IDS = [
    b"0",
    b"-1",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-18446744073709551617",
    b"1" + b"0" * 5000,
    b"1.5",
    b"1e400",
    b"true",
    b"null",
    b"[]",
    b"{}",
    b'""',
    b'"\\u0000"',
    b'"\\ud800"',
    b'"' + b"i" * 2000 + b'"',
    b'"fence"',
]
DEPTHS = [63, 64, 65, 66, 200, 1000, 1001, 5000, 50_000]


def deep(n: int, kind: int) -> bytes:
    if kind == 0:
        return b"[" * n + b"1" + b"]" * n
    if kind == 1:
        return b'{"a":' * n + b"1" + b"}" * n
    return b'[{"a":' * (n // 2) + b"1" + b"}]" * (n // 2)


class Fuzz:
    """Seeded generator of hostile request lines."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # values ------------------------------------------------------------------
    def value(self, depth: int = 0) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.05:
            return deep(r.choice(DEPTHS), r.randrange(3))
        if pick < 0.15:
            return r.choice(RAW_NUMBERS)
        if pick < 0.25:
            return r.choice(RAW_STRINGS)
        if pick < 0.35 and depth < 4:
            items = [self.value(depth + 1) for _ in range(r.randrange(4))]
            return b"[" + b",".join(items) + b"]"
        if pick < 0.5 and depth < 4:
            fields = [
                msgspec.json.encode(r.choice(["a", "b", "status", "account", "n", ""]))
                + b":"
                + self.value(depth + 1)
                for _ in range(r.randrange(4))
            ]
            return b"{" + b",".join(fields) + b"}"
        return msgspec.json.encode(
            r.choice(
                [
                    r.randrange(-1000, 1000),
                    r.random(),
                    "".join(r.choice('abcé🙂 \t\n"\\') for _ in range(r.randrange(20))),
                    True,
                    False,
                    None,
                    r.choice(["ACC-1", "ACC-2", "open", "closed"]),
                ]
            )
        )

    def ident(self) -> bytes:
        r = self.rng
        if r.random() < 0.5:
            return msgspec.json.encode(r.randrange(1, 1 << 31))
        return r.choice(ODD_IDS)

    def collection(self) -> bytes:
        r = self.rng
        name = r.choice(BAD_COLLECTIONS) if r.random() < 0.05 else r.choice(COLLECTIONS)
        return msgspec.json.encode(name)

    def key(self) -> bytes:
        r = self.rng
        return msgspec.json.encode(r.choice(BAD_KEYS) if r.random() < 0.03 else r.choice(KEYS))

    def where(self) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.1:
            return self.value()
        if pick < 0.2:
            return b"{}" if r.random() < 0.5 else b"null"
        conds = []
        for _ in range(r.randrange(1, 4)):
            field = msgspec.json.encode(
                r.choice(["a", "b", "status", "account", "n", "", "x" * 129])
            )
            if r.random() < 0.5:
                cond = self.value(3)
            elif r.random() < 0.7:
                cond = b'{"in":[' + b",".join(self.value(3) for _ in range(r.randrange(4))) + b"]}"
            else:
                cond = b'{"' + r.choice([b"gt", b"in", b"eq"]) + b'":' + self.value(3) + b"}"
            conds.append(field + b":" + cond)
        return b"{" + b",".join(conds) + b"}"

    def collections(self) -> bytes:
        r = self.rng
        return b"[" + b",".join(self.collection() for _ in range(r.randrange(0, 3))) + b"]"

    # requests ----------------------------------------------------------------
    def change(self) -> bytes:
        r = self.rng
        parts = [b'"collection":' + self.collection(), b'"key":' + self.key()]
        if r.random() < 0.15:
            parts.append(b'"delete":true')
        elif r.random() < 0.97:
            parts.append(b'"value":' + self.value())
        if r.random() < 0.2:  # §3.3.2
            parts.append(
                b'"if_seq":'
                + r.choice([b"0", b"1", b"2", b"-1", b"1.5", b"true", b'"3"', b"1e400", b"null"])
            )
        r.shuffle(parts)
        return b"{" + b",".join(parts) + b"}"

    def request(self) -> bytes:
        """One valid-looking request (without its newline)."""
        r = self.rng
        op = r.choice(
            ["publish"] * 6 + ["sync", "sync_live", "subscribe", "ping", "stats", "auth", "word"]
        )
        fields: list[bytes] = []
        if op == "word":
            return r.choice(
                [
                    b"sync",
                    b"watch",
                    b"subscribe",
                    b"ping",
                    b"stats",
                    b"PING me",
                    b"Sync all",
                    b"nope",
                ]
            )
        if op == "publish":
            fields.append(
                b'"changes":[' + b",".join(self.change() for _ in range(r.randrange(1, 4))) + b"]"
            )
            if r.random() < 0.3:  # §3.3.1: a few keys, so that some repeat
                fields.append(
                    b'"idempotency_key":'
                    + r.choice(
                        [
                            b'"k1"',
                            b'"k2"',
                            b'"\\u00e9"',
                            b'""',
                            b"7",
                            b"null",
                            b'"\\ud800"',
                            b'"' + b"x" * 257 + b'"',
                        ]
                    )
                )
        elif op in ("sync", "sync_live", "subscribe"):
            if r.random() < 0.3:
                fields.append(b'"collections":' + self.collections())
            if r.random() < 0.3:
                fields.append(b'"where":' + self.where())
            if op == "sync_live":
                fields.append(b'"live":' + r.choice([b"true", b"false", b"1", b'"yes"']))
            if op == "subscribe" and r.random() < 0.5:
                fields.append(
                    b'"from":' + r.choice([b"0", b"1", b"-1", b"99999999", b"1e400", b'"3"'])
                )
            if op == "subscribe" and r.random() < 0.3:
                fields.append(b'"epoch":' + r.choice([b'"nope"', b"1", b"null"]))
            op = "sync" if op == "sync_live" else op
        elif op == "auth":
            fields.append(
                b'"token":' + r.choice([b'"eyJhbGciOiJIUzI1NiJ9.e30.x"', b"1", b"null", b'""'])
            )
        if r.random() < 0.8:
            fields.append(b'"id":' + self.ident())
        fields.append(b'"op":"' + op.encode() + b'"')
        r.shuffle(fields)
        return b"{" + b",".join(fields) + b"}"

    def mutate(self, data: bytes) -> bytes:
        r = self.rng
        for _ in range(r.randrange(1, 4)):
            pos = r.randrange(len(data) + 1)
            kind = r.randrange(10)
            if kind == 0 and data:  # flip a byte
                i = r.randrange(len(data))
                data = data[:i] + bytes([data[i] ^ (1 << r.randrange(8))]) + data[i + 1 :]
            elif kind == 1:
                data = data[:pos] + r.choice(INVALID_UTF8) + data[pos:]
            elif kind == 2:
                data = data[:pos] + data[pos + r.randrange(1, 20) :]
            elif kind == 3:
                data = data[:pos]
            elif kind == 4:
                n = r.randrange(1, 20)
                data = data[:pos] + data[pos : pos + n] * r.randrange(2, 4) + data[pos + n :]
            elif kind == 5:
                data = data[:pos] + deep(r.choice(DEPTHS), r.randrange(3)) + data[pos:]
            elif kind == 6:
                data = (
                    data[:pos]
                    + r.choice([b"\r", b"\t", b"\x00", b"\x1b", b" ", b"\r\n", b"\n"])
                    + data[pos:]
                )
            elif kind == 7:
                data = data[:pos] + r.choice(RAW_NUMBERS + ODD_IDS) + data[pos:]
            elif kind == 8:
                data = (
                    data[:pos]
                    + bytes(r.randrange(256) for _ in range(r.randrange(1, 8)))
                    + data[pos:]
                )
            else:
                data = data.replace(b'"', b"'", 1) if r.random() < 0.5 else data + b"}"
        return data

    def line(self) -> bytes:
        """One hostile input, ending in a newline (it may hold more than one line)."""
        r = self.rng
        pick = r.random()
        if pick < 0.45:
            data = self.request()
        elif pick < 0.9:
            data = self.mutate(self.request())
        elif pick < 0.97:
            data = bytes(r.randrange(256) for _ in range(r.randrange(1, 200)))
        else:
            data = deep(r.choice(DEPTHS), r.randrange(3))
        return data[: 512 * 1024] + b"\n"

    def publish_body(self) -> bytes:
        r = self.rng
        body = b'{"changes":[' + b",".join(self.change() for _ in range(r.randrange(1, 4))) + b"]"
        if r.random() < 0.3:
            body += b',"id":' + self.ident()
        if r.random() < 0.1:
            body += b',"op":' + r.choice([b'"publish"', b'"sync"', b"1"])
        body += b"}"
        pick = r.random()
        if pick < 0.5:
            return body
        if pick < 0.9:
            return self.mutate(body)
        return bytes(r.randrange(256) for _ in range(r.randrange(0, 200)))

    def snapshot_query(self) -> str:
        r = self.rng
        parts = []
        if r.random() < 0.6:
            names = [r.choice(COLLECTIONS + BAD_COLLECTIONS) for _ in range(r.randrange(0, 3))]
            parts.append("collections=" + urllib.parse.quote(",".join(names)))
        if r.random() < 0.6:
            where = self.where()
            if r.random() < 0.5:
                where = self.mutate(where)
            parts.append("where=" + urllib.parse.quote(where[:2000]))
        if r.random() < 0.1:
            parts.append("where=%FF%FE&collections=%ED%A0%80")
        return "&".join(parts)


# -- the followers ---------------------------------------------------------------------


class Follower:
    """A replica: a raw connection that syncs with ``live`` and applies every change,
    checking every frame and that seqs are consecutive."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.sendall(b'{"op":"sync","live":true,"id":"follow"}\n')
        self.state: dict[tuple[str, str], bytes] = {}
        self.seq = -1
        self.frames = 0
        self.error: BaseException | None = None
        self._buf = b""
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        self.sock.settimeout(None)
        synced = False
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return
                lines = (self._buf + chunk).split(b"\n")
                self._buf = lines.pop()
                for line in lines:
                    f = check_frame(line)
                    self.frames += 1
                    if f.type == "record":
                        assert f.collection is not None
                        assert f.key is not None
                        self.state[(f.collection, f.key)] = bytes(f.value)
                    elif f.type == "snapshot_end":
                        assert f.seq is not None
                        self.seq = f.seq
                        synced = True
                    elif f.type == "change":
                        assert synced, line
                        assert f.seq == self.seq + 1, (self.seq, line[:200])
                        assert f.collection is not None
                        assert f.key is not None
                        self.seq = f.seq
                        if f.deleted:
                            self.state.pop((f.collection, f.key), None)
                        else:
                            self.state[(f.collection, f.key)] = bytes(f.value)
                    elif f.type not in ("hello", "snapshot_begin", "heartbeat"):
                        raise AssertionError(f"the follower got {line[:300]!r}")
        except OSError:
            return
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._t.join(TIMEOUT)


def fresh_sync(port: int) -> tuple[int, dict[tuple[str, str], bytes]]:
    with LineClient(port) as c:
        c.send(b'{"op":"sync","id":"fresh"}\n')
        state: dict[tuple[str, str], bytes] = {}
        buf = b""
        while True:
            chunk = c.sock.recv(1 << 20)
            assert chunk, "closed during a fresh sync"
            lines = (buf + chunk).split(b"\n")
            buf = lines.pop()
            for line in lines:
                f = check_frame(line)
                if f.type == "record":
                    assert f.collection is not None
                    assert f.key is not None
                    state[(f.collection, f.key)] = bytes(f.value)
                elif f.type == "snapshot_end":
                    assert f.seq is not None
                    return f.seq, state


def check_follower(follower: Follower, port: int) -> None:
    seq, state = fresh_sync(port)
    wait_for(
        lambda: follower.seq >= seq or follower.error is not None,
        f"the follower to reach seq {seq}",
        TIMEOUT * 3,
    )
    assert follower.error is None, repr(follower.error)
    assert follower.seq == seq
    assert follower.state == state


# -- Hypothesis ------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_raw = st.sampled_from(RAW_NUMBERS[:11] + RAW_STRINGS).map(msgspec.Raw)
_scalar = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
    st.booleans(),
    st.none(),
    _raw,
)
_value = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_ids = st.one_of(st.integers(), _text, st.none(), st.booleans(), st.floats(allow_nan=False), _raw)
_names = st.one_of(st.sampled_from(COLLECTIONS + BAD_COLLECTIONS), _text)
_change = st.fixed_dictionaries(
    {"collection": _names, "key": st.one_of(st.sampled_from(KEYS), _text)},
    optional={
        "value": _value,
        "delete": st.booleans(),
        "if_seq": st.one_of(st.integers(-2, 5), _scalar),
    },
)
_where = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["a", "status", "n", ""]),
        st.one_of(_scalar, st.fixed_dictionaries({"in": st.lists(_scalar, max_size=3)})),
        max_size=3,
    ),
    _value,
)
_requests = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("publish"), "changes": st.lists(_change, max_size=3)},
        optional={
            "id": _ids,
            "idempotency_key": st.one_of(st.sampled_from(["k", "j"]), _text, _scalar),
        },
    ),
    st.fixed_dictionaries(
        {"op": st.sampled_from(["sync", "subscribe"])},
        optional={
            "id": _ids,
            "collections": st.lists(_names, max_size=2),
            "live": st.booleans(),
            "where": _where,
            "from": st.integers(-2, 10**6),
        },
    ),
    st.fixed_dictionaries(
        {"op": st.sampled_from(["ping", "stats", "auth", "nope", ""])},
        optional={"id": _ids, "token": _text},
    ),
)


@st.composite
def hostile_lines(draw: st.DrawFn) -> bytes:
    """A request, maybe mutated: invalid UTF-8, deep nesting, raw bytes."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        data = draw(st.binary(max_size=200))
    else:
        data = msgspec.json.encode(draw(_requests))
        for _ in range(draw(st.integers(0, 3))):
            pos = draw(st.integers(0, len(data)))
            insert = draw(
                st.one_of(
                    st.sampled_from(INVALID_UTF8),
                    st.sampled_from([b"\r", b"\t", b"\x00", b"\n", b" ", b"}", b'"']),
                    st.sampled_from(DEPTHS).map(lambda n: deep(n, 0)),
                    st.sampled_from(RAW_NUMBERS + ODD_IDS),
                    st.binary(max_size=5),
                )
            )
            cut = draw(st.integers(0, 3))
            data = data[:pos] + insert + data[pos + cut :]
    return data + b"\n"


@pytest.fixture
def fuzz_server(caplog: pytest.LogCaptureFixture) -> Iterator[Server]:
    caplog.set_level(logging.WARNING)
    srv = Server(store="memory", port=0, http_port=0, heartbeat=None).start_in_thread()
    try:
        yield srv
    finally:
        srv.stop_in_thread(timeout=30)


def fenced_answers(sock: socket.socket, data: bytes, fence: str, buf: bytearray) -> list[AnyFrame]:
    """Send ``data`` then a ping fence; every frame before the fence's pong, checked."""
    sock.sendall(data + b'{"op":"ping","id":"' + fence.encode() + b'"}\n')
    out: list[AnyFrame] = []
    want = b'"' + fence.encode() + b'"'
    deadline = time.monotonic() + TIMEOUT
    while True:
        while (end := buf.find(b"\n")) < 0:
            assert time.monotonic() < deadline, f"no fence {fence} within {TIMEOUT}s"
            chunk = sock.recv(1 << 20)
            assert chunk, f"the server closed the connection on {data[:200]!r}"
            buf += chunk
        line = bytes(buf[:end])
        del buf[: end + 1]
        f = check_frame(line)
        if f.type == "pong" and bytes(f.id) == want:
            return out
        out.append(f)


def assert_one_answer_per_line(data: bytes, answers: list[AnyFrame]) -> None:
    got = [f for f in answers if f.type in TERMINAL]
    assert len(got) == expected_answers(data), (data[:300], [(f.type, f.code) for f in got])


def one_example(srv: Server, lines: list[bytes]) -> None:
    """Hostile lines over TCP on a fresh connection (one answer each), then each line
    as the body of POST /v1/publish (never a 5xx)."""
    data = b"".join(lines)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
        answers = fenced_answers(sock, data, "fence", bytearray())
        assert answers[0].type == "hello"
        assert_one_answer_per_line(data, answers[1:])
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=TIMEOUT)
    try:
        for line in lines:
            conn.request("POST", "/v1/publish", body=line, headers={"Content-Type": "x"})
            r = conn.getresponse()
            body = r.read()
            assert r.status in (200, 400, 409, 413), (line[:200], r.status, body[:300])
            check_frame(body)
    finally:
        conn.close()


def test_fuzz_hypothesis(fuzz_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """Hypothesis (bounded examples): hostile request lines over TCP and HTTP: one
    answer per line, never internal, never a 5xx, every frame one valid UTF-8 line; a
    follower equals a fresh sync at the end, and nothing was logged as an error."""
    srv = fuzz_server
    follower = Follower(srv.port)
    try:
        run = settings(
            max_examples=int(os.environ.get("STATECAST_FUZZ_EXAMPLES", "300")),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(lines=st.lists(hostile_lines(), min_size=1, max_size=5))(one_example))
        run(srv=srv)
        check_follower(follower, srv.port)
    finally:
        follower.close()
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [r.getMessage()[:300] for r in bad]
    assert "Traceback" not in caplog.text


# -- the seeded fuzzer (slow) ------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.inputs = {"tcp": 0, "ws": 0, "http-publish": 0, "http-snapshot": 0}
        self.codes: dict[str, int] = {}
        self.statuses: dict[int, int] = {}

    def code(self, frames: list[AnyFrame]) -> None:
        for f in frames:
            if f.type == "error" and f.code is not None:
                self.codes[f.code] = self.codes.get(f.code, 0) + 1


async def fuzz_tcp(port: int, fuzz: Fuzz, n: int, tally: Tally) -> None:
    """``n`` inputs over TCP, 50 per fence, on connections renewed every 20 batches."""
    batch = 50
    done = 0
    while done < n:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * MiB)
        try:
            for _ in range(20):
                if done >= n:
                    break
                inputs = [fuzz.line() for _ in range(min(batch, n - done))]
                data = b"".join(inputs)
                fence = f"fence-tcp-{done}"
                writer.write(data + b'{"op":"ping","id":"' + fence.encode() + b'"}\n')
                drain = asyncio.ensure_future(writer.drain())
                answers: list[AnyFrame] = []
                want = b'"' + fence.encode() + b'"'
                try:
                    async with asyncio.timeout(TIMEOUT * 3):
                        while True:
                            line = await reader.readline()
                            assert line.endswith(b"\n"), "closed in the middle of a batch"
                            f = check_frame(line[:-1])
                            if f.type == "pong" and bytes(f.id) == want:
                                break
                            answers.append(f)
                    await drain
                    got = [f for f in answers if f.type in TERMINAL]
                    assert len(got) == expected_answers(data), (
                        f"{len(got)} answers to {expected_answers(data)} lines"
                    )
                except (AssertionError, TimeoutError) as exc:
                    # Find the culprit line, one by one, on a fresh connection.
                    raise AssertionError(
                        f"TCP: {exc!r}; culprit: {await find_culprit(port, inputs)}"
                    ) from None
                tally.code(answers)
                done += len(inputs)
                tally.inputs["tcp"] = done
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def find_culprit(port: int, inputs: list[bytes]) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * MiB)
    try:
        await reader.readline()  # hello
        for i, data in enumerate(inputs):
            fence = f"culprit-{i}"
            writer.write(data + b'{"op":"ping","id":"' + fence.encode() + b'"}\n')
            answers = []
            async with asyncio.timeout(TIMEOUT):
                while True:
                    line = await reader.readline()
                    if not line:
                        return f"closed by {data[:300]!r}"
                    try:
                        f = check_frame(line[:-1])
                    except AssertionError as exc:
                        return f"{data[:300]!r} got {exc}"
                    if f.type == "pong" and bytes(f.id) == b'"' + fence.encode() + b'"':
                        break
                    answers.append(f)
            got = [f"{f.type}:{f.code}" for f in answers if f.type in TERMINAL]
            if len(got) != expected_answers(data):
                return f"{data[:300]!r} got {got}"
        return "none found alone (an interaction between lines)"
    finally:
        writer.close()


async def fuzz_ws(http: aiohttp.ClientSession, base: str, fuzz: Fuzz, n: int, tally: Tally) -> None:
    """``n`` inputs over WebSocket messages (text when UTF-8, else binary), 25 per fence."""
    done = 0
    while done < n:
        async with http.ws_connect(base + "/ws", max_msg_size=0) as ws:
            buffered: list[AnyFrame] = []

            async def next_frame(
                ws: aiohttp.ClientWebSocketResponse = ws, buffered: list[AnyFrame] = buffered
            ) -> AnyFrame:
                while not buffered:
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.TEXT, f"websocket ended: {msg}"
                    data = msg.data.encode()
                    assert not data.endswith(b"\n")
                    buffered.extend(check_frame(part) for part in data.split(b"\n"))
                return buffered.pop(0)

            await next_frame()  # hello
            for _ in range(20):
                if done >= n:
                    break
                inputs = [fuzz.line() for _ in range(min(25, n - done))]
                for data in inputs:
                    try:
                        await ws.send_str(data.decode())
                    except UnicodeDecodeError:
                        await ws.send_bytes(data)
                fence = f"fence-ws-{done}"
                await ws.send_str('{"op":"ping","id":"' + fence + '"}')
                want = b'"' + fence.encode() + b'"'
                answers = []
                try:
                    async with asyncio.timeout(TIMEOUT * 3):
                        while True:
                            f = await next_frame()
                            if f.type == "pong" and bytes(f.id) == want:
                                break
                            answers.append(f)
                except (AssertionError, TimeoutError) as exc:
                    raise AssertionError(
                        f"WebSocket: {exc!r} after one of {[d[:300] for d in inputs]}"
                    ) from None
                got = [f for f in answers if f.type in TERMINAL]
                # A message that does not end in a newline gets one (§10).
                expected = sum(expected_answers(d) for d in inputs)
                assert len(got) == expected, (
                    f"{len(got)} answers to {expected} lines over WebSocket: "
                    f"{[d[:120] for d in inputs]}"
                )
                tally.code(answers)
                done += len(inputs)
                tally.inputs["ws"] = done


async def fuzz_http(
    http: aiohttp.ClientSession, base: str, fuzz: Fuzz, n: int, tally: Tally
) -> None:
    """``n`` requests to POST /v1/publish and GET /v1/snapshot, 8 at a time."""
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            if i % 3:
                body = fuzz.publish_body()
                async with http.post(base + "/v1/publish", data=body) as r:
                    text = await r.read()
                    tally.statuses[r.status] = tally.statuses.get(r.status, 0) + 1
                    assert r.status < 500, (body[:300], r.status, text[:300])
                    try:
                        f = check_frame(text)
                    except AssertionError as exc:
                        raise AssertionError(f"POST /v1/publish {body[:300]!r}: {exc}") from None
                    assert f.type == ("ack" if r.status == 200 else "error"), text[:300]
                    tally.code([f])
                tally.inputs["http-publish"] += 1
            else:
                query = fuzz.snapshot_query()
                url = yarl.URL(base + "/v1/snapshot?" + query, encoded=True)
                async with http.get(url) as r:
                    try:
                        text = await r.read()
                    except aiohttp.ClientPayloadError as exc:
                        raise AssertionError(f"snapshot cut short ({exc}): ?{query}") from None
                    tally.statuses[r.status] = tally.statuses.get(r.status, 0) + 1
                    assert r.status < 500, (query[:300], r.status, text[:300])
                    if r.content_type != "application/json" and r.status != 200:
                        return  # the HTTP stack's own refusal (a URL too long)
                    frames = [check_frame(ln) for ln in text.split(b"\n") if ln]
                    if r.status == 200:
                        assert frames[-1].type == "snapshot_end", text[-300:]
                        assert {f.type for f in frames[:-1]} <= {"record"}
                    else:
                        assert [f.type for f in frames] == ["error"], text[:300]
                        tally.code(frames)
                tally.inputs["http-snapshot"] += 1

    for start in range(0, n, 500):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 500))))


@pytest.mark.slow
def test_fuzz_seeded(tmp_path: Path) -> None:
    """At least 100,000 seeded hostile inputs to a real ``statecast serve`` over TCP,
    WebSocket and HTTP at once; a follower equals a fresh sync at the end, and the
    server logged no error and no traceback."""
    seed = int(os.environ.get("STATECAST_FUZZ_SEED", "20240607"))
    scale = float(os.environ.get("STATECAST_FUZZ_SCALE", "1"))
    n_tcp, n_ws, n_http = int(60_000 * scale), int(25_000 * scale), int(15_000 * scale)
    http_port = free_port()
    proc = ServeProcess(
        tmp_path, "--store", "memory", "--heartbeat", "off", "--http-port", str(http_port)
    )
    tally = Tally()
    follower = Follower(proc.port)
    try:
        base = f"http://127.0.0.1:{http_port}"

        async def main() -> None:
            async with aiohttp.ClientSession() as http:
                await asyncio.gather(
                    fuzz_tcp(proc.port, Fuzz(seed), n_tcp, tally),
                    fuzz_ws(http, base, Fuzz(seed + 1), n_ws, tally),
                    fuzz_http(http, base, Fuzz(seed + 2), n_http, tally),
                )

        asyncio.run(main())
        assert sum(tally.inputs.values()) >= 100_000 * scale
        check_follower(follower, proc.port)
        assert follower.frames > 0
        with LineClient(proc.port) as c:
            assert c.request({"op": "ping", "id": "end"})["type"] == "pong"
    finally:
        follower.close()
        if proc.p.poll() is None:
            code, out = proc.stop()
        else:
            code, out = proc.p.returncode, "".join(proc.lines)
        print("server log (tail):\n" + out[-8000:])  # shown when the test fails
    print(f"seed {seed}: inputs {tally.inputs}, error codes {tally.codes}, HTTP {tally.statuses}")
    assert code == 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
    assert " ERROR " not in out, out[-5000:]
    assert "internal" not in out.lower(), out[-5000:]
