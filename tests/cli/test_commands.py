"""The client commands (sync, watch, publish, stats), run as real processes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from statecast.cli import commands
from tests.cli.fakes import HELLO, fake_server
from tests.helpers import CMD, TIMEOUT, LineClient, ServeProcess, frames_of, free_port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    srv = ServeProcess(tmp_path, "--port", str(free_port()), "--heartbeat", "1")
    yield srv
    if srv.p.poll() is None:
        srv.stop(signal.SIGKILL)


def run(
    server: ServeProcess | None, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if server is not None:
        env["STATECAST_URL"] = f"tcp://127.0.0.1:{server.port}"
    return subprocess.run(
        [*CMD, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        env=env,
        check=False,
    )


def test_publish_then_sync_to_a_file(server: ServeProcess, tmp_path: Path) -> None:
    r = run(server, "publish", "orders", "O-1", '{"qty": 100, "px": 101.5}')
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
    assert run(server, "publish", "orders", "O-2", "[1, 2]").stdout == "2\n"
    assert run(server, "publish", "--delete", "orders", "O-2").stdout == "3\n"
    lines = "".join(
        msgspec.json.encode({"collection": "fills", "key": f"F-{i}", "value": i}).decode() + "\n"
        for i in range(2500)
    )
    r = run(
        server,
        "publish",
        "--ndjson",
        "--batch",
        "1000",
        stdin=lines + '{"collection":"fills","key":"F-0","delete":true}\n',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "2504\n"
    assert "published 2,501 changes, last seq 2504" in r.stderr
    out = tmp_path / "state.ndjson"
    r = run(server, "sync", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "synced 2,500 records" in r.stderr
    assert "at seq 2504" in r.stderr
    frames = frames_of(out.read_bytes())
    assert len(frames) == 2500
    assert all(f["type"] == "record" for f in frames)
    by_key = {(f["collection"], f["key"]): f for f in frames}
    assert by_key[("orders", "O-1")]["value"] == {"qty": 100, "px": 101.5}
    assert ("orders", "O-2") not in by_key
    assert ("fills", "F-0") not in by_key
    r = run(server, "sync", "--collections", "orders")
    assert frames_of(r.stdout.encode()) == [
        {
            "type": "record",
            "seq": 1,
            "collection": "orders",
            "key": "O-1",
            "value": {"qty": 100, "px": 101.5},
        }
    ]


def test_stats(server: ServeProcess) -> None:
    run(server, "publish", "c", "k", "1")
    r = run(server, "stats", "--json", "--interval", "0.1")
    assert r.returncode == 0, r.stderr
    stats = msgspec.json.decode(r.stdout)
    assert stats["seq"] == 1
    assert stats["records"] == 1
    assert stats["connections"] == 1
    assert stats["store"] == "sqlite:statecast.db"
    assert "changes_per_second" in stats
    # Every field the server sends (§3.5) is shown, and nothing is left out.
    with LineClient(server.port) as c:
        c.send({"op": "stats"})
        sent = c.read_until("stats")[-1]
    assert set(sent) - {"type"} <= set(stats)
    assert {"connections_accepted", "open_snapshots"} <= set(stats)


def test_watch_shows_changes_and_resumes_after_a_restart(
    server: ServeProcess, tmp_path: Path
) -> None:
    run(server, "publish", "c", "before", "0")
    env = {**os.environ, "STATECAST_URL": f"tcp://127.0.0.1:{server.port}"}
    watch = subprocess.Popen(
        [*CMD, "watch", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert watch.stdout is not None
        assert watch.stderr is not None
        status: list[str] = []

        def status_line() -> str:
            line = watch.stderr.readline()  # type: ignore[union-attr]
            assert line, "watch exited: " + "".join(status)
            status.append(line)
            return line

        while "live" not in status_line():
            pass
        assert run(server, "publish", "c", "k", '{"v": 1}').returncode == 0
        first = msgspec.json.decode(watch.stdout.readline())
        assert first == {
            "type": "change",
            "seq": 2,
            "collection": "c",
            "key": "k",
            "value": {"v": 1},
        }
        # The server dies and comes back: watch says so, resumes, and goes on.
        port = server.port
        server.stop(signal.SIGKILL)
        server2 = ServeProcess(tmp_path, "--port", str(port), "--heartbeat", "1")
        try:
            while "resumed" not in (line := status_line()):
                pass
            assert "at seq 2" in line
            assert any("reconnecting" in s for s in status)
            assert run(server2, "publish", "--delete", "c", "k").returncode == 0
            second = msgspec.json.decode(watch.stdout.readline())
            assert second == {
                "type": "change",
                "seq": 3,
                "collection": "c",
                "key": "k",
                "deleted": True,
            }
        finally:
            server2.stop()
    finally:
        watch.send_signal(signal.SIGINT)
        watch.communicate(timeout=TIMEOUT)


def test_unreachable_server_is_one_line_and_status_1() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    for args in (["sync"], ["watch"], ["stats"], ["publish", "c", "k", "1"]):
        r = subprocess.run(
            [*CMD, *args, "--url", url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 3,
            check=False,
        )
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"statecast: cannot connect to {url}")


def test_publish_usage_errors(server: ServeProcess) -> None:
    r = run(server, "publish", "c", "k", "{not json")
    assert r.returncode == 2
    assert "not valid JSON" in r.stderr
    r = run(server, "publish", "c")
    assert r.returncode == 2
    r = run(server, "publish", "bad collection", "k", "1")
    assert r.returncode == 1
    assert "invalid collection name" in r.stderr


# -- a server that says hello and then nothing -----------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port whose server sends a valid hello, then reads and answers nothing."""
    with fake_server(lambda conn: conn.sendall(HELLO)) as port:
        yield port


@pytest.mark.parametrize("command", ["stats", "sync"])
def test_a_server_that_never_answers_is_given_up_on(
    silent_server: int,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found by an adversarial run: ``stats`` and ``sync`` waited for good."""
    monkeypatch.setattr(commands, "ANSWER_TIMEOUT", 0.5)
    target = commands.Target(f"tcp://127.0.0.1:{silent_server}", None, None).check()
    if command == "stats":
        code = commands.run_tool(lambda: commands.stats(target, 0.1, True))
    else:
        out = io.BytesIO()
        code = commands.run_tool(lambda: commands.sync(target, None, out, "memory"))
    assert code == 1
    assert "no answer from tcp://127.0.0.1" in capsys.readouterr().err
