"""The TCP transport: an asyncio protocol that pumps bytes through a Session.

Only the event loop thread runs this code. Output goes through one transport, so
frames never interleave (§1), and every connection's waiting output is bounded:
streams (snapshots, catch-ups) pause while the socket's buffer is above the high-water
mark, and live changes that would push it past ``max_pending`` disconnect the
subscriber instead (§7).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from statecast.errors import SlowConsumer
from statecast.protocol import encode_heartbeat
from statecast.session import Session

if TYPE_CHECKING:
    from statecast.server import Server

__all__ = ["TcpConnection"]

log = logging.getLogger("statecast.tcp")

# Bytes waiting in the socket's buffer above which a stream pauses, and below which it
# resumes; and the size of one step of a stream. They bound a syncing client's memory.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
STREAM_STEP = 128 * 1024
# How long a connection we close may take to flush its last frames.
CLOSE_LINGER = 2.0


class TcpConnection(asyncio.Protocol):
    transport_name = "tcp"

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self.last_send = 0.0  # the server's coarse clock at the last write
        self._write_paused = False
        self._read_paused = False
        self._pump_handle: asyncio.Handle | None = None
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
        server = self._server
        self.session = server.new_session(self, wakeup=self._after)
        self.last_send = server.clock
        server._register(self)
        log.debug("connection from %s", self.peer)
        if server.stopping:
            self.session.shutdown()
        self._after()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None or self._closing:
            return
        session.receive_data(data)
        self._after()

    def eof_received(self) -> bool:
        # The client finished sending. Requests already received are still answered
        # (``nc`` closes its side right after ``sync me``), so keep the socket open
        # for writing until the session has nothing left to stream or to ack.
        self._eof = True
        session = self.session
        return session is not None and (session.subscribed or not session.settled)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = self._closing = True
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.session is not None:
            self.session.close()
        self._server._unregister(self)
        log.debug("connection from %s closed%s", self.peer, f": {exc}" if exc else "")

    def pause_writing(self) -> None:
        self._write_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        session = self.session
        if session is not None and session.streaming:
            self._schedule_pump()
        else:
            self._set_reading(True)

    # -- fanout.Subscriber -----------------------------------------------------
    def deliver(self, blob: bytes) -> None:
        if self._closing:
            return
        t = self.transport
        assert t is not None
        assert self.session is not None
        pending = self.session.data_to_send()
        if pending:  # keep frames in the order they were produced
            t.write(pending)
        if t.get_write_buffer_size() + len(blob) > self._server.config.max_pending:
            self._slow_consumer(t.get_write_buffer_size())
            return
        t.write(blob)
        self.last_send = self._server.clock

    # -- server interface ------------------------------------------------------
    def send_heartbeat(self) -> None:
        if self._closing or self.transport is None:
            return
        self.transport.write(encode_heartbeat(self._server.engine.fanout.flushed_seq))
        self.last_send = self._server.clock

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
        """Write what the session produced, then decide what runs next."""
        session = self.session
        t = self.transport
        if session is None or t is None or self._closing:
            return
        out = session.data_to_send()
        if out:
            t.write(out)
            self.last_send = self._server.clock
        if session.closing:
            self._close(CLOSE_LINGER)
        elif session.streaming:
            self._set_reading(False)
            self._schedule_pump()
        elif self._eof and not session.subscribed and session.settled:
            self._close(CLOSE_LINGER)
        else:
            self._set_reading(not self._write_paused)

    def _schedule_pump(self) -> None:
        if self._pump_handle is None and not self._write_paused:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        # One step per loop iteration, so one big sync never starves other clients.
        self._pump_handle = None
        session = self.session
        if session is None or self._closing or self._write_paused:
            return
        session.pump(STREAM_STEP)
        self._after()

    def _set_reading(self, on: bool) -> None:
        t = self.transport
        if t is None or self._closing or on is not self._read_paused:
            return  # gone, or already reading (on) / already paused (off)
        if on:
            t.resume_reading()
        else:
            t.pause_reading()
        self._read_paused = not on

    def _slow_consumer(self, pending: int) -> None:
        server = self._server
        server.slow_consumer_disconnects += 1
        log.warning(
            "disconnecting slow consumer %s: %d bytes waiting, limit %d",
            self.peer,
            pending,
            server.config.max_pending,
        )
        assert self.session is not None
        self.session.fail(
            SlowConsumer(
                f"more than {server.config.max_pending} bytes waiting to be sent: "
                "resume with subscribe from your last seq"
            )
        )
        self._after()

    def _close(self, linger: float) -> None:
        """Close after the buffered output is written, or abort after ``linger``."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.transport.close()
        if not self._closed:
            self._linger = self._loop.call_later(linger, self.abort)
