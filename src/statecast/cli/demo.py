"""A simulated equities trading desk, for ``statecast serve --demo``.

Four producer threads, one per trader, each with their own accounts, publish through
the thread-safe :meth:`Server.publish` while sharing one market:

* ``quotes``: bid, ask and last price per instrument, moving as a random walk;
* ``orders``: limit orders that are placed, amended, partly filled, filled and
  cancelled; finished orders are removed a while later (or sooner, when many wait);
* ``executions``: one per fill; only the most recent ones are kept;
* ``positions``: quantity, average cost and P&L per account and instrument.

Every fill is published as one atomic batch of the execution, the updated order and
the updated position, so no client ever sees one without the others. Once the desk
holds its quota of executions, the same batch also deletes the oldest one, so the
state never holds more than the quota. Every collection is bounded: the state of a
demo left running for days stays as small as after its first minutes (12 quotes, at
most 72 positions, 2,000 executions, and the open orders plus at most 500 finished
ones, those of the last 15 s). The server's change log is bounded by its ``--retain``.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from statecast.core.protocol import Change
from statecast.errors import StatecastError

if TYPE_CHECKING:
    from statecast.server import Server

__all__ = ["Market", "Trader", "TradingDesk"]

log = logging.getLogger("statecast.cli.demo")

# symbol: (name, starting price, daily volatility)
INSTRUMENTS: dict[str, tuple[str, float, float]] = {
    "AAPL": ("Apple Inc.", 228.40, 0.016),
    "MSFT": ("Microsoft Corp.", 417.15, 0.014),
    "NVDA": ("NVIDIA Corp.", 131.60, 0.030),
    "AMZN": ("Amazon.com Inc.", 186.25, 0.019),
    "GOOGL": ("Alphabet Inc. A", 165.90, 0.017),
    "META": ("Meta Platforms A", 565.30, 0.022),
    "TSLA": ("Tesla Inc.", 251.10, 0.035),
    "JPM": ("JPMorgan Chase & Co.", 222.75, 0.012),
    "GS": ("Goldman Sachs Group", 518.40, 0.015),
    "XOM": ("Exxon Mobil Corp.", 117.85, 0.013),
    "ASML": ("ASML Holding N.V.", 702.50, 0.024),
    "SAP": ("SAP SE", 221.30, 0.015),
}

TRADERS: list[tuple[str, list[str]]] = [
    ("alice", ["EQ-LS-01", "EQ-LS-02"]),
    ("bob", ["EQ-MM-01"]),
    ("chen", ["EQ-ARB-01", "EQ-ARB-02"]),
    ("dana", ["EQ-FLOW-01"]),
]
VENUES = ["XNAS", "XNYS", "ARCX", "BATS", "IEXG", "EDGX"]
KEEP_EXECUTIONS = 2000  # for the whole desk, shared out among the traders
FINISHED_ORDER_TTL = 15.0  # seconds a filled or cancelled order stays visible
KEEP_FINISHED_ORDERS = 500  # at most, for the whole desk, whatever the pace
MAX_OPEN_ORDERS = 15  # per trader


def _now_ms() -> int:
    return int(time.time() * 1000)


def _tick(px: float) -> float:
    return round(px, 2)


class Market:
    """Shared prices. Every thread may move them; the lock keeps each move whole."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.quotes: dict[str, dict[str, Any]] = {}
        for sym, (name, px, _vol) in INSTRUMENTS.items():
            self.quotes[sym] = self._quote(sym, name, px, px, 0)

    @staticmethod
    def _quote(sym: str, name: str, mid: float, open_px: float, volume: int) -> dict[str, Any]:
        spread = max(0.01, _tick(mid * 0.0002))
        bid, ask = _tick(mid - spread / 2), _tick(mid + spread / 2)
        if ask <= bid:
            ask = _tick(bid + 0.01)
        return {
            "symbol": sym,
            "name": name,
            "bid": bid,
            "ask": ask,
            "last": _tick(mid),
            "open": open_px,
            "change_pct": round((mid / open_px - 1) * 100, 2),
            "volume": volume,
            "ts": _now_ms(),
        }

    def move(self, n: int = 2) -> list[Change]:
        """Move ``n`` instruments one step; the changed quotes to publish."""
        out: list[Change] = []
        with self._lock:
            for sym in self._rng.sample(list(INSTRUMENTS), n):
                name, _px, vol = INSTRUMENTS[sym]
                q = self.quotes[sym]
                # About 20 steps a second over a 6.5 hour session.
                step = vol / math.sqrt(6.5 * 3600 * 20)
                mid = (q["bid"] + q["ask"]) / 2 * math.exp(self._rng.gauss(0.0, step * 3))
                volume = q["volume"] + self._rng.randrange(100, 5000, 100)
                self.quotes[sym] = self._quote(sym, name, mid, q["open"], volume)
                out.append(Change("quotes", sym, self.quotes[sym]))
        return out

    def bid_ask(self, sym: str) -> tuple[float, float]:
        q = self.quotes[sym]
        return q["bid"], q["ask"]


