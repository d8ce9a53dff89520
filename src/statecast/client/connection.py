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

``tls://HOST:PORT`` speaks the same protocol over TLS, verifying the server's
certificate (against the system's CAs, or ``ca_file=``) and its name. ``token=`` or
``token_provider=`` authenticates the connection (§3.8) before :meth:`Client.connect`
returns; with a provider, the token is refreshed on the same connection before it
expires.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
import math
import os
import ssl as _ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypeAlias, cast
from urllib.parse import urlsplit

import msgspec

from statecast.core.frames import (
    RECORD_PREFIX,
    Ack,
    Authed,
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
    skippable,
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

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_URL",
    "Address",
    "Client",
    "TokenProvider",
    "check_token_settings",
    "client_ssl_context",
    "parse_address",
    "parse_url",
    "refresh_delay",
    "tls_context_for",
]

log = logging.getLogger("statecast.client")

DEFAULT_PORT: Final = 8989
DEFAULT_URL: Final = "tcp://127.0.0.1:8989"

TokenProvider: TypeAlias = Callable[[], str | Awaitable[str]]
"""Returns a fresh access token: a plain function (run in a worker thread, so it may
block on I/O) or an async one (run on the event loop)."""

# Answers that resolve a request's future; the others go to the frame stream.
_ANSWERS = (Ack, Pong, Subscribed, Stats, Authed, ErrorFrame)

# Sent right after connecting over plain TCP: empty lines, which a statecast server
# ignores (§1), but which a TLS server reads as a broken record and closes the
# connection at once, so that tcp:// against a TLS port fails at once and says why,
# instead of waiting for a hello that never comes.
_PLAIN_PROBE: Final = b"\n" * 8

# TLS record types a TLS server may answer a plain client with (alert, handshake).
_TLS_RECORD_STARTS: Final = (b"\x15\x03", b"\x16\x03")


class Address(NamedTuple):
    """Where a client connects: ``scheme`` is ``"tcp"`` or ``"tls"``."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "tls"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


_HTTP_SCHEMES: Final = ("ws", "wss", "http", "https")


def parse_address(url: str) -> Address:
    """``tcp://host:port``, ``tls://host:port`` (or ``host:port``, ``host``: tcp) to an
    :class:`Address`; the port defaults to 8989. :class:`ConfigError` naming the URL
    for anything else."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"invalid server URL {url!r}: use tcp://HOST:PORT or tls://HOST:PORT")
    text = url.strip()
    if any(c.isspace() for c in text):
        raise ConfigError(f"invalid server URL {url!r}: it contains whitespace")
    if "://" not in text:
        text = "tcp://" + text
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ConfigError(f"invalid server URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in _HTTP_SCHEMES:
        raise ConfigError(
            f"{url!r}: the Python client speaks the TCP protocol, not HTTP or WebSocket: "
            f"use tcp://HOST:PORT or tls://HOST:PORT with the server's TCP port "
            f"(default {DEFAULT_PORT}), not its HTTP port"
        )
    if scheme not in ("tcp", "tls"):
        raise ConfigError(
            f"unsupported URL scheme {parts.scheme!r} in {url!r}: use tcp:// or tls://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"invalid server URL {url!r}: only {scheme}://HOST:PORT, no path")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"invalid server URL {url!r}: no user in the URL (give a token with token=)"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid port in {url!r} (1 to 65535)") from None
    if port == 0:
        raise ConfigError(f"invalid port in {url!r} (1 to 65535)")
    return Address(scheme, parts.hostname or "127.0.0.1", port or DEFAULT_PORT)


def parse_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of a URL (see :func:`parse_address`)."""
    address = parse_address(url)
    return address.host, address.port


def client_ssl_context(ca_file: str | os.PathLike[str] | None = None) -> _ssl.SSLContext:
    """The TLS settings of a ``tls://`` client: verify the server's certificate and
    name, against ``ca_file`` (a PEM bundle) or, without one, the system's CAs.
    :class:`ConfigError` naming the file when it cannot be loaded."""
    try:
        ctx = _ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file))
    except (OSError, _ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"cannot load the CA file {os.fspath(ca_file or '')}: {reason}") from None
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    return ctx


def tls_context_for(
    address: Address, ca_file: str | os.PathLike[str] | None, ssl: _ssl.SSLContext | None
) -> _ssl.SSLContext | None:
    """The context a client at ``address`` uses (``None`` for tcp://), checking that
    the TLS settings fit the URL."""
    if ca_file is not None and ssl is not None:
        raise ConfigError("give ca_file or ssl, not both (load the CA into the SSLContext)")
    if not address.tls:
        if ca_file is not None or ssl is not None:
            raise ConfigError(
                f"{address} is plain TCP: ca_file and ssl are for tls:// URLs "
                f"(did you mean tls://{str(address).removeprefix('tcp://')}?)"
            )
        return None
    if ssl is not None:
        if not isinstance(ssl, _ssl.SSLContext):
            raise ConfigError(f"ssl must be an ssl.SSLContext, not {type(ssl).__name__}")
        return ssl
    return client_ssl_context(ca_file)


def check_token_settings(token: object, token_provider: object) -> None:
    """:class:`ConfigError` unless ``token`` / ``token_provider`` make sense."""
    if token is not None and token_provider is not None:
        raise ConfigError("give token or token_provider, not both")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError("token must be a non-empty string")
    if token_provider is not None and not callable(token_provider):
        raise ConfigError("token_provider must be a callable that returns a token")


def _tls_failure(url: str, exc: OSError, ca_file: str | None) -> str:
    """What went wrong in a TLS handshake, for people."""
    if isinstance(exc, _ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        if "mismatch" in why.lower():
            hint = "the certificate does not name the URL's host"
        elif ca_file is not None:
            hint = f"is {ca_file} the CA that signed the server's certificate?"
        else:
            hint = "checked against the system's CAs; give the server's CA with ca_file"
        return (
            f"TLS handshake with {url} failed: certificate verification failed: "
            f"{why.rstrip('.')} ({hint})"
        )
    reason = getattr(exc, "reason", None) or str(exc)
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return (
            f"TLS handshake with {url} failed: the server did not answer in TLS "
            f"({reason}): is it a plain port? then use tcp://"
        )
    return f"TLS handshake with {url} failed: {reason}"


def refresh_delay(remaining: float) -> float:
    """Seconds to wait before refreshing a token that has ``remaining`` seconds left:
    at about 80% of the lifetime, but at least 5 seconds before the end (and, for very
    short tokens, halfway)."""
    if remaining <= 0:
        return 0.0
    lead = max(0.2 * remaining, min(5.0, 0.5 * remaining))
    return remaining - lead


def _frame_of(line: bytes) -> Frame | BadFrame | None:
    """One frame line: the frame; None for a type this client does not know (from a
    newer server: ignored); BadFrame when the stream is unusable: not JSON, not UTF-8
    (msgspec raises UnicodeDecodeError for a string), nested past the parser, or a
    frame it knows with a field it cannot read (skipping that would leave a copy stale
    while it looks live)."""
    try:
        return decode_frame(line)
    except msgspec.ValidationError as exc:
        if skippable(line):
            return None
        return BadFrame(f"malformed frame from the server: {exc}")
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return BadFrame(f"malformed frame from the server: {exc}")


class Client:
    """One connection. Not thread-safe: use it from one event loop.

    ``url``: ``tcp://HOST:PORT`` or ``tls://HOST:PORT``. With TLS, ``ca_file`` is a PEM
    bundle of the CAs to trust (default: the system's), or ``ssl`` an
    :class:`ssl.SSLContext` for full control; the server's name is checked against the
    URL's host either way (unless the context says otherwise).

    ``token`` (a string) or ``token_provider`` (a callable returning one, plain or
    async) authenticates the connection (§3.8); :attr:`authed` then holds what the
    token grants. A provider is also called to refresh the token before it expires.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        connect_timeout: float = 10.0,
        max_line: int = 64 * 1024 * 1024,
        queue_chunks: int = 64,
    ) -> None:
        self.url = url
        self.address = parse_address(url)
        self.host, self.port = self.address.host, self.address.port
        self._ssl = tls_context_for(self.address, ca_file, ssl)
        self._ca_file = None if ca_file is None else os.fspath(ca_file)
        check_token_settings(token, token_provider)
        self._token = None if token is None else token.strip()
        self._token_provider = token_provider
        self.connect_timeout = connect_timeout
        self.max_line = max_line
        self.hello: Hello | None = None
        self.authed: Authed | None = None  # what the token grants (§3.8), once accepted
        self.refreshes = 0  # tokens refreshed on this connection
        self._stage = ""  # what connect() waits for, for its timeout message
        self._reauthed = asyncio.Event()
        self._refresh_task: asyncio.Task[None] | None = None
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

    @property
    def tls(self) -> bool:
        return self.address.tls

    # -- connection ----------------------------------------------------------------
    async def connect(self) -> Hello:
        """Open the connection; returns the server's hello (§2). With a token, also
        authenticates (§3.8): :class:`~statecast.errors.Unauthorized` if the server
        refuses the token."""
        self._stage = "no TLS handshake" if self.tls else "no hello"
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self.connect_timeout):
                hello = await self._open()
                if self._token is not None or self._token_provider is not None:
                    self._stage = "no token from the token provider"
                    token = await self._next_token()
                    self._stage = "no answer to auth"
                    await self.authenticate(token)
                    if self._token_provider is not None:
                        self._refresh_task = asyncio.get_running_loop().create_task(
                            self._refresh_loop(), name="statecast-token-refresh"
                        )
        except TimeoutError:
            await self.close()
            stage = self._stage
            hint = ""
            if stage == "no hello" and not self.tls:
                hint = " (if that port speaks TLS, use tls://)"
            raise Timeout(
                f"cannot connect to {self.url}: {stage} within {self.connect_timeout}s{hint}"
            ) from None
        except BaseException:
            await self.close()
            raise
        return hello

    async def _open(self) -> Hello:
        """The TCP connection (and TLS handshake), and the hello."""
        try:
            if self._ssl is not None:
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    limit=self.max_line,
                    ssl=self._ssl,
                    server_hostname=self.host,
                )
            else:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, limit=self.max_line
                )
                writer.write(_PLAIN_PROBE)
            self._reader, self._writer = reader, writer
            self._stage = "no hello"
            line = await reader.readline()
        except _ssl.SSLError as exc:
            raise ConnectionClosed(_tls_failure(self.url, exc, self._ca_file)) from exc
        except (OSError, ValueError) as exc:
            raise ConnectionClosed(
                f"cannot connect to {self.url}: {exc or type(exc).__name__}"
            ) from exc
        self.bytes_received += len(line)
        try:
            hello = decode_frame(line)
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            hello = None
        if not isinstance(hello, Hello):
            if not self.tls and line.startswith(_TLS_RECORD_STARTS):
                raise ConnectionClosed(f"{self.url} answered in TLS: use tls://")
            if not self.tls and not line:
                raise ConnectionClosed(
                    f"{self.url} closed the connection without a hello "
                    "(if that port speaks TLS, use tls://)"
                )
            raise ConnectionClosed(f"{self.url} is not a statecast server (no hello)")
        self.hello = hello
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return hello

    async def close(self) -> None:
        refresh, self._refresh_task = self._refresh_task, None
        if refresh is not None:
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh
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

    # -- access tokens (§3.8) ---------------------------------------------------------
    async def authenticate(self, token: str) -> Authed:
        """Send ``auth`` with ``token`` and wait for ``authed`` (also a refresh, on a
        connection that is authenticated already); returns it and keeps it in
        :attr:`authed`. Raises :class:`~statecast.errors.Unauthorized` for a bad token
        (the server then closes a connection that was not authenticated yet) and
        :class:`~statecast.errors.Forbidden` for a refresh that would change the
        subject or the filter, or widen the rights (the old token stays)."""
        answer = await self._request({"op": "auth", "token": token})
        assert isinstance(answer, Authed)
        self.authed = answer
        self._reauthed.set()
        return answer

    async def _next_token(self) -> str:
        provider = self._token_provider
        if provider is None:
            assert self._token is not None
            return self._token
        try:
            if inspect.iscoroutinefunction(provider):
                result: object = await cast(Callable[[], Awaitable[str]], provider)()
            else:
                result = await asyncio.to_thread(provider)
                if inspect.isawaitable(result):
                    result = await result
        except (asyncio.CancelledError, StatecastError):
            raise
        except Exception as exc:
            raise StatecastError(f"the token provider failed: {exc!r}") from exc
        if not isinstance(result, str) or not result.strip():
            raise StatecastError(
                f"the token provider returned {type(result).__name__}, not a token string"
            )
        return result.strip()

    async def _refresh_loop(self) -> None:
        """Refresh the token (from the provider) before it expires, on this connection;
        a failed refresh is logged and retried with backoff until the connection ends
        (the server closes it with ``token_expired`` once the old token runs out)."""
        while self._closed is None:
            self._reauthed.clear()
            authed = self.authed
            if authed is None or authed.exp is None:
                await self._reauthed.wait()  # nothing to refresh until another auth
                continue
            delay = refresh_delay(authed.exp - time.time())
            try:
                async with asyncio.timeout(delay):
                    await self._reauthed.wait()
                continue  # authenticated again meanwhile (authenticate()): start over
            except TimeoutError:
                pass
            await self._refresh(authed.exp)

    async def _refresh(self, exp: float) -> None:
        backoff = 0.5
        while self._closed is None:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self.authenticate(await self._next_token())
            except ConnectionClosed:
                return  # the connection is gone: nothing left to refresh
            except (StatecastError, TimeoutError) as exc:
                left = exp - time.time()
                what = "expired" if left <= 0 else f"expires in {math.ceil(left)}s"
                log.warning(
                    "cannot refresh the access token of %s (%s: %s); the current one %s; "
                    "retrying in %.1fs",
                    self.url,
                    getattr(exc, "code", type(exc).__name__),
                    exc,
                    what,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.refreshes += 1
            log.debug("refreshed the access token of %s", self.url)
            return

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
        where: Mapping[str, Any] | None = None,
        conflate: float | None = None,
    ) -> Subscribed:
        """Subscribe to changes after seq ``after`` (default: now); they arrive
        through :meth:`frames`. Raises :class:`ResyncRequired` when the server cannot
        resume from there (§3.2). ``where`` filters the records (§3.7); ``conflate``
        (seconds) asks for the newest state of each key at most that often (§3.9)."""
        req: dict[str, Any] = {"op": "subscribe"}
        if after is not None:
            req["from"] = after
        if epoch is not None:
            req["epoch"] = epoch
        if collections is not None:
            req["collections"] = list(collections)
        if where is not None:
            req["where"] = dict(where)
        if conflate is not None:
            req["conflate"] = conflate
        sub = await self._request(req)
        assert isinstance(sub, Subscribed)
        return sub

    async def sync(
        self,
        *,
        collections: Iterable[str] | None = None,
        live: bool = False,
        where: Mapping[str, Any] | None = None,
        conflate: float | None = None,
    ) -> AsyncIterator[Frame]:
        """Request a snapshot (§3.1): yields SnapshotBegin, the Records and
        SnapshotEnd; with ``live``, then every later frame (changes, heartbeats) until
        the connection ends. ``where`` filters the records (§3.7); ``conflate`` (with
        ``live``) asks for conflated changes (§3.9)."""
        async for frame in self._sync(collections, live, where, raw=False, conflate=conflate):
            assert not isinstance(frame, bytes)
            yield frame

    async def sync_raw(
        self, *, collections: Iterable[str] | None = None, where: Mapping[str, Any] | None = None
    ) -> AsyncIterator[Frame | bytes]:
        """Like :meth:`sync` (not live), but each record comes as the raw bytes of its
        ``record`` line (without the newline), not decoded: for copying a snapshot
        somewhere as fast as it arrives (``statecast sync``)."""
        async for frame in self._sync(collections, False, where, raw=True):
            yield frame

    async def _sync(
        self,
        collections: Iterable[str] | None,
        live: bool,
        where: Mapping[str, Any] | None,
        *,
        raw: bool,
        conflate: float | None = None,
    ) -> AsyncIterator[Frame | bytes]:
        rid = next(self._ids)
        req: dict[str, Any] = {"op": "sync", "id": rid}
        if collections is not None:
            req["collections"] = list(collections)
        if live:
            req["live"] = True
        if where is not None:
            req["where"] = dict(where)
        if conflate is not None:
            req["conflate"] = conflate
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
            raise ConnectionClosed(
                f"the connection to {self.url} is closed ({self._closed})"
            ) from self._closed
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
        why = ""  # the error frame the server closed the connection with, if any
        buf = b""
        try:
            while error is None:
                chunk = await reader.read(1 << 18)
                if not chunk:
                    error = ConnectionClosed(
                        f"{self.url} closed the connection"
                        + (" mid-frame" if buf else "")
                        + (f" ({why})" if why else "")
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
                    frame = _frame_of(line)
                    if frame is None:
                        continue  # a frame type this client does not know: ignore it
                    if isinstance(frame, BadFrame):
                        error = frame
                        break
                    if isinstance(frame, _ANSWERS) and frame.id in self._pending:
                        fut = self._pending.pop(frame.id)
                        if not fut.done():
                            fut.set_result(frame)
                        continue
                    # An error frame without id (slow_consumer, token_expired) is about
                    # the connection itself, which is about to close: it joins the stream.
                    if isinstance(frame, ErrorFrame):
                        why = f"{frame.code}: {frame.message}"
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
