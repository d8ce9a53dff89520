from __future__ import annotations

import pytest

from statecast.core.changelog import ChangeLog
from statecast.core.protocol import Change, prepare_changes
from statecast.core.state import Record, State


def records(n: int, state: State | None = None) -> list[Record]:
    state = State() if state is None else state
    return state.apply(prepare_changes([Change("c", f"k{i}", i) for i in range(n)]))


def test_read_in_order_and_limits() -> None:
    log = ChangeLog(retain=100)
    log.extend(records(10))
    assert (log.first_seq, log.last_seq, len(log)) == (1, 10, 10)
    assert [r.seq for r in log.read(0, 100)] == list(range(1, 11))
    assert [r.seq for r in log.read(4, 3)] == [5, 6, 7]
    assert log.read(10, 5) == []


def test_ring_wraps_and_forgets_the_oldest() -> None:
    state = State()
    log = ChangeLog(retain=7)
    for _ in range(5):
        log.extend(records(4, state))
    assert (log.first_seq, log.last_seq, len(log)) == (14, 20, 7)
    assert [r.seq for r in log.read(13, 100)] == list(range(14, 21))
    assert [r.seq for r in log.read(15, 3)] == [16, 17, 18]
    assert log.covers(13)
    assert not log.covers(12)
    with pytest.raises(LookupError):
        log.read(12, 1)


def test_future_positions_are_not_covered() -> None:
    log = ChangeLog(retain=5)
    log.extend(records(3))
    assert not log.covers(4)


def test_zero_retention_covers_only_now() -> None:
    state = State()
    log = ChangeLog(retain=0)
    log.extend(records(3, state))
    assert log.covers(3)
    assert not log.covers(2)
    assert log.read(3, 10) == []


def test_gap_is_refused() -> None:
    log = ChangeLog(retain=5, last_seq=10)
    with pytest.raises(ValueError, match="gap"):
        log.extend(records(1))