class Trader:
    """One producer thread's book: its open orders, positions and recent fills."""

    _ids = itertools.count(1)
    _ids_lock = threading.Lock()

    def __init__(
        self,
        name: str,
        accounts: list[str],
        market: Market,
        seed: int,
        *,
        keep_executions: int = KEEP_EXECUTIONS // len(TRADERS),
        keep_finished_orders: int = KEEP_FINISHED_ORDERS // len(TRADERS),
        finished_order_ttl: float = FINISHED_ORDER_TTL,
    ) -> None:
        if keep_executions < 1 or keep_finished_orders < 0:
            raise ValueError("keep_executions must be >= 1 and keep_finished_orders >= 0")
        self.name = name
        self.accounts = accounts
        self.market = market
        self.rng = random.Random(seed)
        self.keep_executions = keep_executions
        self.keep_finished_orders = keep_finished_orders
        self.finished_order_ttl = finished_order_ttl
        self.open: dict[str, dict[str, Any]] = {}
        self.finished: deque[tuple[float, str]] = deque()  # (when, order id), oldest first
        self.executions: deque[str] = deque()  # the ids of this trader's, oldest first
        self.positions: dict[str, dict[str, Any]] = {}

    @classmethod
    def _next_id(cls, prefix: str) -> str:
        with cls._ids_lock:
            return f"{prefix}-{next(cls._ids):07d}"

    # Each method returns one atomic batch (possibly empty).
    def step(self) -> list[Change]:
        r = self.rng.random()
        if r < 0.30 or not self.open:
            return self.place()
        if r < 0.45:
            return self.amend()
        if r < 0.55:
            return self.cancel()
        return self.try_fill()

    def place(self) -> list[Change]:
        if len(self.open) >= MAX_OPEN_ORDERS:
            return self.cancel()
        sym = self.rng.choice(list(INSTRUMENTS))
        bid, ask = self.market.bid_ask(sym)
        side = self.rng.choice(["buy", "sell"])
        # Limit a few ticks away from the touch; some cross and fill quickly.
        offset = self.rng.choice([-3, -2, -1, 0, 0, 1, 2]) * max(0.01, _tick(bid * 0.0002))
        limit = _tick(bid - offset) if side == "buy" else _tick(ask + offset)
        now = _now_ms()
        order: dict[str, Any] = {
            "order_id": self._next_id("ORD"),
            "account": self.rng.choice(self.accounts),
            "trader": self.name,
            "instrument": sym,
            "side": side,
            "type": "limit",
            "qty": self.rng.choice([100, 200, 300, 500, 1000, 2000, 5000]),
            "limit_price": limit,
            "filled_qty": 0,
            "leaves_qty": 0,
            "avg_price": None,
            "status": "new",
            "created_at": now,
            "updated_at": now,
        }
        order["leaves_qty"] = order["qty"]
        self.open[order["order_id"]] = order
        return [Change("orders", order["order_id"], dict(order))]

    def amend(self) -> list[Change]:
        order = self.open[self.rng.choice(list(self.open))]
        bid, ask = self.market.bid_ask(order["instrument"])
        # Chase the market: move the limit to the touch, or change the size.
        if self.rng.random() < 0.7:
            order["limit_price"] = ask if order["side"] == "buy" else bid
        else:
            order["qty"] = max(
                order["filled_qty"] + 100, order["qty"] + self.rng.choice([-100, 100, 500])
            )
            order["leaves_qty"] = order["qty"] - order["filled_qty"]
        order["status"] = "amended" if order["filled_qty"] == 0 else "partially_filled"
        order["updated_at"] = _now_ms()
        return [Change("orders", order["order_id"], dict(order))]

    def cancel(self) -> list[Change]:
        order = self.open.pop(self.rng.choice(list(self.open)))
        order["status"] = "cancelled"
        order["leaves_qty"] = 0
        order["updated_at"] = _now_ms()
        self.finished.append((time.monotonic(), order["order_id"]))
        return [Change("orders", order["order_id"], dict(order))]

    def try_fill(self) -> list[Change]:
        crossing = []
        for order in self.open.values():
            bid, ask = self.market.bid_ask(order["instrument"])
            if (order["side"] == "buy" and order["limit_price"] >= ask) or (
                order["side"] == "sell" and order["limit_price"] <= bid
            ):
                crossing.append(order)
        if not crossing:
            # Nothing crosses: the market still trades against the best-placed order
            # now and then, at its limit.
            order = self.open[self.rng.choice(list(self.open))]
            if self.rng.random() > 0.35:
                return []
            price = order["limit_price"]
        else:
            order = self.rng.choice(crossing)
            bid, ask = self.market.bid_ask(order["instrument"])
            price = ask if order["side"] == "buy" else bid
        return self.fill(order, price)

    def fill(self, order: dict[str, Any], price: float) -> list[Change]:
        """One fill: the execution, the order and the position, as one batch, and the
        delete of this trader's oldest execution once it holds its quota."""
        leaves = order["qty"] - order["filled_qty"]
        qty = (
            leaves
            if leaves <= 200 or self.rng.random() < 0.4
            else self.rng.randrange(100, leaves, 100)
        )
        now = _now_ms()
        execution = {
            "exec_id": self._next_id("EXE"),
            "order_id": order["order_id"],
            "account": order["account"],
            "instrument": order["instrument"],
            "side": order["side"],
            "qty": qty,
            "price": price,
            "venue": self.rng.choice(VENUES),
            "trader": self.name,
            "ts": now,
        }
        prev_notional = (order["avg_price"] or 0.0) * order["filled_qty"]
        order["filled_qty"] += qty
        order["leaves_qty"] = order["qty"] - order["filled_qty"]
        order["avg_price"] = round((prev_notional + qty * price) / order["filled_qty"], 4)
        order["status"] = "filled" if order["leaves_qty"] == 0 else "partially_filled"
        order["updated_at"] = now
        if order["leaves_qty"] == 0:
            del self.open[order["order_id"]]
            self.finished.append((time.monotonic(), order["order_id"]))
        position = self._apply_to_position(order, qty, price, now)
        batch = [
            Change("executions", execution["exec_id"], execution),
            Change("orders", order["order_id"], dict(order)),
            Change("positions", position["position_id"], dict(position)),
        ]
        # Each trader deletes only its own executions, in the order it published them:
        # a delete can never overtake the batch that wrote its execution.
        self.executions.append(execution["exec_id"])
        while len(self.executions) > self.keep_executions:
            batch.append(Change("executions", self.executions.popleft(), delete=True))
        return batch

    def _apply_to_position(
        self, order: dict[str, Any], qty: int, price: float, now: int
    ) -> dict[str, Any]:
        pid = f"{order['account']}:{order['instrument']}"
        pos = self.positions.get(pid)
        if pos is None:
            pos = self.positions[pid] = {
                "position_id": pid,
                "account": order["account"],
                "instrument": order["instrument"],
                "qty": 0,
                "avg_cost": 0.0,
                "realized_pnl": 0.0,
            }
        signed = qty if order["side"] == "buy" else -qty
        old = pos["qty"]
        if old == 0 or (old > 0) == (signed > 0):  # opening or adding
            pos["avg_cost"] = round(
                (pos["avg_cost"] * abs(old) + price * qty) / (abs(old) + qty), 4
            )
        else:  # reducing or flipping
            closed = min(abs(old), qty)
            direction = 1 if old > 0 else -1
            pos["realized_pnl"] = round(
                pos["realized_pnl"] + closed * (price - pos["avg_cost"]) * direction, 2
            )
            if qty > abs(old):
                pos["avg_cost"] = price
        pos["qty"] = old + signed
        if pos["qty"] == 0:
            pos["avg_cost"] = 0.0
        bid, ask = self.market.bid_ask(order["instrument"])
        mark = (bid + ask) / 2
        pos["last"] = round(mark, 2)
        pos["market_value"] = round(pos["qty"] * mark, 2)
        pos["unrealized_pnl"] = round((mark - pos["avg_cost"]) * pos["qty"], 2)
        pos["updated_at"] = now
        return pos

    def housekeeping(self) -> list[Change]:
        """Remove finished orders after a while, or sooner when too many wait."""
        out: list[Change] = []
        cutoff = time.monotonic() - self.finished_order_ttl
        finished = self.finished
        while finished and (finished[0][0] < cutoff or len(finished) > self.keep_finished_orders):
            out.append(Change("orders", finished.popleft()[1], delete=True))
        return out


