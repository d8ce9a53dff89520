"""A private, throw-away PostgreSQL server for tests: ``PgServer``.

Usage::

    with PgServer() as pg:                 # initdb + start; skips the test if no PostgreSQL
        conn = pg.connect()                # psycopg2, autocommit
        pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
        repl = pg.connect(replication=True)  # a LogicalReplicationConnection
        pg.kill()                          # SIGKILL the postmaster (a crash)
        pg.start()                         # crash recovery, same port, same data
    # stopped, and its directory removed

What it sets up:

* ``initdb`` in a fresh temporary directory (data, unix socket and log all inside it);
  as root, every server program runs as the ``postgres`` OS user (``runuser``), and the
  directory is handed to that user.
* A free TCP port (never 5432, the machine's shared server), listening on ``127.0.0.1`` only,
  kept across ``stop()``/``start()``/``kill()``.
* ``trust`` authentication for local and ``127.0.0.1`` connections, ``replication`` included.
* ``wal_level=logical``, ``max_replication_slots=10``, ``max_wal_senders=10``; ``fsync=off``
  (a SIGKILLed postmaster loses nothing the OS has; only an OS crash would) plus any
  ``settings=`` the caller adds (``{"timezone": "Asia/Kolkata", "max_connections": 50}``:
  plain values, quoted for postgresql.conf here).

Binaries are found on ``PATH`` or in ``/usr/lib/postgresql/<version>/bin`` (newest first), or
in ``$STATECAST_PG_BIN``.  If none are found, or as root without a ``postgres`` user, the
calling test is skipped (``pytest.skip``) with the reason.  Every wait is bounded
(``startup_timeout``); a failed start raises ``PgServerError`` carrying the server log.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import psycopg2.extensions

__all__ = ["PgServer", "PgServerError", "find_bin_dir"]

_REQUIRED = ("initdb", "pg_ctl", "postgres")
_SHARED_PORT = 5432
_DEFAULT_TIMEOUT = float(os.environ.get("STATECAST_TEST_TIMEOUT", "10")) * 3


class PgServerError(RuntimeError):
    """The private server failed to initialise, start or stop (the message has the log tail)."""


def _has_all(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in _REQUIRED)


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``.

    Looks at ``$STATECAST_PG_BIN``, then ``PATH`` (resolving symlinks, as Debian's
    ``/usr/bin`` wrappers and ``/usr/local/bin`` links point into the real directory), then
    ``/usr/lib/postgresql/*/bin`` newest version first.
    """
    candidates: list[Path] = []
    if env := os.environ.get("STATECAST_PG_BIN"):
        candidates.append(Path(env))
    for name in ("initdb", "pg_ctl"):
        if found := shutil.which(name):
            candidates.append(Path(found).resolve().parent)
            candidates.append(Path(found).parent)
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        candidates.append(Path(found))
    for candidate in candidates:
        if _has_all(candidate):
            return candidate
    return None


def _free_port() -> int:
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != _SHARED_PORT:
            return port
    raise PgServerError("no free TCP port on 127.0.0.1")


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # Field 3 (after the parenthesised command name, which may hold spaces) is the state.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def _conf_value(value: str | int) -> str:
    """A postgresql.conf value: numbers as they are, strings quoted (any setting takes quotes)."""
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _emergency_stop(pg_ctl: list[str], data_dir: str, root: str) -> None:
    """Finaliser: the owner forgot ``close()`` (or the interpreter is exiting)."""
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        subprocess.run(
            [*pg_ctl, "stop", "-D", data_dir, "-m", "immediate", "-w", "-t", "10"],
            capture_output=True,
            check=False,
            timeout=30,
        )
    shutil.rmtree(root, ignore_errors=True)


