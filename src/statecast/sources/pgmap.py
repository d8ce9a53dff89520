"""PostgreSQL rows as statecast changes: collection names, keys and values. Pure, no I/O.

The mapping (also in ``docs/postgres.md``):

* **collection**: the table's name; outside the ``public`` schema, ``schema.table``
  (``orders``, ``risk.limits``). It must be a valid collection name (§9: 1 to 128 of
  ``A-Z a-z 0-9 _ . -``); the source refuses at start a table whose name is not.
* **key**: the primary key. One column: the column's value as a string: text as it is
  (``ORD-1``), anything else as the JSON text of its converted value (``42``, ``true``,
  ``"12.50"`` is ``12.50``, a timestamptz ``2024-01-02T03:04:05+00:00``). Several columns: the
  compact JSON array of their converted values, in the key's column order
  (``[1,2]``, ``["ACC-1","AAPL"]``). Within one table every key has the same shape, so two
  rows never share a key, and a client can build a key from a row's fields.
* **value**: the row as a JSON object, one member per column in the table's order, each
  converted by :mod:`statecast.sources.pgtypes` (numeric as an exact string unless
  ``numeric_as_number``).

Values come as each type's text output: from ``COPY ... TO STDOUT`` (text format) for the
initial load and from ``pgoutput`` tuples while streaming, both printed by the same output
functions under :data:`~statecast.sources.pgtypes.SESSION_SETTINGS`, so a row maps to the same
change whichever way it came.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec

from statecast.core.protocol import COLLECTION_RE, MAX_KEY_LENGTH, PreparedChange
from statecast.core.values import MAX_DEPTH, InvalidValue, canonical_value
from statecast.sources.pgoutput import UNCHANGED, TupleValue
from statecast.sources.pgtypes import ARRAY_ELEMENT_OIDS, Oid, PgTypeError, convert

__all__ = [
    "RowError",
    "Shape",
    "collection_name",
    "converter",
    "copy_fields",
    "same_form",
]

_encode = msgspec.json.encode
_decode = msgspec.json.decode


class RowError(ValueError):
    """A row that cannot be a statecast record (its key or value breaks §9)."""


def collection_name(schema: str, table: str) -> str:
    """``table`` in ``public``, else ``schema.table`` (not checked: see :data:`COLLECTION_RE`)."""
    return table if schema == "public" else f"{schema}.{table}"


def valid_collection(name: str) -> bool:
    return COLLECTION_RE.fullmatch(name) is not None


# -- converters ------------------------------------------------------------------------------

_Converter = Callable[[str], object] | None  # None: the text as it is
_BOOLS: Final = {"t": True, "f": False}
_TEXT_LIKE: Final = frozenset(
    {Oid.TEXT, Oid.VARCHAR, Oid.BPCHAR, Oid.NAME, Oid.CHAR, Oid.UUID, Oid.INTERVAL}
)
_INTEGERS: Final = frozenset({Oid.INT2, Oid.INT4, Oid.INT8, Oid.OID})
_NESTING: Final = frozenset({Oid.JSON, Oid.JSONB})


def _bool(text: str) -> object:
    try:
        return _BOOLS[text]
    except KeyError:
        raise PgTypeError(f"not a PostgreSQL bool text value: {text!r}") from None


_TIMESTAMPTZ_UTC = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?[+-]\d\d", re.ASCII)
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?", re.ASCII)


def _timestamptz(text: str) -> object:
    """pgtypes' timestamptz conversion, its common case (a whole-hour offset) inline."""
    if _TIMESTAMPTZ_UTC.fullmatch(text) is not None:
        return f"{text[:10]}T{text[11:]}:00"
    return convert(Oid.TIMESTAMPTZ, text)


def _timestamp(text: str) -> object:
    if _TIMESTAMP.fullmatch(text) is not None:
        return f"{text[:10]}T{text[11:]}"
    return convert(Oid.TIMESTAMP, text)


