"""The ``statecast`` command. Each ``serve`` option maps onto one :class:`Config`
field, and each can also be set in the environment as ``STATECAST_<NAME>``
(``STATECAST_MAX_PENDING=16777216``)."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import msgspec

from statecast import tokens
from statecast._version import __version__
from statecast.allocator import tune_malloc
from statecast.cli import commands as tools
from statecast.cli import jsoninput, output, pem
from statecast.cli.demo import TradingDesk
from statecast.client.connection import DEFAULT_URL
from statecast.config import Config
from statecast.core.filters import parse_where
from statecast.core.policy import Grant, Scope
from statecast.core.protocol import MAX_IDEMPOTENCY_KEY, Change
from statecast.errors import BadRequest, ConfigError, StatecastError
from statecast.loops import new_event_loop
from statecast.server import Server
from statecast.tokens import MAX_KEY_FILE_SIZE

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
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
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
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number or 'off'", param, ctx)
        return None if self.zero_is_off and number == 0 else number


class SecondsType(click.ParamType[float]):
    """A finite number of seconds above 0 and at most ``most`` (``float`` takes ``nan``
    and ``inf``)."""

    name = "seconds"

    def __init__(self, most: float) -> None:
        self.most = most

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number) or not 0 < number <= self.most:
            self.fail(
                f"{value!r} is not a number of seconds above 0, at most {self.most:g}", param, ctx
            )
        return number


def option(flag: str, *decls: str, **kwargs: Any) -> Callable[[FC], FC]:
    """A ``serve`` option that may also come from ``STATECAST_<NAME>``."""
    name = flag.removeprefix("--").upper().replace("-", "_")
    return click.option(
        flag, *decls, envvar=f"STATECAST_{name}", show_envvar=True, show_default=True, **kwargs
    )


class _Command(click.Command):
    """A command whose help, printed while its arguments are read, may fail to be
    written: that is one line (cli/output.py), not a traceback."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with output.writing():  # --help and --version print here, and nothing else does
            return super().make_context(info_name, args, parent, **extra)


class _Statecast(_Command, click.Group):
    """The ``statecast`` group: standard output is flushed before the exit, and
    output that cannot be written (help, a token, a seq) is one line, not a traceback
    (cli/output.py)."""

    command_class = _Command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        output.hold_closed_std_fds()
        try:
            super().main(*args, **kwargs)
            code: int = 0  # not reached: in standalone mode, click exits
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except output.OutputClosed:
            output.silence_stdout()
            code = output.EXIT_PIPE
        except output.OutputError as exc:
            output.silence_stdout()
            output.report(exc)
            code = 1
        sys.exit(output.finish_stdout(code))


