"""Where filters: which records of the selected collections a client sees.

Pure: no I/O, no event loop; only the stdlib, msgspec and :mod:`statecast.errors`.
The wire rules are in ``docs/protocol.md §3.7``; this module implements them.

Grammar
=======

``sync`` and ``subscribe`` take ``"where"``, an object of top-level field conditions
on record values::

    where      = { field: condition, ... }            at most MAX_FIELDS fields
    condition  = scalar                                the field equals scalar
               | { "in": [scalar, ...] }               the field equals one of them
    scalar     = string | number | true | false | null

All conditions must hold (AND). ``{"f": v}`` and ``{"f": {"in": [v]}}`` mean the same.
Anything else is refused with ``bad_request`` naming the path: a ``where`` that is not
an object, an operator other than ``in`` (``where.status: unknown operator 'gt'``),
an ``in`` that is not a list, an array or object where a scalar belongs (no nested
fields, no array equality), a limit exceeded. A missing or ``null`` ``where``, and
``{}``, mean "no filter": every record matches (:func:`parse_where` returns ``None``).
``{"f": {"in": []}}`` is valid and matches nothing.

Semantics
=========

* Only values that are JSON objects can match; a record whose value is anything else
  (an array, a string, ``null``...) matches no filter. A deleted record matches none.
* A field the value lacks never matches, not even ``{"f": null}``: ``null`` matches a
  field that is present with the value ``null``.
* Equality is JSON equality of scalars. Numbers compare as exact mathematical values:
  ``1``, ``1.0`` and ``1e0`` are equal, ``0`` equals ``-0.0``, and
  ``9007199254740993`` does not equal ``9007199254740992.0``. Booleans equal only
  booleans: ``true`` does not equal ``1`` and ``false`` does not equal ``0`` (unlike
  Python's ``True == 1``). Strings compare code point by code point (no Unicode
  normalisation, no case folding). A field whose value is an array or object matches
  no condition.
* Filters with the same meaning are equal and hash equal, whatever the order of their
  fields or ``in`` values, duplicates, ``1`` vs ``1.0`` or ``v`` vs ``{"in": [v]}``;
  :meth:`Where.to_json` gives the one canonical form (fields sorted, a single value as
  a plain value, ``in`` values deduplicated and sorted: ``null``, ``false``, ``true``,
  numbers, strings; integral numbers written as integers). All filters that match
  nothing are one filter, :attr:`Where.NOTHING`.

Limits (per ``where`` parsed from a request or a token)
======================================================

* :data:`MAX_FIELDS` = 32 fields;
* :data:`MAX_IN_VALUES` = 1,000 values in one ``in`` list (counted as sent);
* :data:`MAX_FIELD_LENGTH` = 128: a field name is 1 to 128 characters;
* :data:`MAX_STRING_LENGTH` = 1,024 characters in a string value;
* numbers must be finite (JSON has no NaN or infinity).

A conjunction (:meth:`Where.and_`, a token's ``where`` AND a request's) may have up
to twice as many fields; its ``in`` sets only shrink.

Tokens
======

A token's ``where`` claim is ANDed into every sync and subscription of its
connection (:func:`conjoin`); the result is never wider than either side, so a client
cannot widen it. Two conditions on the same field intersect; disjoint ones give
:attr:`Where.NOTHING`.

Moving in and out
=================

A live subscriber with a filter sees a record while the record matches. For each
change, with ``was_in`` = "the record's previous value matched" (``False`` if it did
not exist) and ``now_in`` = "its new value matches" (``False`` for a delete), the
subscriber gets (:func:`transition`):

==========  ==========  ========================================================
``was_in``  ``now_in``  frame sent
==========  ==========  ========================================================
false       false       nothing: it never learns about records outside its view
false       true        the ``change`` with the whole value ("upsert"): moves in
true        true        the ``change`` with the whole value ("upsert")
true        false       a ``change`` with ``"deleted": true`` ("delete"): moves out
==========  ==========  ========================================================

The previous value is the caller's to supply (from the state; for the second change
of a key within one flush, the first change's value). A filtered snapshot holds the
records that match at its seq, so moving in and out from there on keeps the client's
replica equal to "the records that match now".

:class:`FilterSet` evaluates every distinct filter once per change, not once per
subscriber: it decodes each value once (and caches the outcome per value), then tests
each filter on it; subscribers with equal filters share the result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar, Final, Literal, TypeAlias

import msgspec

from statecast.errors import BadRequest

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "MAX_FIELDS",
    "MAX_FIELD_LENGTH",
    "MAX_IN_VALUES",
    "MAX_STRING_LENGTH",
    "FilterSet",
    "Move",
    "Scalar",
    "Where",
    "conjoin",
    "parse_where",
    "share_where",
    "transition",
]

MAX_FIELDS: Final = 32
MAX_IN_VALUES: Final = 1000
MAX_FIELD_LENGTH: Final = 128
MAX_STRING_LENGTH: Final = 1024

# How many distinct values a FilterSet remembers the results for (per generation).
DEFAULT_CACHE_SIZE: Final = 4096
# How many distinct filters parse_where hands out shared, and how many shared claim
# objects it remembers by identity (each table starts over when full).
_INTERNED_SIZE: Final = 4096
_SHARED_SIZE: Final = 1024

Scalar: TypeAlias = str | int | float | bool | None
Move: TypeAlias = Literal["upsert", "delete"]

# What a scalar is stored as inside a filter. Numbers and strings as themselves (int and
# float compare and hash numerically in Python, which is JSON's number equality); true
# and false as tuples, which no decoded JSON value equals, so that True never meets 1.
_Key: TypeAlias = str | int | float | tuple[str, bool] | None
_TRUE: Final[tuple[str, bool]] = ("bool", True)
_FALSE: Final[tuple[str, bool]] = ("bool", False)
_Conditions: TypeAlias = tuple[tuple[str, frozenset[_Key]], ...]

_MISSING: Final = object()
_PLAIN_NAME: Final = re.compile(r"[A-Za-z0-9_\-]+")
_HINT: Final = 'use a value, or {"in": [...]}'
_decoder = msgspec.json.Decoder()
_UNREADABLE: object = object()


def _decode(value_json: bytes) -> object:
    """A stored value, decoded to be matched. Values are valid JSON (§9), but may hold
    numbers msgspec does not represent (``1e400``, an integer of 5,000 digits): such a
    value matches no filter (a marker that is no dict), and never stops the fan-out."""
    try:
        return _decoder.decode(value_json)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return _UNREADABLE


# ---------------------------------------------------------------------------
# Scalars


def _value_of(key: _Key) -> Scalar:
    if key is _TRUE:
        return True
    if key is _FALSE:
        return False
    assert not isinstance(key, tuple)
    return key


def _sort_key(key: _Key) -> tuple[int, float | int | str]:
    if key is None:
        return (0, 0)
    if key is _FALSE:
        return (1, 0)
    if key is _TRUE:
        return (2, 0)
    if isinstance(key, str):
        return (4, key)
    assert isinstance(key, int | float)
    return (3, key)


def _type_name(value: object) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def _path(base: str, field: str) -> str:
    if _PLAIN_NAME.fullmatch(field):
        return f"{base}.{field}"
    shown = field if len(field) <= 40 else field[:40] + "..."
    return f"{base}[{_quoted(shown)}]"


_SURROGATE: Final = re.compile("([\ud800-\udfff])")


def _quoted(text: str) -> str:
    """``text`` as a JSON string, a lone surrogate (which json.loads lets through, in a
    token's claim) escaped as ``\\uXXXX`` rather than failing to encode."""
    try:
        return msgspec.json.encode(text).decode()
    except UnicodeEncodeError:
        parts = _SURROGATE.split(text)
        inner = (
            f"\\u{ord(part):04x}" if i % 2 else msgspec.json.encode(part).decode()[1:-1]
            for i, part in enumerate(parts)
        )
        return f'"{"".join(inner)}"'


def _parse_scalar(value: object, path: str) -> _Key:
    if value is True:
        return _TRUE
    if value is False:
        return _FALSE
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            raise BadRequest(f"{path}: a string is longer than {MAX_STRING_LENGTH} characters")
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"{path}: numbers must be finite")
        # Canonical: an integral number is an int, whatever its spelling (1.0, 1e0,
        # -0.0); int(f) == f exactly, so the meaning is kept.
        return int(value) if value.is_integer() else float(value)
    if isinstance(value, Mapping | list | tuple):
        raise BadRequest(
            f"{path}: expected a string, number, boolean or null, not {_type_name(value)} "
            "(no nested fields or arrays)"
        )
    raise BadRequest(f"{path}: expected a string, number, boolean or null, not {_type_name(value)}")


