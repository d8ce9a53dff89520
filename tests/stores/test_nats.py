"""The NATS JetStream store (docs/cluster.md): nodes sharing one stream of a real
``nats-server``, embedded (``Server``) or as ``statecast serve`` processes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.api
import pytest

import statecast
import statecast.loops
import statecast.stores.nats
from statecast import Change, Server
from statecast.core.engine import Duplicate
from statecast.errors import Conflict
from statecast.stores.nats import NatsStore
from tests.helpers import TIMEOUT, LineClient, ServeProcess, free_port, wait_for
from tests.stores.natsserver import BlockingProxy, NatsCluster, NatsServer

Key = tuple[str, str]
State = dict[Key, tuple[int, Any]]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats")
    try:
        yield srv
    finally:
        srv.close()


def start_node(url: str, **settings: Any) -> Server:
    settings.setdefault("retain", 100_000)
    return Server(
        store=url, port=0, http_port=None, heartbeat=None, shutdown_grace=1.0, **settings
    ).start_in_thread(timeout=TIMEOUT * 3)


class Nodes:
    """Embedded nodes, stopped at the end of the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.servers: list[Server] = []

    def start(self, url: str | None = None, **settings: Any) -> Server:
        srv = start_node(url or self.url, **settings)
        self.servers.append(srv)
        return srv

    def stop(self, srv: Server) -> None:
        srv.stop_in_thread(timeout=TIMEOUT * 3)
        self.servers.remove(srv)

    def close(self) -> None:
        for srv in self.servers:
            srv.stop_in_thread(timeout=TIMEOUT * 3)
        self.servers = []


@pytest.fixture
def nodes(nats_server: NatsServer) -> Iterator[Nodes]:
    n = Nodes(nats_server.url)
    try:
        yield n
    finally:
        n.close()


def store_of(srv: Server) -> NatsStore:
    store = srv.engine.store
    assert isinstance(store, NatsStore)
    return store


def sync_state(port: int) -> tuple[int, str, State]:
    """A full snapshot over TCP: its seq, the epoch, and the records."""
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    begin = frames[0]
    assert begin["type"] == "snapshot_begin", begin
    state: State = {}
    for f in frames[1:-1]:
        assert f["type"] == "record", f
        state[(f["collection"], f["key"])] = (f["seq"], f["value"])
    return begin["seq"], begin["epoch"], state


def changes_after(
    port: int, after: int, until: int, epoch: str | None = None
) -> list[dict[str, Any]]:
    """Every change with after < seq <= until, by ``subscribe from``."""
    with LineClient(port) as c:
        req: dict[str, Any] = {"op": "subscribe", "from": after}
        if epoch is not None:
            req["epoch"] = epoch
        answer = c.request(req)
        assert answer["type"] == "subscribed", answer
        out: list[dict[str, Any]] = []
        seq = after
        while seq < until:
            f = c.read()
            if f["type"] != "change":
                continue
            assert f["seq"] == seq + 1, (f, seq)
            seq = f["seq"]
            out.append(f)
        return out


def model_of(changes: list[dict[str, Any]]) -> State:
    state: State = {}
    for f in changes:
        key = (f["collection"], f["key"])
        if f.get("deleted"):
            state.pop(key, None)
        else:
            state[key] = (f["seq"], f["value"])
    return state


def wait_seq(servers: list[Server], seq: int, timeout: float = TIMEOUT) -> None:
    wait_for(lambda: all(s.seq >= seq for s in servers), f"every node at seq {seq}", timeout)


def run_threads(*targets: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 6)
    if errors:
        raise errors[0]


