"""Every frame the server sends (docs/protocol.md §2, §3, §4, §6, §8), defined once.

Each frame is a msgspec Struct tagged by ``type``. The server encodes with them and
the client decodes with them, so the two sides cannot drift apart. Field order is
wire order; fields that are optional on the wire (``id``, ``count``) have a default
and are left out when they hold it (``omit_defaults``).

Three frames are built on the hot path from one format constant each instead
(:data:`RECORD_LINE`, :data:`DELETE_LINE`, :data:`HEARTBEAT_LINE`): they are the
same bytes as encoding the Struct (``tests/core/test_frames.py`` checks it), but
formatting bytes that were encoded once costs a fraction of building an object per
change and subscriber.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias, cast

import msgspec

from statecast.errors import Conflict, ProtocolError, error_from_code

__all__ = [
    "CHANGE_PREFIX",
    "DELETE_LINE",
    "HEARTBEAT_LINE",
    "PROTOCOL_VERSION",
    "RECORD_LINE",
    "RECORD_PREFIX",
    "Ack",
    "Authed",
    "Bye",
    "ChangeFrame",
    "Conflating",
    "ErrorFrame",
    "Frame",
    "Heartbeat",
    "Hello",
    "Pong",
    "Record",
    "RequestId",
    "SnapshotBegin",
    "SnapshotEnd",
    "Stats",
    "Subscribed",
    "change_line_from_record_line",
    "decode_frame",
    "delete_line",
    "encode",
    "encode_error",
    "encode_heartbeat",
    "skippable",
]

PROTOCOL_VERSION: Final = 1

RequestId: TypeAlias = int | str | None


class Hello(msgspec.Struct, tag_field="type", tag="hello", omit_defaults=True):
    """§2: the first frame on every connection."""

    server: str
    version: str
    protocol: int
    epoch: str
    seq: int
    # §4.3: seconds of silence after which a subscribed connection gets a heartbeat
    # (None, omitted: none are sent), so that a client can tell a dead connection.
    heartbeat: float | None = None


class SnapshotBegin(msgspec.Struct, tag_field="type", tag="snapshot_begin", omit_defaults=True):
    """§3.1: a snapshot at ``seq`` starts; ``count`` records follow."""

    seq: int
    epoch: str
    count: int | None = None
    id: RequestId = None


class Record(msgspec.Struct, tag_field="type", tag="record"):
    """§4.1: one record of a snapshot (built with :data:`RECORD_LINE` by the server)."""

    seq: int
    collection: str
    key: str
    value: Any = None


class SnapshotEnd(msgspec.Struct, tag_field="type", tag="snapshot_end", omit_defaults=True):
    """§3.1: the snapshot is complete (``conflate``: live changes come conflated, §3.9)."""

    seq: int
    count: int
    id: RequestId = None
    conflate: float | None = None


class Subscribed(msgspec.Struct, tag_field="type", tag="subscribed", omit_defaults=True):
    """§3.2: changes after ``seq`` follow (``conflate``: conflated, §3.9)."""

    seq: int
    epoch: str
    id: RequestId = None
    conflate: float | None = None


class Conflating(msgspec.Struct, tag_field="type", tag="conflating"):
    """§7 ``--slow-consumer conflate``: ``on``: this subscriber fell behind, and the
    server now keeps only the newest state of each key for it until it has drained;
    ``off``: that state came, and every change comes again."""

    on: bool


class ChangeFrame(msgspec.Struct, tag_field="type", tag="change", omit_defaults=True):
    """§4.2: one change (built from the stored record line by the server)."""

    seq: int
    collection: str
    key: str
    value: Any = msgspec.UNSET  # absent (UNSET) on a delete
    deleted: bool = False


class Heartbeat(msgspec.Struct, tag_field="type", tag="heartbeat"):
    """§4.3: every change up to ``seq`` has been sent."""

    seq: int


class Authed(msgspec.Struct, tag_field="type", tag="authed", omit_defaults=True):
    """§3.8: the token is accepted; what it grants (``read``/``publish``: ``"*"`` or a
    list of collections, ``[]`` for none; ``exp``: unix time)."""

    sub: str
    read: str | list[str]
    where: dict[str, Any] | None
    publish: str | list[str]
    exp: int | None
    id: RequestId = None


class Ack(msgspec.Struct, tag_field="type", tag="ack", omit_defaults=True):
    """§3.3: a publish is applied; ``seq`` is its last change's. ``duplicate``: the
    batch was applied before under the same ``idempotency_key``, and ``seq`` is that
    first ack's; nothing was applied again."""

    seq: int
    id: RequestId = None
    duplicate: bool = False


