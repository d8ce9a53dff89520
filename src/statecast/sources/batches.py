"""A source's batches, and how they are applied on the loop thread.

The source thread turns each PostgreSQL transaction into one :class:`SourceBatch` and hands it
to the loop through the server's publish inbox; :class:`Applier` (loop thread) publishes them
through the engine, in order, each with the source position committed with it.

Most batches are ready as they are. Two kinds of change need the current state, which only the
loop thread may read:

* an UPDATE whose new row leaves out an unchanged TOASTed column (pgoutput's ``'u'``): the
  column keeps its previous value, taken from the state (:class:`Patch`);
* a TRUNCATE: a delete of every key the table's collection holds (:class:`Truncate`).

Such a batch carries ``ops`` (in transaction order) instead of changes. The applier resolves
it once every earlier batch of the source is installed (a durable store commits batches in
groups, so the state may not show them yet), against the state and the batch's own earlier
changes, and submits the result.

An unchanged column whose value the state does not hold is never written as ``null``
(docs/postgres.md, "Unchanged TOASTed columns"): a row statecast does not hold (it was left
out) stays left out; a record that lacks the column fails the batch with
:class:`SourceFailed`, and the applier then refuses every later batch, so that nothing is
committed past it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import msgspec

from statecast.core.engine import Engine
from statecast.core.protocol import PreparedChange
from statecast.core.state import State
from statecast.core.store import Position
from statecast.errors import ProtocolError, ShuttingDown, StatecastError
from statecast.sources.pgmap import RowError, Shape

__all__ = ["Applier", "Op", "Patch", "SourceBatch", "SourceFailed", "Truncate", "resolve"]

log = logging.getLogger("statecast.sources")

_encode = msgspec.json.encode


class SourceFailed(StatecastError):
    """The source cannot go on (its slot is gone, a table changed its key or was created
    again, a value it must keep is not known): only a reload is exact."""


@dataclass(slots=True)
class Patch:
    """An upsert whose columns ``known`` lacks keep their previous values; with
    ``old_key`` (the primary key changed), those of ``old_key``, which is deleted first."""

    shape: Shape
    key: str
    known: dict[str, object]
    old_key: str | None = None


@dataclass(slots=True)
class Truncate:
    """Delete every key of a collection."""

    collection: str
    label: str  # 'the table public.orders', for messages


Op: TypeAlias = PreparedChange | Patch | Truncate


class SourceBatch(list[PreparedChange]):
    """One transaction of a source (or a part of its initial load): the changes, in
    order, as a list (what the inbox carries); the source ``position`` to commit with it;
    the ``lsn`` to confirm to the source once committed (0: none); and, when some of it
    needs the state (see the module docstring), ``ops`` instead of changes."""

    __slots__ = ("lsn", "ops", "position", "rows")

    def __init__(
        self,
        changes: list[PreparedChange] | None = None,
        *,
        position: Position | None = None,
        lsn: int = 0,
        ops: list[Op] | None = None,
    ) -> None:
        super().__init__(changes or ())
        self.position = position
        self.lsn = lsn
        self.ops = ops
        self.rows = len(ops) if ops is not None else len(self)


def resolve(ops: list[Op], state: State) -> list[PreparedChange]:
    """The changes of a batch with ``ops``, against ``state`` (loop thread; every earlier
    batch of the source installed)."""
    out: list[PreparedChange] = []
    # What this batch has done so far, by (collection, key): the value or None (deleted).
    overlay: dict[tuple[str, str], bytes | None] = {}
    for op in ops:
        if isinstance(op, tuple):
            out.append(op)
            overlay[(op[0], op[1])] = op[3]
        elif isinstance(op, Patch):
            shape = op.shape
            where = (shape.collection, op.key)
            source = where if op.old_key is None else (shape.collection, op.old_key)
            if source in overlay:
                before = overlay[source]
            else:
                record = state.get(*source)
                before = record.value_json() if record is not None else None
            previous = None if before is None else msgspec.json.decode(before)
            try:
                raw, missing = shape.complete(op.known, previous)
            except RowError as exc:
                log.error("%s, key %r: skipped: %s", shape.label, op.key, exc)
                continue
            if missing and before is None:
                log.error(
                    "%s, key %r: left out: statecast does not hold this row (it was left "
                    "out before), so it does not know the value of its unchanged column(s) %s",
                    shape.label,
                    op.key,
                    ", ".join(missing),
                )
                continue
            if missing:
                raise SourceFailed(
                    f"{shape.label}, key {op.key!r}: the value of the unchanged column(s) "
                    f"{', '.join(missing)} is not known (its record has no such column: "
                    "renamed while statecast was away, or the table was rewritten)"
                )
            if op.old_key is not None:
                out.append((shape.collection, op.old_key, _encode(op.old_key), None))
                overlay[source] = None
            out.append((shape.collection, op.key, _encode(op.key), raw))
            overlay[where] = raw
        else:
            name = op.collection
            keys: dict[str, None] = {}
            coll = state.collections.get(name)
            if coll is not None:
                keys = dict.fromkeys(record.key for record in coll.records())
            for (c, key), value in overlay.items():
                if c != name:
                    continue
                if value is None:
                    keys.pop(key, None)
                else:
                    keys[key] = None
            for key in keys:
                out.append((name, key, _encode(key), None))
                overlay[(name, key)] = None
    return out


@dataclass(slots=True)
class _Pending:
    batch: SourceBatch
    future: concurrent.futures.Future[int]


@dataclass
class Applier:
    """Publishes a source's batches through the engine, in order (loop thread).

    ``take`` is the handler of the source's inbox. A batch with ``ops`` waits until no
    earlier batch is in flight, then is resolved against the state; batches behind it wait
    too, so that seqs follow the source's commit order.
    """

    engine: Engine
    queue: collections.deque[_Pending] = field(default_factory=collections.deque)
    in_flight: int = 0
    closed: bool = False
    _pumping: bool = False

    def take(
        self, items: list[tuple[list[PreparedChange], concurrent.futures.Future[int]]]
    ) -> None:
        for batch, fut in items:
            if self.closed:
                fut.set_exception(ShuttingDown("the server is shutting down"))
                continue
            source_batch = batch if isinstance(batch, SourceBatch) else SourceBatch(batch)
            self.queue.append(_Pending(source_batch, fut))
        self._pump()

    def close(self) -> None:
        """Refuse what is queued and whatever comes later (the source has stopped)."""
        self.closed = True
        while self.queue:
            pending = self.queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown("the server is shutting down"))

    def _pump(self) -> None:
        if self._pumping:
            return  # a synchronous store called back from inside publish
        self._pumping = True
        try:
            while self.queue:
                pending = self.queue[0]
                batch = pending.batch
                if batch.ops is not None and self.in_flight:
                    return  # resolved once the earlier batches are installed
                self.queue.popleft()
                try:
                    changes = (
                        resolve(batch.ops, self.engine.store.state)
                        if batch.ops is not None
                        else batch
                    )
                except SourceFailed as exc:  # the source stops: nothing after this batch
                    pending.future.set_exception(exc)
                    self.close()
                    return
                except Exception as exc:  # a bug: fail this batch, the source retries
                    log.exception("internal error while resolving a source batch")
                    pending.future.set_exception(exc)
                    continue
                self.in_flight += 1
                try:
                    self.engine.publish(changes, self._done(pending.future), batch.position)
                except Exception as exc:  # a bug
                    self.in_flight -= 1
                    log.exception("internal error while publishing a source batch")
                    pending.future.set_exception(exc)
        finally:
            self._pumping = False

    def _done(self, fut: concurrent.futures.Future[int]) -> Callable[[int | ProtocolError], None]:
        def done(result: int | ProtocolError) -> None:
            self.in_flight -= 1
            if not fut.done():
                if isinstance(result, int):
                    fut.set_result(result)
                else:
                    fut.set_exception(result)
            self._pump()

        return done
