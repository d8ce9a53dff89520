"""Event loops: which one to use, and one running in a thread of its own.

The server (``Server.start_in_thread``), the blocking client wrappers and the CLI all
need the same two things, so they live here, once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from statecast.errors import Timeout

__all__ = ["LoopKind", "LoopThread", "new_event_loop"]

LoopKind = Literal["auto", "uvloop", "asyncio"]
T = TypeVar("T")


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop when available (``auto``) or asked for."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: PLC0415 (optional dependency)
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class LoopThread:
    """An event loop running in a daemon thread; coroutines are run on it with
    :meth:`run` (blocking) or :meth:`submit` (a concurrent future)."""

    def __init__(self, name: str, kind: str = "auto") -> None:
        self.loop = new_event_loop(kind)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it; past ``timeout`` it is cancelled
        and :class:`~statecast.errors.Timeout` is raised."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise Timeout(f"timed out after {timeout}s") from None

    def close(self, timeout: float | None = None) -> None:
        """Stop the loop, join the thread, and close the loop."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.run(_cancel_the_rest(), timeout)  # tasks left by what ran on the loop
            self.run(self.loop.shutdown_asyncgens(), timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_the_rest() -> None:
    """Cancel every task of the running loop but this one, and wait for them (a
    connection handler that outlived its server, say), so none is destroyed pending."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
