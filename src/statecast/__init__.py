"""statecast: keep many clients exactly in sync with a changing state.

A server holds collections of JSON records; clients get a consistent snapshot, then
every later change, with no gap and no duplicate. See docs/protocol.md.
"""

from __future__ import annotations

from statecast.blocking import BlockingClient, BlockingReplica
from statecast.client import Client
from statecast.config import Config
from statecast.errors import (
    BadRequest,
    ConfigError,
    ConnectionClosed,
    Forbidden,
    InternalError,
    ProtocolError,
    ResyncRequired,
    ServerStateError,
    ShuttingDown,
    SlowConsumer,
    StatecastError,
    StoreError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from statecast.protocol import PROTOCOL_VERSION, Change
from statecast.replica import Progress, Replica, Resynced
from statecast.server import Server, __version__

__all__ = [
    "PROTOCOL_VERSION",
    "BadRequest",
    "BlockingClient",
    "BlockingReplica",
    "Change",
    "Client",
    "Config",
    "ConfigError",
    "ConnectionClosed",
    "Forbidden",
    "InternalError",
    "Progress",
    "ProtocolError",
    "Replica",
    "ResyncRequired",
    "Resynced",
    "Server",
    "ServerStateError",
    "ShuttingDown",
    "SlowConsumer",
    "StatecastError",
    "StoreError",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "__version__",
]
