"""A local copy of the server's state that stays exactly in sync (docs/client.md).

::

    async with statecast.Replica("tcp://127.0.0.1:8989", collections=["orders"]) as replica:
        await replica.wait_synced()
        print(replica["orders"].get("O-1"))
        async for event in replica.changes():
            ...

The replica syncs with ``live``, applies every change in seq order (checking that no
seq is skipped or repeated), and on any failure reconnects with exponential backoff
and jitter. It resumes with ``subscribe from`` its last seq under the same epoch, and
falls back to a full sync, replacing its contents at once, when the server answers
``resync_required`` (or the epoch changed, or a gap was seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self

from statecast.client.connection import DEFAULT_URL, Client
from statecast.core.frames import (
    Bye,
    ChangeFrame,
    ErrorFrame,
    Frame,
    Heartbeat,
    Record,
    SnapshotBegin,
    SnapshotEnd,
)
from statecast.errors import ProtocolError, ResyncRequired, StatecastError

__all__ = ["Progress", "Replica", "Resynced", "Status"]

log = logging.getLogger("statecast.client.replica")

Status = Literal["stopped", "connecting", "syncing", "live", "reconnecting"]


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a full sync has come."""

    records: int
    bytes: int
    total: int | None  # records in the snapshot, when the server says


@dataclass(frozen=True, slots=True)
class Resynced:
    """Yielded by :meth:`Replica.changes` when a full sync replaced the contents."""

    seq: int
    epoch: str


class _Gap(StatecastError):
    """The stream skipped or repeated a seq: only a full sync can repair that."""


