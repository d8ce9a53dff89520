"""The one exception hierarchy of statecast.

::

    StatecastError
    ├── ConfigError                  bad settings (CLI flags, Config fields, client URLs)
    ├── StoreError                   a store cannot be opened (not ours, too new, in use)
    ├── ServerStateError             misuse of the embedding API (publish before start, ...)
    ├── ConnectionClosed             a client's connection failed or ended
    │   └── ServerBye                the server said bye (§8): it is shutting down
    ├── Timeout                      a client operation took too long (also TimeoutError)
    ├── BadFrame                     a client got a frame it cannot read (§4)
    └── ProtocolError                an error with a wire code (docs/protocol.md §6)
        ├── BadRequest               bad_request             HTTP 400
        ├── Unauthorized             unauthorized            HTTP 401
        │   └── TokenExpired         token_expired           HTTP 401
        ├── Forbidden                forbidden               HTTP 403
        ├── ResyncRequired           resync_required         HTTP 409
        ├── Conflict                 conflict                HTTP 409
        ├── TooLarge                 too_large               HTTP 413
        ├── RateLimited              rate_limited            HTTP 429
        ├── TooManyConnections       too_many_connections    HTTP 503
        ├── SlowConsumer             slow_consumer           HTTP 503
        ├── ShuttingDown             shutting_down           HTTP 503
        ├── Unavailable              unavailable             HTTP 503
        └── InternalError            internal                HTTP 500

Every wire error code maps to exactly one class, in :data:`ERRORS_BY_CODE`, and each
class carries its HTTP status; the server turns a :class:`ProtocolError` into an
``error`` frame (or an HTTP answer with that status), and a client turns an ``error``
frame back into the same class with :func:`error_from_code`.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ERRORS_BY_CODE",
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
    "error_from_code",
]


class StatecastError(Exception):
    """Root of every exception statecast raises on purpose."""


class ConfigError(StatecastError, ValueError):
    """A setting is invalid; the message names the setting."""


class StoreError(StatecastError):
    """A store cannot be opened; the message names the file and the reason."""


class ServerStateError(StatecastError, RuntimeError):
    """The embedding API was used at the wrong time (e.g. publish on a stopped server)."""


class ConnectionClosed(StatecastError, ConnectionError):
    """A client cannot reach the server, or its connection ended."""


class ServerBye(ConnectionClosed):
    """The server said ``bye`` (§8): it is shutting down; reconnect later or elsewhere."""

    def __init__(self, reason: str = "shutdown") -> None:
        super().__init__(f"the server said bye ({reason})")
        self.reason = reason


class Timeout(StatecastError, TimeoutError):
    """A client operation (connect, a request's answer) took longer than allowed."""


class BadFrame(StatecastError):
    """A client received a frame that is not valid (bad JSON, invalid UTF-8, too long,
    an impossible seq): the connection is unusable, so it is closed."""


class ProtocolError(StatecastError):
    """An error that has a code on the wire (docs/protocol.md §6).

    ``request_id`` is the ``id`` of the request it answers, when there is one;
    ``status`` is the HTTP status the HTTP port answers it with.
    """

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class BadRequest(ProtocolError, ValueError):
    code = "bad_request"
    status = 400


class Unauthorized(ProtocolError):
    code = "unauthorized"
    status = 401


class TokenExpired(Unauthorized):
    code = "token_expired"
    status = 401


class Forbidden(ProtocolError):
    code = "forbidden"
    status = 403


class ResyncRequired(ProtocolError):
    code = "resync_required"
    status = 409


class Conflict(ProtocolError):
    """A precondition of a publish failed (§3.3 ``if_seq``): nothing of the batch was
    applied. ``change`` is the index of the change whose ``if_seq`` did not hold, and
    ``current_seq`` the record's last-written seq (0: it does not exist)."""

    code = "conflict"
    status = 409

    def __init__(
        self,
        message: str,
        *,
        request_id: int | str | None = None,
        change: int | None = None,
        current_seq: int | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.change = change
        self.current_seq = current_seq


class TooLarge(ProtocolError):
    code = "too_large"
    status = 413


class RateLimited(ProtocolError):
    code = "rate_limited"
    status = 429


class TooManyConnections(ProtocolError):
    code = "too_many_connections"
    status = 503


class SlowConsumer(ProtocolError):
    code = "slow_consumer"
    status = 503


class ShuttingDown(ProtocolError):
    code = "shutting_down"
    status = 503


class Unavailable(ProtocolError):
    code = "unavailable"
    status = 503


class InternalError(ProtocolError):
    code = "internal"
    status = 500


ERRORS_BY_CODE: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        TokenExpired,
        Forbidden,
        ResyncRequired,
        Conflict,
        TooLarge,
        RateLimited,
        TooManyConnections,
        SlowConsumer,
        ShuttingDown,
        Unavailable,
        InternalError,
    )
}


def error_from_code(
    code: str,
    message: str,
    *,
    request_id: int | str | None = None,
    change: int | None = None,
    current_seq: int | None = None,
) -> ProtocolError:
    """The exception for an ``error`` frame; unknown codes become :class:`ProtocolError`."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        return ProtocolError(f"[{code}] {message}", request_id=request_id)
    if cls is Conflict:
        return Conflict(message, request_id=request_id, change=change, current_seq=current_seq)
    return cls(message, request_id=request_id)
