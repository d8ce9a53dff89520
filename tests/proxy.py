"""A TCP proxy for tests that can cut every connection through it at any moment,
refuse connections for a while, or let the connections open now go silent."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from statecast.loops import new_event_loop


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to an upstream port; ``cut()`` resets all connections,
    ``block()`` resets them and refuses new ones until ``unblock()``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.loop = new_event_loop("asyncio")
        self._writers: set[asyncio.StreamWriter] = set()
        self.cuts = 0
        self.blocked = False
        self._frozen: set[asyncio.StreamWriter] = set()  # clients that get nothing more
        started = threading.Event()
        self._server: asyncio.Server | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._server = self.loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(10)
        assert self._server is not None
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.blocked:
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            w.transport.abort()
            return
        self._writers |= {w, uw}
        await asyncio.gather(self._pipe(r, uw), self._down(ur, w, uw))
        self._writers -= {w, uw}
        self._frozen -= {w, uw}

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    async def _down(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: asyncio.StreamWriter
    ) -> None:
        """What flows from the server to the client: passed on as it is, or dropped
        once ``freeze()`` was called (a subclass may look at it, and reset both sides,
        ``dst`` and ``upstream``)."""
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(1 << 16):
                if dst not in self._frozen:
                    dst.write(data)
                    await dst.drain()
        dst.transport.abort()

    def cut(self) -> None:
        """Reset every connection now (from any thread)."""

        def abort_all() -> None:
            self.cuts += 1
            for w in list(self._writers):
                w.transport.abort()

        self.loop.call_soon_threadsafe(abort_all)

    def freeze(self) -> None:
        """From now on, drop what the server sends on every open connection, and close
        nothing: what a network partition looks like to the client (from any thread).
        New connections are not affected."""

        def drop() -> None:
            self._frozen |= self._writers

        self.loop.call_soon_threadsafe(drop)

    def block(self) -> None:
        """Reset every connection and refuse new ones (from any thread)."""

        def refuse() -> None:
            self.blocked = True
            for w in list(self._writers):
                w.transport.abort()

        self.loop.call_soon_threadsafe(refuse)

    def unblock(self) -> None:
        def accept() -> None:
            self.blocked = False

        self.loop.call_soon_threadsafe(accept)

    def close(self) -> None:
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
