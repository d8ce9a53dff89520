"""Stores: where the state and the change log live (docs/protocol.md §2 for epochs).

A store owns a :class:`~statecast.state.State`, a :class:`~statecast.changelog.ChangeLog`
and the epoch that names their history. The in-memory store is the reference; durable
stores (SQLite, JetStream) implement the same small interface.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from statecast.changelog import ChangeLog
from statecast.protocol import PreparedChange
from statecast.state import Record, State

__all__ = ["MemoryStore", "Store", "new_epoch"]


def new_epoch() -> str:
    return uuid.uuid4().hex[:16]


class Store(Protocol):
    state: State
    log: ChangeLog
    epoch: str

    def apply(self, batch: Sequence[PreparedChange]) -> list[Record]:
        """Apply one validated batch atomically; return its records in seq order."""

    def close(self) -> None: ...


class MemoryStore:
    """State and log in memory. A new process is a new history: a new epoch."""

    def __init__(self, retain: int) -> None:
        self.state = State()
        self.log = ChangeLog(retain)
        self.epoch = new_epoch()

    def apply(self, batch: Sequence[PreparedChange]) -> list[Record]:
        records = self.state.apply(batch)
        self.log.extend(records)
        return records

    def close(self) -> None:
        pass
