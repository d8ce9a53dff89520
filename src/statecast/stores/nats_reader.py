"""Reading one subject of a JetStream stream, in order, with nothing missed.

:class:`StreamReader` is an *ordered consumer*, like the NATS clients' own: an
ephemeral push consumer (no acks, flow control, idle heartbeats, in memory on the
server) that is simply created again, from the position after the last message
handled, whenever anything looks wrong:

* a message whose consumer sequence is not the next one (a message was lost or the
  server restarted), or a heartbeat that names a later consumer sequence than the last
  one received;
* no message and no heartbeat for three heartbeat intervals (the consumer is gone: a
  server restart, a lost connection);
* the owner asks (after a reconnect).

It runs on one event loop and hands each message to ``on_message`` on it, in stream
order. Where to start is asked of the owner (``position``) each time, so the owner
may skip ahead itself (a node installs its own batch as soon as JetStream acks it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["ReaderError", "StopReading", "StreamReader", "api_request"]

log = logging.getLogger("statecast.stores.nats")

_PENDING_BYTES: Final = 512 * 1024 * 1024  # the client's buffer; flow control keeps it low
_PENDING_MSGS: Final = 1 << 20


class ReaderError(Exception):
    """A JetStream API request failed; ``code``/``err_code`` as JetStream says."""

    def __init__(self, description: str, code: int = 0, err_code: int = 0) -> None:
        super().__init__(description)
        self.description = description
        self.code = code
        self.err_code = err_code


class StopReading(Exception):
    """Raised by ``before_create`` to stop the reader for good (the owner knows why)."""


async def api_request(nc: NATS, subject: str, body: Any = None, seconds: float = 5.0) -> Any:
    """A JetStream API request; the decoded answer, or :class:`ReaderError`."""
    payload = b"" if body is None else msgspec.json.encode(body)
    msg = await nc.request(subject, payload, timeout=seconds)
    data = msgspec.json.decode(msg.data)
    if isinstance(data, dict) and "error" in data:
        err = data["error"]
        raise ReaderError(
            str(err.get("description", "unknown error")),
            int(err.get("code", 0)),
            int(err.get("err_code", 0)),
        )
    return data


def _seqs(reply: str) -> tuple[int, int, int]:
    """Stream sequence, consumer sequence and pending count from a ``$JS.ACK`` subject."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(t[5]), int(t[6]), int(t[8])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...
    return int(t[7]), int(t[8]), int(t[10])


