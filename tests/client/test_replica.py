"""The client library against real servers: the replica stays exactly in sync through
server restarts, connection resets and slow-consumer cuts."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import statecast
from statecast import Change, Replica, Server
from statecast.core.frames import ChangeFrame
from tests.helpers import TIMEOUT, LineClient, ServeProcess, free_port
from tests.proxy import CuttingProxy


def fresh_state(port: int) -> tuple[int, dict[str, dict[str, Any]]]:
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    out: dict[str, dict[str, Any]] = {}
    for f in frames:
        if f["type"] == "record":
            out.setdefault(f["collection"], {})[f["key"]] = f["value"]
    return frames[-1]["seq"], out


class Publishing:
    """A thread that publishes until stopped, through its own reconnecting client."""

    def __init__(self, port: int, keys: int = 50) -> None:
        self.port = port
        self.keys = keys
        self.stop = threading.Event()
        self.acked = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = random.Random(1)
        i = 0
        while not self.stop.is_set():
            try:
                with statecast.BlockingClient(f"tcp://127.0.0.1:{self.port}", timeout=5) as c:
                    while not self.stop.is_set():
                        i += 1
                        k = rng.randrange(self.keys)
                        batch = [Change("c", f"k{k}", {"i": i}), Change("d", f"k{i % 7}", i)]
                        if i % 5 == 0:
                            batch.append(Change("c", f"k{(k + 1) % self.keys}", delete=True))
                        c.publish(batch)
                        self.acked += 1
                        time.sleep(0.001)
            except (statecast.StatecastError, OSError, TimeoutError):
                time.sleep(0.05)  # the server is down: try again

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT)


def run_replica(url: str, body: Any, **options: Any) -> Replica:
    """Run ``body(replica)`` (a coroutine function) with a replica started at ``url``."""

    async def main() -> Replica:
        replica = Replica(url, min_backoff=0.02, max_backoff=0.2, **options)
        async with replica:
            await body(replica)
        return replica

    return asyncio.run(main())


async def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT * 3
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def caught_up(replica: Replica, port: int) -> None:
    """Until the replica holds exactly what a fresh sync gives."""
    seq, data = await asyncio.to_thread(fresh_state, port)
    await until(lambda: replica.seq >= seq, f"the replica to reach seq {seq}")
    assert replica.seq == seq
    assert replica.snapshot() == data


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_replica_survives_server_kill_and_restart(tmp_path: Path, store: str) -> None:
    port = free_port()
    args = ("--port", str(port), "--store", store, "--heartbeat", "1")
    servers: list[ServeProcess] = [ServeProcess(tmp_path, *args)]
    pub = Publishing(port)
    applied: list[int] = []

    async def body(replica: Replica) -> None:
        await replica.wait_synced()
        await until(lambda: replica.seq > 50, "some changes")
        epoch = replica.epoch
        for _ in range(2):
            servers[-1].stop(signal.SIGKILL)
            servers.append(await asyncio.to_thread(ServeProcess, tmp_path, *args))
            await until(lambda: replica.status == "live" and pub.acked > 0, "the replica back live")
            await until(lambda: replica.seq > 0 and replica.reconnects > 0, "a reconnection")
        pub.finish()
        await caught_up(replica, port)
        if store == "memory":
            assert replica.epoch != epoch  # a new history: it had to resync
            assert replica.full_syncs == 3
        else:
            assert replica.epoch == epoch  # the same history: it resumed
            assert replica.full_syncs == 1
            assert replica.resumes >= 2  # once per restart at least (more if cut again)

    try:
        replica = run_replica(
            f"tcp://127.0.0.1:{port}", body, on_change=lambda c: applied.append(c.seq)
        )
    finally:
        pub.finish()
        for s in servers:
            if s.p.poll() is None:
                s.stop(signal.SIGKILL)
    # Within each history, no change was applied twice and none was skipped.
    assert replica.changes_applied == len(applied)
    runs = [applied[0:1]]
    for seq in applied[1:]:
        if seq == runs[-1][-1] + 1:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    assert len(runs) <= 3  # at most one break per restart (where a full sync came in)


def test_replica_through_connection_resets_resumes_without_resync() -> None:
    srv = Server(store="memory", http_port=None, port=0, heartbeat=0.5).start_in_thread()
    proxy = CuttingProxy(srv.port)
    pub = Publishing(srv.port)
    rng = random.Random(5)

    async def body(replica: Replica) -> None:
        await replica.wait_synced()
        for _ in range(8):
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            proxy.cut()
        await until(lambda: replica.resumes >= 4, "several resumes")
        pub.finish()
        await caught_up(replica, srv.port)

    try:
        replica = run_replica(f"tcp://127.0.0.1:{proxy.port}", body)
    finally:
        pub.finish()
        proxy.close()
        srv.stop_in_thread()
    assert replica.full_syncs == 1  # every reconnection resumed from the log
    assert replica.reconnects >= 4


def test_slow_replica_is_cut_off_and_recovers() -> None:
    srv = Server(
        store="memory", http_port=None, port=0, heartbeat=None, max_pending=64 * 1024
    ).start_in_thread()
    for i in range(200):
        srv.put("c", f"k{i}", {"pad": "x" * 500})

    slow = {"on": True}

    def crawl(change: ChangeFrame) -> None:
        if slow["on"]:
            time.sleep(0.002)  # a consumer that cannot keep up (blocks its own loop)

    async def body(replica: Replica) -> None:
        await replica.wait_synced()

        def flood() -> None:
            # Until the server cuts the replica off; kernel buffers take a few MB first.
            for i in range(20_000):
                srv.publish(
                    [
                        Change("c", f"k{(i * 10 + j) % 200}", {"pad": "y" * 500, "i": i})
                        for j in range(10)
                    ]
                )
                if srv.stats()["slow_consumer_disconnects"]:
                    return

        await asyncio.to_thread(flood)
        assert srv.stats()["slow_consumer_disconnects"] >= 1
        slow["on"] = False
        await caught_up(replica, srv.port)

    try:
        replica = run_replica(f"tcp://127.0.0.1:{srv.port}", body, on_change=crawl)
    finally:
        srv.stop_in_thread()
    assert replica.reconnects >= 1


def test_a_connection_that_goes_silent_is_dropped_and_resumed() -> None:
    """§4.3: the server's hello says it sends a heartbeat every 0.2 s to a quiet
    subscriber. When the connection goes silent with no reset (a partition: the proxy
    drops what the server sends and closes nothing), the replica takes it for dead
    after three periods and a second, and resumes on a new connection with what it
    missed. Before, it stayed "live" on the dead connection forever, its data stale."""
    srv = Server(store="memory", http_port=None, port=0, heartbeat=0.2).start_in_thread()
    proxy = CuttingProxy(srv.port)
    statuses: list[tuple[str, str]] = []

    async def body(replica: Replica) -> None:
        await replica.wait_synced()
        await until(lambda: replica.status == "live", "live")
        proxy.freeze()
        await asyncio.sleep(0.3)
        srv.put("c", "k1", "while silent")
        await until(lambda: replica.reconnects >= 1, "a reconnection")
        await until(lambda: replica.snapshot().get("c", {}).get("k1") == "while silent", "k1")

    try:
        srv.put("c", "k0", "before")
        replica = run_replica(
            f"tcp://127.0.0.1:{proxy.port}",
            body,
            on_status=lambda status, detail: statuses.append((status, detail)),
        )
    finally:
        proxy.close()
        srv.stop_in_thread()
    assert replica.full_syncs == 1
    assert replica.resumes == 1  # it missed nothing: the log had it
    assert replica.snapshot() == {"c": {"k0": "before", "k1": "while silent"}}
    (detail,) = [d for s, d in statuses if s == "reconnecting"]
    assert "for 1.6 s (no change, no heartbeat): taking the connection for dead" in detail


def test_a_quiet_connection_with_heartbeats_is_not_dropped() -> None:
    """Nothing published for 2 s, heartbeats every 0.2 s: the replica stays on its
    connection. With silence_timeout=None it never checks."""
    srv = Server(store="memory", http_port=None, port=0, heartbeat=0.2).start_in_thread()

    async def body(replica: Replica) -> None:
        await replica.wait_synced()
        await asyncio.sleep(2.0)

    try:
        replica = run_replica(f"tcp://127.0.0.1:{srv.port}", body)
        unchecked = run_replica(f"tcp://127.0.0.1:{srv.port}", body, silence_timeout=None)
    finally:
        srv.stop_in_thread()
    assert replica.reconnects == 0
    assert unchecked.reconnects == 0
    with pytest.raises(ValueError, match="silence_timeout must be > 0"):
        Replica("tcp://127.0.0.1:8989", silence_timeout=0)
