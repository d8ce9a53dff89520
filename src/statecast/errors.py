"""The one exception hierarchy of statecast.

::

    StatecastError
    ├── ConfigError                  bad settings (CLI flags, Config fields)
    ├── StoreError                   a store cannot be opened (not ours, too new, in use)
    ├── ServerStateError             misuse of the embedding API (publish before start, ...)
    ├── ConnectionClosed             a client's connection failed or ended
    └── ProtocolError                an error with a wire code (docs/protocol.md §6)
        ├── BadRequest               bad_request
        ├── TooLarge                 too_large
        ├── ResyncRequired           resync_required
        ├── SlowConsumer             slow_consumer
        ├── ShuttingDown             shutting_down
        ├── Unauthorized             unauthorized
        ├── Forbidden                forbidden
        ├── Unavailable              unavailable
        └── InternalError            internal

Every wire error code maps to exactly one class, in :data:`ERRORS_BY_CODE`; the
server turns a :class:`ProtocolError` into an ``error`` frame and a client turns an
``error`` frame back into the same class with :func:`error_from_code`.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ERRORS_BY_CODE",
    "BadRequest",
    "ConfigError",
    "ConnectionClosed",
    "Forbidden",
    "InternalError",
    "ProtocolError",
    "ResyncRequired",
    "ServerStateError",
    "ShuttingDown",
    "SlowConsumer",
    "StatecastError",
    "StoreError",
    "TooLarge",
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


class ProtocolError(StatecastError):
    """An error that has a code on the wire (docs/protocol.md §6).

    ``request_id`` is the ``id`` of the request it answers, when there is one.
    """

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class BadRequest(ProtocolError, ValueError):
    code = "bad_request"


class TooLarge(ProtocolError):
    code = "too_large"


class ResyncRequired(ProtocolError):
    code = "resync_required"


class SlowConsumer(ProtocolError):
    code = "slow_consumer"


class ShuttingDown(ProtocolError):
    code = "shutting_down"


class Unauthorized(ProtocolError):
    code = "unauthorized"


class Forbidden(ProtocolError):
    code = "forbidden"


class Unavailable(ProtocolError):
    code = "unavailable"


class InternalError(ProtocolError):
    code = "internal"


ERRORS_BY_CODE: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        TooLarge,
        ResyncRequired,
        SlowConsumer,
        ShuttingDown,
        Unauthorized,
        Forbidden,
        Unavailable,
        InternalError,
    )
}


def error_from_code(
    code: str, message: str, *, request_id: int | str | None = None
) -> ProtocolError:
    """The exception for an ``error`` frame; unknown codes become :class:`ProtocolError`."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        err = ProtocolError(f"[{code}] {message}", request_id=request_id)
        return err
    return cls(message, request_id=request_id)
