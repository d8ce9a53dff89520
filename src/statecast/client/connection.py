"""The asyncio client: one connection to a statecast server (docs/client.md).

::

    async with statecast.Client("tcp://127.0.0.1:8989") as client:
        seq = await client.publish([statecast.Change("orders", "O-1", {"qty": 100})])
        async for frame in client.sync(live=True):
            ...   # Record frames, SnapshotEnd, then Change frames, forever

Frames are typed (:class:`Record`, :class:`ChangeFrame`, ...); errors come from the
one exception hierarchy (:mod:`statecast.errors`). Many publishes may be in flight at
once; each one's future resolves with its ack. For a local copy of the state that
stays in sync through disconnects, use :class:`statecast.Replica`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import urlsplit

import msgspec

from statecast.core.frames import (
    RECORD_PREFIX,
    Ack,
    Bye,
    ErrorFrame,
    Frame,
    Hello,
    Pong,
    RequestId,
    SnapshotEnd,
    Stats,
    Subscribed,
    decode_frame,
)
from statecast.core.protocol import Change, prepare_changes
from statecast.errors import (
    BadFrame,
    ConfigError,
    ConnectionClosed,
    ServerBye,
    StatecastError,
    Timeout,
)

__all__ = ["DEFAULT_URL", "Client", "parse_url"]

DEFAULT_URL = "tcp://127.0.0.1:8989"


# Answers that resolve a request's future; the others go to the frame stream.
_ANSWERS = (Ack, Pong, Subscribed, Stats, ErrorFrame)


def parse_url(url: str) -> tuple[str, int]:
    """``tcp://host:port`` (or ``host:port``, ``host``) to ``(host, port)``."""
    if "://" not in url:
        url = "tcp://" + url
    parts = urlsplit(url)
    if parts.scheme != "tcp":
        raise ConfigError(f"unsupported URL scheme {parts.scheme!r} in {url!r}: use tcp://")
    try:
        port = parts.port or 8989
    except ValueError:
        raise ConfigError(f"invalid port in {url!r}") from None
    return parts.hostname or "127.0.0.1", port


