"""Blocking wrappers of the client and the replica, for scripts and threads.

Each runs the asyncio object on an event loop of its own, in a background thread, and
exposes the same operations as plain methods::

    with statecast.BlockingClient("tcp://127.0.0.1:8989") as client:
        seq = client.publish([statecast.Change("orders", "O-1", {"qty": 100})])

    with statecast.BlockingReplica(collections=["orders"]) as replica:
        replica.wait_synced(timeout=10)
        for event in replica.changes(timeout=1.0):
            ...
"""

from __future__ import annotations

import os
import queue
import ssl as _ssl
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from statecast.client.connection import DEFAULT_URL, Client, TokenProvider, new_key
from statecast.client.replica import Replica, Resynced, Status
from statecast.core.frames import Ack, Authed, ChangeFrame, Frame, Stats
from statecast.core.protocol import Change
from statecast.loops import LoopThread

__all__ = ["BlockingClient", "BlockingReplica"]


class BlockingClient:
    """:class:`statecast.Client`, with blocking methods.

    ``ca_file``, ``ssl``, ``token``, ``token_provider`` and the other keyword arguments
    (``retry_timeout``, ...) are :class:`statecast.Client`'s. A token provider
    refreshes the token in the background, on the client's own loop, between calls
    too. ``timeout`` bounds each call, except a publish with an idempotency key, which
    ``retry_timeout`` bounds (it retries across reconnections meanwhile).
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout: float | None = 30.0,
        ca_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        **options: Any,
    ) -> None:
        self.timeout = timeout
        # Built here, in the caller's thread: a bad URL or CA file raises ConfigError
        # before any thread is started.
        client = Client(
            url, ca_file=ca_file, ssl=ssl, token=token, token_provider=token_provider, **options
        )
        self._lt = LoopThread("statecast-client")
        self._client = client
        try:
            self.hello = self._lt.run(self._client.connect(), timeout)
        except BaseException:
            self._lt.close()
            raise

    @property
    def authed(self) -> Authed | None:
        """What the token grants (§3.8), ``None`` without a token."""
        return self._client.authed

    def authenticate(self, token: str) -> Authed:
        """Send a fresh token on this connection (:meth:`statecast.Client.authenticate`)."""
        return self._lt.run(self._client.authenticate(token), self.timeout)

    def publish(
        self,
        changes: Iterable[Change | Mapping[str, Any]] | Change,
        *,
        idempotency_key: str | Callable[[], str] | None = new_key,
    ) -> int:
        """:meth:`statecast.Client.publish`: the seq of the batch's last change."""
        return self.publish_ack(changes, idempotency_key=idempotency_key).seq

    def publish_ack(
        self,
        changes: Iterable[Change | Mapping[str, Any]] | Change,
        *,
        idempotency_key: str | Callable[[], str] | None = new_key,
    ) -> Ack:
        """:meth:`statecast.Client.publish_ack`: the ack (``seq``, ``duplicate``)."""
        bounded = idempotency_key is not None and self._client.retry_timeout is not None
        return self._lt.run(
            self._client.publish_ack(changes, idempotency_key=idempotency_key),
            None if bounded else self.timeout,
        )

    def ping(self) -> int:
        return self._lt.run(self._client.ping(), self.timeout)

    def stats(self) -> Stats:
        return self._lt.run(self._client.stats(), self.timeout)

    def sync(self, collections: Iterable[str] | None = None) -> list[Frame]:
        """The whole snapshot: SnapshotBegin, the Records, SnapshotEnd."""

        async def collect() -> list[Frame]:
            return [f async for f in self._client.sync(collections=collections)]

        return self._lt.run(collect(), self.timeout)

    def close(self) -> None:
        try:
            self._lt.run(self._client.close(), self.timeout)
        finally:
            self._lt.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BlockingReplica:
    """:class:`statecast.Replica`, kept in sync by a background thread.

    Reads (``get``, ``snapshot``, ``seq``) are safe from any thread: they run on the
    replica's own loop, or read a value that is replaced whole. Keyword arguments
    (``where``, ``ca_file``, ``ssl``, ``token``, ``token_provider``, backoff, ...) are
    :class:`statecast.Replica`'s; a plain-function ``token_provider`` runs in a
    worker thread, an async one on the replica's loop.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        collections: Iterable[str] | None = None,
        on_progress: Any = None,
        on_status: Any = None,
        **options: Any,
    ) -> None:
        self._events: queue.SimpleQueue[ChangeFrame | Resynced] = queue.SimpleQueue()
        self._lt = LoopThread("statecast-replica")

        async def make() -> Replica:
            r = Replica(
                url,
                collections=collections,
                on_change=self._events.put,
                on_resync=self._events.put,
                on_progress=on_progress,
                on_status=on_status,
                **options,
            )
            await r.start()
            return r

        try:
            self._replica = self._lt.run(make())
        except BaseException:  # a bad URL, CA file or token setting: no thread left behind
            self._lt.close()
            raise

    @property
    def seq(self) -> int:
        return self._replica.seq

    @property
    def epoch(self) -> str | None:
        return self._replica.epoch

    @property
    def status(self) -> Status:
        return self._replica.status

    @property
    def authed(self) -> Authed | None:
        return self._replica.authed

    @property
    def replica(self) -> Replica:
        """The asyncio replica (use it only on its loop)."""
        return self._replica

    def wait_synced(self, timeout: float | None = None) -> None:
        self._lt.run(self._replica.wait_synced(), timeout)

    def get(self, collection: str, key: str, default: Any = None) -> Any:
        async def read() -> Any:
            return self._replica.get(collection, key, default)

        return self._lt.run(read())

    def seq_of(self, collection: str, key: str) -> int:
        """:meth:`statecast.Replica.seq_of`: the seq that last wrote the record (0:
        not held), for ``if_seq``."""

        async def read() -> int:
            return self._replica.seq_of(collection, key)

        return self._lt.run(read())

    def get_with_seq(self, collection: str, key: str, default: Any = None) -> tuple[Any, int]:
        """:meth:`statecast.Replica.get_with_seq`: ``(value, seq)``, read together."""

        async def read() -> tuple[Any, int]:
            return self._replica.get_with_seq(collection, key, default)

        return self._lt.run(read())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A consistent copy of the whole contents: taken on the replica's own loop,
        between two applied changes, so never half of a batch."""

        async def copy() -> dict[str, dict[str, Any]]:
            return self._replica.snapshot()

        return self._lt.run(copy())

    def changes(self, timeout: float | None = None) -> Iterator[ChangeFrame | Resynced]:
        """Applied changes as they come; stops after ``timeout`` seconds without one."""
        while True:
            try:
                yield self._events.get(timeout=timeout)
            except queue.Empty:
                return

    def close(self) -> None:
        try:
            self._lt.run(self._replica.stop())
        finally:
            self._lt.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