@click.group(cls=_Statecast, context_settings={"help_option_names": ["-h", "--help"]})
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
    "--dedupe-window",
    default=_defaults.dedupe_window,
    type=float,
    help="Seconds an idempotency key is remembered (and at least the last 100,000 keys).",
)
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
    "--nats-checkpoint-interval",
    default=_defaults.nats_checkpoint_interval,
    type=OffType(int, zero_is_off=True),
    help="Changes between checkpoints of a nats:// store (off: max(retain / 2, 10000)).",
)
@option(
    "--nats-replicas",
    default=_defaults.nats_replicas,
    type=OffType(int, zero_is_off=True),
    help="Replicas of the streams a nats:// store creates (off: 3 if NATS is clustered, else 1).",
)
@option(
    "--source",
    default=_defaults.source,
    help="Follow PostgreSQL tables: postgresql://USER@HOST:PORT/DATABASE (docs/postgres.md); "
    "prefer PGPASSWORD or ~/.pgpass to a password in the URL.",
)
@option(
    "--tables",
    default=_defaults.tables,
    help="Tables to follow, comma-separated (schema.table outside public); "
    "default: every table of --publication.",
)
@option(
    "--publication",
    default=_defaults.publication,
    help="The PostgreSQL publication to follow (created with --tables if missing).",
)
@option(
    "--slot",
    default=_defaults.slot,
    help="The logical replication slot statecast creates and owns in PostgreSQL.",
)
@option(
    "--numeric-as-number",
    is_flag=True,
    default=_defaults.numeric_as_number,
    help="Send numeric columns as JSON numbers (may round) instead of exact strings.",
)
@option(
    "--max-pending",
    default=_defaults.max_pending,
    type=SizeType(),
    help="Output bytes that may wait for one subscriber before it is cut off (8M, 512K).",
)
@option(
    "--slow-consumer",
    default=_defaults.slow_consumer,
    type=click.Choice(["disconnect", "conflate"]),
    help="A subscriber past --max-pending: cut off (it resumes), or conflated until drained.",
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
    "--max-connections",
    default=_defaults.max_connections,
    type=OffType(int, zero_is_off=True),
    help="Most open client connections; more get too_many_connections (off: no limit).",
)
@option(
    "--max-inflight",
    default=_defaults.max_inflight,
    type=int,
    help="Publishes of one connection waiting for their ack before it is read no further.",
)
@option(
    "--max-inflight-total",
    default=_defaults.max_inflight_total,
    type=int,
    help="Publishes of all connections waiting for their ack before reading pauses.",
)
@option(
    "--max-snapshot-retained",
    default=_defaults.max_snapshot_retained,
    type=OffType(int, zero_is_off=True),
    help="Bytes of old versions kept for open snapshots; past it the oldest is cut (off).",
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
    "--flush-pacing",
    default=_defaults.flush_pacing,
    type=click.Choice(["throughput", "latency"]),
    help="After a flush, wait as long as it took (throughput) or only as long as other "
    "work needs (latency: lower p99 with many subscribers, fewer changes per write).",
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
    "--request-timeout",
    default=_defaults.request_timeout,
    type=OffType(float, zero_is_off=True),
    help="Seconds a client may take to finish a request line once begun (slowloris; off).",
)
@option(
    "--idle-timeout",
    default=_defaults.idle_timeout,
    type=OffType(float, zero_is_off=True),
    help="Close connections with no subscription that send nothing this long (off).",
)
@option(
    "--snapshot-timeout",
    default=_defaults.snapshot_timeout,
    type=OffType(float, zero_is_off=True),
    help="Cut a snapshot the client has not read from this long, with slow_consumer (off).",
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
    for flag, path, problem_with in (
        ("--tls-cert", config.tls_cert, pem.problem_with_cert),
        ("--tls-key", config.tls_key, pem.problem_with_key),
    ):
        problem = None if path is None else problem_with(path)
        if problem is not None:
            raise click.BadParameter(problem, param_hint=f"'{flag}'")
    sys.exit(run(config))


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (§8). Returns the exit status."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    tune_malloc()  # this process is the server's own (statecast.allocator)
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
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: shutting down", sig.name)
            stop.set()

    # Before the "listening" line: a signal that comes as soon as the port is open
    # (a supervisor, a test) shuts down cleanly too.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
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
        help="The server's TCP port: tcp://HOST:PORT, or tls://HOST:PORT for TLS; several nodes "
        "of a cluster comma-separated (the first that answers; watch moves between them).",
    )(fn)


def client_options(fn: FC) -> FC:
    """``--url``, ``--ca-file`` and ``--token``: where and how a client command connects."""
    fn = click.option(
        "--token",
        envvar="STATECAST_TOKEN",
        show_envvar=True,
        help="Access token, for a server that requires them (see 'statecast token'); "
        "prefer the environment variable, which other users cannot see in ps.",
    )(fn)
    fn = click.option(
        "--ca-file",
        envvar="STATECAST_CA_FILE",
        show_envvar=True,
        type=click.Path(dir_okay=False, exists=True),
        help="PEM bundle of the CAs that may sign a tls:// server's certificate "
        "(default: the system's).",
    )(fn)
    return url_option(fn)


def _text(value: str | None, option: str) -> None:
    """An argument or variable holding bytes that are not UTF-8 arrives with surrogates
    (surrogateescape) that no frame can carry: a usage error, not a traceback."""
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError:
            raise click.UsageError(
                f"{option} is not valid text (bytes that are not UTF-8)"
            ) from None


