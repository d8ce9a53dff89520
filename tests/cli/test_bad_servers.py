"""The client commands against servers that send what they should not: one line and
exit status 1, never a traceback, and nothing that a terminal would act on."""

from __future__ import annotations

import io
import socket

import pytest

from statecast.cli import commands
from statecast.core.protocol import Change
from tests.cli.fakes import HELLO, answers_then, fake_server, requests


def rid(req: dict[str, object]) -> int:
    return int(str(req["id"]))


def begin(req: dict[str, object]) -> bytes:
    return b'{"type":"snapshot_begin","id":%d,"seq":1,"epoch":"e","count":2}\n' % rid(req)


RECORD = b'{"type":"record","seq":1,"collection":"c","key":"k","value":1}\n'


def sync(port: int) -> tuple[int, bytes]:
    target = commands.Target(f"tcp://127.0.0.1:{port}").check()
    out = io.BytesIO()
    code = commands.run_tool(lambda: commands.sync(target, None, out, "memory"))
    return code, out.getvalue()


def test_sync_when_the_server_says_bye_mid_snapshot(capsys: pytest.CaptureFixture[str]) -> None:
    """Found by an adversarial run: a server shutting down mid-snapshot (§8) made
    ``sync`` end with an AssertionError traceback."""
    bye = b'{"type":"bye","reason":"shutdown"}\n'
    with fake_server(answers_then(lambda req: begin(req) + RECORD + bye)) as port:
        code, out = sync(port)
    assert code == 1
    assert capsys.readouterr().err == (
        f"statecast: tcp://127.0.0.1:{port} said bye (shutdown) before the end of the "
        "snapshot: it is incomplete (1 records written)\n"
    )
    assert out == RECORD


def test_sync_when_the_server_ends_a_snapshot_it_never_began(
    capsys: pytest.CaptureFixture[str],
) -> None:
    end = b'{"type":"snapshot_end","id":%d,"seq":0,"count":0}\n'
    with fake_server(answers_then(lambda req: end % rid(req))) as port:
        code, _ = sync(port)
    assert code == 1
    said = f"statecast: tcp://127.0.0.1:{port} sent a snapshot_end without a snapshot_begin\n"
    assert capsys.readouterr().err == said


def test_sync_when_the_server_closes_mid_frame(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(conn: socket.socket) -> None:
        conn.sendall(HELLO)
        for req in requests(conn):
            conn.sendall(begin(req) + RECORD[:20])
            conn.shutdown(socket.SHUT_RDWR)
            return

    with fake_server(handler) as port:
        code, _ = sync(port)
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "closed the connection mid-frame" in err, err


@pytest.mark.parametrize("command", ["sync", "publish", "stats"])
def test_control_characters_from_the_server_do_not_reach_the_terminal(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an adversarial run: a server's error message went to the terminal as
    it came, escape sequences (here: clear the screen) and all."""
    error = b'{"type":"error","id":%d,"code":"bad_request","message":"no\\u001b[2J\\u009b"}\n'
    with fake_server(answers_then(lambda req: error % rid(req))) as port:
        target = commands.Target(f"tcp://127.0.0.1:{port}").check()
        if command == "sync":
            code, _ = sync(port)
        elif command == "stats":
            code = commands.run_tool(lambda: commands.stats(target, 0.05, True))
        else:
            code = commands.run_tool(lambda: commands.publish_one(target, Change("c", "k", 1)))
    assert code == 1
    assert capsys.readouterr().err == "statecast: bad_request: no\\x1b[2J\\x9b\n"
