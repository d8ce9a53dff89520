"""The dashboard in a real browser (Debian's Chromium, driven by Playwright): the tables
fill from the snapshot, records published meanwhile show up, and when the server
restarts on the same SQLite database the page resumes where it was, without a full
sync. Any page error or console error fails the test. Leaves a screenshot in
test-artifacts/ (at the root of the repository)."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TIMEOUT, LineClient, ServeProcess, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="Chromium is not installed (Debian package 'chromium'; `make test` installs it "
    "when run as root)",
)


@pytest.fixture
def sync_api() -> Any:
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture
def browser(sync_api: Any) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            b.close()


def publish(port: int, collection: str, key: str, value: Any) -> int:
    with LineClient(port) as c:
        ack = c.request(
            {"op": "publish", "changes": [{"collection": collection, "key": key, "value": value}]}
        )
    assert ack["type"] == "ack", ack
    return int(ack["seq"])


def order_value(order_id: str, qty: int) -> dict[str, Any]:
    """An order shaped like the demo's, but one no demo trader would ever make."""
    return {
        "order_id": order_id,
        "account": "PYTEST-ACCT",
        "trader": "pytest",
        "instrument": "ZZTEST",
        "side": "sell",
        "type": "limit",
        "qty": qty,
        "limit_price": 123.45,
        "filled_qty": 0,
        "leaves_qty": qty,
        "avg_price": None,
        "status": "new",
        "created_at": 1_700_000_000_000,
        "updated_at": 1_700_000_000_000,
    }


class BrowserErrors:
    """Every uncaught exception and console error of a page.

    The one exception: while the test has the server down on purpose (``expecting_refusals``),
    the page's reconnection attempts fail, and Chromium itself logs each failed WebSocket
    connection as a console error. No page code can prevent that: the only way to learn
    that the server is back is to try. So during that window, and only then, exactly that
    message is allowed: for this page's own /ws URL, refused, or answered 503 by an HTTP
    port whose server is not ready. The page does its part by backing off (and waiting
    longer after the server's ``bye``), so there are only a few of them.
    """

    def __init__(self, page: Any, http_port: int) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []
        self.expecting_refusals = False
        # Refused while the server is down; 503 from the HTTP port while the server is
        # still stopping or already restarting but not ready yet (docs/http.md, /readyz).
        self._refused = re.compile(
            rf"WebSocket connection to 'ws://127\.0\.0\.1:{http_port}/ws' failed: "
            r"(Error in connection establishment: net::ERR_CONNECTION_REFUSED"
            r"|Error during WebSocket handshake: Unexpected response code: 503)"
        )
        page.on("pageerror", self._on_pageerror)
        page.on("console", self._on_console)

    def _on_pageerror(self, exc: Any) -> None:
        self.errors.append(f"page error: {exc}")

    def is_refusal(self, msg: Any) -> bool:
        return msg.type == "error" and self._refused.fullmatch(msg.text) is not None

    def _on_console(self, msg: Any) -> None:
        if msg.type != "error":
            return
        if self.expecting_refusals and self.is_refusal(msg):
            self.allowed.append(msg.text)
            return
        self.errors.append(f"console error: {msg.text} ({msg.location})")


def join_counts(page: Any) -> dict[str, Any]:
    """What the page has done: full syncs and resumes completed, and the last of them."""
    counts: dict[str, Any] = page.evaluate(
        "({syncs: statecast.syncs, resumes: statecast.resumes, lastJoin: statecast.lastJoin})"
    )
    return counts


def check_tables_fill(page: Any, expect: Any, tcp: int, ms: int) -> None:
    # The tables fill from the snapshot: the demo quotes twelve instruments (at the
    # open, their change_pct is 0: a cell that used to throw).
    page.click("nav button[data-collection=quotes]")
    expect(page.locator("#table-quotes tbody tr")).to_have_count(12, timeout=ms)
    expect(page.locator("#table-quotes tbody tr[data-key=NVDA]")).to_be_visible()
    # A P&L of exactly 0 is drawn neither green nor red (and throws nothing).
    page.click("nav button[data-collection=positions]")
    flat: dict[str, Any] = {"position_id": "PYTEST:ZZTEST", "account": "PYTEST-ACCT"}
    flat |= {"instrument": "ZZTEST", "qty": 0, "avg_cost": 0.0, "realized_pnl": 0.0}
    publish(tcp, "positions", "PYTEST:ZZTEST", flat)
    row = page.locator("#table-positions tbody tr[data-key='PYTEST:ZZTEST']")
    expect(row).to_be_visible(timeout=ms)
    expect(row.locator("td.num")).not_to_have_count(0)
    expect(row.locator("td.pos, td.neg")).to_have_count(0)


