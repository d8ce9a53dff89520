"""One client connection's protocol state, with no I/O (bytes in, frames out).

A transport feeds received bytes to :meth:`Session.receive_data`, writes what
:meth:`Session.data_to_send` returns, calls :meth:`Session.pump` while
:attr:`Session.streaming` is true and the socket takes more, and calls
:meth:`Session.close` when the connection is gone. Live changes don't pass through
here: the fan-out hands them to the transport's :class:`~statecast.core.fanout.Subscriber`
directly, once the session has joined it.

Requests are handled one at a time, in order (§5.4). While a snapshot or a catch-up
streams, later requests wait in the line buffer; the transport stops reading then, so
that buffer stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from statecast.core.engine import Engine
from statecast.core.fanout import Selection, Subscriber
from statecast.core.frames import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Hello,
    Pong,
    RequestId,
    SnapshotBegin,
    SnapshotEnd,
    Stats,
    Subscribed,
    encode,
    encode_error,
)
from statecast.core.framing import LineReader
from statecast.core.protocol import (
    PingRequest,
    PublishRequest,
    StatsRequest,
    SubscribeRequest,
    SyncRequest,
    parse_request,
    prepare_changes,
    validate_collections,
)
from statecast.core.state import Snapshot
from statecast.errors import (
    BadRequest,
    InternalError,
    ProtocolError,
    ResyncRequired,
    SlowConsumer,
    TooLarge,
)

__all__ = ["Session"]

log = logging.getLogger("statecast.core.session")

# Changes read from the log per step of a catch-up.
_LOG_STEP = 1024


class _Stream:
    """A snapshot being streamed, then (for live) a catch-up from the change log."""

    __slots__ = ("after", "live", "rid", "selection", "snapshot")

    def __init__(
        self,
        snapshot: Snapshot | None,
        after: int,
        live: bool,
        selection: Selection,
        rid: RequestId,
    ) -> None:
        self.snapshot = snapshot
        self.after = after  # catch-up position: every change <= after is sent
        self.live = live
        self.selection = selection
        self.rid = rid


class Session:
    def __init__(
        self,
        engine: Engine,
        subscriber: Subscriber,
        *,
        max_line: int,
        version: str,
        wakeup: Callable[[], None] | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._engine = engine
        self._stats = stats
        # Called when output appears outside receive_data() and pump() (a durable
        # publish's ack), so that the transport writes it.
        self._wakeup = wakeup
        self._busy = False
        self._subscriber = subscriber
        self._reader = LineReader(max_line)
        self._out: list[bytes] = [
            encode(Hello("statecast", version, PROTOCOL_VERSION, engine.epoch, engine.seq))
        ]  # §2
        self._stream: _Stream | None = None
        self._live_requested = False  # §3.2: at most one live subscription
        self._selection: Selection = None
        self.joined = False  # receiving live changes through the fan-out
        self.acks_pending = 0  # publishes not answered yet (a durable store commits later)
        self.closing = False  # close the connection once data_to_send() is written
        self.closed = False

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

    def receive_data(self, data: bytes) -> None:
        if self.closing or self.closed:
            return
        self._reader.feed(data)
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

    def shutdown(self) -> None:
        """§8: stop streaming, say bye, and ask to be closed."""
        if self.closed or self.closing:
            return
        self._release()
        self._out.append(encode(Bye("shutdown")))
        self.closing = True

    def close(self) -> None:
        """The connection is gone: release the snapshot and the subscription."""
        if not self.closed:
            self._release()
            self.closed = True

    # -- internals -----------------------------------------------------------
    def _release(self) -> None:
        st, self._stream = self._stream, None
        if st is not None and st.snapshot is not None:
            st.snapshot.close()
        if self.joined:
            self._engine.fanout.leave(self._subscriber, self._selection)
            self.joined = False

    def _error(self, exc: ProtocolError) -> None:
        """§6: an ``error`` frame, counted by code."""
        self._engine.errors[exc.code] += 1
        self._out.append(encode_error(exc))

    def fail(self, exc: ProtocolError) -> None:
        """An error that makes this connection unusable: report it, then close."""
        self._release()
        self._error(exc)
        self.closing = True

    def _process(self) -> None:
        reader = self._reader
        while self._stream is None and not self.closing:
            try:
                line = reader.next_line()
            except TooLarge as exc:  # §1: the stream is unusable past this point
                self.fail(exc)
                return
            if line is None:
                return
            if line.strip():
                self._handle(line)

    def _handle(self, line: bytes) -> None:
        rid: RequestId = None
        try:
            request = parse_request(line)
            rid = request.id
            if isinstance(request, PublishRequest):
                self._publish(request)
            elif isinstance(request, SyncRequest):
                self._sync(request)
            elif isinstance(request, SubscribeRequest):
                self._subscribe(request)
            elif isinstance(request, PingRequest):
                self._out.append(encode(Pong(self._engine.seq, rid)))
            elif isinstance(request, StatsRequest):
                if self._stats is None:
                    raise BadRequest("this server does not expose stats", request_id=rid)
                self._out.append(encode(Stats(**self._stats(), id=rid)))
        except ProtocolError as exc:
            self._error(exc)
        except Exception:
            log.exception("internal error while handling a request")
            self._error(InternalError("internal server error", request_id=rid))

    def _selection_of(self, names: list[str] | None, rid: RequestId) -> Selection:
        return None if names is None else validate_collections(names, rid)

    def _claim_live(self, rid: RequestId) -> None:
        if self._live_requested:
            raise BadRequest("this connection already has a live subscription", request_id=rid)

    def _publish(self, request: PublishRequest) -> None:
        """§3.3: the ack comes once the store has committed the batch."""
        rid = request.id

        def done(result: int | ProtocolError) -> None:
            self.acks_pending -= 1
            if self.closed or self.closing:
                return
            if isinstance(result, int):
                self._out.append(encode(Ack(result, rid)))
            else:
                result.request_id = rid
                self._error(result)
            if not self._busy and self._wakeup is not None:
                self._wakeup()  # answered later than the request: tell the transport

        batch = prepare_changes(request)
        self.acks_pending += 1
        self._engine.publish(batch, done)

    def _sync(self, request: SyncRequest) -> None:
        """§3.1: snapshot_begin, records, snapshot_end, then (live) changes > S."""
        rid = request.id
        selection = self._selection_of(request.collections, rid)
        if request.live:
            self._claim_live(rid)
            self._live_requested = True
            self._selection = selection
        snap = self._engine.snapshot(selection)
        self._out.append(encode(SnapshotBegin(snap.seq, self._engine.epoch, snap.total, rid)))
        self._stream = _Stream(snap, snap.seq, request.live, selection, rid)

    def _subscribe(self, request: SubscribeRequest) -> None:
        """§3.2: subscribed at S, then every change > S."""
        rid = request.id
        engine = self._engine
        selection = self._selection_of(request.collections, rid)
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
        self._live_requested = True
        self._selection = selection
        self._out.append(encode(Subscribed(after, engine.epoch, rid)))
        if after == point:
            self._join()
        else:
            self._stream = _Stream(None, after, True, selection, rid)

    def _join(self) -> None:
        self._engine.fanout.join(self._subscriber, self._selection)
        self.joined = True

    def _pump_snapshot(self, st: _Stream, max_bytes: int) -> None:
        snap = st.snapshot
        assert snap is not None
        lines = snap.read(max_bytes)
        if lines:
            self._out.append(b"".join(lines))
        if not snap.done:
            return
        self._out.append(encode(SnapshotEnd(snap.seq, snap.count, st.rid)))
        st.snapshot = None
        if not st.live:
            self._stream = None

    def _pump_catch_up(self, st: _Stream, max_bytes: int) -> None:
        """§5.2: changes from the log up to the fan-out's position, then join it."""
        engine = self._engine
        selection = st.selection
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
                if selection is None or rec.collection in selection:
                    line = rec.change_line()
                    out.append(line)
                    size += len(line)
            st.after = records[-1].seq
        if out:
            self._out.append(b"".join(out))