# -- convergence ---------------------------------------------------------------------------
def test_two_nodes_converge(nodes: Nodes) -> None:
    a = nodes.start()
    b = nodes.start()
    assert a.epoch == b.epoch
    assert store_of(a).ready
    acks: dict[int, list[Change]] = {}

    def publisher(srv: Server, name: str) -> Callable[[], None]:
        def run() -> None:
            for i in range(200):
                batch = [
                    Change("orders", f"{name}-{i % 20}", {"n": i, "by": name}),
                    Change("positions", name, {"i": i}),
                ]
                acks[srv.publish(batch)] = batch

        return run

    run_threads(publisher(a, "a"), publisher(b, "b"))
    assert len(acks) == 400
    last = max(acks)
    assert last == 800
    # Every batch got consecutive seqs, ending at its ack; no two overlap.
    seqs = sorted(s - i for s, batch in acks.items() for i in range(len(batch)))
    assert seqs == list(range(1, 801))
    wait_seq([a, b], last)
    sa, ea, state_a = sync_state(a.port)
    sb, eb, state_b = sync_state(b.port)
    assert (sa, ea) == (sb, eb) == (last, a.epoch)
    assert state_a == state_b
    # The log says the same on both nodes, and it is what the acks said.
    log_a = changes_after(a.port, 0, last)
    assert log_a == changes_after(b.port, 0, last)
    for seq, batch in acks.items():
        for i, change in enumerate(reversed(batch)):
            frame = log_a[seq - 1 - i]
            assert (frame["collection"], frame["key"]) == (change.collection, change.key)
            assert frame["value"] == change.value
    assert model_of(log_a) == state_a


def test_three_nodes_with_replicas(nodes: Nodes) -> None:
    servers = [nodes.start() for _ in range(3)]
    assert len({s.epoch for s in servers}) == 1
    lt = statecast.loops.LoopThread("replicas", "asyncio")
    replicas = [statecast.Replica(f"tcp://127.0.0.1:{s.port}") for s in servers]
    try:
        for r in replicas:
            lt.run(r.start(), TIMEOUT)
        for r in replicas:
            lt.run(asyncio.wait_for(r.wait_synced(), TIMEOUT), TIMEOUT * 2)
        acks: dict[int, list[Change]] = {}

        def publisher(srv: Server, name: str) -> Callable[[], None]:
            def run() -> None:
                for i in range(150):
                    batch = [Change("orders", f"O-{(i * 7) % 31}", {"by": name, "i": i})]
                    if i % 5 == 0:
                        batch.append(Change("orders", f"O-{(i * 3) % 31}", delete=True))
                    batch.append(Change("positions", name, {"i": i}))
                    acks[srv.publish(batch)] = batch

            return run

        run_threads(*(publisher(s, f"n{k}") for k, s in enumerate(servers)))
        last = max(acks)
        assert sum(len(b) for b in acks.values()) == last
        wait_seq(servers, last)
        wait_for(lambda: all(r.seq == last for r in replicas), "every replica at the last seq")
        seq, epoch, state = sync_state(servers[0].port)
        assert seq == last
        for s in servers[1:]:
            assert sync_state(s.port) == (seq, epoch, state)
        expected: dict[str, dict[str, Any]] = {}
        for (collection, key), (_, value) in state.items():
            expected.setdefault(collection, {})[key] = value
        for r in replicas:
            assert r.epoch == epoch
            assert r.snapshot() == expected
            assert r.full_syncs == 1
    finally:
        for r in replicas:
            lt.run(r.stop(), TIMEOUT)
        lt.close()


def test_publish_race_on_one_key(nodes: Nodes) -> None:
    """Two nodes write the same key at once: one total order, the same on both."""
    a = nodes.start()
    b = nodes.start()
    acks: dict[int, Any] = {}

    def writer(srv: Server, name: str) -> Callable[[], None]:
        def run() -> None:
            for i in range(150):
                value = {"by": name, "i": i}
                acks[srv.publish([Change("k", "same", value)])] = value

        return run

    run_threads(writer(a, "a"), writer(a, "a2"), writer(b, "b"), writer(b, "b2"))
    last = max(acks)
    assert sorted(acks) == list(range(1, 601))
    wait_seq([a, b], last)
    for srv in (a, b):
        seq, _, state = sync_state(srv.port)
        assert seq == last
        assert state == {("k", "same"): (last, acks[last])}
        log = changes_after(srv.port, 0, last)
        assert [f["value"] for f in log] == [acks[s] for s in range(1, last + 1)]


