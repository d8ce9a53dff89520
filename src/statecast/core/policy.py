"""What an authenticated connection may do: the :class:`Grant` and its rules.

Pure: standard library, msgspec and :mod:`statecast.errors` only, no I/O and no JWT. The
signature and clock checks live in :mod:`statecast.tokens`, which turns a verified
token's claims into a :class:`Grant` with :meth:`Grant.from_claims` (or, on its fast
path, :func:`check_subject`, :func:`claim_parts` and :meth:`Grant.of_parts`: the same
checks, with the parts kept for the next token that carries the same ones); the session
holds one grant per connection and asks it before every sync, subscribe and publish.

Claims (all other claims are ignored)::

    sub      str, required          who; 1 to 256 printable characters
    exp      number, required       unix time the grant ends (tokens without one are refused)
    read     "*" | [name, ...]      collections it may sync or subscribe to; missing/null = none
    publish  "*" | [name, ...]      collections it may publish to; missing/null = none
    where    {...} | null           a filter ANDed into every sync and subscription

Scopes are ``frozenset[str] | None``: ``None`` means every collection (``"*"``), an
empty frozenset means none, so "none" is always said explicitly.

Rules
-----
* **read** (:meth:`Grant.readable`): a request that names collections must name only
  readable ones, else :class:`~statecast.errors.Forbidden` naming the first one (in
  sorted order) that is not; a request that leaves ``collections`` out means "everything
  I may read" and gets the grant's read set (so it never fails unless the grant reads
  nothing at all). Nothing is silently dropped from an explicit list.
* **publish** (:meth:`Grant.check_publish`): every collection of a batch must be
  publishable, else ``Forbidden`` naming the first one that is not; the caller checks
  the whole batch before applying any of it.
* **refresh** (:meth:`Grant.check_refresh`): a fresh token sent on a live connection
  may extend the time but never widen what the connection may do:

  - ``sub`` must be the same;
  - ``where`` must be exactly the same (compared as canonical JSON: a live
    subscription is already filtered by it, and filters are opaque here);
  - ``read`` and ``publish`` may stay the same or narrow, never widen;
  - ``read`` must still cover every live subscription of the connection;
  - ``exp`` may move either way (the session re-arms its timer from the new grant).

  A refresh that breaks a rule raises ``Forbidden``; the connection keeps its old
  grant. To widen its rights a client reconnects with the new token.

Sharing
-------
Thousands of connections often hold a handful of distinct claims (one per user, one
``where`` per account). Grants are immutable, so equal parts are shared rather than
copied per connection: scopes and ``where`` objects are interned,
:meth:`Grant.from_claims` hands out one grant per distinct claims, and
:meth:`Grant.frame_fields` gives the ``authed`` frame the shared parts uncopied. Each
table is a small dict that starts over when full; sharing saves memory and time, never
changes a result.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeAlias

import msgspec

from statecast.errors import ConfigError, Forbidden, Unauthorized

__all__ = [
    "ALL",
    "COLLECTION_RE",
    "MAX_SUB_LENGTH",
    "NONE",
    "ClaimParts",
    "Grant",
    "RequestId",
    "Scope",
    "check_subject",
    "claim_parts",
]

RequestId: TypeAlias = int | str | None

Scope: TypeAlias = frozenset[str] | None
"""A set of collections: ``None`` = all (``"*"``), an empty frozenset = none."""

FrameFields: TypeAlias = tuple[
    str, str | list[str], dict[str, object] | None, str | list[str], int | None
]
"""``authed``'s fields (§3.8): sub, read, where, publish, exp."""

_EMPTY: Final[frozenset[str]] = frozenset()
ALL: Final[Scope] = None
NONE: Final[Scope] = _EMPTY

# docs/protocol.md §9 (the same rule as the protocol's collection names).
COLLECTION_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
MAX_SUB_LENGTH: Final = 256


def _show(name: object) -> str:
    """A collection name (or something posing as one) for a message, cut short."""
    return repr(name[:140] if isinstance(name, str) else name)[:150]


def _canonical(where: Mapping[str, object] | None) -> str:
    """JSON text that is equal exactly when two filters are (1, 1.0 and true differ)."""
    return json.dumps(where, sort_keys=True, separators=(",", ":"), allow_nan=False)


# -- sharing (see "Sharing" in the module docstring) ---------------------------------

