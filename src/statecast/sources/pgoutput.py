"""A decoder for PostgreSQL's ``pgoutput`` logical replication messages, protocol version 1.

statecast follows a PostgreSQL database through logical replication with the built-in
``pgoutput`` output plugin (the one PostgreSQL's own subscribers use, so nothing has to be
installed on the server).  Each ``XLogData`` payload that the walsender streams is one
message; :func:`decode` turns its bytes into a frozen dataclass.

Why hand-written: there is no maintained Python library that decodes ``pgoutput`` (psycopg2
and psycopg 3 speak the replication protocol but hand back the plugin's raw bytes), and the
format is small, fixed and documented.  This module is pure: standard-library ``struct`` only,
no I/O and no state.  Relation messages describe the columns of the tuples that follow; keeping
them (per relation id) is the caller's job.

Reference: the PostgreSQL manual, chapter "Frontend/Backend Protocol", section "Logical
Replication Message Formats" (and "Streaming Replication Protocol" for the options
``proto_version`` and ``publication_names``).  Only protocol version 1 is decoded, the version
statecast requests: Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate and
the optional logical decoding Message (sent on ``messages 'true'``, PostgreSQL 14+).  The
streaming and two-phase messages of versions 2 and 3 are rejected with :class:`PgOutputError`,
as is any truncated, overlong or unknown input -- never ``IndexError`` or ``struct.error``.

Tuple column values (``TupleData``) are decoded to:

* ``None`` -- kind ``'n'``, SQL NULL;
* :data:`UNCHANGED` -- kind ``'u'``, an unchanged TOASTed value that the server did not send
  (the previous value stands);
* ``str`` -- kind ``'t'``, the type's text output, UTF-8 (the source connects with
  ``client_encoding=UTF8``; see :mod:`statecast.sources.pgtypes` for converting it);
* ``bytes`` -- kind ``'b'``, the type's binary output (only with the ``binary`` option, not in
  protocol version 1).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias

__all__ = [
    "PG_EPOCH",
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "EncodingError",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "PgOutputError",
    "Relation",
    "Toast",
    "Truncate",
    "TupleValue",
    "Type",
    "Update",
    "decode",
    "format_lsn",
    "parse_lsn",
    "pg_timestamp",
]

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""PostgreSQL's timestamp epoch: commit timestamps count microseconds from it."""


class PgOutputError(ValueError):
    """The bytes are not a well-formed pgoutput protocol version 1 message."""


class EncodingError(PgOutputError):
    """A column's text is not UTF-8 (a ``SQL_ASCII`` database holds any bytes)."""


class Toast(enum.Enum):
    """The marker type of :data:`UNCHANGED`."""

    UNCHANGED = "u"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Toast.UNCHANGED
"""Column kind ``'u'``: an unchanged TOASTed value, not sent; the old value still holds."""

TupleValue: TypeAlias = str | bytes | Literal[Toast.UNCHANGED] | None
"""One column of a ``TupleData``: text (``'t'``), binary (``'b'``), NULL or UNCHANGED."""


def pg_timestamp(micros: int) -> datetime:
    """A PostgreSQL ``TimestampTz`` (microseconds since 2000-01-01 UTC) as an aware datetime.

    Raises ``OverflowError`` outside ``datetime``'s range (years 1..9999).
    """
    return PG_EPOCH + timedelta(microseconds=micros)


def format_lsn(lsn: int) -> str:
    """An LSN in PostgreSQL's notation: ``16/B374D848``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """The inverse of :func:`format_lsn`; raises ``ValueError`` on a malformed LSN."""
    high, sep, low = text.partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise ValueError(f"not an LSN: {text!r}")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise ValueError(f"not an LSN: {text!r}") from None


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """``'B'``: a transaction starts; every change up to the matching Commit belongs to it."""

    final_lsn: int
    """The LSN of the transaction's commit record."""
    commit_ts: int
    """Commit time, microseconds since 2000-01-01 UTC (see :attr:`commit_time`)."""
    xid: int

    @property
    def commit_time(self) -> datetime:
        return pg_timestamp(self.commit_ts)