def _target(url: str, ca_file: str | None, token: str | None) -> tools.Target:
    _text(token, "--token")
    try:
        return tools.Target(url, ca_file, token).check()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


_any_json = msgspec.json.Decoder()


def _collections(text: str | None) -> list[str] | None:
    _text(text, "--collections")
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


@main.command("sync")
@client_options
@click.option("--collections", help="Comma-separated collections (default: all).")
@click.option(
    "--output",
    "-o",
    "path",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="File to write the NDJSON snapshot to (default: standard output).",
)
def sync_command(
    url: str, ca_file: str | None, token: str | None, collections: str | None, path: str
) -> None:
    """Write the server's state as NDJSON record lines."""
    target = _target(url, ca_file, token)
    if path == "-":
        code = tools.run_tool(
            lambda: tools.sync(
                target, _collections(collections), sys.stdout.buffer, "standard output"
            )
        )
    else:
        try:
            f = open(path, "wb")  # noqa: SIM115 (closed below, after the sync)
        except OSError as exc:  # a missing directory, a path through a file, ""
            raise click.FileError(path, exc.strerror or str(exc)) from None
        code = 1
        try:
            code = tools.run_tool(lambda: tools.sync(target, _collections(collections), f, path))
        finally:
            try:
                output.close(f, path)  # what is still buffered may fail to go too
            except output.OutputError:
                if code == 0:
                    raise
    sys.exit(code)


@main.command("watch")
@client_options
@click.option("--collections", help="Comma-separated collections (default: all).")
@click.option(
    "--json", "as_json", is_flag=True, help="NDJSON change frames (the default when piped)."
)
def watch_command(
    url: str, ca_file: str | None, token: str | None, collections: str | None, as_json: bool
) -> None:
    """Sync, then show every change as it happens; reconnect and resume by itself."""
    target = _target(url, ca_file, token)
    sys.exit(tools.run_tool(lambda: tools.watch(target, _collections(collections), as_json)))


