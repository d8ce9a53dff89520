"""The rolling fan-out over real sockets (docs/fanout.md, "Rolling writes").

Hundreds of subscribers over TCP and WebSocket, with mixed views (all, collections,
where filters, conflate), follow several publishers that publish batches at once;
some join in the middle of the rounds, some read slowly. Every subscriber's frames
are checked against the server's change log, read back at the end:

* a plain subscriber gets exactly the changes of its view after its start, in seq
  order, a batch's frames back to back (§5.2, §5.3, §3.7);
* at every heartbeat its copy equals its view of the state at the heartbeat's seq
  (§4.3), for conflated subscribers too (§3.9), and heartbeats never go backwards;
* a slow one is cut off with ``slow_consumer`` after an exact prefix of its changes
  ending at a batch boundary, or converges after ``conflating`` (§7);
* on shutdown every subscriber gets every acked change of its view before ``bye`` (§8).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from statecast import Change, Server
from tests.helpers import TIMEOUT, LineClient, ServeProcess, frames_of, free_port

Frame = dict[str, Any]
Where = dict[str, Any]
Key = tuple[str, str]
# seq, collection, key, value (None: deleted)
Logged = tuple[int, str, str, Any]

_SENTINEL_DELETED = object()


# -- views -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewSpec:
    collections: tuple[str, ...] | None = None
    where: tuple[tuple[str, tuple[Any, ...]], ...] | None = None  # field -> allowed values

    def request(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.collections is not None:
            out["collections"] = list(self.collections)
        if self.where is not None:
            out["where"] = {f: {"in": list(vs)} for f, vs in self.where}
        return out

    def selects(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    def matches(self, value: Any) -> bool:
        if self.where is None:
            return True
        if not isinstance(value, dict):
            return False
        for f, allowed in self.where:
            v = value.get(f, _SENTINEL_DELETED)
            if isinstance(v, (dict, list)) or v is _SENTINEL_DELETED:
                return False
            if not any(type(v) is type(a) and v == a for a in allowed):
                return False
        return True

    def in_view(self, collection: str, value: Any) -> bool:
        return self.selects(collection) and value is not None and self.matches(value)


V_ALL = ViewSpec()
V_A = ViewSpec(("a",))
V_AB = ViewSpec(("a", "b"))
V_WA = ViewSpec(("a",), (("g", (0, 1)),))
V_W2 = ViewSpec(None, (("g", (2,)),))
V_BIG = ViewSpec(("big",))
V_HUGE = ViewSpec(("huge",))  # only slow subscribers and those of V_ALL see it
VIEWS = [V_ALL, V_A, V_AB, V_WA, V_W2, V_BIG]


def expected_frames(log: list[Logged], view: ViewSpec, after: int) -> list[Logged]:
    """The change frames a plain subscriber of ``view`` gets after seq ``after``
    (§3.7: a record that leaves the view arrives as a delete)."""
    current: dict[Key, Any] = {}
    out: list[Logged] = []
    for seq, col, key, value in log:
        if not view.selects(col):
            continue
        was_in = view.in_view(col, current.get((col, key)))
        current[(col, key)] = value
        if seq <= after:
            continue
        now_in = view.in_view(col, value)
        if view.where is None:
            out.append((seq, col, key, value))  # a delete of a missing key too (§3.3)
        elif now_in:
            out.append((seq, col, key, value))
        elif was_in:
            out.append((seq, col, key, None))
    return out


class StateAt:
    """A view's state, replayed from the log up to a seq (seqs asked only rise)."""

    def __init__(self, log: list[Logged], view: ViewSpec) -> None:
        self._log = log
        self._view = view
        self._pos = 0
        self._all: dict[Key, Any] = {}

    def at(self, seq: int) -> dict[Key, Any]:
        while self._pos < len(self._log) and self._log[self._pos][0] <= seq:
            _, col, key, value = self._log[self._pos]
            self._all[(col, key)] = value
            self._pos += 1
        return {k: v for k, v in self._all.items() if self._view.in_view(k[0], v)}


