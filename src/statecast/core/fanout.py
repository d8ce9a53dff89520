"""Fan-out: every change encoded once, then handed to subscribers in few writes.

Subscribers are grouped by what they select (docs/protocol.md §3.1, §3.2): all
collections, or a set of them. Changes applied since the last flush are joined into
one blob per group, and each subscriber of the group gets that one blob: one
``deliver`` (one socket write) per subscriber per flush, however many changes the
flush holds. A batch is never split across flushes, so its frames reach each
subscriber back to back (§5.3). No I/O: the transports implement :class:`Subscriber`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from statecast.core.state import Record

__all__ = ["Fanout", "Selection", "Subscriber"]

# What a subscription selects: None for every collection, else a set of names.
# Later filters (e.g. on record fields) extend this key; subscribers with equal
# selections share one group and one filtered blob.
Selection = frozenset[str] | None


class Subscriber(Hashable, Protocol):
    def deliver(self, blob: bytes) -> None:
        """Send ``blob`` (whole frames) or drop the subscription; must not raise."""


class Fanout:
    def __init__(self, schedule: Callable[[Callable[[], None]], object] | None = None) -> None:
        # ``schedule(fn)`` runs fn soon on the same thread (loop.call_soon); without
        # it, the owner calls flush() itself.
        self._schedule = schedule
        self._scheduled = False
        self._pending: list[Record] = []
        self._groups: dict[Selection, dict[Subscriber, None]] = {}
        self.flushed_seq = 0  # every change <= this has been handed to subscribers
        self.deliveries = 0  # change frames handed to subscribers, in total
        self.bytes_delivered = 0
        # Called after each flush with the seconds its oldest change waited since it
        # was published (metrics: publish-to-send latency).
        self.on_flush: Callable[[float], None] | None = None
        self._pending_since = 0.0

    @property
    def subscriber_count(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def join(self, sub: Subscriber, selection: Selection) -> None:
        """Add a subscriber that has every change up to ``flushed_seq`` already."""
        self._groups.setdefault(selection, {})[sub] = None

    def leave(self, sub: Subscriber, selection: Selection) -> None:
        group = self._groups.get(selection)
        if group is None:
            return
        group.pop(sub, None)
        if not group:
            del self._groups[selection]

    def publish(self, records: Sequence[Record]) -> None:
        """Queue changes just applied to the state, in seq order."""
        if not records:
            return
        if not self._groups and not self._pending:
            # Nobody listens: nothing to encode. A subscriber that joins later
            # catches up from the change log up to flushed_seq first.
            self.flushed_seq = records[-1].seq
            return
        if not self._pending:
            self._pending_since = time.perf_counter()
        self._pending.extend(records)
        if not self._scheduled and self._schedule is not None:
            self._scheduled = True
            self._schedule(self.flush)

    def flush(self) -> None:
        """Hand every queued change to the subscribers."""
        self._scheduled = False
        records = self._pending
        if not records:
            return
        self._pending = []
        self.flushed_seq = records[-1].seq
        lines = [r.change_line() for r in records]  # encode once, for everyone
        everything: bytes | None = None
        for selection, group in list(self._groups.items()):
            if selection is None:
                if everything is None:
                    everything = b"".join(lines)
                blob = everything
                n = len(lines)
            else:
                picked = [
                    ln for r, ln in zip(records, lines, strict=True) if r.collection in selection
                ]
                if not picked:
                    continue
                blob = b"".join(picked)
                n = len(picked)
            subs = list(group)
            self.deliveries += n * len(subs)
            self.bytes_delivered += len(blob) * len(subs)
            for sub in subs:
                sub.deliver(blob)
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - self._pending_since)
