"""Flow control and the slow-consumer bound, one module for every transport (§7).

Output to a client is bounded two ways:

* streams (a snapshot, a catch-up from the log) are produced ``STREAM_STEP`` bytes at a
  time, and only while the bytes waiting for the socket are below ``HIGH_WATER``
  (resuming under ``LOW_WATER``): a syncing client costs the server a few hundred KB
  however large the state. A connection that is alone in waiting for a turn of the
  loop takes ``STREAM_BURST`` bytes a step instead: a quarter of the loop turns and
  write calls for a big snapshot, while no other connection waits for a turn (one
  that sends a request now and then may wait behind one such step);
* live changes are never held back, so a subscriber for which more than
  ``max_pending`` bytes would wait is cut off with ``slow_consumer`` instead
  (:func:`cut_slow_consumer`); it resumes with ``subscribe from`` its last seq.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from statecast.core.frames import encode_error
from statecast.core.session import Session
from statecast.errors import SlowConsumer, TooManyConnections
from statecast.transports.base import Host

__all__ = [
    "CLOSE_LINGER",
    "HIGH_WATER",
    "LOW_WATER",
    "STREAM_BURST",
    "STREAM_STEP",
    "cut_slow_consumer",
    "over_limit",
    "refuse_connection",
]

log = logging.getLogger("statecast.transports.output")

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
STREAM_STEP: Final = 128 * 1024
STREAM_BURST: Final = 512 * 1024
# How long a connection we close may take to flush its last frames.
CLOSE_LINGER: Final = 2.0


def over_limit(host: Host, waiting: int) -> bool:
    """§7: whether a subscriber has fallen behind: more than ``max_pending`` bytes
    still wait for it when the next changes come. A subscriber that keeps up is never
    cut off, however large one flush is (the fan-out hands out at most FLUSH_BYTES at
    a time, so what waits stays under ``max_pending`` plus that)."""
    return waiting > host.config.max_pending


def refuse_connection(host: Host, write: Callable[[bytes], object], peer: str) -> bool:
    """§7: past ``max_connections``, a new connection gets ``too_many_connections``
    (and the caller closes it); whether it was refused."""
    limit = host.config.max_connections
    if limit is None or len(host.connections) < limit:
        return False
    host.connections.refused += 1
    if host.connections.refused % 1000 == 1:  # a log line, not a log flood
        log.warning(
            "refusing connections beyond --max-connections %d (from %s; %d refused so far)",
            limit,
            peer,
            host.connections.refused,
        )
    write(encode_error(TooManyConnections(f"the server has {limit} connections, its most")))
    return True


def cut_slow_consumer(host: Host, session: Session, peer: str, waiting: int) -> None:
    """§7: with ``--slow-consumer conflate``, conflate the subscriber's changes until
    it has drained (its transport calls ``session.restore()`` then); otherwise, or if it
    cannot be, count, log, and fail the session with ``slow_consumer`` (its transport
    then writes the error frame and closes)."""
    limit = host.config.max_pending
    if host.config.slow_consumer == "conflate" and session.degrade():
        log.info(
            "conflating slow consumer %s until it drains: %d bytes waiting, limit %d",
            peer,
            waiting,
            limit,
        )
        return
    host.connections.slow_consumer_disconnects += 1
    log.warning("disconnecting slow consumer %s: %d bytes waiting, limit %d", peer, waiting, limit)
    session.fail(
        SlowConsumer(
            f"more than {limit} bytes waiting to be sent: resume with subscribe from your last seq"
        )
    )