# -- subscribers -------------------------------------------------------------------------
@dataclass
class Sub:
    name: str
    transport: str  # "tcp" or "ws"
    view: ViewSpec
    how: str  # "sync" (sync live) or "subscribe" (from now, or from ``from_``)
    from_: int | None = None
    conflate: float | None = None
    slow: float = 0.0  # at most this many seconds it does not read, until ``slow_from``
    slow_from: asyncio.Event | None = None
    rcvbuf: int | None = None
    frames: list[Frame] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)  # per frame, its WS message
    start: int = -1  # the seq its live changes start after
    done: bool = False
    eof: bool = False

    def request(self) -> dict[str, Any]:
        req: dict[str, Any] = (
            {"op": "sync", "live": True} if self.how == "sync" else {"op": "subscribe"}
        )
        if self.how == "subscribe" and self.from_ is not None:
            req["from"] = self.from_
        if self.conflate is not None:
            req["conflate"] = self.conflate
        req.update(self.view.request())
        req["id"] = self.name
        return req


class Done(Exception):
    pass


def _feed(sub: Sub, frame: Frame, msg: int, final: list[int]) -> None:
    sub.frames.append(frame)
    sub.messages.append(msg)
    t = frame["type"]
    if t in ("snapshot_end", "subscribed"):
        sub.start = frame["seq"]
    if final and t in ("change", "heartbeat") and frame["seq"] >= final[0]:
        sub.done = True
    if t in ("error", "bye"):
        sub.done = True


