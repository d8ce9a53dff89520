"""Every setting of a server, with its default, in one typed object.

The command line (``statecast serve --max-pending ...``) and the environment
(``STATECAST_MAX_PENDING=...``) map one to one onto these fields, with these
defaults: an embedded ``Server()`` and ``statecast serve`` behave the same
(``tests/cli/test_main.py`` checks it). ``None`` means "off" wherever it is allowed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Literal

from statecast.errors import ConfigError

__all__ = ["Config", "is_loopback", "redact_url"]

MiB = 1024 * 1024


_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    path = re.sub(r"(?i)(password=)[^&]*", r"\1***", path)
    return f"{scheme}://{userinfo}{at}{hostport}{slash}{path}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Config:
    # Network
    host: str = "127.0.0.1"
    port: int = 8989  # 0 picks a free port (tests)
    http_port: int | None = 8990  # WebSocket, HTTP API, metrics, dashboard; 0: any; None: off
    tls_cert: str | None = None  # PEM certificate chain: TLS on the TCP and HTTP ports
    tls_key: str | None = None  # its PEM private key
    insecure: bool = False  # allow listening beyond loopback without auth

    # Access (docs/security.md, protocol §3.8)
    auth_secret: str | None = None  # HS256 tokens: the shared secret (>= 32 bytes)
    auth_public_key: str | None = None  # RS256/ES256 tokens: a PEM public key file

    # State
    store: str = "sqlite"  # "sqlite" (in data_dir), "sqlite:PATH", "memory", "nats://H:P[,H:P]"
    data_dir: str = "."  # where "sqlite" keeps statecast.db
    sqlite_synchronous: Literal["full", "normal"] = "full"  # see docs/durability.md
    sqlite_busy_timeout: float = 2.0  # seconds a commit waits for another process's lock
    retain: int = 1_000_000  # changes kept for resume (§3.2)
    dedupe_window: float = 600.0  # seconds an idempotency key is remembered (§3.3)
    nats_stream: str = "statecast"  # the JetStream stream of a nats:// store (docs/cluster.md)
    nats_creds: str | None = None  # a NATS credentials file (JWT + nkey)
    nats_ca_file: str | None = None  # CA bundle for tls:// NATS servers
    nats_checkpoint_interval: int | None = None  # changes between checkpoints (None: auto)
    nats_replicas: int | None = None  # of the streams it creates (None: 3 if clustered)

    # Source: follow PostgreSQL tables (docs/postgres.md)
    source: str | None = None  # postgresql://USER[:PASSWORD]@HOST[:PORT]/DB; None: no source
    tables: str | None = None  # comma-separated tables to follow (None: the publication's)
    publication: str = "statecast"  # created with --tables if missing (and permitted)
    slot: str = "statecast"  # the logical replication slot (pgoutput) statecast owns
    numeric_as_number: bool = False  # numeric columns as JSON numbers, not exact strings

    # Limits
    max_pending: int = 8 * MiB  # output bytes waiting for one subscriber (§7)
    slow_consumer: Literal["disconnect", "conflate"] = "disconnect"  # past max_pending (§7)
    max_line: int = 1 * MiB  # longest request line (§1)
    max_changes: int | None = 100_000  # changes in one publish (§9)
    max_value: int | None = None  # bytes of one value (None: max_line bounds it)
    max_connections_per_user: int | None = None  # per token 'sub', with auth (§7)
    max_connections: int | None = 10_000  # open client connections in all (§7)
    max_inflight: int = 16  # publishes of one connection waiting for their ack (§7)
    max_inflight_total: int = 256  # ... of all connections
    max_snapshot_retained: int | None = 256 * MiB  # old versions kept for open snapshots
    max_request_rate: float | None = None  # requests/s per connection, sustained (§7)
    request_burst: int = 1000  # ... and at once

    # Timeouts
    heartbeat: float | None = 10.0  # seconds of silence before a heartbeat; None: off
    flush_interval: float = 0.0  # least seconds between two generations of the fan-out (§7)
    # How long the fan-out waits after a flush (docs/fanout.md, "Pacing"): "throughput"
    # (as long as the flush took) or "latency" (only as long as other work needs).
    flush_pacing: Literal["throughput", "latency"] = "throughput"
    shutdown_grace: float = 5.0  # seconds for output to drain on shutdown (§8)
    auth_timeout: float = 10.0  # seconds a connection has to authenticate, with auth (§3.8)
    request_timeout: float | None = 30.0  # seconds to finish a request line once begun
    idle_timeout: float | None = 300.0  # close a connection with no subscription, silent
    snapshot_timeout: float | None = 60.0  # cut a snapshot that has not advanced this long

    # Extras
    demo: bool = False  # run the trading-desk demo producers
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def auth(self) -> bool:
        """Whether connections must present an access token."""
        return self.auth_secret is not None or self.auth_public_key is not None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN passes every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, not {value}")
        self._check_network()
        self._check_store()
        self._check_source()
        self._check_limits()

    def _check_network(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, not {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port must be 0..65535 (or None), not {self.http_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key (--tls-cert, --tls-key)")
        if self.auth_secret is not None and self.auth_public_key is not None:
            raise ConfigError("use auth_secret (HS256) or auth_public_key (RS256/ES256), not both")
        if not self.auth and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"listening on {self.host!r} without access tokens would let anyone who "
                "reaches the port read and write everything: configure --auth-secret or "
                "--auth-public-key (docs/security.md), or say --insecure"
            )

    def _check_store(self) -> None:
        if self.store not in ("memory", "sqlite") and not self.store.startswith(
            ("sqlite:", "nats://", "tls://")
        ):
            raise ConfigError(
                f"unknown store {self.store!r}: use 'sqlite', 'sqlite:PATH', 'memory' or "
                "'nats://HOST:PORT[,HOST:PORT...]'"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.nats_stream):
            raise ConfigError(
                f"nats_stream must be 1 to 64 of A-Z a-z 0-9 _ -, not {self.nats_stream!r}"
            )
        if self.sqlite_synchronous not in ("full", "normal"):
            raise ConfigError(
                f"sqlite_synchronous must be 'full' or 'normal', not {self.sqlite_synchronous!r}"
            )
        if self.retain < 0:
            raise ConfigError(f"retain must be >= 0, not {self.retain}")
        if not 0 <= self.dedupe_window <= 30 * 86400:
            raise ConfigError(
                f"dedupe_window must be 0 to 2592000 seconds (30 days), not {self.dedupe_window}"
            )

    def _check_source(self) -> None:
        if self.source is None:
            if self.tables is not None:
                raise ConfigError("tables needs a source (--source postgresql://...)")
            return
        if not self.source.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                "source must be a PostgreSQL URL, postgresql://USER@HOST:PORT/DATABASE, "
                f"not {redact_url(self.source)!r}"
            )
        if self.store != "memory" and not self.store.startswith("sqlite"):
            raise ConfigError(
                "a source works with the sqlite and memory stores, not "
                f"{self.store.split('://', 1)[0]}:// (docs/postgres.md)"
            )
        if not _SLOT_RE.fullmatch(self.slot):
            raise ConfigError(
                f"slot must be 1 to 63 of a-z 0-9 _ (PostgreSQL's rule), not {self.slot!r}"
            )
        if not self.publication or len(self.publication) > 63 or "\x00" in self.publication:
            raise ConfigError(
                f"publication must be a name of 1 to 63 bytes, not {self.publication!r}"
            )
        if self.tables is not None:
            names = [t.strip() for t in self.tables.split(",")]
            if not any(names) or not all(names):
                raise ConfigError(
                    f"tables must be a comma-separated list of table names, not {self.tables!r}"
                )

    def _check_limits(self) -> None:
        if self.slow_consumer not in ("disconnect", "conflate"):
            raise ConfigError(
                f"slow_consumer must be 'disconnect' or 'conflate', not {self.slow_consumer!r}"
            )
        if self.sqlite_busy_timeout < 0:
            raise ConfigError(
                f"sqlite_busy_timeout must be >= 0 seconds, not {self.sqlite_busy_timeout}"
            )
        if self.max_pending < 64 * 1024:
            raise ConfigError(f"max_pending must be at least 65536 bytes, not {self.max_pending}")
        if self.max_line < 1024:
            raise ConfigError(f"max_line must be at least 1024 bytes, not {self.max_line}")
        for name in (
            "max_changes",
            "max_value",
            "max_connections_per_user",
            "max_connections",
            "max_inflight",
            "max_inflight_total",
            "max_snapshot_retained",
            "nats_checkpoint_interval",
            "nats_replicas",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or None: no limit), not {value}")
        if self.max_request_rate is not None and self.max_request_rate <= 0:
            raise ConfigError(
                f"max_request_rate must be > 0 (or None), not {self.max_request_rate}"
            )
        if self.request_burst < 1:
            raise ConfigError(f"request_burst must be >= 1, not {self.request_burst}")
        if self.heartbeat is not None and self.heartbeat <= 0:
            raise ConfigError(f"heartbeat must be > 0 seconds (or None), not {self.heartbeat}")
        if not 0 <= self.flush_interval <= 1:
            raise ConfigError(f"flush_interval must be 0 to 1 seconds, not {self.flush_interval}")
        if self.shutdown_grace < 0:
            raise ConfigError(f"shutdown_grace must be >= 0, not {self.shutdown_grace}")
        if self.auth_timeout <= 0:
            raise ConfigError(f"auth_timeout must be > 0 seconds, not {self.auth_timeout}")
        for name in ("request_timeout", "idle_timeout", "snapshot_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0 seconds (or None: off), not {value}")

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
