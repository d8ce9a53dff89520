"""The trading-desk demo (``statecast serve --demo``): every fill is one atomic batch, and
the state stays bounded however long it runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from statecast import Change, Server
from statecast.cli.demo import INSTRUMENTS, MAX_OPEN_ORDERS, TRADERS, TradingDesk
from tests.helpers import TIMEOUT, LineClient, wait_for

N_TRADERS = len(TRADERS)
N_ACCOUNTS = sum(len(accounts) for _, accounts in TRADERS)
FINISHED = ("filled", "cancelled")


class Recorded:
    """Every batch the desk's threads published, with the seq of its last change."""

    def __init__(self, srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[tuple[int, list[Change]]] = []
        self._lock = threading.Lock()
        publish = srv.publish

        def recording(changes: list[Change], *, timeout: float | None = None) -> int:
            seq = publish(changes, timeout=timeout)
            with self._lock:
                self.batches.append((seq, list(changes)))
            return seq

        monkeypatch.setattr(srv, "publish", recording)

    def fills(self) -> list[tuple[int, list[Change]]]:
        with self._lock:
            return [
                (seq, b)
                for seq, b in self.batches
                if b[0].collection == "executions" and not b[0].delete
            ]


@pytest.fixture
def srv() -> Iterator[Server]:
    s = Server(store="memory", http_port=None, port=0, heartbeat=None).start_in_thread()
    try:
        yield s
    finally:
        s.stop_in_thread(timeout=30)


def run_desk(srv: Server, until: Any, what: str, **settings: Any) -> TradingDesk:
    desk = TradingDesk(srv, seed=3, **settings)
    desk.start()
    try:
        wait_for(until, what, timeout=TIMEOUT * 6)
    finally:
        desk.stop()
    return desk


def whole_log(srv: Server) -> list[dict[str, Any]]:
    """Every change the server made, in seq order, as a subscriber gets them."""
    with LineClient(srv.port) as c:
        assert c.request({"op": "subscribe", "from": 0})["type"] == "subscribed"
        return [c.read() for _ in range(srv.seq)]


def test_fills_are_atomic_and_the_state_stays_bounded(
    srv: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep_executions, keep_finished = 40, 20
    rec = Recorded(srv, monkeypatch)
    desk = run_desk(
        srv,
        lambda: len(rec.fills()) >= 400,
        "400 fills",
        interval=0.0005,
        keep_executions=keep_executions,
        keep_finished_orders=keep_finished,
    )
    fills = rec.fills()
    log = whole_log(srv)
    assert [f["seq"] for f in log] == list(range(1, srv.seq + 1))

    # Each fill: execution, order, position, back to back (one batch), then at most the
    # delete of one old execution of the same trader.
    for seq, batch in fills:
        first = seq - len(batch) + 1
        frames = log[first - 1 : seq]
        assert [(f["collection"], f["key"]) for f in frames] == [
            (c.collection, c.key) for c in batch
        ]
        ev, ov, pv = (f["value"] for f in frames[:3])
        assert [f["collection"] for f in frames[:3]] == ["executions", "orders", "positions"]
        assert ev["order_id"] == ov["order_id"] == frames[1]["key"]
        assert pv["account"] == ev["account"]
        assert ov["status"] in ("filled", "partially_filled")
        assert len(frames) <= 4
        for f in frames[3:]:
            assert f["collection"] == "executions"
            assert f["deleted"] is True
    assert sum(len(b) == 4 for _, b in fills) >= len(fills) - keep_executions

    # Replayed change by change, the state is bounded at every batch boundary.
    ends = {seq for seq, _ in rec.batches}
    state: dict[str, dict[str, Any]] = {}
    most: dict[str, int] = {}
    statuses: dict[str, str] = {}
    removed_orders = 0
    for f in log:
        coll = state.setdefault(f["collection"], {})
        if f.get("deleted"):
            if f["collection"] == "orders":
                assert statuses[f["key"]] in FINISHED  # only finished orders go
                removed_orders += 1
            del coll[f["key"]]
        else:
            coll[f["key"]] = f["value"]
            if f["collection"] == "orders":
                statuses[f["key"]] = f["value"]["status"]
        if f["seq"] in ends:
            for name, c in state.items():
                most[name] = max(most.get(name, 0), len(c))
    assert most["executions"] <= keep_executions
    # Per trader: its open orders, the finished ones it keeps, and one just finished.
    assert most["orders"] <= N_TRADERS * (MAX_OPEN_ORDERS + keep_finished // N_TRADERS + 1)
    assert most["quotes"] == len(INSTRUMENTS)
    assert most["positions"] <= N_ACCOUNTS * len(INSTRUMENTS)
    assert removed_orders > 0
    # What the server holds is what the log says.
    got = {name: len(coll) for name, coll in srv.engine.store.state.collections.items()}
    assert got == {name: len(c) for name, c in state.items()}
    assert len(state["executions"]) == keep_executions  # full, not more
    assert sum(len(t.executions) for t in desk.traders) == keep_executions


def test_finished_orders_are_removed_after_their_time(
    srv: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorded(srv, monkeypatch)
    ttl = 0.3
    start = time.time()
    run_desk(
        srv,
        lambda: time.time() - start > 4 * ttl and len(rec.fills()) >= 50,
        "a few fills",
        interval=0.002,
        keep_finished_orders=10_000,  # only the time limit applies
        finished_order_ttl=ttl,
    )
    stopped_ms = time.time() * 1000
    removed = {c.key for _, b in rec.batches for c in b if c.collection == "orders" and c.delete}
    assert len(removed) > 10
    # What is left of the finished orders finished within the last ttl (and a margin).
    left = [
        msgspec.json.decode(r.line)["value"]
        for r in srv.engine.store.state.collections["orders"].records()
    ]
    finished = [o for o in left if o["status"] in FINISHED]
    assert all(o["updated_at"] > stopped_ms - (ttl + 0.5) * 1000 for o in finished), finished
    assert len(left) <= N_TRADERS * MAX_OPEN_ORDERS + len(finished)


def test_settings_are_checked(srv: Server) -> None:
    with pytest.raises(ValueError, match="keep_executions must be at least 4"):
        TradingDesk(srv, keep_executions=3)