class _Lines:
    """Lines from a non-blocking socket, read only when asked: a reader that sleeps
    leaves the bytes in the kernel, and the server's buffer fills (asyncio streams
    would read on in the background)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()

    async def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                out = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return out
            try:
                chunk = await self.loop.sock_recv(self.sock, 1 << 18)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return b""
            self.buf += chunk


async def run_tcp(sub: Sub, port: int, final: list[int]) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sub.rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sub.rcvbuf)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        lines = _Lines(sock)
        hello = msgspec.json.decode(await lines.line())
        assert hello["type"] == "hello"
        await loop.sock_sendall(sock, msgspec.json.encode(sub.request()) + b"\n")
        if sub.slow:
            while sub.start < 0:
                _feed(sub, msgspec.json.decode(await lines.line()), 0, final)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sub.slow):
                    assert sub.slow_from is not None
                    await sub.slow_from.wait()
        while not sub.done:
            line = await lines.line()
            if not line:
                sub.eof = True
                return
            _feed(sub, msgspec.json.decode(line), 0, final)
        # After an error or bye: the server closes.
        if sub.frames[-1]["type"] in ("error", "bye"):
            sub.eof = (await lines.line()) == b""
    finally:
        sock.close()


async def run_ws(sub: Sub, http: aiohttp.ClientSession, port: int, final: list[int]) -> None:
    async with http.ws_connect(f"http://127.0.0.1:{port}/ws", max_msg_size=0) as ws:
        msg = await ws.receive()
        assert frames_of(msg.data.encode())[0]["type"] == "hello"
        await ws.send_str(msgspec.json.encode(sub.request()).decode())
        n = 0
        while not sub.done:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                sub.eof = True
                return
            n += 1
            for f in frames_of(msg.data.encode()):
                _feed(sub, f, n, final)
        if sub.frames[-1]["type"] in ("error", "bye"):  # §10: then a WebSocket close
            msg = await ws.receive()
            sub.eof = msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


# -- publishers --------------------------------------------------------------------------
@dataclass
class Batch:
    seq: int  # of its last change
    size: int


def make_batch(rng: random.Random, p: int, i: int) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 6)):
        col = rng.choice("aab")
        key = f"{col}{rng.randrange(30)}"
        if rng.random() < 0.12:
            changes.append({"collection": col, "key": key, "delete": True})
        else:
            changes.append(
                {"collection": col, "key": key, "value": {"g": rng.randrange(4), "p": p, "i": i}}
            )
    if i % 4 == 0:
        changes.append(
            {
                "collection": "big",
                "key": f"x{rng.randrange(8)}",
                "value": {"i": i, "pad": "y" * 3000},
            }
        )
    return changes


def make_huge(rng: random.Random, p: int, i: int) -> list[dict[str, Any]]:
    return [{"collection": "huge", "key": f"h{i % 10}", "value": {"i": i, "pad": "z" * 100_000}}]


async def publisher(
    port: int,
    p: int,
    count: int,
    *,
    batches: list[Batch],
    pace: float,
    inflight: int = 4,
    make: Callable[[random.Random, int, int], list[dict[str, Any]]] = make_batch,
) -> None:
    rng = random.Random(p)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
    sizes: dict[int, int] = {}
    try:
        await reader.readline()  # hello
        sent = acked = 0
        while acked < count:
            while sent < count and sent - acked < inflight:
                changes = make(rng, p, sent)
                sizes[sent] = len(changes)
                req = {"op": "publish", "id": sent, "changes": changes}
                writer.write(msgspec.json.encode(req) + b"\n")
                sent += 1
            await writer.drain()
            f = msgspec.json.decode(await reader.readline())
            assert f["type"] == "ack", f
            batches.append(Batch(f["seq"], sizes.pop(f["id"])))
            acked += 1
            if pace:
                await asyncio.sleep(pace)
    finally:
        writer.close()


def read_log(port: int, upto: int) -> list[Logged]:
    """Every change up to ``upto``, from the retained log (a subscribe from 0)."""
    out: list[Logged] = []
    with LineClient(port) as c:
        c.send({"op": "subscribe", "from": 0})
        assert c.read()["type"] == "subscribed"
        while not out or out[-1][0] < upto:
            f = c.read()
            if f["type"] != "change":
                continue
            out.append(
                (f["seq"], f["collection"], f["key"], None if f.get("deleted") else f["value"])
            )
    assert [e[0] for e in out] == list(range(1, upto + 1))
    return out


def fresh_sync(port: int) -> tuple[int, dict[Key, Any]]:
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    return frames[-1]["seq"], {
        (f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"
    }


# -- checks ------------------------------------------------------------------------------
def check_batches(batches: list[Batch], upto: int) -> dict[int, int]:
    """Batch id (its last seq) of every seq; the acks cover every seq exactly once."""
    of: dict[int, int] = {}
    for b in batches:
        for s in range(b.seq - b.size + 1, b.seq + 1):
            assert s not in of
            of[s] = b.seq
    assert sorted(of) == list(range(1, upto + 1))
    return of


def check_sub(  # noqa: PLR0915 (one pass over the frames, every rule at its frame)
    sub: Sub, log: list[Logged], batch_of: dict[int, int], *, complete: bool = True
) -> str:
    """Check one subscriber's frames; returns how it ended ("live", "cut", "bye")."""
    where = f"{sub.name} ({sub.transport}, {sub.view}, conflate={sub.conflate})"
    frames = sub.frames
    types = [f["type"] for f in frames]
    assert sub.start >= 0, (where, frames[:3])
    # The copy: a sync's snapshot, or for a subscribe, the view's state at its start.
    state = StateAt(log, sub.view)
    copy: dict[Key, Any] = {} if sub.how == "sync" else dict(state.at(sub.start))
    begun = False
    last_seq = sub.start
    last_hb = -1
    got: list[Logged] = []
    positions: list[int] = []
    conflating = False
    ended = "live"
    for i, f in enumerate(frames):
        t = f["type"]
        if t == "record":
            copy[(f["collection"], f["key"])] = f["value"]
        elif t in ("snapshot_end", "subscribed"):
            begun = True
            if t == "snapshot_end":
                assert copy == state.at(f["seq"]), f"{where}: snapshot at {f['seq']} differs"
        elif t == "change":
            assert begun, where
            seq = f["seq"]
            assert seq > last_seq, f"{where}: seq {seq} after {last_seq}"
            assert sub.view.selects(f["collection"]), where
            last_seq = seq
            k = (f["collection"], f["key"])
            if f.get("deleted"):
                copy.pop(k, None)
            else:
                copy[k] = f["value"]
            if not conflating and sub.conflate is None:
                got.append(
                    (seq, f["collection"], f["key"], None if f.get("deleted") else f["value"])
                )
                positions.append(i)
        elif t == "heartbeat":
            h = f["seq"]
            assert h >= last_hb, f"{where}: heartbeat {h} after heartbeat {last_hb}"
            assert h >= last_seq, f"{where}: heartbeat {h} after change {last_seq}"
            last_hb = h
            if not conflating:
                # §4.3: every change of its view up to h has been written before it.
                assert copy == state.at(h), f"{where}: copy at heartbeat {h} is not the view"
        elif t == "conflating":
            conflating = f["on"]
        elif t == "error":
            assert f["code"] == "slow_consumer", (where, f)
            ended = "cut"
        elif t == "bye":
            ended = "bye"
        elif t == "snapshot_begin":
            pass
        else:
            raise AssertionError(f"{where}: unexpected frame {f}")
    if ended in ("cut", "bye"):
        assert types[-1] in ("error", "bye"), where
        assert sub.eof, f"{where}: not closed after {types[-1]}"
    if sub.conflate is None and "conflating" not in types:
        want = expected_frames(log, sub.view, sub.start)
        if ended == "live" and complete:
            assert got == want, f"{where}: {len(got)} changes, {len(want)} expected"
        else:
            assert got == want[: len(got)], f"{where}: not a prefix of its changes"
            if got and ended == "cut":
                # Cut off between writes: a write holds whole batches.
                last = got[-1][0]
                nxt = want[len(got)][0] if len(got) < len(want) else None
                assert nxt is None or batch_of[nxt] != batch_of[last], f"{where}: cut mid-batch"
        # §5.3: a batch's frames back to back, nothing between them.
        for j in range(1, len(got)):
            if batch_of[got[j][0]] == batch_of[got[j - 1][0]]:
                assert positions[j] == positions[j - 1] + 1, (
                    f"{where}: batch {batch_of[got[j][0]]} split by {frames[positions[j - 1] + 1]}"
                )
                if sub.transport == "ws":
                    # A live write is one message (§10); a catch-up step may end
                    # mid-batch (only subscribers that joined before the first
                    # publish are surely past their catch-up).
                    assert sub.messages[positions[j]] == sub.messages[positions[j - 1]] or (
                        not sub.name.startswith("s")
                    ), f"{where}: batch {batch_of[got[j][0]]} in two messages"
    if ended == "live" and complete:
        final = log[-1][0] if log else 0
        assert copy == state.at(final), f"{where}: final copy is not the view"
    return ended


