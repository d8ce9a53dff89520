"""Publishes that are safe to retry and safe to race (issue 14, protocol §3.3), from
the client's side, against real servers: the client sends a batch again with the same
idempotency key after a lost connection, and the server applies it once; errors that
say the batch is wrong are not retried; the replica knows each record's seq."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import statecast
from statecast import Change
from statecast.client import Client, Replica
from tests.helpers import TIMEOUT, LineClient, ServeProcess, free_port
from tests.proxy import CuttingProxy

# -- tools ------------------------------------------------------------------------------


class AckCuttingProxy(CuttingProxy):
    """A :class:`CuttingProxy` that resets the connection instead of passing on an ack
    that is not a duplicate: the server has applied the batch, and the client never
    hears of it. Acks with ``"duplicate": true`` (of a batch sent again) pass."""

    def __init__(self, upstream_port: int, *, then_block: bool = False) -> None:
        self.acks_cut = 0
        self.then_block = then_block  # refuse connections after the first cut
        super().__init__(upstream_port)

    async def _down(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: asyncio.StreamWriter
    ) -> None:
        buf = b""
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(1 << 16):
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    frame = msgspec.json.decode(line) if line.strip() else {}
                    if frame.get("type") == "ack" and not frame.get("duplicate"):
                        self.acks_cut += 1
                        self.blocked = self.then_block
                        upstream.transport.abort()
                        dst.transport.abort()
                        return
                    dst.write(line + b"\n")
                await dst.drain()
        dst.transport.abort()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    srv = ServeProcess(tmp_path, "--port", str(free_port()), "--store", "memory")
    yield srv
    if srv.p.poll() is None:
        srv.stop(signal.SIGKILL)


@contextlib.contextmanager
def proxy_to(port: int, cls: type[CuttingProxy] = CuttingProxy) -> Iterator[Any]:
    proxy = cls(port)
    try:
        yield proxy
    finally:
        proxy.close()


def server_state(port: int) -> tuple[int, dict[tuple[str, str], tuple[Any, int]]]:
    """The server's seq and every record's (value, seq), from a fresh snapshot."""
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    records = {
        (f["collection"], f["key"]): (f["value"], f["seq"]) for f in frames if f["type"] == "record"
    }
    return frames[-1]["seq"], records


def fill(n: int) -> list[Change]:
    """A fill: its execution, its order, and the position it moves (three changes)."""
    return [
        Change("executions", f"X-{n}", {"order": "O-1", "qty": 10}),
        Change("orders", "O-1", {"filled": 10 * (n + 1)}),
        Change("positions", "ACC-1:AAPL", {"qty": 10 * (n + 1)}),
    ]


async def until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` on the loop (the hang guard bounds it)."""
    while True:
        if predicate():
            return
        await asyncio.sleep(0.005)


async def at_least(value: Callable[[], int], n: int) -> None:
    await until(lambda: value() >= n)


@contextlib.asynccontextmanager
async def hang_guard() -> AsyncIterator[None]:
    """Only against a hang: every test here passes or fails on what it sees."""
    async with asyncio.timeout(TIMEOUT * 6):
        yield


# -- exactly once through lost acks -------------------------------------------------------


def test_every_ack_lost_each_batch_applied_once(serve: ServeProcess) -> None:
    """The connection is cut before every first ack: the client reconnects, sends the
    batch again with the same key, and gets a duplicate ack with the original seq."""
    batches = 20

    async def body(port: int) -> list[statecast.Ack]:
        async with hang_guard(), Client(f"tcp://127.0.0.1:{port}", retry_timeout=None) as c:
            acks = [await c.publish_ack(fill(n)) for n in range(batches)]
            assert c.reconnects == batches
            return acks

    with proxy_to(serve.port, AckCuttingProxy) as proxy:
        acks = asyncio.run(body(proxy.port))
        assert proxy.acks_cut == batches
    assert all(ack.duplicate for ack in acks)
    assert [ack.seq for ack in acks] == [3 * (n + 1) for n in range(batches)]  # the originals
    seq, records = server_state(serve.port)
    assert seq == 3 * batches  # no batch applied twice: one seq per change
    assert records[("positions", "ACC-1:AAPL")] == ({"qty": 10 * batches}, seq)
    assert sum(1 for (coll, _) in records if coll == "executions") == batches