def test_idempotency_keys_hold_across_nodes(nodes: Nodes) -> None:
    """§3.3.1: a batch retried on another node under its key is not applied again,
    however soon: the nodes decide keys when a message is sent after the last one."""
    a = nodes.start()
    b = nodes.start()
    seqs = []
    for i in range(40):
        fill = [Change("executions", f"E-{i}", {"qty": i}), Change("positions", "P", {"n": i})]
        first = a.publish(fill, idempotency_key=f"fill-{i}")
        again = b.publish(fill, idempotency_key=f"fill-{i}")  # at once, on the other node
        assert again == first
        assert isinstance(again, Duplicate)
        assert not isinstance(first, Duplicate)
        seqs.append(first)
    assert seqs == list(range(2, 81, 2))  # every batch once
    wait_seq([a, b], 80)
    # Known to a node started later too (it reads the keys with the log).
    c = nodes.start()
    wait_seq([c], 80)
    assert c.publish([Change("positions", "P", {"n": 0})], idempotency_key="fill-0") == 2
    assert all(s.seq == 80 for s in (a, b, c))


def test_racing_if_seq_increments_across_nodes_lose_nothing(nodes: Nodes) -> None:
    """§3.3.2: read-modify-write on one record from two nodes: every acknowledged
    increment is in the final value, and every refused one was a conflict."""
    a = nodes.start()
    b = nodes.start()
    a.publish([Change("counters", "n", 0)])
    wait_seq([a, b], 1)
    acked = {"a": 0, "b": 0}
    refused: list[tuple[int, int | None]] = []  # (the seq read, the current seq said)

    def writer(srv: Server, name: str) -> Callable[[], None]:
        def run() -> None:
            while acked[name] < 40:
                _, _, state = sync_state(srv.port)
                rec_seq, value = state[("counters", "n")]
                try:
                    srv.publish([Change("counters", "n", value + 1, if_seq=rec_seq)])
                except Conflict as exc:
                    refused.append((rec_seq, exc.current_seq))
                else:
                    acked[name] += 1

        return run

    run_threads(writer(a, "a"), writer(b, "b"))
    assert all(now is not None and now > read for read, now in refused)
    wait_seq([a, b], 81)
    for srv in (a, b):
        seq, _, state = sync_state(srv.port)
        assert state[("counters", "n")] == (81, 80)  # 80 increments, one seq each
        assert seq == 81


def test_a_slow_node_catches_up(nodes: Nodes) -> None:
    a = nodes.start()
    b = nodes.start()
    loop = b._loop
    assert loop is not None
    blocked = threading.Event()

    def block() -> None:
        blocked.set()
        time.sleep(2.0)  # the whole node stalls: no reads, no writes, no heartbeats

    loop.call_soon_threadsafe(block)
    assert blocked.wait(TIMEOUT)
    last = 0
    for i in range(100):
        last = a.publish([Change("orders", f"O-{i % 10}", {"i": i})])
    # b's own publish waits until it has read everything a wrote: it comes after.
    seq = b.publish([Change("orders", "from-b", True)])
    assert seq == last + 1
    wait_seq([a], seq)
    assert sync_state(a.port) == sync_state(b.port)
    assert store_of(b).ready
    assert store_of(b)._broken is None


