"""FlushPacer: when the fan-out flushes, checked against a fake clock."""

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
    pacer = FlushPacer(loop, 0.0)
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


def test_minimum_interval() -> None:
    loop = FakeLoop()
    pacer = FlushPacer(loop, 0.010)
    pacer.schedule(lambda: None)
    loop.run_next()
    pacer.schedule(lambda: None)
    assert loop.calls[0][0] == pytest.approx(0.010)