def test_pipelined_batches_keep_their_order_through_lost_acks(serve: ServeProcess) -> None:
    """Many publishes in flight, acks cut: the ones waiting are sent again in the order
    they were first sent, so the last write of each key is the last batch's."""
    batches = 40

    async def body(port: int) -> list[statecast.Ack]:
        async with hang_guard(), Client(f"tcp://127.0.0.1:{port}", retry_timeout=None) as c:
            return list(await asyncio.gather(*(c.publish_ack(fill(n)) for n in range(batches))))

    with proxy_to(serve.port, AckCuttingProxy) as proxy:
        acks = asyncio.run(body(proxy.port))
        assert proxy.acks_cut >= 1
    seq, records = server_state(serve.port)
    assert seq == 3 * batches
    assert sorted(ack.seq for ack in acks) == [3 * (n + 1) for n in range(batches)]
    assert [ack.seq for ack in acks] == sorted(ack.seq for ack in acks)  # in order
    assert records[("orders", "O-1")][0] == {"filled": 10 * batches}
    assert records[("positions", "ACC-1:AAPL")][0] == {"qty": 10 * batches}


def test_random_cuts_every_batch_applied_once(serve: ServeProcess) -> None:
    """Connections cut at random moments while a producer pipelines fills: whatever
    was cut where, every fill is applied exactly once, in order."""
    batches = 150
    stop = threading.Event()

    def cutter(proxy: CuttingProxy) -> None:
        rng = random.Random(14)
        for _ in range(15):
            if stop.wait(rng.uniform(0.005, 0.05)):
                return
            proxy.cut()

    async def body(proxy: CuttingProxy) -> None:
        url = f"tcp://127.0.0.1:{proxy.port}"
        async with hang_guard(), Client(url, retry_timeout=None) as c:
            t.start()  # once connected: connect() itself does not retry
            window: list[asyncio.Task[int]] = []
            for n in range(batches):
                window.append(asyncio.ensure_future(c.publish(fill(n))))
                if len(window) >= 8:
                    await window.pop(0)
            await asyncio.gather(*window)

    with proxy_to(serve.port) as proxy:
        t = threading.Thread(target=cutter, args=(proxy,))
        try:
            asyncio.run(body(proxy))
        finally:
            stop.set()
            if t.ident is not None:
                t.join(TIMEOUT)
    seq, records = server_state(serve.port)
    assert seq == 3 * batches
    assert records[("positions", "ACC-1:AAPL")][0] == {"qty": 10 * batches}
    assert {k for (coll, k) in records if coll == "executions"} == {
        f"X-{n}" for n in range(batches)
    }


def test_the_same_key_later_is_a_duplicate(serve: ServeProcess) -> None:
    async def body() -> None:
        async with hang_guard(), Client(f"tcp://127.0.0.1:{serve.port}") as c:
            first = await c.publish_ack(fill(0), idempotency_key="fill-0")
            again = await c.publish_ack(fill(0), idempotency_key="fill-0")
            assert (first.seq, first.duplicate) == (3, False)
            assert (again.seq, again.duplicate) == (3, True)
            assert await c.publish(fill(1)) == 6  # a new key each time by default
            assert await c.publish(fill(1)) == 9
            assert await c.publish(fill(2), idempotency_key=None) == 12

    asyncio.run(body())


def test_publish_moves_to_the_next_node_when_its_own_is_down(serve: ServeProcess) -> None:
    """Given several URLs, a publish whose ack was lost is sent again to the same node
    (which remembers its keys), and to the next one when that one is down."""
    proxy = AckCuttingProxy(serve.port, then_block=True)

    async def body() -> None:
        urls = [f"tcp://127.0.0.1:{proxy.port}", f"tcp://127.0.0.1:{serve.port}"]
        async with hang_guard(), Client(",".join(urls), retry_timeout=None) as c:
            assert c.url == urls[0]
            ack = await c.publish_ack(fill(0))
            assert ack.duplicate
            assert c.url == urls[1]

    try:
        asyncio.run(body())
        assert proxy.acks_cut == 1
    finally:
        proxy.close()
    assert server_state(serve.port)[0] == 3


def test_a_lost_ack_is_sent_again_to_the_same_node(serve: ServeProcess) -> None:
    with proxy_to(serve.port, AckCuttingProxy) as proxy:

        async def body() -> None:
            urls = [f"tcp://127.0.0.1:{proxy.port}", f"tcp://127.0.0.1:{serve.port}"]
            async with hang_guard(), Client(urls, retry_timeout=None) as c:
                assert (await c.publish_ack(fill(0))).duplicate
                assert c.url == urls[0]

        asyncio.run(body())
        assert proxy.acks_cut == 1