# -- faults ----------------------------------------------------------------------------------
def jetstream(url: str, fn: Callable[[Any], Any]) -> Any:
    """Run ``await fn(js)`` with a JetStream context of its own (the operator's tools)."""

    async def main() -> Any:
        nc = await nats.connect(url.split(","))
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def test_a_node_without_nats_refuses_publishes_serves_reads_and_catches_up(
    nats_server: NatsServer, nodes: Nodes
) -> None:
    proxy = BlockingProxy(nats_server.port)
    try:
        a = nodes.start(proxy.url)
        b = nodes.start()
        first = a.publish([Change("orders", "O-1", {"qty": 1})])
        wait_seq([b], first)
        with LineClient(a.port) as sub:
            assert sub.request({"op": "subscribe"})["type"] == "subscribed"
            proxy.block()
            wait_for(lambda: not store_of(a).ready, "node a to notice it lost NATS")
            with pytest.raises(statecast.Unavailable, match="lost its connection to NATS"):
                a.publish([Change("orders", "O-2", {"qty": 2})])
            # Reads go on: a full sync, from what it has.
            assert sync_state(a.port)[0] == first
            last = first
            for i in range(50):
                last = b.publish([Change("orders", f"B-{i % 7}", {"i": i}), Change("n", "b", i)])
            proxy.unblock()
            wait_for(lambda: store_of(a).ready, "node a to catch up", TIMEOUT * 2)
            wait_seq([a], last)
            # Its subscriber missed nothing.
            seq = first
            while seq < last:
                f = sub.read()
                assert f["type"] == "change"
                assert f["seq"] == seq + 1
                seq = f["seq"]
        assert sync_state(a.port) == sync_state(b.port)
        seq = a.publish([Change("orders", "O-2", {"qty": 2})])
        assert seq == last + 1
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_deleted_stream_fails_publishes_and_a_recreated_one_is_a_new_epoch(
    nats_server: NatsServer, nodes: Nodes
) -> None:
    a = nodes.start()
    old_epoch = a.epoch
    seq = a.publish([Change("orders", "O-1", {"qty": 1})])
    b = nodes.start()
    wait_seq([b], seq)
    jetstream(nats_server.url, lambda js: js.delete_stream("statecast"))
    with pytest.raises(statecast.Unavailable, match="does not exist"):
        a.publish([Change("orders", "O-2", {"qty": 2})])
    wait_for(lambda: not store_of(b).ready, "node b to notice the stream is gone")
    assert sync_state(b.port)[0] == seq  # reads go on
    # A node started now creates a new stream: a new history, with a new epoch.
    nodes.stop(a)
    c = nodes.start()
    assert c.epoch != old_epoch
    assert c.seq == 0
    with LineClient(c.port) as client:
        answer = client.request({"op": "subscribe", "from": seq, "epoch": old_epoch})
        assert answer["type"] == "error"
        assert answer["code"] == "resync_required"
    # The node still running on the old history says so, and refuses publishes.
    wait_for(lambda: store_of(b)._broken is not None, "node b to notice the new stream")
    with pytest.raises(statecast.Unavailable, match="deleted and created again"):
        b.publish([Change("orders", "O-3", {"qty": 3})])
    assert not store_of(b).ready
    assert c.publish([Change("orders", "O-1", {"qty": 4})]) == 1


