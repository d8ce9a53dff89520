"""Shared test tools: a timeout unit, a blocking line client, a fake subscriber."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

# Every wait in the tests is a multiple of this; raise it on a slow machine
# (STATECAST_TEST_TIMEOUT=30) instead of tuning sleeps.
TIMEOUT = float(os.environ.get("STATECAST_TEST_TIMEOUT", "10"))

Frame = dict[str, Any]
CMD = [sys.executable, "-m", "statecast"]


def frames_of(data: bytes) -> list[Frame]:
    """Decode complete NDJSON frames (every line must be one JSON object)."""
    out = []
    for line in data.split(b"\n"):
        if line:
            obj = msgspec.json.decode(line)
            assert isinstance(obj, dict), line
            out.append(obj)
    return out


class ServeProcess:
    """``statecast serve`` in a directory of its own (where its default store lives)."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        if "--http-port" not in args:
            args = ("--http-port", "off", *args)  # off, unless a test asks for it
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
            m = re.search(r"listening on (?:tcp|tls)://[^:]+:(\d+)", line)
            if m:
                # Keep reading its output, so that the pipe never fills and blocks it.
                self._reader = threading.Thread(target=self._drain, daemon=True)
                self._reader.start()
                return int(m.group(1))
        self.p.kill()
        out, _ = self.p.communicate()
        raise AssertionError("server did not start:\n" + "".join(self.lines) + out)

    def _drain(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send ``sig``, wait for the exit; the exit status and everything it printed."""
        if self.p.poll() is None:
            self.p.send_signal(sig)
        self.p.wait(TIMEOUT * 3)
        self._reader.join(TIMEOUT)
        assert self.p.stdout is not None
        self.p.stdout.close()
        return self.p.returncode, "".join(self.lines)


class FakeSubscriber:
    """A fanout.Subscriber that keeps what it is given."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def deliver(self, blob: bytes) -> None:
        self.blobs.append(blob)

    def frames(self) -> list[Frame]:
        return frames_of(b"".join(self.blobs))


class LineClient:
    """A blocking NDJSON client over a real socket, for integration tests."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((host, port))
        self._buf = b""
        self.hello = self.read()
        assert self.hello["type"] == "hello", self.hello

    def send(self, request: Frame | bytes | str) -> None:
        if isinstance(request, dict):
            data = msgspec.json.encode(request) + b"\n"
        elif isinstance(request, str):
            data = request.encode()
        else:
            data = request
        self.sock.sendall(data)

    def read(self) -> Frame:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("connection closed by the server")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj = msgspec.json.decode(line)
        assert isinstance(obj, dict)
        return obj

    def read_until(self, ftype: str) -> list[Frame]:
        """Frames up to and including the first of type ``ftype``."""
        out = []
        while True:
            f = self.read()
            out.append(f)
            if f["type"] == ftype:
                return out

    def request(self, request: Frame) -> Frame:
        self.send(request)
        return self.read()

    def read_all(self) -> bytes:
        """Everything until the server closes the connection."""
        chunks = [self._buf]
        self._buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    """A TCP port free on loopback now (for servers that must come back on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll until ``predicate()`` is true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