_SHARED_SIZE: Final = 1024
_GRANTS_SIZE: Final = 1024

# A claim's list of names -> its scope (lists are validated before they are kept), and
# each distinct scope once.
_scopes: dict[tuple[str, ...], frozenset[str]] = {}
_scope_sets: dict[frozenset[str], frozenset[str]] = {}
# Key of a where object (below) -> (the shared read-only copy, its key).
_wheres: dict[bytes, tuple[dict[str, object], bytes]] = {}
# (sub, exp, read, publish, where key) -> the grant.
_grants: dict[tuple[str, float, Scope, Scope, bytes | None], Grant] = {}


def _shared_scope(names: list[str]) -> frozenset[str]:
    """The frozenset of a list of valid collection names, shared with equal lists."""
    key = tuple(names)
    found = _scopes.get(key)
    if found is not None:
        return found
    scope = frozenset(names)
    scope = _scope_sets.setdefault(scope, scope) if scope else _EMPTY
    if len(_scopes) >= _SHARED_SIZE:
        _scopes.clear()
        _scope_sets.clear()
    _scopes[key] = scope
    return scope


_PLAIN: Final = (str, int, float, bool, type(None))
_MAX_SHARED_DEPTH: Final = 16


def _plain_json(value: object, depth: int = 0) -> bool:
    """Made only of the types JSON decodes to (exactly: no subclasses, no tuples)."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if depth >= _MAX_SHARED_DEPTH:
        return False
    if kind is dict:
        assert isinstance(value, dict)
        for k, v in value.items():
            if type(k) is not str or (type(v) not in _PLAIN and not _plain_json(v, depth + 1)):
                return False
        return True
    if kind is list:
        assert isinstance(value, list)
        return all(type(v) in _PLAIN or _plain_json(v, depth + 1) for v in value)
    return False


def _where_key(where: Mapping[str, object]) -> bytes | None:
    """Bytes equal only for where objects with the same canonical JSON, or ``None``
    (not shared: not made of plain JSON types, or an int beyond 64 bits).

    MessagePack with sorted keys: each JSON type has its own encoding (1, 1.0 and true
    differ) and floats are exact, NaN included, so NaN never meets null as it would in
    msgspec's JSON (a NaN is refused before anything with it is kept)."""
    if not _plain_json(where):
        return None
    try:
        return msgspec.msgpack.encode(where, order="sorted")
    except (TypeError, ValueError, OverflowError):
        return None


def _shared_where(where: Mapping[str, object]) -> tuple[dict[str, object], bytes | None]:
    """A private, read-only copy of a where object that is JSON, shared with every
    other equal one, and its key; ``ValueError``/``TypeError`` if it is not JSON (NaN,
    infinity, an object that JSON has no form for), ``UnicodeEncodeError`` (a
    ``ValueError`` too) if a string in it holds a lone surrogate, which ``json.loads``
    lets through and no frame can carry."""
    key = _where_key(where)
    if key is not None:
        found = _wheres.get(key)
        if found is not None:
            return found
    copied = json.loads(_canonical(where))  # a private copy, and proof that it is JSON
    if key is None:
        msgspec.json.encode(copied)  # the authed frame must be able to carry it
        return copied, None
    if len(_wheres) >= _SHARED_SIZE:
        _wheres.clear()
    entry = _wheres[key] = (copied, key)
    return entry


def _copy_where(where: dict[str, object]) -> dict[str, object]:
    """A deep copy of a JSON where object, fast when it is one msgspec represents."""
    try:
        copied: dict[str, object] = msgspec.msgpack.decode(msgspec.msgpack.encode(where))
    except (TypeError, ValueError, OverflowError, msgspec.DecodeError):
        return copy.deepcopy(where)
    return copied


def _scope_frame(scope: Scope) -> str | list[str]:
    return "*" if scope is None else sorted(scope)


_scope_frames: dict[frozenset[str], list[str]] = {}


def _shared_scope_frame(scope: Scope) -> str | list[str]:
    """:func:`_scope_frame`, one list per distinct scope (read only)."""
    if scope is None:
        return "*"
    found = _scope_frames.get(scope)
    if found is None:
        if len(_scope_frames) >= _SHARED_SIZE:
            _scope_frames.clear()
        found = _scope_frames[scope] = sorted(scope)
    return found


def _covers(outer: Scope, inner: Scope) -> bool:
    """``inner`` is within ``outer``."""
    if outer is None:
        return True
    return inner is not None and inner <= outer