def check_order_shows(page: Any, expect: Any, tcp: int, order_id: str, *, qty: int, ms: int) -> Any:
    """Publish an order over TCP; its row shows up in the orders view, with its fields."""
    page.click("nav button[data-collection=orders]")
    publish(tcp, "orders", order_id, order_value(order_id, qty))
    row = page.locator(f"#table-orders tbody tr[data-key={order_id}]")
    expect(row).to_be_visible(timeout=ms)
    for text in ("PYTEST-ACCT", "pytest", "ZZTEST", f"{qty:,}", "123.45"):
        expect(row).to_contain_text(text)
    return row


@pytest.mark.slow
def test_dashboard_fills_updates_and_resumes(browser: Any, sync_api: Any, tmp_path: Path) -> None:
    expect = sync_api.expect
    tcp, http = free_port(), free_port()
    # The same database file and the same ports for both runs of the server.
    ports = ("--port", str(tcp), "--http-port", str(http))
    args = (
        "--demo",
        *ports,
        "--store",
        f"sqlite:{tmp_path / 'dashboard.db'}",
        "--shutdown-grace",
        "1",
    )
    server = ServeProcess(tmp_path, *args)
    page = browser.new_page(viewport={"width": 1400, "height": 900}, locale="en-US")
    errors = BrowserErrors(page, http)
    ms = int(TIMEOUT * 3000)
    try:
        page.goto(f"http://127.0.0.1:{http}/")
        page.wait_for_selector("body[data-state=live][data-last-join=synced]", timeout=ms)
        assert join_counts(page) == {"syncs": 1, "resumes": 0, "lastJoin": "synced"}
        epoch = page.inner_text("#epoch")
        assert re.fullmatch(r"[0-9a-f]{8,}", epoch), epoch
        check_tables_fill(page, expect, tcp, ms)

        order1 = check_order_shows(page, expect, tcp, "PYTEST-ORDER-1", qty=4242, ms=ms)

        # The server restarts on the same database and ports. The page notices,
        # reconnects and resumes with `subscribe from`: no full sync, same epoch.
        before = join_counts(page)
        # The server stays down until the page has tried to reconnect and been refused
        # at least once, so that the retry path is exercised too.
        errors.expecting_refusals = True
        with page.expect_console_message(errors.is_refusal, timeout=ms):
            status, output = server.stop(signal.SIGTERM)
            assert status == 0, output
        expect(page.locator("body")).not_to_have_attribute("data-state", "live")
        server = ServeProcess(tmp_path, *args)
        page.wait_for_function(
            "([syncs, resumes]) => statecast.syncs > syncs || statecast.resumes > resumes",
            arg=[before["syncs"], before["resumes"]],
            timeout=ms,
        )
        after = join_counts(page)
        errors.expecting_refusals = False
        assert errors.allowed, "the page was never refused while the server was down"
        expected = {"syncs": before["syncs"], "resumes": before["resumes"] + 1}
        assert after == {**expected, "lastJoin": "resumed"}, (before, after)
        expect(page.locator("body")).to_have_attribute("data-state", "live")
        assert page.inner_text("#epoch") == epoch

        # The demo clears the previous session's orders when it starts: the page got
        # those deletes in its catch-up (or live right after it).
        expect(order1).to_have_count(0, timeout=ms)
        # And it goes on live.
        check_order_shows(page, expect, tcp, "PYTEST-ORDER-2", qty=7, ms=ms)
        assert join_counts(page)["syncs"] == before["syncs"]

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        page.evaluate("0")  # a round trip: the console events from before it are in
    finally:
        print("console errors allowed during the restart:", *errors.allowed, sep="\n  ")
        print("errors:", *errors.errors, sep="\n  ")
        page.close()
        server.stop(signal.SIGTERM)
    assert errors.errors == []
