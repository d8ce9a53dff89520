"""The change log: the most recent changes, kept for resume (docs/protocol.md §3.2).

A ring of the last ``retain`` :class:`~statecast.core.state.Record` objects, indexed by
seq. The records are the same objects the state holds, so a retained upsert costs a
list slot, not a second copy of its frame. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgspec import UNSET

from statecast.core.state import Record

__all__ = ["ChangeLog"]


class ChangeLog:
    def __init__(self, retain: int, last_seq: int = 0) -> None:
        if retain < 0:
            raise ValueError("retain must be >= 0")
        self.retain = retain
        self._base = last_seq + 1  # the seq stored at ring position 0
        self._ring: list[Record] = []
        self.last_seq = last_seq
        # Changes up to this seq may not know the version they replaced (they were
        # loaded from disk: state.py, Record.before).
        self.unknown_until = 0

    @property
    def first_seq(self) -> int:
        """The oldest seq still retained (``last_seq + 1`` when none is)."""
        return max(self._base, self.last_seq - self.retain + 1)

    def __len__(self) -> int:
        return self.last_seq - self.first_seq + 1

    def extend(self, records: Iterable[Record]) -> None:
        """Append records with consecutive seqs following ``last_seq``."""
        cap = self.retain
        ring = self._ring
        if type(records) is list and cap and len(ring) + len(records) <= cap:
            # The ring is filling: the whole batch at once. A batch's seqs are
            # consecutive by construction (state.encode_batch numbers them), so its
            # ends are checked: that it follows on, and that it is as long as it says.
            n = len(records)
            first = self.last_seq + 1
            if n and (records[0].seq != first or records[-1].seq != first + n - 1):
                raise ValueError(f"change log gap: a batch of {n} does not follow {first - 1}")
            ring += records
            if n:
                self.last_seq = first + n - 1
            return
        for rec in records:
            if rec.seq != self.last_seq + 1:
                raise ValueError(f"change log gap: {rec.seq} after {self.last_seq}")
            self.last_seq = rec.seq
            if not cap:
                rec.before = UNSET  # not retained: nobody catches up through it
                continue
            if len(ring) < cap:
                ring.append(rec)
            else:
                i = (rec.seq - self._base) % cap
                # The change falling out of the log lets go of the version it replaced,
                # so versions chain only within the retained window (state.py, Record).
                ring[i].before = UNSET
                ring[i] = rec
        if not cap:
            self._base = self.last_seq + 1

    def covers(self, after: int) -> bool:
        """Whether every change with seq > ``after`` is retained."""
        return self.first_seq - 1 <= after <= self.last_seq

    def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` changes with seq > ``after``, in order.

        Raises ``LookupError`` when they are no longer retained.
        """
        if not self.covers(after):
            raise LookupError(f"changes after seq {after} are no longer retained")
        stop = min(self.last_seq, after + limit)
        if stop <= after:
            return []
        cap = self.retain
        start_i = (after + 1 - self._base) % cap
        n = stop - after
        ring = self._ring
        if start_i + n <= len(ring):
            return ring[start_i : start_i + n]
        first = ring[start_i:]
        return first + ring[: n - len(first)]