def _first_outside(outer: Scope, inner: Scope) -> str:
    """The name of what ``inner`` has and ``outer`` lacks (``"*"`` for all)."""
    if inner is None:
        return "*"
    assert outer is not None
    return min(inner - outer)


def _claim_scope(value: object, name: str, rid: RequestId) -> Scope:
    """The scope of a ``read`` or ``publish`` claim's value (``None``: missing)."""
    if value is None:
        return NONE
    if value == "*":
        return ALL
    if not isinstance(value, list):
        raise Unauthorized(
            f'the token\'s {name!r} claim must be "*" or a list of collection names',
            request_id=rid,
        )
    try:  # a list seen before is valid: only valid ones are kept
        found = _scopes.get(tuple(value))
    except TypeError:  # an item that cannot be hashed: not a name, found below
        found = None
    if found is not None:
        return found
    for item in value:
        if not isinstance(item, str) or not COLLECTION_RE.fullmatch(item):
            raise Unauthorized(
                f"the token's {name!r} claim has an invalid collection name {_show(item)} "
                "(1 to 128 of A-Z a-z 0-9 _ . -)",
                request_id=rid,
            )
    return _shared_scope(value)


def _is_number(value: object) -> bool:
    """A finite JSON number (not a bool), one that a float holds (an int of 400 digits
    is not: ``float()`` of it overflows)."""
    kind = type(value)
    if (  # float and int first: the types JSON decodes to
        kind is not float
        and kind is not int
        and (not isinstance(value, int | float) or isinstance(value, bool))
    ):
        return False
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:
        return False


def check_subject(sub: object, exp: object, rid: RequestId = None) -> None:
    """The ``sub`` and ``exp`` claims (``None``: missing) have the shapes of the module
    docstring; :class:`Unauthorized` naming the claim otherwise."""
    if sub is None:
        raise Unauthorized("the token has no 'sub' claim", request_id=rid)
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("the token's 'sub' claim must be a non-empty string", request_id=rid)
    if len(sub) > MAX_SUB_LENGTH or not sub.isprintable():
        raise Unauthorized(
            f"the token's 'sub' claim must be at most {MAX_SUB_LENGTH} printable characters",
            request_id=rid,
        )
    if exp is None:
        raise Unauthorized("the token has no 'exp' claim (tokens must expire)", request_id=rid)
    if not _is_number(exp):
        raise Unauthorized(
            "the token's 'exp' claim must be a number (seconds since the epoch)", request_id=rid
        )


ClaimParts: TypeAlias = tuple[Scope, Scope, "dict[str, object] | None", "bytes | None"]
"""The parts of a grant that many tokens share: the read and publish scopes, the
shared ``where`` object, and its key (``b""`` for no ``where``, ``None`` when it cannot
be shared)."""


def claim_parts(read: object, publish: object, where: object, rid: RequestId = None) -> ClaimParts:
    """The :data:`ClaimParts` of the ``read``, ``publish`` and ``where`` claims (``None``:
    missing); :class:`Unauthorized` naming the claim if one is not of its shape."""
    where_key: bytes | None = b""  # b"": no where
    if where is not None:
        if not isinstance(where, dict):
            raise Unauthorized(
                "the token's 'where' claim must be a JSON object or null", request_id=rid
            )
        try:
            where, where_key = _shared_where(where)
        except UnicodeEncodeError:  # a lone surrogate, which json.loads lets through
            raise Unauthorized(
                "the token's 'where' claim must be valid text (it holds a lone surrogate)",
                request_id=rid,
            ) from None
        except ValueError:  # NaN or Infinity, which json.loads lets through
            raise Unauthorized(
                "the token's 'where' claim must not hold NaN or Infinity", request_id=rid
            ) from None
    return (
        _claim_scope(read, "read", rid),
        _claim_scope(publish, "publish", rid),
        where,
        where_key,
    )


