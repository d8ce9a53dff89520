"""The client side: :class:`Client` (one connection), :class:`Replica` (a local copy
that stays in sync), and their blocking wrappers (docs/client.md).

Nothing here imports the server, aiohttp or sqlite3: a process that only reads
from statecast loads the client, the frames and the error tree.
"""

from __future__ import annotations

from statecast.client.blocking import BlockingClient, BlockingReplica
from statecast.client.connection import (
    DEFAULT_URL,
    Address,
    Client,
    TokenProvider,
    client_ssl_context,
    new_key,
    parse_address,
    parse_url,
)
from statecast.client.replica import Progress, Replica, Resynced, Status
from statecast.core.frames import (
    Ack,
    Authed,
    Bye,
    ChangeFrame,
    ErrorFrame,
    Frame,
    Heartbeat,
    Hello,
    Pong,
    Record,
    SnapshotBegin,
    SnapshotEnd,
    Stats,
    Subscribed,
)

__all__ = [
    "DEFAULT_URL",
    "Ack",
    "Address",
    "Authed",
    "BlockingClient",
    "BlockingReplica",
    "Bye",
    "ChangeFrame",
    "Client",
    "ErrorFrame",
    "Frame",
    "Heartbeat",
    "Hello",
    "Pong",
    "Progress",
    "Record",
    "Replica",
    "Resynced",
    "SnapshotBegin",
    "SnapshotEnd",
    "Stats",
    "Status",
    "Subscribed",
    "TokenProvider",
    "client_ssl_context",
    "new_key",
    "parse_address",
    "parse_url",
]
