"""Where the commands' data goes: standard output, or a file (``sync -o``).

A write that fails (a full disk, ``/dev/full``, an I/O error) ends the command with
one line, ``statecast: cannot write standard output: No space left on device``, and exit
status 1. A reader that went away (``statecast watch | head -1``) ends it quietly,
the way SIGPIPE ends other Unix tools: exit status 141 (128 + SIGPIPE), and no
traceback or "Exception ignored" when Python flushes standard output at exit.

(Python ignores SIGPIPE, so that a socket whose peer is gone raises instead of
killing the process; restoring its default would do that to the client's sockets
too. So the pipe is handled here, where output is written.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Iterator
from typing import IO

from statecast.errors import StatecastError

__all__ = [
    "EXIT_PIPE",
    "OutputClosed",
    "OutputError",
    "close",
    "finish_stdout",
    "hold_closed_std_fds",
    "line",
    "silence_stdout",
    "writing",
]

EXIT_PIPE = 128 + signal.SIGPIPE  # what a shell shows for a tool that SIGPIPE ended


class OutputError(StatecastError):
    """Writing the output failed: the command stops, saying so (exit status 1)."""


class OutputClosed(StatecastError):
    """Nobody reads the output any more (EPIPE): the command ends quietly."""


def failure(exc: OSError, label: str = "standard output") -> OutputError | OutputClosed:
    if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
        return OutputClosed(f"{label}: the reader went away")
    return OutputError(f"cannot write {label}: {exc.strerror or exc}")


@contextlib.contextmanager
def writing(label: str = "standard output") -> Iterator[None]:
    """Writes in this block that fail raise :class:`OutputError` or
    :class:`OutputClosed` (``label`` names the file in the message)."""
    try:
        yield
    except OSError as exc:
        raise failure(exc, label) from None


def line(text: str) -> None:
    """``text`` and a newline on standard output, flushed."""
    with writing():
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def close(f: IO[bytes], label: str) -> None:
    """Close a file written to: its last buffered bytes may fail to go too."""
    with writing(label):
        f.close()


def silence_stdout() -> None:
    """After the output failed: what is still buffered for standard output, and any
    later write, goes nowhere (instead of failing again at exit, with "Exception
    ignored" and exit status 120)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def finish_stdout(code: int) -> int:
    """Flush standard output before the exit: the exit status, or 1 (said on
    standard error) or :data:`EXIT_PIPE` if that fails."""
    try:
        with writing():
            sys.stdout.flush()
    except OutputClosed:
        silence_stdout()
        return code or EXIT_PIPE
    except OutputError as exc:
        silence_stdout()
        report(exc)
        return code or 1
    return code


def report(exc: StatecastError) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"statecast: {exc}", file=sys.stderr, flush=True)


def hold_closed_std_fds() -> None:
    """A standard stream the caller closed (``statecast sync >&-``) leaves its number
    to the next socket, and uvloop aborts the process when it closes such a socket
    (libuv asserts ``fd > 2``). So each closed one is held by ``/dev/null``, opened
    the other way round, so that using it fails as a closed one does (reading
    standard input, writing standard output: ``Bad file descriptor``); standard
    error discards (nobody is there to tell)."""
    for fd, flags, name, mode in (
        (0, os.O_WRONLY, "stdin", "r"),
        (1, os.O_RDONLY, "stdout", "w"),
        (2, os.O_WRONLY, "stderr", "w"),
    ):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        held = os.open(os.devnull, flags)
        if held != fd:
            os.dup2(held, fd)
            os.close(held)
        setattr(sys, name, open(fd, mode, encoding="utf-8", closefd=False))  # noqa: SIM115
