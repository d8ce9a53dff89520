"""The WebSocket transport: protocol v1 over ``GET /ws`` (docs/protocol.md §10).

The same :class:`~statecast.core.session.Session` as the TCP transport does the protocol;
this file only moves its bytes through an aiohttp WebSocket. Every request is one text
message (several newline-separated requests are accepted too); the server sends each
batch of frames as one text message, frames separated by ``\\n``.

Output is bounded the same way as on TCP (§7): a stream (snapshot, catch-up) is produced
only as fast as the socket takes it, and live changes that would leave more than
``max_pending`` bytes waiting disconnect the subscriber with ``slow_consumer``
(``output.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from statecast.core.frames import encode_heartbeat
from statecast.core.policy import Grant
from statecast.core.session import Session
from statecast.errors import TooLarge
from statecast.transports.base import Host
from statecast.transports.output import (
    LOW_WATER,
    STREAM_STEP,
    cut_slow_consumer,
    over_limit,
    refuse_connection,
)

__all__ = ["WsConnection"]

log = logging.getLogger("statecast.transports.websocket")


class WsConnection:
    transport_name = "ws"

    def __init__(
        self,
        host: Host,
        request: web.Request,
        ws: web.WebSocketResponse,
        grant: Grant | None = None,
    ) -> None:
        self._host = host
        self._request = request
        self._ws = ws
        self.peer = str(request.remote)
        self.last_send = host.clock
        self._out: deque[bytes] = deque()
        self._queued = 0  # bytes in _out
        self._wake = asyncio.Event()
        self._stream_idle = asyncio.Event()  # set when no stream is running
        self._answered = asyncio.Event()  # the session produced output (an ack came)
        self._closing = False
        self._close_code = WSCloseCode.OK
        self._reading_stopped = False
        self.session: Session = host.new_session(self, wakeup=self._take_output, grant=grant)

    # -- the handler -------------------------------------------------------------------
    async def run(self) -> None:
        host = self._host
        refused: list[bytes] = []
        if refuse_connection(host, refused.append, self.peer):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._ws.send_frame(refused[0][:-1], WSMsgType.TEXT)
                await self._ws.close()
            self.session.close()
            return
        host.connections.add(self)
        sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            if host.stopping:
                self.session.shutdown()
            self._take_output()
            async for msg in self._ws:
                data = self._request_of(msg)
                if data is None:
                    break
                if self._reading_stopped:
                    continue  # §8: shutting down; nothing more is handled
                self.session.receive_data(data)
                self._take_output()
                if self.session.closing:
                    break
                await self._settle()
        finally:
            self._closing = True
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await asyncio.wait_for(sender, host.config.shutdown_grace + 1)
            if not sender.done():
                sender.cancel()
            self.session.close()
            host.connections.discard(self)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._ws.close(code=self._close_code)

    def _request_of(self, msg: WSMessage) -> bytes | None:
        """The request bytes of one message (§10), or None when the connection ends."""
        if msg.type == WSMsgType.TEXT:
            data: bytes = msg.data.encode()
        elif msg.type == WSMsgType.BINARY:
            data = msg.data
        else:
            return None
        limit = self._host.config.max_line
        if len(data) > limit:  # §1, §10: too_large as a frame, then close 1009
            self.session.fail(TooLarge(f"a message longer than {limit} bytes"))
            self._close_code = WSCloseCode.MESSAGE_TOO_BIG
            self._take_output()
            return None
        if not data.endswith(b"\n"):
            data += b"\n"  # one message, one request (§10)
        return data

    async def _settle(self) -> None:
        """Wait, reading nothing more, while a stream runs (§5.4) or requests wait for
        their turn (§7: a slice per loop turn; publishes waiting for their acks)."""
        session = self.session
        while not self._closing and not session.closing:
            if session.streaming:
                self._stream_idle.clear()
                self._wake.set()
                await self._stream_idle.wait()
            elif session.backlog:
                if session.waiting_for_acks:
                    self._answered.clear()
                    await self._answered.wait()
                else:
                    await asyncio.sleep(0)  # the others' turn
                    session.resume()
                    self._take_output()
            else:
                return

    async def _send_loop(self) -> None:
        ws = self._ws
        try:
            while True:
                while self._out:
                    data = self._out.popleft()
                    self._queued -= len(data)
                    # One message per batch of frames, without the last newline.
                    await ws.send_frame(data[:-1], WSMsgType.TEXT)
                    self.last_send = self._host.clock
                session = self.session
                if session.degraded and self._buffered() < LOW_WATER:
                    session.restore()  # §7: drained; every change again
                    self._take_output()
                    continue
                if session.streaming and not session.closed:
                    session.pump(STREAM_STEP)
                    self._take_output()
                    continue
                self._stream_idle.set()
                if session.closing or self._closing:
                    if not self._out:
                        await ws.close(code=self._close_code)
                        return
                    continue
                self._wake.clear()
                await self._wake.wait()
        except (ConnectionError, RuntimeError) as exc:  # the peer went away
            log.debug("websocket %s: %s", self.peer, exc)
            self._closing = True
        finally:
            self._stream_idle.set()

    def _take_output(self) -> None:
        out = self.session.data_to_send()
        if out:
            self._out.append(out)
            self._queued += len(out)
        self._wake.set()
        self._answered.set()

    def _buffered(self) -> int:
        t = self._request.transport
        return self._queued + (t.get_write_buffer_size() if t is not None else 0)

    # -- fanout.Subscriber ---------------------------------------------------------------
    def deliver(self, blob: bytes) -> None:
        if self._closing or self.session.closing:
            return
        self._take_output()
        waiting = self._buffered()
        if over_limit(self._host, waiting):
            cut_slow_consumer(self._host, self.session, self.peer, waiting)
            if self.session.closing:
                self._out.clear()  # what was queued is dropped: the bound holds
                self._queued = 0
            self._take_output()
            return
        self._out.append(blob)
        self._queued += len(blob)
        self._wake.set()

    # -- server interface ----------------------------------------------------------------
    def send_heartbeat(self) -> None:
        if not self._closing:
            frame = encode_heartbeat(self._host.engine.fanout.seq_of(self))
            self._out.append(frame)
            self._queued += len(frame)
            self._wake.set()

    def stop_reading(self) -> None:
        self._reading_stopped = True

    def restore_if_drained(self) -> None:
        self._wake.set()  # the send loop restores a held subscriber once drained

    def shutdown(self) -> None:
        self.session.shutdown()
        self._take_output()

    def abort(self) -> None:
        t = self._request.transport
        if t is not None:
            t.abort()

    def pending_bytes(self) -> int:
        return self._buffered()
