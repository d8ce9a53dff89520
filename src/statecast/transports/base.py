"""What a transport is handed, and what it hands back (the seams of docs/architecture.md).

A transport (TCP, WebSocket, HTTP) sees the server only through :class:`Host`: the
settings, a coarse clock, the engine, a way to make a connection's
:class:`~statecast.core.session.Session`, and the :class:`Connections` registry. It
never sees the ``Server`` class, and the server sees a transport's connections only
through :class:`Connection`. (uvicorn hands its protocols a small ``ServerState`` for
the same reason.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from statecast.config import Config
from statecast.core.engine import Engine
from statecast.core.fanout import Subscriber
from statecast.core.policy import Grant
from statecast.core.protocol import Prepared, PreparedChange
from statecast.core.session import Authenticator, Limits, Session
from statecast.errors import ProtocolError

__all__ = ["Connection", "Connections", "Host"]


class Connection(Protocol):
    """What the server needs of a connection, whatever its transport."""

    transport_name: str
    last_send: float

    @property
    def session(self) -> Session | None: ...

    def send_heartbeat(self) -> None: ...
    def stop_reading(self) -> None: ...
    def restore_if_drained(self) -> None: ...
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...
    def pending_bytes(self) -> int: ...


class Connections:
    """The open connections of every transport, and the counters about them.

    Each counter has one name, used by ``stats`` (§3.5) and ``/metrics`` alike.
    """

    def __init__(self) -> None:
        self._open: dict[Connection, None] = {}
        self._idle = asyncio.Event()  # set while there is no connection
        self._idle.set()
        self.accepted = 0  # connections_accepted
        self.slow_consumer_disconnects = 0
        self.refused = 0  # beyond max_connections

    def add(self, conn: Connection) -> None:
        self._open[conn] = None
        self.accepted += 1
        self._idle.clear()

    def discard(self, conn: Connection) -> None:
        self._open.pop(conn, None)
        if not self._open:
            self._idle.set()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._open))  # a copy: callers may close connections

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Host(Protocol):
    """The server, as its transports and its metrics see it."""

    @property
    def config(self) -> Config: ...
    @property
    def clock(self) -> float:
        """Loop time, refreshed about every second (cheap to read per write)."""

    @property
    def stopping(self) -> bool: ...
    @property
    def ready(self) -> bool:
        """Serving: the store is loaded, and the server is not stopping."""

    @property
    def engine(self) -> Engine:
        """The engine (raises ``ServerStateError`` before the store is loaded)."""

    def source_status(self) -> dict[str, Any] | None:
        """What the PostgreSQL source is doing (None without one; docs/postgres.md)."""

    @property
    def connections(self) -> Connections: ...

    @property
    def verifier(self) -> Authenticator | None:
        """Checks access tokens (None: no auth configured, §3.8)."""

    @property
    def limits(self) -> Limits: ...

    def new_session(
        self, subscriber: Subscriber, *, wakeup: Callable[[], None], grant: Grant | None = None
    ) -> Session:
        """The protocol state of a new connection, whatever its transport; ``grant`` if
        the transport authenticated it already."""

    def on_engine(self, callback: Callable[[Engine], object]) -> None:
        """Call ``callback(engine)`` once the engine exists (now, if it does)."""

    async def apublish_prepared(
        self, batch: list[PreparedChange] | Prepared
    ) -> int | ProtocolError:
        """Publish a validated batch on the loop; the seq (a ``Duplicate`` for a key
        seen before, §3.3), or the error (not raised)."""