class Pong(msgspec.Struct, tag_field="type", tag="pong", omit_defaults=True):
    """§3.4: the answer to ``ping``, with the current seq."""

    seq: int
    id: RequestId = None


class Stats(msgspec.Struct, tag_field="type", tag="stats", omit_defaults=True):
    """§3.5: the server's counters."""

    seq: int
    epoch: str
    connections: int
    connections_accepted: int
    subscribers: int
    records: int
    open_snapshots: int
    changes_published: int
    deliveries: int
    slow_consumer_disconnects: int
    publishes_failed: int
    retained_changes: int
    store: str
    uptime: float
    # Only with a PostgreSQL source (docs/postgres.md, "Faults"): its state
    # (loading, streaming, down, failed), lag_bytes, committed_lsn, counters, error.
    source: dict[str, Any] | None = None
    id: RequestId = None


class ErrorFrame(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    """§6: a request failed (with its ``id``), or the connection is about to close."""

    code: str
    message: str
    id: RequestId = None
    # code "conflict" (§3.3 if_seq): the change whose precondition failed, and the
    # record's current seq (0: it does not exist).
    change: int | None = None
    current_seq: int | None = None

    def exception(self) -> ProtocolError:
        return error_from_code(
            self.code,
            self.message,
            request_id=self.id,
            change=self.change,
            current_seq=self.current_seq,
        )

    @classmethod
    def of(cls, error: ProtocolError, request_id: RequestId = None) -> ErrorFrame:
        """The frame of an error (with its request's id, if it has one)."""
        if isinstance(error, Conflict):
            return cls(
                error.code,
                error.message,
                request_id,
                change=error.change,
                current_seq=error.current_seq,
            )
        return cls(error.code, error.message, request_id)


class Bye(msgspec.Struct, tag_field="type", tag="bye"):
    """§8: the server is shutting down and closes the connection."""

    reason: str


Frame: TypeAlias = (
    Hello
    | Authed
    | SnapshotBegin
    | Record
    | SnapshotEnd
    | Subscribed
    | ChangeFrame
    | Heartbeat
    | Conflating
    | Ack
    | Pong
    | Stats
    | ErrorFrame
    | Bye
)

_encode = msgspec.json.encode
_decoder = msgspec.json.Decoder(Frame)


def encode(frame: Frame) -> bytes:
    """One frame, as the line the server writes."""
    return _encode(frame) + b"\n"


def decode_frame(line: bytes) -> Frame:
    """Decode one frame line (client side). Raises ``msgspec.ValidationError`` for a
    frame type or field this side does not know, ``msgspec.DecodeError`` for a line
    that is not JSON."""
    return cast(Frame, _decoder.decode(line))


class _TypeOnly(msgspec.Struct):
    type: str = ""


_type_decoder = msgspec.json.Decoder(_TypeOnly)
_KNOWN_TYPES: Final = frozenset(cls.__struct_config__.tag for cls in Frame.__args__)


def skippable(line: bytes) -> bool:
    """Whether a frame line that did not decode may be skipped: an object whose
    ``type`` this side does not know (from a newer server). A known type with a field
    it cannot read, or anything that is not an object with a type, is malformed."""
    try:
        kind = _type_decoder.decode(line).type
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return bool(kind) and kind not in _KNOWN_TYPES


def encode_error(error: ProtocolError) -> bytes:
    return encode(ErrorFrame.of(error, error.request_id))


# -- the hot path -----------------------------------------------------------------
# §4.1 record, with seq, collection (bytes, a valid name needs no escaping), and the
# key and value as JSON. "seq" comes right after "type" so that the §4.2 change frame
# of an upsert is the stored record line with another prefix.
RECORD_LINE: Final = b'{"type":"record","seq":%d,"collection":"%s","key":%s,"value":%s}\n'
# §4.2 change frame of a delete.
DELETE_LINE: Final = b'{"type":"change","seq":%d,"collection":"%s","key":%s,"deleted":true}\n'
# §4.3.
HEARTBEAT_LINE: Final = b'{"type":"heartbeat","seq":%d}\n'
RECORD_PREFIX: Final = b'{"type":"record"'
CHANGE_PREFIX: Final = b'{"type":"change"'
_PREFIX_LEN: Final = len(RECORD_PREFIX)


def delete_line(seq: int, collection: str, key_json: bytes) -> bytes:
    """§4.2 ``change`` frame of a delete."""
    return DELETE_LINE % (seq, collection.encode(), key_json)


def change_line_from_record_line(line: bytes) -> bytes:
    """§4.2 ``change`` frame of an upsert, from the §4.1 ``record`` frame that holds it."""
    return CHANGE_PREFIX + line[_PREFIX_LEN:]


def encode_heartbeat(seq: int) -> bytes:
    return HEARTBEAT_LINE % seq
