"""One client connection's protocol state, with no I/O (bytes in, frames out).

A transport feeds received bytes to :meth:`Session.receive_data`, writes what
:meth:`Session.data_to_send` returns, calls :meth:`Session.pump` while
:attr:`Session.streaming` is true and the socket takes more, calls :meth:`Session.tick`
about once a second, and calls :meth:`Session.close` when the connection is gone.
Live changes don't pass through here: the fan-out hands them to the transport's
:class:`~statecast.core.fanout.Subscriber` directly, once the session has joined it.

Requests are handled one at a time, in order (§5.4). While a snapshot or a catch-up
streams, later requests wait in the line buffer; the transport stops reading then, so
that buffer stays bounded.

Access (§3.8): every request is checked against the connection's
:class:`~statecast.core.policy.Grant`. Without auth configured that is the anonymous
grant (everything); with auth, nothing but ``auth`` is served until a token is
accepted, and the connection is closed when its token expires unfresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from msgspec import UNSET
from msgspec.json import encode as _encode_json

from statecast.core.engine import Duplicate, Engine
from statecast.core.fanout import Subscriber
from statecast.core.filters import Where, conjoin, parse_where
from statecast.core.frames import (
    PROTOCOL_VERSION,
    Ack,
    Authed,
    Bye,
    Conflating,
    Hello,
    Pong,
    RequestId,
    SnapshotBegin,
    SnapshotEnd,
    Stats,
    Subscribed,
    delete_line,
    encode,
    encode_error,
)
from statecast.core.framing import LineReader
from statecast.core.policy import ALL, Grant
from statecast.core.protocol import (
    AuthRequest,
    PingRequest,
    Prepared,
    PublishRequest,
    StatsRequest,
    SubscribeRequest,
    SyncRequest,
    check_idempotency_key,
    conditions_of,
    op_of,
    parse_request,
    prepare_changes,
    validate_collections,
)
from statecast.core.state import Record, Snapshot
from statecast.core.view import View
from statecast.errors import (
    BadRequest,
    Forbidden,
    InternalError,
    ProtocolError,
    RateLimited,
    ResyncRequired,
    SlowConsumer,
    TokenExpired,
    TooLarge,
    Unauthorized,
)

__all__ = [
    "SLICE_BYTES",
    "SLICE_LINES",
    "Authenticator",
    "InflightBudget",
    "Limits",
    "Session",
    "admit_publish",
    "view_of",
]

log = logging.getLogger("statecast.core.session")

# Changes read from the log per step of a catch-up.
_LOG_STEP = 1024
# §7 fairness: requests handled per slice, by count and by bytes. A connection that
# sends more waits for its next slice (the transport stops reading it meanwhile), so
# one client pipelining flat out gets its turn like everyone else, no more.
SLICE_LINES = 256
SLICE_BYTES = 256 * 1024


class _Detached:
    """The subscriber of a closed session: it keeps no transport alive."""

    def deliver(self, blob: bytes) -> None:
        pass


_DETACHED = _Detached()


class InflightBudget:
    """Publishes of all connections waiting for their ack (§7), bounded: at the bound,
    no connection's next request is handled until some ack comes."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: dict[Session, None] = {}

    @property
    def full(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def take(self) -> None:
        self.used += 1

    def give(self) -> None:
        self.used -= 1
        if self._waiting and not self.full:
            waiting, self._waiting = self._waiting, {}
            for session in waiting:
                session._wake()

    def wait(self, session: Session) -> None:
        self._waiting[session] = None

    def forget(self, session: Session) -> None:
        self._waiting.pop(session, None)


class Authenticator(Protocol):
    """Turns a token into a grant (``statecast.tokens.TokenVerifier``)."""

    def verify(self, token: object, now: float | None = None, *, rid: RequestId = None) -> Grant:
        """The grant of a valid token; raises ``Unauthorized`` otherwise."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits (§7, §9); ``None`` turns one off."""

    max_line: int = 1 << 20  # §1
    max_changes: int | None = None  # changes in one publish
    max_value: int | None = None  # bytes of one value, as stored
    rate: float | None = None  # requests per second, sustained (a token bucket) ...
    burst: int = 1000  # ... and at once
    auth_timeout: float | None = None  # seconds to authenticate, with auth on
    max_inflight: int | None = None  # publishes waiting for their ack, per connection
    request_timeout: float | None = None  # seconds to finish a request line once begun
    idle_timeout: float | None = None  # silent, with no subscription: closed
    snapshot_timeout: float | None = None  # a snapshot not read from this long: cut
    heartbeat: float = 0.0  # §4.3: told in the hello (the transports send them); 0: none


def admit_publish(
    request: PublishRequest,
    grant: Grant,
    limits: Limits,
    engine: Engine,
    *,
    line: bytes | None = None,
) -> Prepared:
    """§3.3, §3.8, §9: a publish's batch (with its if_seq conditions and idempotency
    key), once the grant allows every collection it writes and it is within the
    limits; raises (nothing applied) otherwise. Every transport's publish goes
    through here. ``line``: the request line it was decoded from, if any."""
    rid = request.id
    if limits.max_changes is not None and len(request.changes) > limits.max_changes:
        engine.limit_hits["max_changes"] += 1
        raise TooLarge(
            f"{len(request.changes)} changes in one publish: at most {limits.max_changes}",
            request_id=rid,
        )
    grant.check_publish((c.collection for c in request.changes), rid)
    if engine.read_only:  # collections that follow a source (docs/postgres.md)
        engine.check_writable((c.collection for c in request.changes), rid)
    batch = prepare_changes(request, line=line)
    if limits.max_value is not None:
        for i, (_, _, _, value) in enumerate(batch):
            if value is not None and len(value) > limits.max_value:
                engine.limit_hits["max_value"] += 1
                raise TooLarge(
                    f"changes[{i}]: a value of {len(value)} bytes: at most {limits.max_value}",
                    request_id=rid,
                )
    key = request.idempotency_key
    if key is not None and not key.isascii():
        check_idempotency_key(key, rid)  # a lone surrogate (msgspec checked the rest)
    return Prepared(batch, conditions_of(request.changes, rid), key)


def view_of(
    grant: Grant,
    grant_where: Where | None,
    names: list[str] | None,
    where: object,
    rid: RequestId = None,
) -> View:
    """What a sync or subscribe sees: the request, narrowed by the grant (§3.7, §3.8)."""
    requested = None if names is None else validate_collections(names, rid)
    try:
        filt = parse_where(where)
    except BadRequest as exc:
        exc.request_id = rid
        raise
    return View(grant.readable(requested, rid), conjoin(grant_where, filt))


class _Stream:
    """A snapshot being streamed, then (for live) a catch-up from the change log."""

    __slots__ = ("after", "live", "rid", "sent", "snapshot", "view")

    def __init__(
        self, snapshot: Snapshot | None, after: int, live: bool, view: View, rid: RequestId
    ) -> None:
        self.snapshot = snapshot
        self.after = after  # catch-up position: every change <= after is sent
        self.live = live
        self.view = view
        self.rid = rid
        self.sent = 0  # records of the snapshot sent (those in view)


class Session:
    # Thousands of connections each hold one: slots, not a dict (a few hundred bytes
    # less per connection, docs/performance.md).
    __slots__ = (
        "__weakref__",
        "_admit",
        "_admitted",
        "_auth",
        "_busy",
        "_conflate",
        "_engine",
        "_filled",
        "_grant_where",
        "_inflight",
        "_last_input",
        "_limits",
        "_live_requested",
        "_monotonic",
        "_now",
        "_opened",
        "_out",
        "_partial_since",
        "_progress",
        "_reader",
        "_release_grant",
        "_stats",
        "_stream",
        "_subscriber",
        "_tokens",
        "_view",
        "_wakeup",
        "acks_pending",
        "closed",
        "closing",
        "degraded",
        "grant",
        "joined",
    )

    def __init__(
        self,
        engine: Engine,
        subscriber: Subscriber,
        *,
        version: str,
        limits: Limits | None = None,
        auth: Authenticator | None = None,
        grant: Grant | None = None,
        admit: Callable[[Grant], None] | None = None,
        release: Callable[[Grant], None] | None = None,
        inflight: InflightBudget | None = None,
        wakeup: Callable[[], None] | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._stats = stats
        self._limits = limits = limits or Limits()
        self._auth = auth
        # ``admit(grant)`` may refuse a newly authenticated connection (raises, e.g.
        # TooManyConnections); ``release`` undoes it when the connection ends.
        self._admit = admit
        self._release_grant = release
        self._admitted: Grant | None = None
        self._inflight = inflight
        self._now = now
        self._monotonic = monotonic
        self._opened = self._last_input = self._progress = monotonic()
        self._partial_since: float | None = None  # a request line begun, not finished
        # Called when output appears outside receive_data() and pump() (a durable
        # publish's ack, an expiry), so that the transport writes it.
        self._wakeup = wakeup
        self._busy = False
        self._subscriber: Subscriber = subscriber
        self._reader = LineReader(limits.max_line)
        self._out: list[bytes] = [
            encode(
                Hello(
                    "statecast",
                    version,
                    PROTOCOL_VERSION,
                    engine.epoch,
                    engine.seq,
                    limits.heartbeat or None,
                )
            )
        ]  # §2
        self._stream: _Stream | None = None
        self._live_requested = False  # §3.2: at most one live subscription
        self._view = View()
        self._conflate: float | None = None  # §3.9: asked for by the client
        self.degraded = False  # §7 --slow-consumer conflate: conflated until drained
        self.grant: Grant | None = None  # None: not authenticated yet
        self._grant_where: Where | None = None
        self._tokens = float(limits.burst)  # the rate limit's bucket
        self._filled = self._opened
        self.joined = False  # receiving live changes through the fan-out
        self.acks_pending = 0  # publishes not answered yet (a durable store commits later)
        self.closing = False  # close the connection once data_to_send() is written
        self.closed = False
        if auth is None:
            self.grant = Grant.ANONYMOUS
        elif grant is not None:  # authenticated by the transport (HTTP Authorization)
            try:
                self._accept(grant, None)
            except ProtocolError as exc:
                self.fail(exc)

    # -- transport interface -------------------------------------------------
    @property
    def streaming(self) -> bool:
        return self._stream is not None

    @property
    def settled(self) -> bool:
        """Nothing left to answer: no stream running, no publish waiting for its ack."""
        return self._stream is None and self.acks_pending == 0

    @property
    def subscribed(self) -> bool:
        """Has a live subscription (joined, or catching up to join)."""
        return self._live_requested and not self.closed

    @property
    def backlog(self) -> bool:
        """Requests received and not handled yet: the transport reads no more from this
        connection, and calls :meth:`resume` when it may handle the next slice (at
        once, unless :attr:`waiting_for_acks`)."""
        return (
            self._stream is None
            and not self.closing
            and not self.closed
            and self._reader.has_line()
        )

    @property
    def waiting_for_acks(self) -> bool:
        """§7: too many publishes wait for their ack (this connection's, or all): the
        next request waits until one comes (the session calls ``wakeup`` then)."""
        limit = self._limits.max_inflight
        if limit is not None and self.acks_pending >= limit:
            return True
        return self._inflight is not None and self._inflight.full

    def receive_data(self, data: bytes) -> None:
        if self.closing or self.closed:
            return
        self._reader.feed(data)
        self._last_input = now = self._monotonic()
        self.resume()
        if self._reader.buffered and not self._reader.has_line():
            if self._partial_since is None:
                self._partial_since = now
        else:
            self._partial_since = None

    def receive_eof(self) -> None:
        """The client closed its sending side: a last line without ``\n`` is a
        request too (§1)."""
        if self.closing or self.closed:
            return
        self._reader.feed_eof()
        self._partial_since = None
        self.resume()

    def resume(self) -> None:
        """Handle the next slice of buffered requests (§7)."""
        if self.closing or self.closed:
            return
        self._busy = True
        try:
            self._process()
        finally:
            self._busy = False

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def pump(self, max_bytes: int) -> None:
        """Advance the current stream by about ``max_bytes`` of frames."""
        st = self._stream
        if st is None or self.closed:
            return
        self._busy = True
        try:
            if st.snapshot is not None:
                self._pump_snapshot(st, max_bytes)
            else:
                self._pump_catch_up(st, max_bytes)
        except ProtocolError as exc:
            self.fail(exc)
        try:
            if self._stream is None and not self.closing:
                self._process()  # requests that waited for the stream
        finally:
            self._busy = False

    def tick(self) -> None:
        """Time passed (called about once a second): §3.8 expiry and auth timeout, §7
        request, idle and snapshot timeouts."""
        if self.closing or self.closed:
            return
        error = self._timed_out()
        if error is not None:
            self.fail(error)
            self._wake()
        elif self._idle():
            self._release()
            self._out.append(encode(Bye("idle")))
            self.closing = True
            self._wake()

    def _timed_out(self) -> ProtocolError | None:
        limits = self._limits
        now = self._monotonic()
        if self._auth is not None:
            grant = self.grant
            if grant is None:
                if limits.auth_timeout is not None and now - self._opened >= limits.auth_timeout:
                    self._engine.limit_hits["auth_timeout"] += 1
                    return Unauthorized(f"no auth within {limits.auth_timeout:g}s: closing")
            elif grant.expired(self._now()):
                return TokenExpired(
                    "the access token expired: send a fresh one with "
                    '{"op":"auth","token":...} before it does'
                )
        since = self._partial_since
        timeout = limits.request_timeout
        if since is not None and timeout is not None and now - since >= timeout:
            self._engine.limit_hits["request_timeout"] += 1
            return BadRequest(
                f"a request line was begun and not finished within {timeout:g}s: closing"
            )
        st = self._stream
        if (
            st is not None
            and st.snapshot is not None
            and limits.snapshot_timeout is not None
            and now - self._progress >= limits.snapshot_timeout
        ):
            self._engine.limit_hits["snapshot_timeout"] += 1
            return SlowConsumer(
                f"the snapshot was not read from for {limits.snapshot_timeout:g}s: sync again"
            )
        if st is not None and st.snapshot is not None and st.snapshot.cut:
            return SlowConsumer(
                "the snapshot kept too many old versions alive (--max-snapshot-retained): "
                "read it faster, or sync again"
            )
        return None

    def _idle(self) -> bool:
        timeout = self._limits.idle_timeout
        return (
            timeout is not None
            and not self._live_requested
            and self._stream is None
            and self.acks_pending == 0
            and self._monotonic() - self._last_input >= timeout
        )

    def shutdown(self) -> None:
        """§8: stop streaming, say bye, and ask to be closed."""
        if self.closed or self.closing:
            return
        if self.degraded:
            # §7: held as a slow consumer: what changed meanwhile goes out before bye,
            # like every other change acked before the shutdown.
            self.restore()
        self._release()
        self._out.append(encode(Bye("shutdown")))
        self.closing = True

    def close(self) -> None:
        """The connection is gone: release the snapshot and the subscription, and let
        go of the transport (no reference cycle outlives the connection)."""
        if not self.closed:
            self._release()
            self.closed = True
            admitted, self._admitted = self._admitted, None
            if admitted is not None and self._release_grant is not None:
                self._release_grant(admitted)
            if self._inflight is not None:
                self._inflight.forget(self)
            self._wakeup = None
            self._stats = None
            self._subscriber = _DETACHED

    def fail(self, exc: ProtocolError) -> None:
        """An error that makes this connection unusable: report it, then close."""
        self._release()
        self._error(exc)
        self.closing = True

    # -- internals -----------------------------------------------------------
    def _wake(self) -> None:
        if not self._busy and self._wakeup is not None:
            self._wakeup()  # output outside a call from the transport: tell it

    def _release(self) -> None:
        st, self._stream = self._stream, None
        if st is not None and st.snapshot is not None:
            st.snapshot.close()
        if self.joined:
            self._engine.fanout.leave(self._subscriber, self._view)
            self.joined = False

    def _error(self, exc: ProtocolError) -> None:
        """§6: an ``error`` frame, counted by code."""
        self._engine.errors[exc.code] += 1
        self._out.append(encode_error(exc))

    def _process(self) -> None:
        """Handle buffered requests, one slice at most (§7)."""
        reader = self._reader
        lines = size = 0
        while self._stream is None and not self.closing:
            if lines >= SLICE_LINES or size >= SLICE_BYTES:
                return  # backlog: the transport comes back for the next slice
            if self.waiting_for_acks:
                if self._inflight is not None and self._inflight.full:
                    self._inflight.wait(self)
                return
            try:
                line = reader.next_line()
            except TooLarge as exc:  # §1: the stream is unusable past this point
                self.fail(exc)
                return
            if line is None:
                return
            lines += 1
            size += len(line) + 1
            if line.strip():
                self._handle(line)

    def _take_token(self, rid: RequestId) -> None:
        """§7: the per-connection request rate (a token bucket)."""
        rate = self._limits.rate
        if rate is None:
            return
        now = self._monotonic()
        burst = self._limits.burst
        self._tokens = min(burst, self._tokens + (now - self._filled) * rate)
        self._filled = now
        if self._tokens < 1:
            self._engine.limit_hits["rate"] += 1
            raise RateLimited(
                f"more than {rate:g} requests per second (burst {burst}): slow down",
                request_id=rid,
            )
        self._tokens -= 1

    def _handle(self, line: bytes) -> None:
        rid: RequestId = None
        try:
            try:
                request = parse_request(line)
            except BadRequest:
                if self.grant is None and op_of(line) != "auth":
                    raise self._unauthenticated(None) from None
                raise
            rid = request.id
            self._take_token(rid)
            if isinstance(request, AuthRequest):
                self._authenticate(request)
                return
            if self.grant is None:
                raise self._unauthenticated(rid)
            if isinstance(request, PublishRequest):
                self._publish(request, line)
            elif isinstance(request, SyncRequest):
                self._sync(request)
            elif isinstance(request, SubscribeRequest):
                self._subscribe(request)
            elif isinstance(request, PingRequest):
                self._out.append(encode(Pong(self._engine.seq, rid)))
            elif isinstance(request, StatsRequest):
                self._stats_of(rid)
        except Unauthorized as exc:
            if self.grant is None:  # §3.8: nothing but auth first, then closed
                self.fail(exc)
            else:
                self._error(exc)
        except ProtocolError as exc:
            self._error(exc)
        except Exception:
            log.exception("internal error while handling a request")
            self._error(InternalError("internal server error", request_id=rid))

    @staticmethod
    def _unauthenticated(rid: RequestId) -> Unauthorized:
        return Unauthorized(
            'authenticate first: send {"op":"auth","token":"..."} before anything else',
            request_id=rid,
        )

    # -- §3.8 auth -------------------------------------------------------------
    def _authenticate(self, request: AuthRequest) -> None:
        rid = request.id
        if self._auth is None:
            raise BadRequest("this server does not use access tokens", request_id=rid)
        grant = self._auth.verify(request.token, self._now(), rid=rid)
        self._accept(grant, rid)

    def _accept(self, grant: Grant, rid: RequestId) -> None:
        try:
            where = parse_where(grant.where, "token.where")
        except BadRequest:
            raise Unauthorized(
                "the token's 'where' claim is not a valid filter", request_id=rid
            ) from None
        old = self.grant
        if old is None:
            if self._admit is not None:
                try:
                    self._admit(grant)  # may refuse (too_many_connections)
                except ProtocolError as exc:
                    self._engine.limit_hits["connections_per_user"] += 1
                    exc.request_id = rid
                    self.fail(exc)
                    return
            self._admitted = grant
        else:
            live = [self._view.collections] if self._live_requested else []
            old.check_refresh(grant, rid, live=live)  # same sub, never wider
        self.grant = grant
        self._grant_where = where
        self._out.append(encode(Authed(*grant.frame_fields(), id=rid)))

    # -- requests ----------------------------------------------------------------
    def _view_of(self, names: list[str] | None, where: object, rid: RequestId) -> View:
        assert self.grant is not None
        return view_of(self.grant, self._grant_where, names, where, rid)

    def _claim_live(self, rid: RequestId) -> None:
        if self._live_requested:
            raise BadRequest("this connection already has a live subscription", request_id=rid)

    def _stats_of(self, rid: RequestId) -> None:
        grant = self.grant
        assert grant is not None
        if grant.read is not ALL or self._grant_where is not None:
            raise Forbidden(
                "stats are server-wide counts: only a token that reads everything may ask",
                request_id=rid,
            )
        if self._stats is None:
            raise BadRequest("this server does not expose stats", request_id=rid)
        self._out.append(encode(Stats(**self._stats(), id=rid)))

    def _publish(self, request: PublishRequest, line: bytes) -> None:
        """§3.3: the ack comes once the store has committed the batch."""
        rid = request.id
        assert self.grant is not None
        prepared = admit_publish(request, self.grant, self._limits, self._engine, line=line)

        def done(result: int | ProtocolError) -> None:
            self.acks_pending -= 1
            if self._inflight is not None:
                self._inflight.give()
            if self.closed or self.closing:
                return
            if isinstance(result, int):
                self._out.append(encode(Ack(int(result), rid, isinstance(result, Duplicate))))
            else:
                result.request_id = rid
                self._error(result)
            self._wake()  # answered later than the request: tell the transport

        self.acks_pending += 1
        if self._inflight is not None:
            self._inflight.take()
        self._engine.publish(
            prepared.batch, done, conditions=prepared.conditions, key=prepared.key, rid=rid
        )

    def _sync(self, request: SyncRequest) -> None:
        """§3.1: snapshot_begin, records, snapshot_end, then (live) changes > S."""
        rid = request.id
        view = self._view_of(request.collections, request.where, rid)
        if request.live:
            self._claim_live(rid)
            self._live_requested = True
            self._view = view
            self._conflate = request.conflate
        snap = self._engine.snapshot(view.collections)
        # A filtered snapshot does not say how many records it will send: the count of
        # the collections would tell about records outside the view (§3.7).
        count = snap.total if view.where is None else None
        self._out.append(encode(SnapshotBegin(snap.seq, self._engine.epoch, count, rid)))
        self._stream = _Stream(snap, snap.seq, request.live, view, rid)

    def _subscribe(self, request: SubscribeRequest) -> None:
        """§3.2: subscribed at S, then every change > S."""
        rid = request.id
        engine = self._engine
        view = self._view_of(request.collections, request.where, rid)
        self._claim_live(rid)
        if request.epoch is not None and request.epoch != engine.epoch:
            raise ResyncRequired(
                f"epoch {request.epoch!r} is not this server's history ({engine.epoch!r}): "
                "sync again",
                request_id=rid,
            )
        point = engine.sync_point()
        after = point if request.from_ is None else request.from_
        if after > point:
            raise ResyncRequired(
                f"seq {after} is ahead of this server's seq {point}: sync again", request_id=rid
            )
        if not engine.log_covers(after):
            raise ResyncRequired(
                f"changes after seq {after} are no longer retained "
                f"(oldest retained: {engine.store.log.first_seq}): sync again",
                request_id=rid,
            )
        if view.where is not None and not self._resumable(view, after, point):
            raise ResyncRequired(
                f"this filtered subscription cannot resume from seq {after} across the "
                "server's restart: sync again",
                request_id=rid,
            )
        self._live_requested = True
        self._view = view
        self._conflate = request.conflate
        self._out.append(encode(Subscribed(after, engine.epoch, rid, request.conflate)))
        if after == point:
            self._join()
        else:
            self._stream = _Stream(None, after, True, view, rid)

    def _resumable(self, view: View, after: int, point: int) -> bool:
        """§3.7: a filtered catch-up must tell a record that moves out of the view from
        one that was never in it. A change loaded from disk whose previous version is
        older than the log does not know; it matters only if it is outside the view
        now (it might have moved out, or never have been in)."""
        log_ = self._engine.store.log
        upto = min(point, log_.unknown_until)
        if after >= upto:
            return True
        where = view.where
        assert where is not None
        pos = after
        while pos < upto:
            records = log_.read(pos, min(_LOG_STEP, upto - pos))
            for rec in records:
                if (
                    rec.before is UNSET
                    and view.selects(rec.collection)
                    and not where.matches_json(rec.value_json())
                ):
                    return False
            pos = records[-1].seq
        return True

    def _join(self) -> None:
        self._engine.fanout.join(self._subscriber, self._view, self._conflate)
        self.joined = True

    # -- §7 --slow-consumer conflate ------------------------------------------------
    def degrade(self) -> bool:
        """The subscriber fell behind: keep only the newest state of each key for it
        until it has drained, and tell it so; whether it was (a client that asked for
        conflation itself, or is not joined, is cut off instead)."""
        if not self.joined or self._conflate is not None or self.degraded:
            return False
        self._engine.fanout.hold(self._subscriber, self._view)
        self.degraded = True
        self._engine.limit_hits["slow_consumer_conflated"] += 1
        self._out.append(encode(Conflating(True)))
        return True

    def restore(self) -> None:
        """It has drained: the newest state of what changed meanwhile, then every
        change again."""
        if not self.degraded or self.closed or self.closing:
            return
        fanout = self._engine.fanout
        self._out.append(fanout.release(self._subscriber))
        fanout.join(self._subscriber, self._view)
        self.degraded = False
        self._out.append(encode(Conflating(False)))

    def _pump_snapshot(self, st: _Stream, max_bytes: int) -> None:
        snap = st.snapshot
        assert snap is not None
        if snap.cut:
            raise SlowConsumer(
                "the snapshot kept too many old versions alive (--max-snapshot-retained): "
                "read it faster, or sync again"
            )
        self._progress = self._monotonic()
        if st.view.where is None:
            blob, count = snap.read_joined(max_bytes)
            if count:
                st.sent += count
                self._out.append(blob)
        else:
            accepts = st.view.accepts_line
            lines = [ln for ln in snap.read(max_bytes) if accepts(ln)]
            if lines:
                st.sent += len(lines)
                self._out.append(b"".join(lines))
        if not snap.done:
            return
        conflate = self._conflate if st.live else None
        self._out.append(encode(SnapshotEnd(snap.seq, st.sent, st.rid, conflate)))
        st.snapshot = None
        if not st.live:
            self._stream = None

    def _pump_catch_up(self, st: _Stream, max_bytes: int) -> None:
        """§5.2: changes from the log up to the fan-out's position, then join it."""
        engine = self._engine
        view = st.view
        size = 0
        out: list[bytes] = []
        while size < max_bytes:
            target = engine.fanout.flushed_seq
            if st.after >= target:
                self._stream = None
                self._join()
                break
            try:
                records = engine.read_log(st.after, min(_LOG_STEP, target - st.after))
            except LookupError:
                raise SlowConsumer(
                    f"fell behind the change log while catching up (at seq {st.after}): "
                    "resume or sync again"
                ) from None
            for rec in records:
                if view.selects(rec.collection):
                    line = self._catch_up_line(rec, view.where)
                    if line is not None:
                        out.append(line)
                        size += len(line)
            st.after = records[-1].seq
        if out:
            self._out.append(b"".join(out))

    @staticmethod
    def _catch_up_line(rec: Record, where: Where | None) -> bytes | None:
        """The frame a subscriber catching up gets for one logged change (§3.7)."""
        if where is None or where.matches_json(rec.value_json()):
            return rec.change_line()
        before = rec.before
        if before is UNSET:  # only outside the view now: _resumable() checked it
            raise ResyncRequired("cannot resume this filtered subscription: sync again")
        if isinstance(before, Record) and where.matches_json(before.value_json()):
            # It moved out of the view: a delete (for a delete, the change itself).
            if rec.deleted:
                return rec.line
            return delete_line(rec.seq, rec.collection, _encode_json(rec.key))
        return None
