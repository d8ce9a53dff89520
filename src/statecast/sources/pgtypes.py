"""PostgreSQL text-format column values to JSON-able Python values, by type OID.

pgoutput (protocol version 1) sends every column as the text its type's output function
prints in the walsender's session, so the session settings decide the format.  The source
sets :data:`SESSION_SETTINGS` on its connections (``options=`` :func:`session_options`); this
module assumes them and raises :class:`PgTypeError` on text it cannot read under them (e.g. a
non-ISO ``DateStyle``).  The mapping (also in ``docs/postgres.md``):

=====================================  =========================================================
PostgreSQL type                        JSON value
=====================================  =========================================================
NULL (any type)                        ``None``
int2, int4, int8, oid                  int
float4, float8                         float; ``NaN``/``Infinity``/``-Infinity`` as those
                                       strings (JSON has no such numbers)
numeric                                str, exact (``"12.50"``); with ``numeric_as_number=True``
                                       int (no fraction) or float, ``NaN``/``Infinity`` as str
bool                                   bool
text, varchar, bpchar, name, "char",   str, as is
uuid, interval, money, inet, ...,
unknown OIDs (enums, citext, ...)
timestamptz                            ISO 8601 with offset: ``2024-01-02T03:04:05.123+00:00``
                                       (UTC, given ``TimeZone=UTC``); fraction as PostgreSQL
                                       printed it, no trailing zeros
timestamp                              ISO 8601 without offset: ``2024-01-02T03:04:05.123``
date                                   ``YYYY-MM-DD``
time / timetz                          ``HH:MM:SS[.ffffff]`` / plus ``+HH:MM``
infinity, -infinity, BC dates          the PostgreSQL text, as is (``"infinity"``,
                                       ``"0044-03-15 00:00:00+00 BC"``)
json, jsonb                            the decoded JSON (objects, lists, numbers...); a number
                                       too large for a float (``1e400`` in json) stays a string
bytea                                  base64 str of the bytes (hex or escape output format)
arrays of the above (``int4[]``,       lists (nested for multi-dimensional arrays) of the
``text[]``, ``jsonb[]`` ...)           converted elements; lower bounds are dropped (arrays of
                                       enums and domains: the source reads them as ``text[]``
                                       or the base type's array, see :data:`ARRAY_OIDS`)
=====================================  =========================================================
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Final

import msgspec

__all__ = [
    "ARRAY_ELEMENT_OIDS",
    "ARRAY_OIDS",
    "SESSION_SETTINGS",
    "Oid",
    "PgTypeError",
    "array_element_oid",
    "convert",
    "convert_array",
    "parse_array",
    "session_options",
]


class PgTypeError(ValueError):
    """A column's text is not what its type prints under :data:`SESSION_SETTINGS`."""


SESSION_SETTINGS: Final[Mapping[str, str]] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "bytea_output": "hex",
    "extra_float_digits": "1",
    "client_encoding": "UTF8",
}
"""The session settings the conversions assume (the source sets them on every connection)."""


def session_options(**overrides: str) -> str:
    """:data:`SESSION_SETTINGS` as a libpq ``options`` value: ``-c TimeZone=UTC -c ...``;
    ``overrides`` replace some (``client_encoding="SQL_ASCII"``)."""
    settings = {**SESSION_SETTINGS, **overrides}
    return " ".join(f"-c {name}={value}" for name, value in settings.items())


class Oid:
    """Built-in type OIDs (``pg_type.oid``; fixed across PostgreSQL versions)."""

    BOOL = 16
    BYTEA = 17
    CHAR = 18
    NAME = 19
    INT8 = 20
    INT2 = 21
    INT4 = 23
    TEXT = 25
    OID = 26
    JSON = 114
    XML = 142
    FLOAT4 = 700
    FLOAT8 = 701
    MONEY = 790
    INET = 869
    CIDR = 650
    MACADDR = 829
    BPCHAR = 1042
    VARCHAR = 1043
    DATE = 1082
    TIME = 1083
    TIMESTAMP = 1114
    TIMESTAMPTZ = 1184
    INTERVAL = 1186
    TIMETZ = 1266
    BIT = 1560
    VARBIT = 1562
    NUMERIC = 1700
    UUID = 2950
    JSONB = 3802