def test_a_server_that_stays_away_is_a_timeout(serve: ServeProcess) -> None:
    async def body(proxy: CuttingProxy) -> None:
        async with hang_guard(), Client(f"tcp://127.0.0.1:{proxy.port}", retry_timeout=0.5) as c:
            proxy.block()
            with pytest.raises(statecast.Timeout, match="publish it again with the same key"):
                await c.publish(fill(0), idempotency_key="fill-0")
            proxy.unblock()
            # Published again with the same key: applied once, whatever happened before.
            # (A generous timeout now: reconnecting may take a while on a loaded machine.)
            c.retry_timeout = TIMEOUT
            ack = await c.publish_ack(fill(0), idempotency_key="fill-0")
            assert ack.seq == 3

    with proxy_to(serve.port) as proxy:
        asyncio.run(body(proxy))
    assert server_state(serve.port)[0] == 3


def test_without_a_key_a_lost_ack_is_not_retried(serve: ServeProcess) -> None:
    async def body(port: int) -> None:
        async with hang_guard(), Client(f"tcp://127.0.0.1:{port}") as c:
            with pytest.raises(statecast.ConnectionClosed):
                await c.publish(fill(0), idempotency_key=None)
            assert c.reconnects == 0

    with proxy_to(serve.port, AckCuttingProxy) as proxy:
        asyncio.run(body(proxy.port))
    assert server_state(serve.port)[0] == 3  # applied once; the client cannot know


# -- errors that are not retried ----------------------------------------------------------


def test_conflict_and_bad_requests_are_not_retried(tmp_path: Path) -> None:
    srv = ServeProcess(tmp_path, "--port", str(free_port()), "--max-changes", "3")
    try:

        async def body() -> None:
            async with hang_guard(), Client(f"tcp://127.0.0.1:{srv.port}") as c:
                await c.publish(fill(0))
                stale = [Change("orders", "O-1", {"filled": 0}, if_seq=1)]
                with pytest.raises(statecast.Conflict) as info:
                    await c.publish(fill(1)[:2] + stale)
                assert (info.value.change, info.value.current_seq) == (2, 2)
                assert "changes[2]" in str(info.value)
                with pytest.raises(statecast.Conflict) as info:
                    await c.publish([Change("orders", "O-9", 1, if_seq=4)])
                assert info.value.current_seq == 0  # it does not exist
                with pytest.raises(statecast.TooLarge):
                    await c.publish(fill(1) + fill(2))
                with pytest.raises(statecast.BadRequest, match="if_seq"):
                    await c.publish([{"collection": "c", "key": "k", "value": 1, "if_seq": -1}])
                with pytest.raises(statecast.BadRequest, match="idempotency_key"):
                    await c.publish(fill(1), idempotency_key="k" * 257)
                assert c.reconnects == 0
                assert await c.ping() == 3  # nothing of those was applied
                # The record's seq, and the if_seq that holds.
                assert await c.publish([Change("orders", "O-1", {"filled": 0}, if_seq=2)]) == 4
                assert await c.publish([Change("orders", "O-2", 1, if_seq=0)]) == 5

        asyncio.run(body())
    finally:
        srv.stop(signal.SIGKILL)


def test_close_fails_a_publish_that_waits_to_be_sent_again(serve: ServeProcess) -> None:
    async def body(proxy: CuttingProxy) -> None:
        async with hang_guard():
            c = Client(f"tcp://127.0.0.1:{proxy.port}", retry_timeout=None)
            await c.connect()
            proxy.block()
            task = asyncio.ensure_future(c.publish(fill(0)))
            await until(lambda: bool(c._unacked))  # it waits for a reconnection
            await c.close()
            with pytest.raises(statecast.ConnectionClosed, match="closed"):
                await task

    with proxy_to(serve.port) as proxy:
        asyncio.run(body(proxy))


# -- the replica's seqs -------------------------------------------------------------------


