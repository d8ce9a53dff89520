"""When the fan-out's next step runs: as soon as possible, but never more than half the time.

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
    """Decides when the fan-out runs its next step (fanout.py: a step seals what was
    queued and writes to at most ``STEP_WRITES`` subscribers).

    As soon as possible when the server is idle, but never sooner after the last step
    than that step took: under a heavy fan-out, changes then gather into fewer, larger
    writes instead of the writes taking all the loop's time, so ingest and reads keep
    at least half of it (§7).

    The cost of a step is set by the number of writes, not of changes, and the gaps
    decide how long a change waits: with the gaps as long as the steps, a change
    waits for up to two steps' time per step of a round over the subscribers. With
    ``follow_demand`` the gap is only as long as other work has shown a use for:
    twice the CPU time the loop spent outside the fan-out since the last step (a
    growing demand gets its half within a few steps), plus the time the step lost
    to other processes (on a machine short of CPU, fewer writes), and never longer
    than the step took. A loop with little else to do then runs the next step right
    after a step: lower latency, at the price of more, smaller writes when the
    publishers wait for their acks (docs/performance.md, "Latency").
    """

    def __init__(
        self,
        loop: Timer,
        *,
        follow_demand: bool = False,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._loop = loop
        self._next = 0.0  # loop time before which no step starts
        self._demand = follow_demand
        self._cpu = cpu_clock
        self._cpu_end = cpu_clock() if follow_demand else 0.0  # at the last step's end

    def schedule(self, step: Callable[[], None]) -> None:
        delay = self._next - self._loop.time()
        if delay > 0:
            self._loop.call_later(delay, self._run, step)
        else:
            self._loop.call_soon(self._run, step)

    def _run(self, step: Callable[[], None]) -> None:
        loop = self._loop
        if not self._demand:
            t0 = loop.time()
            step()
            t1 = loop.time()
            self._next = t1 + (t1 - t0)
            return
        cpu = self._cpu
        t0, c0 = loop.time(), cpu()
        other = c0 - self._cpu_end  # what the loop did besides the fan-out, since the last
        step()
        t1, c1 = loop.time(), cpu()
        took = t1 - t0
        lost = max(0.0, took - (c1 - c0))  # the step waited this long for a CPU
        self._cpu_end = c1
        self._next = t1 + min(took, 2 * other + lost)