class Replica:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        collections: Iterable[str] | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        on_change: Callable[[ChangeFrame], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_status: Callable[[Status, str], None] | None = None,
        on_resync: Callable[[Resynced], None] | None = None,
    ) -> None:
        self.url = url
        self.collections = None if collections is None else sorted(set(collections))
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.on_change = on_change
        self.on_progress = on_progress
        self.on_status = on_status
        self.on_resync = on_resync
        self._data: dict[str, dict[str, Any]] = {}
        self.seq = -1  # the last applied seq; -1 before the first sync
        self.epoch: str | None = None
        self.status: Status = "stopped"
        self._synced = asyncio.Event()
        self._listeners: list[asyncio.Queue[ChangeFrame | Resynced]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._client: Client | None = None
        # Counters, for people and tests.
        self.full_syncs = 0
        self.resumes = 0
        self.reconnects = 0
        self.changes_applied = 0

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="statecast-replica"
            )

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_status("stopped", "")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def wait_synced(self) -> None:
        """Until the first full sync has completed (then the contents are usable).
        Bound it with ``asyncio.timeout()`` if needed."""
        await self._synced.wait()

    # -- contents ------------------------------------------------------------------
    def __getitem__(self, collection: str) -> Mapping[str, Any]:
        """The records of a collection, read-only (empty when it has none)."""
        return MappingProxyType(self._data.get(collection, {}))

    def get(self, collection: str, key: str, default: Any = None) -> Any:
        return self._data.get(collection, {}).get(key, default)

    def collection_names(self) -> list[str]:
        return sorted(self._data)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A copy of the whole contents."""
        return {name: dict(records) for name, records in self._data.items()}

    async def changes(self) -> AsyncIterator[ChangeFrame | Resynced]:
        """Every change applied from now on, and a :class:`Resynced` whenever a full
        sync replaced the contents."""
        q: asyncio.Queue[ChangeFrame | Resynced] = asyncio.Queue()
        self._listeners.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._listeners.remove(q)

    # -- the loop --------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            client = Client(self.url)
            self._client = client
            reason = ""
            try:
                self._set_status("connecting", self.url)
                hello = await client.connect()
                if self.seq >= 0 and hello.epoch == self.epoch:
                    stream = await self._resume(client)
                else:
                    if self.seq >= 0:
                        log.info("server has a new epoch (%s): full sync", hello.epoch)
                    stream = None
                if stream is None:
                    stream = self._full_sync(client)
                attempt = 0
                await self._follow(stream)
                reason = "the server closed the connection"
            except ProtocolError as exc:
                reason = f"{exc.code}: {exc}"
            except (StatecastError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                await client.close()
                self._client = None
            if self._stopping:
                break
            delay = min(self.max_backoff, self.min_backoff * 2**attempt) * random.uniform(0.5, 1.5)
            attempt += 1
            self.reconnects += 1
            self._set_status("reconnecting", f"{reason}; reconnecting in {delay:.1f}s")
            await asyncio.sleep(delay)

    async def _resume(self, client: Client) -> AsyncIterator[Frame] | None:
        try:
            await client.subscribe(after=self.seq, epoch=self.epoch, collections=self.collections)
        except ResyncRequired as exc:
            log.info("cannot resume from seq %d (%s): full sync", self.seq, exc)
            return None
        self.resumes += 1
        self._set_status("live", f"resumed at seq {self.seq}")
        return client.frames()

    async def _full_sync(self, client: Client) -> AsyncIterator[Frame]:
        """Sync with ``live``; install the snapshot atomically, then pass the live
        frames on."""
        self._set_status("syncing", "")
        fresh: dict[str, dict[str, Any]] = {}
        total: int | None = None
        start_bytes = client.bytes_received
        records = 0
        begin: SnapshotBegin | None = None
        frames = client.sync(collections=self.collections, live=True)
        async for frame in frames:
            if isinstance(frame, SnapshotBegin):
                begin, total = frame, frame.count
            elif isinstance(frame, Record):
                fresh.setdefault(frame.collection, {})[frame.key] = frame.value
                records += 1
                if self.on_progress is not None and (records & 1023 == 0 or records == total):
                    self.on_progress(Progress(records, client.bytes_received - start_bytes, total))
            elif isinstance(frame, SnapshotEnd):
                assert begin is not None
                first = self.full_syncs == 0
                self._data = fresh  # replaced at once: readers never see half a sync
                self.seq = frame.seq
                self.epoch = begin.epoch
                self.full_syncs += 1
                if self.on_progress is not None:
                    self.on_progress(Progress(records, client.bytes_received - start_bytes, total))
                if not first:
                    event = Resynced(frame.seq, begin.epoch)
                    if self.on_resync is not None:
                        self.on_resync(event)
                    self._notify(event)
                self._synced.set()
                self._set_status("live", f"synced {records} records at seq {frame.seq}")
                break
            else:
                await self._handle(frame)
        async for frame in frames:
            yield frame

    async def _follow(self, frames: AsyncIterator[Frame]) -> None:
        async for frame in frames:
            await self._handle(frame)

    async def _handle(self, frame: Frame) -> None:
        if isinstance(frame, ChangeFrame):
            self._apply(frame)
        elif isinstance(frame, Heartbeat):
            # Every change up to the heartbeat's seq has been sent (§4.3).
            if self.collections is None and frame.seq > self.seq >= 0:
                self._lost_track(
                    f"heartbeat at seq {frame.seq}, but the last change was {self.seq}"
                )
        elif isinstance(frame, ErrorFrame):
            raise frame.exception()
        elif isinstance(frame, Bye):
            raise StatecastError(f"the server said bye ({frame.reason})")

    def _apply(self, change: ChangeFrame) -> None:
        if change.seq <= self.seq:
            self._lost_track(f"seq {change.seq} after {self.seq}: a duplicate")
        if self.collections is None and change.seq != self.seq + 1:
            self._lost_track(f"seq {change.seq} after {self.seq}: a gap")
        records = self._data.get(change.collection)
        if change.deleted:
            if records is not None:
                records.pop(change.key, None)
        else:
            if records is None:
                records = self._data[change.collection] = {}
            records[change.key] = change.value
        self.seq = change.seq
        self.changes_applied += 1
        if self.on_change is not None:
            self._callback(self.on_change, change)
        self._notify(change)

    def _callback(self, fn: Callable[[Any], None], arg: Any) -> None:
        """A user callback's failure is the user's: log it, keep the replica going."""
        try:
            fn(arg)
        except Exception:
            log.exception("replica callback %r failed", fn)

    def _lost_track(self, why: str) -> None:
        log.warning("replica out of step (%s): full sync", why)
        self.seq = -1  # forces a full sync on the next connection
        raise _Gap(why)

    def _notify(self, event: ChangeFrame | Resynced) -> None:
        for q in self._listeners:
            q.put_nowait(event)

    def _set_status(self, status: Status, detail: str) -> None:
        self.status = status
        if detail:
            log.debug("replica %s: %s", status, detail)
        if self.on_status is not None:
            self.on_status(status, detail)