def converter(type_oid: int, numeric_as_number: bool) -> _Converter:
    """The function that turns a column's text into its JSON value (``None``: as it is).

    The same as :func:`statecast.sources.pgtypes.convert`, with the common types made
    cheap (this runs once per column of every row).
    """
    if type_oid in _TEXT_LIKE or (type_oid == Oid.NUMERIC and not numeric_as_number):
        return None
    if type_oid in _INTEGERS:
        return int
    if type_oid == Oid.BOOL:
        return _bool
    if type_oid == Oid.TIMESTAMPTZ:
        return _timestamptz
    if type_oid == Oid.TIMESTAMP:
        return _timestamp
    known = type_oid in ARRAY_ELEMENT_OIDS or type_oid in _KNOWN
    if not known:
        return None  # enums, citext, ranges, ...: the text
    return functools.partial(_convert, type_oid, numeric_as_number)


def _numeric_key(text: str) -> object:
    """A numeric primary key column's value with ``--numeric-as-number``: an integer as
    a number, anything else as its exact text (see :class:`Shape`)."""
    value = convert(Oid.NUMERIC, text, numeric_as_number=True)
    return value if type(value) is int else text


def _convert(type_oid: int, numeric_as_number: bool, text: str) -> object:
    return convert(type_oid, text, numeric_as_number=numeric_as_number)


_KNOWN: Final = frozenset(
    {
        Oid.FLOAT4,
        Oid.FLOAT8,
        Oid.NUMERIC,
        Oid.TIMESTAMPTZ,
        Oid.TIMESTAMP,
        Oid.DATE,
        Oid.TIME,
        Oid.TIMETZ,
        Oid.JSON,
        Oid.JSONB,
        Oid.BYTEA,
    }
)


_SAME_TEXT: Final = (
    frozenset({Oid.INT2, Oid.INT4, Oid.INT8}),
    frozenset({Oid.TEXT, Oid.VARCHAR}),
)
_PRECISE: Final = frozenset({Oid.TIMESTAMP, Oid.TIMESTAMPTZ, Oid.TIME, Oid.TIMETZ})


def same_form(was: tuple[int, int], now: tuple[int, int]) -> bool:
    """Whether a column whose type changes from ``was`` to ``now`` ((base type OID, type
    modifier) each) keeps every value it holds as the same JSON: ``ALTER TABLE ... ALTER
    COLUMN ... TYPE`` rewrites the rows, and statecast does not see them again.

    True for the same type; integers of any width; ``text`` and ``varchar(n)``; a
    ``numeric`` that keeps its scale (or loses its constraint); a time type whose
    precision grows; arrays of such. Anything else (``int`` to ``numeric``, a shorter
    ``bpchar``, a numeric scale, a new precision) may print a value otherwise.
    """
    (old, old_mod), (new, new_mod) = was, now
    if old == new and old_mod == new_mod:
        return True
    old_element, new_element = ARRAY_ELEMENT_OIDS.get(old), ARRAY_ELEMENT_OIDS.get(new)
    if old_element is not None or new_element is not None:
        if old_element is None or new_element is None:
            return False
        return same_form((old_element, old_mod), (new_element, new_mod))
    if any(old in group and new in group for group in _SAME_TEXT):
        return True
    if old != new:
        return False
    if old == Oid.NUMERIC:  # typmod: ((precision << 16) | scale) + 4
        return new_mod == -1 or (old_mod != -1 and (old_mod - 4) & 0xFFFF == (new_mod - 4) & 0xFFFF)
    if old in _PRECISE:  # typmod: the fractional digits
        return new_mod == -1 or (old_mod != -1 and new_mod >= old_mod)
    return False


def may_nest(type_oid: int) -> bool:
    """Whether a value of this type can be a JSON array or object (arrays, json)."""
    return type_oid in _NESTING or type_oid in ARRAY_ELEMENT_OIDS


# -- COPY text format --------------------------------------------------------------------------

_ESCAPES: Final = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)", re.DOTALL)


