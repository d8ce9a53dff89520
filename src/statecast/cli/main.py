"""The ``statecast`` command. Each ``serve`` option maps onto one :class:`Config`
field, and each can also be set in the environment as ``STATECAST_<NAME>``
(``STATECAST_MAX_PENDING=16777216``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import msgspec

from statecast._version import __version__
from statecast.cli import commands as tools
from statecast.cli.demo import TradingDesk
from statecast.client.connection import DEFAULT_URL
from statecast.config import Config
from statecast.core.protocol import Change
from statecast.errors import ConfigError, StatecastError
from statecast.loops import new_event_loop
from statecast.server import Server

__all__ = ["main", "run"]

log = logging.getLogger("statecast")
_defaults = Config()
FC = TypeVar("FC", bound=Callable[..., Any])


def _size(text: str) -> int:
    """Bytes, with an optional K, M or G suffix (powers of 1024)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    for suffix, f in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            text, factor = text[:-1], f
            break
    try:
        return int(float(text) * factor)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 8388608, 8M, 512K)") from None


class SizeType(click.ParamType[int]):
    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        return value if isinstance(value, int) else _size(str(value))


class OffType(click.ParamType[Any]):
    """A number, or ``off`` (also ``0`` where 0 would make no sense) for ``None``."""

    def __init__(self, inner: type[int] | type[float], zero_is_off: bool) -> None:
        self.inner = inner
        self.zero_is_off = zero_is_off
        self.name = f"{inner.__name__}|off"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
            return None
        try:
            number = self.inner(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number or 'off'", param, ctx)
        return None if self.zero_is_off and number == 0 else number


def option(flag: str, *decls: str, **kwargs: Any) -> Callable[[FC], FC]:
    """A ``serve`` option that may also come from ``STATECAST_<NAME>``."""
    name = flag.removeprefix("--").upper().replace("-", "_")
    return click.option(
        flag, *decls, envvar=f"STATECAST_{name}", show_envvar=True, show_default=True, **kwargs
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="statecast")
def main() -> None:
    """statecast: a state-sync server. A consistent snapshot, then every change."""


@main.command()
@option("--host", default=_defaults.host, help="Address to listen on.")
@option("--port", default=_defaults.port, type=int, help="TCP port (0: any free port).")
@option(
    "--http-port",
    default=_defaults.http_port,
    type=OffType(int, zero_is_off=False),
    help="HTTP port: dashboard, /ws, /v1/*, /metrics, /healthz (0: any free port; off).",
)
@option(
    "--tls-cert",
    default=_defaults.tls_cert,
    type=click.Path(dir_okay=False, exists=True),
    help="PEM certificate (chain): TLS on the TCP and HTTP ports (with --tls-key).",
)
@option(
    "--tls-key",
    default=_defaults.tls_key,
    type=click.Path(dir_okay=False, exists=True),
    help="PEM private key of --tls-cert.",
)
@option(
    "--insecure",
    is_flag=True,
    default=_defaults.insecure,
    help="Allow listening beyond loopback without access tokens (anyone reads everything).",
)
@option(
    "--auth-secret",
    default=_defaults.auth_secret,
    help="Require HS256 access tokens signed with this secret (>= 32 bytes; docs/security.md).",
)
@option(
    "--auth-public-key",
    default=_defaults.auth_public_key,
    type=click.Path(dir_okay=False, exists=True),
    help="Require RS256/ES256 access tokens that this PEM public key verifies.",
)
@option(
    "--store",
    default=_defaults.store,
    help="Where the state lives: 'sqlite' (DATA_DIR/statecast.db), 'sqlite:PATH', 'memory', "
    "or 'nats://HOST:PORT[,HOST:PORT...]' (a cluster, docs/cluster.md).",
)
@option(
    "--data-dir",
    default=_defaults.data_dir,
    type=click.Path(file_okay=False),
    help="Directory of the 'sqlite' store's database.",
)
@option(
    "--sqlite-synchronous",
    default=_defaults.sqlite_synchronous,
    type=click.Choice(["full", "normal"]),
    help="'full': an ack survives power loss; 'normal': a process crash (see docs/durability.md).",
)
@option(
    "--sqlite-busy-timeout",
    default=_defaults.sqlite_busy_timeout,
    type=float,
    help="Seconds a commit waits for another process's lock on the database.",
)
@option("--retain", default=_defaults.retain, type=int, help="Changes kept for resume.")
@option(
    "--nats-stream",
    default=_defaults.nats_stream,
    help="The JetStream stream of a nats:// store (docs/cluster.md).",
)
@option(
    "--nats-creds",
    default=_defaults.nats_creds,
    type=click.Path(dir_okay=False),
    help="NATS credentials file (JWT and nkey) for a nats:// store.",
)
@option(
    "--nats-ca-file",
    default=_defaults.nats_ca_file,
    type=click.Path(dir_okay=False),
    help="CA bundle to verify tls:// NATS servers.",
)
@option(
    "--max-pending",
    default=_defaults.max_pending,
    type=SizeType(),
    help="Output bytes that may wait for one subscriber before it is cut off (8M, 512K).",
)
@option("--max-line", default=_defaults.max_line, type=SizeType(), help="Longest request line.")
@option(
    "--max-changes",
    default=_defaults.max_changes,
    type=OffType(int, zero_is_off=True),
    help="Most changes in one publish (off: no limit).",
)
@option(
    "--max-value",
    default=_defaults.max_value,
    type=OffType(int, zero_is_off=True),
    help="Most bytes of one value (off: --max-line bounds it).",
)
@option(
    "--max-connections-per-user",
    default=_defaults.max_connections_per_user,
    type=OffType(int, zero_is_off=True),
    help="Most connections of one token subject ('sub'), with auth (off: no limit).",
)
@option(
    "--max-request-rate",
    default=_defaults.max_request_rate,
    type=OffType(float, zero_is_off=True),
    help="Requests per second one connection may sustain (off: no limit).",
)
@option(
    "--request-burst",
    default=_defaults.request_burst,
    type=int,
    help="Requests one connection may send at once under --max-request-rate.",
)
@option(
    "--heartbeat",
    default=_defaults.heartbeat,
    type=OffType(float, zero_is_off=True),
    help="Seconds of silence before a heartbeat to a subscriber (0: off).",
)
@option(
    "--flush-interval",
    default=_defaults.flush_interval,
    type=float,
    help="Least seconds between two fan-out flushes: more changes per write, more latency.",
)
@option(
    "--shutdown-grace",
    default=_defaults.shutdown_grace,
    type=float,
    help="Seconds that output may take to drain on shutdown.",
)
@option(
    "--auth-timeout",
    default=_defaults.auth_timeout,
    type=float,
    help="Seconds a connection has to authenticate, with auth on.",
)
@option(
    "--demo",
    is_flag=True,
    default=_defaults.demo,
    help="Run producers that simulate a trading desk.",
)
@option(
    "--event-loop",
    "--loop",
    "event_loop",
    default=_defaults.event_loop,
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    help="Event loop implementation.",
)
@option(
    "--log-level",
    default=_defaults.log_level,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Least severe log messages shown.",
)
def serve(**options: Any) -> None:
    """Run a server until SIGINT or SIGTERM."""
    try:
        config = Config(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run(config))


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (§8). Returns the exit status."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    with asyncio.Runner(loop_factory=lambda: new_event_loop(config.event_loop)) as runner:
        try:
            runner.run(_serve(config))
        except (OSError, StatecastError) as exc:
            log.error("cannot start: %s", exc)
            return 1
    return 0


async def _serve(config: Config) -> None:
    loop = asyncio.get_running_loop()
    server = Server(config)
    await server.start()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: shutting down", sig.name)
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    desk = None
    if config.demo:
        desk = TradingDesk(server)
        desk.start()
        log.info("demo: %d producer threads simulate a trading desk", desk.threads)
    try:
        await stop.wait()
    finally:
        if desk is not None:
            await asyncio.to_thread(desk.stop)
        await server.stop()


# -- client commands ------------------------------------------------------------------
def url_option(fn: FC) -> FC:
    return click.option(
        "--url",
        default=DEFAULT_URL,
        envvar="STATECAST_URL",
        show_envvar=True,
        show_default=True,
        help="The server, tcp://HOST:PORT.",
    )(fn)


def _collections(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


@main.command("sync")
@url_option
@click.option("--collections", help="Comma-separated collections (default: all).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="File to write the NDJSON snapshot to (default: standard output).",
)
def sync_command(url: str, collections: str | None, output: str) -> None:
    """Write the server's state as NDJSON record lines."""
    if output == "-":
        code = tools.run_tool(
            lambda: tools.sync(url, _collections(collections), sys.stdout.buffer, "stdout")
        )
    else:
        with open(output, "wb") as f:
            code = tools.run_tool(lambda: tools.sync(url, _collections(collections), f, output))
    sys.exit(code)


@main.command("watch")
@url_option
@click.option("--collections", help="Comma-separated collections (default: all).")
@click.option(
    "--json", "as_json", is_flag=True, help="NDJSON change frames (the default when piped)."
)
def watch_command(url: str, collections: str | None, as_json: bool) -> None:
    """Sync, then show every change as it happens; reconnect and resume by itself."""
    sys.exit(tools.run_tool(lambda: tools.watch(url, _collections(collections), as_json)))


@main.command("publish")
@url_option
@click.option("--delete", "delete", is_flag=True, help="Delete COLLECTION KEY.")
@click.option(
    "--ndjson", is_flag=True, help="Read changes, one JSON object a line, from standard input."
)
@click.option(
    "--batch",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Changes per publish with --ndjson.",
)
@click.argument("args", nargs=-1)
def publish_command(
    url: str, delete: bool, ndjson: bool, batch: int, args: tuple[str, ...]
) -> None:
    """Publish changes and print the acknowledged seq.

    \b
    statecast publish COLLECTION KEY JSON
    statecast publish --delete COLLECTION KEY
    statecast publish --ndjson < changes.ndjson
    """
    if ndjson:
        if args:
            raise click.UsageError("--ndjson takes no arguments: changes come from standard input")
        sys.exit(tools.run_tool(lambda: tools.publish_many(url, sys.stdin.buffer, batch)))
    if delete:
        if len(args) != 2:
            raise click.UsageError("usage: statecast publish --delete COLLECTION KEY")
        change = Change(args[0], args[1], delete=True)
    else:
        if len(args) != 3:
            raise click.UsageError("usage: statecast publish COLLECTION KEY JSON")
        try:
            value = msgspec.json.decode(args[2])
        except msgspec.DecodeError as exc:
            raise click.UsageError(f"JSON is not valid JSON: {exc}") from None
        change = Change(args[0], args[1], value)
    sys.exit(tools.run_tool(lambda: tools.publish_one(url, change)))


@main.command("stats")
@url_option
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=float,
    help="Seconds over which rates are measured.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (the default when piped).")
def stats_command(url: str, interval: float, as_json: bool) -> None:
    """The server's seq, epoch, connections, counters and rates."""
    sys.exit(tools.run_tool(lambda: tools.stats(url, interval, as_json)))