# -- the tests ---------------------------------------------------------------------------
def _start_subs(
    tasks: list[asyncio.Task[None]],
    subs: list[Sub],
    new: list[Sub],
    *,
    port: int,
    http_port: int,
    http: aiohttp.ClientSession,
    final: list[int],
) -> None:
    for s in new:
        subs.append(s)
        if s.transport == "tcp":
            tasks.append(asyncio.create_task(run_tcp(s, port, final)))
        else:
            tasks.append(asyncio.create_task(run_ws(s, http, http_port, final)))


async def _watch_slow(http: aiohttp.ClientSession, http_port: int, go: asyncio.Event) -> None:
    """Set ``go`` as soon as the server has cut off or conflated a subscriber (§7): the
    slow readers then read at once, well within the linger after a cut (2 s)."""
    pattern = re.compile(
        r"^statecast_(?:slow_consumer_disconnects(?:_total)?"
        r'|limit_hits_total\{limit="slow_consumer_conflated"\}) (\S+)$',
        re.M,
    )
    while not go.is_set():
        async with http.get(f"http://127.0.0.1:{http_port}/metrics") as r:
            text = await r.text()
        if any(float(v) > 0 for v in pattern.findall(text)):
            go.set()
        await asyncio.sleep(0.01)


def plan_subs(prefix: str, n_tcp: int, n_ws: int, rng: random.Random) -> list[Sub]:
    out = []
    for i in range(n_tcp + n_ws):
        view = VIEWS[i % len(VIEWS)]
        conflate = 0.05 if i % 7 == 3 and view is not V_BIG else None
        out.append(
            Sub(
                f"{prefix}{i}",
                "tcp" if i < n_tcp else "ws",
                view,
                rng.choice(["sync", "subscribe"]),
                conflate=conflate,
            )
        )
    return out


async def _wait_started(subs: list[Sub], deadline: float) -> None:
    while not all(s.start >= 0 or s.done for s in subs):
        assert time.monotonic() < deadline, "subscribers did not start"
        await asyncio.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disconnect", "conflate"])
