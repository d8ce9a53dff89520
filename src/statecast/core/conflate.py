"""Conflated subscriptions: the newest state of each key, at most once per interval.

A screen cannot take 10,000 quote changes a second; it wants the latest value of each
key a few times a second, never a stale one (docs/protocol.md §3.9). Subscribers that
chose the same view and interval share a :class:`ConflatedGroup`: between two
emissions it keeps, per key, only the newest change (so its memory is bounded by the
distinct keys waiting, not by the change rate), and at each emission it hands every
subscriber one blob: the keys' newest frames, in seq order.

Exactness: an emission happens between two fan-out flushes, and a flush never splits
a batch (§5.3), so after a subscriber applies a blob its copy equals the (filtered)
state at the last flushed seq: it never sees half a batch. A key changed and changed
back still arrives (seqs skip, values are the newest). A key that was in the view at
the last emission and is not any more arrives as a delete; a key that was not in view
then and is not now is not sent at all: a filtered subscriber learns nothing about it
(§3.7), and a key created and deleted within one interval never shows up.

A subscriber that joins a group whose interval has begun would get changes older than
what it already has, so it starts a group of its own; groups of one view and interval
emit on a common time grid and merge whenever both have just emitted. No I/O: the
fan-out passes a timer (``loop.call_later``) and a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from msgspec.json import encode as _encode_json

from statecast.core.frames import delete_line
from statecast.core.state import Record
from statecast.core.view import View

__all__ = ["ConflatedGroup", "Timer", "next_tick"]


class ConflatedGroup:
    __slots__ = ("base_seq", "interval", "pending", "scheduled", "subs", "view")

    def __init__(self, view: View, interval: float) -> None:
        self.view = view
        self.interval = interval
        self.subs: dict[Any, None] = {}  # fanout.Subscriber (fanout.py imports this)
        # (collection, key) -> [in view at the last emission, newest change, in view now]
        self.pending: dict[tuple[str, str], list[object]] = {}
        self.scheduled = False
        # With changes pending: the seq before the first of them. Its subscribers have
        # every change of the view up to it (a heartbeat's seq, §4.3).
        self.base_seq = 0

    def absorb(self, rec: Record, was_in: bool, now_in: bool) -> bool:
        """Note one change of a key in the view's collections; whether the group has
        something to emit now (so the caller schedules an emission)."""
        k = (rec.collection, rec.key)
        entry = self.pending.get(k)
        if entry is None:
            if not was_in and not now_in:
                return bool(self.pending)  # nothing it could learn about
            if not self.pending:
                self.base_seq = rec.seq - 1
            self.pending[k] = [was_in, rec, now_in]
        else:
            entry[1] = rec
            entry[2] = now_in
        return True

    def blob(self) -> tuple[bytes, int]:
        """The frames of the newest state of every key that changed, in seq order, and
        how many there are; empties the group."""
        entries = sorted(self.pending.values(), key=_seq_of)
        self.pending = {}
        lines: list[bytes] = []
        for base_in, rec, now_in in entries:
            assert isinstance(rec, Record)
            if now_in:
                lines.append(rec.change_line())
            elif base_in:  # it left the view (or was deleted): the client must drop it
                lines.append(
                    rec.line
                    if rec.deleted
                    else delete_line(rec.seq, rec.collection, _encode_json(rec.key))
                )
        return b"".join(lines), len(lines)


def _seq_of(entry: list[object]) -> int:
    rec = entry[1]
    assert isinstance(rec, Record)
    return rec.seq


def next_tick(now: float, interval: float) -> float:
    """Seconds until the next multiple of ``interval`` (a grid every group of one
    interval shares, so that groups emit together and can merge)."""
    delay = interval - (now % interval)
    return delay if delay > 1e-6 else interval


Timer = Callable[[float, Callable[[], None]], object]
