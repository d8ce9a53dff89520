"""What the server needs for access control and TLS, built from a Config
(docs/security.md): the token verifier, the TLS context, the per-user connection
count, and the session limits."""

from __future__ import annotations

import collections
import logging
import ssl

from statecast.config import Config, is_loopback
from statecast.core.policy import Grant
from statecast.core.session import Limits
from statecast.errors import ConfigError, TooManyConnections
from statecast.tokens import TokenVerifier

__all__ = ["UserConnections", "limits_of", "server_ssl_context", "verifier_of", "warn_if_open"]

log = logging.getLogger("statecast.security")


def verifier_of(config: Config) -> TokenVerifier | None:
    """The token verifier ``config`` asks for (None: no auth)."""
    if not config.auth:
        return None
    return TokenVerifier.from_files(
        secret=config.auth_secret, public_key_file=config.auth_public_key
    )


class _EncryptedKey(Exception):
    """The TLS key asked for a passphrase."""


def _no_passphrase() -> str:
    raise _EncryptedKey


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """TLS for the TCP and HTTP ports (None: plain)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # A password callback, so that OpenSSL never asks for a passphrase on the
        # terminal: an encrypted key is refused with a clear message instead.
        ctx.load_cert_chain(config.tls_cert, config.tls_key, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(
            f"--tls-key {config.tls_key} is encrypted (passphrase-protected): statecast "
            f"needs it unencrypted ('openssl pkey -in {config.tls_key} -out key.pem')"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load --tls-cert {config.tls_cert} / --tls-key {config.tls_key}: {exc}"
        ) from None
    return ctx


def limits_of(config: Config) -> Limits:
    return Limits(
        max_line=config.max_line,
        max_changes=config.max_changes,
        max_value=config.max_value,
        rate=config.max_request_rate,
        burst=config.request_burst,
        auth_timeout=config.auth_timeout if config.auth else None,
        max_inflight=config.max_inflight,
        request_timeout=config.request_timeout,
        idle_timeout=config.idle_timeout,
        snapshot_timeout=config.snapshot_timeout,
        heartbeat=config.heartbeat or 0.0,
    )


def warn_if_open(config: Config) -> None:
    """§ docs/security.md: say it loudly when anyone who reaches the port may read."""
    if not config.auth and not is_loopback(config.host):
        log.warning(
            "--insecure: listening on %s without access tokens: anyone who reaches the "
            "port reads and writes every record",
            config.host,
        )


class UserConnections:
    """Connections per token subject, bounded by ``max_connections_per_user`` (§7)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.by_sub: collections.Counter[str] = collections.Counter()
        self.refused = 0

    def admit(self, grant: Grant) -> None:
        if self.limit is not None and self.by_sub[grant.sub] >= self.limit:
            self.refused += 1
            raise TooManyConnections(
                f"{grant.sub!r} already has {self.limit} connections (the most per user)"
            )
        self.by_sub[grant.sub] += 1

    def release(self, grant: Grant) -> None:
        self.by_sub[grant.sub] -= 1
        if self.by_sub[grant.sub] <= 0:
            del self.by_sub[grant.sub]