@dataclass(frozen=True, slots=True)
class Grant:
    """What one connection may do; see the module docstring for the rules.

    ``where`` is the raw ``where`` claim (a JSON object) or ``None``; the server parses
    it into a filter. It is copied on construction and must be treated as read-only.
    Instances are immutable; ``hash()`` ignores ``where`` (equality does not).
    """

    sub: str
    read: Scope = ALL
    publish: Scope = ALL
    where: dict[str, object] | None = field(default=None, hash=False)
    exp: float | None = None

    ANONYMOUS: ClassVar[Grant]
    """The grant of every connection when no auth is configured: read and publish
    everything, no filter, no expiry."""

    def __post_init__(self) -> None:
        if not isinstance(self.sub, str) or not self.sub:
            raise ConfigError("Grant.sub must be a non-empty string")
        for name in ("read", "publish"):
            scope = getattr(self, name)
            if scope is None:
                continue
            if not isinstance(scope, frozenset):
                raise ConfigError(f"Grant.{name} must be a frozenset or None (all)")
            for item in scope:
                if not isinstance(item, str) or not COLLECTION_RE.fullmatch(item):
                    raise ConfigError(f"Grant.{name}: invalid collection name {_show(item)}")
        if self.where is not None:
            if not isinstance(self.where, dict) or not all(isinstance(k, str) for k in self.where):
                raise ConfigError("Grant.where must be a JSON object (a dict) or None")
            try:  # a private copy (shared with equal ones), and proof that it is JSON
                where, _ = _shared_where(self.where)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"Grant.where must be JSON: {exc}") from None
            object.__setattr__(self, "where", where)
        if self.exp is not None:
            if not _is_number(self.exp):
                raise ConfigError("Grant.exp must be a finite number (unix time) or None")
            object.__setattr__(self, "exp", float(self.exp))

    # -- construction --------------------------------------------------------------

    @classmethod
    def anonymous(cls) -> Grant:
        """The grant when no auth is configured (:attr:`ANONYMOUS`)."""
        return cls.ANONYMOUS

    @classmethod
    def from_claims(cls, claims: Mapping[str, object], rid: RequestId = None) -> Grant:
        """The grant of a verified token's claims; :class:`Unauthorized` if they are
        not of the shape in the module docstring. Messages name the claim, never echo
        the token."""
        get = claims.get
        sub, exp = get("sub"), get("exp")
        check_subject(sub, exp, rid)
        assert isinstance(sub, str)
        assert isinstance(exp, int | float)
        return cls.of_parts(sub, exp, claim_parts(get("read"), get("publish"), get("where"), rid))

    @classmethod
    def of_parts(cls, sub: str, exp: float, parts: ClaimParts) -> Grant:
        """The grant of a ``sub`` and ``exp`` that :func:`check_subject` passed and the
        :func:`claim_parts` of the other claims (which a verifier may keep and reuse:
        many tokens share them)."""
        read, publish, where, where_key = parts
        if where_key is None:  # not shareable: built and checked as any other grant
            return cls(sub=sub, read=read, publish=publish, where=where, exp=float(exp))
        key = (sub, float(exp), read, publish, where_key)
        grant = _grants.get(key)
        if grant is None:
            # Every part is checked (the scopes by _claim_scope, where by _shared_where):
            # no need for __post_init__ to check them again.
            grant = object.__new__(cls)
            setattr_ = object.__setattr__
            setattr_(grant, "sub", sub)
            setattr_(grant, "read", read)
            setattr_(grant, "publish", publish)
            setattr_(grant, "where", where)
            setattr_(grant, "exp", key[1])
            if len(_grants) >= _GRANTS_SIZE:
                _grants.clear()
            _grants[key] = grant
        return grant

    def to_claims(self) -> dict[str, object]:
        """The claims that :meth:`from_claims` turns back into this grant (``exp`` as
        an int, rounded down, and left out when there is none)."""
        claims: dict[str, object] = {
            "sub": self.sub,
            "read": _scope_frame(self.read),
            "publish": _scope_frame(self.publish),
        }
        if self.where is not None:
            claims["where"] = _copy_where(self.where)
        if self.exp is not None:
            claims["exp"] = math.floor(self.exp)
        return claims

    def to_frame(self) -> dict[str, object]:
        """The fields of the ``authed`` frame (without ``type``)::

        {"sub": str, "read": "*" | [sorted names], "where": {...} | None,
         "publish": "*" | [sorted names] ([] = none), "exp": int | None}
        """
        return {
            "sub": self.sub,
            "read": _scope_frame(self.read),
            "where": None if self.where is None else _copy_where(self.where),
            "publish": _scope_frame(self.publish),
            "exp": None if self.exp is None else math.floor(self.exp),
        }

    def frame_fields(self) -> FrameFields:
        """The fields of :meth:`to_frame` in order (sub, read, where, publish, exp),
        without copies: the lists and the ``where`` object are shared and must only be
        read, e.g. encoded at once. The session builds every ``authed`` frame from
        these; :meth:`to_frame` is the copy to keep."""
        return (
            self.sub,
            _shared_scope_frame(self.read),
            self.where,
            _shared_scope_frame(self.publish),
            None if self.exp is None else math.floor(self.exp),
        )

    # -- time ------------------------------------------------------------------------

    def expired(self, now: float, leeway: float = 0.0) -> bool:
        """Whether the grant has ended at ``now`` (unix time)."""
        return self.exp is not None and now >= self.exp + leeway

    def seconds_left(self, now: float) -> float | None:
        """Seconds until the grant ends (0 if it has), ``None`` if it never does."""
        return None if self.exp is None else max(0.0, self.exp - now)

    # -- read / publish --------------------------------------------------------------

    def may_read(self, collection: str) -> bool:
        return self.read is None or collection in self.read

    def may_publish(self, collection: str) -> bool:
        return self.publish is None or collection in self.publish

    def readable(self, requested: AbstractSet[str] | None, rid: RequestId = None) -> Scope:
        """The collections a sync or subscribe for ``requested`` (``None`` = the
        request named none) may see.

        ``None`` asks for everything the grant reads: the answer is the grant's read
        set (``None`` if it reads all). An explicit set must lie within the grant,
        else :class:`Forbidden` names the first collection (sorted) that does not.
        A grant that reads nothing forbids every sync and subscribe.
        """
        if self.read is not None and not self.read:
            raise Forbidden(f"{self.sub!r} may not read any collection", request_id=rid)
        if requested is None:
            return self.read
        wanted = frozenset(requested)
        if self.read is not None and not wanted <= self.read:
            name = min(wanted - self.read)
            raise Forbidden(f"{self.sub!r} may not read collection {_show(name)}", request_id=rid)
        return wanted

    def check_publish(self, collections: Iterable[str], rid: RequestId = None) -> None:
        """:class:`Forbidden` naming the first of ``collections`` (in the order given)
        the grant may not publish to. Check a whole batch before applying any of it."""
        if self.publish is None:
            return
        for name in collections:
            if name not in self.publish:
                raise Forbidden(
                    f"{self.sub!r} may not publish to collection {_show(name)}",
                    request_id=rid,
                )

    # -- refresh ---------------------------------------------------------------------

    def check_refresh(
        self,
        new: Grant,
        rid: RequestId = None,
        *,
        live: Iterable[AbstractSet[str] | None] = (),
    ) -> None:
        """:class:`Forbidden` unless ``new`` may replace this grant on a live connection
        (rules in the module docstring). ``live`` holds the collections of each live
        subscription of the connection, as :meth:`readable` returned them (``None`` =
        all)."""
        if new.sub != self.sub:
            raise Forbidden(
                f"a refreshed token may not change the subject "
                f"(the connection is {_show(self.sub)}, the token is for {_show(new.sub)})",
                request_id=rid,
            )
        if new.where is not self.where and _canonical(new.where) != _canonical(self.where):
            raise Forbidden("a refreshed token may not change the 'where' filter", request_id=rid)
        for name, old_scope, new_scope in (
            ("read", self.read, new.read),
            ("publish", self.publish, new.publish),
        ):
            if not _covers(old_scope, new_scope):
                widened = _first_outside(old_scope, new_scope)
                raise Forbidden(
                    f"a refreshed token may not widen {name!r} "
                    f"(it adds {_show(widened)}; reconnect to widen)",
                    request_id=rid,
                )
        for subscription in live:
            scope = None if subscription is None else frozenset(subscription)
            if not _covers(new.read, scope):
                lost = _first_outside(new.read, scope)
                raise Forbidden(
                    f"the refreshed token does not cover the live subscription "
                    f"(it may not read {_show(lost)})",
                    request_id=rid,
                )

    def may_refresh_to(self, new: Grant, *, live: Iterable[AbstractSet[str] | None] = ()) -> bool:
        """Whether :meth:`check_refresh` accepts ``new``."""
        try:
            self.check_refresh(new, live=live)
        except Forbidden:
            return False
        return True


Grant.ANONYMOUS = Grant(sub="anonymous", read=ALL, publish=ALL, where=None, exp=None)
