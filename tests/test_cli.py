"""The ``statecast`` command, run as a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TIMEOUT, LineClient, frames_of

CMD = [sys.executable, "-m", "statecast"]


class Proc:
    """``statecast serve`` in a directory of its own (where its default store lives)."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.p = subprocess.Popen(
            [*CMD, "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        assert self.p.stdout is not None
        deadline = time.monotonic() + TIMEOUT * 3
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on tcp://[^:]+:(\d+)", line)
            if m:
                return int(m.group(1))
        self.p.kill()
        out, _ = self.p.communicate()
        raise AssertionError("server did not start:\n" + "".join(self.lines) + out)

    def stop(self, sig: int) -> tuple[int, str]:
        self.p.send_signal(sig)
        out, _ = self.p.communicate(timeout=TIMEOUT * 3)
        return self.p.returncode, "".join(self.lines) + out


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path, "--shutdown-grace", "2")
    yield p
    if p.p.poll() is None:
        p.p.kill()
        p.p.communicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_gracefully(proc: Proc, sig: int) -> None:
    with LineClient(proc.port) as c:
        c.send(b'{"op":"publish","changes":[{"collection":"c","key":"k","value":1}]}\n')
        assert c.read()["type"] == "ack"
        c.send(b"watch\n")
        assert c.read_until("snapshot_end")[-1]["seq"] == 1
        code, output = proc.stop(sig)
        assert frames_of(c.read_all()) == [{"type": "bye", "reason": "shutdown"}]
    assert code == 0
    assert "shutting down" in output
    assert "stopped at seq 1" in output
    assert "Traceback" not in output


def test_demo_desk_publishes_atomic_fills(tmp_path: Path) -> None:
    p = Proc(tmp_path, "--demo", "--shutdown-grace", "1")
    try:
        with LineClient(p.port) as c:
            c.send({"op": "sync", "live": True})
            c.read_until("snapshot_end")
            fills = 0
            collections: set[str] = set()
            pending: list[dict[str, object]] = []
            while fills < 3:
                f = c.read()
                if f["type"] != "change":
                    continue
                collections.add(str(f["collection"]))
                if pending:
                    pending.append(f)
                    if len(pending) == 3:
                        # A fill is one batch: execution, order, position, back to back.
                        e = pending[0]
                        assert [x["collection"] for x in pending] == [
                            "executions",
                            "orders",
                            "positions",
                        ]
                        assert [x["seq"] for x in pending] == [e["seq"], e["seq"] + 1, e["seq"] + 2]  # type: ignore[operator]
                        ev, ov, pv = (x["value"] for x in pending)
                        assert ev["order_id"] == ov["order_id"]  # type: ignore[index]
                        assert pv["account"] == ev["account"]  # type: ignore[index]
                        assert ov["status"] in ("filled", "partially_filled")  # type: ignore[index]
                        fills += 1
                        pending = []
                elif f["collection"] == "executions" and not f.get("deleted"):
                    pending.append(f)
            assert {"quotes", "orders", "executions", "positions"} <= collections
    finally:
        code, output = p.stop(signal.SIGTERM)
    assert code == 0, output


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    r = subprocess.run(
        [*CMD, "serve", "--max-pending", "10"],
        capture_output=True,
        check=False,
        cwd=tmp_path,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert r.returncode == 2
    assert "max_pending must be at least 65536" in r.stderr
    r = subprocess.run(
        [*CMD, "serve", "--store", "postgres"],
        capture_output=True,
        check=False,
        cwd=tmp_path,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert r.returncode == 2
    assert "unknown store 'postgres'" in r.stderr


def test_environment_variables_map_to_options(tmp_path: Path) -> None:
    env = {**os.environ, "STATECAST_MAX_PENDING": "3"}
    r = subprocess.run(
        [*CMD, "serve", "--port", "0"],
        capture_output=True,
        check=False,
        cwd=tmp_path,
        text=True,
        timeout=TIMEOUT * 3,
        env=env,
    )
    assert r.returncode == 2
    assert "max_pending must be at least 65536 bytes, not 3" in r.stderr


def test_port_in_use_is_a_clear_error(proc: Proc, tmp_path: Path) -> None:
    r = subprocess.run(
        [*CMD, "serve", "--port", str(proc.port), "--store", "memory"],
        capture_output=True,
        check=False,
        cwd=tmp_path,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert r.returncode == 1
    assert "cannot start" in r.stderr
    assert "Traceback" not in r.stderr


def test_version() -> None:
    r = subprocess.run(
        [*CMD, "--version"], capture_output=True, check=False, text=True, timeout=TIMEOUT * 3
    )
    assert r.returncode == 0
    assert r.stdout.startswith("statecast, version ")
