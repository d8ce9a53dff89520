"""The client commands of ``statecast``: sync, watch, publish, stats.

Each is a coroutine that returns an exit status; ``main.py`` maps the command line
onto them, and a :class:`Target` says where and how to connect (``--url``,
``--ca-file``, ``--token``). Progress and status go to standard error, data to standard output, so
that ``statecast sync > state.ndjson`` and ``statecast watch --json | jq`` work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import msgspec
from rich.console import Console
from rich.markup import escape as markup_escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from statecast.cli import jsoninput, output
from statecast.client.connection import (
    DEFAULT_URL,
    Client,
    check_token_settings,
    new_key,
    parse_address,
    tls_context_for,
)
from statecast.client.replica import Progress as SyncProgress
from statecast.client.replica import Replica, Resynced, Status, split_urls
from statecast.core.frames import Ack, Bye, ChangeFrame, SnapshotBegin, SnapshotEnd, encode
from statecast.core.protocol import Change
from statecast.errors import (
    ConfigError,
    Conflict,
    ConnectionClosed,
    ProtocolError,
    StatecastError,
    Timeout,
)
from statecast.loops import new_event_loop

__all__ = [
    "EXIT_CONFLICT",
    "Target",
    "publish_many",
    "publish_one",
    "run_tool",
    "stats",
    "sync",
    "watch",
]

_encode = msgspec.json.encode

# C0 and C1 control characters: in a server's message, a key or an epoch, they would
# reach the terminal as escape sequences (clear the screen, rewrite what it shows).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape(text: str) -> str:
    """Text from elsewhere (the server, the command line) for a console: rich markup
    escaped, and control characters shown as ``\\x1b``, not sent."""
    return markup_escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how a client command connects: ``--url``, ``--ca-file``, ``--token``."""

    url: str = DEFAULT_URL
    ca_file: str | None = None
    token: str | None = None

    def check(self) -> Target:
        """:class:`ConfigError` for a bad URL, CA file or token, before connecting."""
        for url in split_urls(self.url):
            tls_context_for(parse_address(url), self.ca_file, None)
        check_token_settings(self.token, None)
        return self

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Client]:
        """A connection to the first node of ``--url`` that answers (several nodes of
        a cluster may be given, comma-separated: docs/cluster.md)."""
        failure: ConnectionClosed | Timeout | None = None
        for url in split_urls(self.url):
            client = Client(
                url, ca_file=self.ca_file, token=self.token, connect_timeout=CONNECT_TIMEOUT
            )
            try:
                await client.connect()
            except (ConnectionClosed, Timeout) as exc:  # Timeout: no hello in time
                failure = exc
                continue
            try:
                yield client
            finally:
                await client.close()
            return
        assert failure is not None
        raise failure

    def replica(self, **options: Any) -> Replica:
        return Replica(
            self.url,
            ca_file=self.ca_file,
            token=self.token,
            connect_timeout=CONNECT_TIMEOUT,
            **options,
        )


def run_tool(coro: Callable[[], Awaitable[int]]) -> int:
    """Run a command; connection and server errors become one line and status 1
    (a reader of the output that went away: quietly, :data:`output.EXIT_PIPE`)."""
    err = Console(stderr=True, soft_wrap=True)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            return runner.run(coro())  # type: ignore[arg-type]
        except KeyboardInterrupt:
            return 130
        except output.OutputClosed:
            output.silence_stdout()
            return output.EXIT_PIPE
        except output.OutputError as exc:
            output.silence_stdout()
            err.print(f"[red]statecast:[/] {escape(str(exc))}")
            return 1
        except ConfigError as exc:  # a setting, not the server: a usage error
            err.print(f"[red]statecast:[/] {escape(str(exc))}")
            return 2
        except ConnectionClosed as exc:
            err.print(f"[red]statecast:[/] {escape(str(exc))}")
            return 1
        except ProtocolError as exc:
            err.print(f"[red]statecast:[/] {escape(exc.code)}: {escape(exc.message)}")
            return 1
        except StatecastError as exc:
            err.print(f"[red]statecast:[/] {escape(str(exc))}")
            return 1


# How long a command waits for the server's hello (the client library's default).
CONNECT_TIMEOUT = 10.0
# How long a command waits for the server's answer, or for the next part of a snapshot,
# before it says so and gives up (a server that accepts and then says nothing). A live
# subscription (watch) has no such deadline once synced: a quiet server sends nothing,
# or heartbeats only (§4.3), and the replica rides out a connection that ends.
ANSWER_TIMEOUT = 30.0


