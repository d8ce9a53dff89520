"""The HTTP port (aiohttp): WebSocket, snapshot and publish endpoints, metrics,
health, and the dashboard (docs/http.md).

It runs on the server's event loop and goes through the same engine as the TCP
transport: one state, one change log, one fan-out.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
import weakref
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from statecast.core.engine import Duplicate
from statecast.core.filters import parse_where
from statecast.core.frames import Ack, ErrorFrame, SnapshotEnd, encode, encode_error
from statecast.core.policy import Grant
from statecast.core.protocol import parse_publish_body
from statecast.core.session import admit_publish, view_of
from statecast.core.view import View
from statecast.errors import (
    BadRequest,
    ProtocolError,
    SlowConsumer,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from statecast.metrics import Metrics
from statecast.transports.base import Host
from statecast.transports.output import STREAM_STEP
from statecast.transports.websocket import WsConnection

__all__ = ["QuietClientErrors", "TimedAppRunner", "TimedServer", "make_app"]

log = logging.getLogger("statecast.transports.http")
_WEB = importlib.resources.files("statecast") / "web"
_STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}


def error_response(exc: ProtocolError) -> web.Response:
    """§6 error frame as the body, with the error class's HTTP status."""
    return web.Response(
        body=msgspec.json.encode(ErrorFrame.of(exc)),
        status=exc.status,
        content_type="application/json",
    )


