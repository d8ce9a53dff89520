"""The embeddable server: the engine, the TCP listener, and the publish API.

Use it from asyncio::

    async with statecast.Server(port=0) as server:
        await server.apublish([statecast.Change("orders", "O-1", {"qty": 100})])

or from ordinary threads::

    with statecast.Server() as server:          # runs its own loop in a thread
        seq = server.publish([statecast.Change("orders", "O-1", {"qty": 100})])

``publish`` is safe from any thread: the batch is validated and encoded in the
calling thread, then handed to the loop thread (see ``inbox.py``); nothing but the
loop thread touches the state or a transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Any, Protocol, Self

from aiohttp import web

from statecast.config import Config
from statecast.engine import Engine
from statecast.errors import ProtocolError, ServerStateError, ShuttingDown
from statecast.fanout import Subscriber
from statecast.inbox import Item, PublishInbox
from statecast.protocol import Change, PreparedChange, prepare_changes
from statecast.session import Session
from statecast.stores import Store, open_store
from statecast.tcp import TcpConnection

__all__ = ["Server", "__version__", "new_event_loop"]

log = logging.getLogger("statecast.server")

try:
    __version__ = version("statecast")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"


class Connection(Protocol):
    """What the server needs of a connection, whatever its transport."""

    transport_name: str
    last_send: float

    @property
    def session(self) -> Session | None: ...

    def send_heartbeat(self) -> None: ...
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...
    def pending_bytes(self) -> int: ...


Changes = Iterable[Change | Mapping[str, Any]] | Change | Mapping[str, Any]


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop when available (``auto``) or asked for."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: PLC0415 (optional dependency)
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class FlushPacer:
    """Decides when the fan-out flushes queued changes.

    As soon as possible when the server is idle, but never sooner after the last
    flush than that flush took (nor than ``min_interval``): under a heavy fan-out,
    changes then gather into fewer, larger writes instead of the flushes taking all
    the loop's time, so ingest and reads keep at least half of it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, min_interval: float) -> None:
        self._loop = loop
        self._min = min_interval
        self._next = 0.0  # loop time before which no flush starts

    def schedule(self, flush: Callable[[], None]) -> None:
        delay = self._next - self._loop.time()
        if delay > 0:
            self._loop.call_later(delay, self._run, flush)
        else:
            self._loop.call_soon(self._run, flush)

    def _run(self, flush: Callable[[], None]) -> None:
        t0 = self._loop.time()
        flush()
        t1 = self._loop.time()
        self._next = t1 + max(self._min, t1 - t0)