def _parse_condition(cond: object, path: str) -> frozenset[_Key]:
    if isinstance(cond, Mapping):
        if not cond:
            raise BadRequest(f"{path}: an empty object is not a condition ({_HINT})")
        for op in cond:
            if op != "in":
                shown = str(op) if len(str(op)) <= 40 else str(op)[:40] + "..."
                raise BadRequest(
                    f"{path}: unknown operator {shown!r} ({_HINT}; nested fields are not supported)"
                )
        values = cond["in"]
        if not isinstance(values, list):
            raise BadRequest(f"{path}: 'in' must be a list, not {_type_name(values)}")
        if len(values) > MAX_IN_VALUES:
            raise BadRequest(f"{path}: 'in' has {len(values)} values (at most {MAX_IN_VALUES})")
        return frozenset(_parse_scalar(v, f"{path}.in[{i}]") for i, v in enumerate(values))
    if isinstance(cond, list | tuple):
        raise BadRequest(
            f"{path}: a condition cannot be an array ({_HINT}: "
            '{"in": [...]} matches any one of several values)'
        )
    return frozenset((_parse_scalar(cond, path),))


# ---------------------------------------------------------------------------
# Where


class Where:
    """An immutable, hashable filter on record values; see the module docstring.

    Build one with :func:`parse_where`; combine with :meth:`and_`. Equal meaning means
    equal and the same hash, so a ``Where`` can key the fan-out's subscriber groups.
    """

    __slots__ = ("_conds", "_empty", "_hash")

    NOTHING: ClassVar[Where]
    """The filter that matches nothing (e.g. ``{"f": {"in": []}}``, or ``{"f": 1}`` AND
    ``{"f": 2}``)."""

    _conds: _Conditions
    _empty: bool
    _hash: int

    def __init__(self, conds: Mapping[str, frozenset[_Key]], *, _token: object = None) -> None:
        if _token is not _CONSTRUCT:
            raise TypeError("build a Where with parse_where(), or combine with Where.and_()")
        empty = any(not allowed for allowed in conds.values())
        items: _Conditions = () if empty else tuple(sorted(conds.items()))
        object.__setattr__(self, "_conds", items)
        object.__setattr__(self, "_empty", empty)
        object.__setattr__(self, "_hash", hash((empty, items)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Where is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Where is immutable")

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Where):
            return NotImplemented
        return (
            self._hash == other._hash
            and self._empty == other._empty
            and self._conds == other._conds
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Where({msgspec.json.encode(self.to_json()).decode()})"

    def __reduce__(self) -> tuple[object, ...]:
        return (parse_where, (self.to_json(),))

    # -- reading -------------------------------------------------------------

    @property
    def empty(self) -> bool:
        """True for :attr:`NOTHING`, the filter that matches nothing."""
        return self._empty

    @property
    def fields(self) -> frozenset[str]:
        """The field names this filter constrains (none for :attr:`NOTHING`)."""
        return frozenset(f for f, _ in self._conds)

    def to_json(self) -> dict[str, object]:
        """The canonical plain form, as a client would send it (for echoing in frames).

        :attr:`NOTHING` is ``{"_nothing": {"in": []}}``; every form round-trips through
        :func:`parse_where` to an equal filter.
        """
        if self._empty:
            return {"_nothing": {"in": []}}
        out: dict[str, object] = {}
        for field, allowed in self._conds:
            if len(allowed) == 1:
                (only,) = allowed
                out[field] = _value_of(only)
            else:
                out[field] = {"in": [_value_of(k) for k in sorted(allowed, key=_sort_key)]}
        return out

    # -- matching ------------------------------------------------------------

    def matches(self, value: object) -> bool:
        """Whether a decoded record value matches: it must be an object that has every
        field, each with an allowed scalar. Do not pass a deleted record's value."""
        if self._empty or not isinstance(value, dict):
            return False
        get = value.get
        for field, allowed in self._conds:
            v = get(field, _MISSING)
            if v is True:
                if _TRUE not in allowed:
                    return False
            elif v is False:
                if _FALSE not in allowed:
                    return False
            elif v is None or isinstance(v, str | int | float):
                if v not in allowed:
                    return False
            else:  # missing, an array, an object
                return False
        return True

    def matches_json(self, value_json: bytes | None) -> bool:
        """:meth:`matches` on a value's JSON text; ``None`` (a delete) never matches."""
        if value_json is None or self._empty:
            return False
        return self.matches(_decode(value_json))

    # -- combining -----------------------------------------------------------

    def and_(self, other: Where | None) -> Where:
        """The conjunction: what matches both. Never wider than either side; conditions
        on the same field intersect, and disjoint ones give :attr:`NOTHING`."""
        if other is None or other is self:
            return self
        if self._empty:
            return self
        if other._empty:
            return other
        merged: dict[str, frozenset[_Key]] = dict(self._conds)
        changed = False
        for field, allowed in other._conds:
            current = merged.get(field)
            if current is None:
                merged[field] = allowed
                changed = True
            elif not current <= allowed:
                both = current & allowed
                if not both:
                    return Where.NOTHING
                merged[field] = both
                changed = True
        if not changed:
            return self
        return Where(merged, _token=_CONSTRUCT)

    def __and__(self, other: Where | None) -> Where:
        return self.and_(other)


_CONSTRUCT: Final = object()
Where.NOTHING = Where({"_nothing": frozenset()}, _token=_CONSTRUCT)


# Equal filters are one object: thousands of connections with a few distinct filters
# (one per account, say) hold a few Where objects, not thousands. Seeded with NOTHING,
# so every filter that matches nothing is that one.
_interned: dict[Where, Where] = {Where.NOTHING: Where.NOTHING}
# Read-only filter objects (a grant's where claim, shared by every connection with the
# same claim, policy.py) by id, with their parsed filter: the object is held, so the id
# is not reused while it is here.
_shared: dict[int, tuple[object, Where | None]] = {}


def _intern(where: Where) -> Where:
    found = _interned.get(where)
    if found is not None:
        return found
    if len(_interned) >= _INTERNED_SIZE:
        _interned.clear()
        _interned[Where.NOTHING] = Where.NOTHING
    _interned[where] = where
    return where


def share_where(obj: object, field: str = "where") -> Where | None:
    """:func:`parse_where` for an object that is never mutated and is presented again
    (a grant's ``where`` claim): parsed once, then found by identity, by this function
    and by :func:`parse_where` alike. Errors are not remembered."""
    if obj is None:
        return None
    hit = _shared.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    where = parse_where(obj, field)
    if len(_shared) >= _SHARED_SIZE:
        _shared.clear()
    _shared[id(obj)] = (obj, where)
    return where


def parse_where(obj: object, field: str = "where") -> Where | None:
    """Validate a decoded JSON ``where``; ``None`` means "no filter".

    ``None`` and ``{}`` give ``None`` (every record matches). Anything malformed raises
    :class:`~statecast.errors.BadRequest` naming the path from ``field``, e.g.
    ``where.account: 'in' must be a list, not a string``; pass ``field="token.where"``
    for a token's claim. Equal filters come back as the same object.
    """
    if obj is None:
        return None
    hit = _shared.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    if not isinstance(obj, Mapping):
        raise BadRequest(f"{field}: must be an object, not {_type_name(obj)}")
    if not obj:
        return None
    if len(obj) > MAX_FIELDS:
        raise BadRequest(f"{field}: {len(obj)} fields (at most {MAX_FIELDS})")
    conds: dict[str, frozenset[_Key]] = {}
    for name, cond in obj.items():
        if not isinstance(name, str):
            raise BadRequest(f"{field}: field names must be strings, not {_type_name(name)}")
        if not 1 <= len(name) <= MAX_FIELD_LENGTH:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise BadRequest(
                f"{field}: field name {shown!r} must be 1 to {MAX_FIELD_LENGTH} characters"
            )
        conds[str(name)] = _parse_condition(cond, _path(field, name))
    return _intern(Where(conds, _token=_CONSTRUCT))


def conjoin(a: Where | None, b: Where | None) -> Where | None:
    """``a AND b`` where ``None`` means "no filter" (e.g. a token's claim and a
    request's ``where``); ``None`` only when both are."""
    if a is None:
        return b
    return a.and_(b)


def transition(was_in: bool, now_in: bool) -> Move | None:
    """What a filtered subscriber gets for one change (the table in the module
    docstring): ``"upsert"`` if the record matches now (the change, with its whole
    value), ``"delete"`` if it matched before and no longer does, else ``None``."""
    if now_in:
        return "upsert"
    if was_in:
        return "delete"
    return None


# ---------------------------------------------------------------------------
# Evaluation for the fan-out


class FilterSet:
    """The distinct filters in use, evaluated together on each change.

    Each value's JSON is decoded once and every filter tested on it once, whatever the
    number of subscribers; the results are remembered per value text (two generations
    of up to ``cache_size`` values each), so the previous value of a record, which was
    the new value of an earlier change, usually costs a dictionary lookup.

    ``filters`` is a tuple; :meth:`vector` gives one bool per filter, in that order.
    :meth:`update` replaces the set (a no-op if it is the same), which clears the
    results remembered.
    """

    __slots__ = ("_cache_size", "_filters", "_index", "_new", "_old")

    def __init__(
        self, filters: Iterable[Where] = (), *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._cache_size = cache_size
        self._filters: tuple[Where, ...] = ()
        self._index: dict[Where, int] = {}
        self._new: dict[bytes, tuple[bool, ...]] = {}
        self._old: dict[bytes, tuple[bool, ...]] = {}
        self.update(filters)

    @property
    def filters(self) -> tuple[Where, ...]:
        return self._filters

    def __len__(self) -> int:
        return len(self._filters)

    def __iter__(self) -> Iterator[Where]:
        return iter(self._filters)

    def __contains__(self, where: object) -> bool:
        return where in self._index

    def update(self, filters: Iterable[Where]) -> None:
        """Evaluate exactly these filters from now on (duplicates are merged)."""
        wanted = dict.fromkeys(filters)
        if wanted.keys() == self._index.keys():
            return
        self._filters = tuple(wanted)
        self._index = {w: i for i, w in enumerate(self._filters)}
        self._new = {}
        self._old = {}

    def vector(self, value_json: bytes | None) -> tuple[bool, ...]:
        """Whether each filter (in :attr:`filters` order) matches this value; a delete
        (``None``) matches none."""
        if value_json is None or not self._filters:
            return (False,) * len(self._filters)
        hit = self._new.get(value_json)
        if hit is not None:
            return hit
        hit = self._old.get(value_json)
        if hit is None:
            value = _decode(value_json)
            if isinstance(value, dict):
                hit = tuple([w.matches(value) for w in self._filters])
            else:
                hit = (False,) * len(self._filters)
        if self._cache_size:
            if len(self._new) >= self._cache_size:
                self._old = self._new
                self._new = {}
            self._new[value_json] = hit
        return hit

    def evaluate(self, value_json: bytes | None) -> dict[Where, bool]:
        """Whether each filter matches this value, by filter."""
        return dict(zip(self._filters, self.vector(value_json), strict=True))

    def moves(self, old_json: bytes | None, new_json: bytes | None) -> dict[Where, Move]:
        """For one change of a record from ``old_json`` (``None``: it did not exist) to
        ``new_json`` (``None``: a delete), what each filter's subscribers get; filters
        whose subscribers get nothing are left out (see :func:`transition`)."""
        now = self.vector(new_json)
        was = self.vector(old_json) if old_json != new_json else now
        out: dict[Where, Move] = {}
        for where, a, b in zip(self._filters, was, now, strict=True):
            if b:
                out[where] = "upsert"
            elif a:
                out[where] = "delete"
        return out