def test_a_full_stream_refuses_publishes_until_it_has_room(
    nats_server: NatsServer, nodes: Nodes
) -> None:
    config = nats.js.api.StreamConfig(
        name="statecast",
        subjects=["statecast.log"],
        max_msgs=5,
        discard=nats.js.api.DiscardPolicy.NEW,
    )
    jetstream(nats_server.url, lambda js: js.add_stream(config))
    a = nodes.start()
    seqs = [a.publish([Change("orders", f"O-{i}", {"i": i})]) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    with pytest.raises(statecast.Unavailable, match="maximum messages exceeded"):
        a.publish([Change("orders", "O-6", {"i": 6})])
    assert sync_state(a.port)[0] == 5
    config.max_msgs = 100
    jetstream(nats_server.url, lambda js: js.update_stream(config))
    assert a.publish([Change("orders", "O-6", {"i": 6})]) == 6


def test_a_stream_that_drops_messages_is_refused(nats_server: NatsServer) -> None:
    config = nats.js.api.StreamConfig(name="statecast", subjects=["statecast.log"], max_age=60.0)
    jetstream(nats_server.url, lambda js: js.add_stream(config))
    with pytest.raises(statecast.StoreError, match="max_age"):
        start_node(nats_server.url)


def test_an_unreachable_nats_server_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(statecast.StoreError, match="cannot reach a NATS server"):
        start_node(f"nats://127.0.0.1:{port}")


def test_a_batch_larger_than_a_nats_message_is_refused(nodes: Nodes) -> None:
    a = nodes.start()
    big = "x" * 700_000
    with pytest.raises(statecast.BadRequest, match="max_payload"):
        a.publish([Change("big", "1", big), Change("big", "2", big)])
    assert a.publish([Change("big", "1", big)]) == 1


# -- checkpoints and trimming ----------------------------------------------------------------
@pytest.fixture
def small_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints every retain // 2 changes, however small."""
    monkeypatch.setattr(statecast.stores.nats, "MIN_CHECKPOINT_INTERVAL", 1)


def log_bounds(url: str) -> tuple[int, int]:
    """The stream seqs of the first and the last message of the log subject."""

    async def bounds(js: Any) -> tuple[int, int]:
        first = await js.get_msg("statecast", seq=1, next=True, subject="statecast.log")
        last = await js.get_last_msg("statecast", "statecast.log")
        return int(first.seq), int(last.seq)

    result: tuple[int, int] = jetstream(url, bounds)
    return result


@pytest.mark.usefixtures("small_checkpoints")
def test_a_late_node_loads_a_checkpoint_and_the_tail(nodes: Nodes) -> None:
    retain = 100
    a = nodes.start(retain=retain)
    assert store_of(a).checkpoint_interval == 50
    last = 0
    for i in range(300):
        batch = [Change("orders", f"O-{(i * 13) % 97}", {"i": i})]
        if i % 3 == 0:
            batch.append(Change("orders", f"O-{(i * 7) % 97}", delete=True))
        batch.append(Change("fills", f"F-{i}", {"i": i}))
        last = a.publish(batch)
    wait_for(lambda: store_of(a).trims >= 1, "a checkpoint and a trim")
    first_log, _ = log_bounds(nodes.url)
    assert first_log > 1  # the log was trimmed
    b = nodes.start(retain=retain)
    store = store_of(b)
    assert store.loaded_checkpoint is not None
    assert store.loaded_checkpoint.seq <= last - retain  # old enough to serve resumes
    assert store.replayed == last - store.loaded_checkpoint.seq
    assert b.seq == last
    assert b.epoch == a.epoch
    assert sync_state(b.port) == sync_state(a.port)
    # b serves resumes from `retain` changes back, like a.
    assert changes_after(b.port, last - retain, last) == changes_after(a.port, last - retain, last)
    with LineClient(b.port) as c:
        assert c.request({"op": "subscribe", "from": 0})["code"] == "resync_required"
    # ...and keeps following.
    seq = b.publish([Change("orders", "late", True)])
    wait_seq([a], seq)
    assert sync_state(b.port) == sync_state(a.port)


@pytest.mark.usefixtures("small_checkpoints")
def test_the_log_stays_bounded(nodes: Nodes) -> None:
    retain = 200
    a = nodes.start(retain=retain)
    b = nodes.start(retain=retain)
    for i in range(200):
        a.publish([Change("orders", f"O-{i % 50}", {"i": i}) for _ in range(5)])
        b.publish([Change("orders", f"O-{i % 50}", {"b": i}) for _ in range(5)])
    last = max(a.seq, b.seq)
    wait_seq([a, b], last)
    wait_for(
        lambda: (
            store_of(a).trims + store_of(b).trims >= 5
            and not any(
                t is not None and not t.done()
                for t in (store_of(a)._checkpoint_task, store_of(b)._checkpoint_task)
            )
        ),
        "checkpoints and trims",
    )

    async def info(js: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        for stream in ("statecast", "statecast_ckpt"):
            si = await js.stream_info(stream, subjects_filter=">")
            out.update(si.state.subjects or {})
        return out

    subjects = jetstream(nodes.url, info)
    # The log holds about retain + interval changes (5 and 5 per message here)...
    assert subjects["statecast.log"] * 5 <= retain + 2 * 100 + 10
    # ...and a few checkpoints (the kept one and newer ones), no stray chunks.
    assert subjects["statecast.ckpt"] <= 4
    chunks = {s: n for s, n in subjects.items() if s.startswith("statecast.ckpt.")}
    assert len(chunks) <= subjects["statecast.ckpt"]
    c = nodes.start(retain=retain)
    assert sync_state(c.port) == sync_state(a.port)


# -- crashes under load ----------------------------------------------------------------------
class Load:
    """Publisher threads on several nodes, batches of 3 changes with unique keys, until
    stopped; which batches were acked (and at which seq) and which failed."""

    def __init__(self, targets: list[Callable[[], Server]], per_node: int = 2) -> None:
        self.acked: dict[str, int] = {}
        self.failed: set[str] = set()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(target, f"t{i}-{k}"), daemon=True)
            for i, target in enumerate(targets)
            for k in range(per_node)
        ]
        for t in self.threads:
            t.start()

    def _run(self, target: Callable[[], Server], name: str) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            bid = f"{name}-{n}"
            batch = [Change("b", f"{bid}-{j}", {"batch": bid, "j": j}) for j in range(3)]
            try:
                self.acked[bid] = target().publish(batch, timeout=TIMEOUT * 3)
            except (statecast.Unavailable, statecast.ShuttingDown, statecast.ServerStateError):
                self.failed.add(bid)
                time.sleep(0.01)
            except BaseException as exc:
                self.errors.append(exc)
                return

    def wait_acked(self, more: int) -> None:
        target = len(self.acked) + more
        wait_for(
            lambda: len(self.acked) >= target or bool(self.errors), f"{more} more acks", TIMEOUT * 3
        )
        assert not self.errors, self.errors

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(TIMEOUT * 3)
        assert not self.errors, self.errors


