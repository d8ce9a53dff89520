"""When the fan-out flushes: as soon as possible, but never more than half the time.

No I/O: the pacer is handed a clock and a scheduler (an asyncio loop has both), so
tests drive it with a fake one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["FlushPacer", "Timer"]


class Timer(Protocol):
    """What the pacer needs of an event loop."""

    def time(self) -> float: ...
    def call_soon(self, callback: Callable[..., object], *args: Any) -> object: ...
    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> object: ...


class FlushPacer:
    """Decides when the fan-out flushes queued changes.

    As soon as possible when the server is idle, but never sooner after the last
    flush than that flush took (nor than ``min_interval``): under a heavy fan-out,
    changes then gather into fewer, larger writes instead of the flushes taking all
    the loop's time, so ingest and reads keep at least half of it (§7).
    """

    def __init__(self, loop: Timer, min_interval: float) -> None:
        self._loop = loop
        self._min = min_interval
        self._next = 0.0  # loop time before which no flush starts

    def schedule(self, flush: Callable[[], None]) -> None:
        delay = self._next - self._loop.time()
        if delay > 0:
            self._loop.call_later(delay, self._run, flush)
        else:
            self._loop.call_soon(self._run, flush)

    def _run(self, flush: Callable[[], None]) -> None:
        t0 = self._loop.time()
        flush()
        t1 = self._loop.time()
        self._next = t1 + max(self._min, t1 - t0)
