"""The client library's Client and blocking wrappers, against real servers."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

import statecast
from statecast import Change, Server
from statecast.client.connection import Client
from statecast.core.frames import Record, SnapshotBegin, SnapshotEnd
from tests.helpers import TIMEOUT, free_port, wait_for


def test_client_api_against_a_server() -> None:
    srv = Server(store="memory", http_port=None, port=0, heartbeat=None).start_in_thread()
    url = f"tcp://127.0.0.1:{srv.port}"

    async def main() -> None:
        async with Client(url) as c:
            assert c.hello is not None
            assert c.hello.epoch == srv.epoch
            # Many publishes in flight at once, answered in order.
            seqs = await asyncio.gather(*(c.publish([Change("x", f"k{i}", i)]) for i in range(50)))
            assert seqs == list(range(1, 51))
            assert await c.ping() == 50
            frames = [f async for f in c.sync(collections=["x"])]
            assert isinstance(frames[0], SnapshotBegin)
            assert frames[0].count == 50
            assert isinstance(frames[-1], SnapshotEnd)
            assert sorted(f.key for f in frames if isinstance(f, Record)) == sorted(
                f"k{i}" for i in range(50)
            )
            raw = [f async for f in c.sync_raw(collections=["x"])]
            lines = [f for f in raw if isinstance(f, bytes)]
            assert len(lines) == 50
            assert sorted(msgspec.json.decode(line)["key"] for line in lines) == sorted(
                f"k{i}" for i in range(50)
            )
            assert isinstance(raw[-1], SnapshotEnd)
            assert raw[-1].count == 50
            with pytest.raises(statecast.BadRequest, match="non-empty"):
                await c.publish([{"collection": "x", "key": "", "value": 1}])
            with pytest.raises(statecast.ResyncRequired):
                await c.subscribe(after=10, epoch="not-this-one")
            sub = await c.subscribe(after=48)
            assert sub.seq == 48
            got = []
            async for f in c.frames():
                got.append(f)
                if len(got) == 2:
                    break
            assert [(f.seq, f.key) for f in got] == [(49, "k48"), (50, "k49")]  # type: ignore[union-attr]
            stats = await c.stats()
            assert stats.seq == 50
            assert stats.connections == 1

    try:
        asyncio.run(main())
        with pytest.raises(statecast.ConnectionClosed, match="cannot connect"):
            asyncio.run(Client(f"tcp://127.0.0.1:{free_port()}").connect())
    finally:
        srv.stop_in_thread()


def test_blocking_api() -> None:
    # Heartbeats let the server notice subscribers that closed their side (§4.3).
    srv = Server(store="memory", http_port=None, port=0, heartbeat=0.2).start_in_thread()
    url = f"tcp://127.0.0.1:{srv.port}"
    progress: list[statecast.Progress] = []
    try:
        for i in range(3000):
            srv.put("big", f"k{i}", i)
        with statecast.BlockingClient(url) as c:
            assert c.publish(Change("x", "a", 1)) == 3001
            assert c.ping() == 3001
            assert len(c.sync(["x"])) == 3
        with statecast.BlockingReplica(url, on_progress=progress.append) as r:
            r.wait_synced(TIMEOUT)
            assert r.get("x", "a") == 1
            srv.put("x", "a", 2)
            srv.delete("big", "k0")
            events = []
            for e in r.changes(timeout=TIMEOUT):
                events.append(e)
                if len(events) == 2:
                    break
            assert [(e.key, e.deleted) for e in events] == [("a", False), ("k0", True)]  # type: ignore[union-attr]
            assert r.get("x", "a") == 2
            snap = r.snapshot()
            assert len(snap["big"]) == 2999
            assert r.seq == 3003
        assert progress[-1].records == progress[-1].total == 3001
        assert progress[-1].bytes > 3001 * 40
        wait_for(lambda: srv.stats()["connections"] == 0, "clients to disconnect")
    finally:
        srv.stop_in_thread()


def test_client_keeps_frames_a_consumer_did_not_take() -> None:
    srv = Server(store="memory", http_port=None, port=0, heartbeat=None).start_in_thread()

    async def main() -> list[int]:
        async with asyncio.timeout(TIMEOUT), Client(f"tcp://127.0.0.1:{srv.port}") as c:
            await c.subscribe()
            # One batch: its five frames arrive together, in one read.
            await asyncio.to_thread(srv.publish, [Change("c", f"k{i}", i) for i in range(5)])
            seen = []
            async for f in c.frames():
                seen.append(f.seq)  # type: ignore[union-attr]
                if len(seen) == 2:
                    break
            async for f in c.frames():  # a new consumer gets the rest, none lost
                seen.append(f.seq)  # type: ignore[union-attr]
                if len(seen) == 5:
                    break
            return seen

    try:
        assert asyncio.run(main()) == [1, 2, 3, 4, 5]
    finally:
        srv.stop_in_thread()
