"""Output that cannot be written: a full device is one line and exit status 1; a
reader that went away (``| head -1``) ends the command quietly, with exit status 141,
as SIGPIPE ends other Unix tools (cli/output.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import pytest

from statecast import Server
from statecast.core.protocol import Change
from tests.helpers import CMD, TIMEOUT

SECRET = "s" * 40
FULL = "/dev/full"

needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full here")

# Each command, with what it needs on standard input.
COMMANDS: dict[str, tuple[list[str], bytes]] = {
    "sync": (["sync"], b""),
    "stats": (["stats", "--json", "--interval", "0.05"], b""),
    "publish": (["publish", "c", "k", "1"], b""),
    "publish-ndjson": (["publish", "--ndjson"], b'{"collection":"c","key":"k","value":1}\n'),
    "token": (["token", "--sub", "a", "--auth-secret", SECRET], b""),
    "help": (["--help"], b""),
    "sync-help": (["sync", "--help"], b""),
    "version": (["--version"], b""),
}


def env_for(server: Server) -> dict[str, str]:
    return {**os.environ, "STATECAST_URL": f"tcp://127.0.0.1:{server.port}"}


@contextmanager
def closed_pipe() -> Iterator[int]:
    """The write end of a pipe whose reader has gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        yield w
    finally:
        os.close(w)


def run(server: Server, args: list[str], stdin: bytes, stdout: int | IO[bytes]) -> tuple[int, str]:
    r = subprocess.run(
        [*CMD, *args],
        input=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=TIMEOUT * 3,
        env=env_for(server),
        check=False,
    )
    return r.returncode, r.stderr.decode("utf-8", "replace")


@needs_dev_full
@pytest.mark.parametrize("name", COMMANDS)
def test_standard_output_on_a_full_device_is_one_line(server: Server, name: str) -> None:
    """Found by an adversarial run: each of these was a traceback."""
    server.publish([Change("c", "k", 0)])
    args, stdin = COMMANDS[name]
    with open(FULL, "wb") as full:
        code, err = run(server, args, stdin, full)
    assert (code, err) == (1, "statecast: cannot write standard output: No space left on device\n")


@needs_dev_full
def test_sync_to_a_full_file_is_one_line(server: Server) -> None:
    server.publish([Change("c", f"k{i}", i) for i in range(3000)])
    code, err = run(server, ["sync", "-o", FULL], b"", subprocess.DEVNULL)
    assert (code, err) == (1, f"statecast: cannot write {FULL}: No space left on device\n")
    # A snapshot small enough to stay in the file's buffer until the end.
    server.publish([Change("small", "k", 1)])
    code, err = run(server, ["sync", "-o", FULL, "--collections", "small"], b"", subprocess.DEVNULL)
    assert code == 1, err
    assert err.endswith(f"statecast: cannot write {FULL}: No space left on device\n"), err


@pytest.mark.parametrize("name", COMMANDS)
def test_a_reader_that_went_away_ends_the_command_quietly(server: Server, name: str) -> None:
    server.publish([Change("c", "k", 0)])
    args, stdin = COMMANDS[name]
    with closed_pipe() as w:
        code, err = run(server, args, stdin, w)
    assert "Traceback" not in err, err
    assert "Exception ignored" not in err, err
    assert code == 141, err
    if name.startswith("publish"):
        assert err.startswith("published") or err == "", err  # the publish was applied
    else:
        assert err == "", err


def watch_until_live(server: Server, stdout: int | IO[bytes]) -> subprocess.Popen[bytes]:
    watch = subprocess.Popen(
        [*CMD, "watch", "--json"], stdout=stdout, stderr=subprocess.PIPE, env=env_for(server)
    )
    assert watch.stderr is not None
    deadline = time.monotonic() + TIMEOUT
    while b"live" not in (line := watch.stderr.readline()):
        assert line, "watch exited before it was live"
        assert time.monotonic() < deadline
    return watch


@needs_dev_full
def test_watch_to_a_full_device_is_one_line(server: Server) -> None:
    with open(FULL, "wb") as full:
        watch = watch_until_live(server, full)
    try:
        server.publish([Change("c", "k", 1)])
        _, err = watch.communicate(timeout=TIMEOUT)
    finally:
        watch.kill()
    assert watch.returncode == 1
    assert err.decode() == "statecast: cannot write standard output: No space left on device\n"


def test_watch_into_a_pipe_nobody_reads_ends_quietly(server: Server) -> None:
    with closed_pipe() as w:
        watch = watch_until_live(server, w)
    try:
        server.publish([Change("c", "k", 1)])
        _, err = watch.communicate(timeout=TIMEOUT)
    finally:
        watch.kill()
    assert (watch.returncode, err) == (141, b"")


@pytest.mark.parametrize(
    ("args", "closed", "said"),
    [
        (["sync"], ">&-", "statecast: cannot write standard output: Bad file descriptor\n"),
        (
            ["publish", "--ndjson"],
            "<&-",
            "statecast: cannot read standard input: Bad file descriptor\n",
        ),
        (["stats", "--json", "--interval", "0.05"], "2>&-", None),
    ],
    ids=["stdout", "stdin", "stderr"],
)
def test_a_closed_standard_stream_is_not_a_crash(
    server: Server, args: list[str], closed: str, said: str | None
) -> None:
    """Found by an adversarial run: with a standard stream closed, the first socket
    took its number, and uvloop aborted the process when closing it (exit 134)."""
    server.publish([Change("c", "k", 0)])
    r = subprocess.run(
        ["sh", "-c", f'exec "$@" {closed}', "sh", *CMD, *args],
        capture_output=True,
        timeout=TIMEOUT * 3,
        env=env_for(server),
        check=False,
    )
    err = r.stderr.decode("utf-8", "replace")
    if said is None:  # nobody to tell: it just works
        assert r.returncode == 0, err
        assert b'"seq":1' in r.stdout
    else:
        assert (r.returncode, err) == (1, said)
