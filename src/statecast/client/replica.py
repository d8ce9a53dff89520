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
``resync_required`` (or the epoch changed, or a gap was seen, or the access token now
grants another view).

Beside each record's value, the replica keeps the seq of the change that last wrote
it (:meth:`Replica.seq_of`, :meth:`Replica.get_with_seq`): what a publish gives as
``if_seq`` for a read-modify-write (§3.3.2). Snapshots, changes, resumes and
conflated frames all carry that seq (§3.9), so it stays exact through each.

A connection that dies without a reset (a server host that vanished, a network
partition) is noticed by silence: the server's ``hello`` says how often it sends a
heartbeat to a quiet subscriber (§2, §4.3), and after ``silence_timeout`` with no byte
from it (by default three heartbeat periods and a second) the replica drops the
connection and resumes on a new one.

With ``token_provider=`` every (re)connection authenticates with a fresh token, and
the client refreshes it on the live connection before it expires; a connection closed
with ``token_expired`` or ``unauthorized`` reconnects with a fresh one. With a static
``token=`` such a failure is reported through ``on_status`` and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl as _ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self

from statecast.client.connection import (
    DEFAULT_URL,
    Client,
    TokenProvider,
    check_token_settings,
    parse_address,
    tls_context_for,
)
from statecast.client.failover import Failover, split_urls
from statecast.core.frames import (
    Authed,
    Bye,
    ChangeFrame,
    Conflating,
    ErrorFrame,
    Frame,
    Heartbeat,
    Hello,
    Record,
    SnapshotBegin,
    SnapshotEnd,
)
from statecast.errors import (
    ProtocolError,
    ResyncRequired,
    StatecastError,
    Unauthorized,
)

__all__ = ["Progress", "Replica", "Resynced", "Status", "split_urls"]

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


def _view_of(authed: Authed | None) -> str:
    """What a token lets a connection see, as text that is equal exactly when the
    view is: a replica resumes only into the view its contents came from."""
    if authed is None:
        return ""
    read = authed.read if isinstance(authed.read, str) else sorted(authed.read)
    return json.dumps([read, authed.where or None], sort_keys=True, separators=(",", ":"))


def _token_filters(authed: Authed | None) -> bool:
    """Whether the token narrows what a connection sees (then seqs skip, §5.2)."""
    return authed is not None and (authed.read != "*" or bool(authed.where))