ARRAY_ELEMENT_OIDS: Final[Mapping[int, int]] = {
    1000: Oid.BOOL,
    1001: Oid.BYTEA,
    1002: Oid.CHAR,
    1003: Oid.NAME,
    1005: Oid.INT2,
    1007: Oid.INT4,
    1009: Oid.TEXT,
    1014: Oid.BPCHAR,
    1015: Oid.VARCHAR,
    1016: Oid.INT8,
    1021: Oid.FLOAT4,
    1022: Oid.FLOAT8,
    1028: Oid.OID,
    1115: Oid.TIMESTAMP,
    1182: Oid.DATE,
    1183: Oid.TIME,
    1185: Oid.TIMESTAMPTZ,
    1187: Oid.INTERVAL,
    1231: Oid.NUMERIC,
    1270: Oid.TIMETZ,
    2951: Oid.UUID,
    199: Oid.JSON,
    3807: Oid.JSONB,
    143: Oid.XML,
    791: Oid.MONEY,
    1041: Oid.INET,
    651: Oid.CIDR,
    1040: Oid.MACADDR,
    1561: Oid.BIT,
    1563: Oid.VARBIT,
}
"""Built-in array type OID -> element type OID (all use ``,`` as the element delimiter)."""

ARRAY_OIDS: Final[Mapping[int, int]] = {
    element: array for array, element in ARRAY_ELEMENT_OIDS.items()
}
"""Element type OID -> its built-in array type OID (the inverse of :data:`ARRAY_ELEMENT_OIDS`)."""


def array_element_oid(type_oid: int) -> int | None:
    """The element type of a built-in array type, or ``None`` if ``type_oid`` is not one."""
    return ARRAY_ELEMENT_OIDS.get(type_oid)


# -- scalars -----------------------------------------------------------------------------------

_SPECIAL_FLOATS: Final = frozenset({"NaN", "Infinity", "-Infinity"})
_INFINITIES: Final = frozenset({"infinity", "-infinity"})
_INTEGER = re.compile(r"[+-]?[0-9]+")
_OFFSET = r"(?P<sign>[+-])(?P<oh>\d\d)(?::(?P<om>\d\d))?(?::(?P<os>\d\d))?"
_TIME = r"(?P<time>\d\d:\d\d:\d\d(?:\.\d+)?)"
_DATE = r"(?P<date>\d{4,}-\d\d-\d\d)"
_TIMESTAMPTZ = re.compile(_DATE + " " + _TIME + _OFFSET, re.ASCII)
_TIMESTAMP = re.compile(_DATE + " " + _TIME, re.ASCII)
_DATE_ONLY = re.compile(_DATE, re.ASCII)
_TIME_ONLY = re.compile(_TIME, re.ASCII)
_TIMETZ = re.compile(_TIME + _OFFSET, re.ASCII)


def _error(type_name: str, text: str, hint: str = "") -> PgTypeError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return PgTypeError(f"not a PostgreSQL {type_name} text value: {shown!r}{hint}")


def _int(text: str, numeric_as_number: bool) -> object:
    if _INTEGER.fullmatch(text) is None:
        raise _error("integer", text)
    return int(text)


def _float(text: str, numeric_as_number: bool) -> object:
    if text in _SPECIAL_FLOATS:
        return text
    try:
        value = float(text)
    except ValueError:
        raise _error("float", text) from None
    if not math.isfinite(value):
        raise _error("float", text)
    return value


def _numeric(text: str, numeric_as_number: bool) -> object:
    if not numeric_as_number or text in _SPECIAL_FLOATS:
        return text
    if _INTEGER.fullmatch(text) is not None:
        try:
            return int(text)
        except ValueError:  # more digits than Python converts (4,300): keep it exact
            return text
    try:
        value = float(text)
    except ValueError:
        raise _error("numeric", text) from None
    if not math.isfinite(value):  # beyond float range: keep it exact
        return text
    return value


def _bool(text: str, numeric_as_number: bool) -> object:
    if text == "t":
        return True
    if text == "f":
        return False
    raise _error("bool", text)


def _text(text: str, numeric_as_number: bool) -> object:
    return text


def _offset(match: re.Match[str]) -> str:
    offset = f"{match['sign']}{match['oh']}:{match['om'] or '00'}"
    if match["os"] and match["os"] != "00":
        offset += f":{match['os']}"
    return offset


_DATESTYLE_HINT: Final = " (is the session DateStyle ISO?)"


def _timestamptz(text: str, numeric_as_number: bool) -> object:
    match = _TIMESTAMPTZ.fullmatch(text)
    if match is not None:
        return f"{match['date']}T{match['time']}{_offset(match)}"
    if text in _INFINITIES or (text.endswith(" BC") and _TIMESTAMPTZ.fullmatch(text[:-3])):
        return text
    raise _error("timestamptz", text, _DATESTYLE_HINT)


def _timestamp(text: str, numeric_as_number: bool) -> object:
    match = _TIMESTAMP.fullmatch(text)
    if match is not None:
        return f"{match['date']}T{match['time']}"
    if text in _INFINITIES or (text.endswith(" BC") and _TIMESTAMP.fullmatch(text[:-3])):
        return text
    raise _error("timestamp", text, _DATESTYLE_HINT)


