"""The client commands against servers that answer nothing: each gives up after a
deadline with one line, but a live subscription that is merely quiet goes on."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable

import pytest

from statecast import Server
from statecast.cli import commands
from statecast.core.protocol import Change
from tests.cli.fakes import answers_then, fake_server, hello_only, pong_only, silent
from tests.helpers import TIMEOUT

COMMANDS = ["sync", "watch", "stats", "publish", "publish-ndjson"]


def bounded(fn: Callable[[], int], seconds: float = TIMEOUT) -> int:
    """``fn()`` in a thread; fails (rather than hangs) if it takes longer than ``seconds``."""
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert result, f"still waiting after {seconds} s"
    return result[0]


def run(command: str, url: str) -> int:
    target = commands.Target(url).check()
    if command == "sync":
        return commands.run_tool(lambda: commands.sync(target, None, io.BytesIO(), "memory"))
    if command == "watch":
        return commands.run_tool(lambda: commands.watch(target, None, True))
    if command == "stats":
        return commands.run_tool(lambda: commands.stats(target, 0.1, True))
    if command == "publish":
        return commands.run_tool(lambda: commands.publish_one(target, Change("c", "k", 1)))
    assert command == "publish-ndjson"
    lines = io.BytesIO(b'{"collection":"c","key":"k","value":1}\n')
    return commands.run_tool(lambda: commands.publish_many(target, lines, 10))


@pytest.fixture
def short(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(commands, "ANSWER_TIMEOUT", 0.5)
    monkeypatch.setattr(commands, "CONNECT_TIMEOUT", 0.5)
    return 0.5


@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_that_never_says_hello_is_given_up_on(
    short: float, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_server(silent) as port:
        t0 = time.monotonic()
        assert bounded(lambda: run(command, f"tcp://127.0.0.1:{port}")) == 1
        assert time.monotonic() - t0 < short + TIMEOUT / 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"cannot connect to tcp://127.0.0.1:{port}: no hello within 0.5s" in err, err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_that_says_hello_and_then_nothing_is_given_up_on(
    short: float, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an adversarial run: ``watch`` waited for its ping's answer for good."""
    with fake_server(hello_only) as port:
        assert bounded(lambda: run(command, f"tcp://127.0.0.1:{port}")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    said = "not acknowledged within 0.5s" if command.startswith("publish") else "no answer"
    assert said in err, err


def test_watch_gives_up_when_its_first_sync_is_never_answered(
    short: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server answers ping but never the sync: ``watch`` waited for good."""
    with fake_server(pong_only) as port:
        assert bounded(lambda: run("watch", f"tcp://127.0.0.1:{port}")) == 1
    err = capsys.readouterr().err
    assert f"statecast: no answer from tcp://127.0.0.1:{port} for 0.5 s" in err, err
    assert "Traceback" not in err


def test_watch_gives_up_when_its_first_sync_keeps_failing(
    short: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that answers the sync with garbage: the replica reconnects (saying
    why), and ``watch`` gives up once no sync has made progress for the deadline."""
    with fake_server(answers_then(lambda req: b"{not json\n")) as port:
        assert bounded(lambda: run("watch", f"tcp://127.0.0.1:{port}")) == 1
    err = capsys.readouterr().err
    assert "reconnecting" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"statecast: cannot sync with tcp://127.0.0.1:{port} within 0.5 s"), err
    assert ": malformed frame from the server: JSON is malformed" in last, last
    assert "Traceback" not in err


def test_a_quiet_live_watch_does_not_time_out(
    server: Server, short: float, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """No change and no heartbeat (the server's are off) for several deadlines: the
    subscription is quiet, not dead (protocol §4.3), and ``watch`` stays."""
    target = commands.Target(f"tcp://127.0.0.1:{server.port}").check()

    async def body() -> bytes:
        task = asyncio.create_task(commands.watch(target, None, True))
        try:
            await asyncio.sleep(short * 5)
            assert not task.done(), task.result()
            await asyncio.to_thread(server.publish, [Change("c", "k", {"v": 1})])
            deadline = time.monotonic() + TIMEOUT
            out = b""
            while b'"change"' not in out:
                assert time.monotonic() < deadline, "the change never came"
                await asyncio.sleep(0.05)
                out += capsysbinary.readouterr().out
            return out
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    out = asyncio.run(body())
    assert b'"collection":"c","key":"k","value":{"v":1}' in out


def test_a_cluster_url_moves_past_a_node_that_never_says_hello(
    server: Server, short: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--url`` with several nodes uses the first that answers: a node that accepts
    and says nothing counts as not answering (it stopped the command before)."""
    with fake_server(silent) as port:
        url = f"tcp://127.0.0.1:{port},tcp://127.0.0.1:{server.port}"
        assert bounded(lambda: run("stats", url)) == 0
    assert '"seq":0' in capsys.readouterr().out
