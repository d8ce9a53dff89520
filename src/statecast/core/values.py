"""Canonical JSON values: one line, valid UTF-8, bounded nesting (docs/protocol.md §9).

A change's value arrives as ``msgspec.Raw``: the JSON text exactly as the client sent it.
Keeping it verbatim is what makes ingest fast (no decode to Python objects, no encode
back), and the stored bytes are forwarded verbatim inside every ``change`` frame. But
"verbatim" also lets through text that breaks clients for good: a pretty-printed value
carries raw ``\\n``/``\\r``/tabs into NDJSON framing, ``msgspec.Raw`` does not check UTF-8,
and a deeply nested value makes every decoder recurse. So each value is brought to its
canonical form once, on the way in, by :func:`canonical_value`. The rule (docs/protocol.md
§9): a stored value is compact JSON on one line (no whitespace between tokens), valid
UTF-8 without lone surrogates (raw or escaped), no raw control characters, and nested at
most :data:`MAX_DEPTH` levels deep (a scalar is depth 0, ``{}`` depth 1, ``[[1]]`` depth 2).

This is hand-written rather than "decode, then re-encode" because almost every value is
already canonical: the fast path looks at the bytes without decoding them and returns the
*same* bytes object. Only a value holding whitespace, control or non-ASCII bytes, a
backslash-u surrogate escape or more than ``MAX_DEPTH`` opening brackets goes down the slow
path, which:

1. strictly decodes UTF-8 when the value is not ASCII (rejects overlong forms, encoded
   surrogates, bytes that are never UTF-8);
2. checks the nesting depth on the text, skipping string literals, with no recursion and
   in linear-ish time, *before* anything recursive sees the value;
3. runs ``msgspec.json.format(raw, indent=-1)``: it validates the JSON (syntax, escapes,
   lone surrogate escapes, raw control characters) and drops the insignificant whitespace,
   copying the text of every number and string unchanged.

The slow path deliberately does not decode to Python objects and re-encode: that would
change a value's text only when it happened to contain whitespace (``1E5`` becomes
``100000.0``, ``1.0000000000000000001`` becomes ``1.0``, a duplicate key disappears), and
would reject ``1e400`` or an integer of more than 4300 digits only then (msgspec raises
``ValidationError`` for them on decode), while the same value written compactly passes the
fast path. ``format`` keeps both paths consistent, and is about twice as fast. A value that
is canonical but not ASCII (or holds a space inside a string) comes back as the same
object from the slow path too, so :func:`canonical_value` is idempotent, by identity.

Trust: the fast path does not check JSON syntax; it relies on the caller having the value
from ``msgspec`` (a ``msgspec.Raw`` is always one syntactically valid JSON value). Anything
that goes down the slow path is fully validated.

What msgspec 0.22 does, checked when this was written (the tests pin the parts we rely on):

* Invalid UTF-8 inside a ``str`` field (also in ``list[str]`` items and ``dict`` keys) of
  a Struct is rejected, but with ``UnicodeDecodeError`` (a ``ValueError``), *not*
  ``msgspec.DecodeError``: a caller catching only ``DecodeError``/``ValidationError``
  lets it escape. Inside a ``msgspec.Raw`` field, or a field that is skipped as unknown,
  UTF-8 is not checked at all (hence this module).
* Escaped lone surrogates (``"\\ud800"``, ``"\\udc00x"``, ``"\\ud800\\u0041"``) are
  rejected with ``DecodeError`` everywhere: in ``str`` fields, in ``Raw`` fields and by
  ``msgspec.json.format``. So a ``str`` that msgspec decoded from JSON never holds a lone
  surrogate; :func:`check_text` matters for strings that come from Python callers (the
  embedding API), where ``"\\ud800"`` is a perfectly good ``str`` that cannot be UTF-8
  encoded (``msgspec.json.encode`` raises ``UnicodeEncodeError`` on it).
* Integers beyond 64 bits are decoded exactly into Python ``int`` and encoded back
  exactly; past 4300 digits (Python's ``int_max_str_digits``) decoding raises
  ``ValidationError: Integer value out of range``. Floats decode to the nearest double;
  out of range (``1e400``) raises ``ValidationError: Number out of range``; ``-0`` decodes
  to the int ``0``. ``Raw`` and ``format`` keep a number's text as written, so such values
  are stored as sent; a consumer that decodes them with msgspec may still fail on them.
* Nesting: decoding (including skipping over a ``Raw`` field) and ``format`` recurse, and
  raise ``RecursionError`` (not ``DecodeError``) around 1000 levels, fewer if the Python
  stack is already deep. A whole request line nested that deep fails in the line decoder,
  before this module sees the value; that caller has to catch ``RecursionError`` itself.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

__all__ = ["MAX_DEPTH", "InvalidValue", "canonical_value", "check_text", "plain_line", "shallow"]

MAX_DEPTH: Final = 64
"""How many levels of arrays/objects a value may nest (docs/protocol.md §9)."""


class InvalidValue(ValueError):
    """A value that cannot be stored; the message is a short reason ("invalid UTF-8")."""


# Printable ASCII that needs no further look: everything from "!" to DEL except the
# opening brackets (counted for depth) and the backslash (escapes: maybe a surrogate).
_PLAIN: Final = bytes(b for b in range(0x21, 0x80) if b not in b"[{\\")
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_CHAR: Final = re.compile("[\\ud800-\\udfff]")

# For the depth check: one JSON string literal. An unterminated one runs to the end, so
# every '"' starts a match and the scan is one linear pass even on garbage.
_STRING: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET: Final = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE: Final = bytes.maketrans(b"{}", b"[]")
_TOO_DEEP_RUN: Final = b"[" * (MAX_DEPTH + 1)
_DEEP_REASON: Final = f"nested deeper than {MAX_DEPTH} levels"


_PLAIN_LINE: Final = bytes(b for b in range(0x21, 0x80) if b != 0x5C)
# What may be a number no client can read (beyond a double: 1e400, or 250 digits
# times 1e60; an integer of thousands of digits): a three-digit exponent, or a run of
# 210 digits or more, also inside a string (then the real check, a decode, clears it).
# With at most 209 digits before the point and at most a two-digit exponent, a number
# stays under 10^(209+99) = 10^308, within a double's range (about 1.8 x 10^308).
# Digits and signs become "0" and "E" becomes "e": a three-digit exponent is then
# "e000" whatever its sign, and a long number is a long run of "0".
_TO_ZERO: Final = bytes.maketrans(b"123456789+-E", b"00000000000e")
_LONG_RUN: Final = b"0" * 210


def _may_hold_big_number(data: bytes) -> bool:
    """A three-digit exponent or 210 digits in a row somewhere in ``data``: one
    translation and two substring searches (C speed; a regular expression costs
    milliseconds on a 200 KB request line). False alarms only cost a decode."""
    zeros = data.translate(_TO_ZERO)
    return b"e000" in zeros or _LONG_RUN in zeros


_RANGE_REASON: Final = (
    "a number out of range (JSON numbers must fit a 64-bit float, integers 4,300 digits)"
)


# plain_line's one translation: what _TO_ZERO does, and every byte that is not plain
# (whitespace, controls, the backslash, non-ASCII) becomes a backslash.
_PLAIN_AND_ZERO: Final = bytes(0x5C if b not in _PLAIN_LINE else _TO_ZERO[b] for b in range(256))


def plain_line(line: bytes) -> bool:
    """Whether a whole request line is compact printable ASCII without escapes or
    huge numbers: then every value in it is canonical as soon as it is
    :func:`shallow` (one pass over the line instead of one per value, on the ingest
    hot path).

    The same test as ``not line.translate(None, _PLAIN_LINE) and not
    _may_hold_big_number(line)``, with one translation instead of two: bytes that are
    not plain become a backslash (which no plain byte maps to), digits and signs "0",
    "E" "e"; then three substring searches, at C speed. It runs over every byte of
    every publish line, so the second pass it saves is about 0.2 µs per change of 200
    bytes (docs/performance.md)."""
    t = line.translate(_PLAIN_AND_ZERO)
    return b"\\" not in t and b"e000" not in t and _LONG_RUN not in t


def _numbers_in_range(raw: bytes) -> None:
    """§9: refuse a value a client cannot decode (msgspec, like JavaScript's doubles,
    has no 1e400)."""
    try:
        msgspec.json.decode(raw)
    except msgspec.ValidationError as exc:
        if "out of range" in str(exc):
            raise InvalidValue(_RANGE_REASON) from None
        raise


def shallow(raw: bytes) -> bool:
    """Whether a value of a :func:`plain_line` has at most MAX_DEPTH opening brackets
    (so it cannot nest deeper)."""
    return raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH


def canonical_value(raw: bytes) -> bytes:
    """The canonical form of one JSON value's text (see the module docstring).

    Returns ``raw`` itself when it is already canonical. Raises :class:`InvalidValue`
    with a short reason when the value cannot be stored.
    """
    rest = raw.translate(None, _PLAIN)
    if len(rest) <= MAX_DEPTH and not rest.strip(b"[{") and raw:
        if _may_hold_big_number(raw):
            _numbers_in_range(raw)
        return raw  # compact printable ASCII, no escapes, at most MAX_DEPTH brackets
    out = _canonical_slow(raw, rest)
    if _may_hold_big_number(out):
        _numbers_in_range(out)
    return out


def _canonical_slow(raw: bytes, rest: bytes) -> bytes:
    # rest: the bytes of raw that are not plain, in order: "[", "{", "\\", whitespace,
    # control characters and non-ASCII bytes.
    many_openers = len(rest) > MAX_DEPTH and rest.count(b"[") + rest.count(b"{") > MAX_DEPTH
    if (
        not many_openers
        and raw
        and not rest.strip(b"[{\\")
        and _SURROGATE_ESCAPE.search(raw) is None
    ):
        return raw  # only escapes, none of them a surrogate: as canonical as the fast path
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidValue("invalid UTF-8") from None
    if many_openers:
        problem = _nesting_problem(raw)
        if problem is not None:
            raise InvalidValue(problem)
    try:
        out = msgspec.json.format(raw, indent=-1)
    except msgspec.DecodeError as exc:
        if _SURROGATE_ESCAPE.search(raw) is not None:
            # msgspec calls a lone surrogate "input data was truncated": say what it is.
            raise InvalidValue("a lone surrogate escape (\\ud800-\\udfff)") from None
        detail = str(exc).removeprefix("JSON is malformed: ")
        raise InvalidValue(f"not valid JSON: {detail[:1].lower()}{detail[1:]}") from None
    return raw if out == raw else out


def _nesting_problem(raw: bytes) -> str | None:
    """Why ``raw`` nests too deeply for a recursive parser, or None when it does not.

    Works on the brackets outside string literals only, without recursion. Its answer is
    exact for valid JSON; for invalid JSON it may name the brackets where a parser would
    have named something else, but never lets through text a parser would recurse into
    more than MAX_DEPTH levels before failing.
    """
    skeleton = _STRING.sub(b"", raw).translate(_SQUARE, _NOT_BRACKET)
    if skeleton.count(b"[") <= MAX_DEPTH:
        return None
    if skeleton.find(_TOO_DEEP_RUN) >= 0:
        return _DEEP_REASON
    # Each round removes every innermost pair, so a balanced skeleton is gone after as
    # many rounds as it is deep.
    for _ in range(MAX_DEPTH):
        reduced = skeleton.replace(b"[]", b"")
        if not reduced:
            return None
        if len(reduced) == len(skeleton):
            break
        skeleton = reduced
    if skeleton.find(b"[]") >= 0:
        return _DEEP_REASON
    return "not valid JSON: unbalanced brackets"


def check_text(s: str) -> bool:
    """Whether ``s`` can be encoded as UTF-8, i.e. holds no lone surrogate.

    Strings msgspec decoded from JSON always pass (it rejects invalid UTF-8 and escaped
    lone surrogates itself); this is for keys, collection names and ids from Python.
    """
    return s.isascii() or _SURROGATE_CHAR.search(s) is None