class Client:
    """One connection. Not thread-safe: use it from one event loop."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        connect_timeout: float = 10.0,
        max_line: int = 64 * 1024 * 1024,
        queue_chunks: int = 64,
    ) -> None:
        self.url = url
        self.host, self.port = parse_url(url)
        self.connect_timeout = connect_timeout
        self.max_line = max_line
        self.hello: Hello | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[RequestId, asyncio.Future[Any]] = {}
        # Unsolicited frames (snapshots, changes, heartbeats, bye), one list per chunk
        # read, bounded: a slow consumer stops the reader, and TCP pushes back to the
        # server (which cuts a subscriber off past --max-pending, §7).
        self._frames: asyncio.Queue[list[Frame | bytes] | BaseException] = asyncio.Queue(
            queue_chunks
        )
        self._ready: collections.deque[Frame | bytes] = collections.deque()  # off the queue
        self._raw_records = False  # pass record lines on undecoded (sync_raw)
        self._ids = itertools.count(1)
        self._closed: BaseException | None = None
        self.bytes_received = 0

    # -- connection ----------------------------------------------------------------
    async def connect(self) -> Hello:
        """Open the connection; returns the server's hello (§2)."""
        writer = None
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, limit=self.max_line
                )
                line = await reader.readline()
        except TimeoutError:
            if writer is not None:
                writer.close()
            raise Timeout(
                f"cannot connect to {self.url}: no hello within {self.connect_timeout}s"
            ) from None
        except (OSError, ValueError) as exc:
            if writer is not None:
                writer.close()
            raise ConnectionClosed(f"cannot connect to {self.url}: {exc}") from exc
        self._reader, self._writer = reader, writer
        self.bytes_received += len(line)
        try:
            hello = decode_frame(line)
        except msgspec.MsgspecError:
            hello = None
        if not isinstance(hello, Hello):
            writer.close()
            raise ConnectionClosed(f"{self.url} is not a statecast server (no hello)")
        self.hello = hello
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return hello

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_all(ConnectionClosed("the connection was closed"))

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def epoch(self) -> str:
        return self.hello.epoch if self.hello else ""

    # -- requests ------------------------------------------------------------------
    async def publish(self, changes: Iterable[Change | Mapping[str, Any]] | Change) -> int:
        """Publish one atomic batch; returns the seq of its last change once the
        server has applied (with a durable store: committed) it."""
        batch = [
            {"collection": c, "key": k, "delete": True}
            if v is None
            else {"collection": c, "key": k, "value": msgspec.Raw(v)}
            for c, k, _kj, v in prepare_changes(changes)
        ]
        ack = await self._request({"op": "publish", "changes": batch})
        assert isinstance(ack, Ack)
        return ack.seq

    async def ping(self) -> int:
        """The server's current seq."""
        pong = await self._request({"op": "ping"})
        assert isinstance(pong, Pong)
        return pong.seq

    async def stats(self) -> Stats:
        stats = await self._request({"op": "stats"})
        assert isinstance(stats, Stats)
        return stats

    async def subscribe(
        self,
        *,
        after: int | None = None,
        epoch: str | None = None,
        collections: Iterable[str] | None = None,
    ) -> Subscribed:
        """Subscribe to changes after seq ``after`` (default: now); they arrive
        through :meth:`frames`. Raises :class:`ResyncRequired` when the server cannot
        resume from there (§3.2)."""
        req: dict[str, Any] = {"op": "subscribe"}
        if after is not None:
            req["from"] = after
        if epoch is not None:
            req["epoch"] = epoch
        if collections is not None:
            req["collections"] = list(collections)
        sub = await self._request(req)
        assert isinstance(sub, Subscribed)
        return sub

    async def sync(
        self, *, collections: Iterable[str] | None = None, live: bool = False
    ) -> AsyncIterator[Frame]:
        """Request a snapshot (§3.1): yields SnapshotBegin, the Records and
        SnapshotEnd; with ``live``, then every later frame (changes, heartbeats) until
        the connection ends."""
        async for frame in self._sync(collections, live, raw=False):
            assert not isinstance(frame, bytes)
            yield frame

    async def sync_raw(
        self, *, collections: Iterable[str] | None = None
    ) -> AsyncIterator[Frame | bytes]:
        """Like :meth:`sync` (not live), but each record comes as the raw bytes of its
        ``record`` line (without the newline), not decoded: for copying a snapshot
        somewhere as fast as it arrives (``statecast sync``)."""
        async for frame in self._sync(collections, False, raw=True):
            yield frame

    async def _sync(
        self, collections: Iterable[str] | None, live: bool, *, raw: bool
    ) -> AsyncIterator[Frame | bytes]:
        rid = next(self._ids)
        req: dict[str, Any] = {"op": "sync", "id": rid}
        if collections is not None:
            req["collections"] = list(collections)
        if live:
            req["live"] = True
        self._raw_records = raw  # before the request: the reader sees it in time
        self._send(req)
        try:
            async for frame in self._frames_or_raw():
                if isinstance(frame, ErrorFrame) and frame.id == rid:
                    raise frame.exception()
                yield frame
                if not live and isinstance(frame, SnapshotEnd) and frame.id == rid:
                    return
        finally:
            self._raw_records = False

    async def frames(self) -> AsyncIterator[Frame]:
        """The frames the server sends on its own, in order. Ends with the connection
        (after a :class:`Bye`, or by raising :class:`ConnectionClosed` or the error
        that closed it)."""
        async for frame in self._frames_or_raw():
            if not isinstance(frame, bytes):
                yield frame

    async def _frames_or_raw(self) -> AsyncIterator[Frame | bytes]:
        ready = self._ready
        while True:
            if ready:
                # One at a time from the deque: a consumer that stops iterating leaves
                # the rest for the next one.
                yield ready.popleft()
                continue
            item = await self._frames.get()
            if isinstance(item, BaseException):
                self._frames.put_nowait(item)  # for the next reader too
                if isinstance(item, ServerBye):
                    return  # the server said bye: the stream ends normally
                raise item
            ready.extend(item)

    # -- internals -----------------------------------------------------------------
    def _send(self, req: dict[str, Any]) -> None:
        if self._closed is not None:
            raise ConnectionClosed(f"the connection to {self.url} is closed") from self._closed
        if self._writer is None:
            raise ConnectionClosed("not connected: call connect() first")
        self._writer.write(msgspec.json.encode(req) + b"\n")

    async def _request(self, req: dict[str, Any]) -> Frame:
        rid = next(self._ids)
        req["id"] = rid
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._send(req)
            answer = await fut
        finally:
            self._pending.pop(rid, None)
        if isinstance(answer, ErrorFrame):
            raise answer.exception()
        return cast(Frame, answer)

    async def _read_loop(self) -> None:
        """Read big chunks, decode every whole line in them, answer the pending
        requests, and queue the other frames in one list per chunk (one queue
        operation per chunk, not per frame: a large snapshot is millions of frames)."""
        reader = self._reader
        assert reader is not None
        error: BaseException | None = None
        buf = b""
        try:
            while error is None:
                chunk = await reader.read(1 << 18)
                if not chunk:
                    error = ConnectionClosed(
                        f"{self.url} closed the connection" + (" mid-frame" if buf else "")
                    )
                    break
                self.bytes_received += len(chunk)
                lines = (buf + chunk).split(b"\n")
                buf = lines.pop()
                if len(buf) > self.max_line:
                    error = BadFrame(f"a frame longer than {self.max_line} bytes")
                    break
                batch: list[Frame | bytes] = []
                for line in lines:
                    if not line:
                        continue
                    if self._raw_records and line.startswith(RECORD_PREFIX):
                        batch.append(line)  # sync_raw: passed on as it came
                        continue
                    try:
                        frame = decode_frame(line)
                    except msgspec.ValidationError:
                        continue  # a frame type this client does not know: ignore it
                    except msgspec.DecodeError as exc:
                        error = BadFrame(f"malformed frame from the server: {exc}")
                        break
                    if isinstance(frame, _ANSWERS) and frame.id in self._pending:
                        fut = self._pending.pop(frame.id)
                        if not fut.done():
                            fut.set_result(frame)
                        continue
                    # An error frame without id (slow_consumer, too_large) is about the
                    # connection itself, which is about to close: it joins the stream.
                    batch.append(frame)
                    if isinstance(frame, Bye):
                        error = ServerBye(frame.reason)
                        break
                if batch:
                    await self._frames.put(batch)  # waits while the consumer is behind
        except (OSError, ConnectionError) as exc:
            error = ConnectionClosed(f"connection to {self.url} lost: {exc}")
        assert error is not None
        self._fail_pending(error)
        await self._frames.put(error)  # the end of the stream, after every frame

    def _fail_pending(self, error: BaseException) -> None:
        if self._closed is None:
            self._closed = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(
                    error
                    if isinstance(error, StatecastError)
                    else ConnectionClosed(f"the connection to {self.url} ended")
                )
        self._pending.clear()

    def _fail_all(self, error: BaseException) -> None:
        self._fail_pending(error)
        with contextlib.suppress(asyncio.QueueFull):
            self._frames.put_nowait(error)
