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

from aiohttp import WSMsgType, web

from statecast.core.frames import encode_heartbeat
from statecast.core.policy import Grant
from statecast.core.session import Session
from statecast.transports.base import Host
from statecast.transports.output import STREAM_STEP, cut_slow_consumer, over_limit

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
        self._closing = False
        self.session: Session = host.new_session(self, wakeup=self._take_output, grant=grant)

    # -- the handler -------------------------------------------------------------------
    async def run(self) -> None:
        host = self._host
        host.connections.add(self)
        sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            if host.stopping:
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
                await asyncio.wait_for(sender, host.config.shutdown_grace + 1)
            if not sender.done():
                sender.cancel()
            self.session.close()
            host.connections.discard(self)
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
                    self.last_send = self._host.clock
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
        waiting = self._buffered()
        if over_limit(self._host, waiting, len(blob)):
            cut_slow_consumer(self._host, self.session, self.peer, waiting)
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
            frame = encode_heartbeat(self._host.engine.fanout.flushed_seq)
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
