"""The stores, and the one place that picks one from a config.

Every store implements :class:`statecast.core.store.Store`. Stores depend on the core,
never the reverse; the composition root (``server.py``) calls :func:`open_store`.
"""

from __future__ import annotations

from pathlib import Path

from statecast.config import Config
from statecast.core.store import Store

__all__ = ["open_store"]


def open_store(config: Config) -> Store:
    """The store ``config.store`` names (``Config`` has checked the name already)."""
    spec = config.store
    if spec.startswith(("nats://", "tls://")):
        from statecast.stores.nats import NatsStore  # noqa: PLC0415 (loads nats-py)

        return NatsStore(config)
    if spec == "memory":
        from statecast.stores.memory import MemoryStore  # noqa: PLC0415 (only when used)

        return MemoryStore(config.retain)
    # "sqlite" or "sqlite:PATH"
    from statecast.stores.sqlite import SQLiteStore  # noqa: PLC0415 (loads sqlite3)

    path = spec.removeprefix("sqlite").removeprefix(":")
    db = Path(path) if path else Path(config.data_dir) / "statecast.db"
    return SQLiteStore(
        db,
        retain=config.retain,
        synchronous=config.sqlite_synchronous,
        busy_timeout=config.sqlite_busy_timeout,
        dedupe_window=config.dedupe_window,
    )
