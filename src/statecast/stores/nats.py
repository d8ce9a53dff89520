"""The NATS JetStream store: statecast nodes that share one stream (docs/cluster.md).

JetStream is the one source of truth; every node is a stateless reader and writer of
one stream, and keeps the state and the change log in memory like the other stores.

* **Writing.** A node sends its batches to ``S.log``, many batches to one message (a
  group commit), one message in flight at a time, with the header
  ``Nats-Expected-Last-Subject-Sequence`` set to the last ``S.log`` message it has
  read. JetStream stores it only if nobody wrote in between; if somebody did, it
  answers ``wrong last sequence``, and the node reads up to there and tries again.
  So the log is a chain, every message knows the one before, and the seq of every
  change follows from it: a group's first seq is one past the previous message's last
  one (also written in ``Statecast-Seq``, and checked).
* **Reading.** Every node reads ``S.log`` in order (:class:`~.nats_reader.StreamReader`)
  and installs each batch whole. Its own group is installed as soon as JetStream acks
  it (nothing else can come between: the ack says it follows what the node read), and
  its acks are sent then: an ack means stored by JetStream.
* **Checkpoints.** Now and then a node writes the state to ``S.ckpt.<id>`` and a
  manifest to ``S.ckpt``, then trims the log to the last ``retain`` changes (in whole
  messages), keeping what a new node needs: a checkpoint and every message after it.
* **The epoch** is a digest of the stream's name and creation time: a stream deleted
  and created again is a new history.

Everything runs on the server's event loop (nats-py is asyncio); ``open`` loads the
checkpoint and the log on a private loop in its worker thread first.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import re
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from statecast.config import Config, redact_url
from statecast.core.changelog import ChangeLog
from statecast.core.dedupe import Dedupe, KeyRecord
from statecast.core.protocol import Conditions, PreparedChange, check_conditions
from statecast.core.state import Record, State, encode_batch
from statecast.core.store import AlreadyApplied, Committed, Install, KeyStamp, ToLoop
from statecast.errors import (
    BadRequest,
    InternalError,
    ProtocolError,
    ShuttingDown,
    StoreError,
    Unavailable,
)
from statecast.stores.nats_reader import ReaderError, StopReading, StreamReader, api_request
from statecast.stores.nats_wire import (
    COUNT_HEADER,
    FORMAT,
    FORMAT_HEADER,
    MSG_ID_HEADER,
    PREV_HEADER,
    SEQ_HEADER,
    Manifest,
    Subjects,
    decode_chunk,
    decode_group,
    decode_manifest,
    encode_batch_body,
    encode_chunk,
    encode_manifest,
    epoch_of,
    group_body,
    keyed_group_body,
)

__all__ = ["NatsStore"]

log = logging.getLogger("statecast.stores.nats")

REQUEST_TIMEOUT: Final = 5.0  # one JetStream request
PUBLISH_DEADLINE: Final = 10.0  # a batch is stored within this, or fails with unavailable
HEARTBEAT: Final = 1.0  # the readers' idle heartbeat
STALL_TIMEOUT: Final = 30.0  # loading fails when the stream sends nothing for this long
# Checkpoints: every max(retain // 2, MIN_CHECKPOINT_INTERVAL) changes unless configured.
MIN_CHECKPOINT_INTERVAL = 10_000
_MAX_GROUP_CHANGES: Final = 50_000  # changes in one log message at most
_HEADROOM: Final = 4096  # bytes of max_payload left for the headers
_WRONG_LAST: Final = 10071  # JetStream: wrong last sequence
_STREAM_NOT_FOUND: Final = 10059
_NO_MESSAGE: Final = 10037
_LAST_SEQ_RE: Final = re.compile(r"(\d+)\s*$")


class _Job:
    __slots__ = ("batch", "body", "conditions", "done", "error", "key")

    def __init__(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        key: KeyStamp | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self.batch = batch
        self.done = done
        self.key = key  # §3.3.1, written with the batch, decided when the group is sent
        self.conditions = conditions  # §3.3.2, decided when the group is sent
        self.body = b""
        self.error: ProtocolError | None = None


class _Group:
    """Whole batches sent as one log message; settled once, in submission order."""

    __slots__ = ("body", "count", "jobs", "msg_id", "settled", "size", "waiter")

    def __init__(self, jobs: list[_Job], msg_id: str) -> None:
        self.jobs = jobs
        self.msg_id = msg_id
        self.body = b""
        self.count = 0
        self.size = 0
        self.settled = False
        self.waiter: asyncio.Future[None] | None = None
        self.seal()

    def seal(self) -> None:
        """Build the message body from the jobs (again, after more joined or some left)."""
        encoded = [j.body for j in self.jobs]
        keys = {i: j.key for i, j in enumerate(self.jobs) if j.key is not None}
        self.body = keyed_group_body(encoded, keys) if keys else group_body(encoded)
        self.count = sum(len(j.batch) for j in self.jobs)
        self.size = len(self.body)

    @property
    def format(self) -> int:
        return 2 if any(j.key is not None for j in self.jobs) else 1


class _Incomplete(Exception):
    """A checkpoint whose data is not all there (trimmed meanwhile, or never finished)."""


class _Trimmed(Exception):
    """The log was trimmed past what a loading node had read."""


def _servers(spec: str) -> list[str]:
    """``nats://a:4222,b:4222`` -> ``["nats://a:4222", "nats://b:4222"]``."""
    scheme = spec.split("://", 1)[0]
    out = []
    for raw in spec.split(","):
        part = raw.strip()
        if part:
            out.append(part if "://" in part else f"{scheme}://{part}")
    return out


def _parse_headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep:
            out[key.decode().strip()] = value.decode().strip()
    return out