def check_batches(log: list[dict[str, Any]], load: Load) -> None:
    """Every acked batch is in the log exactly once, whole, ending at its ack; a batch
    that failed is there whole or not at all."""
    where: dict[str, list[tuple[int, int]]] = {}
    for f in log:
        if f["collection"] == "b":
            where.setdefault(f["value"]["batch"], []).append((f["seq"], f["value"]["j"]))
    for bid, places in where.items():
        first = places[0][0]
        assert places == [(first, 0), (first + 1, 1), (first + 2, 2)], (bid, places)
        if bid in load.acked:
            assert load.acked[bid] == first + 2, (bid, places)
        else:
            assert bid in load.failed, bid
    missing = [bid for bid in load.acked if bid not in where]
    assert not missing, f"acked but lost: {missing[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_nats_server_restarted_under_load(nats_server: NatsServer, nodes: Nodes, how: str) -> None:
    a = nodes.start()
    b = nodes.start()
    load = Load([lambda: a, lambda: b])
    try:
        load.wait_acked(200)
        nats_server.kill() if how == "kill" else nats_server.stop()
        time.sleep(0.5)
        nats_server.start()
        wait_for(lambda: store_of(a).ready and store_of(b).ready, "both nodes back", TIMEOUT * 3)
        load.wait_acked(200)
    finally:
        load.finish()
    assert load.failed  # the outage was felt...
    last = max(a.publish([Change("end", "a", 1)]), b.publish([Change("end", "b", 1)]))
    wait_seq([a, b], last)
    log = changes_after(a.port, 0, last)
    assert changes_after(b.port, 0, last) == log
    check_batches(log, load)
    assert sync_state(a.port) == sync_state(b.port)


class TcpPublisher:
    """Publishes batches over TCP from a thread until stopped or the server is gone."""

    def __init__(self, port: int, name: str) -> None:
        self.port = port
        self.name = name
        self.acked = 0
        self.gone = False
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with LineClient(self.port) as c:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    changes = [
                        {"collection": "orders", "key": f"{self.name}-{i % 50}", "value": i},
                        {"collection": "fills", "key": f"{self.name}-{i}", "value": i},
                    ]
                    answer = c.request({"op": "publish", "changes": changes})
                    assert answer["type"] == "ack", answer
                    self.acked += 1
        except (EOFError, ConnectionError):
            self.gone = True
        except BaseException as exc:
            self.errors.append(exc)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT * 3)
        assert not self.errors, self.errors


