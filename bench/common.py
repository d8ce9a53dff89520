"""Shared pieces of the benchmarks: servers in subprocesses, counting clients."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

import msgspec

from statecast.loops import new_event_loop


def new_loop() -> asyncio.AbstractEventLoop:
    return new_event_loop("auto")


def loop_name() -> str:
    try:
        return f"uvloop {version('uvloop')}"
    except PackageNotFoundError:
        return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                cpu = m.group(1).strip()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, "
        f"{loop_name()}"
    )


class StatecastProcess:
    """``statecast serve`` on a free port, in its own process; the memory store unless
    ``args`` name another."""

    def __init__(self, *args: str, http_port: int | None = None) -> None:
        self.port = free_port()
        if "--store" not in args:
            args = ("--store", "memory", *args)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "statecast",
                "serve",
                "--port",
                str(self.port),
                "--http-port",
                "off" if http_port is None else str(http_port),
                "--heartbeat",
                "0",
                "--log-level",
                "warning",
                *args,
            ],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if http_port:
                    socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("statecast did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class RedisProcess:
    """Debian's redis-server on a free port, persistence off."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--client-output-buffer-limit",
                "pubsub",
                "0",
                "0",
                "0",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples a process's resident memory every few milliseconds."""

    def __init__(self, pid: int, every: float = 0.005) -> None:
        self.pid = pid
        self.every = every
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


class Counter(asyncio.Protocol):
    """Counts occurrences of a marker in a byte stream, across chunk boundaries."""

    def __init__(self, marker: bytes, on_count: Callable[[Counter], None] | None = None) -> None:
        self.marker = marker
        self.count = 0
        self.bytes = 0
        self._tail = b""
        self.transport: asyncio.Transport | None = None
        self.on_count = on_count
        self.target = -1
        self.any_byte = False  # done at the first byte, whatever the count
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if len(self.marker) == 1:
            self.count += data.count(self.marker)
        else:
            buf = self._tail + data
            self.count += buf.count(self.marker)
            self._tail = buf[-(len(self.marker) - 1) :]
        done = self.done
        if (
            done is not None
            and not done.done()
            and (self.any_byte or self.count >= self.target >= 0)
        ):
            done.set_result(None)


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def print_result(name: str, result: dict[str, Any], out: IO[str] = sys.stdout) -> None:
    print(f"== {name}", file=out)
    for k, v in result.items():
        if isinstance(v, float):
            shown = f"{v:,.2f}" if v < 1000 else f"{v:,.0f}"
        elif isinstance(v, int):
            shown = f"{v:,}"
        else:
            shown = str(v)
        print(f"   {k:<34} {shown}", file=out)
    out.flush()
