"""The HTTP port with a real HTTP client: WebSocket, snapshot, publish, metrics, health."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest

from statecast import Change, Server
from statecast.core import state as state_module
from tests.helpers import TIMEOUT, LineClient, frames_of


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(
        store="memory", port=0, http_port=0, heartbeat=None, shutdown_grace=2
    ).start_in_thread()
    try:
        yield srv
    finally:
        srv.stop_in_thread(timeout=30)


def base(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.http_port}"


async def ws_frames(ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[dict[str, Any]]:
    """Every frame of every message (a message may hold several, newline-separated)."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            return
        for line in msg.data.split("\n"):
            obj = msgspec.json.decode(line)
            assert isinstance(obj, dict)
            yield obj


async def read_until(frames: AsyncIterator[dict[str, Any]], ftype: str) -> list[dict[str, Any]]:
    out = []
    async with asyncio.timeout(TIMEOUT):
        async for f in frames:
            out.append(f)
            if f["type"] == ftype:
                return out
    raise AssertionError(f"no {ftype} frame")


def test_health_and_readiness(server: Server) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(base(server) + "/healthz") as r:
                assert r.status == 200
                assert await r.json() == {"status": "alive"}
            async with http.get(base(server) + "/readyz") as r:
                assert r.status == 200
                assert (await r.json())["status"] == "ready"

    asyncio.run(main())


def test_snapshot_and_publish_endpoints(server: Server) -> None:
    server.publish([Change("orders", f"O-{i}", {"i": i}) for i in range(3000)])
    server.put("fills", "F-1", 1)

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(base(server) + "/v1/snapshot?collections=orders") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "application/x-ndjson"
                assert r.headers["X-Statecast-Seq"] == "3001"
                assert r.headers["X-Statecast-Epoch"] == server.epoch
                frames = frames_of(await r.read())
            assert len(frames) == 3001
            assert {f["type"] for f in frames[:-1]} == {"record"}
            assert frames[-1] == {"type": "snapshot_end", "seq": 3001, "count": 3000}
            body = {"changes": [{"collection": "c", "key": "k", "value": [1, 2]}], "id": 9}
            async with http.post(base(server) + "/v1/publish", json=body) as r:
                assert r.status == 200
                assert await r.json() == {"type": "ack", "seq": 3002}
            for bad, status, code in [
                (b"{not json", 400, "bad_request"),
                (b'{"changes":[{"collection":"c","key":""}]}', 400, "bad_request"),
                (b'{"op":"sync","changes":[]}', 400, "bad_request"),
                (io.BytesIO(b"x" * (2 << 20)), 413, "too_large"),
            ]:
                async with http.post(base(server) + "/v1/publish", data=bad) as r:
                    assert r.status == status, await r.text()
                    assert (await r.json())["code"] == code
            async with http.get(base(server) + "/v1/snapshot?collections=bad%20name") as r:
                assert r.status == 400
                assert (await r.json())["code"] == "bad_request"
        assert server.seq == 3002

    asyncio.run(main())


def test_metrics(server: Server) -> None:
    server.put("c", "k", 1)

    async def main() -> str:
        async with aiohttp.ClientSession() as http, http.ws_connect(base(server) + "/ws") as ws:
            await ws.send_str('{"op":"subscribe"}')
            await ws.send_str("nonsense")
            frames = ws_frames(ws)
            await read_until(frames, "error")
            await asyncio.to_thread(server.put, "c", "k", 2)
            await read_until(frames, "change")
            async with http.get(base(server) + "/metrics") as r:
                assert r.status == 200
                return await r.text()

    text = asyncio.run(main())
    for line in [
        'statecast_connections{transport="ws"} 1.0',
        "statecast_subscribers 1.0",
        "statecast_seq 2.0",
        "statecast_changes_published_total 2.0",
        "statecast_deliveries_total 1.0",
        'statecast_errors_total{code="bad_request"} 1.0',
        "statecast_publish_to_send_seconds_count 1.0",
    ]:
        assert line in text, line
    assert "statecast_bytes_sent_total" in text
    assert "statecast_pending_output_bytes" in text


def test_websocket_sync_live_resume(server: Server) -> None:
    for i in range(500):
        server.put("c", f"k{i}", i)

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(base(server) + "/ws") as ws:
                frames = ws_frames(ws)
                hello = (await read_until(frames, "hello"))[0]
                assert hello["seq"] == 500
                await ws.send_str('{"op":"sync","live":true,"id":"s"}')
                got = await read_until(frames, "snapshot_end")
                assert got[0] == {
                    "type": "snapshot_begin",
                    "seq": 500,
                    "epoch": server.epoch,
                    "count": 500,
                    "id": "s",
                }
                assert len([f for f in got if f["type"] == "record"]) == 500
                await asyncio.to_thread(
                    server.publish, [Change("c", "k1", "x"), Change("d", "n", 1)]
                )
                changes = [await anext(frames), await anext(frames)]
                assert [c["seq"] for c in changes] == [501, 502]
                await ws.send_str('{"op":"ping","id":1}')
                assert (await read_until(frames, "pong"))[-1] == {
                    "type": "pong",
                    "seq": 502,
                    "id": 1,
                }
            await asyncio.to_thread(server.put, "c", "missed", 1)
            async with http.ws_connect(base(server) + "/ws") as ws:
                frames = ws_frames(ws)
                await read_until(frames, "hello")
                await ws.send_str(
                    msgspec.json.encode(
                        {"op": "subscribe", "from": 502, "epoch": server.epoch}
                    ).decode()
                )
                got = await read_until(frames, "change")
                assert got[-1]["seq"] == 503
                assert got[-1]["key"] == "missed"
                await ws.send_str('{"op":"subscribe","from":1,"epoch":"other"}')
                err = await read_until(frames, "error")
                assert err[-1]["code"] == "bad_request"  # it has a live subscription already

    asyncio.run(main())