def _silent(target: Target) -> StatecastError:
    return StatecastError(
        f"no answer from {target.url} for {ANSWER_TIMEOUT:g} s: is it a statecast server, "
        "and is it well?"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@contextlib.asynccontextmanager
async def _answer_within(target: Target) -> AsyncIterator[asyncio.Timeout]:
    """``asyncio.timeout(ANSWER_TIMEOUT)``, whose expiry says so in one line;
    ``reschedule`` on what it gives pushes the deadline on (progress was made)."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT) as deadline:
            yield deadline
    except TimeoutError:
        raise _silent(target) from None


# -- sync ---------------------------------------------------------------------------
async def sync(target: Target, collections: list[str] | None, sink: IO[bytes], label: str) -> int:
    """Write the snapshot as NDJSON ``record`` lines to ``sink`` (``label`` names it);
    progress on a terminal."""
    err = Console(stderr=True, soft_wrap=True)
    show = err.is_terminal
    t0 = time.monotonic()
    async with target.open() as client:
        start_bytes = client.bytes_received
        progress = Progress(
            TextColumn("[bold]sync[/]"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:,.0f}/{task.fields[total_text]} records"),
            TextColumn("{task.fields[mb]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=not show,
            transient=True,
        )
        records = 0
        end: SnapshotEnd | None = None
        begin: SnapshotBegin | None = None
        loop = asyncio.get_running_loop()
        with progress:
            async with _answer_within(target) as quiet:
                task = progress.add_task("sync", total=None, total_text="?", mb="", rate="")
                buf: list[bytes] = []
                async for frame in client.sync_raw(collections=collections):
                    if isinstance(frame, bytes):  # a record line, copied as it came
                        buf.append(frame)
                        records += 1
                        if len(buf) >= 1024:
                            quiet.reschedule(loop.time() + ANSWER_TIMEOUT)  # it makes progress
                            with output.writing(label):
                                sink.write(b"\n".join(buf) + b"\n")
                            buf = []
                            got = client.bytes_received - start_bytes
                            elapsed = max(time.monotonic() - t0, 1e-6)
                            progress.update(
                                task,
                                completed=records,
                                mb=_mb(got),
                                rate=f"{got / elapsed / 1e6:,.0f} MB/s",
                            )
                    elif isinstance(frame, SnapshotBegin):
                        quiet.reschedule(loop.time() + ANSWER_TIMEOUT)
                        begin = frame
                        total = frame.count
                        progress.update(
                            task, total=total, total_text=f"{total:,}" if total is not None else "?"
                        )
                    elif isinstance(frame, SnapshotEnd):
                        end = frame
                    elif isinstance(frame, Bye):  # §8: it shuts down (the stream ends)
                        with output.writing(label):
                            sink.write(b"".join(line + b"\n" for line in buf))
                        raise StatecastError(
                            f"{target.url} said bye ({frame.reason}) before the end of the "
                            f"snapshot: it is incomplete ({records:,} records written)"
                        )
                if buf:
                    with output.writing(label):
                        sink.write(b"\n".join(buf) + b"\n")
        with output.writing(label):
            sink.flush()
        got = client.bytes_received - start_bytes
    elapsed = time.monotonic() - t0
    if begin is None or end is None:  # a server that does not speak §3.1
        raise StatecastError(f"{target.url} sent a snapshot_end without a snapshot_begin")
    rate = got / max(elapsed, 1e-6) / 1e6
    err.print(
        f"synced [bold]{records:,}[/] records ({_mb(got)}) at seq {end.seq} "
        f"(epoch {escape(begin.epoch)}) in {elapsed:.2f}s, {rate:,.0f} MB/s -> {escape(label)}",
        highlight=False,
    )
    return 0


# -- watch --------------------------------------------------------------------------
_STATUS_STYLE = {
    "connecting": "yellow",
    "syncing": "yellow",
    "live": "green",
    "reconnecting": "red",
    "stopped": "dim",
}


class _Shown:
    """Shows each change on standard output (NDJSON, or one coloured line on a
    terminal); the first write that fails sets :attr:`done`, keeping its error."""

    def __init__(self, as_json: bool) -> None:
        self.out = Console(highlight=False, soft_wrap=False)
        self.as_json = as_json or not self.out.is_terminal
        self.done = asyncio.Event()
        self.error: StatecastError | None = None

    def __call__(self, change: ChangeFrame) -> None:
        if self.done.is_set():
            return
        try:
            with output.writing():
                self._show(change)
        except StatecastError as exc:  # never out of a callback: the replica logs those
            self.error = exc
            self.done.set()

    def _show(self, change: ChangeFrame) -> None:
        if self.as_json:
            sys.stdout.buffer.write(encode(change))  # §4.2, as the server sent it
            sys.stdout.buffer.flush()
            return
        out = self.out
        stamp = time.strftime("%H:%M:%S")
        head = f"[dim]{stamp}[/] [dim]#{change.seq}[/] [cyan]{escape(change.collection)}[/] "
        head += f"[bold]{escape(change.key)}[/] "
        if change.deleted:
            out.print(head + "[red]deleted[/]")
            return
        body = _encode(change.value).decode()
        room = max(20, out.width - len(change.collection) - len(change.key) - 24)
        if len(body) > room:
            body = body[: room - 1] + "…"
        out.print(head + escape(body))


class _FirstSync:
    """The first sync must make progress (a part of the snapshot) at least every
    ANSWER_TIMEOUT, through any reconnection; once live, there is no deadline."""

    def __init__(self) -> None:
        self.deadline: asyncio.Timeout | None = None
        self.why = ""  # why the replica last had to reconnect

    def on_progress(self, progress: SyncProgress) -> None:
        if self.deadline is not None:
            self.deadline.reschedule(asyncio.get_running_loop().time() + ANSWER_TIMEOUT)

    def on_status(self, status: Status, detail: str) -> None:
        if status == "reconnecting":
            self.why = detail.rsplit("; reconnecting in", 1)[0]

    async def wait(self, replica: Replica, target: Target) -> None:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT) as self.deadline:
                await replica.wait_synced()
        except TimeoutError:
            if self.why:
                raise StatecastError(
                    f"cannot sync with {replica.url} within {ANSWER_TIMEOUT:g} s: {self.why}"
                ) from None
            raise _silent(target) from None
        finally:
            self.deadline = None


async def watch(target: Target, collections: list[str] | None, as_json: bool) -> int:
    """Sync, then show every change; reconnect and resume by itself, saying so."""
    err = Console(stderr=True, highlight=False)
    shown = _Shown(as_json)
    first = _FirstSync()

    def on_status(status: Status, detail: str) -> None:
        first.on_status(status, detail)
        if shown.done.is_set():
            return  # the output failed: that is the one line to say
        style = _STATUS_STYLE.get(status, "")
        err.print(f"[{style}]● {status}[/] {escape(detail)}")

    def on_resync(event: Resynced) -> None:
        err.print(f"[yellow]● resynced[/] at seq {event.seq} (epoch {escape(event.epoch)})")

    replica = target.replica(
        collections=collections,
        on_change=shown,
        on_status=on_status,
        on_progress=first.on_progress,
        on_resync=on_resync,
    )
    # Fail fast (exit 1) if the server cannot be reached at all at first, does not
    # answer, or refuses us (a ping needs a valid token on a server with auth); later
    # failures are the replica's to ride out, and its status lines say what happens.
    async with target.open() as probe, _answer_within(target):
        await probe.ping()
    client_log = logging.getLogger("statecast.client")
    level = client_log.level
    client_log.setLevel(logging.ERROR)  # said by on_status
    try:
        async with replica:
            await first.wait(replica, target)
            if not shown.as_json:
                counts = ", ".join(
                    f"{escape(name)} {len(replica[name]):,}" for name in replica.collection_names()
                )
                err.print(f"[green]● live[/] at seq {replica.seq}: {counts or 'no records'}")
            await shown.done.wait()  # until Ctrl-C, or until the output fails
    finally:
        client_log.setLevel(level)
    assert shown.error is not None
    raise shown.error


# -- publish ------------------------------------------------------------------------
EXIT_CONFLICT = 3  # an if_seq did not hold (§3.3): nothing was applied


def _publisher(target: Target) -> Client:
    """A client of every node of ``--url``: a publish that loses its connection
    before the ack is sent again, with the same idempotency key, to the next node
    that answers (docs/client.md)."""
    return Client(
        target.url,
        ca_file=target.ca_file,
        token=target.token,
        connect_timeout=CONNECT_TIMEOUT,
        retry_timeout=ANSWER_TIMEOUT,
    )


def _conflict(exc: Conflict, where: str = "") -> int:
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    # The server's message names the change, the record's seq, and says that nothing
    # of the batch was applied (§3.3.2).
    err.print(f"[red]statecast:[/] conflict: {where}{escape(exc.message)}")
    return EXIT_CONFLICT


async def publish_one(target: Target, change: Change, idempotency_key: str | None = None) -> int:
    """Publish one change; ``idempotency_key`` (default: a new one) makes running the
    command again with the same key apply it at most once within the server's
    dedupe window."""
    async with _publisher(target) as client:
        try:
            ack = await client.publish_ack([change], idempotency_key=idempotency_key or new_key)
        except Conflict as exc:
            return _conflict(exc)
    output.line(str(ack.seq))
    if ack.duplicate:
        Console(stderr=True, soft_wrap=True, highlight=False).print(
            f"duplicate: already applied at seq {ack.seq} under idempotency key "
            f"{escape(repr(idempotency_key))}; nothing was applied again"
        )
    return 0


async def publish_many(
    target: Target,
    lines: IO[bytes],
    batch: int,
    window: int = 8,
    idempotency_key: str | None = None,
) -> int:
    """Publish NDJSON changes from ``lines`` in batches, ``window`` in flight. With
    ``idempotency_key``, batch N (from 1) has the key ``KEY:N``, so that running the
    same input again with the same key applies each batch at most once."""
    err = Console(stderr=True, highlight=False)
    total = 0
    last = 0
    batches = 0
    duplicates = 0
    async with _publisher(target) as client:
        inflight: list[tuple[int, asyncio.Task[Ack]]] = []
        failed = 0  # the batch that failed

        def send(changes: list[dict[str, Any]]) -> None:
            nonlocal batches
            batches += 1
            key = new_key() if idempotency_key is None else f"{idempotency_key}:{batches}"
            task = asyncio.ensure_future(client.publish_ack(changes, idempotency_key=key))
            inflight.append((batches, task))

        async def settle(keep: int) -> None:
            nonlocal last, duplicates, failed
            while len(inflight) > keep:
                failed, task = inflight.pop(0)
                ack = await task
                last = max(last, ack.seq)
                duplicates += ack.duplicate

        try:
            total = await _read_batches(lines, batch, send, settle, window)
            await settle(0)
        except Conflict as exc:
            return _conflict(exc, f"batch {failed}: ")
        finally:
            for _, task in inflight:  # after an error: the rest is not waited for
                task.cancel()
            await asyncio.gather(*(task for _, task in inflight), return_exceptions=True)
    output.line(str(last))
    dup = f" ({duplicates} of {batches} batches were duplicates)" if duplicates else ""
    err.print(f"published {total:,} changes, last seq {last}{dup}")
    return 0


def _read(lines: IO[bytes]) -> Iterator[bytes]:
    """The lines of standard input; a failure to read it is one line."""
    try:
        yield from lines
    except OSError as exc:  # closed (EBADF), EIO, ...
        raise StatecastError(f"cannot read standard input: {exc.strerror or exc}") from None


async def _read_batches(
    lines: IO[bytes],
    batch: int,
    send: Callable[[list[dict[str, Any]]], None],
    settle: Callable[[int], Awaitable[None]],
    window: int,
) -> int:
    """Read NDJSON changes and ``send`` them in batches, waiting for all but
    ``window`` of them after each; returns how many changes."""
    decoder = msgspec.json.Decoder(dict[str, Any])
    total = 0
    changes: list[dict[str, Any]] = []
    for n, raw in enumerate(_read(lines), 1):
        if not raw.strip():
            continue
        try:
            changes.append(jsoninput.decode(raw, decoder, "a JSON object"))
        except jsoninput.BadJSON as exc:
            raise StatecastError(f"line {n}: {exc}") from None
        if len(changes) >= batch:
            send(changes)
            total += len(changes)
            changes = []
            await settle(window)
    if changes:
        send(changes)
        total += len(changes)
    return total


# -- stats --------------------------------------------------------------------------
async def stats(target: Target, interval: float, as_json: bool) -> int:
    """The server's counters, and rates measured over ``interval`` seconds."""
    async with target.open() as client:
        async with _answer_within(target):
            first = await client.stats()
        t0 = time.monotonic()
        await asyncio.sleep(interval)
        async with _answer_within(target):
            second = await client.stats()
        dt = time.monotonic() - t0
    rates = {
        "changes_per_second": (second.changes_published - first.changes_published) / dt,
        "deliveries_per_second": (second.deliveries - first.deliveries) / dt,
    }
    data = {k: v for k, v in msgspec.structs.asdict(second).items() if k != "id"} | rates
    if as_json or not sys.stdout.isatty():
        output.line(_encode(data).decode())
        return 0
    title = f"statecast at {escape(target.url)}"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows: list[tuple[str, object]] = []
    for key, value in data.items():
        if isinstance(value, dict):  # the source's status: one row per field
            rows += [(f"{key} {k}", v) for k, v in value.items()]
        elif value is not None:
            rows.append((key, value))
    for key, value in rows:
        shown = (
            f"{value:,.1f}"
            if isinstance(value, float)
            else (f"{value:,}" if isinstance(value, int) else str(value))
        )
        table.add_row(escape(key.replace("_", " ")), escape(shown))
    with output.writing():
        Console().print(table)
    return 0