class PgServer:
    """A private PostgreSQL server in a temporary directory (see the module docstring).

    Construction does nothing but locate the binaries (skipping the test if absent);
    ``start()`` (or entering the ``with`` block) runs ``initdb`` the first time, then starts
    and waits until the server accepts connections.  ``close()`` (or leaving the block)
    stops it and removes the directory.

    Attributes: ``port``, ``host`` (``127.0.0.1``), ``user`` (``postgres``), ``dbname``,
    ``root`` (the temporary directory), ``data_dir``, ``socket_dir``, ``log_path``,
    ``bin_dir``.
    """

    host = "127.0.0.1"
    user = "postgres"

    def __init__(
        self,
        *,
        settings: Mapping[str, str | int] | None = None,
        dbname: str = "postgres",
        startup_timeout: float = _DEFAULT_TIMEOUT,
        bin_dir: str | Path | None = None,
    ) -> None:
        found = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        if found is None or not _has_all(found):
            pytest.skip(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, in "
                "/usr/lib/postgresql/*/bin or in $STATECAST_PG_BIN"
            )
        self.bin_dir: Path = found
        self._as_root = os.geteuid() == 0
        self._owner: pwd.struct_passwd | None = None
        if self._as_root:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' OS user to run initdb")
            if shutil.which("runuser") is None:
                pytest.skip("running as root and 'runuser' is not available")
        self.dbname = dbname
        self.startup_timeout = startup_timeout
        self.settings: dict[str, str | int] = {
            "listen_addresses": "127.0.0.1",
            "wal_level": "logical",
            "max_replication_slots": 10,
            "max_wal_senders": 10,
            "fsync": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        self.settings.update(settings or {})
        self.port = _free_port()
        self.root: Path | None = None
        self._initialised = False
        self._finalizer: weakref.finalize[Any, PgServer] | None = None

    # -- paths and addresses --------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root() / "sock"

    @property
    def log_path(self) -> Path:
        return self._root() / "server.log"

    @property
    def dsn(self) -> str:
        """A libpq keyword DSN: ``host=127.0.0.1 port=N user=postgres dbname=postgres``."""
        return f"host={self.host} port={self.port} user={self.user} dbname={self.dbname}"

    @property
    def url(self) -> str:
        """A libpq URL: ``postgresql://postgres@127.0.0.1:N/postgres``."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while ``postmaster.pid`` exists, else ``None``."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (OSError, PgServerError):
            return None
        return int(first) if first.strip().isdigit() else None

    def is_running(self) -> bool:
        pid = self.pid
        return pid is not None and _pid_alive(pid)

    def log(self, tail: int = 60) -> str:
        """The last ``tail`` lines of the server log (for failure messages)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, PgServerError):
            return "(no server log)"
        return "\n".join(lines[-tail:])

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> PgServer:
        """Initialise on first use, start, and wait until connections are accepted."""
        if self.root is None:
            self._make_root()
        if not self._initialised:
            self._initdb()
        if self.is_running():
            return self
        for attempt in range(3):
            self._write_settings()
            result = self._run(
                [
                    self._bin("pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(max(1, round(self.startup_timeout))),
                ],
                timeout=self.startup_timeout + 10,
            )
            if result.returncode == 0:
                self._wait_ready()
                return self
            log = self.log()
            if attempt < 2 and "Address already in use" in log:
                self.port = _free_port()  # lost a race for the port: take another
                continue
            raise PgServerError(
                f"pg_ctl start failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"--- server log ---\n{log}"
            )
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m fast``); falls back to ``kill()`` if that fails."""
        if self.root is None or not self.is_running():
            return
        result = self._run(
            [
                self._bin("pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(max(1, round(self.startup_timeout))),
            ],
            timeout=self.startup_timeout + 10,
        )
        if result.returncode != 0 and self.is_running():
            self.kill()

    def restart(self) -> PgServer:
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would, and wait until its processes are gone.

        The backends notice the postmaster's death and exit; any still alive after the
        timeout are SIGKILLed too, so that ``start()`` (crash recovery) can follow at once.
        The stale lock files stay, as after a real crash, unless the dead postmaster lingers as
        an unreaped zombie (which PostgreSQL would take for a live one): then they are removed.
        """
        pid = self.pid
        if pid is None or not _pid_alive(pid):
            return
        children = _children_of(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._wait_dead([pid, *children], self.startup_timeout):
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            if not self._wait_dead([pid, *children], self.startup_timeout):
                raise PgServerError(f"postmaster {pid} or its children survived SIGKILL")
        # Dead; give its parent (usually init) a moment to reap it.
        deadline = time.monotonic() + 0.5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if Path(f"/proc/{pid}").exists():
            # An unreaped zombie: PostgreSQL's lock files name its pid, and kill(pid, 0) would
            # say it lives.  It is dead, so its locks are stale.
            for lock in (
                self.data_dir / "postmaster.pid",
                self.socket_dir / f".s.PGSQL.{self.port}.lock",
            ):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()

    @staticmethod
    def _wait_dead(pids: Sequence[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(_pid_alive(p) for p in pids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Stop the server (if running) and remove its directory."""
        if self.root is None:
            return
        try:
            self.stop()
        finally:
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self._initialised = False

    def __enter__(self) -> PgServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- clients ----------------------------------------------------------------------------

    def connect(
        self, *, replication: bool = False, autocommit: bool = True, **kwargs: Any
    ) -> psycopg2.extensions.connection:
        """A psycopg2 connection (``replication=True``: a ``LogicalReplicationConnection``).

        Extra keyword arguments go to ``psycopg2.connect`` (e.g. ``options="-c TimeZone=UTC"``).
        """
        import psycopg2  # noqa: PLC0415  (only the tests that connect need it)
        import psycopg2.extras  # noqa: PLC0415

        kwargs.setdefault("connect_timeout", max(1, round(self.startup_timeout)))
        if replication:
            kwargs["connection_factory"] = psycopg2.extras.LogicalReplicationConnection
        conn: psycopg2.extensions.connection = psycopg2.connect(self.dsn, **kwargs)
        if not replication:
            conn.autocommit = autocommit
        return conn

    def execute(self, *statements: str) -> None:
        """Run each SQL statement in its own autocommit transaction on a fresh connection."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    # -- internals --------------------------------------------------------------------------

    def _root(self) -> Path:
        if self.root is None:
            raise PgServerError("the server has no directory: call start() first")
        return self.root

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _as_owner(self, argv: Sequence[str]) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def _run(self, argv: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        try:
            return subprocess.run(
                self._as_owner(argv),
                capture_output=True,
                text=True,
                check=False,
                timeout=timeout,
                env=env,
                cwd=str(self._root()),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise PgServerError(
                f"{argv[0]} timed out after {timeout}s\n--- server log ---\n{self.log()}"
            ) from exc

    def _make_root(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="statecast-pg-"))
        self.root = root
        (root / "sock").mkdir()
        if self._owner is not None:
            for path in (root, root / "sock"):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        self._finalizer = weakref.finalize(
            self,
            _emergency_stop,
            self._as_owner([self._bin("pg_ctl")]),
            str(root / "data"),
            str(root),
        )

    def _initdb(self) -> None:
        result = self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=max(60.0, self.startup_timeout * 2),
        )
        if result.returncode != 0:
            raise PgServerError(f"initdb failed ({result.returncode}):\n{result.stderr}")
        (self.data_dir / "pg_hba.conf").write_text(
            "# written by tests/sources/pgserver.py: trust, local and 127.0.0.1 only\n"
            "local all         all              trust\n"
            "local replication all              trust\n"
            "host  all         all 127.0.0.1/32 trust\n"
            "host  replication all 127.0.0.1/32 trust\n"
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'statecast_test.conf'\n")
        self._initialised = True

    def _write_settings(self) -> None:
        settings = {
            **self.settings,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
        }
        path = self.data_dir / "statecast_test.conf"
        path.write_text(
            "".join(f"{key} = {_conf_value(value)}\n" for key, value in settings.items())
        )
        if self._owner is not None:
            for owned in (path, self.data_dir / "pg_hba.conf"):
                os.chown(owned, self._owner.pw_uid, self._owner.pw_gid)

    def _wait_ready(self) -> None:
        """Bounded wait until a TCP connection to 127.0.0.1:port is accepted by PostgreSQL."""
        isready = self.bin_dir / "pg_isready"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if os.access(isready, os.X_OK):
                result = subprocess.run(
                    [
                        str(isready),
                        *("-h", self.host, "-p", str(self.port)),
                        *("-U", self.user, "-d", self.dbname, "-t", "2"),
                    ],
                    capture_output=True,
                    check=False,
                    timeout=10,
                )
                if result.returncode == 0:
                    return
            else:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self.host, self.port), timeout=2),
                ):
                    return
            if time.monotonic() > deadline:
                raise PgServerError(
                    f"server on port {self.port} not ready after {self.startup_timeout}s\n"
                    f"--- server log ---\n{self.log()}"
                )
            time.sleep(0.05)