class _PublishCommand(_Command):
    """``publish c k -5`` reads ``-5`` as an option: the error says what to do."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.NoSuchOption as exc:
            if not _NEGATIVE.match(exc.option_name):
                raise
            raise click.UsageError(
                f"{exc.option_name} is read as an option: to publish a negative number, "
                f"put -- before the arguments (statecast publish -- COLLECTION KEY "
                f"{exc.option_name})",
                exc.ctx,
            ) from None


_NEGATIVE = re.compile(r"-\.?\d")


@main.command("publish", cls=_PublishCommand)
@client_options
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
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Apply this publish at most once, however often it is sent with this key "
    "within the server's --dedupe-window (default: a new key per run). With --ndjson, "
    "batch N gets KEY:N.",
)
@click.option(
    "--if-seq",
    type=click.IntRange(0),
    metavar="N",
    help="Apply only if the record is at seq N (0: it must not exist); else exit 3.",
)
@click.argument("args", nargs=-1)
def publish_command(
    *,
    url: str,
    ca_file: str | None,
    token: str | None,
    delete: bool,
    ndjson: bool,
    batch: int,
    idempotency_key: str | None,
    if_seq: int | None,
    args: tuple[str, ...],
) -> None:
    """Publish changes and print the acknowledged seq.

    \b
    statecast publish COLLECTION KEY JSON
    statecast publish --delete COLLECTION KEY
    statecast publish --ndjson < changes.ndjson
    statecast publish --idempotency-key fill-881 --if-seq 12 orders O-1 '{"qty":50}'

    A publish that loses its connection before the ack is sent again, with the same
    key, until acknowledged (30 s at most). With --ndjson, a line may carry its own
    "if_seq".

    \b
    Exit status:
      0  applied (also when the server had applied it before under the same
         --idempotency-key: "duplicate" on standard error, the original seq printed)
      1  the server cannot be reached or refused the publish
      2  usage error
      3  conflict: an if_seq did not hold; nothing was applied
    """
    target = _target(url, ca_file, token)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise click.BadParameter(
            f"1 to {MAX_IDEMPOTENCY_KEY} characters", param_hint="'--idempotency-key'"
        )
    if ndjson:
        if args:
            raise click.UsageError("--ndjson takes no arguments: changes come from standard input")
        if if_seq is not None:
            raise click.UsageError(
                '--if-seq is for one change: with --ndjson, give "if_seq" on each line'
            )
        sys.exit(
            tools.run_tool(
                lambda: tools.publish_many(
                    target, sys.stdin.buffer, batch, idempotency_key=idempotency_key
                )
            )
        )
    if delete:
        if len(args) != 2:
            raise click.UsageError("usage: statecast publish --delete COLLECTION KEY")
        if if_seq == 0:
            raise click.BadParameter(
                "0 means the record must not exist, and --delete deletes it: give the seq "
                "of the record to delete",
                param_hint="'--if-seq'",
            )
        change = Change(args[0], args[1], delete=True, if_seq=if_seq)
    else:
        if len(args) != 3:
            raise click.UsageError("usage: statecast publish COLLECTION KEY JSON")
        try:
            value = jsoninput.decode(args[2], _any_json, "valid JSON")
        except jsoninput.BadJSON as exc:
            raise click.UsageError(f"the JSON argument: {exc}") from None
        change = Change(args[0], args[1], value, if_seq=if_seq)
    sys.exit(tools.run_tool(lambda: tools.publish_one(target, change, idempotency_key)))


@main.command("stats")
@client_options
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=SecondsType(most=3600),
    help="Seconds over which rates are measured.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (the default when piped).")
def stats_command(
    url: str, ca_file: str | None, token: str | None, interval: float, as_json: bool
) -> None:
    """The server's seq, epoch, connections, counters and rates."""
    target = _target(url, ca_file, token)
    sys.exit(tools.run_tool(lambda: tools.stats(target, interval, as_json)))


# -- statecast token --------------------------------------------------------------------
class _OneLineUsageError(click.UsageError):
    """A usage error of ``statecast token``, shown as one line on standard error."""

    def show(self, file: Any = None) -> None:
        message = " ".join(self.format_message().split())
        click.echo(f"statecast token: {message} (see statecast token --help)", err=True)