def _unescape_one(match: re.Match[str]) -> str:
    seq = match.group(1)
    if seq in _ESCAPES:
        return _ESCAPES[seq]
    if seq[0] == "x" and len(seq) > 1:
        return chr(int(seq[1:], 16))
    if seq[0].isdigit() and seq[0] < "8":
        return chr(int(seq, 8))
    return seq  # \\ and any other character stand for themselves


def _unescape(field: str) -> str | None:
    if field == "\\N":
        return None
    if "\\" not in field:
        return field
    return _ESCAPE.sub(_unescape_one, field)


def copy_fields(line: bytes) -> list[str | None]:
    """One row of ``COPY ... TO STDOUT`` (text format, UTF-8): its fields, ``None`` for NULL.

    Fields are separated by tabs; a backslash escapes tab, newline, carriage return,
    backslash and the other control characters, and ``\\N`` is NULL.
    """
    text = line.decode("utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    if "\\" not in text:
        return text.split("\t")  # type: ignore[return-value]
    return [_unescape(f) for f in text.split("\t")]


# -- one table's shape -------------------------------------------------------------------------


class Shape:
    """How the rows of one table (as a pgoutput Relation, or the catalog, describes it)
    become changes: the column names, their converters and the key's columns."""

    __slots__ = (
        "collection",
        "converters",
        "former",
        "key_index",
        "label",
        "names",
        "nests",
        "row",
        "single_key",
        "to_convert",
    )

    def __init__(
        self,
        collection: str,
        label: str,
        columns: Sequence[tuple[str, int]],
        key: Sequence[str],
        *,
        numeric_as_number: bool = False,
        former: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """``columns``: (name, type OID) in the table's order (domains resolved to their
        base types); ``key``: the primary key's column names, in the key's order;
        ``former``: the earlier names of renamed columns, latest first (records not changed
        since the rename hold the column under one of them).
        Raises ``ValueError`` if a key column is not among ``columns``."""
        self.collection = collection
        self.former: Mapping[str, tuple[str, ...]] = former or {}
        self.label = label  # for messages: 'the PostgreSQL table public.orders'
        self.names: tuple[str, ...] = tuple(name for name, _ in columns)
        # A numeric key column is never a float, even with numeric_as_number: two keys
        # that a float cannot tell apart (0.1 and 0.1000000000000000001) are two rows.
        # It stays its exact text (an integer one a number, which is exact too).
        keyed = set(key)
        self.converters: tuple[_Converter, ...] = tuple(
            _numeric_key
            if numeric_as_number and oid == Oid.NUMERIC and name in keyed
            else converter(oid, numeric_as_number)
            for name, oid in columns
        )
        # The columns whose text is converted (the others are kept as they are).
        self.to_convert: tuple[tuple[int, Callable[[str], object]], ...] = tuple(
            (i, conv) for i, conv in enumerate(self.converters) if conv is not None
        )
        self.nests = any(may_nest(oid) for _, oid in columns)
        position = {name: i for i, name in enumerate(self.names)}
        missing = [name for name in key if name not in position]
        if missing:
            raise ValueError(f"key column(s) {', '.join(missing)} not among the columns")
        if not key:
            raise ValueError("no key columns")
        self.key_index: tuple[int, ...] = tuple(position[name] for name in key)
        self.single_key = len(self.key_index) == 1
        # A row as a Struct encodes about twice as fast as a dict; its fields are f0, f1,
        # ... renamed to the column names (which need not be identifiers).
        self.row: Callable[..., object] = msgspec.defstruct(
            "Row",
            [(f"f{i}", object) for i in range(len(self.names))],
            rename={f"f{i}": name for i, name in enumerate(self.names)},
            gc=False,
        )

    def __repr__(self) -> str:
        return f"<Shape {self.collection} {self.names} key={self.key_index}>"

    # -- pieces ----------------------------------------------------------------------------

    def values(self, texts: Sequence[TupleValue]) -> list[object]:
        """Every column converted. ``texts`` holds text or None (SQL NULL) only: the
        callers resolve UNCHANGED columns first (binary values are never asked for)."""
        values: list[object] = list(texts)
        if len(values) != len(self.names):
            raise RowError(f"{len(values)} columns where {len(self.names)} were described")
        index = -1
        try:
            for index, conv in self.to_convert:
                text = values[index]
                if text is not None:
                    values[index] = conv(text)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:  # PgTypeError is a ValueError
            raise RowError(f"column {self.names[index]}: {exc}") from None
        return values

    def key_of(self, values: Sequence[object]) -> str:
        """The key of a row from its converted values (at least the key's columns)."""
        if self.single_key:
            value = values[self.key_index[0]]
            key = value if type(value) is str else _encode(value).decode()
        else:
            key = _encode([values[i] for i in self.key_index]).decode()
        if not key or len(key) > MAX_KEY_LENGTH:
            raise RowError(
                f"a primary key of {len(key)} characters: statecast keys have 1 to {MAX_KEY_LENGTH}"
            )
        return key

    def key(self, texts: Sequence[TupleValue]) -> str:
        """The key of a row given as texts (the other columns may be anything)."""
        values: list[object] = list(texts)
        for i in self.key_index:
            text = values[i]
            conv = self.converters[i]
            if type(text) is not str:
                raise RowError(f"column {self.names[i]}: no key value ({text!r})")
            if conv is not None:
                try:
                    values[i] = conv(text)
                except ValueError as exc:
                    raise RowError(f"column {self.names[i]}: {exc}") from None
        return self.key_of(values)

    def encode_value(self, values: Sequence[object]) -> bytes:
        """The value of a row as canonical JSON (an object in column order)."""
        raw = _encode(self.row(*values))
        if self.nests and raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
            try:
                raw = canonical_value(raw)
            except InvalidValue as exc:
                raise RowError(f"its value cannot be stored: {exc}") from None
        return raw

    # -- whole changes -------------------------------------------------------------------------

    def upsert(self, texts: Sequence[TupleValue]) -> PreparedChange:
        """The change that writes a whole row (no column UNCHANGED)."""
        values = self.values(texts)
        key = self.key_of(values)
        return (self.collection, key, _encode(key), self.encode_value(values))

    def delete(self, texts: Sequence[TupleValue]) -> PreparedChange:
        """The change that deletes the row with this key (only the key columns are read)."""
        key = self.key(texts)
        return (self.collection, key, _encode(key), None)

    def partial(self, texts: Sequence[TupleValue]) -> dict[str, object]:
        """The columns of a row that are known (not UNCHANGED), converted, by name."""
        known = [(i, t) for i, t in enumerate(texts) if t is not UNCHANGED]
        out: dict[str, object] = {}
        for i, text in known:
            conv = self.converters[i]
            if text is None or conv is None:
                out[self.names[i]] = text
                continue
            try:
                out[self.names[i]] = conv(text)  # type: ignore[arg-type]
            except (ValueError, TypeError) as exc:
                raise RowError(f"column {self.names[i]}: {exc}") from None
        return out

    def complete(self, known: dict[str, object], previous: object) -> tuple[bytes, list[str]]:
        """A row's value from its known columns and its previous value (a decoded JSON
        object), under the column's name or, for a renamed column, one it had before.
        The columns found in neither are returned, and the value is then ``b""``: the
        caller must not use it (docs/postgres.md, "Unchanged TOASTed columns")."""
        missing: list[str] = []
        values: list[object] = []
        old = previous if isinstance(previous, dict) else {}
        for name in self.names:
            if name in known:
                values.append(known[name])
                continue
            for alias in (name, *self.former.get(name, ())):
                if alias in old:
                    values.append(old[alias])
                    break
            else:
                missing.append(name)
        if missing:
            return b"", missing
        return self.encode_value(values), missing


def decode_value(raw: bytes | None) -> object:
    """A stored value (JSON text) as Python objects; ``None`` for none."""
    return None if raw is None else _decode(raw)