@pytest.mark.parametrize("conflate", [None, 0.05])
def test_replica_seqs_follow_the_server(serve: ServeProcess, conflate: float | None) -> None:
    """After a snapshot, live changes, and a resume after a lost connection, the
    replica's seq of every record is the server's."""
    pub = LineClient(serve.port)
    rid = iter(range(1, 1_000_000))

    def publish(*changes: dict[str, Any]) -> int:
        ack = pub.request({"op": "publish", "id": next(rid), "changes": list(changes)})
        assert ack["type"] == "ack", ack
        return int(ack["seq"])

    def put(key: str, value: Any) -> dict[str, Any]:
        return {"collection": "orders", "key": key, "value": value}

    for i in range(20):
        publish(put(f"O-{i}", i), put(f"O-{i % 3}", -i))  # some records written often

    async def same_as_server(replica: Replica) -> None:
        seq, records = await asyncio.to_thread(server_state, serve.port)
        await until(lambda: replica.seq >= seq)
        assert replica.seq == seq
        held = {("orders", key): replica.get_with_seq("orders", key) for key in replica["orders"]}
        assert held == records
        for (coll, key), (_, rseq) in records.items():
            assert replica.seq_of(coll, key) == rseq

    async def body(proxy: CuttingProxy) -> None:
        async with (
            hang_guard(),
            Replica(
                f"tcp://127.0.0.1:{proxy.port}",
                min_backoff=0.02,
                max_backoff=0.2,
                conflate=conflate,
            ) as replica,
        ):
            await replica.wait_synced()
            await same_as_server(replica)  # the snapshot
            s = await asyncio.to_thread(publish, put("O-1", "a"), put("O-new", "b"))
            await asyncio.to_thread(publish, {"collection": "orders", "key": "O-2", "delete": True})
            await same_as_server(replica)  # live changes, a delete
            assert replica.seq_of("orders", "O-new") == s
            assert replica.seq_of("orders", "O-2") == 0
            assert replica.get_with_seq("orders", "O-2", "gone") == ("gone", 0)
            proxy.block()
            await until(lambda: replica.status != "live")
            for i in range(5):
                await asyncio.to_thread(publish, put(f"O-{i}", f"while away {i}"))
            proxy.unblock()
            await same_as_server(replica)  # resumed
            assert replica.full_syncs == 1
            assert replica.resumes >= 1

    try:
        with proxy_to(serve.port) as proxy:
            asyncio.run(body(proxy))
    finally:
        pub.close()


def test_read_modify_write_with_if_seq_from_the_replica(serve: ServeProcess) -> None:
    """Two writers increment one counter from their replicas with if_seq; a conflict
    re-reads and tries again. The final count equals the successful acks."""
    url = f"tcp://127.0.0.1:{serve.port}"
    rounds = 25

    async def writer(client: Client, replica: Replica) -> int:
        acked = 0
        while acked < rounds:
            value, seq = replica.get_with_seq("counters", "c", 0)
            try:
                ack = await client.publish_ack([Change("counters", "c", value + 1, if_seq=seq)])
            except statecast.Conflict as exc:
                current = exc.current_seq or 0
                # Until the replica has the newer write, then read again.
                await at_least(lambda: replica.seq_of("counters", "c"), current)
                continue
            acked += 1
            await at_least(lambda: replica.seq, ack.seq)  # read our own write
        return acked

    async def body() -> None:
        async with (
            hang_guard(),
            Client(url) as c1,
            Client(url) as c2,
            Replica(url) as r1,
            Replica(url) as r2,
        ):
            await r1.wait_synced()
            await r2.wait_synced()
            acked = await asyncio.gather(writer(c1, r1), writer(c2, r2))
            total = sum(acked)
            last = await c1.ping()
            await until(lambda: r1.seq >= last)
            assert r1.get("counters", "c") == total == 2 * rounds

    asyncio.run(body())


# -- against a scripted server: unavailable, bye --------------------------------------------


class ScriptedServer:
    """A fake statecast server on the test's loop: each connection gets a hello, then
    each publish the next answer of ``script`` (``"ack"``, ``"unavailable"``,
    ``"bye"``: a bye and the connection closed, ``"conflict"``). It records every
    publish request it reads."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.seq = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"tcp://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        hello = {"type": "hello", "server": "statecast", "version": "0", "protocol": 1}
        w.write(msgspec.json.encode({**hello, "epoch": "e", "seq": self.seq}) + b"\n")
        try:
            while line := await r.readline():
                if not line.strip():
                    continue
                req = msgspec.json.decode(line)
                self.requests.append(req)
                step = self.script.pop(0)
                rid = req["id"]
                if step == "ack":
                    self.seq += len(req["changes"])
                    answer: dict[str, Any] = {"type": "ack", "seq": self.seq, "id": rid}
                elif step == "bye":
                    w.write(b'{"type":"bye","reason":"shutdown"}\n')
                    break
                else:
                    answer = {"type": "error", "code": step, "message": step, "id": rid}
                w.write(msgspec.json.encode(answer) + b"\n")
        finally:
            w.close()


def test_unavailable_and_bye_are_retried_with_the_same_key() -> None:
    async def body() -> None:
        async with (
            hang_guard(),
            ScriptedServer(["unavailable", "bye", "unavailable", "ack", "conflict"]) as srv,
            Client(srv.url, retry_timeout=None) as c,
        ):
            ack = await c.publish_ack(fill(0), idempotency_key="fill-0")
            assert ack.seq == 3
            assert [req["idempotency_key"] for req in srv.requests] == ["fill-0"] * 4
            assert srv.connections == 2  # the bye: a reconnection
            assert c.reconnects == 1
            with pytest.raises(statecast.Conflict):
                await c.publish(fill(1))
            assert len(srv.requests) == 5  # a conflict is not sent again

    asyncio.run(body())