def read_changes(sub: LineClient, seen: int, until: int | None = None) -> int:
    """Read changes, each the next seq, up to ``until`` or the end of the connection;
    the last seq read."""
    with contextlib.suppress(EOFError, ConnectionError):
        while until is None or seen < until:
            f = sub.read()
            if f["type"] == "change":
                assert f["seq"] == seen + 1
                seen = f["seq"]
    return seen


@pytest.mark.slow
def test_clients_of_a_killed_node_resume_on_another(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    a = ServeProcess(tmp_path, "--store", nats_server.url, "--log-level", "info")
    b = ServeProcess(tmp_path, "--store", nats_server.url, "--log-level", "info")
    lt = statecast.loops.LoopThread("replica", "asyncio")
    # The replica knows both nodes: it moves to the next when it loses one.
    replica = statecast.Replica(
        [f"tcp://127.0.0.1:{a.port}", f"tcp://127.0.0.1:{b.port}"],
        min_backoff=0.05,
        max_backoff=0.2,
    )
    pubs: list[TcpPublisher] = []
    try:
        lt.run(replica.start(), TIMEOUT)
        lt.run(asyncio.wait_for(replica.wait_synced(), TIMEOUT), TIMEOUT * 2)
        with LineClient(a.port) as sub:
            epoch = sub.hello["epoch"]
            start = sub.request({"op": "subscribe"})["seq"]
            pubs = [TcpPublisher(a.port, "a"), TcpPublisher(b.port, "b")]
            wait_for(lambda: all(p.acked >= 100 for p in pubs), "publishes on both nodes")
            a.stop(signal.SIGKILL)
            seen = read_changes(sub, start)
        assert pubs[0].gone
        wait_for(lambda: pubs[1].acked >= 200, "more publishes on b")
        pubs[1].finish()
        with LineClient(b.port) as probe:
            last = probe.hello["seq"]
        # The subscriber of a resumes on b where it was, without a full sync.
        with LineClient(b.port) as sub:
            assert sub.hello["epoch"] == epoch
            answer = sub.request({"op": "subscribe", "from": seen, "epoch": epoch})
            assert answer["type"] == "subscribed", answer
            assert read_changes(sub, seen, last) == last
        # So does the replica.
        wait_for(lambda: replica.seq == last, "the replica to resume on b", TIMEOUT * 2)
        assert replica.full_syncs == 1
        assert replica.resumes >= 1
        _, _, state = sync_state(b.port)
        expected: dict[str, dict[str, Any]] = {}
        for (collection, key), (_, value) in state.items():
            expected.setdefault(collection, {})[key] = value
        assert replica.snapshot() == expected
    finally:
        for p in pubs:
            p.stop.set()
        lt.run(replica.stop(), TIMEOUT)
        lt.close()
        a.stop(signal.SIGKILL)
        code, out = b.stop()
        assert code == 0, out


# -- a model -------------------------------------------------------------------------------------
def expand(batches: dict[int, list[Change]]) -> dict[int, tuple[str, str, Any, bool]]:
    """Acked batches -> the change at every seq."""
    out: dict[int, tuple[str, str, Any, bool]] = {}
    for last, batch in batches.items():
        for i, c in enumerate(batch):
            out[last - len(batch) + 1 + i] = (c.collection, c.key, c.value, c.delete)
    return out


def frame_of(change: dict[str, Any]) -> tuple[str, str, Any, bool]:
    return (change["collection"], change["key"], change.get("value"), bool(change.get("deleted")))


@pytest.mark.slow
@pytest.mark.usefixtures("small_checkpoints")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_publishes_and_restarts_match_a_model(nodes: Nodes, seed: int) -> None:
    rng = random.Random(seed)
    retain = 60
    live = [nodes.start(retain=retain) for _ in range(3)]
    batches: dict[int, list[Change]] = {}
    loaded_checkpoints = 0

    def random_batch(tag: str) -> list[Change]:
        out = []
        for j in range(rng.randint(1, 4)):
            key = f"k{rng.randrange(25)}"
            if rng.random() < 0.3:
                out.append(Change("c", key, delete=True))
            else:
                out.append(Change(rng.choice(["c", "d"]), key, {"tag": tag, "j": j}))
        return out

    def check() -> None:
        last = max(batches)
        changes = expand(batches)
        assert sorted(changes) == list(range(1, last + 1))  # no gap, no overlap
        model: State = {}
        for seq in range(1, last + 1):
            collection, key, value, deleted = changes[seq]
            if deleted:
                model.pop((collection, key), None)
            else:
                model[(collection, key)] = (seq, value)
        wait_seq(live, last)
        epochs = {s.epoch for s in live}
        assert len(epochs) == 1
        for srv in live:
            assert sync_state(srv.port) == (last, srv.epoch, model)
            after = max(0, last - retain)
            got = changes_after(srv.port, after, last)
            assert [frame_of(f) for f in got] == [changes[s] for s in range(after + 1, last + 1)]

    for step in range(240):
        r = rng.random()
        if r < 0.05:
            k = rng.randrange(len(live))
            nodes.stop(live[k])
            live[k] = nodes.start(retain=retain)
            loaded_checkpoints += store_of(live[k]).loaded_checkpoint is not None
        elif r < 0.15:
            batches_of = [[random_batch(f"{step}-{n}-{i}") for i in range(5)] for n in range(3)]

            def burst(srv: Server, mine: list[list[Change]]) -> Callable[[], None]:
                def run() -> None:
                    for batch in mine:
                        batches[srv.publish(batch)] = batch

                return run

            run_threads(*(burst(s, b) for s, b in zip(live, batches_of, strict=True)))
        else:
            batch = random_batch(str(step))
            batches[rng.choice(live).publish(batch)] = batch
        if step % 60 == 59:
            check()
    check()
    assert loaded_checkpoints >= 1  # restarts went through a checkpoint


@pytest.mark.slow
def test_three_servers_lose_the_stream_leader_under_load(tmp_path: Path) -> None:
    """An R3 stream on a cluster of three nats-servers; each node talks to its own
    server first. The server leading the stream is killed, then comes back."""
    cluster = NatsCluster(tmp_path / "cluster")
    nodes = Nodes(cluster.url)
    try:
        urls = [s.url for s in cluster.servers]
        servers = [nodes.start(",".join(urls[k:] + urls[:k])) for k in range(3)]
        assert len({s.epoch for s in servers}) == 1

        async def stream(js: Any) -> Any:
            return await js.stream_info("statecast")

        info = jetstream(cluster.url, stream)
        assert info.config.num_replicas == 3
        load = Load([lambda s=s: s for s in servers], per_node=1)  # type: ignore[misc]
        try:
            load.wait_acked(200)
            leader = cluster.by_name(info.cluster.leader)
            leader.kill()
            load.wait_acked(200)  # the other two go on
            leader.start()
            load.wait_acked(100)
        finally:
            load.finish()
        wait_for(lambda: all(store_of(s).ready for s in servers), "every node ready", TIMEOUT * 3)
        last = max(s.publish([Change("end", str(k), 1)]) for k, s in enumerate(servers))
        wait_seq(servers, last, TIMEOUT * 3)
        log = changes_after(servers[0].port, 0, last)
        for s in servers[1:]:
            assert changes_after(s.port, 0, last) == log
        check_batches(log, load)
    finally:
        nodes.close()
        cluster.close()


def test_a_password_in_the_store_url_is_never_shown(tmp_path: Path) -> None:
    """Found by an adversarial run: ``--store nats://user:pw@host`` showed the password
    in the log ("cannot reach a NATS server at ..."), stats and /metrics' store text."""
    config = statecast.Config(store="nats://alice:s3cret@127.0.0.1:1,nats://127.0.0.1:2")
    store = NatsStore(config)
    assert "s3cret" not in store.description
    assert "alice:***@127.0.0.1:1" in store.description
    assert "s3cret" not in store.shown
    assert store.servers[0] == "nats://alice:s3cret@127.0.0.1:1"  # still used to connect
