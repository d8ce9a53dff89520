"""Which node to (re)connect to, and how long to wait first (docs/client.md).

Shared by :class:`~statecast.client.Replica`, which reconnects to keep its copy in
sync, and :class:`~statecast.client.Client`, which reconnects to deliver publishes
that have an idempotency key. The nodes of a cluster share epoch and seqs
(docs/cluster.md), so either may go on at the next node where it left off.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from statecast.errors import ConfigError

__all__ = ["Failover", "backoff_delay", "split_urls"]


def split_urls(url: str | Sequence[str]) -> list[str]:
    """The node URLs of ``"tcp://a:8989,tcp://b:8989"`` or of a list."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = [u.strip() for u in parts if u.strip()]
    if not urls:
        raise ConfigError("no server URL given")
    return urls


def backoff_delay(attempt: int, min_backoff: float, max_backoff: float) -> float:
    """Seconds to wait after ``attempt`` failures in a row (0 for the first): from
    ``min_backoff``, doubling up to ``max_backoff``, with +-50 % jitter so that many
    clients cut off at once do not all come back at once."""
    return min(max_backoff, min_backoff * 2.0**attempt) * random.uniform(0.5, 1.5)


class Failover:
    """The node list and the backoff schedule (:func:`backoff_delay`). With several
    nodes, each failure moves on to the next one, and the wait stays short (another
    node is probably up)."""

    def __init__(self, urls: Sequence[str], min_backoff: float, max_backoff: float) -> None:
        self.urls = list(urls)
        self.url = self.urls[0]
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.attempt = 0  # failures since the last good connection

    def succeeded(self) -> None:
        """A connection worked: the next failure waits the shortest time again."""
        self.attempt = 0

    def failed(self, *, move: bool = True) -> float:
        """A connection failed or ended: move to the next node (if several, and
        ``move``); returns the seconds to wait before connecting to :attr:`url`."""
        delay = backoff_delay(self.attempt, self.min_backoff, self.max_backoff)
        self.attempt += 1
        if move and len(self.urls) > 1:  # the next node: it serves the same history
            self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            delay = min(delay, self.min_backoff * random.uniform(0.5, 1.5) * len(self.urls))
        return delay
