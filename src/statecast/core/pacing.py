"""When the fan-out flushes: as soon as possible, but never more than half the time.

No I/O: the pacer is handed a clock and a scheduler (an asyncio loop has both), and
a CPU clock for its thread, so tests drive it with fake ones.
"""

from __future__ import annotations

import time
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

    A flush writes once to every subscriber, so its cost is set by the number of
    subscribers, not of changes, and the gap after it decides how long the next
    change waits: with 1,000 subscribers a change waits for up to two flushes. With
    ``follow_demand`` the gap is only as long as other work has shown a use for:
    twice the CPU time the loop spent outside the fan-out since the last flush (a
    growing demand gets its half within a few flushes), plus the time the flush lost
    to other processes (on a machine short of CPU, fewer writes), and never longer
    than the flush took. A loop with little else to do then flushes again right
    after a flush: lower latency, at the price of more, smaller writes when the
    publishers wait for their acks (docs/performance.md, "Latency").
    """

    def __init__(
        self,
        loop: Timer,
        min_interval: float,
        *,
        follow_demand: bool = False,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._loop = loop
        self._min = min_interval
        self._next = 0.0  # loop time before which no flush starts
        self._demand = follow_demand
        self._cpu = cpu_clock
        self._cpu_end = cpu_clock() if follow_demand else 0.0  # at the last flush's end

    def schedule(self, flush: Callable[[], None]) -> None:
        delay = self._next - self._loop.time()
        if delay > 0:
            self._loop.call_later(delay, self._run, flush)
        else:
            self._loop.call_soon(self._run, flush)

    def _run(self, flush: Callable[[], None]) -> None:
        loop = self._loop
        if not self._demand:
            t0 = loop.time()
            flush()
            t1 = loop.time()
            self._next = t1 + max(self._min, t1 - t0)
            return
        cpu = self._cpu
        t0, c0 = loop.time(), cpu()
        other = c0 - self._cpu_end  # what the loop did besides flushing, since the last
        flush()
        t1, c1 = loop.time(), cpu()
        took = t1 - t0
        lost = max(0.0, took - (c1 - c0))  # the flush waited this long for a CPU
        self._cpu_end = c1
        self._next = t1 + max(self._min, min(took, 2 * other + lost))