class _Handlers:
    """The endpoints of docs/http.md, each a method (see :func:`make_app`)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.metrics = Metrics(host)

    def require_ready(self) -> None:
        if not self.host.ready:
            raise Unavailable("the server is not ready (loading its store, or stopping)")

    def grant_of(self, request: web.Request, *, required: bool) -> Grant | None:
        """§3.8 over HTTP: the grant of ``Authorization: Bearer T``. Without auth
        configured, everything; with it, a missing header is refused when
        ``required`` (a WebSocket may send ``auth`` as its first message instead)."""
        verifier = self.host.verifier
        if verifier is None:
            return Grant.ANONYMOUS
        header = request.headers.get("Authorization")
        if header is None:
            if required:
                raise Unauthorized("send 'Authorization: Bearer <token>'")
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        return verifier.verify(token.strip())

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """§10: protocol v1 over a WebSocket."""
        try:
            self.require_ready()
            grant = self.grant_of(request, required=False)
        except ProtocolError as exc:
            return error_response(exc)
        # Messages up to max_line are ours to refuse with a too_large frame (§10); only
        # far bigger ones are cut by aiohttp itself (close 1009, no frame).
        ws = web.WebSocketResponse(max_msg_size=4 * self.host.config.max_line, heartbeat=None)
        await ws.prepare(request)
        await WsConnection(self.host, request, ws, grant).run()
        return ws

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        """The snapshot as streamed NDJSON: record lines, then snapshot_end (§3.1)."""
        try:
            self.require_ready()
            grant = self.grant_of(request, required=True)
            assert grant is not None
            view = self.view_of(request, grant)
        except ProtocolError as exc:
            return error_response(exc)
        engine = self.host.engine
        snap = engine.snapshot(view.collections)
        headers = {
            "Content-Type": "application/x-ndjson",
            "X-Statecast-Seq": str(snap.seq),
            "X-Statecast-Epoch": engine.epoch,
        }
        if view.where is None:  # a filtered count would tell of records outside the view
            headers["X-Statecast-Count"] = str(snap.total)
        sent = 0
        try:
            if request.method == "HEAD":  # the headers only
                return web.Response(headers=headers)
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            while not snap.done:
                if view.where is None:
                    blob, count = snap.read_joined(STREAM_STEP)
                else:
                    lines = [ln for ln in snap.read(STREAM_STEP) if view.accepts_line(ln)]
                    blob, count = b"".join(lines), len(lines)
                if count:
                    sent += count
                    await resp.write(blob)  # waits while the client is slow
                # One step a loop turn, like every stream (§7): the write above returns
                # at once while the socket takes it, and a filter may match nothing.
                await asyncio.sleep(0)
            if snap.cut:  # §7: it kept too many old versions alive; say so, last
                await resp.write(encode_error(SlowConsumer("the snapshot was cut: sync again")))
            else:
                await resp.write(encode(SnapshotEnd(snap.seq, sent)))
            await resp.write_eof()
        except ConnectionError:  # the client went away mid-way: nothing to report
            log.debug("snapshot client %s left at record %d", request.remote, sent)
        finally:
            snap.close()  # also when the client went away mid-way
        return resp

    def view_of(self, request: web.Request, grant: Grant) -> View:
        """``?collections=a,b&where={...}``, narrowed by the grant (§3.7)."""
        names = request.query.get("collections")
        where_text = request.query.get("where")
        where: object = None
        if where_text is not None:
            try:
                where = msgspec.json.decode(where_text)
            except msgspec.DecodeError as exc:
                raise BadRequest(f"where: not JSON: {exc}") from None
            except (RecursionError, UnicodeDecodeError):
                raise BadRequest("where: not JSON (nested too deeply, or not UTF-8)") from None
        grant_where = parse_where(grant.where, "token.where")
        listed = None if names is None else [n.strip() for n in names.split(",") if n.strip()]
        return view_of(grant, grant_where, listed, where)

    async def publish(self, request: web.Request) -> web.Response:
        """POST the body of a publish request; the answer is its ack (§3.3)."""
        try:
            self.require_ready()
            grant = self.grant_of(request, required=True)
            assert grant is not None
            body = await self.body_of(request)
            prepared = admit_publish(
                parse_publish_body(body), grant, self.host.limits, self.host.engine
            )
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                TooLarge(f"request body longer than {self.host.config.max_line} bytes")
            )
        except web.RequestPayloadError as exc:  # e.g. a body its Content-Encoding is not
            # "400, message:\n  Can not decode content-encoding: gzip" -> the reason
            reason = " ".join(str(exc).split()).removeprefix("400, message:").strip()
            return error_response(BadRequest(f"the request body cannot be read: {reason}"))
        except ProtocolError as exc:
            return error_response(exc)
        result = await self.host.apublish_prepared(prepared)
        if isinstance(result, ProtocolError):
            return error_response(result)
        ack = Ack(int(result), duplicate=isinstance(result, Duplicate))
        return web.Response(body=msgspec.json.encode(ack), content_type="application/json")

    async def body_of(self, request: web.Request) -> bytes:
        """The request's body, within ``--request-timeout`` of its head (§7): the head
        timeout of :class:`TimedServer` ends with the head, and a client that then
        sends nothing would hold the request open for good."""
        timeout = self.host.limits.request_timeout
        try:
            return await asyncio.wait_for(request.read(), timeout)
        except TimeoutError:
            self.host.engine.limit_hits["request_timeout"] += 1
            assert timeout is not None
            raise BadRequest(
                f"the request body was not sent within {timeout:g}s: closing"
            ) from None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        """200 once the store is loaded and, with a PostgreSQL source, it streams;
        503 otherwise, saying why (docs/http.md). A server whose source is down still
        serves what it has: only its readiness says that it is behind."""
        host = self.host
        if not host.ready:
            why = "stopping" if host.stopping else "loading"
            return web.json_response({"status": why}, status=503)
        body: dict[str, Any] = {"status": "ready", "seq": host.engine.seq}
        source = host.source_status()
        if source is not None:
            body["source"] = source
            # Connecting counts as ready until a connection has failed (down_seconds):
            # the source connects again after its initial load, and after a blip.
            state = source["state"]
            if state not in ("streaming", "connecting") or "down_seconds" in source:
                body["status"] = "source down" if state == "connecting" else f"source {state}"
                return web.json_response(body, status=503)
        return web.json_response(body)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


def _static(name: str) -> Any:
    data = (_WEB / name).read_bytes()
    content_type = _STATIC[name]

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=data,
            content_type=content_type,
            headers={"Cache-Control": "no-cache"},
        )

    return handler


class QuietClientErrors(logging.Filter):
    """aiohttp logs a traceback at ERROR for each client that leaves mid-response or
    sends a malformed request (or a body that does not decode, which aiohttp meets
    again when it drains the rest after the 400): client behaviour, not a server
    fault. They become one INFO line without traceback, at most one per ``every``
    seconds."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._last = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not isinstance(
            exc, ConnectionError | HttpProcessingError | web.RequestPayloadError
        ):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            self.suppressed += 1
            return False
        self._last = now
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg = "HTTP client error (%s)%s"
        record.args = (
            " ".join(str(exc).split()),
            f"; {self.suppressed} more not logged" if self.suppressed else "",
        )
        record.exc_info = None
        record.exc_text = None
        self.suppressed = 0
        return True


