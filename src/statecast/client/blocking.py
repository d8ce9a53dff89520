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

import queue
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

from statecast.client.connection import DEFAULT_URL, Client
from statecast.client.replica import Replica, Resynced, Status
from statecast.core.frames import ChangeFrame, Frame, Stats
from statecast.core.protocol import Change
from statecast.loops import LoopThread

__all__ = ["BlockingClient", "BlockingReplica"]


class BlockingClient:
    """:class:`statecast.Client`, with blocking methods."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | None = 30.0) -> None:
        self.timeout = timeout
        self._lt = LoopThread("statecast-client")
        self._client = Client(url)
        try:
            self.hello = self._lt.run(self._client.connect(), timeout)
        except BaseException:
            self._lt.close()
            raise

    def publish(self, changes: Iterable[Change | Mapping[str, Any]] | Change) -> int:
        return self._lt.run(self._client.publish(changes), self.timeout)

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
    replica's own loop, or read a value that is replaced whole.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
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

        self._replica = self._lt.run(make())

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
    def replica(self) -> Replica:
        """The asyncio replica (use it only on its loop)."""
        return self._replica

    def wait_synced(self, timeout: float | None = None) -> None:
        self._lt.run(self._replica.wait_synced(), timeout)

    def get(self, collection: str, key: str, default: Any = None) -> Any:
        async def read() -> Any:
            return self._replica.get(collection, key, default)

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