def test_hundreds_of_mixed_subscribers_follow_concurrent_publishers_exactly(
    tmp_path: Path, mode: str
) -> None:
    http_port = free_port()
    srv = ServeProcess(
        tmp_path,
        "--store",
        "memory",
        "--http-port",
        str(http_port),
        "--heartbeat",
        "0.1",
        "--max-pending",
        str(64 * 1024),
        "--slow-consumer",
        mode,
    )
    rng = random.Random(7)
    batches: list[Batch] = []
    subs: list[Sub] = []
    final: list[int] = []

    async def main() -> None:
        tasks: list[asyncio.Task[None]] = []
        async with aiohttp.ClientSession() as http:
            first = plan_subs("s", 120, 40, rng)
            go = asyncio.Event()  # the server has cut off or conflated a slow one
            slow = [
                Sub(f"slow{i}", "tcp", v, "subscribe", slow=TIMEOUT, rcvbuf=4096, slow_from=go)
                for i, v in enumerate([V_HUGE, V_ALL, V_HUGE, V_AB])
            ]
            _start_subs(
                tasks,
                subs,
                first + slow,
                port=srv.port,
                http_port=http_port,
                http=http,
                final=final,
            )
            await _wait_started(first + slow, time.monotonic() + TIMEOUT)
            watcher = asyncio.create_task(_watch_slow(http, http_port, go))
            pubs = [
                asyncio.create_task(publisher(srv.port, p, 150, batches=batches, pace=0.002))
                for p in range(4)
            ]
            pubs.append(
                asyncio.create_task(
                    publisher(
                        srv.port, 4, 60, batches=batches, pace=0.0, inflight=8, make=make_huge
                    )
                )
            )
            # Joiners in the middle of the rounds: sync live, subscribe, subscribe from
            # a seq a little behind.
            for wave in range(6):
                await asyncio.sleep(0.08)
                seen = max((b.seq for b in batches), default=0)
                new = plan_subs(f"j{wave}.", 6, 3, rng)
                for j, s in enumerate(new):
                    if j % 3 == 2:
                        s.how, s.from_ = "subscribe", max(0, seen - rng.randrange(50))
                _start_subs(
                    tasks, subs, new, port=srv.port, http_port=http_port, http=http, final=final
                )
            await asyncio.gather(*pubs)
            go.set()
            await watcher
            final.append(max(b.seq for b in batches))
            for s in subs:  # those that already passed it
                if any(
                    f["type"] in ("change", "heartbeat") and f["seq"] >= final[0] for f in s.frames
                ):
                    s.done = True
            async with asyncio.timeout(TIMEOUT * 2):
                await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
        log = read_log(srv.port, final[0])
        seq, state = fresh_sync(srv.port)
        assert seq == final[0]
        assert StateAt(log, V_ALL).at(seq) == state
    finally:
        srv.stop()
    batch_of = check_batches(batches, final[0])
    ends = [check_sub(s, log, batch_of) for s in subs]
    slow_subs = [s for s in subs if s.name.startswith("slow")]
    if mode == "disconnect":
        assert any(s.frames[-1]["type"] == "error" for s in slow_subs), [
            s.frames[-1] for s in slow_subs
        ]
    else:
        assert any(any(f["type"] == "conflating" for f in s.frames) for s in slow_subs), (
            "no slow subscriber was conflated"
        )
        assert not any(f["type"] == "error" for s in subs for f in s.frames)
    assert sum(e == "live" for e in ends) >= len(subs) - len(slow_subs)


# -- shutdown (§8) -----------------------------------------------------------------------
def _stop_and_read(srv: Server, clients: list[LineClient]) -> list[list[Frame]]:
    """Stop the server while the clients read everything until it closes."""
    stopper = threading.Thread(target=srv.stop_in_thread)
    stopper.start()
    try:
        return [frames_of(c.read_all()) for c in clients]
    finally:
        stopper.join(TIMEOUT * 2)
        for c in clients:
            c.close()


def test_shutdown_sends_a_conflated_subscriber_what_changed_before_bye() -> None:
    """§8, §3.9: on shutdown a subscriber that asked for ``conflate`` gets the newest
    state of the interval under way before ``bye``. Found by an adversarial run: the
    interval was dropped (``Server.stop`` never called ``Fanout.emit_conflated``), so
    its copy stayed at the last emission and the acked changes since never reached it."""
    srv = Server(
        store="memory", http_port=None, port=0, heartbeat=None, shutdown_grace=2.0
    ).start_in_thread()
    with LineClient(srv.port) as c:
        c.send({"op": "subscribe", "conflate": 5.0, "id": 1})
        assert c.read()["type"] == "subscribed"
        for i in range(10):
            srv.publish([Change("q", f"k{i % 3}", i)])  # acked
        (frames,) = _stop_and_read(srv, [c])
    assert frames[-1] == {"type": "bye", "reason": "shutdown"}
    copy = {f["key"]: f.get("value") for f in frames if f["type"] == "change"}
    assert copy == {"k0": 9, "k1": 7, "k2": 8}, frames


