"""The in-memory store: a batch is committed the moment it is submitted."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from statecast.core.changelog import ChangeLog
from statecast.core.dedupe import KeyRecord
from statecast.core.protocol import Conditions, PreparedChange
from statecast.core.state import State, encode_batch
from statecast.core.store import Committed, Install, KeyStamp, Position, ToLoop, new_epoch

__all__ = ["MemoryStore"]


class MemoryStore:
    """State and log in memory only. A new process is a new history: a new epoch."""

    description = "memory"
    commits_at_once = True
    decides_at_commit = False

    def __init__(self, retain: int) -> None:
        self.retain = retain
        self.state = State()
        self.log = ChangeLog(retain)
        self.epoch = new_epoch()
        self.positions: dict[str, str] = {}  # SourceStore: nothing survives the process

    ready = True  # everything it holds is loaded by open()

    def start(self, install: Install) -> None:
        pass  # every batch is committed through submit()

    def open(self, to_loop: ToLoop) -> None:
        pass

    def submit(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        key: KeyStamp | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        # (The engine remembers the key; nothing outlives the process here.)
        done(encode_batch(batch, self.state.seq + 1), None)

    def idempotency_keys(self) -> list[KeyRecord]:
        return []

    def submit_source(
        self, batch: Sequence[PreparedChange], done: Committed, position: Position
    ) -> None:
        records = encode_batch(batch, self.state.seq + 1)
        self.positions[position[0]] = position[1]
        done(records, None)

    def reset(self) -> None:
        self.state = State()
        self.log = ChangeLog(self.retain)
        self.epoch = new_epoch()
        self.positions = {}

    def flush(self, done: Callable[[], None]) -> None:
        done()

    def close(self) -> None:
        pass