class Replica:
    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        collections: Iterable[str] | None = None,
        where: Mapping[str, Any] | None = None,
        conflate: float | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        connect_timeout: float = 10.0,
        silence_timeout: float | Literal["auto"] | None = "auto",
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        on_change: Callable[[ChangeFrame], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_status: Callable[[Status, str], None] | None = None,
        on_resync: Callable[[Resynced], None] | None = None,
    ) -> None:
        # Several nodes of a cluster (docs/cluster.md): "tcp://a:8989,tcp://b:8989" or a
        # list. The replica uses one at a time and moves to the next when it cannot
        # reach it or loses it; the nodes share epoch and seqs, so it resumes there.
        self.urls = split_urls(url)
        self.url = self.urls[0]
        self.collections = None if collections is None else sorted(set(collections))
        self.where = None if where is None else dict(where)
        # §3.9: conflated changes (seqs then skip: only increasing is checked).
        self.conflate = conflate
        self._degraded = False  # §7: the server conflates us until we drain
        self._gap_ok_once = False
        # Checked here, once: a bad URL or CA file is the caller's error, not a reason
        # to retry.
        for each in self.urls:
            tls_context_for(parse_address(each), ca_file, ssl)
        self._ca_file = ca_file
        self._ssl = ssl
        check_token_settings(token, token_provider)
        self._token = token
        self._token_provider = token_provider
        self.connect_timeout = connect_timeout
        # §4.3: seconds with no byte from the server after which a connection counts as
        # dead; "auto": from the hello's heartbeat period; None: never.
        if silence_timeout is not None and silence_timeout != "auto" and silence_timeout <= 0:
            raise ValueError(f"silence_timeout must be > 0 seconds, not {silence_timeout}")
        self.silence_timeout = silence_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.on_change = on_change
        self.on_progress = on_progress
        self.on_status = on_status
        self.on_resync = on_resync
        self._data: dict[str, dict[str, Any]] = {}
        # The seq that last wrote each record (§4.1, §4.2), for if_seq (§3.3): kept
        # beside the values, so that replica[collection] stays a plain key -> value map.
        self._seqs: dict[str, dict[str, int]] = {}
        self.seq = -1  # the last applied seq; -1 before the first sync
        self.epoch: str | None = None
        self.status: Status = "stopped"
        self._synced = asyncio.Event()
        self._listeners: list[asyncio.Queue[ChangeFrame | Resynced]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._client: Client | None = None
        self._authed: Authed | None = None  # the last token grant the server accepted
        self._view = ""  # what the current connection's token lets it see
        self._synced_view = ""  # ... and the view the contents come from
        self._filtered = self.collections is not None or bool(self.where)
        self._warned = False  # about a fixed token that the server refuses
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

    @property
    def authed(self) -> Authed | None:
        """What the current (or last) connection's token grants (§3.8); ``None``
        without a token."""
        client = self._client
        if client is not None and client.authed is not None:
            return client.authed
        return self._authed

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

    def seq_of(self, collection: str, key: str) -> int:
        """The seq of the change that last wrote the record, 0 when the replica does
        not hold it: what a publish gives as ``if_seq`` to change the record only if
        nobody else changed it since (§3.3, docs/client.md)."""
        return self._seqs.get(collection, {}).get(key, 0)

    def get_with_seq(self, collection: str, key: str, default: Any = None) -> tuple[Any, int]:
        """``(value, seq)`` of a record, read together; ``(default, 0)`` when the
        replica does not hold it."""
        seqs = self._seqs.get(collection)
        if seqs is None or key not in seqs:
            return default, 0
        return self._data[collection][key], seqs[key]

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
        failover = Failover(self.urls, self.min_backoff, self.max_backoff)
        failover.url = self.url
        while not self._stopping:
            client = Client(
                self.url,
                ca_file=self._ca_file,
                ssl=self._ssl,
                token=self._token,
                token_provider=self._token_provider,
                connect_timeout=self.connect_timeout,
            )
            self._client = client
            reason = ""
            silent: list[str] = []  # why the watchdog closed the connection
            try:
                await self._connection(client, failover, silent)
                reason = "the server closed the connection"
            except Unauthorized as exc:
                reason = f"{exc.code}: {exc}"
                if self._token_provider is None and not self._warned:
                    self._warned = True  # once: on_status reports every retry
                    log.warning(
                        "%s: %s; retrying with backoff, but %s",
                        self.url,
                        reason,
                        "it needs a token (token= or token_provider=)"
                        if self._token is None
                        else "a fixed token does not get better (give a token_provider)",
                    )
            except ProtocolError as exc:
                reason = f"{exc.code}: {exc}"
            except (StatecastError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                await client.close()
                self._client = None
            if silent:
                reason = silent[0]
            if self._stopping:
                break
            delay = failover.failed()
            self.url = failover.url  # the next node, when there are several
            self.reconnects += 1
            self._set_status("reconnecting", f"{reason}; reconnecting in {delay:.1f}s")
            await asyncio.sleep(delay)

    async def _connection(self, client: Client, failover: Failover, silent: list[str]) -> None:
        """One connection: hello, resume or full sync, then follow until it ends; a
        watchdog closes it when the server goes silent (§4.3)."""
        self._set_status("connecting", self.url)
        hello = await client.connect()
        silence = self._silence_of(hello)
        watchdog = None
        if silence is not None:
            watchdog = asyncio.get_running_loop().create_task(
                self._watch(client, silence, silent), name="statecast-replica-watchdog"
            )
        try:
            self._authed = client.authed
            self._view = _view_of(client.authed)
            self._filtered = (
                self.collections is not None
                or bool(self.where)
                or self.conflate is not None
                or _token_filters(client.authed)
            )
            self._degraded = False
            if self.seq >= 0 and hello.epoch == self.epoch and self._view == self._synced_view:
                stream = await self._resume(client)
            else:
                if self.seq >= 0 and hello.epoch != self.epoch:
                    log.info("server has a new epoch (%s): full sync", hello.epoch)
                elif self.seq >= 0:
                    log.info("the access token grants another view: full sync")
                stream = None
            if stream is None:
                stream = self._full_sync(client)
            failover.succeeded()
            await self._follow(stream)
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog

    def _silence_of(self, hello: Hello) -> float | None:
        """Seconds of silence after which this connection counts as dead (§4.3)."""
        if self.silence_timeout != "auto":
            return self.silence_timeout
        if not hello.heartbeat or hello.heartbeat <= 0:
            return None  # the server sends no heartbeats: silence says nothing
        return 3 * hello.heartbeat + 1.0

    async def _watch(self, client: Client, silence: float, silent: list[str]) -> None:
        """Close ``client`` once it has received nothing for ``silence`` seconds."""
        loop = asyncio.get_running_loop()
        seen, since = client.bytes_received, loop.time()
        while True:
            await asyncio.sleep(min(silence / 4, 1.0))
            if client.bytes_received != seen:
                seen, since = client.bytes_received, loop.time()
            elif loop.time() - since >= silence:
                silent.append(
                    f"nothing from {client.url} for {silence:g} s (no change, no heartbeat): "
                    "taking the connection for dead"
                )
                log.warning("%s", silent[0])
                await client.close()
                return

    async def _resume(self, client: Client) -> AsyncIterator[Frame] | None:
        try:
            await client.subscribe(
                after=self.seq,
                epoch=self.epoch,
                collections=self.collections,
                where=self.where,
                conflate=self.conflate,
            )
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
        fresh_seqs: dict[str, dict[str, int]] = {}
        total: int | None = None
        start_bytes = client.bytes_received
        records = 0
        begin: SnapshotBegin | None = None
        frames = client.sync(
            collections=self.collections, live=True, where=self.where, conflate=self.conflate
        )
        async for frame in frames:
            if isinstance(frame, SnapshotBegin):
                begin, total = frame, frame.count
            elif isinstance(frame, Record):
                fresh.setdefault(frame.collection, {})[frame.key] = frame.value
                fresh_seqs.setdefault(frame.collection, {})[frame.key] = frame.seq
                records += 1
                if self.on_progress is not None and (records & 1023 == 0 or records == total):
                    self.on_progress(Progress(records, client.bytes_received - start_bytes, total))
            elif isinstance(frame, SnapshotEnd):
                assert begin is not None
                first = self.full_syncs == 0
                self._data = fresh  # replaced at once: readers never see half a sync
                self._seqs = fresh_seqs
                self.seq = frame.seq
                self.epoch = begin.epoch
                self._synced_view = self._view
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
            if self._gap_ok_once and frame.seq > self.seq:
                # Just back from conflation (§7): what it held brought us to the state
                # at the server's seq then; the heartbeat says which.
                self.seq = frame.seq
                self._gap_ok_once = False
            elif not self._filtered and not self._degraded and frame.seq > self.seq >= 0:
                self._lost_track(
                    f"heartbeat at seq {frame.seq}, but the last change was {self.seq}"
                )
        elif isinstance(frame, Conflating):
            # §7: the server conflates our changes until we drain: seqs skip meanwhile.
            self._degraded = frame.on
            if not frame.on and not self._filtered:
                self._gap_ok_once = True
        elif isinstance(frame, ErrorFrame):
            raise frame.exception()
        elif isinstance(frame, Bye):
            raise StatecastError(f"the server said bye ({frame.reason})")

    def _apply(self, change: ChangeFrame) -> None:
        if change.seq <= self.seq:
            self._lost_track(f"seq {change.seq} after {self.seq}: a duplicate")
        if (
            not self._filtered
            and not self._degraded
            and not self._gap_ok_once
            and change.seq != self.seq + 1
        ):
            self._lost_track(f"seq {change.seq} after {self.seq}: a gap")
        self._gap_ok_once = False
        records = self._data.get(change.collection)
        if change.deleted:
            if records is not None:
                records.pop(change.key, None)
                self._seqs[change.collection].pop(change.key, None)
        else:
            if records is None:
                records = self._data[change.collection] = {}
                self._seqs[change.collection] = {}
            records[change.key] = change.value
            # A conflated frame carries the seq of the change that wrote its value
            # (§3.9), so this holds under conflation too.
            self._seqs[change.collection][change.key] = change.seq
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