class Server:
    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        config = config or Config()
        self.config = config.replace(**settings) if settings else config
        self.version = __version__
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Engine | None = None
        self._store: Store | None = None
        self._inbox: PublishInbox | None = None
        self._listener: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set while there is no connection
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.stopping = False
        self.ready = False  # serving: the store is loaded and we are not stopping
        self._started_at = 0.0
        self._engine_callbacks: list[Callable[[Engine], object]] = []
        self._http: web.AppRunner | None = None
        self._http_site: web.TCPSite | None = None
        self.clock = 0.0  # loop time, refreshed by the heartbeat timer
        # Counters (metrics come later; the same numbers feed them).
        self.connections_accepted = 0
        self.slow_consumer_disconnects = 0

    # -- lifecycle (event loop) ----------------------------------------------
    async def start(self) -> None:
        """Open the store and start listening, on the running loop."""
        if self._loop is not None:
            raise ServerStateError("this server was started already")
        loop = self._loop = asyncio.get_running_loop()
        self.clock = loop.time()
        self._started_at = time.monotonic()
        cfg = self.config
        if cfg.http_port is not None:
            # HTTP first: /healthz and /readyz answer while the store loads.
            from statecast.http import make_app  # noqa: PLC0415 (import cycle)

            self._http = web.AppRunner(make_app(self), access_log=None)
            await self._http.setup()
            self._http_site = web.TCPSite(self._http, cfg.host, cfg.http_port, reuse_address=True)
            await self._http_site.start()
            log.info("HTTP on http://%s:%d (dashboard, /ws, /metrics)", cfg.host, self.http_port)
        try:
            await self._open_and_listen(loop)
        except BaseException:
            # Leave nothing behind: no HTTP port, no open store, no listener.
            if self._http is not None:
                await self._http.cleanup()
                self._http = None
            if self._store is not None:
                await asyncio.to_thread(self._store.close)
                self._store = None
            self._engine = None
            self._loop = None
            raise

    async def _open_and_listen(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.config
        store = open_store(cfg)
        log.info("opening store %s", store.description)
        # Loading a large store takes seconds: keep the loop free meanwhile.
        await asyncio.to_thread(store.open, loop.call_soon_threadsafe)
        self._store = store
        self._engine = Engine(store, FlushPacer(loop, cfg.flush_interval).schedule)
        for callback in self._engine_callbacks:
            callback(self._engine)
        self._inbox = PublishInbox(loop, self._apply_inbox)
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        self._listener = await loop.create_server(
            lambda: TcpConnection(self),
            cfg.host,
            cfg.port,
            reuse_address=True,
            backlog=4096,
        )
        self._heartbeat_task = loop.create_task(self._heartbeats(), name="statecast-heartbeat")
        self.ready = True
        log.info(
            "statecast %s listening on tcp://%s:%d (store %s, seq %d, %d records, epoch %s)",
            self.version,
            cfg.host,
            self.port,
            store.description,
            store.state.seq,
            len(store.state),
            store.epoch,
        )

    async def stop(self, grace: float | None = None) -> None:
        """§8: stop accepting, send every client ``bye``, let output drain for up to
        ``grace`` seconds (default: ``config.shutdown_grace``), then close the rest."""
        if self._loop is None or self._stopped is None:
            return
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        self.ready = False
        grace = self.config.shutdown_grace if grace is None else grace
        assert self._listener is not None
        assert self._inbox is not None
        assert self._idle is not None
        assert self._engine is not None
        assert self._store is not None
        self._listener.close()
        self._inbox.close()  # publishes queued before now are applied, later ones refused
        committed = self._loop.create_future()
        self._store.flush(lambda: committed.set_result(None))
        await committed  # every publish received is committed (or failed) and acked
        self._engine.fanout.flush()
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning(
                    "%d connection(s) did not drain within %.1fs; closing them",
                    len(self._connections),
                    grace,
                )
                for conn in list(self._connections):
                    conn.abort()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), 1.0)
        await self._listener.wait_closed()
        if self._http is not None:
            await self._http.cleanup()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        await asyncio.to_thread(self._store.close)
        log.info("statecast stopped at seq %d", self._engine.seq)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        if self._stopped is None:
            raise ServerStateError("the server was not started")
        await self._stopped.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- lifecycle (from a plain thread) -------------------------------------
    def start_in_thread(self, timeout: float = 10.0) -> Self:
        """Run the server on its own event loop in a background thread."""
        if self._thread is not None or self._loop is not None:
            raise ServerStateError("this server was started already")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            loop = new_event_loop(self.config.event_loop)
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            try:
                loop.run_until_complete(self.wait_stopped())
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="statecast-server", daemon=True)
        self._thread.start()
        started.result(timeout)
        return self

    def stop_in_thread(self, grace: float | None = None, timeout: float | None = None) -> None:
        """Stop a server started with :meth:`start_in_thread`, and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                fut = asyncio.run_coroutine_threadsafe(self.stop(grace), loop)
                fut.result(timeout)
        thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_in_thread()

    # -- publishing ------------------------------------------------------------
    def publish(self, changes: Changes, *, timeout: float | None = None) -> int:
        """Apply one atomic batch from any thread but the loop's; return its last seq.

        Raises :class:`~statecast.errors.BadRequest` (nothing applied) for an
        invalid change and :class:`~statecast.errors.ShuttingDown` once stopping.
        """
        if self._on_loop_thread():
            raise ServerStateError(
                "publish() would block the event loop: use 'await server.apublish(...)'"
            )
        return self.publish_nowait(changes).result(timeout)

    def publish_nowait(self, changes: Changes) -> concurrent.futures.Future[int]:
        """Like :meth:`publish`, without waiting (from any thread, the loop's too):
        the future gets the seq."""
        batch = prepare_changes(changes)
        inbox = self._inbox
        if inbox is None:
            raise ServerStateError("the server is not running: start it before publishing")
        return inbox.put(batch)

    async def apublish(self, changes: Changes) -> int:
        """Publish from a coroutine; on the server's own loop this applies at once."""
        batch = prepare_changes(changes)
        if self._on_loop_thread():
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def done(result: int | ProtocolError) -> None:
                if isinstance(result, int):
                    fut.set_result(result)
                else:
                    fut.set_exception(result)

            self.engine.publish(batch, done)
            return await fut
        if self._inbox is None:
            raise ServerStateError("the server is not running: start it before publishing")
        return await asyncio.wrap_future(self._inbox.put(batch))

    def put(self, collection: str, key: str, value: Any) -> int:
        """Upsert one record (from any thread but the loop's)."""
        return self.publish([Change(collection, key, value)])

    def delete(self, collection: str, key: str) -> int:
        """Delete one record (from any thread but the loop's)."""
        return self.publish([Change(collection, key, delete=True)])

    def _apply_inbox(self, items: list[Item]) -> None:
        engine = self.engine
        for batch, fut in items:

            def done(
                result: int | ProtocolError, fut: concurrent.futures.Future[int] = fut
            ) -> None:
                if fut.cancelled():
                    return
                if isinstance(result, int):
                    fut.set_result(result)
                else:
                    fut.set_exception(result)

            try:
                engine.publish(batch, done)
            except Exception as exc:  # a bug: report it to the caller, keep serving
                log.exception("internal error while applying a publish")
                fut.set_exception(exc)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    # -- state -----------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ServerStateError("the server is not running")
        return self._engine

    @property
    def port(self) -> int:
        """The TCP port listened on (useful with ``port=0``)."""
        if self._listener is None or not self._listener.sockets:
            raise ServerStateError("the server is not listening")
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def http_port(self) -> int:
        """The HTTP port listened on (useful with ``http_port=0``)."""
        site = self._http_site
        server = site._server if site is not None else None
        sockets = getattr(server, "sockets", None)
        if not sockets:
            raise ServerStateError("the HTTP port is not open")
        return int(sockets[0].getsockname()[1])

    def new_session(self, subscriber: Subscriber, *, wakeup: Callable[[], None]) -> Session:
        """The protocol state of a new connection, whatever its transport."""
        return Session(
            self.engine,
            subscriber,
            max_line=self.config.max_line,
            version=self.version,
            wakeup=wakeup,
            stats=self.stats,
        )

    def on_engine(self, callback: Callable[[Engine], object]) -> None:
        """Call ``callback(engine)`` once the engine exists (now, if it does)."""
        if self._engine is not None:
            callback(self._engine)
        else:
            self._engine_callbacks.append(callback)

    async def apublish_prepared(self, batch: list[PreparedChange]) -> int | ProtocolError:
        """Publish a validated batch on the loop; the seq, or the error (not raised)."""
        if self.stopping:
            return ShuttingDown("the server is shutting down")
        fut: asyncio.Future[int | ProtocolError] = asyncio.get_running_loop().create_future()
        self.engine.publish(batch, fut.set_result)
        return await fut

    @property
    def seq(self) -> int:
        return self.engine.seq

    @property
    def epoch(self) -> str:
        return self.engine.epoch

    def stats(self) -> dict[str, Any]:
        """Counters of the running server (read them on the loop thread for exact values)."""
        engine = self.engine
        return {
            "seq": engine.seq,
            "epoch": engine.epoch,
            "connections": len(self._connections),
            "connections_accepted": self.connections_accepted,
            "subscribers": engine.fanout.subscriber_count,
            "records": len(engine.store.state),
            "open_snapshots": engine.store.state.open_snapshots,
            "changes_published": engine.changes_published,
            "deliveries": engine.fanout.deliveries,
            "slow_consumer_disconnects": self.slow_consumer_disconnects,
            "publishes_failed": engine.publishes_failed,
            "retained_changes": len(engine.store.log),
            "store": engine.store.description,
            "uptime": round(time.monotonic() - self._started_at, 3),
        }

    # -- connections -----------------------------------------------------------
    def _register(self, conn: Connection) -> None:
        self._connections.add(conn)
        self.connections_accepted += 1
        if self._idle is not None:
            self._idle.clear()

    def _unregister(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._idle is not None:
            self._idle.set()

    async def _heartbeats(self) -> None:
        """§4.3: a heartbeat to every subscriber that has had no frame for a while."""
        loop = asyncio.get_running_loop()
        interval = self.config.heartbeat
        tick = min(interval / 4, 1.0) if interval else 1.0
        while True:
            await asyncio.sleep(tick)
            self.clock = now = loop.time()
            if interval is None:
                continue
            for conn in list(self._connections):
                session = conn.session
                if session is not None and session.joined and now - conn.last_send >= interval:
                    conn.send_heartbeat()
