"""The ``statecast`` command. Each ``serve`` option maps onto one :class:`Config`
field, and each can also be set in the environment as ``STATECAST_<NAME>``
(``STATECAST_MAX_PENDING=16777216``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import click

from statecast.config import Config
from statecast.demo import TradingDesk
from statecast.errors import ConfigError
from statecast.server import Server, __version__, new_event_loop

__all__ = ["main", "run"]

log = logging.getLogger("statecast")
_defaults = Config()


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


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "STATECAST"}
)
@click.version_option(__version__, prog_name="statecast")
def main() -> None:
    """statecast: a state-sync server. A consistent snapshot, then every change."""


@main.command()
@click.option("--host", default=_defaults.host, show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=_defaults.port,
    show_default=True,
    type=int,
    help="TCP port (0: any free port).",
)
@click.option(
    "--store", default=_defaults.store, show_default=True, help="Where the state lives: 'memory'."
)
@click.option(
    "--retain",
    default=_defaults.retain,
    show_default=True,
    type=int,
    help="Changes kept for resume.",
)
@click.option(
    "--max-pending",
    default=_defaults.max_pending,
    show_default=True,
    type=SizeType(),
    help="Output bytes that may wait for one subscriber before it is disconnected.",
)
@click.option(
    "--max-line",
    default=_defaults.max_line,
    show_default=True,
    type=SizeType(),
    help="Longest request line, in bytes.",
)
@click.option(
    "--heartbeat",
    default=_defaults.heartbeat,
    show_default=True,
    type=float,
    help="Seconds of silence before a heartbeat to a subscriber (0: off).",
)
@click.option(
    "--shutdown-grace",
    default=_defaults.shutdown_grace,
    show_default=True,
    type=float,
    help="Seconds output may take to drain on shutdown.",
)
@click.option("--demo", is_flag=True, help="Run producers that simulate a trading desk.")
@click.option(
    "--loop",
    "event_loop",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    help="Event loop implementation.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def serve(**options: Any) -> None:
    """Run a server until SIGINT or SIGTERM."""
    if options["heartbeat"] == 0:
        options["heartbeat"] = None
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
        except OSError as exc:
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
