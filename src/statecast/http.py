"""The HTTP port (aiohttp): WebSocket, snapshot and publish endpoints, metrics,
health, and the dashboard (docs/http.md).

It runs on the server's event loop and goes through the same engine as the TCP
transport: one state, one change log, one fan-out.
"""

from __future__ import annotations

import importlib.resources
import logging
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from statecast.errors import ProtocolError, TooLarge, Unavailable
from statecast.metrics import Metrics
from statecast.protocol import (
    encode_snapshot_end,
    parse_publish_body,
    prepare_changes,
    validate_collections,
)
from statecast.tcp import STREAM_STEP
from statecast.websocket import WsConnection

if TYPE_CHECKING:
    from statecast.server import Server

__all__ = ["make_app"]

log = logging.getLogger("statecast.http")

# HTTP status for each error code (§6).
STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "too_large": 413,
    "resync_required": 409,
    "unavailable": 503,
    "shutting_down": 503,
    "slow_consumer": 503,
    "internal": 500,
}
_WEB = importlib.resources.files("statecast") / "web"
_STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}


def error_response(exc: ProtocolError) -> web.Response:
    body = {"type": "error", "code": exc.code, "message": exc.message}
    return web.Response(
        body=msgspec.json.encode(body),
        status=STATUS.get(exc.code, 500),
        content_type="application/json",
    )


def make_app(server: Server) -> web.Application:
    app = web.Application(client_max_size=server.config.max_line)
    metrics = Metrics(server)

    def require_ready() -> None:
        if not server.ready:
            raise Unavailable("the server is not ready (loading its store, or stopping)")

    async def websocket(request: web.Request) -> web.StreamResponse:
        try:
            require_ready()
        except ProtocolError as exc:
            return error_response(exc)
        ws = web.WebSocketResponse(max_msg_size=server.config.max_line, heartbeat=None)
        await ws.prepare(request)
        await WsConnection(server, request, ws).run()
        return ws

    async def snapshot(request: web.Request) -> web.StreamResponse:
        """The snapshot as streamed NDJSON: record lines, then snapshot_end (§3.1)."""
        try:
            require_ready()
            names = request.query.get("collections")
            selection = (
                None
                if names is None
                else validate_collections(n.strip() for n in names.split(",") if n.strip())
            )
        except ProtocolError as exc:
            return error_response(exc)
        engine = server.engine
        snap = engine.snapshot(selection)
        try:
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "application/x-ndjson",
                    "X-Statecast-Seq": str(snap.seq),
                    "X-Statecast-Epoch": engine.epoch,
                    "X-Statecast-Count": str(snap.total),
                }
            )
            await resp.prepare(request)
            while not snap.done:
                lines = snap.read(STREAM_STEP)
                if lines:
                    await resp.write(b"".join(lines))  # waits while the client is slow
            await resp.write(encode_snapshot_end(snap.seq, snap.count, None))
            await resp.write_eof()
        finally:
            snap.close()  # also when the client went away mid-way
        return resp

    async def publish(request: web.Request) -> web.Response:
        """POST the body of a publish request; the answer is its ack (§3.3)."""
        try:
            require_ready()
            body = await request.read()
            batch = prepare_changes(parse_publish_body(body))
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                TooLarge(f"request body longer than {server.config.max_line} bytes")
            )
        except ProtocolError as exc:
            return error_response(exc)
        result = await server.apublish_prepared(batch)
        if isinstance(result, ProtocolError):
            return error_response(result)
        return web.Response(
            body=msgspec.json.encode({"type": "ack", "seq": result}),
            content_type="application/json",
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        if server.ready:
            return web.json_response({"status": "ready", "seq": server.engine.seq})
        why = "stopping" if server.stopping else "loading"
        return web.json_response({"status": why}, status=503)

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    def static(name: str) -> Any:
        data = (_WEB / name).read_bytes()
        content_type = _STATIC[name]

        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                body=data,
                content_type=content_type,
                headers={"Cache-Control": "no-cache"},
            )

        return handler

    app.router.add_get("/", static("index.html"))
    app.router.add_get("/app.js", static("app.js"))
    app.router.add_get("/style.css", static("style.css"))
    app.router.add_get("/ws", websocket)
    app.router.add_get("/v1/snapshot", snapshot)
    app.router.add_post("/v1/publish", publish)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    return app
