"""Stores: where the state, the change log and the epoch live (docs/protocol.md §2).

A store owns a :class:`~statecast.state.State` and a
:class:`~statecast.changelog.ChangeLog` in memory, which serve every read, and decides
when a published batch becomes part of them: at once for the memory store, once it is
committed to disk for the SQLite store. Every store implements :class:`Store`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from statecast.changelog import ChangeLog
from statecast.config import Config
from statecast.errors import ConfigError, ProtocolError
from statecast.protocol import PreparedChange
from statecast.state import Record, State

__all__ = ["Committed", "Store", "new_epoch", "open_store"]

# Called on the loop thread, in publish order, once a batch is committed (records,
# None) or has failed (None, error).
Committed = Callable[[list[Record] | None, ProtocolError | None], None]
# Runs a callable on the loop thread, from any thread (loop.call_soon_threadsafe).
ToLoop = Callable[[Callable[[], None]], object]


def new_epoch() -> str:
    return uuid.uuid4().hex[:16]


class Store(Protocol):
    state: State
    log: ChangeLog
    epoch: str
    description: str  # for people: "memory", "sqlite:/var/lib/statecast/statecast.db"

    def open(self, to_loop: ToLoop) -> None:
        """Load what the store holds. Called once, in a worker thread, before serving."""

    def submit(self, batch: Sequence[PreparedChange], done: Committed) -> None:
        """Commit one validated batch (loop thread). ``done`` is called on the loop
        thread, in submission order; the caller then installs the records."""

    def flush(self, done: Callable[[], None]) -> None:
        """Call ``done`` on the loop thread once every batch submitted so far is done."""

    def close(self) -> None:
        """Finish pending work and release the store (from any thread but the loop's)."""


def open_store(config: Config) -> Store:
    """The store a config names: ``memory``, ``sqlite`` or ``sqlite:PATH``."""
    from statecast.stores.memory import MemoryStore  # noqa: PLC0415 (import cycle)
    from statecast.stores.sqlite import SQLiteStore  # noqa: PLC0415

    spec = config.store
    if spec == "memory":
        return MemoryStore(config.retain)
    if spec == "sqlite" or spec.startswith("sqlite:"):
        path = spec.removeprefix("sqlite").removeprefix(":")
        db = Path(path) if path else Path(config.data_dir) / "statecast.db"
        return SQLiteStore(
            db,
            retain=config.retain,
            synchronous=config.sqlite_synchronous,
            busy_timeout=config.sqlite_busy_timeout,
        )
    raise ConfigError(f"unknown store {spec!r}: use 'memory', 'sqlite' or 'sqlite:PATH'")
