"""FlushPacer: when the fan-out runs its next step, checked against a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from statecast.core.pacing import FlushPacer


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self.calls: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.calls.append((0.0, fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.calls.append((delay, fn, args))

    def run_next(self) -> float:
        delay, fn, args = self.calls.pop(0)
        self.now += delay
        fn(*args)
        return delay


def test_idle_server_flushes_at_once_and_busy_one_waits_as_long_as_a_flush_took() -> None:
    loop = FakeLoop()
    pacer = FlushPacer(loop)
    flushed: list[float] = []

    def slow_flush() -> None:
        flushed.append(loop.now)
        loop.now += 0.004  # this flush wrote to many sockets

    pacer.schedule(slow_flush)
    assert loop.run_next() == 0.0
    pacer.schedule(slow_flush)
    assert loop.calls[0][0] == pytest.approx(0.004)  # waits as long as the last flush took
    loop.run_next()
    loop.now += 1.0  # idle for a while
    pacer.schedule(lambda: flushed.append(loop.now))
    assert loop.run_next() == 0.0
    assert len(flushed) == 3


class FakeCpu:
    """The loop thread's CPU time: advanced by hand, as work is done."""

    def __init__(self) -> None:
        self.now = 5.0

    def __call__(self) -> float:
        return self.now


def demand_pacer() -> tuple[FakeLoop, FakeCpu, FlushPacer]:
    """A pacer following demand, on a fake loop and a fake CPU clock."""
    loop, cpu = FakeLoop(), FakeCpu()
    return loop, cpu, FlushPacer(loop, follow_demand=True, cpu_clock=cpu)


def busy(loop: FakeLoop, cpu: FakeCpu, seconds: float) -> None:
    """The loop works (not the fan-out) for ``seconds``."""
    loop.now += seconds
    cpu.now += seconds


def test_following_demand_a_loop_with_little_else_to_do_flushes_again_soon() -> None:
    loop, cpu, pacer = demand_pacer()
    flush_cost = 0.010  # a thousand subscribers

    def flush() -> None:
        busy(loop, cpu, flush_cost)

    for _ in range(2):
        busy(loop, cpu, 0.0002)  # one small publish handled
        pacer.schedule(flush)
        loop.calls[0] = (0.0, *loop.calls[0][1:])
        loop.run_next()
    pacer.schedule(flush)
    # Not 0.010: twice what other work used in the last gap.
    assert loop.calls[0][0] == pytest.approx(0.0004)


def test_following_demand_busy_ingest_keeps_half_the_loop() -> None:
    loop, cpu, pacer = demand_pacer()

    def flush() -> None:
        busy(loop, cpu, 0.010)

    pacer.schedule(flush)
    loop.run_next()
    gaps = []
    for _ in range(8):
        pacer.schedule(flush)
        gap = loop.calls[0][0]
        gaps.append(gap)
        busy(loop, cpu, max(gap, 0.001))  # ingest fills whatever gap it is given
        loop.calls[0] = (0.0, *loop.calls[0][1:])
        loop.run_next()
    assert gaps[-1] == pytest.approx(0.010)  # as long as the flush: the fan-out gets half
    assert gaps == sorted(gaps)  # reached by doubling


def test_following_demand_a_flush_slowed_by_other_processes_backs_off() -> None:
    loop, cpu, pacer = demand_pacer()

    def flush() -> None:
        busy(loop, cpu, 0.002)
        loop.now += 0.006  # descheduled: wall time passes, this thread's CPU time does not

    pacer.schedule(flush)
    loop.run_next()
    pacer.schedule(flush)
    assert loop.calls[0][0] == pytest.approx(0.006)