def _date(text: str, numeric_as_number: bool) -> object:
    if _DATE_ONLY.fullmatch(text) or text in _INFINITIES:
        return text
    if text.endswith(" BC") and _DATE_ONLY.fullmatch(text[:-3]):
        return text
    raise _error("date", text, _DATESTYLE_HINT)


def _time(text: str, numeric_as_number: bool) -> object:
    if _TIME_ONLY.fullmatch(text) is None:
        raise _error("time", text)
    return text


def _timetz(text: str, numeric_as_number: bool) -> object:
    match = _TIMETZ.fullmatch(text)
    if match is None:
        raise _error("timetz", text)
    return f"{match['time']}{_offset(match)}"


def _keep_big_float(text: str) -> object:
    value = float(text)
    return value if math.isfinite(value) else text


def _json(text: str, numeric_as_number: bool) -> object:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        pass
    except RecursionError:  # jsonb nests up to about 1,000 levels, json without limit
        raise _error("json", text, " (nested too deeply to read)") from None
    # msgspec refuses numbers beyond float range (``1e400``, valid in ``json``): keep those
    # as strings rather than turn them into infinities JSON cannot carry.
    try:
        value = json.loads(text, parse_float=_keep_big_float)
    except RecursionError:
        raise _error("json", text, " (nested too deeply to read)") from None
    except ValueError:
        raise _error("json", text) from None
    try:  # ``json`` keeps "\ud800" as written, and json.loads takes a lone surrogate
        msgspec.json.encode(value)
    except UnicodeEncodeError:
        raise _error("json", text, " (a lone surrogate: not text a record can hold)") from None
    return value


def _bytea(text: str, numeric_as_number: bool) -> object:
    if text.startswith("\\x"):
        try:
            raw = bytes.fromhex(text[2:])
        except ValueError:
            raise _error("bytea", text) from None
    else:
        raw = _bytea_escape(text)
    return base64.b64encode(raw).decode("ascii")


def _bytea_escape(text: str) -> bytes:
    """``bytea_output = escape``: bytes as latin-1 characters, ``\\\\`` and ``\\ooo``."""
    out = bytearray()
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char != "\\":
            if ord(char) > 0xFF:
                raise _error("bytea", text)
            out.append(ord(char))
            pos += 1
        elif text.startswith("\\", pos + 1):
            out.append(0x5C)
            pos += 2
        elif _OCTAL_BYTE.fullmatch(text, pos + 1, pos + 4):
            out.append(int(text[pos + 1 : pos + 4], 8))
            pos += 4
        else:
            raise _error("bytea", text)
    return bytes(out)


_OCTAL_BYTE = re.compile(r"[0-3][0-7][0-7]")


_Converter = Callable[[str, bool], object]

_SCALARS: Final[Mapping[int, _Converter]] = {
    Oid.INT2: _int,
    Oid.INT4: _int,
    Oid.INT8: _int,
    Oid.OID: _int,
    Oid.FLOAT4: _float,
    Oid.FLOAT8: _float,
    Oid.NUMERIC: _numeric,
    Oid.BOOL: _bool,
    Oid.TEXT: _text,
    Oid.VARCHAR: _text,
    Oid.BPCHAR: _text,
    Oid.NAME: _text,
    Oid.CHAR: _text,
    Oid.UUID: _text,
    Oid.INTERVAL: _text,
    Oid.TIMESTAMPTZ: _timestamptz,
    Oid.TIMESTAMP: _timestamp,
    Oid.DATE: _date,
    Oid.TIME: _time,
    Oid.TIMETZ: _timetz,
    Oid.JSON: _json,
    Oid.JSONB: _json,
    Oid.BYTEA: _bytea,
}


# -- arrays ------------------------------------------------------------------------------------

_WHITESPACE: Final = " \t\n\r\v\f"


def parse_array(text: str) -> list[object]:
    """Parse PostgreSQL's array text output into nested lists of ``str`` / ``None``.

    Handles quoted elements with backslash escapes, unquoted ``NULL`` (an SQL NULL; a quoted
    ``"NULL"`` is the string), empty arrays ``{}``, multi-dimensional arrays ``{{1,2},{3,4}}``
    and the dimension prefix of arrays whose lower bound is not 1 (``[0:1]={7,8}``; the bounds
    are dropped).  Only the ``,`` delimiter (every built-in type but ``box``) is supported.
    Raises :class:`PgTypeError` on malformed text.
    """
    parser = _ArrayParser(text)
    return parser.parse()


