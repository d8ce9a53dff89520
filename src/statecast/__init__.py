"""statecast: keep many clients exactly in sync with a changing state.

A server holds collections of JSON records; clients get a consistent snapshot, then
every later change, with no gap and no duplicate. See docs/protocol.md.

Names are loaded on first use (PEP 562), so ``import statecast.client`` does not load
the server, aiohttp or sqlite3, and ``import statecast`` alone loads almost nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from statecast._version import __version__

if TYPE_CHECKING:
    from statecast.client.blocking import BlockingClient, BlockingReplica
    from statecast.client.connection import Client
    from statecast.client.replica import Progress, Replica, Resynced
    from statecast.config import Config
    from statecast.core.frames import PROTOCOL_VERSION
    from statecast.core.protocol import Change
    from statecast.errors import (
        BadFrame,
        BadRequest,
        ConfigError,
        Conflict,
        ConnectionClosed,
        Forbidden,
        InternalError,
        ProtocolError,
        RateLimited,
        ResyncRequired,
        ServerBye,
        ServerStateError,
        ShuttingDown,
        SlowConsumer,
        StatecastError,
        StoreError,
        Timeout,
        TokenExpired,
        TooLarge,
        TooManyConnections,
        Unauthorized,
        Unavailable,
    )
    from statecast.server import Server

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    "PROTOCOL_VERSION": "statecast.core.frames",
    "Change": "statecast.core.protocol",
    "Config": "statecast.config",
    "Server": "statecast.server",
    "Client": "statecast.client.connection",
    "Replica": "statecast.client.replica",
    "Progress": "statecast.client.replica",
    "Resynced": "statecast.client.replica",
    "BlockingClient": "statecast.client.blocking",
    "BlockingReplica": "statecast.client.blocking",
    **{
        name: "statecast.errors"
        for name in (
            "BadFrame",
            "BadRequest",
            "ConfigError",
            "Conflict",
            "ConnectionClosed",
            "Forbidden",
            "InternalError",
            "ProtocolError",
            "RateLimited",
            "ResyncRequired",
            "ServerBye",
            "ServerStateError",
            "ShuttingDown",
            "SlowConsumer",
            "StatecastError",
            "StoreError",
            "Timeout",
            "TokenExpired",
            "TooLarge",
            "TooManyConnections",
            "Unauthorized",
            "Unavailable",
        )
    },
}

__all__ = [
    "PROTOCOL_VERSION",
    "BadFrame",
    "BadRequest",
    "BlockingClient",
    "BlockingReplica",
    "Change",
    "Client",
    "Config",
    "ConfigError",
    "Conflict",
    "ConnectionClosed",
    "Forbidden",
    "InternalError",
    "Progress",
    "ProtocolError",
    "RateLimited",
    "Replica",
    "ResyncRequired",
    "Resynced",
    "Server",
    "ServerBye",
    "ServerStateError",
    "ShuttingDown",
    "SlowConsumer",
    "StatecastError",
    "StoreError",
    "Timeout",
    "TokenExpired",
    "TooLarge",
    "TooManyConnections",
    "Unauthorized",
    "Unavailable",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'statecast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