def test_websocket_slow_consumer_and_bye() -> None:
    srv = Server(
        store="memory", port=0, http_port=0, heartbeat=None, max_pending=64 * 1024
    ).start_in_thread()
    try:

        async def main() -> list[dict[str, Any]]:
            async with aiohttp.ClientSession() as http:
                slow = await http.ws_connect(base(srv) + "/ws", max_msg_size=0)
                await slow.send_str('{"op":"subscribe"}')
                while '"subscribed"' not in (await slow.receive_str()):
                    pass  # then it reads nothing more

                def flood() -> None:
                    for i in range(20_000):
                        srv.publish(
                            [Change("c", f"k{j}", {"pad": "x" * 500, "i": i}) for j in range(10)]
                        )
                        if srv.stats()["slow_consumer_disconnects"]:
                            return

                await asyncio.to_thread(flood)  # the client reads nothing meanwhile
                assert srv.stats()["slow_consumer_disconnects"] == 1
                async with asyncio.timeout(TIMEOUT):
                    frames = [f async for f in ws_frames(slow)]
                await slow.close()
                return frames

        frames = asyncio.run(main())
        seqs = [f["seq"] for f in frames if f["type"] == "change"]
        if seqs:  # whole frames, in order, no gap, up to the cut
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert frames[-1]["type"] == "error"
        assert frames[-1]["code"] == "slow_consumer"
    finally:
        srv.stop_in_thread()

    srv = Server(store="memory", port=0, http_port=0, heartbeat=None).start_in_thread()

    async def bye() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.ws_connect(base(srv) + "/ws") as ws:
            frames = ws_frames(ws)
            await read_until(frames, "hello")
            await ws.send_str("watch")
            await read_until(frames, "snapshot_end")
            await asyncio.to_thread(srv.stop_in_thread)
            async with asyncio.timeout(TIMEOUT):
                return [f async for f in frames]

    assert asyncio.run(bye()) == [{"type": "bye", "reason": "shutdown"}]


def test_readyz_is_false_while_stopping() -> None:
    srv = Server(
        store="memory", port=0, http_port=0, heartbeat=None, shutdown_grace=3, max_pending=64 << 20
    ).start_in_thread()
    http_port = srv.http_port
    # A subscriber that never reads keeps the shutdown waiting for its output.
    stuck = LineClient(srv.port, rcvbuf=4096)
    assert stuck.request({"op": "subscribe"})["type"] == "subscribed"
    for i in range(30):
        srv.publish([Change("c", f"k{j}", {"pad": "p" * 1000, "i": i}) for j in range(1000)])
    stopper = threading.Thread(target=srv.stop_in_thread)
    stopper.start()

    async def probe() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"http://127.0.0.1:{http_port}/readyz") as r:
                    if r.status == 503:
                        return r.status, await r.json()
                await asyncio.sleep(0.01)

    try:
        assert asyncio.run(probe()) == (503, {"status": "stopping"})
    finally:
        stuck.close()
        stopper.join(TIMEOUT)


def test_websocket_heartbeat() -> None:
    srv = Server(store="memory", port=0, http_port=0, heartbeat=0.2).start_in_thread()
    try:

        async def main() -> list[dict[str, Any]]:
            async with aiohttp.ClientSession() as http, http.ws_connect(base(srv) + "/ws") as ws:
                frames = ws_frames(ws)
                await ws.send_str('{"op":"subscribe"}')
                await read_until(frames, "subscribed")
                return await read_until(frames, "heartbeat")

        assert asyncio.run(main()) == [{"type": "heartbeat", "seq": 0}]
    finally:
        srv.stop_in_thread()


def test_an_http_snapshot_takes_one_step_a_loop_turn(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an adversarial run: a snapshot whose filter matched nothing never gave
    the loop back (no write, so no await), and stalled every other client for as long
    as it ran. Each step now ends its loop turn, matching or not: a callback scheduled
    during the first step has run by the third. No timing is involved."""
    server.publish([Change("orders", f"O-{i}", {"account": "A"}) for i in range(5000)])
    seen: list[bool] = []
    ran = threading.Event()
    calls = 0
    original = state_module.Snapshot.read

    def read(self: state_module.Snapshot, max_bytes: int) -> list[bytes]:
        nonlocal calls
        calls += 1
        if calls == 1:  # on the server's loop: a callback for its next turn
            asyncio.get_running_loop().call_soon(ran.set)
        elif calls == 3:
            seen.append(ran.is_set())
        return original(self, max(1, max_bytes // 64))  # many small steps

    monkeypatch.setattr(state_module.Snapshot, "read", read)

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            for where in ('{"account":"none"}', '{"account":"A"}'):
                seen.clear()
                ran.clear()
                nonlocal calls
                calls = 0
                async with http.get(base(server) + "/v1/snapshot?where=" + where) as r:
                    assert r.status == 200
                    frames = frames_of(await r.read())
                assert frames[-1]["type"] == "snapshot_end"
                assert seen == [True], where

    asyncio.run(main())
