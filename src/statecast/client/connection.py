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

Publishes are safe to retry (§3.3.1): each carries an ``idempotency_key`` (a new
one by default), and when the connection is lost before its ack, the client
reconnects (to the same node, or the next of several when it is down) and sends the
same batch with the same key again, until it is acknowledged or ``retry_timeout``
passes. Only publishes reconnect: a subscription or a sync of the lost connection
ends with :class:`ConnectionClosed` as before, and is not made again.

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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypeAlias, cast
from urllib.parse import urlsplit

import msgspec

from statecast.client.failover import Failover, backoff_delay, split_urls
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
from statecast.core.protocol import Change, prepare_publish
from statecast.errors import (
    BadFrame,
    ConfigError,
    ConnectionClosed,
    ServerBye,
    StatecastError,
    Timeout,
    Unauthorized,
)

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_URL",
    "Address",
    "Client",
    "TokenProvider",
    "check_token_settings",
    "client_ssl_context",
    "new_key",
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

# The backoff between attempts to deliver a publish again (docs/client.md): short,
# since a producer waits for it, and capped low, since retry_timeout bounds it all.
_RETRY_MIN_BACKOFF: Final = 0.1
_RETRY_MAX_BACKOFF: Final = 5.0


def new_key() -> str:
    """A fresh idempotency key (§3.3): 32 random hex digits (a uuid4)."""
    return uuid.uuid4().hex


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
    """One connection at a time. Not thread-safe: use it from one event loop.

    ``url``: ``tcp://HOST:PORT`` or ``tls://HOST:PORT``; or the nodes of a cluster
    (docs/cluster.md), ``"tcp://a:8989,tcp://b:8989"`` or a list: :meth:`connect`
    takes the first that answers, and a publish that must be sent again goes to the
    same node, or to the next when that one cannot be reached. With TLS, ``ca_file``
    is a PEM bundle of the CAs to trust (default: the system's), or ``ssl`` an
    :class:`ssl.SSLContext` for full control; the server's name is checked against the
    URL's host either way (unless the context says otherwise).

    ``token`` (a string) or ``token_provider`` (a callable returning one, plain or
    async) authenticates the connection (§3.8); :attr:`authed` then holds what the
    token grants. A provider is also called to refresh the token before it expires.

    ``retry_timeout`` (seconds, default 30; ``None``: no limit) bounds a publish with
    an idempotency key, from the call to its ack, across the reconnections it takes
    (:meth:`publish`).
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        connect_timeout: float = 10.0,
        retry_timeout: float | None = 30.0,
        max_line: int = 64 * 1024 * 1024,
        queue_chunks: int = 64,
    ) -> None:
        # One URL is checked as it is (its errors name it); a comma list, or a list,
        # is the nodes of a cluster.
        many = isinstance(url, list | tuple) or (isinstance(url, str) and "," in url)
        self.urls: list[str] = split_urls(url) if many else [cast(str, url)]
        # Each URL is checked here, not when it is first used, and its TLS context
        # made once (loading the system's CAs takes a while).
        self._contexts = {
            each: tls_context_for(parse_address(each), ca_file, ssl) for each in self.urls
        }
        self._ca_file = None if ca_file is None else os.fspath(ca_file)
        self._failover = Failover(self.urls, _RETRY_MIN_BACKOFF, _RETRY_MAX_BACKOFF)
        self._use(self.urls[0])
        self.retry_timeout = retry_timeout
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
        # Publishes with an idempotency key that wait for their ack, in the order they
        # were first sent: after a reconnection, they are sent again in that order.
        self._unacked: dict[RequestId, dict[str, Any]] = {}
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closing = False  # close() was called: nothing is sent again
        self._why = ""  # the last reason a publish had to be sent again
        self.reconnects = 0  # reconnections made to deliver publishes
        self._queue_chunks = queue_chunks
        # Read loops of lost connections still handing their last frames on.
        self._handing_on: set[asyncio.Task[None]] = set()
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

    def _use(self, url: str) -> None:
        """Connect to ``url`` from now on (one of :attr:`urls`)."""
        self.url = url
        self.address = parse_address(url)
        self.host, self.port = self.address.host, self.address.port
        self._ssl = self._contexts[url]
        self._failover.url = url

    # -- connection ----------------------------------------------------------------
    async def connect(self) -> Hello:
        """Open the connection; returns the server's hello (§2). With a token, also
        authenticates (§3.8): :class:`~statecast.errors.Unauthorized` if the server
        refuses the token. With several URLs, the first that answers."""
        self._closing = False
        start = self.urls.index(self.url)
        order = self.urls[start:] + self.urls[:start]
        for n, url in enumerate(order, 1):
            self._use(url)
            try:
                return await self._establish()
            except (ConnectionClosed, Timeout):
                if n == len(order):
                    await self.close()
                    raise
            except BaseException:
                await self.close()
                raise
        raise AssertionError("unreachable")

    async def _establish(self) -> Hello:
        """Connect to :attr:`url` and authenticate; on failure, close what was opened
        and raise (pending requests are left alone)."""
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
            await self._teardown()
            stage = self._stage
            hint = ""
            if stage == "no hello" and not self.tls:
                hint = " (if that port speaks TLS, use tls://)"
            raise Timeout(
                f"cannot connect to {self.url}: {stage} within {self.connect_timeout}s{hint}"
            ) from None
        except BaseException:
            await self._teardown()
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
            # A connection of its own: what the last one left is not this one's.
            self._closed = None
            # A stream of its own too: a reader of the last one's frames() still gets
            # them all, and then the error that ended it.
            self._frames = asyncio.Queue(self._queue_chunks)
            self._ready = collections.deque()
            self.authed = None
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
        """Close the connection; requests still waiting for an answer (publishes that
        would be sent again too) fail with :class:`ConnectionClosed`."""
        self._closing = True
        reconnect, self._reconnect_task = self._reconnect_task, None
        if reconnect is not None and reconnect is not asyncio.current_task():
            reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconnect
        await self._teardown()
        for task in list(self._handing_on):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(ConnectionClosed("the connection was closed"))

    async def _teardown(self) -> None:
        """Close the socket and stop its tasks; requests are left to the caller."""
        refresh, self._refresh_task = self._refresh_task, None
        if refresh is not None:
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh
        writer, self._writer = self._writer, None
        if writer is not None:
            if self._closed is None:
                self._closed = ConnectionClosed(f"the connection to {self.url} was closed")
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        task, self._task = self._task, None
        if task is not None and task not in self._handing_on:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
    async def publish(
        self,
        changes: Iterable[Change | Mapping[str, Any]] | Change,
        *,
        idempotency_key: str | Callable[[], str] | None = new_key,
    ) -> int:
        """Publish one atomic batch; returns the seq of its last change once the
        server has applied (with a durable store: committed) it. See
        :meth:`publish_ack` for the keyword arguments and the retries."""
        ack = await self.publish_ack(changes, idempotency_key=idempotency_key)
        return ack.seq

    async def publish_ack(
        self,
        changes: Iterable[Change | Mapping[str, Any]] | Change,
        *,
        idempotency_key: str | Callable[[], str] | None = new_key,
    ) -> Ack:
        """Publish one atomic batch (§3.3); returns its :class:`Ack`: ``seq``, and
        ``duplicate`` when the server had applied the batch before under the same key
        (then ``seq`` is that first ack's, and nothing was applied again).

        A change may carry ``if_seq`` (:class:`Change`, or a mapping's ``"if_seq"``):
        the seq the record must be at (0: it must not exist). If one does not hold,
        nothing of the batch is applied and :class:`~statecast.errors.Conflict` is
        raised, with the change's index and the record's ``current_seq``.

        ``idempotency_key``: by default :func:`new_key` makes a new one for this call;
        give a string to choose it (1 to 256 characters: the same key for the same
        batch, e.g. across restarts of the producer), or ``None`` to send none.

        With a key, the publish survives a lost connection: when the connection ends
        before the ack (reset, ``bye``, the server gone) or the server answers
        ``unavailable``, the client reconnects (with backoff from 0.1 s doubling to 5 s;
        to the same node, and with several URLs to the next one when that one cannot be
        reached) and sends the same batch with the same key again, until it is
        acknowledged or ``retry_timeout`` (default 30 s) has passed since the call:
        then :class:`~statecast.errors.Timeout`, and whether the batch was applied is
        unknown (publish it again with the same key to find out). Other errors
        (``conflict``, ``forbidden``, ``bad_request``, ...) are raised at once. Without
        a key, a lost connection raises :class:`ConnectionClosed`: the batch may or may
        not have been applied.

        Any number of publishes may be in flight. Those waiting for their ack are sent
        again after a reconnection in the order they were first sent, before anything
        else, so batches keep their order (§5.4); only a batch answered
        ``unavailable`` is sent again on its own, after its backoff, and may then come
        after batches published after it.
        """
        key = idempotency_key() if callable(idempotency_key) else idempotency_key
        prepared = prepare_publish(changes, idempotency_key=key)
        batch: list[dict[str, Any]] = [
            {"collection": c, "key": k, "delete": True}
            if v is None
            else {"collection": c, "key": k, "value": msgspec.Raw(v)}
            for c, k, _kj, v in prepared.batch
        ]
        for i, if_seq in prepared.conditions or ():
            batch[i]["if_seq"] = if_seq
        req: dict[str, Any] = {"op": "publish", "changes": batch}
        if prepared.key is None:
            ack = await self._request(req)
        else:
            req["idempotency_key"] = prepared.key
            ack = await self._publish_until_acked(req)
        assert isinstance(ack, Ack)
        return ack

    async def _publish_until_acked(self, req: dict[str, Any]) -> Frame:
        """Send a keyed publish, and again after each reconnection or ``unavailable``,
        until it is answered otherwise or :attr:`retry_timeout` passes."""
        if self.hello is None:
            raise ConnectionClosed("not connected: call connect() first")
        if self._closing:
            raise ConnectionClosed(f"the connection to {self.url} is closed (close() was called)")
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        req["id"] = rid
        deadline = None if self.retry_timeout is None else loop.time() + self.retry_timeout
        attempt = 0
        try:
            async with asyncio.timeout_at(deadline) as scope:
                while True:
                    fut: asyncio.Future[Any] = loop.create_future()
                    self._pending[rid] = fut
                    self._unacked[rid] = req
                    if self._reconnecting() or self._closed is not None:
                        self._reconnect()  # which sends it, after the older ones
                    else:
                        self._send(req)
                    answer = await fut
                    if not (isinstance(answer, ErrorFrame) and answer.code == "unavailable"):
                        break
                    # §3.3: the store could not commit it, and nothing was applied.
                    # Out of the queue while it waits: a reconnection meanwhile must
                    # not send it with no future to take the answer.
                    self._unacked.pop(rid, None)
                    self._pending.pop(rid, None)
                    self._why = f"unavailable: {answer.message}"
                    await asyncio.sleep(
                        backoff_delay(attempt, _RETRY_MIN_BACKOFF, _RETRY_MAX_BACKOFF)
                    )
                    attempt += 1
        except TimeoutError:
            if not scope.expired():
                raise
            raise Timeout(
                f"publish with idempotency_key {req['idempotency_key']!r} not acknowledged "
                f"within {self.retry_timeout}s ({self._why or 'no answer'}); it may have "
                "been applied: publish it again with the same key to find out"
            ) from None
        finally:
            self._unacked.pop(rid, None)
            self._pending.pop(rid, None)
        if isinstance(answer, ErrorFrame):
            raise answer.exception()
        return cast(Frame, answer)

    def _reconnecting(self) -> bool:
        return self._reconnect_task is not None and not self._reconnect_task.done()

    def _reconnect(self) -> None:
        """Start reconnecting, unless that is under way."""
        if not self._reconnecting() and not self._closing:
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(), name="statecast-client-reconnect"
            )

    async def _reconnect_loop(self) -> None:
        """Reconnect with backoff (to the same node, then to the next of several when
        one cannot be reached) until the keyed publishes waiting for their ack can be
        sent again, then send them in the order they were first sent, before anything
        else. Gives up when none is left waiting (each gives up at its own deadline)."""
        try:
            await self._reconnect_until_sent()
        except Exception as exc:  # a bug: fail the publishes rather than leave them
            log.exception("reconnecting to %s failed", self.url)
            self._fail_unacked(exc)

    async def _reconnect_until_sent(self) -> None:
        # The same node first (a restarting node is usually back soon, and the client
        # keeps its place); the next one only when it cannot be reached. Any node
        # knows the keys (the SQLite store on disk, the NATS store in the stream).
        move = False
        while self._unacked and not self._closing:
            delay = self._failover.failed(move=move)
            move = True
            self._use(self._failover.url)
            log.info(
                "%d publish(es) not acknowledged (%s); reconnecting to %s in %.1fs",
                len(self._unacked),
                self._why,
                self.url,
                delay,
            )
            await asyncio.sleep(delay)
            if not self._unacked:
                break
            await self._teardown()
            try:
                await self._establish()
            except Unauthorized as exc:
                if self._token_provider is not None:
                    self._why = f"{exc.code}: {exc}"  # a fresh token may do next time
                    continue
                self._fail_unacked(exc)  # a fixed token does not get better
                return
            except (StatecastError, OSError) as exc:
                self._why = str(exc) or type(exc).__name__
                continue
            self._failover.succeeded()
            self.reconnects += 1
            for again in self._unacked.values():
                self._send(again)  # the same request: the same id and key
            return

    def _fail_unacked(self, error: BaseException) -> None:
        for rid in self._unacked:
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)

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
        ready, queue = self._ready, self._frames  # this connection's, through a reconnect
        while True:
            if ready:
                # One at a time from the deque: a consumer that stops iterating leaves
                # the rest for the next one.
                yield ready.popleft()
                continue
            item = await queue.get()
            if isinstance(item, BaseException):
                queue.put_nowait(item)  # for the next reader too
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
        reader, frames = self._reader, self._frames
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
                    await frames.put(batch)  # waits while the consumer is behind
        except (OSError, ConnectionError) as exc:
            error = ConnectionClosed(f"connection to {self.url} lost: {exc}")
        assert error is not None
        self._fail_pending(error)
        await self._end_stream(frames, error)

    async def _end_stream(
        self, frames: asyncio.Queue[list[Frame | bytes] | BaseException], error: BaseException
    ) -> None:
        """Put the end of the stream after every frame. A reconnection (for publishes)
        leaves this to finish once the stream's reader has taken the rest."""
        me = asyncio.current_task()
        assert me is not None
        self._handing_on.add(me)
        try:
            await frames.put(error)
        finally:
            self._handing_on.discard(me)

    def _fail_pending(self, error: BaseException) -> None:
        """The connection ended: its requests fail, except the keyed publishes, which
        wait for a reconnection (unless close() was called)."""
        if self._closed is None:
            self._closed = error
        kept = {}
        for rid, fut in self._pending.items():
            if fut.done():
                continue
            if rid in self._unacked and not self._closing:
                kept[rid] = fut
                continue
            fut.set_exception(
                error
                if isinstance(error, StatecastError)
                else ConnectionClosed(f"the connection to {self.url} ended")
            )
        self._pending.clear()
        if kept:
            self._pending.update(kept)
            self._why = str(error) or type(error).__name__
            self._reconnect()

    def _fail_all(self, error: BaseException) -> None:
        self._fail_pending(error)
        with contextlib.suppress(asyncio.QueueFull):
            self._frames.put_nowait(error)