class TradingDesk:
    """Runs one producer thread per trader until :meth:`stop`.

    ``interval`` is the mean pause of each trader between two steps (its pace);
    ``keep_executions`` and ``keep_finished_orders`` are shared out evenly among the
    traders (rounded down); finished orders are removed after ``finished_order_ttl``
    seconds, or sooner when more than ``keep_finished_orders`` wait.
    """

    def __init__(
        self,
        server: Server,
        *,
        interval: float = 0.05,
        seed: int = 1,
        keep_executions: int = KEEP_EXECUTIONS,
        keep_finished_orders: int = KEEP_FINISHED_ORDERS,
        finished_order_ttl: float = FINISHED_ORDER_TTL,
    ) -> None:
        self.server = server
        self.interval = interval
        self.market = Market(seed)
        n = len(TRADERS)
        if keep_executions < n:
            raise ValueError(f"keep_executions must be at least {n}, one per trader")
        self.traders = [
            Trader(
                name,
                accounts,
                self.market,
                seed * 100 + i,
                keep_executions=keep_executions // n,
                keep_finished_orders=keep_finished_orders // n,
                finished_order_ttl=finished_order_ttl,
            )
            for i, (name, accounts) in enumerate(TRADERS)
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def threads(self) -> int:
        return len(self.traders)

    def start(self) -> None:
        """Open the desk (on the server's loop thread), then start the traders."""
        self._take_over_previous_session()
        # The opening quotes first, so that every order has a market to refer to.
        self.server.publish_nowait(
            [Change("quotes", sym, q) for sym, q in self.market.quotes.items()]
        )
        for trader in self.traders:
            t = threading.Thread(
                target=self._run, args=(trader,), name=f"demo-{trader.name}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def _take_over_previous_session(self) -> None:
        """With a durable store, yesterday's desk is still there: its orders and
        executions are cleared, its positions carried over to today's traders."""
        state = self.server.engine.store.state
        leftovers = []
        for name in ("orders", "executions"):
            coll = state.collections.get(name)
            if coll is not None:
                leftovers += [Change(name, r.key, delete=True) for r in coll.records()]
        if leftovers:
            self.server.publish_nowait(leftovers)
        positions = state.collections.get("positions")
        if positions is None:
            return
        by_account = {a: t for t in self.traders for a in t.accounts}
        for rec in positions.records():
            value = msgspec.json.decode(rec.line)["value"]
            trader = by_account.get(value.get("account"))
            if trader is not None:
                trader.positions[rec.key] = value
        log.info("demo: carried over %d positions from the previous session", len(positions))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self, trader: Trader) -> None:
        rng = trader.rng
        try:
            while not self._stop.wait(rng.uniform(0.3, 1.7) * self.interval):
                if rng.random() < 0.5:
                    self.server.publish(self.market.move(rng.randint(1, 3)))
                batch = trader.step()
                if batch:
                    self.server.publish(batch)
                cleanup = trader.housekeeping()
                if cleanup:
                    self.server.publish(cleanup)
        except StatecastError as exc:  # the server is stopping
            log.debug("demo trader %s stops: %s", trader.name, exc)
