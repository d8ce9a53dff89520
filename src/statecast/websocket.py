"""The WebSocket transport: protocol v1 over ``GET /ws`` (docs/protocol.md §10).

The same :class:`~statecast.session.Session` as the TCP transport does the protocol;
this file only moves its bytes through an aiohttp WebSocket. Every request is one text
message (several newline-separated requests are accepted too); the server sends each
batch of frames as one text message, frames separated by ``\\n``.

Output is bounded the same way as on TCP (§7): a stream (snapshot, catch-up) is produced
only as fast as the socket takes it, and live changes that would leave more than
``max_pending`` bytes waiting disconnect the subscriber with ``slow_consumer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from statecast.errors import SlowConsumer
from statecast.protocol import encode_heartbeat
from statecast.session import Session
from statecast.tcp import STREAM_STEP

if TYPE_CHECKING:
    from statecast.server import Server

__all__ = ["WsConnection"]

log = logging.getLogger("statecast.websocket")


class WsConnection:
    transport_name = "ws"

    def __init__(self, server: Server, request: web.Request, ws: web.WebSocketResponse) -> None:
        self._server = server
        self._request = request
        self._ws = ws
        self.peer = str(request.remote)
        self.last_send = server.clock
        self._out: deque[bytes] = deque()
        self._queued = 0  # bytes in _out
        self._wake = asyncio.Event()
        self._stream_idle = asyncio.Event()  # set when no stream is running
        self._closing = False
        self.session: Session = server.new_session(self, wakeup=self._take_output)

    # -- the handler -------------------------------------------------------------------
    async def run(self) -> None:
        server = self._server
        server._register(self)
        sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            if server.stopping:
                self.session.shutdown()
            self._take_output()
            async for msg in self._ws:
                if msg.type == WSMsgType.TEXT:
                    data = msg.data.encode()
                elif msg.type == WSMsgType.BINARY:
                    data = msg.data
                else:
                    break
                if not data.endswith(b"\n"):
                    data += b"\n"  # one message, one request (§10)
                self.session.receive_data(data)
                self._take_output()
                if self.session.closing:
                    break
                while self.session.streaming and not self._closing:
                    # Requests wait while a stream runs (§5.4), and are not read meanwhile.
                    self._stream_idle.clear()
                    self._wake.set()
                    await self._stream_idle.wait()
        finally:
            self._closing = True
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await asyncio.wait_for(sender, self._server.config.shutdown_grace + 1)
            if not sender.done():
                sender.cancel()
            self.session.close()
            server._unregister(self)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._ws.close()

    async def _send_loop(self) -> None:
        ws = self._ws
        try:
            while True:
                while self._out:
                    data = self._out.popleft()
                    self._queued -= len(data)
                    # One message per batch of frames, without the last newline.
                    await ws.send_frame(data[:-1], WSMsgType.TEXT)
                    self.last_send = self._server.clock
                session = self.session
                if session.streaming and not session.closed:
                    session.pump(STREAM_STEP)
                    self._take_output()
                    continue
                self._stream_idle.set()
                if session.closing or self._closing:
                    if not self._out:
                        await ws.close()
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

    def _buffered(self) -> int:
        t = self._request.transport
        return self._queued + (t.get_write_buffer_size() if t is not None else 0)

    # -- fanout.Subscriber ---------------------------------------------------------------
    def deliver(self, blob: bytes) -> None:
        if self._closing or self.session.closing:
            return
        self._take_output()
        limit = self._server.config.max_pending
        pending = self._buffered()
        if pending + len(blob) > limit:
            self._server.slow_consumer_disconnects += 1
            log.warning(
                "disconnecting slow websocket consumer %s: %d bytes waiting, limit %d",
                self.peer,
                pending,
                limit,
            )
            self.session.fail(
                SlowConsumer(f"more than {limit} bytes waiting to be sent: resume with subscribe")
            )
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
            frame = encode_heartbeat(self._server.engine.fanout.flushed_seq)
            self._out.append(frame)
            self._queued += len(frame)
            self._wake.set()

    def shutdown(self) -> None:
        self.session.shutdown()
        self._take_output()

    def abort(self) -> None:
        t = self._request.transport
        if t is not None:
            t.abort()

    def pending_bytes(self) -> int:
        return self._buffered()
