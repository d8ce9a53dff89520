"""Idempotency keys seen (§3.3): which batches were applied, for the dedupe window.

A publish may carry an ``idempotency_key``. The first batch committed under a key is
applied; one published again under the same key while the key is remembered is not
applied again, and is answered with the first one's ack (its seq) marked
``duplicate``. A key is remembered for ``window`` seconds after its batch committed,
and in any case while it is among the ``keep`` newest keys.

The table is the engine's, in memory. A durable store commits each key in the same
transaction as its batch and hands the keys back at start (``Store.idempotency_keys``),
so that the promise survives restarts and ``kill -9``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["DEFAULT_KEEP", "DEFAULT_WINDOW", "Dedupe", "KeyRecord"]

DEFAULT_WINDOW: Final = 600.0  # seconds (--dedupe-window)
DEFAULT_KEEP: Final = 100_000  # keys remembered at least, however old

# key, the seq its batch was acknowledged with, when it committed (seconds since the
# epoch: the table outlives the process).
KeyRecord = tuple[str, int, float]


class Dedupe:
    """Keys in commit order (a dict keeps insertion order), so the oldest go first."""

    __slots__ = ("_keys", "keep", "window")

    def __init__(self, window: float = DEFAULT_WINDOW, keep: int = DEFAULT_KEEP) -> None:
        self.window = window
        self.keep = keep
        self._keys: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def seq_of(self, key: str, now: float) -> int | None:
        """The seq of the batch applied under ``key``, if it is still remembered."""
        self.expire(now)
        hit = self._keys.get(key)
        return None if hit is None else hit[0]

    def add(self, key: str, seq: int, at: float) -> None:
        self._keys[key] = (seq, at)
        self.expire(at)

    def load(self, records: Iterable[KeyRecord]) -> None:
        """Keys a store kept, oldest first."""
        for key, seq, at in records:
            self._keys[key] = (seq, at)

    def expire(self, now: float) -> None:
        """Forget keys past the window, beyond the ``keep`` newest. (Keys are added in
        commit order, so their times only grow: past the oldest, nothing to drop.)"""
        keys = self._keys
        horizon = now - self.window
        while len(keys) > self.keep:
            oldest = next(iter(keys))
            if keys[oldest][1] >= horizon:
                break
            del keys[oldest]