class _ArrayParser:
    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> PgTypeError:
        return PgTypeError(f"malformed array text at offset {self.pos} ({why}): {self.text!r}")

    def skip_space(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        self.pos = pos

    def parse(self) -> list[object]:
        self.skip_space()
        if self.text.startswith("[", self.pos):
            equals = self.text.find("=", self.pos)
            if (
                equals < 0
                or re.fullmatch(r"(\[-?\d+:-?\d+\])+\s*", self.text[self.pos : equals]) is None
            ):
                raise self.fail("bad dimension decoration")
            self.pos = equals + 1
            self.skip_space()
        result = self.level()
        self.skip_space()
        if self.pos != len(self.text):
            raise self.fail("trailing characters")
        return result

    def level(self) -> list[object]:
        text = self.text
        if not text.startswith("{", self.pos):
            raise self.fail("expected '{'")
        self.pos += 1
        items: list[object] = []
        self.skip_space()
        if text.startswith("}", self.pos):
            self.pos += 1
            return items
        while True:
            self.skip_space()
            if self.pos >= len(text):
                raise self.fail("unterminated array")
            char = text[self.pos]
            if char == "{":
                items.append(self.level())
            elif char == '"':
                items.append(self.quoted())
            else:
                items.append(self.unquoted())
            self.skip_space()
            if self.pos >= len(text):
                raise self.fail("unterminated array")
            char = text[self.pos]
            self.pos += 1
            if char == "}":
                return items
            if char != ",":
                raise self.fail(f"expected ',' or '}}', got {char!r}")

    def quoted(self) -> str:
        text = self.text
        self.pos += 1  # the opening quote
        out: list[str] = []
        start = self.pos
        while True:
            stop = min(
                (i for i in (text.find('"', start), text.find("\\", start)) if i >= 0),
                default=-1,
            )
            if stop < 0:
                self.pos = len(text)
                raise self.fail("unterminated quoted element")
            out.append(text[start:stop])
            if text[stop] == '"':
                self.pos = stop + 1
                return "".join(out)
            if stop + 1 >= len(text):
                self.pos = stop + 1
                raise self.fail("backslash at end of text")
            out.append(text[stop + 1])
            start = stop + 2

    def unquoted(self) -> str | None:
        text = self.text
        out: list[str] = []
        escaped = False
        pos = self.pos
        # The end of the element's text, excluding unescaped trailing whitespace.
        keep = 0
        while pos < len(text):
            char = text[pos]
            if char == "\\":
                if pos + 1 >= len(text):
                    self.pos = pos
                    raise self.fail("backslash at end of text")
                escaped = True
                out.append(text[pos + 1])
                keep = len(out)
                pos += 2
                continue
            if char in ",}":
                break
            if char in '{"':
                self.pos = pos
                raise self.fail(f"unexpected {char!r} in an unquoted element")
            out.append(char)
            if char not in _WHITESPACE:
                keep = len(out)
            pos += 1
        self.pos = pos
        value = "".join(out[:keep])
        if not value:
            raise self.fail("empty unquoted element")
        if not escaped and value.upper() == "NULL":
            return None
        return value


def _map_elements(items: list[object], convert_one: Callable[[str], object]) -> list[object]:
    out: list[object] = []
    for item in items:
        if item is None:
            out.append(None)
        elif isinstance(item, list):
            out.append(_map_elements(item, convert_one))
        else:
            assert isinstance(item, str)
            out.append(convert_one(item))
    return out


def convert_array(element_oid: int, text: str, *, numeric_as_number: bool = False) -> list[object]:
    """An array's text as (nested) lists of its elements converted by ``element_oid``.

    For array types that :data:`ARRAY_ELEMENT_OIDS` does not know, e.g. of a user-defined type
    (whose element type a Relation/Type message names), with ``element_oid`` that type's OID.
    """
    items = parse_array(text)
    return _map_elements(
        items, lambda item: convert(element_oid, item, numeric_as_number=numeric_as_number)
    )


# -- entry point -------------------------------------------------------------------------------


def convert(type_oid: int, text: str | None, *, numeric_as_number: bool = False) -> object:
    """A column's text (from a pgoutput tuple) as a JSON-able value, by its type's OID.

    See the module docstring for the mapping; unknown OIDs give the text unchanged and ``None``
    (SQL NULL) gives ``None``.  Raises :class:`PgTypeError` if the text is not a valid output of
    a mapped type under :data:`SESSION_SETTINGS`.
    """
    if text is None:
        return None
    scalar = _SCALARS.get(type_oid)
    if scalar is not None:
        return scalar(text, numeric_as_number)
    element = ARRAY_ELEMENT_OIDS.get(type_oid)
    if element is not None:
        return convert_array(element, text, numeric_as_number=numeric_as_number)
    return text