@dataclass(frozen=True, slots=True)
class Commit:
    """``'C'``: the transaction begun by the last Begin commits."""

    flags: int
    """Currently unused (0)."""
    commit_lsn: int
    """The LSN of the commit record (the Begin's ``final_lsn``)."""
    end_lsn: int
    """The LSN just past the commit record: what to confirm as flushed once applied."""
    commit_ts: int

    @property
    def commit_time(self) -> datetime:
        return pg_timestamp(self.commit_ts)


@dataclass(frozen=True, slots=True)
class Origin:
    """``'O'``: the transaction was replicated from elsewhere (a replication origin is set)."""

    commit_lsn: int
    """The LSN of the commit on the origin server."""
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a :class:`Relation` (generated columns are not sent)."""

    flags: int
    """Bit 1: the column is part of the replica identity key."""
    name: str
    type_oid: int
    type_modifier: int
    """The ``atttypmod`` (e.g. ``varchar(n)``: n + 4), or -1."""

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """``'R'``: the shape of a table, sent before its first change and again after DDL.

    Tuples of later Insert/Update/Delete messages for ``relation_id`` have one value per column,
    in this order.
    """

    relation_id: int
    namespace: str
    """The schema; empty for ``pg_catalog``."""
    name: str
    replica_identity: str
    """``relreplident``: ``'d'`` default (primary key), ``'n'`` nothing, ``'f'`` full row,
    ``'i'`` a chosen index."""
    columns: tuple[Column, ...]

    @property
    def key_columns(self) -> tuple[Column, ...]:
        return tuple(column for column in self.columns if column.is_key)


@dataclass(frozen=True, slots=True)
class Type:
    """``'Y'``: a non-built-in data type used by a column of a following Relation."""

    type_oid: int
    namespace: str
    """The schema; empty for ``pg_catalog``."""
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``'I'``: a row was inserted."""

    relation_id: int
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """``'U'``: a row was updated.

    ``old`` is sent only when the replica identity changed (kind ``'K'``: the old key columns,
    the others NULL) or the identity is FULL (kind ``'O'``: the whole old row); otherwise the
    key is unchanged and ``old`` and ``old_kind`` are ``None``.  In ``new``, an unchanged
    TOASTed column is :data:`UNCHANGED`.
    """

    relation_id: int
    old_kind: Literal["K", "O"] | None
    old: tuple[TupleValue, ...] | None
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """``'D'``: a row was deleted; ``old`` holds its key (``'K'``) or whole row (``'O'``)."""

    relation_id: int
    old_kind: Literal["K", "O"]
    old: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    """``'T'``: the tables were truncated (one statement may name several)."""

    options: int
    """Bit 1: CASCADE; bit 2: RESTART IDENTITY."""
    relation_ids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """``'M'``: a ``pg_logical_emit_message()`` (sent only with the option ``messages``)."""

    flags: int
    """Bit 1: transactional (sent inside its transaction's Begin/Commit)."""
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


Message: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)
"""Any decoded pgoutput protocol version 1 message."""


# -- decoding ------------------------------------------------------------------------------------

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")

_LATER_VERSIONS: Final = {
    ord("S"): "Stream Start",
    ord("E"): "Stream Stop",
    ord("c"): "Stream Commit",
    ord("A"): "Stream Abort",
    ord("b"): "Begin Prepare",
    ord("P"): "Prepare",
    ord("K"): "Commit Prepared",
    ord("r"): "Rollback Prepared",
    ord("p"): "Stream Prepare",
}


