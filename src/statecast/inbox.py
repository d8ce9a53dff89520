"""Hand-off of publishes from any thread to the event loop thread.

Producer threads never touch the loop's objects: they append to a locked list and,
only when it was empty, wake the loop once with ``call_soon_threadsafe``. A burst of
publishes from several threads is then applied in one loop callback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from statecast.errors import ShuttingDown

__all__ = ["PublishInbox"]

T = TypeVar("T")  # what is published: a Prepared batch, or a source's batch


class PublishInbox(Generic[T]):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: Callable[[list[tuple[T, concurrent.futures.Future[int]]]], None],
    ) -> None:
        self._loop = loop
        self._handle = handle
        self._lock = threading.Lock()
        self._items: list[tuple[T, concurrent.futures.Future[int]]] = []
        self._scheduled = False
        self._closed = False

    def put(self, batch: T) -> concurrent.futures.Future[int]:
        """Queue a validated batch from any thread; the future gets its last seq."""
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._items.append((batch, fut))
            wake = not self._scheduled
            self._scheduled = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed
                with self._lock:
                    self._closed = True
                self._drain()
        return fut

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
            closed = self._closed
        if not items:
            return
        if closed and self._loop.is_closed():
            for _, fut in items:
                fut.set_exception(ShuttingDown("the server has stopped"))
            return
        self._handle(items)

    def close(self) -> None:
        """Refuse new publishes, and apply those already queued (on the loop thread)."""
        with self._lock:
            self._closed = True
        self._drain()
