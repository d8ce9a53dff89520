"""A real ``nats-server`` with JetStream for tests: on a free loopback port, with its own
store directory, that can be stopped, killed and started again on the same port and
directory. Never the machine's shared server on 4222.

Also :class:`BlockingProxy`, a TCP proxy that can cut one node off NATS (and let it
back) while the other nodes keep their connections.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import TIMEOUT, free_port
from tests.proxy import CuttingProxy

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
)


def require_nats_server() -> str:
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed (Debian: apt-get install nats-server)")
    return NATS_SERVER


class NatsServer:
    """``nats-server -js -sd DIR -p PORT -a 127.0.0.1``; ``start()`` again after
    ``stop()`` or ``kill()`` reuses the port and the store directory."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        extra: list[str] | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.exe = require_nats_server()
        self.store_dir = store_dir
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = store_dir / f"nats-server-{self.port}.log"
        self.starts = 0
        self.start(wait_ready)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "-js",
                    "-sd",
                    str(self.store_dir),
                    "-p",
                    str(self.port),
                    "-a",
                    "127.0.0.1",
                    *self.extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until it accepts connections and says it is ready (a clustered server says so
        once it has found its routes)."""
        assert self.proc is not None
        deadline = time.monotonic() + TIMEOUT * 3
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.02)
                continue
            if self.log_path.read_text(errors="replace").count("Server is ready") >= self.starts:
                return
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"nats-server did not start:\n{self.log_path.read_text()[-3000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """A clean stop (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: whatever JetStream had not written is lost, like a crash."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(TIMEOUT * 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)

    def close(self) -> None:
        self.kill()


class BlockingProxy(CuttingProxy):
    """A proxy in front of a NATS server: ``block()`` cuts a node off NATS."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class NatsCluster:
    """Three ``nats-server``s in one JetStream cluster (streams can have 3 replicas)."""

    def __init__(self, base: Path, size: int = 3) -> None:
        ports = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        self.servers: list[NatsServer] = []
        try:
            for i in range(size):
                others = ",".join(f"nats://127.0.0.1:{r}" for j, r in enumerate(routes) if j != i)
                self.servers.append(
                    NatsServer(
                        base / f"n{i + 1}",
                        port=ports[i],
                        wait_ready=False,
                        extra=[
                            "--server_name",
                            f"n{i + 1}",
                            "--cluster_name",
                            "statecast-test",
                            "--cluster",
                            f"nats://127.0.0.1:{routes[i]}",
                            "--routes",
                            others,
                        ],
                    )
                )
            for srv in self.servers:
                srv.wait_ready()
            deadline = time.monotonic() + TIMEOUT * 3
            while not any(
                "metadata leader" in srv.log_path.read_text(errors="replace")
                for srv in self.servers
            ):
                assert time.monotonic() < deadline, "the JetStream cluster elected no leader"
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    def by_name(self, name: str) -> NatsServer:
        return self.servers[int(name.removeprefix("n")) - 1]

    def close(self) -> None:
        for srv in self.servers:
            srv.close()