class _Reader:
    """A cursor over one message; every read checks the length first."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 1  # past the message type byte
        self.what = what

    def _need(self, n: int, field: str) -> None:
        if self.pos + n > len(self.data):
            raise self._truncated(field, n, self.pos)

    def _truncated(self, field: str, n: int, pos: int) -> PgOutputError:
        return PgOutputError(
            f"{self.what} message truncated: {field} needs {n} bytes at offset {pos}, "
            f"{len(self.data) - pos} left"
        )

    def unpack(self, fmt: struct.Struct, field: str) -> tuple[int, ...]:
        self._need(fmt.size, field)
        values: tuple[int, ...] = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def u8(self, field: str) -> int:
        return self.unpack(_U8, field)[0]

    def u16(self, field: str) -> int:
        return self.unpack(_U16, field)[0]

    def u32(self, field: str) -> int:
        return self.unpack(_U32, field)[0]

    def i32(self, field: str) -> int:
        return self.unpack(_I32, field)[0]

    def u64(self, field: str) -> int:
        return self.unpack(_U64, field)[0]

    def raw(self, n: int, field: str) -> bytes:
        if n < 0:
            raise PgOutputError(f"{self.what} message: negative length {n} for {field}")
        self._need(n, field)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def text(self, raw: bytes, field: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PgOutputError(f"{self.what} message: {field} is not UTF-8: {exc}") from None

    def string(self, field: str) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise PgOutputError(
                f"{self.what} message truncated: {field} (a NUL-terminated string) at offset "
                f"{self.pos} has no terminator"
            )
        raw = self.data[self.pos : end]
        self.pos = end + 1
        return self.text(raw, field)

    def tuple_data(self, field: str) -> tuple[TupleValue, ...]:
        count = self.u16(f"{field} column count")
        data, pos, size = self.data, self.pos, len(self.data)
        # Every column takes at least its kind byte: reject absurd counts before looping.
        if pos + count > size:
            raise self._truncated(f"{field} ({count} columns)", count, pos)
        values: list[TupleValue] = []
        append = values.append
        for index in range(count):  # the hot loop: error messages are built only on error
            if pos >= size:
                raise self._truncated(f"{field} column {index} kind", 1, pos)
            kind = data[pos]
            pos += 1
            if kind in (0x74, 0x62):  # 't' text, 'b' binary: Int32 length, then bytes
                if pos + 4 > size:
                    raise self._truncated(f"{field} column {index} length", 4, pos)
                (length,) = _I32.unpack_from(data, pos)
                pos += 4
                if length < 0:
                    raise PgOutputError(
                        f"{self.what} message: negative length {length} for {field} column {index}"
                    )
                if pos + length > size:
                    raise self._truncated(f"{field} column {index}", length, pos)
                chunk = data[pos : pos + length]
                pos += length
                if kind == 0x62:
                    append(chunk)
                    continue
                try:
                    append(chunk.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise EncodingError(
                        f"{self.what} message: {field} column {index} is not UTF-8: {exc}"
                    ) from None
            elif kind == 0x6E:  # 'n'
                append(None)
            elif kind == 0x75:  # 'u'
                append(UNCHANGED)
            else:
                raise PgOutputError(
                    f"{self.what} message: {field} column {index} has unknown kind "
                    f"{_show(kind)} (expected 'n', 'u', 't' or 'b')"
                )
        self.pos = pos
        return tuple(values)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise PgOutputError(
                f"{self.what} message has {len(self.data) - self.pos} unexpected trailing "
                f"bytes at offset {self.pos}"
            )


def _show(byte: int) -> str:
    char = chr(byte)
    return repr(char) if char.isprintable() and byte < 0x80 else f"0x{byte:02x}"


def _begin(r: _Reader) -> Begin:
    final_lsn, commit_ts, xid = r.unpack(_BEGIN, "final LSN, commit timestamp and xid")
    return Begin(final_lsn=final_lsn, commit_ts=commit_ts, xid=xid)


def _commit(r: _Reader) -> Commit:
    flags, commit_lsn, end_lsn, commit_ts = r.unpack(_COMMIT, "flags, LSNs and commit timestamp")
    return Commit(flags=flags, commit_lsn=commit_lsn, end_lsn=end_lsn, commit_ts=commit_ts)


def _origin(r: _Reader) -> Origin:
    return Origin(commit_lsn=r.u64("origin commit LSN"), name=r.string("origin name"))


def _relation(r: _Reader) -> Relation:
    relation_id = r.u32("relation id")
    namespace = r.string("namespace")
    name = r.string("relation name")
    replica_identity = chr(r.u8("replica identity"))
    count = r.u16("column count")
    r._need(count, f"columns ({count})")  # each takes at least one byte
    columns = []
    for index in range(count):
        flags = r.u8(f"column {index} flags")
        column_name = r.string(f"column {index} name")
        type_oid = r.u32(f"column {index} type OID")
        type_modifier = r.i32(f"column {index} type modifier")
        columns.append(Column(flags, column_name, type_oid, type_modifier))
    return Relation(relation_id, namespace, name, replica_identity, tuple(columns))


def _type(r: _Reader) -> Type:
    type_oid = r.u32("type OID")
    return Type(type_oid=type_oid, namespace=r.string("namespace"), name=r.string("type name"))


def _insert(r: _Reader) -> Insert:
    relation_id = r.u32("relation id")
    marker = r.u8("tuple marker")
    if marker != 0x4E:  # 'N'
        raise PgOutputError(
            f"Insert message: expected 'N' before the new tuple, got {_show(marker)}"
        )
    return Insert(relation_id=relation_id, new=r.tuple_data("new tuple"))


def _update(r: _Reader) -> Update:
    relation_id = r.u32("relation id")
    marker = r.u8("tuple marker")
    old_kind: Literal["K", "O"] | None = None
    old = None
    if marker in (0x4B, 0x4F):  # 'K', 'O'
        old_kind = "K" if marker == 0x4B else "O"
        old = r.tuple_data("old tuple")
        marker = r.u8("new tuple marker")
    if marker != 0x4E:  # 'N'
        raise PgOutputError(
            f"Update message: expected 'K', 'O' or 'N' tuple marker, got {_show(marker)}"
            if old_kind is None
            else f"Update message: expected 'N' after the old tuple, got {_show(marker)}"
        )
    return Update(
        relation_id=relation_id, old_kind=old_kind, old=old, new=r.tuple_data("new tuple")
    )


def _delete(r: _Reader) -> Delete:
    relation_id = r.u32("relation id")
    marker = r.u8("tuple marker")
    if marker not in (0x4B, 0x4F):  # 'K', 'O'
        raise PgOutputError(
            f"Delete message: expected 'K' or 'O' tuple marker, got {_show(marker)}"
        )
    old_kind: Literal["K", "O"] = "K" if marker == 0x4B else "O"
    return Delete(relation_id=relation_id, old_kind=old_kind, old=r.tuple_data("old tuple"))


def _truncate(r: _Reader) -> Truncate:
    count = r.u32("relation count")
    options = r.u8("options")
    r._need(4 * count, f"relation ids ({count})")
    ids = struct.unpack_from(f">{count}I", r.data, r.pos)
    r.pos += 4 * count
    return Truncate(options=options, relation_ids=ids)


def _message(r: _Reader) -> LogicalMessage:
    flags = r.u8("flags")
    lsn = r.u64("LSN")
    prefix = r.string("prefix")
    length = r.i32("content length")
    return LogicalMessage(flags=flags, lsn=lsn, prefix=prefix, content=r.raw(length, "content"))


_DECODERS: Final[dict[int, tuple[str, Callable[[_Reader], Message]]]] = {
    ord("B"): ("Begin", _begin),
    ord("C"): ("Commit", _commit),
    ord("O"): ("Origin", _origin),
    ord("R"): ("Relation", _relation),
    ord("Y"): ("Type", _type),
    ord("I"): ("Insert", _insert),
    ord("U"): ("Update", _update),
    ord("D"): ("Delete", _delete),
    ord("T"): ("Truncate", _truncate),
    ord("M"): ("Message", _message),
}


def decode(message: bytes | bytearray | memoryview) -> Message:
    """Decode one pgoutput protocol version 1 message (one ``XLogData`` payload).

    Raises :class:`PgOutputError` if the message is empty, truncated, has trailing bytes, is of
    an unknown type or of a type that protocol version 1 does not send.
    """
    if not isinstance(message, bytes | bytearray | memoryview):
        raise PgOutputError(f"expected bytes, got {type(message).__name__}")
    data = bytes(message)
    if not data:
        raise PgOutputError("empty message")
    entry = _DECODERS.get(data[0])
    if entry is None:
        later = _LATER_VERSIONS.get(data[0])
        if later is not None:
            raise PgOutputError(
                f"{later} message ({_show(data[0])}) is not part of protocol version 1 "
                "(request proto_version '1' and no streaming or two_phase)"
            )
        raise PgOutputError(f"unknown message type {_show(data[0])}")
    what, decoder = entry
    reader = _Reader(data, what)
    result = decoder(reader)
    reader.end()
    return result
