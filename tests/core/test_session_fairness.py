"""§7 fairness and backpressure in the session, deterministic (no sockets, no time):
requests are handled in bounded slices, and publishes waiting for their ack are
bounded per connection and in all."""

from __future__ import annotations

from collections.abc import Sequence

from statecast.core.engine import Engine
from statecast.core.protocol import Conditions, PreparedChange
from statecast.core.session import SLICE_BYTES, SLICE_LINES, InflightBudget, Limits
from statecast.core.store import Committed, KeyStamp
from statecast.stores.memory import MemoryStore
from tests.peer import Peer, by_type, new_engine

PUBLISH = b'{"op":"publish","changes":[{"collection":"c","key":"k","value":1}]}\n'


def test_a_flood_of_requests_is_handled_one_slice_per_call() -> None:
    peer = Peer(new_engine())
    peer.frames()
    peer.send(b'{"op":"ping"}\n' * 10_000)
    assert len(peer.frames()) == SLICE_LINES
    assert peer.session.backlog  # the transport stops reading and comes back later
    calls = 0
    while peer.session.backlog:
        peer.session.resume()
        peer.collect()
        calls += 1
    assert len(peer.frames()) == 10_000 - SLICE_LINES
    assert calls == -(-(10_000 - SLICE_LINES) // SLICE_LINES)


def test_a_slice_is_bounded_by_bytes_too() -> None:
    peer = Peer(new_engine(), max_line=1 << 20)
    peer.frames()
    line = b'{"op":"ping","id":"' + b"x" * 100_000 + b'"}\n'
    peer.send(line * 10)
    handled = len(peer.frames())
    assert handled == -(-SLICE_BYTES // len(line))
    assert peer.session.backlog


class HeldStore(MemoryStore):
    """A memory store whose commits wait until the test releases them, like a durable
    store's writer that has not committed yet."""

    def __init__(self) -> None:
        super().__init__(1000)
        self.held: list[tuple[Sequence[PreparedChange], Committed]] = []

    commits_at_once = False
    decides_at_commit = False

    def submit(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        key: KeyStamp | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self.held.append((batch, done))

    def release(self, n: int | None = None) -> None:
        take = self.held if n is None else self.held[:n]
        self.held = self.held[len(take) :]
        for batch, done in take:
            super().submit(batch, done)


def held_peer(
    store: HeldStore, budget: InflightBudget | None = None, limit: int = 4
) -> tuple[Peer, list[int]]:
    wakes: list[int] = []
    peer: Peer | None = None

    def wakeup() -> None:
        wakes.append(1)
        assert peer is not None
        peer.collect()

    peer = Peer(
        Engine(store),
        limits=Limits(max_inflight=limit),
        inflight=budget,
        wakeup=wakeup,
    )
    peer.frames()
    return peer, wakes


def test_publishes_in_flight_are_bounded_per_connection() -> None:
    store = HeldStore()
    peer, wakes = held_peer(store)
    peer.send(PUBLISH * 20)
    assert len(store.held) == 4  # the rest waits, unread
    assert peer.session.waiting_for_acks
    assert peer.session.backlog
    store.release()
    assert wakes  # the transport is told it may go on
    assert len(by_type(peer.frames(), "ack")) == 4
    assert not peer.session.waiting_for_acks
    peer.session.resume()
    assert len(store.held) == 4
    while store.held or peer.session.backlog:
        store.release()
        peer.session.resume()
    assert [f["seq"] for f in by_type(peer.frames(), "ack")] == list(range(5, 21))


def test_publishes_in_flight_are_bounded_in_all() -> None:
    store = HeldStore()
    budget = InflightBudget(6)
    a, _ = held_peer(store, budget, limit=100)
    b, wakes_b = held_peer(store, budget, limit=100)
    a.send(PUBLISH * 5)
    b.send(PUBLISH * 5)
    assert len(store.held) == 6
    assert budget.full
    assert b.session.waiting_for_acks
    store.release(1)  # one ack frees one place: the waiting connection hears of it
    assert wakes_b
    b.session.resume()
    assert len(store.held) == 6
    while store.held or a.session.backlog or b.session.backlog:
        store.release()
        a.session.resume()
        b.session.resume()
    assert budget.used == 0
    assert len(by_type(a.frames(), "ack")) == 5
    assert len(by_type(b.frames(), "ack")) == 5


def test_a_last_line_without_newline_is_answered_at_eof() -> None:
    peer = Peer(new_engine())
    peer.frames()
    peer.send(b"ping")
    assert peer.frames() == []
    peer.session.receive_eof()
    peer.collect()
    assert peer.frames()[0]["type"] == "pong"


def test_idle_request_and_snapshot_timeouts() -> None:
    clock = [0.0]

    def mono() -> float:
        return clock[0]

    engine = new_engine()
    for i in range(3):
        engine.publish([("c", f"k{i}", f'"k{i}"'.encode(), b"1")], lambda _r: None)
    limits = Limits(idle_timeout=30, request_timeout=5, snapshot_timeout=10)
    idle = Peer(engine, limits=limits, monotonic=mono)
    partial = Peer(engine, limits=limits, monotonic=mono)
    syncing = Peer(engine, limits=limits, monotonic=mono)
    live = Peer(engine, limits=limits, monotonic=mono)
    for p in (idle, partial, syncing, live):
        p.frames()
    partial.send(b'{"op":"pi')
    syncing.send({"op": "sync"})  # not pumped: the client does not read
    live.send({"op": "subscribe"})
    clock[0] = 6.0
    for p in (idle, partial, syncing, live):
        p.tick()
    (err,) = partial.frames()
    assert err["code"] == "bad_request"
    assert "not finished within 5s" in err["message"]
    clock[0] = 11.0
    syncing.tick()
    assert syncing.frames()[-1]["code"] == "slow_consumer"
    clock[0] = 31.0
    idle.tick()
    live.tick()
    assert idle.frames() == [{"type": "bye", "reason": "idle"}]
    assert idle.session.closing
    assert not live.session.closing  # a subscriber is never idle


def test_max_snapshot_retained_cuts_the_oldest_snapshot() -> None:
    engine = new_engine()
    engine.store.state.max_retained = 10_000
    value = b'"' + b"v" * 100 + b'"'
    batch = [("c", f"k{i}", f'"k{i}"'.encode(), value) for i in range(50)]
    engine.publish(batch, lambda _r: None)
    peer = Peer(engine)
    peer.frames()
    peer.send({"op": "sync"})  # open, not read
    for _ in range(3):  # overwrite everything: the snapshot keeps the old versions
        engine.publish(
            [("c", f"k{i}", f'"k{i}"'.encode(), value) for i in range(50)], lambda _r: None
        )
    state = engine.store.state
    assert state.snapshots_cut == 1
    assert state.retained <= 10_000
    peer.pump()
    assert peer.frames()[-1]["code"] == "slow_consumer"
