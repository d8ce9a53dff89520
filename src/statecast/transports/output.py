"""Flow control and the slow-consumer bound, one module for every transport (§7).

Output to a client is bounded two ways:

* streams (a snapshot, a catch-up from the log) are produced ``STREAM_STEP`` bytes at a
  time, and only while the bytes waiting for the socket are below ``HIGH_WATER``
  (resuming under ``LOW_WATER``): a syncing client costs the server a few hundred KB
  however large the state;
* live changes are never held back, so a subscriber for which more than
  ``max_pending`` bytes would wait is cut off with ``slow_consumer`` instead
  (:func:`cut_slow_consumer`); it resumes with ``subscribe from`` its last seq.
"""

from __future__ import annotations

import logging
from typing import Final

from statecast.core.session import Session
from statecast.errors import SlowConsumer
from statecast.transports.base import Host

__all__ = ["CLOSE_LINGER", "HIGH_WATER", "LOW_WATER", "STREAM_STEP", "cut_slow_consumer"]

log = logging.getLogger("statecast.transports.output")

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
STREAM_STEP: Final = 128 * 1024
# How long a connection we close may take to flush its last frames.
CLOSE_LINGER: Final = 2.0


def over_limit(host: Host, waiting: int, more: int) -> bool:
    """Whether ``more`` bytes on top of ``waiting`` would break the §7 bound."""
    return waiting + more > host.config.max_pending


def cut_slow_consumer(host: Host, session: Session, peer: str, waiting: int) -> None:
    """§7: count, log, and fail the session with ``slow_consumer`` (its transport
    then writes the error frame and closes)."""
    limit = host.config.max_pending
    host.connections.slow_consumer_disconnects += 1
    log.warning("disconnecting slow consumer %s: %d bytes waiting, limit %d", peer, waiting, limit)
    session.fail(
        SlowConsumer(
            f"more than {limit} bytes waiting to be sent: resume with subscribe from your last seq"
        )
    )
