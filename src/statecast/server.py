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
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from aiohttp import web

from statecast._version import __version__
from statecast.config import Config
from statecast.core import accel
from statecast.core.engine import Engine
from statecast.core.fanout import Subscriber
from statecast.core.pacing import FlushPacer
from statecast.core.policy import Grant
from statecast.core.protocol import Change, Prepared, PreparedChange, prepare_publish
from statecast.core.session import InflightBudget, Session
from statecast.core.store import Store
from statecast.errors import ConfigError, ProtocolError, ServerStateError, ShuttingDown
from statecast.inbox import PublishInbox
from statecast.loops import LoopThread
from statecast.security import (
    UserConnections,
    limits_of,
    server_ssl_context,
    verifier_of,
    warn_if_open,
)
from statecast.stores import open_store
from statecast.transports.base import Connections
from statecast.transports.http import TimedAppRunner, make_app
from statecast.transports.tcp import TcpConnection

if TYPE_CHECKING:
    from statecast.sources.batches import Applier
    from statecast.sources.postgres import Plan, PostgresSource

__all__ = ["Server"]

log = logging.getLogger("statecast.server")

Changes = Iterable[Change | Mapping[str, Any]] | Change | Mapping[str, Any]
AnyFuture = asyncio.Future[int] | concurrent.futures.Future[int]


# File descriptors kept free beyond --max-connections: the store, /healthz, /metrics,
# the log, a few HTTP requests still work when every client slot is taken (§7).
FD_HEADROOM = 256


def fd_headroom(max_connections: int | None) -> None:
    """Raise the soft limit on open files as far as the hard one allows, and say so
    when --max-connections would not leave FD_HEADROOM descriptors free."""
    try:
        import resource  # noqa: PLC0415 (Unix only)
    except ImportError:  # pragma: no cover (Windows)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open file limit to %d: %s", want, exc)
    if max_connections is not None and max_connections + FD_HEADROOM > soft:
        log.warning(
            "--max-connections %d leaves fewer than %d of the %d open files this process "
            "may have for everything else: lower it, or raise 'ulimit -n'",
            max_connections,
            FD_HEADROOM,
            soft,
        )


def _settle(fut: AnyFuture) -> Callable[[int | ProtocolError], None]:
    """A publish's done callback that resolves ``fut`` with the seq or the error."""

    def done(result: int | ProtocolError) -> None:
        if fut.cancelled():
            return
        if isinstance(result, int):
            fut.set_result(result)
        else:
            fut.set_exception(result)

    return done


