"""Every setting of a server, with its default, in one typed object.

The command line (``statecast serve --max-pending ...``) and the environment
(``STATECAST_MAX_PENDING=...``) map one to one onto these fields, with these
defaults: an embedded ``Server()`` and ``statecast serve`` behave the same
(``tests/cli/test_main.py`` checks it). ``None`` means "off" wherever it is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from statecast.errors import ConfigError

__all__ = ["Config"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Config:
    # Network
    host: str = "127.0.0.1"
    port: int = 8989  # 0 picks a free port (tests)
    http_port: int | None = 8990  # WebSocket, HTTP API, metrics, dashboard; 0: any; None: off

    # State
    store: str = "sqlite"  # "sqlite" (in data_dir), "sqlite:PATH" or "memory"
    data_dir: str = "."  # where "sqlite" keeps statecast.db
    sqlite_synchronous: Literal["full", "normal"] = "full"  # see docs/durability.md
    sqlite_busy_timeout: float = 2.0  # seconds a commit waits for another process's lock
    retain: int = 1_000_000  # changes kept for resume (§3.2)

    # Limits
    max_pending: int = 8 * MiB  # output bytes waiting for one subscriber (§7)
    max_line: int = 1 * MiB  # longest request line (§1)

    # Timeouts
    heartbeat: float | None = 10.0  # seconds of silence before a heartbeat; None: off
    flush_interval: float = 0.0  # least seconds between two fan-out flushes (§7)
    shutdown_grace: float = 5.0  # seconds for output to drain on shutdown (§8)

    # Extras
    demo: bool = False  # run the trading-desk demo producers
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, not {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port must be 0..65535 (or None), not {self.http_port}")
        if self.store not in ("memory", "sqlite") and not self.store.startswith("sqlite:"):
            raise ConfigError(
                f"unknown store {self.store!r}: use 'memory', 'sqlite' or 'sqlite:PATH'"
            )
        if self.sqlite_synchronous not in ("full", "normal"):
            raise ConfigError(
                f"sqlite_synchronous must be 'full' or 'normal', not {self.sqlite_synchronous!r}"
            )
        if self.retain < 0:
            raise ConfigError(f"retain must be >= 0, not {self.retain}")
        if self.max_pending < 64 * 1024:
            raise ConfigError(f"max_pending must be at least 65536 bytes, not {self.max_pending}")
        if self.max_line < 1024:
            raise ConfigError(f"max_line must be at least 1024 bytes, not {self.max_line}")
        if self.heartbeat is not None and self.heartbeat <= 0:
            raise ConfigError(f"heartbeat must be > 0 seconds (or None), not {self.heartbeat}")
        if not 0 <= self.flush_interval <= 1:
            raise ConfigError(f"flush_interval must be 0 to 1 seconds, not {self.flush_interval}")
        if self.shutdown_grace < 0:
            raise ConfigError(f"shutdown_grace must be >= 0, not {self.shutdown_grace}")

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