def test_shutdown_sends_a_held_slow_consumer_what_changed_before_bye() -> None:
    """§8, §7 --slow-consumer conflate: a subscriber held while it drains, whose client
    reads everything within the grace, gets the newest state of the keys that changed
    while it was held, then ``conflating`` off, then ``bye``. Found by an adversarial
    run: ``Session.shutdown`` dropped the held state, so those acked changes were never
    sent."""
    srv = Server(
        store="memory",
        http_port=None,
        port=0,
        heartbeat=None,
        shutdown_grace=5.0,
        max_pending=64 * 1024,
        slow_consumer="conflate",
    ).start_in_thread()
    with LineClient(srv.port, rcvbuf=4096) as slow:
        slow.send({"op": "subscribe", "id": 1})
        assert slow.read()["type"] == "subscribed"
        i = 0
        deadline = time.monotonic() + TIMEOUT * 3
        while not any(c.session is not None and c.session.degraded for c in srv.connections):
            assert time.monotonic() < deadline, "the slow subscriber was never held"
            srv.publish([Change("q", f"k{j}", {"i": i, "pad": "x" * 500}) for j in range(30)])
            i += 1
        srv.publish([Change("q", f"k{j}", "final") for j in range(30)])  # acked
        (frames,) = _stop_and_read(srv, [slow])
    assert [f["type"] for f in frames if f["type"] != "change"][-1] == "bye"
    copy = {f["key"]: f.get("value") for f in frames if f["type"] == "change"}
    assert copy == {f"k{j}": "final" for j in range(30)}, [
        f for f in frames if f["type"] != "change"
    ]


@pytest.mark.slow
def test_sigterm_mid_round_every_plain_subscriber_gets_every_acked_change(
    tmp_path: Path,
) -> None:
    """§8: SIGTERM while four publishers publish to 100 subscribers (TCP and WebSocket,
    mixed views): each gets exactly its changes, in order, up to at least the last
    acked seq, then ``bye``, then the close. The log is read back after a restart
    (SQLite keeps it)."""
    http_port = free_port()
    args = ["--store", "sqlite", "--sqlite-synchronous", "normal", "--heartbeat", "0.1"]
    srv = ServeProcess(tmp_path, *args, "--http-port", str(http_port))
    rng = random.Random(3)
    batches: list[Batch] = []
    subs = [s for s in plan_subs("s", 75, 25, rng) if s.conflate is None]
    final: list[int] = []

    async def main() -> None:
        tasks: list[asyncio.Task[None]] = []
        async with aiohttp.ClientSession() as http:
            started: list[Sub] = []
            _start_subs(
                tasks, started, subs, port=srv.port, http_port=http_port, http=http, final=final
            )
            await _wait_started(subs, time.monotonic() + TIMEOUT)
            pubs = [
                asyncio.create_task(publisher(srv.port, p, 10_000, batches=batches, pace=0.0))
                for p in range(4)
            ]
            await asyncio.sleep(0.5)
            srv.p.send_signal(signal.SIGTERM)
            for r in await asyncio.gather(*pubs, return_exceptions=True):
                assert isinstance(r, (AssertionError, ConnectionError, msgspec.DecodeError)), r
            async with asyncio.timeout(TIMEOUT * 2):
                await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
        srv.p.wait(TIMEOUT * 3)  # it is shutting down already: a second SIGTERM would kill it
        status, out = srv.stop()
        assert status == 0, out
    finally:
        srv.stop()
    acked = max(b.seq for b in batches)
    assert acked > 0
    again = ServeProcess(tmp_path, *args)
    try:
        top, _ = fresh_sync(again.port)
        log = read_log(again.port, top)
    finally:
        again.stop()
    assert top >= acked
    batch_of = check_batches(batches, acked) if batches and top == acked else {}
    for s in subs:
        assert s.frames[-1] == {"type": "bye", "reason": "shutdown"}, (s.name, s.frames[-3:])
        assert s.eof, s.name
        want = expected_frames(log, s.view, s.start)
        got = [
            (f["seq"], f["collection"], f["key"], None if f.get("deleted") else f["value"])
            for f in s.frames
            if f["type"] == "change"
        ]
        assert got == want[: len(got)], s.name
        missing = [w for w in want[len(got) :] if w[0] <= acked]
        assert not missing, f"{s.name}: acked changes not sent before bye: {missing[:3]}"
        if batch_of:
            check_sub(s, log, batch_of, complete=False)
