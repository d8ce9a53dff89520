"""The store interface: where the state, the change log and the epoch live (§2).

A store owns a :class:`~statecast.core.state.State` and a
:class:`~statecast.core.changelog.ChangeLog` in memory, which serve every read, and decides
when a published batch becomes part of them: at once for the memory store, once it is
committed to disk for the SQLite store. Every store implements :class:`Store`;
``statecast.stores`` holds the implementations and picks one from a config.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from statecast.core.changelog import ChangeLog
from statecast.core.dedupe import KeyRecord
from statecast.core.protocol import Conditions, PreparedChange
from statecast.core.state import Record, State
from statecast.errors import ProtocolError

__all__ = [
    "AlreadyApplied",
    "Committed",
    "Install",
    "KeyStamp",
    "Position",
    "SourceStore",
    "Store",
    "ToLoop",
    "new_epoch",
]

# Called on the loop thread, in publish order, once a batch is committed (records,
# None) or has failed (None, error).
Committed = Callable[[list[Record] | None, ProtocolError | None], None]
# Runs a callable on the loop thread, from any thread (loop.call_soon_threadsafe).
ToLoop = Callable[[Callable[[], None]], object]
# Where a source of changes (a PostgreSQL database, docs/postgres.md) was when a batch
# was taken from it: (the source's name, its position as opaque text), committed in the
# same transaction as the batch, so that after a restart the source resumes exactly
# after the last batch the store holds.
Position: TypeAlias = tuple[str, str]
# Installs a batch that was committed without a submit of this process (another node
# of a cluster wrote it, §5.3 still holds: whole batches, in seq order). Loop thread.
Install = Callable[[list[Record]], None]
# A publish's idempotency key (§3.3) and when it was submitted (seconds since the
# epoch): a durable store commits it with the batch, with the batch's last seq.
KeyStamp: TypeAlias = tuple[str, float]


class AlreadyApplied(ProtocolError):
    """A store's answer to a batch whose idempotency key it has committed before
    (§3.3.1): ``seq`` is that batch's last seq. Never sent: the engine answers the
    publish with a duplicate ack."""

    def __init__(self, seq: int) -> None:
        super().__init__(f"already applied at seq {seq}")
        self.seq = seq


def new_epoch() -> str:
    return uuid.uuid4().hex[:16]


class Store(Protocol):
    state: State
    log: ChangeLog
    epoch: str
    description: str  # for people: "memory", "sqlite:/var/lib/statecast/statecast.db"
    # Whether submit() calls ``done`` before it returns (the memory store): then no
    # batch is ever waiting for its commit, which the engine's preconditions rely on.
    commits_at_once: bool
    # Whether the store decides §3.3 idempotency keys and if_seq conditions itself, at
    # its commit point (a cluster store: the batches of other nodes are committed
    # beside this one's, so the engine's state may be behind). Otherwise the engine
    # decides them, against the state every batch is committed after.
    decides_at_commit: bool

    @property
    def ready(self) -> bool:
        """Caught up with what the store holds (``/readyz``); a store that follows
        others (a cluster) is not ready until it has caught up with them."""

    def open(self, to_loop: ToLoop) -> None:
        """Load what the store holds. Called once, in a worker thread, before serving."""

    def start(self, install: Install) -> None:
        """Begin serving (loop thread, once the engine exists). A store whose batches
        may be committed elsewhere hands them to ``install``, in seq order; the others
        never call it."""

    def submit(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        key: KeyStamp | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        """Commit one validated batch (loop thread). ``done`` is called on the loop
        thread, in submission order; the caller then installs the records. ``key``
        (§3.3) is committed with the batch: both or neither. A store that
        ``decides_at_commit`` checks the key and the ``conditions`` there, and answers
        ``done(None, AlreadyApplied(seq))`` or ``done(None, Conflict(...))``; the others
        ignore ``conditions`` (the engine has decided them)."""

    def idempotency_keys(self) -> list[KeyRecord]:
        """The idempotency keys committed with batches and kept (oldest first), loaded
        by ``open()``; the engine remembers them (core/dedupe.py)."""

    def flush(self, done: Callable[[], None]) -> None:
        """Call ``done`` on the loop thread once every batch submitted so far is done."""

    def close(self) -> None:
        """Finish pending work and release the store (from any thread but the loop's)."""


@runtime_checkable
class SourceStore(Store, Protocol):
    """A store that can follow a source (``--source``, docs/postgres.md): it commits a
    source's position together with the batch taken from it, and can start over."""

    positions: dict[str, str]
    """Source name -> the position committed with the last batch that carried one.
    Loaded by ``open()``; kept current on the loop thread as batches commit."""

    def submit_source(
        self, batch: Sequence[PreparedChange], done: Committed, position: Position
    ) -> None:
        """As :meth:`Store.submit` (same queue, same order), and ``positions[name] =
        text`` is committed in the same transaction as the batch: both or neither.
        ``batch`` may be empty: then only the position is committed, and ``done`` gets
        an empty list (no seq is used)."""

    def reset(self) -> None:
        """Start over: no records, an empty log, seq 0, a new epoch, no positions, all
        committed. Called in a worker thread after ``open()`` and before ``start()``,
        never while serving (the server does it when a source must be reloaded)."""