class StreamReader:
    def __init__(
        self,
        nc: NATS,
        stream: str,
        subject: str,
        *,
        position: Callable[[], int],
        on_message: Callable[[int, Msg], None],
        before_create: Callable[[], Awaitable[None]] | None = None,
        on_trouble: Callable[[str | None], None] | None = None,
        heartbeat: float = 1.0,
        request_timeout: float = 5.0,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.subject = subject
        self._position = position
        self._on_message = on_message
        self._before_create = before_create
        self._on_trouble = on_trouble
        self.heartbeat = heartbeat
        self.request_timeout = request_timeout
        self.caught_up = False  # reached the end of the subject since the last (re)creation
        self.consumers_created = 0
        self.resets = 0
        self._gen = 0
        self._inbox = ""
        self._cseq = 0
        self._consumer: str | None = None
        self._sub: Subscription | None = None
        self._active = True
        self._stopped = False
        self._reset_wanted = asyncio.Event()
        self._progress = asyncio.Event()  # set at every message or caught-up change
        self._tasks: list[asyncio.Task[None]] = []
        self._cleanup: set[asyncio.Task[None]] = set()

    # -- control ---------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reset_wanted.set()
        self._tasks = [
            loop.create_task(self._maintain(), name=f"statecast-nats-reader-{self.subject}"),
            loop.create_task(self._watch(), name=f"statecast-nats-watchdog-{self.subject}"),
        ]

    def reset(self, why: str) -> None:
        """Create the consumer again, from the owner's position (soon, not now)."""
        if self._stopped:
            return
        log.debug("reader of %s: new consumer (%s)", self.subject, why)
        self.resets += 1
        self._gen += 1  # messages of the old consumer are ignored from now on
        self.caught_up = False
        self._reset_wanted.set()

    async def stop(self) -> None:
        self._stopped = True
        self._gen += 1
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._drop_consumer()
        for task in list(self._cleanup):
            with contextlib.suppress(Exception):
                await task

    async def wait_progress(self, seconds: float) -> bool:
        """Wait until a message is handled or the reader catches up (False: timed out)."""
        self._progress.clear()
        try:
            await asyncio.wait_for(self._progress.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # -- the consumer ------------------------------------------------------------
    async def _maintain(self) -> None:
        while not self._stopped:
            await self._reset_wanted.wait()
            self._reset_wanted.clear()
            delay = 0.05
            while not self._stopped:
                try:
                    if self._before_create is not None:
                        await self._before_create()
                    await self._create()
                except StopReading:
                    self._stopped = True
                    await self._drop_consumer()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    reason = _describe(exc)
                    log.debug("reader of %s: cannot create a consumer: %s", self.subject, reason)
                    if self._on_trouble is not None:
                        self._on_trouble(reason)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if self._on_trouble is not None:
                    self._on_trouble(None)
                break

    async def _create(self) -> None:
        await self._drop_consumer()
        self._gen += 1
        gen = self._gen
        self._cseq = 0
        self.caught_up = False
        self._active = True
        inbox = self._inbox = self.nc.new_inbox()

        async def deliver(msg: Msg) -> None:
            if gen == self._gen:
                await self._deliver(msg)

        self._sub = await self.nc.subscribe(
            inbox,
            cb=deliver,
            pending_msgs_limit=_PENDING_MSGS,
            pending_bytes_limit=_PENDING_BYTES,
        )
        hb = int(self.heartbeat * 1e9)
        config = {
            "deliver_subject": inbox,
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": self._position() + 1,
            "filter_subject": self.subject,
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": hb,
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": max(5 * hb, 5_000_000_000),
        }
        info = await api_request(
            self.nc,
            f"$JS.API.CONSUMER.CREATE.{self.stream}",
            {"stream_name": self.stream, "config": config},
            self.request_timeout,
        )
        if gen != self._gen:  # reset meanwhile: this one is stale already
            self._reset_wanted.set()
            return
        self._consumer = str(info["name"])
        self.consumers_created += 1
        if int(info.get("num_pending", 0)) == 0 and self._cseq == 0:
            self._caught_up()

    async def _drop_consumer(self) -> None:
        sub, self._sub = self._sub, None
        name, self._consumer = self._consumer, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if name is not None and self.nc.is_connected:
            # Best effort, in the background (it expires by itself anyway).
            task = asyncio.get_running_loop().create_task(self._delete(name))
            self._cleanup.add(task)
            task.add_done_callback(self._cleanup.discard)

    async def _delete(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await api_request(self.nc, f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}", None, 2.0)

    async def _deliver(self, msg: Msg) -> None:
        self._active = True
        if msg.subject == self._inbox:  # a status message: flow control or heartbeat
            hdr = msg.headers or {}
            if msg.reply:
                # Flow control: every message before it has been handled (same task).
                await self.nc.publish(msg.reply)
                return
            stalled = hdr.get("Nats-Consumer-Stalled")
            if stalled:
                await self.nc.publish(stalled)
            last = hdr.get("Nats-Last-Consumer")
            if last is not None and int(last) != self._cseq:
                self.reset(f"heartbeat says consumer seq {last}, we have {self._cseq}")
            return
        try:
            sseq, cseq, pending = _seqs(msg.reply)
        except (ValueError, IndexError):
            log.warning("reader of %s: unexpected reply subject %r", self.subject, msg.reply)
            return
        if cseq != self._cseq + 1:
            self.reset(f"consumer seq {cseq} after {self._cseq}")
            return
        self._cseq = cseq
        self._on_message(sseq, msg)
        self._progress.set()
        if pending == 0 and not self.caught_up:
            self._caught_up()

    def _caught_up(self) -> None:
        self.caught_up = True
        self._progress.set()

    async def _watch(self) -> None:
        """A consumer that sends nothing for three heartbeats is gone: create another."""
        missed = 0
        while not self._stopped:
            await asyncio.sleep(self.heartbeat)
            if self._consumer is None:
                missed = 0
                continue
            if self._active:
                missed = 0
            else:
                missed += 1
                if missed >= 3:
                    missed = 0
                    self.reset("no heartbeat")
            self._active = False


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("nats: ")