class _OneLineCommand(_Command):
    """Every usage error, click's own included, is one line (exit status 2)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from None


def _read_private_key(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"--auth-private-key {path}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise ConfigError(f"--auth-private-key {path}: too large for a PEM key")
    return data


def _show_scope(scope: Scope) -> str:
    if scope is None:
        return "* (every collection)"
    return ", ".join(sorted(scope)) if scope else "none"


@main.command("token", cls=_OneLineCommand)
@click.option("--sub", required=True, help="Who the token is for (the 'sub' claim).")
@click.option(
    "--read",
    default="*",
    show_default=True,
    help="Collections it may sync and subscribe to: '*', 'none' or a comma list.",
)
@click.option(
    "--publish",
    default="none",
    show_default=True,
    help="Collections it may publish to: '*', 'none' or a comma list.",
)
@click.option(
    "--where",
    help='A filter ANDed into everything it reads, a JSON object: \'{"account":"ACC-1"}\'.',
)
@click.option(
    "--ttl", default="1h", show_default=True, help="How long it is valid: 45s, 30m, 8h, 2d."
)
@click.option(
    "--auth-secret",
    envvar="STATECAST_AUTH_SECRET",
    show_envvar=True,
    help="Sign with HS256 and this shared secret (the server's --auth-secret).",
)
@click.option(
    "--auth-private-key",
    envvar="STATECAST_AUTH_PRIVATE_KEY",
    show_envvar=True,
    help="Sign with this PEM private key file: RS256 (RSA) or ES256/384/512 (EC); the "
    "server verifies with its public key (--auth-public-key).",
)
def token_command(
    *,
    sub: str,
    read: str,
    publish: str,
    where: str | None,
    ttl: str,
    auth_secret: str | None,
    auth_private_key: str | None,
) -> None:
    """Mint an access token for a server started with the same key.

    Prints the token on standard output, one line; on a terminal, also what it grants
    (on standard error).

    \b
    statecast token --sub alice --read orders,positions \\
        --where '{"account":"ACC-1"}' --publish none --ttl 8h
    """
    if auth_secret is not None and auth_private_key is not None:
        # A flag beats the environment variable of the other kind of key.
        ctx = click.get_current_context()
        env = click.core.ParameterSource.ENVIRONMENT
        if ctx.get_parameter_source("auth_secret") is env:
            auth_secret = None
        elif ctx.get_parameter_source("auth_private_key") is env:
            auth_private_key = None
    try:
        token, grant, algorithm = _mint_token(
            sub=sub,
            read=read,
            publish=publish,
            where=where,
            ttl=ttl,
            auth_secret=auth_secret,
            auth_private_key=auth_private_key,
        )
    except ConfigError as exc:
        raise _OneLineUsageError(str(exc)) from None
    output.line(token)
    if sys.stdout.isatty():
        exp = grant.exp or 0.0
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp))
        lines = [
            f"sub      {grant.sub}",
            f"read     {_show_scope(grant.read)}",
            f"publish  {_show_scope(grant.publish)}",
            "where    "
            + ("none" if grant.where is None else msgspec.json.encode(grant.where).decode()),
            f"expires  {when} (in {_duration(exp - time.time())})",
            f"signed   {algorithm}",
        ]
        click.echo("\n".join(lines), err=True)


def _duration(seconds: float) -> str:
    """``2d``, ``1h 30m``, ``45s``: the two largest units (to the minute past an hour,
    so that a token minted just now for 2 days says 2d, not 2d 1s)."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        seconds = round(seconds / 60) * 60
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if secs or not parts:
        parts.append(f"{secs}s")
    return " ".join(parts[:2])


def _mint_token(
    *,
    sub: str,
    read: str,
    publish: str,
    where: str | None,
    ttl: str,
    auth_secret: str | None,
    auth_private_key: str | None,
) -> tuple[str, Grant, str]:
    """The token, what it grants (as the server will read it), and its algorithm;
    :class:`ConfigError` naming the flag for bad input."""
    if auth_secret is not None and auth_private_key is not None:
        raise ConfigError("give --auth-secret or --auth-private-key, not both")
    if auth_secret is None and auth_private_key is None:
        raise ConfigError(
            "give --auth-secret (or STATECAST_AUTH_SECRET) or --auth-private-key FILE: "
            "the key the server verifies tokens with"
        )
    read_scope = tokens.parse_scope(read, "--read")
    publish_scope = tokens.parse_scope(publish, "--publish")
    where_obj = tokens.parse_where_arg(where, "--where")
    try:
        parse_where(where_obj, "--where")  # the server's own rules for a filter (§3.7)
    except BadRequest as exc:
        raise ConfigError(str(exc)) from None
    seconds = tokens.parse_ttl(ttl, "--ttl")
    if auth_secret is not None:
        verifier = tokens.TokenVerifier(secret=auth_secret)  # names --auth-secret
        key: dict[str, Any] = {"secret": auth_secret}
    else:
        assert auth_private_key is not None
        pem = _read_private_key(auth_private_key)
        key = {"private_key": pem}
    try:
        token = tokens.mint(
            **key,
            sub=sub,
            read=read_scope,
            publish=publish_scope,
            where=where_obj,
            ttl=seconds,
        )
        if auth_private_key is not None:
            verifier = tokens.TokenVerifier(public_key=pem)
    except ConfigError as exc:
        message = str(exc)
        for name, flag in (
            ("private_key:", f"--auth-private-key {auth_private_key}:"),
            ("secret", "--auth-secret"),
        ):
            if message.startswith(name):
                message = flag + message[len(name) :]
                break
        raise ConfigError(message) from None
    algorithm = verifier.algorithms[0]
    return token, verifier.verify(token), algorithm
