"""The TCP transport: an asyncio protocol that pumps bytes through a Session.

Only the event loop thread runs this code. Output goes through one transport, so
frames never interleave (§1), and every connection's waiting output is bounded:
streams (snapshots, catch-ups) pause while the socket's buffer is above the high-water
mark, and live changes that would push it past ``max_pending`` disconnect the
subscriber instead (§7, ``output.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from statecast.core.frames import encode_heartbeat
from statecast.core.session import Session
from statecast.transports.base import Host
from statecast.transports.output import (
    CLOSE_LINGER,
    HIGH_WATER,
    LOW_WATER,
    STREAM_BURST,
    STREAM_STEP,
    cut_slow_consumer,
    over_limit,
    refuse_connection,
)

__all__ = ["TcpConnection"]

log = logging.getLogger("statecast.transports.tcp")

# How many connections have a step scheduled, per event loop (§7 fairness): one that
# finds no other waiting for a turn streams STREAM_BURST bytes in its step, else
# STREAM_STEP. Entries go when they reach zero.
_queued: dict[asyncio.AbstractEventLoop, int] = {}


class TcpConnection(asyncio.Protocol):
    transport_name = "tcp"
    __slots__ = (
        "__weakref__",
        "_closed",
        "_closing",
        "_eof",
        "_host",
        "_linger",
        "_loop",
        "_read_paused",
        "_reading_stopped",
        "_step_handle",
        "_write_paused",
        "last_send",
        "peer",
        "session",
        "transport",
    )

    def __init__(self, host: Host) -> None:
        self._host = host
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self.last_send = 0.0  # the server's coarse clock at the last write
        self._write_paused = False
        self._read_paused = False
        self._reading_stopped = False  # for good: the server is shutting down
        self._step_handle: asyncio.Handle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._eof = False  # the client closed its sending side
        self._closing = False
        self._closed = False

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        t.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        peer = t.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        host = self._host
        if refuse_connection(host, t.write, self.peer):
            self._close(CLOSE_LINGER)
            return
        self.session = host.new_session(self, wakeup=self._after)
        self.last_send = host.clock
        host.connections.add(self)
        log.debug("connection from %s", self.peer)
        if host.stopping:
            self.session.shutdown()
        self._after()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None or self._closing:
            return
        session.receive_data(data)
        self._after()

    def eof_received(self) -> bool:
        # The client finished sending. Requests already received are still answered,
        # a last line without its newline too (``printf ping | nc -N``; ``nc`` closes
        # its side right after ``sync me``), so keep the socket open for writing until
        # the session has nothing left to stream or to ack.
        self._eof = True
        session = self.session
        if session is None or self._closing:
            return False
        session.receive_eof()
        self._after()
        return not self._closing

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = self._closing = True
        if self._step_handle is not None:
            self._step_handle.cancel()
            self._step_handle = None
            self._dequeue()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        session, self.session = self.session, None  # no cycle outlives the connection
        if session is not None:
            session.close()
            self._host.connections.discard(self)
        log.debug("connection from %s closed%s", self.peer, f": {exc}" if exc else "")

    def pause_writing(self) -> None:
        self._write_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.restore_if_drained()

    def restore_if_drained(self) -> None:
        """§7 --slow-consumer conflate: once a held subscriber has drained, what changed
        meanwhile and then every change again (also checked by the server's timer, for
        a buffer that never went above the high-water mark)."""
        session = self.session
        if session is not None and session.degraded and self.pending_bytes() <= LOW_WATER:
            session.restore()
        self._after()

    # -- fanout.Subscriber -----------------------------------------------------
    def deliver(self, blob: bytes) -> None:
        session = self.session
        if self._closing or session is None:
            return
        t = self.transport
        assert t is not None
        pending = session.data_to_send()
        if pending:  # keep frames in the order they were produced
            t.write(pending)
        waiting = t.get_write_buffer_size()
        if over_limit(self._host, waiting):
            cut_slow_consumer(self._host, session, self.peer, waiting)
            self._after()
            return
        t.write(blob)
        self.last_send = self._host.clock

    # -- server interface ------------------------------------------------------
    def send_heartbeat(self) -> None:
        if self._closing or self.transport is None:
            return
        self.transport.write(encode_heartbeat(self._host.engine.fanout.seq_of(self)))
        self.last_send = self._host.clock

    def stop_reading(self) -> None:
        """§8: the server is shutting down: read nothing more from this client."""
        self._reading_stopped = True
        self._set_reading(False)

    def shutdown(self) -> None:
        """§8: bye, then close once the output is written (the server aborts later)."""
        if self._closing or self.session is None:
            return
        self.session.shutdown()
        self._after()

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def pending_bytes(self) -> int:
        t = self.transport
        return 0 if t is None or self._closed else t.get_write_buffer_size()

    # -- internals -------------------------------------------------------------
    def _after(self) -> None:
        """Write what the session produced, then decide what runs next (§7): a stream
        step or the next slice of requests on a later loop turn, with reading paused
        meanwhile; reading while the session waits for nothing and the socket takes
        our output."""
        session = self.session
        t = self.transport
        if session is None or t is None or self._closing:
            return
        out = session.data_to_send()
        if out:
            t.write(out)
            self.last_send = self._host.clock
        if session.closing:
            self._close(CLOSE_LINGER)
        elif session.streaming or session.backlog:
            self._set_reading(False)
            if not session.waiting_for_acks or session.streaming:
                self._schedule_step()
            # else: an ack's wakeup calls _after() again
        elif self._eof and not session.subscribed and session.settled:
            self._close(CLOSE_LINGER)
        else:
            self._set_reading(not self._write_paused)

    def _schedule_step(self) -> None:
        if self._step_handle is None and not self._write_paused:
            self._step_handle = self._loop.call_soon(self._step)
            _queued[self._loop] = _queued.get(self._loop, 0) + 1

    def _dequeue(self) -> bool:
        """A scheduled step ran or was cancelled; whether no other connection of this
        loop has one scheduled."""
        loop = self._loop
        left = _queued[loop] - 1
        if left:
            _queued[loop] = left
        else:
            del _queued[loop]
        return not left

    def _step(self) -> None:
        # One step per loop turn (a stream step, or a slice of requests), so one busy
        # client never starves the others.
        self._step_handle = None
        alone = self._dequeue()
        session = self.session
        if session is None or self._closing or self._write_paused:
            return
        if session.streaming:
            session.pump(STREAM_BURST if alone else STREAM_STEP)
        else:
            session.resume()
        self._after()

    def _set_reading(self, on: bool) -> None:
        t = self.transport
        if on and self._reading_stopped:
            return
        if t is None or self._closing or on is not self._read_paused:
            return  # gone, or already reading (on) / already paused (off)
        if on:
            t.resume_reading()
        else:
            t.pause_reading()
        self._read_paused = not on

    def _close(self, linger: float) -> None:
        """Close after the buffered output is written, or abort after ``linger``."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.transport.close()
        if not self._closed:
            self._linger = self._loop.call_later(linger, self.abort)