_quiet = QuietClientErrors()
logging.getLogger("aiohttp.server").addFilter(_quiet)


class _TimedRequestHandler(RequestHandler):
    """aiohttp's connection handler, which also notes when the client began a request
    it has not finished sending (§7 ``--request-timeout``: a slowloris client is
    closed; aiohttp itself times out only idle keep-alive connections)."""

    begun: float | None = None

    def data_received(self, data: bytes) -> None:
        # Once upgraded (a WebSocket), what comes is frames for the WebSocket's own
        # reader, not requests: they are not timed here (a session times its own
        # requests, §7). Timing them left ``begun`` set for good, since no HTTP head
        # ever completes again, and closed every WebSocket that had sent anything
        # ``request_timeout`` seconds later.
        if self._upgraded_here():
            super().data_received(data)
            return
        if self.begun is None:
            self.begun = time.monotonic()
        super().data_received(data)
        if getattr(self, "_messages", None) or self._upgraded_here():
            self.begun = None  # the request's head is complete

    def _upgraded_here(self) -> bool:
        """Whether the connection now carries another protocol (aiohttp's own flags)."""
        return bool(getattr(self, "_upgraded", False)) or (
            getattr(self, "_payload_parser", None) is not None
        )


class TimedServer(web.Server):
    """``web.Server`` making :class:`_TimedRequestHandler` connections, and closing
    those that have not finished a request head within ``request_timeout``."""

    request_timeout: float | None = None
    _handlers: weakref.WeakSet[_TimedRequestHandler]
    closed_slow = 0

    def __call__(self) -> RequestHandler:
        handler = _TimedRequestHandler(self, loop=self._loop, **self._kwargs)
        self._handlers.add(handler)
        return handler

    def close_stalled(self) -> None:
        """Close the connections that began a request more than ``request_timeout``
        seconds ago and still have not sent its head (called about once a second)."""
        timeout = self.request_timeout
        if timeout is None:
            return
        now = time.monotonic()
        for handler in list(self._handlers):
            begun = handler.begun
            if begun is not None and now - begun >= timeout and handler.transport is not None:
                self.closed_slow += 1
                handler.begun = None
                handler.transport.close()


class TimedAppRunner(web.AppRunner):
    """An AppRunner whose server is a :class:`TimedServer`. aiohttp builds the server
    inside ``Application._make_handler`` and discourages subclassing Application, so
    the server it built is made a TimedServer (a subclass adding one method and a
    factory: the same layout)."""

    def __init__(
        self, app: web.Application, *, request_timeout: float | None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.request_timeout = request_timeout
        self.timed: TimedServer | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = TimedServer
        assert isinstance(server, TimedServer)
        server.request_timeout = self.request_timeout
        server._handlers = weakref.WeakSet()
        self.timed = server
        return server


def make_app(host: Host) -> web.Application:
    app = web.Application(client_max_size=host.config.max_line)
    h = _Handlers(host)
    app.router.add_get("/", _static("index.html"))
    app.router.add_get("/app.js", _static("app.js"))
    app.router.add_get("/style.css", _static("style.css"))
    app.router.add_get("/ws", h.websocket)
    app.router.add_get("/v1/snapshot", h.snapshot)
    app.router.add_post("/v1/publish", h.publish)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    app.router.add_get("/metrics", h.prometheus)
    return app