class Server:
    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        config = config or Config()
        self.config = config.replace(**settings) if settings else config
        self.version = __version__
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Engine | None = None
        self._store: Store | None = None
        self._inbox: PublishInbox[Prepared] | None = None
        # A PostgreSQL source (--source, docs/postgres.md): its thread hands its batches
        # to the loop through an inbox of its own, applied in order by the applier.
        self._source: PostgresSource | None = None
        self._source_inbox: PublishInbox[list[PreparedChange]] | None = None
        self._applier: Applier | None = None
        self._listener: asyncio.Server | None = None
        self.connections = Connections()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._loop_thread: LoopThread | None = None
        self.stopping = False
        self._serving = False  # listening, and not stopping
        self._started_at = 0.0
        self._engine_callbacks: list[Callable[[Engine], object]] = []
        self._http: TimedAppRunner | None = None
        self._http_site: web.TCPSite | None = None
        self.clock = 0.0  # loop time, refreshed by the heartbeat timer
        # Access control and TLS (security.py); checked here, so that a bad key file
        # fails the constructor, not the first connection.
        self.verifier = verifier_of(self.config)
        self.ssl = server_ssl_context(self.config)
        self.limits = limits_of(self.config)
        self.users = UserConnections(self.config.max_connections_per_user)
        self.inflight = InflightBudget(self.config.max_inflight_total)

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
            # Idle keep-alive connections close after a while, stalled requests after
            # --request-timeout (§7; aiohttp's own default keeps them an hour).
            self._http = TimedAppRunner(
                make_app(self),
                request_timeout=cfg.request_timeout,
                access_log=None,
                keepalive_timeout=75.0,
            )
            await self._http.setup()
            self._http_site = web.TCPSite(
                self._http, cfg.host, cfg.http_port, reuse_address=True, ssl_context=self.ssl
            )
            await self._http_site.start()
            scheme = "https" if self.ssl else "http"
            log.info(
                "HTTP on %s://%s:%d (dashboard, /ws, /metrics)", scheme, cfg.host, self.http_port
            )
        try:
            await self._open_and_listen(loop)
        except BaseException:
            # Leave nothing behind: no HTTP port, no open store, no listener.
            if self._source is not None:
                await asyncio.to_thread(self._source.stop)
                self._source = None
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
        fd_headroom(cfg.max_connections)
        store = open_store(cfg)
        if cfg.source is not None:
            self._check_source_store(store)
        log.info("opening store %s", store.description)
        # Loading a large store takes seconds: keep the loop free meanwhile.
        await asyncio.to_thread(store.open, loop.call_soon_threadsafe)
        self._store = store
        plan = await self._prepare_source(store) if cfg.source is not None else None
        self._engine = Engine(
            store,
            FlushPacer(loop, follow_demand=cfg.flush_pacing == "latency").schedule,
            timer=loop.call_later,
            flush_interval=cfg.flush_interval,
            dedupe_window=cfg.dedupe_window,
        )
        store.state.max_retained = cfg.max_snapshot_retained
        store.start(self._engine.install)
        for callback in self._engine_callbacks:
            callback(self._engine)
        self._inbox = PublishInbox(loop, self._apply_inbox)
        if plan is not None:
            await self._start_source(loop, plan)
        self._stopped = asyncio.Event()
        self._listener = await loop.create_server(
            lambda: TcpConnection(self),
            cfg.host,
            cfg.port,
            reuse_address=True,
            backlog=4096,
            ssl=self.ssl,
        )
        self._heartbeat_task = loop.create_task(self._heartbeats(), name="statecast-heartbeat")
        self._serving = True
        warn_if_open(cfg)
        log.info(
            "statecast %s listening on %s://%s:%d (store %s, seq %d, %d records, epoch %s%s%s)",
            self.version,
            "tls" if self.ssl else "tcp",
            cfg.host,
            self.port,
            store.description,
            store.state.seq,
            len(store.state),
            store.epoch,
            ", access tokens required" if self.verifier else "",
            # About half the ingest rate (docs/architecture.md): worth a word at start.
            f", no C speedups: {accel.why_not}" if accel.why_not else "",
        )

    @staticmethod
    def _check_source_store(store: Store) -> None:
        """Refuse, before opening it, a store that cannot commit source positions."""
        from statecast.core.store import SourceStore  # noqa: PLC0415

        if not isinstance(store, SourceStore):
            raise ConfigError(
                f"the store {store.description} cannot follow a PostgreSQL source: it "
                "does not commit source positions (docs/postgres.md); use --store sqlite or memory"
            )

    async def _prepare_source(self, store: Store) -> Plan:
        """Check the source, and resume or reload it (docs/postgres.md), before the
        engine exists: a reload may reset the store."""
        from statecast.core.store import SourceStore  # noqa: PLC0415
        from statecast.sources.postgres import (  # noqa: PLC0415 (loads psycopg2)
            PostgresSource,
            SourceSettings,
        )

        assert isinstance(store, SourceStore)
        source = PostgresSource(SourceSettings.from_config(self.config))
        self._source = source
        log.info("checking the PostgreSQL source %s", source.settings.shown_url)
        return await asyncio.to_thread(source.prepare, store)

    async def _start_source(self, loop: asyncio.AbstractEventLoop, plan: Plan) -> None:
        """Start the source thread; return once its initial load is committed, so that
        no client ever sees part of it."""
        from statecast.sources.batches import Applier  # noqa: PLC0415

        source = self._source
        assert source is not None
        engine = self.engine
        engine.read_only.update(source.collections)
        self._applier = Applier(engine)
        self._source_inbox = PublishInbox(loop, self._applier.take)
        # A reload under a new epoch keeps the records that do not come from the source.
        for start in range(0, len(plan.carry), 10_000):
            result = await self.apublish_prepared(plan.carry[start : start + 10_000])
            if isinstance(result, ProtocolError):
                raise result
        if plan.carry:
            log.info("kept %d records of collections not from the source", len(plan.carry))
        plan.carry = []
        await asyncio.wrap_future(source.start(self._source_inbox.put))
        source.loaded_seq = engine.seq

    async def stop(self, grace: float | None = None) -> None:
        """§8: stop accepting, send every client ``bye``, let output drain for up to
        ``grace`` seconds (default: ``config.shutdown_grace``), then close the rest."""
        if self._loop is None or self._stopped is None:
            return
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        self._serving = False
        grace = self.config.shutdown_grace if grace is None else grace
        assert self._listener is not None
        assert self._inbox is not None
        assert self._engine is not None
        assert self._store is not None
        for conn in self.connections:
            conn.stop_reading()  # §8: nothing more is read; what was read is answered
        self._listener.close()
        if self._source is not None:
            # The source first: what it handed over is committed below; the rest, and
            # what the slot has not confirmed, streams again at the next start.
            await asyncio.to_thread(self._source.stop)
            if self._applier is not None:
                self._applier.close()
            if self._source_inbox is not None:
                self._source_inbox.close()
        self._inbox.close()  # publishes queued before now are applied, later ones refused
        committed = self._loop.create_future()
        self._store.flush(lambda: committed.set_result(None))
        await committed  # every publish received is committed (or failed) and acked
        self._engine.fanout.flush()
        # §3.9: conflated subscribers get the newest state now, not at their next tick.
        self._engine.fanout.emit_conflated()
        for conn in self.connections:
            conn.shutdown()
        if self.connections:
            try:
                await asyncio.wait_for(self.connections.wait_idle(), grace)
            except TimeoutError:
                log.warning(
                    "%d connection(s) did not drain within %.1fs; closing them",
                    len(self.connections),
                    grace,
                )
                for conn in self.connections:
                    conn.abort()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.connections.wait_idle(), 1.0)
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
        if self._loop_thread is not None or self._loop is not None:
            raise ServerStateError("this server was started already")
        lt = LoopThread("statecast-server", self.config.event_loop)
        try:
            lt.run(self.start(), timeout)
        except BaseException:
            lt.close()
            raise
        self._loop_thread = lt
        return self

    def stop_in_thread(self, grace: float | None = None, timeout: float | None = None) -> None:
        """Stop a server started with :meth:`start_in_thread`, and join its thread."""
        lt, self._loop_thread = self._loop_thread, None
        if lt is None:
            return
        try:
            lt.run(self.stop(grace), timeout)
        finally:
            lt.close(timeout)

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_in_thread()

    # -- publishing ------------------------------------------------------------
    def publish(
        self,
        changes: Changes,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Apply one atomic batch from any thread but the loop's; return its last seq.

        §3.3: a change may carry ``if_seq`` (``Change(..., if_seq=N)``): the record's
        last-written seq must be N (0: it must not exist), or
        :class:`~statecast.errors.Conflict` is raised and nothing is applied. With an
        ``idempotency_key`` seen within the dedupe window, nothing is applied again and
        the first publish's seq is returned (a :class:`~statecast.core.engine.Duplicate`).

        Raises :class:`~statecast.errors.BadRequest` (nothing applied) for an
        invalid change and :class:`~statecast.errors.ShuttingDown` once stopping.
        """
        if self._on_loop_thread():
            raise ServerStateError(
                "publish() would block the event loop: use 'await server.apublish(...)'"
            )
        return self.publish_nowait(changes, idempotency_key=idempotency_key).result(timeout)

    def publish_nowait(
        self, changes: Changes, *, idempotency_key: str | None = None
    ) -> concurrent.futures.Future[int]:
        """Like :meth:`publish`, without waiting (from any thread, the loop's too):
        the future gets the seq."""
        prepared = prepare_publish(changes, idempotency_key=idempotency_key)
        if self._engine is not None:
            self._engine.check_writable(c[0] for c in prepared.batch)
        inbox = self._inbox
        if inbox is None:
            raise ServerStateError("the server is not running: start it before publishing")
        return inbox.put(prepared)

    async def apublish(self, changes: Changes, *, idempotency_key: str | None = None) -> int:
        """Publish from a coroutine; on the server's own loop this applies at once."""
        prepared = prepare_publish(changes, idempotency_key=idempotency_key)
        if self._engine is not None:
            self._engine.check_writable(c[0] for c in prepared.batch)
        if self._on_loop_thread():
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.engine.publish(
                prepared.batch, _settle(fut), conditions=prepared.conditions, key=prepared.key
            )
            return await fut
        if self._inbox is None:
            raise ServerStateError("the server is not running: start it before publishing")
        return await asyncio.wrap_future(self._inbox.put(prepared))

    def put(self, collection: str, key: str, value: Any) -> int:
        """Upsert one record (from any thread but the loop's)."""
        return self.publish([Change(collection, key, value)])

    def delete(self, collection: str, key: str) -> int:
        """Delete one record (from any thread but the loop's)."""
        return self.publish([Change(collection, key, delete=True)])

    def _apply_inbox(self, items: list[tuple[Prepared, concurrent.futures.Future[int]]]) -> None:
        engine = self.engine
        for prepared, fut in items:
            try:
                engine.publish(
                    prepared.batch, _settle(fut), conditions=prepared.conditions, key=prepared.key
                )
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
    def ready(self) -> bool:
        """Serving: the store is loaded (and caught up), and the server is not stopping."""
        return self._serving and self._store is not None and self._store.ready

    @property
    def source_ready(self) -> bool:
        """No source, or the source streams (its initial load done, PostgreSQL up)."""
        return self._source is None or self._source.ready

    def source_status(self) -> dict[str, Any] | None:
        """What the PostgreSQL source is doing (None without one): ``state`` (loading,
        streaming, down, failed), ``lag_bytes``, ``committed_lsn``, counters, ``error``."""
        if self._source is None:
            return None
        status = self._source.status()
        status["loaded_seq"] = self._source.loaded_seq
        return status

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

    def new_session(
        self,
        subscriber: Subscriber,
        *,
        wakeup: Callable[[], None],
        grant: Grant | None = None,
    ) -> Session:
        """The protocol state of a new connection, whatever its transport; ``grant``
        when the transport authenticated it already (an HTTP Authorization header)."""
        return Session(
            self.engine,
            subscriber,
            version=self.version,
            limits=self.limits,
            auth=self.verifier,
            grant=grant,
            admit=self.users.admit,
            release=self.users.release,
            inflight=self.inflight,
            wakeup=wakeup,
            stats=self.stats,
        )

    def on_engine(self, callback: Callable[[Engine], object]) -> None:
        """Call ``callback(engine)`` once the engine exists (now, if it does)."""
        if self._engine is not None:
            callback(self._engine)
        else:
            self._engine_callbacks.append(callback)

    async def apublish_prepared(
        self, batch: list[PreparedChange] | Prepared
    ) -> int | ProtocolError:
        """Publish a validated batch on the loop; the seq (a ``Duplicate`` for a key
        seen before, §3.3), or the error (not raised)."""
        if self.stopping:
            return ShuttingDown("the server is shutting down")
        p = batch if isinstance(batch, Prepared) else Prepared(batch)
        fut: asyncio.Future[int | ProtocolError] = asyncio.get_running_loop().create_future()
        self.engine.publish(p.batch, fut.set_result, conditions=p.conditions, key=p.key)
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
            "connections": len(self.connections),
            "connections_accepted": self.connections.accepted,
            "subscribers": engine.fanout.subscriber_count,
            "records": len(engine.store.state),
            "open_snapshots": engine.store.state.open_snapshots,
            "changes_published": engine.changes_published,
            "deliveries": engine.fanout.deliveries,
            "slow_consumer_disconnects": self.connections.slow_consumer_disconnects,
            "publishes_failed": engine.publishes_failed,
            "retained_changes": len(engine.store.log),
            "store": engine.store.description
            + ("" if self._source is None else f"; source {self._source.summary()}"),
            "uptime": round(time.monotonic() - self._started_at, 3),
            "source": self.source_status(),
        }

    # -- connections -----------------------------------------------------------
    async def _heartbeats(self) -> None:
        """§4.3: a heartbeat to every subscriber that has had no frame for a while."""
        loop = asyncio.get_running_loop()
        interval = self.config.heartbeat
        tick = min(interval / 4, 1.0) if interval else 1.0
        while True:
            await asyncio.sleep(tick)
            self.clock = now = loop.time()
            if self._http is not None and self._http.timed is not None:
                self._http.timed.close_stalled()  # §7 --request-timeout, over HTTP
            self._tick_connections(now, interval)

    def _tick_connections(self, now: float, interval: float | None) -> None:
        """One tick for every connection. A function of its own, so that no variable of
        the sleeping heartbeat loop keeps a closed connection alive."""
        for conn in self.connections:
            session = conn.session
            if session is None:
                continue
            session.tick()  # token expiry; auth, request, idle, snapshot timeouts
            if session.degraded:
                conn.restore_if_drained()  # §7 --slow-consumer conflate
            if (
                interval is not None
                and session.joined
                and not session.closing
                and now - conn.last_send >= interval
            ):
                conn.send_heartbeat()