def _seq_of(manifest: Manifest | None) -> int:
    return 0 if manifest is None else manifest.seq


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ReaderError):
        return exc.description
    if isinstance(exc, nats.errors.NoRespondersError):
        return "no responders (is JetStream enabled, and does the stream exist?)"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return (str(exc) or type(exc).__name__).removeprefix("nats: ")


class NatsStore:
    """State and log in memory, JetStream behind them: see the module's docstring."""

    def __init__(self, config: Config, *, checkpoint_interval: int | None = None) -> None:
        self.config = config
        self.servers = _servers(config.store)
        # For messages, logs and stats: never a password (found by an adversarial run).
        self.shown = ", ".join(redact_url(server) for server in self.servers)
        self.stream = config.nats_stream
        self.subjects = Subjects(self.stream)
        self.description = f"{self.shown.replace(', ', ',')} (stream {self.stream})"
        self.retain = config.retain
        configured = checkpoint_interval or config.nats_checkpoint_interval
        self.checkpoint_interval = int(
            configured or max(config.retain // 2, MIN_CHECKPOINT_INTERVAL)
        )
        self.replicas: int | None = config.nats_replicas
        self.state = State()
        self.log = ChangeLog(config.retain)
        self.epoch = ""
        self.node = uuid.uuid4().hex[:12]
        # §3.3.1: the idempotency keys of the batches read from the log (every node's),
        # for the dedupe window; decided here when a group is sent (_decide).
        self.keys = Dedupe(config.dedupe_window)
        self.max_payload = 1 << 20
        self._last = 0  # stream seq of the last S.log message applied (or skipped)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: NATS | None = None
        self._reader: StreamReader | None = None
        self._install: Install | None = None
        self._queue: collections.deque[_Job] = collections.deque()
        self._inflight: _Group | None = None
        self._groups = 0
        self._submitted = 0
        self._completed = 0
        self._flushes: list[tuple[int, Callable[[], None]]] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._work: asyncio.Event | None = None
        self._nc_ready: asyncio.Event | None = None  # set once the serving connection is up
        self._started_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpoint_wanted = False  # a boundary passed while one was being written
        self._connected = False
        self._trouble: str | None = None  # the reader cannot read the stream (for now)
        self._broken: str | None = None  # this node cannot follow the stream any more
        self._gap = False  # ...because messages it had not read were trimmed
        self._reported: str | None = None  # the outage logged last
        self._closing = False
        # For people and tests.
        self.loaded_checkpoint: Manifest | None = None
        self.replayed = 0  # changes read from the log by open()
        self.groups_published = 0  # this node's log messages, stored
        self.conflicts = 0  # publishes retried because another node wrote first
        self.skipped = 0  # log messages not written by statecast, skipped by every node
        self.checkpoints_written = 0
        self.trims = 0

    # -- the Store protocol --------------------------------------------------------
    @property
    def ready(self) -> bool:
        reader = self._reader
        return (
            reader is not None
            and reader.caught_up
            and self._unavailable() is None
            and not self._closing
        )

    def open(self, to_loop: ToLoop) -> None:
        t0 = time.monotonic()
        try:
            asyncio.run(self._load())
        except StoreError:
            raise
        except (OSError, nats.errors.Error, ReaderError, TimeoutError) as exc:
            raise StoreError(
                f"cannot open the NATS store {self.description}: {_describe(exc)}"
            ) from None
        cp = self.loaded_checkpoint
        log.info(
            "loaded stream %s: %s, then %d changes from the log; seq %d, %d records, "
            "epoch %s, in %.2fs",
            self.stream,
            f"checkpoint at seq {cp.seq} ({cp.records} records)" if cp else "no checkpoint",
            self.replayed,
            self.state.seq,
            len(self.state),
            self.epoch,
            time.monotonic() - t0,
        )

    def start(self, install: Install) -> None:
        self._install = install
        loop = self._loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._work = asyncio.Event()
        self._nc_ready = asyncio.Event()
        self._tasks.append(loop.create_task(self._run(), name="statecast-nats"))
        self._tasks.append(loop.create_task(self._publisher(), name="statecast-nats-publisher"))

    commits_at_once = False
    # Other nodes commit batches beside this one's: keys and if_seq are decided when a
    # group is sent, against the state after the message it must follow (_decide).
    decides_at_commit = True

    def idempotency_keys(self) -> list[KeyRecord]:
        return []  # the store decides keys itself (self.keys)

    def submit(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        key: KeyStamp | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self._submitted += 1
        reason = self._unavailable()
        if reason is not None and not self._queue and self._inflight is None:
            self._completed += 1
            done(None, Unavailable(reason))
            self._check_flushes()
            return
        job = _Job(batch, done, key, conditions)
        job.body = encode_batch_body(batch)
        limit = self.max_payload - _HEADROOM
        if len(job.body) > limit:
            job.error = BadRequest(
                f"the batch is {len(job.body):,} bytes encoded, more than a NATS message "
                f"may hold here ({limit:,}: the server's max_payload less headers)"
            )
        self._queue.append(job)
        assert self._work is not None, "start() first"
        self._work.set()

    def flush(self, done: Callable[[], None]) -> None:
        if self._completed >= self._submitted:
            done()
        else:
            self._flushes.append((self._submitted, done))

    def close(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(self._aclose(), loop)
        try:
            fut.result(REQUEST_TIMEOUT * 3)
        except Exception:
            log.exception("closing the NATS store failed")

    # -- connecting ------------------------------------------------------------------
    async def _connect(self, *, serving: bool) -> NATS:
        nc = NATS()
        opts: dict[str, Any] = {
            "servers": self.servers,
            "name": f"statecast {self.node}",
            "connect_timeout": 2,
            "reconnect_time_wait": 0.5,
            "max_reconnect_attempts": -1 if serving else 3,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "error_cb": self._nats_error,
        }
        if serving:
            opts["disconnected_cb"] = self._disconnected
            opts["reconnected_cb"] = self._reconnected
        if self.config.nats_creds:
            opts["user_credentials"] = self.config.nats_creds
        if self.config.nats_ca_file:
            opts["tls"] = ssl.create_default_context(cafile=self.config.nats_ca_file)
        try:
            await nc.connect(**opts)
        except nats.errors.NoServersError:
            raise StoreError(f"cannot reach a NATS server at {self.shown}") from None
        return nc

    async def _nats_error(self, exc: Exception) -> None:
        # Connection failures are reported once by the disconnect callbacks; the rest
        # (a permissions violation, a slow consumer) is worth a warning.
        routine = isinstance(
            exc,
            OSError | asyncio.TimeoutError | nats.errors.UnexpectedEOF | nats.errors.NoServersError,
        )
        (log.debug if routine else log.warning)("NATS: %s", _describe(exc))

    async def _disconnected(self) -> None:
        if self._closing or not self._connected:
            return
        self._connected = False
        self._outage_changed()
        self._fail_pending(
            "the connection to NATS was lost before JetStream answered: the batch may or "
            "may not have been stored (if it was, every node applies it)",
        )

    async def _reconnected(self) -> None:
        if self._closing:
            return
        self._connected = True
        if self._reader is not None:
            self._reader.reset("reconnected")
        self._outage_changed()

    def _unavailable(self) -> str | None:
        """Why publishes are refused now (None: they are not)."""
        if self._broken is not None:
            return self._broken
        if self._closing:
            return "the store is closing"
        if self._nc is None:
            # Connecting when the node starts: publishes wait for it, for a while.
            loop = self._loop
            if loop is not None and loop.time() < self._started_at + PUBLISH_DEADLINE:
                return None
            return f"this node cannot reach a NATS server at {self.shown}"
        if not self._connected:
            return "this node has lost its connection to NATS; try again later"
        return self._trouble

    def _outage_changed(self) -> None:
        """Log an outage once when it starts, and once when it ends."""
        reason = self._unavailable()
        if reason == self._reported or self._closing:
            return
        if reason is None:
            log.warning("NATS is reachable again: publishes are accepted")
        elif self._reported is None:
            log.error(
                "%s; publishes fail with 'unavailable' until it recovers (syncs and "
                "subscriptions go on)",
                reason,
            )
        else:
            log.error("%s", reason)
        self._reported = reason

    # -- the streams -------------------------------------------------------------------
    async def _stream_info(self, nc: NATS, stream: str | None = None) -> dict[str, Any] | None:
        stream = stream or self.stream
        try:
            info = await api_request(nc, f"$JS.API.STREAM.INFO.{stream}")
        except ReaderError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                return None
            raise
        except nats.errors.NoRespondersError:
            raise StoreError(
                f"the NATS server at {self.shown} has no JetStream (start nats-server with -js)"
            ) from None
        assert isinstance(info, dict)
        return info

    async def _ensure_streams_patiently(self, nc: NATS) -> dict[str, Any]:
        """Like ``_ensure_streams``, waiting a while for a JetStream cluster that has no
        leader yet (starting, or electing one)."""
        deadline = time.monotonic() + PUBLISH_DEADLINE
        while True:
            try:
                return await self._ensure_streams(nc)
            except (ReaderError, nats.errors.TimeoutError) as exc:
                unavailable = isinstance(exc, nats.errors.TimeoutError) or exc.code == 503
                if not unavailable or time.monotonic() > deadline:
                    raise
                log.info("JetStream is not available yet (%s); waiting", _describe(exc))
                await asyncio.sleep(0.5)

    async def _ensure_streams(self, nc: NATS) -> dict[str, Any]:
        """The log stream's info, after creating it (and the checkpoints' stream) if
        missing, and checking that neither may drop what statecast still needs."""
        s = self.subjects
        replicas = self.replicas
        if replicas is None:
            # A clustered server gets three replicas; a single one can only have one.
            replicas = 3 if nc._server_info.get("cluster") else 1
        info = await self._ensure_stream(nc, self.stream, [s.log], replicas)
        replicas = int(info.get("config", {}).get("num_replicas", replicas))
        await self._ensure_stream(nc, s.checkpoints, [s.manifests, s.chunks], replicas)
        return info

    async def _ensure_stream(
        self, nc: NATS, stream: str, subjects: list[str], replicas: int
    ) -> dict[str, Any]:
        info = await self._stream_info(nc, stream)
        if info is None:
            config = {
                "name": stream,
                "subjects": subjects,
                "retention": "limits",
                "storage": "file",
                "discard": "new",
                "max_consumers": -1,
                "max_msgs": -1,
                "max_bytes": -1,
                "max_age": 0,
                "max_msgs_per_subject": -1,
                "max_msg_size": -1,
                "num_replicas": replicas,
                "duplicate_window": 120_000_000_000,
            }
            try:
                await api_request(nc, f"$JS.API.STREAM.CREATE.{stream}", config)
                log.info("created the JetStream stream %s (%d replicas)", stream, replicas)
            except ReaderError as exc:
                info = await self._stream_info(nc, stream)  # another node created it first?
                if info is None:
                    raise StoreError(
                        f"cannot create the JetStream stream {stream!r} ({replicas} replicas): "
                        f"{exc.description}"
                    ) from None
            info = await self._stream_info(nc, stream)
            if info is None:
                raise StoreError(f"the JetStream stream {stream!r} vanished as it was made")
        self._check_stream_config(stream, info, subjects)
        return info

    def _check_stream_config(self, stream: str, info: dict[str, Any], wanted: list[str]) -> None:
        cfg = info.get("config", {})
        subjects = sorted(cfg.get("subjects") or [])
        if subjects != sorted(wanted):
            raise StoreError(
                f"the JetStream stream {stream!r} exists but takes the subjects {subjects}; "
                f"statecast needs it to take exactly {sorted(wanted)} (docs/cluster.md)"
            )
        problems = []
        if cfg.get("retention", "limits") != "limits":
            problems.append(f"retention is {cfg.get('retention')!r}, not 'limits'")
        if int(cfg.get("max_age", 0)) > 0:
            problems.append("messages expire (max_age)")
        limited = any(
            int(cfg.get(k, -1)) > 0 for k in ("max_msgs", "max_bytes", "max_msgs_per_subject")
        )
        if limited and cfg.get("discard", "old") == "old":
            problems.append("it discards old messages when full (discard 'old' with limits)")
        if problems:
            raise StoreError(
                f"the JetStream stream {stream!r} may remove messages statecast still "
                f"needs: {'; '.join(problems)}. Use retention 'limits', no max_age, and "
                "discard 'new' (statecast trims the log itself)"
            )

    async def _get(
        self, nc: NATS, stream: str, request: dict[str, Any]
    ) -> tuple[int, dict[str, str], bytes] | None:
        """One stored message (seq, headers, data), or None when there is none."""
        try:
            answer = await api_request(
                nc, f"$JS.API.STREAM.MSG.GET.{stream}", request, REQUEST_TIMEOUT
            )
        except ReaderError as exc:
            if exc.err_code == _NO_MESSAGE or exc.code == 404:
                return None
            raise
        m = answer["message"]
        hdrs = _parse_headers(base64.b64decode(m["hdrs"])) if m.get("hdrs") else {}
        data = base64.b64decode(m["data"]) if m.get("data") else b""
        return int(m["seq"]), hdrs, data

    async def _manifests(self, nc: NATS) -> list[tuple[int, Manifest]]:
        """Every checkpoint manifest, with its stream seq, oldest first."""
        out: list[tuple[int, Manifest]] = []
        seq = 1
        stream = self.subjects.checkpoints
        while True:
            got = await self._get(nc, stream, {"seq": seq, "next_by_subj": self.subjects.manifests})
            if got is None:
                return out
            seq, _, data = got
            try:
                out.append((seq, decode_manifest(data)))
            except msgspec.DecodeError:
                log.warning("stream %s: message %d is not a checkpoint manifest", stream, seq)
            seq += 1

    async def _purge(self, nc: NATS, stream: str, subject: str, before: int | None = None) -> None:
        request: dict[str, Any] = {"filter": subject}
        if before is not None:
            request["seq"] = before
        await api_request(nc, f"$JS.API.STREAM.PURGE.{stream}", request, REQUEST_TIMEOUT)

    # -- opening: a checkpoint, then the log ---------------------------------------------
    async def _load(self) -> None:
        nc = await self._connect(serving=False)
        try:
            info = await self._ensure_streams_patiently(nc)
            self.epoch = epoch_of(self.stream, str(info["created"]))
            self.max_payload = nc.max_payload
            await self._forget_stale(nc, await self._manifests(nc))
            for attempt in range(3):
                try:
                    await self._load_once(nc)
                    return
                except _Trimmed as exc:
                    # Another node trimmed the log while this one was loading: again.
                    if attempt == 2:
                        raise StoreError(str(exc)) from None
                    log.warning("%s; loading again", exc)
        finally:
            await nc.close()

    async def _load_once(self, nc: NATS) -> None:
        """A checkpoint, then the log after it, up to where it ended when this began."""
        self._broken = None
        s = self.subjects
        first = await self._get(nc, self.stream, {"seq": 1, "next_by_subj": s.log})
        last = await self._get(nc, self.stream, {"last_by_subj": s.log})
        manifests = await self._manifests(nc)
        for manifest in self._plan(first, last, manifests):
            try:
                await self._load_checkpoint(nc, manifest)
            except _Incomplete as exc:
                log.warning("%s; trying another", exc)
                continue
            break
        else:
            raise StoreError(
                f"the JetStream stream {self.stream!r} cannot be loaded: its log was trimmed "
                "and no complete checkpoint covers what was removed (the history is lost: "
                "delete the stream to start a new one)"
            )
        if last is not None:
            await self._replay(nc, last[0])

    async def _forget_stale(self, nc: NATS, manifests: list[tuple[int, Manifest]]) -> None:
        """Remove the checkpoints of an older log stream of the same name (deleted and
        created again): they hold another history."""
        stale = [m for _, m in manifests if m.epoch != self.epoch]
        for m in stale:
            await self._purge(nc, self.subjects.checkpoints, self.subjects.chunk(m.id))
        if stale:
            log.warning(
                "removed %d checkpoint(s) of an older stream %s (epoch %s)",
                len(stale),
                self.stream,
                ", ".join(sorted({m.epoch for m in stale})),
            )

    def _plan(
        self,
        first: tuple[int, dict[str, str], bytes] | None,
        last: tuple[int, dict[str, str], bytes] | None,
        manifests: list[tuple[int, Manifest]],
    ) -> list[Manifest | None]:
        """The checkpoints to try, best first (None: the empty state, log from the start).

        A checkpoint is usable when every log message after it is still there: the first
        retained message follows it or an older one. Best is the newest usable one at
        least ``retain`` changes old (so that this node can serve resumes that far back),
        else the oldest usable one.
        """
        if first is None:
            if manifests:
                raise StoreError(
                    f"the JetStream stream {self.stream!r} has checkpoints but no log: it was "
                    "purged by hand (delete the stream to start a new one)"
                )
            return [None]
        fseq, fhdrs, _ = first
        try:
            before_first = int(fhdrs[PREV_HEADER])
        except (KeyError, ValueError):
            before_first = fseq - 1
        tip: int | None = None
        if last is not None:
            try:
                tip = int(last[1][SEQ_HEADER]) + int(last[1][COUNT_HEADER]) - 1
            except (KeyError, ValueError):
                tip = None
        candidates = sorted(
            (m for _, m in manifests if m.log_seq >= before_first and m.epoch == self.epoch),
            key=lambda m: m.seq,
        )
        usable: list[Manifest | None] = [None] if before_first == 0 else []
        usable += candidates
        if tip is not None:
            old = [m for m in usable if _seq_of(m) <= tip - self.retain]
            if old:
                best = old[-1]
                usable.remove(best)
                usable.insert(0, best)
        return usable

    async def _load_checkpoint(self, nc: NATS, manifest: Manifest | None) -> None:
        if manifest is None:
            self.state = State()
            self.log = ChangeLog(self.retain)
            self._last = 0
            return
        rows: list[tuple[str, str, int, bytes]] = []
        chunks = 0
        position = 0

        def take(sseq: int, msg: Msg) -> None:
            nonlocal chunks, position
            position = sseq
            chunks += 1
            rows.extend(decode_chunk(msg.data))

        reader = StreamReader(
            nc,
            self.subjects.checkpoints,
            self.subjects.chunk(manifest.id),
            position=lambda: position,
            on_message=take,
            heartbeat=HEARTBEAT,
        )
        reader.start()
        try:
            while not reader.caught_up:
                if not await reader.wait_progress(STALL_TIMEOUT):
                    raise _Incomplete(f"checkpoint {manifest.id}: the stream sent nothing")
        finally:
            await reader.stop()
        if chunks != manifest.chunks or len(rows) != manifest.records:
            raise _Incomplete(
                f"checkpoint {manifest.id} at seq {manifest.seq} is incomplete "
                f"({chunks} of {manifest.chunks} chunks)"
            )
        records = [Record(s, c, k, line, False) for c, k, s, line in rows]
        rows.clear()
        state = State()
        state.load(records, manifest.seq)
        self.state = state
        self.log = ChangeLog(self.retain, last_seq=manifest.seq)
        self._last = manifest.log_seq
        self.loaded_checkpoint = manifest

    async def _replay(self, nc: NATS, until: int) -> None:
        """Read the log up to stream seq ``until`` (the last message when loading began)."""
        start = self.state.seq
        reader = StreamReader(
            nc,
            self.stream,
            self.subjects.log,
            position=lambda: self._last,
            on_message=self._on_log,
            heartbeat=HEARTBEAT,
        )
        reader.start()
        try:
            while self._last < until and self._broken is None:
                if not await reader.wait_progress(STALL_TIMEOUT):
                    raise StoreError(
                        f"the JetStream stream {self.stream!r} stopped sending its log at "
                        f"stream seq {self._last} of {until}"
                    )
        finally:
            await reader.stop()
        if self._broken is not None:
            if self._gap:
                raise _Trimmed(self._broken)
            raise StoreError(self._broken)
        self.replayed = self.state.seq - start

    def _install_loaded(self, records: list[Record]) -> None:
        self.state.install(records)
        self.log.extend(records)

    # -- serving -----------------------------------------------------------------------------
    async def _run(self) -> None:
        """Connect (for as long as it takes), then follow the log and publish."""
        while True:
            try:
                nc = await self._connect(serving=True)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nats-py retries by itself; a TLS error, say, not
                self._trouble = f"cannot connect to NATS: {_describe(exc)}"
                self._outage_changed()
                await asyncio.sleep(1.0)
        self._nc = nc
        self._connected = nc.is_connected
        self.max_payload = nc.max_payload
        self._reader = StreamReader(
            nc,
            self.stream,
            self.subjects.log,
            position=lambda: self._last,
            on_message=self._on_log,
            before_create=self._check_stream,
            on_trouble=self._on_trouble,
            heartbeat=HEARTBEAT,
            request_timeout=REQUEST_TIMEOUT,
        )
        self._reader.start()
        assert self._nc_ready is not None
        self._nc_ready.set()
        self._outage_changed()

    async def _check_stream(self) -> None:
        """Before each new consumer: the stream is still the one this node loaded."""
        assert self._nc is not None
        info = await self._stream_info(self._nc)
        if info is None:
            raise ReaderError(
                f"the JetStream stream {self.stream!r} does not exist (deleted?); restart "
                "the nodes to create a new one",
                404,
                _STREAM_NOT_FOUND,
            )
        epoch = epoch_of(self.stream, str(info["created"]))
        if epoch != self.epoch:
            self._break(
                f"the JetStream stream {self.stream!r} was deleted and created again (epoch "
                f"{epoch}, this node has {self.epoch}): restart this node to follow the new one"
            )
            raise StopReading

    def _on_trouble(self, reason: str | None) -> None:
        if reason is not None and not self._connected:
            return  # the connection is the reason
        self._trouble = None if reason is None else f"cannot read the NATS stream: {reason}"
        self._outage_changed()

    def _break(self, reason: str) -> None:
        """This node cannot follow the stream any more: say so, refuse publishes."""
        if self._broken is not None:
            return
        self._broken = reason
        self._outage_changed()
        self._fail_pending(reason)

    def _on_log(self, sseq: int, msg: Msg) -> None:
        """One ``S.log`` message, in stream order (the reader's callback, loop thread)."""
        try:
            self._read(sseq, msg)
        except Exception:
            log.exception("internal error while installing stream message %d", sseq)
            self._break(
                f"internal error while installing message {sseq} of stream {self.stream}; "
                "restart this node"
            )

    def _read(self, sseq: int, msg: Msg) -> None:
        if sseq <= self._last or self._broken is not None:
            return  # installed already (this node's own, at its ack)
        hdrs = msg.headers or {}
        try:
            fmt = int(hdrs[FORMAT_HEADER])
            prev = int(hdrs[PREV_HEADER])
            first = int(hdrs[SEQ_HEADER])
        except (KeyError, ValueError):
            self._skip(sseq, "it was not written by statecast")
            return
        if fmt > FORMAT:
            self._break(
                f"stream {self.stream} message {sseq} has format {fmt}, newer than this "
                f"statecast understands ({FORMAT}): upgrade statecast"
            )
            return
        if prev != self._last:
            self._gap = True
            self._break(
                f"this node has read the log of stream {self.stream} up to message "
                f"{self._last}, but the next one ({sseq}) follows message {prev}: the "
                "messages between were trimmed while this node was behind; restart it"
            )
            return
        if first != self.state.seq + 1:
            self._skip(sseq, f"it starts at seq {first}, not {self.state.seq + 1}")
            return
        group = self._inflight
        if group is not None and not group.settled and hdrs.get(MSG_ID_HEADER) == group.msg_id:
            self._apply_own(group, sseq)
            return
        try:
            batches, keys = decode_group(msg.data, fmt)
        except (msgspec.DecodeError, ValueError):
            self._skip(sseq, "its body is not a list of batches")
            return
        count = sum(len(b) for b in batches)
        if str(count) != hdrs.get(COUNT_HEADER, str(count)):
            self._skip(sseq, f"it holds {count} changes, its header says {hdrs[COUNT_HEADER]}")
            return
        install = self._install or self._install_loaded
        seq = first
        for i, batch in enumerate(batches):
            if batch:
                records = encode_batch(batch, seq)
                seq += len(records)
                install(records)
            key = keys.get(i)
            if key is not None:
                self.keys.add(key[0], seq - 1, key[1])
        self._advance(sseq)

    def _skip(self, sseq: int, why: str) -> None:
        """Every node skips the same messages: the ones that cannot be statecast's."""
        self.skipped += 1
        log.error("stream %s: skipping log message %d: %s", self.stream, sseq, why)
        self._advance(sseq)

    def _advance(self, sseq: int) -> None:
        self._last = sseq
        if self._waiters:
            keep = []
            for target, fut in self._waiters:
                if target <= sseq:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((target, fut))
            self._waiters = keep

    # -- publishing ----------------------------------------------------------------------------
    async def _publisher(self) -> None:
        work = self._work
        assert work is not None
        while True:
            await work.wait()
            work.clear()
            while self._queue:
                group = self._next_group()
                if group is None:
                    continue
                self._inflight = group
                try:
                    await self._store(group)
                except asyncio.CancelledError:
                    self._fail_group(group, ShuttingDown("the server is shutting down"))
                    raise
                except Exception:
                    log.exception("internal error while publishing to NATS")
                    self._fail_group(group, InternalError("internal error while publishing"))
                finally:
                    self._inflight = None

    def _next_group(self) -> _Group | None:
        """The next jobs that go into one message; failed jobs are answered on the way."""
        queue = self._queue
        reason = self._unavailable()
        if reason is not None:
            while queue:
                self._settle_job(queue.popleft(), Unavailable(reason))
            self._check_flushes()
            return None
        error = queue[0].error
        if error is not None:
            self._settle_job(queue.popleft(), error)
            self._check_flushes()
            return None
        self._groups += 1
        group = _Group([queue.popleft()], f"{self.node}.{self._groups}")
        self._grow(group)
        return group

    def _grow(self, group: _Group) -> None:
        """Move queued jobs into a group that is not stored yet, as many as fit."""
        queue = self._queue
        size = group.size + 8
        count = group.count
        limit = self.max_payload - _HEADROOM
        taken = 0
        while queue and queue[0].error is None:
            job = queue[0]
            if size + len(job.body) > limit or count + len(job.batch) > _MAX_GROUP_CHANGES:
                break
            group.jobs.append(queue.popleft())
            size += len(job.body)
            count += len(job.batch)
            taken += 1
        if taken:
            group.seal()

    async def _store(self, group: _Group) -> None:
        """Publish one group until JetStream has stored it after what this node read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PUBLISH_DEADLINE
        group.waiter = loop.create_future()
        if self._nc is None:
            assert self._nc_ready is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nc_ready.wait(), deadline - loop.time())
        while not group.settled:
            reason = self._unavailable() or (
                None if self._nc is not None else "this node cannot reach NATS"
            )
            if reason is not None:
                self._fail_group(group, Unavailable(reason))
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._fail_group(
                    group,
                    Unavailable(
                        f"JetStream did not store the batch within {PUBLISH_DEADLINE:g}s "
                        "(other nodes kept writing first, or this node is far behind)"
                    ),
                )
                return
            prev = self._last
            if not self._decide(group):
                return  # every batch of it was a duplicate or a conflict: nothing to send
            answer = await self._attempt(group, prev, min(remaining, REQUEST_TIMEOUT))
            if answer is None:
                return
            error = answer.get("error")
            if error is not None:
                description = str(error.get("description", "unknown error"))
                if error.get("err_code") != _WRONG_LAST:
                    self._fail_group(
                        group, Unavailable(f"JetStream refused the batch: {description}")
                    )
                    return
                # Another node wrote first: read up to what it wrote, then try again.
                self.conflicts += 1
                m = _LAST_SEQ_RE.search(description)
                target = int(m.group(1)) if m else prev + 1
                if target <= prev:
                    self._fail_group(
                        group,
                        Unavailable(
                            f"the log of stream {self.stream} ends at message {target}, "
                            f"before this node's position ({prev}): was it purged by hand?"
                        ),
                    )
                    return
                await self._wait_position(target, deadline)
                # What was published meanwhile goes along: fewer rounds under contention.
                self._grow(group)
                continue
            sseq = int(answer["seq"])
            if not answer.get("duplicate") and self._last == prev:
                self._apply_own(group, sseq)  # it follows what this node read: install it now
                return
            # Installed when the reader gets to it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(group.waiter), deadline - loop.time())
            if not group.settled:
                self._fail_group(
                    group,
                    Unavailable(
                        f"the batch was stored (stream seq {sseq}) but this node has not read "
                        "it back in time; every node applies it"
                    ),
                )
            return

    def _decide(self, group: _Group) -> bool:
        """§3.3: answer the batches of ``group`` that must not be written, against the
        state after the last message read, which the group is sent to follow (if
        another node writes first, JetStream refuses it and this runs again): a key
        already written is a duplicate, an if_seq that does not hold a conflict; each
        batch is decided on the state its predecessors in the group leave. False when
        none is left."""
        if not any(j.key is not None or j.conditions is not None for j in group.jobs):
            return True
        now = time.time()
        get = self.state.get
        written: dict[tuple[str, str], int] = {}  # by the group's batches kept so far

        def seq_of(collection: str, key: str) -> int:
            hit = written.get((collection, key))
            if hit is not None:
                return hit
            rec = get(collection, key)
            return 0 if rec is None else rec.seq

        kept: list[_Job] = []
        seq = self.state.seq
        for job in group.jobs:
            if job.key is not None:
                first = self.keys.seq_of(job.key[0], now)
                if first is not None:
                    self._settle_job(job, AlreadyApplied(first))
                    continue
            if job.conditions is not None:
                conflict = check_conditions(job.batch, job.conditions, seq_of)
                if conflict is not None:
                    self._settle_job(job, conflict)
                    continue
            for c in job.batch:
                seq += 1
                written[(c[0], c[1])] = seq if c[3] is not None else 0
            kept.append(job)
        if len(kept) < len(group.jobs):
            group.jobs = kept
            if not kept:
                group.settled = True
                if group.waiter is not None and not group.waiter.done():
                    group.waiter.set_result(None)
                self._check_flushes()
                return False
            group.seal()
        return True

    async def _attempt(self, group: _Group, prev: int, seconds: float) -> dict[str, Any] | None:
        """Send the group once, after stream message ``prev``: JetStream's answer, or None
        when the group is settled meanwhile (or here, on a failure)."""
        nc = self._nc
        assert nc is not None
        assert group.waiter is not None
        headers = {
            MSG_ID_HEADER: group.msg_id,
            PREV_HEADER: str(prev),
            FORMAT_HEADER: str(group.format),
            SEQ_HEADER: str(self.state.seq + 1),
            COUNT_HEADER: str(group.count),
        }
        request = asyncio.get_running_loop().create_task(
            nc.request(self.subjects.log, group.body, timeout=seconds, headers=headers)
        )
        # A lost connection settles the group at once: stop waiting for the answer then.
        either: set[asyncio.Future[Any]] = {request, group.waiter}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if group.settled:
            request.cancel()
            with contextlib.suppress(BaseException):
                await request
            return None
        try:
            reply = request.result()
        except nats.errors.NoRespondersError:
            self._fail_group(
                group,
                Unavailable(
                    f"the JetStream stream {self.stream!r} does not exist (deleted?); "
                    "restart the nodes to create a new one"
                ),
            )
            return None
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self._fail_group(
                group,
                Unavailable(
                    f"JetStream did not answer ({_describe(exc)}): the batch may or may not "
                    "have been stored (if it was, every node applies it)"
                ),
            )
            return None
        answer = msgspec.json.decode(reply.data)
        assert isinstance(answer, dict)
        return answer

    async def _wait_position(self, target: int, deadline: float) -> None:
        if self._last >= target:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, fut))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))

    def _apply_own(self, group: _Group, sseq: int) -> None:
        """This node's group is stored at ``sseq``, right after what it read: install it
        (through the engine's callbacks) and ack."""
        before = self.state.seq
        self._advance(sseq)
        seq = before + 1
        group.settled = True
        self.groups_published += 1
        for job in group.jobs:
            records = encode_batch(job.batch, seq)
            seq += len(records)
            if job.key is not None:
                self.keys.add(job.key[0], seq - 1, job.key[1])
            job.done(records, None)
        self._completed += len(group.jobs)
        if group.waiter is not None and not group.waiter.done():
            group.waiter.set_result(None)
        self._check_flushes()
        interval = self.checkpoint_interval
        if (seq - 1) // interval > before // interval:
            self._start_checkpoint()

    def _settle_job(self, job: _Job, error: ProtocolError) -> None:
        self._completed += 1
        job.done(None, error)

    def _fail_group(self, group: _Group, error: ProtocolError) -> None:
        if group.settled:
            return
        group.settled = True
        for job in group.jobs:
            self._settle_job(job, type(error)(error.message))
        if group.waiter is not None and not group.waiter.done():
            group.waiter.set_result(None)
        self._check_flushes()

    def _fail_pending(self, inflight_reason: str) -> None:
        """The in-flight group (outcome unknown) and everything queued fail now, in order."""
        if self._inflight is not None:
            self._fail_group(self._inflight, Unavailable(inflight_reason))
        reason = self._unavailable() or inflight_reason
        while self._queue:
            self._settle_job(self._queue.popleft(), Unavailable(reason))
        self._check_flushes()

    def _check_flushes(self) -> None:
        if self._flushes:
            ready = [done for target, done in self._flushes if target <= self._completed]
            self._flushes = [(t, d) for t, d in self._flushes if t > self._completed]
            for done in ready:
                done()

    # -- checkpoints and trimming -----------------------------------------------------------
    def _start_checkpoint(self) -> None:
        if self._closing:
            return
        if self._checkpoint_task is not None and not self._checkpoint_task.done():
            self._checkpoint_wanted = True  # another one right after this one
            return
        self._checkpoint_wanted = False
        loop = asyncio.get_running_loop()
        self._checkpoint_task = loop.create_task(self._checkpoint(), name="statecast-checkpoint")
        self._checkpoint_task.add_done_callback(self._checkpoint_done)

    def _checkpoint_done(self, task: asyncio.Task[None]) -> None:
        if self._checkpoint_wanted and not self._closing and self._unavailable() is None:
            self._start_checkpoint()

    async def _checkpoint(self) -> None:
        nc = self._nc
        assert nc is not None
        t0 = time.monotonic()
        try:
            manifest = await self._write_checkpoint(nc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("writing a checkpoint to stream %s failed: %s", self.stream, _describe(exc))
            return
        log.info(
            "checkpoint %s: seq %d, %d records, %d bytes in %d messages, in %.2fs",
            manifest.id,
            manifest.seq,
            manifest.records,
            manifest.bytes,
            manifest.chunks,
            time.monotonic() - t0,
        )
        try:
            await self._trim(nc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("trimming stream %s failed: %s", self.stream, _describe(exc))

    async def _write_checkpoint(self, nc: NATS) -> Manifest:
        """The state as of now, in chunks, then its manifest.

        It walks the collections itself under an open snapshot, by the same rules as
        ``Snapshot.read`` (core/state.py): positions below the ends taken now are stable
        while a snapshot is open, and a record newer than the snapshot chains back to
        the version it replaced. So the state keeps changing meanwhile.
        """
        state = self.state
        snap = state.snapshot()
        try:
            seq, log_seq = snap.seq, self._last
            colls = list(state.collections.values())
            ends = [len(c.slots) for c in colls]
            self._groups += 1
            cid = f"{self.node}-{self._groups}"
            subject = self.subjects.chunk(cid)
            budget = max(64 * 1024, self.max_payload // 2)
            rows: list[tuple[str, str, int, bytes]] = []
            size = chunks = records = nbytes = first_chunk = 0

            async def put() -> None:
                nonlocal rows, size, chunks, nbytes, first_chunk
                body = encode_chunk(rows)
                sseq = await self._publish_data(nc, subject, body)
                first_chunk = first_chunk or sseq
                chunks += 1
                nbytes += len(body)
                rows = []
                size = 0

            for coll, end in zip(colls, ends, strict=True):
                slots = coll.slots
                for pos in range(end):
                    rec: Record | None = slots[pos]
                    while rec is not None and rec.seq > seq:
                        rec = rec.prev
                    if rec is None or rec.deleted:
                        continue
                    rows.append((rec.collection, rec.key, rec.seq, rec.line))
                    records += 1
                    size += len(rec.line) + len(rec.key) + len(rec.collection) + 16
                    if size >= budget:
                        await put()
            if rows or not chunks:
                await put()  # at least one, maybe empty: trimming goes by its position
        finally:
            snap.close()
        manifest = Manifest(
            id=cid,
            seq=seq,
            log_seq=log_seq,
            records=records,
            chunks=chunks,
            bytes=nbytes,
            epoch=self.epoch,
            node=self.node,
            created=datetime.now(UTC).isoformat(),
            first_chunk=first_chunk,
        )
        await self._publish_data(nc, self.subjects.manifests, encode_manifest(manifest))
        self.checkpoints_written += 1
        return manifest

    async def _publish_data(self, nc: NATS, subject: str, body: bytes) -> int:
        reply = await nc.request(subject, body, timeout=REQUEST_TIMEOUT)
        answer = msgspec.json.decode(reply.data)
        if "error" in answer:
            raise ReaderError(str(answer["error"].get("description", "refused")))
        return int(answer["seq"])

    async def _trim(self, nc: NATS) -> None:
        """Keep the newest checkpoint that is at least ``retain`` changes old, the log after
        it, and every newer checkpoint; remove the rest.

        The message at the kept checkpoint's ``log_seq`` stays too (it is in the
        checkpoint): the log subject never becomes empty, which the chain of
        ``Nats-Expected-Last-Subject-Sequence`` needs.
        """
        manifests = await self._manifests(nc)
        tip = self.state.seq
        old = [(s, m) for s, m in manifests if m.epoch == self.epoch and m.seq <= tip - self.retain]
        if not old:
            return
        keep_at, keep = max(old, key=lambda sm: sm[1].seq)
        s = self.subjects
        # Not past what a node reading the log (following, catching up, starting) still
        # needs: the lowest position of the log's consumers.
        upto = min(keep.log_seq, await self._readers_floor(nc))
        if upto > 1:
            await self._purge(nc, self.stream, s.log, upto)
        if keep.first_chunk > 1:
            await self._purge(nc, s.checkpoints, s.chunks, keep.first_chunk)
        if keep_at > 1:
            await self._purge(nc, s.checkpoints, s.manifests, keep_at)
        self.trims += 1
        log.debug("trimmed stream %s to checkpoint %s (seq %d)", self.stream, keep.id, keep.seq)

    async def _readers_floor(self, nc: NATS) -> int:
        """The lowest stream seq that a consumer of the log has yet to read."""
        floor = 1 << 62
        offset = 0
        while True:
            page = await api_request(
                nc, f"$JS.API.CONSUMER.LIST.{self.stream}", {"offset": offset}, REQUEST_TIMEOUT
            )
            consumers = page.get("consumers") or []
            for c in consumers:
                delivered = int((c.get("delivered") or {}).get("stream_seq", 0))
                floor = min(floor, delivered + 1)
            offset += len(consumers)
            if not consumers or offset >= int(page.get("total", 0)):
                return floor

    # -- closing ----------------------------------------------------------------------------------
    async def _aclose(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        if self._checkpoint_task is not None:
            tasks.append(self._checkpoint_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        while self._queue:
            self._settle_job(self._queue.popleft(), ShuttingDown("the server is shutting down"))
        self._check_flushes()
        for _, fut in self._waiters:
            fut.cancel()
        self._waiters = []
        if self._reader is not None:
            await self._reader.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
