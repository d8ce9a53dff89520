"""Wire protocol v1, the client's side of it: requests and changes, with no I/O.

Requests are parsed and validated here (§3), and changes are validated and encoded
once, by whoever submits them (§3.3, §9). The frames the server answers with are
defined in ``frames.py``. Section numbers (§) refer to ``docs/protocol.md``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Final, NamedTuple, TypeAlias, cast

import msgspec

from statecast.core.accel import speedups as _speedups
from statecast.core.frames import PROTOCOL_VERSION, RequestId
from statecast.core.values import (
    MAX_DEPTH,
    InvalidValue,
    canonical_value,
    check_text,
    plain_line,
)
from statecast.errors import BadRequest, Conflict

__all__ = [
    "MAX_IDEMPOTENCY_KEY",
    "PROTOCOL_VERSION",
    "AuthRequest",
    "Change",
    "Conditions",
    "PingRequest",
    "Prepared",
    "PreparedChange",
    "PublishRequest",
    "Request",
    "RequestId",
    "StatsRequest",
    "SubscribeRequest",
    "SyncRequest",
    "check_conditions",
    "check_idempotency_key",
    "conditions_of",
    "op_of",
    "parse_publish_body",
    "parse_request",
    "prepare_change",
    "prepare_changes",
    "prepare_publish",
    "validate_collections",
]

# §3.9: the intervals a subscription may be conflated at, in seconds.
MIN_INTERVAL: Final = 0.01
MAX_INTERVAL: Final = 60.0

# §9: limits of the state model.
COLLECTION_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
MAX_KEY_LENGTH: Final = 1024
# §3.3: an idempotency key is 1 to 256 characters; if_seq is a seq (0: must not exist).
MAX_IDEMPOTENCY_KEY: Final = 256
IdempotencyKey: TypeAlias = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_IDEMPOTENCY_KEY)
]
IfSeq: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]


# ---------------------------------------------------------------------------
# Requests (§3). msgspec validates types in C; fields we don't know are ignored,
# so clients may add fields freely.


class ChangeIn(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    # gc=False: a publish line decodes to a thousand of these, which the cyclic
    # collector would otherwise track and scan; they hold only strings, a Raw, a bool
    # and an int, so they can never be part of a cycle.
    collection: str
    key: str
    # The raw JSON text of the value is kept as it came: it is valid JSON (the whole
    # line was parsed) and is forwarded without being decoded and encoded again.
    value: msgspec.Raw = msgspec.Raw()
    delete: bool = False
    if_seq: IfSeq | None = None  # §3.3 precondition


class SyncRequest(msgspec.Struct, tag_field="op", tag="sync"):
    """§3.1 ``sync``: a snapshot, optionally followed by live changes."""

    id: RequestId = None
    collections: list[str] | None = None
    live: bool = False
    where: Any = None  # §3.7, checked by filters.parse_where
    conflate: float | None = None  # §3.9, seconds


class SubscribeRequest(msgspec.Struct, tag_field="op", tag="subscribe"):
    """§3.2 ``subscribe``: live changes after ``from`` (default: now)."""

    id: RequestId = None
    collections: list[str] | None = None
    from_: int | None = msgspec.field(default=None, name="from")
    epoch: str | None = None
    where: Any = None  # §3.7, checked by filters.parse_where
    conflate: float | None = None  # §3.9, seconds


class PublishRequest(msgspec.Struct, tag_field="op", tag="publish"):
    """§3.3 ``publish``: one atomic batch of changes."""

    changes: list[ChangeIn]
    id: RequestId = None
    idempotency_key: IdempotencyKey | None = None  # §3.3


class AuthRequest(msgspec.Struct, tag_field="op", tag="auth"):
    """§3.8 ``auth``: present an access token (first, or to refresh it)."""

    token: str
    id: RequestId = None


class PingRequest(msgspec.Struct, tag_field="op", tag="ping"):
    """§3.4 ``ping``."""

    id: RequestId = None


class StatsRequest(msgspec.Struct, tag_field="op", tag="stats"):
    """§3.5 ``stats``."""

    id: RequestId = None


Request: TypeAlias = (
    SyncRequest | SubscribeRequest | PublishRequest | PingRequest | StatsRequest | AuthRequest
)

_request_decoder = msgspec.json.Decoder(Request)
_any_decoder = msgspec.json.Decoder()

# §3.6: words understood on lines that are not JSON, for people typing into nc.
_WORDS: Final[dict[bytes, Request]] = {
    b"sync": SyncRequest(),
    b"watch": SyncRequest(live=True),
    b"subscribe": SubscribeRequest(),
    b"ping": PingRequest(),
    b"stats": StatsRequest(),
}


def op_of(line: bytes) -> str | None:
    """Best effort: the ``op`` a line asks for, even when it is not a valid request."""
    stripped = line.strip()
    if not stripped.startswith(b"{"):
        word = stripped.split(None, 1)[0].lower() if stripped else b""
        return word.decode("ascii", "replace") or None
    try:
        obj = _any_decoder.decode(stripped)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    op = obj.get("op") if isinstance(obj, dict) else None
    return op if isinstance(op, str) else None


def _id_of(line: bytes) -> RequestId:
    """Best effort: the ``id`` of a request that failed validation, to echo it back."""
    try:
        obj = _any_decoder.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int | str) and not isinstance(rid, bool):
            return rid
    return None


def _check_utf8(line: bytes, request: Request | PublishBody | None = None) -> None:
    """§9: a request is UTF-8 as a whole, the fields the server ignores too (msgspec
    does not look into those). ASCII, the usual case, is checked at C speed. For a
    publish, the change whose value is not UTF-8 is named."""
    if line.isascii():
        return
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return
    rid = getattr(request, "id", None)
    for i, c in enumerate(getattr(request, "changes", ())):
        try:
            bytes(c.value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(
                f"changes[{i}]: invalid value: invalid UTF-8", request_id=rid
            ) from None
    raise BadRequest("invalid UTF-8 in the request (§1: lines are UTF-8 JSON)", request_id=rid)


def _undecodable(exc: Exception) -> str:
    """§1, §9: why a line is not a request (msgspec raises UnicodeDecodeError for
    invalid UTF-8 in a string and RecursionError past ~1000 levels of nesting)."""
    if isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8 in the request (§1: lines are UTF-8 JSON)"
    if isinstance(exc, RecursionError):
        return f"JSON nested too deeply (values may be nested at most {MAX_DEPTH} levels, §9)"
    return f"malformed JSON: {exc}"


def parse_request(line: bytes) -> Request:
    """Parse one request line (without its ``\\n``). Raises :class:`BadRequest`."""
    stripped = line.strip()
    if not stripped.startswith(b"{"):
        word = stripped.split(None, 1)[0].lower() if stripped else b""
        template = _WORDS.get(word)
        if template is None:
            shown = word[:40].decode("utf-8", "replace")
            raise BadRequest(
                f"unknown command {shown!r}: send a JSON request, or one of "
                "sync, watch, subscribe, ping, stats"
            )
        # The table holds immutable defaults; hand out a copy.
        return msgspec.structs.replace(template)
    try:
        request: Request = _request_decoder.decode(stripped)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}", request_id=_id_of(stripped)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(_undecodable(exc)) from None
    _check_utf8(stripped, request)
    rid = request.id
    if isinstance(request, SyncRequest | SubscribeRequest) and request.collections is not None:
        validate_collections(request.collections, rid)
    if isinstance(request, SubscribeRequest) and request.from_ is not None and request.from_ < 0:
        raise BadRequest("'from' must be a seq >= 0", request_id=rid)
    if isinstance(request, SyncRequest | SubscribeRequest) and request.conflate is not None:
        c = request.conflate
        if not MIN_INTERVAL <= c <= MAX_INTERVAL:
            raise BadRequest(
                f"'conflate' must be {MIN_INTERVAL} to {MAX_INTERVAL:g} seconds, not {c}",
                request_id=rid,
            )
        if isinstance(request, SyncRequest) and not request.live:
            raise BadRequest("'conflate' is for live changes: add \"live\": true", request_id=rid)
    return request


class PublishBody(msgspec.Struct):
    """The body of ``POST /v1/publish``: a publish request, ``op`` optional."""

    changes: list[ChangeIn]
    id: RequestId = None
    op: str = "publish"
    idempotency_key: IdempotencyKey | None = None


_publish_body_decoder = msgspec.json.Decoder(PublishBody)


def parse_publish_body(body: bytes) -> PublishRequest:
    try:
        req = _publish_body_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid publish body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(_undecodable(exc)) from None
    _check_utf8(body, req)
    if req.op != "publish":
        raise BadRequest(f"'op' must be 'publish' here, not {req.op!r}")
    return PublishRequest(changes=req.changes, id=req.id, idempotency_key=req.idempotency_key)


def validate_collections(names: Iterable[str], rid: RequestId = None) -> frozenset[str]:
    out = frozenset(names)
    if not out:
        raise BadRequest("'collections' must not be empty (leave it out for all)", request_id=rid)
    for name in out:
        if not COLLECTION_RE.fullmatch(name):
            raise BadRequest(f"invalid collection name {name[:140]!r}", request_id=rid)
    return out


# ---------------------------------------------------------------------------
# Changes (§3.3, §9). A change is validated and its key and value encoded once,
# by whoever submits it (a connection, or a producer thread), never on fan-out.

# (collection, key, key as JSON, value as JSON or None for a delete)
PreparedChange: TypeAlias = tuple[str, str, bytes, bytes | None]

_encode = msgspec.json.encode


class Change(msgspec.Struct, frozen=True):
    """A change for the embedding API: ``Change("orders", "O-1", {...})`` upserts,
    ``Change("orders", "O-1", delete=True)`` deletes."""

    collection: str
    key: str
    value: Any = None
    delete: bool = False
    if_seq: int | None = None  # §3.3: the record's last-written seq must be this (0: absent)


# §3.3 preconditions of a batch: (the change's index, the seq its record must be at).
Conditions: TypeAlias = list[tuple[int, int]]


def conditions_of(
    changes: Sequence[ChangeIn] | Sequence[Change | Mapping[str, Any]],
    rid: RequestId = None,
) -> Conditions | None:
    """The ``if_seq`` preconditions of a batch, or None when it has none; raises
    BadRequest for one that is not a seq >= 0 (the embedding API: the wire's are
    typed by msgspec already) or that makes no sense: ``if_seq: 0`` (must not exist)
    on a delete."""
    if changes and type(changes[0]) is ChangeIn:
        # The wire's changes (msgspec typed them): the usual batch has no if_seq, found
        # with one comprehension and a count instead of the loop below (this runs for
        # every publish).
        wire = cast("Sequence[ChangeIn]", changes)
        if_seqs = [c.if_seq for c in wire]
        if if_seqs.count(None) == len(if_seqs):
            return None
        if 0 not in if_seqs or not any(c.delete for c in wire):
            # msgspec has checked each is an int >= 0, and no delete says "must not
            # exist": every one is a condition as it is.
            return [(i, s) for i, s in enumerate(if_seqs) if s is not None]
    out: Conditions | None = None
    for i, c in enumerate(changes):
        if isinstance(c, Mapping):
            if_seq, delete = c.get("if_seq"), bool(c.get("delete", False))
        else:
            if_seq, delete = c.if_seq, c.delete
        if if_seq is None:
            continue
        if type(if_seq) is not int or if_seq < 0:
            raise BadRequest(
                f"changes[{i}].if_seq: must be a seq, an integer >= 0, not {if_seq!r}"[:300],
                request_id=rid,
            )
        if delete and if_seq == 0:
            raise BadRequest(
                f"changes[{i}].if_seq: 0 means the record must not exist, and this change "
                "deletes it: give the seq of the record it deletes",
                request_id=rid,
            )
        if out is None:
            out = []
        out.append((i, if_seq))
    return out


def check_conditions(
    batch: Sequence[PreparedChange],
    conditions: Conditions,
    seq_of: Callable[[str, str], int],
    rid: RequestId = None,
) -> Conflict | None:
    """§3.3.2: the first ``if_seq`` of a batch that does not hold, as the error to
    answer (None: they all hold). ``seq_of(collection, key)`` is the record's
    last-written seq in the state the batch would be applied on (0: absent)."""
    for i, expected in conditions:
        c = batch[i]
        current = seq_of(c[0], c[1])
        if current != expected:
            shown = c[1] if len(c[1]) <= 80 else c[1][:80] + "..."
            if not expected:
                why = f"exists (at seq {current}), and if_seq 0 says it must not"
            elif not current:
                why = f"does not exist, and if_seq says it is at seq {expected}"
            else:
                why = f"is at seq {current}, not {expected} (if_seq)"
            return Conflict(
                f"changes[{i}]: {c[0]}/{shown!r} {why}; nothing of the batch was applied",
                request_id=rid,
                change=i,
                current_seq=current,
            )
    return None


class Prepared(NamedTuple):
    """A validated batch (§3.3), with its preconditions and its idempotency key."""

    batch: list[PreparedChange]
    conditions: Conditions | None = None
    key: str | None = None


def check_idempotency_key(key: object, rid: RequestId = None) -> str:
    """§3.3: 1 to 256 characters of valid Unicode text (the wire's are typed by msgspec
    already; lone surrogates are looked for here)."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        shown = repr(key)[:60]
        raise BadRequest(
            f"idempotency_key: must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters, "
            f"not {shown}",
            request_id=rid,
        )
    if not check_text(key):
        raise BadRequest(
            "idempotency_key: not valid Unicode text (a lone surrogate)", request_id=rid
        )
    return key


def prepare_publish(
    changes: Iterable[Change | Mapping[str, Any]] | Change | Mapping[str, Any],
    *,
    idempotency_key: str | None = None,
) -> Prepared:
    """The embedding API's publish: the batch, its ``if_seq`` conditions, its key."""
    if isinstance(changes, Change | Mapping):
        changes = [changes]
    listed = list(changes)
    batch = prepare_changes(listed)
    key = None if idempotency_key is None else check_idempotency_key(idempotency_key)
    return Prepared(batch, conditions_of(listed), key)


def _check_target(collection: object, key: object, where: str) -> None:
    if not isinstance(collection, str) or not COLLECTION_RE.fullmatch(collection):
        raise BadRequest(
            f"{where}: invalid collection name {str(collection)[:140]!r} "
            "(1 to 128 of A-Z a-z 0-9 _ . -)"
        )
    if not isinstance(key, str) or not key:
        raise BadRequest(f"{where}: the key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise BadRequest(f"{where}: the key is longer than {MAX_KEY_LENGTH} characters")
    if not check_text(key):
        raise BadRequest(f"{where}: the key is not valid Unicode text (a lone surrogate)")


# Collection names seen valid before: most batches write a few collections, so the
# regular expression runs once per name, not once per change.
_known_collections: dict[str, str] = {}
# (A dict of each name to itself: the C fast path hands out the one str object it holds
# for a name, so that a collection's records share it instead of each keeping its own
# copy decoded from its request line.)


def _check_publish_target(request: PublishRequest, rid: RequestId) -> None:
    """Raise BadRequest for the first change of ``request`` with an invalid target."""
    for i, c in enumerate(request.changes):
        try:
            _check_target(c.collection, c.key, f"changes[{i}]")
        except BadRequest as exc:
            exc.request_id = rid
            raise


def prepare_change(change: Change | Mapping[str, Any], where: str = "change") -> PreparedChange:
    """Validate and encode one change from the embedding API."""
    collection: object
    key: object
    if isinstance(change, Change):
        collection, key, value, delete = change.collection, change.key, change.value, change.delete
    elif isinstance(change, Mapping):
        collection, key = change.get("collection"), change.get("key")
        delete = bool(change.get("delete", False))
        if not delete and "value" not in change:
            raise BadRequest(f"{where}: needs a 'value', or 'delete': true")
        value = change.get("value")
    else:
        raise BadRequest(f"{where}: expected a statecast.Change or a mapping")
    _check_target(collection, key, where)
    assert isinstance(collection, str)
    assert isinstance(key, str)
    if delete:
        return (collection, key, _encode(key), None)
    try:
        value_json = canonical_value(_encode(value))
    except InvalidValue as exc:
        raise BadRequest(f"{where}: invalid value: {exc}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"{where}: value is not JSON-serialisable: {exc}") from None
    return (collection, key, _encode(key), value_json)


def prepare_changes(
    changes: Iterable[Change | Mapping[str, Any]] | Change | Mapping[str, Any] | PublishRequest,
    *,
    line: bytes | None = None,
) -> list[PreparedChange]:
    """Validate a whole batch; any invalid change rejects all of it (§3.3).

    ``line``: the request line a :class:`PublishRequest` was decoded from. When it
    passes :func:`values.plain_line` (compact printable ASCII, no escapes), a value
    only needs its depth checked; that is tested only when the C fast path
    (:mod:`statecast.core.accel`) has not settled the batch on its own.
    """
    if isinstance(changes, PublishRequest):
        return _prepare_request(changes, line)
    if isinstance(changes, Change | Mapping):  # one change on its own
        changes = [changes]
    out = [prepare_change(c, f"changes[{i}]") for i, c in enumerate(changes)]
    if not out:
        raise BadRequest("a publish needs at least one change")
    return out


# Every byte but the opening brackets and the newline (values of a plain line hold no
# newline, so it separates them).
_NOT_OPENER: Final = bytes(b for b in range(256) if b not in b"[{\n")


def _prepare_request(request: PublishRequest, line: bytes | None) -> list[PreparedChange]:
    """The hot path of ingest: a publish from the wire (msgspec has checked the types).

    The C version (``_speedups.prepare_plain``) takes the common case: every change an
    upsert of a known collection, every key printable ASCII, every value canonical as
    sent. It returns None for anything else, and this function decides.

    The Python version is written with whole-batch operations that run at C speed
    (``map``, ``zip``, one ``join``, one encode of all the keys) instead of a Python
    loop over the changes: in CPython one loop iteration that unpacks, tests and
    builds a tuple costs as much as all of this per change (docs/performance.md has
    the profile). Whatever it does not settle for the whole batch at once (a delete,
    a line that is not plain, a missing value, a value with more than MAX_DEPTH
    opening brackets) goes through :func:`_prepare_each`, which checks one change at
    a time and names the first that is wrong. The rules are the same on both paths (§3.3, §9).
    """
    changes = request.changes
    rid = request.id
    n = len(changes)
    if not n:
        raise BadRequest("'changes' must not be empty", request_id=rid)
    if _speedups is not None:
        fast = _speedups.prepare_plain(changes, _known_collections, MAX_KEY_LENGTH, MAX_DEPTH)
        if fast is not None:
            return fast
    plain = line is not None and plain_line(line)
    # (Comprehensions rather than map(attrgetter): CPython 3.11 specialises their
    # attribute loads, and they come out about twice as fast.)
    names = [c.collection for c in changes]
    keys = [c.key for c in changes]
    known = _known_collections
    if not known.keys() >= set(names) or "" in keys or max(map(len, keys)) > MAX_KEY_LENGTH:
        _check_publish_target(request, rid)  # raises, naming the change
        for name in set(names):
            if len(known) < 4096:
                known[name] = name
    if not plain or True in [c.delete for c in changes]:
        return _prepare_each(request, plain)
    values = [bytes(c.value) for c in changes]
    if b"" in values:
        return _prepare_each(request, plain)  # raises, naming the change with no value
    # §9: a value of a plain line is canonical once it has at most MAX_DEPTH opening
    # brackets (values.shallow), counted for all the values at once: the brackets of
    # each value, separated by newlines.
    brackets = b"\n".join(values).translate(None, _NOT_OPENER)
    if len(brackets) - (n - 1) > MAX_DEPTH and max(map(len, brackets.split(b"\n"))) > MAX_DEPTH:
        return _prepare_each(request, plain)
    # The keys' JSON, in one encode: when it is as long as the keys plus their quotes
    # and commas, no key holds a character that is escaped or not ASCII, and when it
    # has no other comma, it splits into the keys' JSON strings.
    listed = _encode(keys)
    if len(listed) == sum(map(len, keys)) + 3 * n + 1 and listed.count(b",") == n - 1:
        key_jsons = listed[1:-1].split(b",")
    else:
        key_jsons = list(map(_encode, keys))
    out: list[PreparedChange] = list(zip(names, keys, key_jsons, values, strict=True))
    return out


def _prepare_each(request: PublishRequest, plain: bool) -> list[PreparedChange]:
    """:func:`_prepare_request` one change at a time (the targets are checked)."""
    rid = request.id
    out: list[PreparedChange] = []
    append = out.append
    for i, c in enumerate(request.changes):
        collection, key = c.collection, c.key
        if c.delete:
            append((collection, key, _encode(key), None))
            continue
        raw = bytes(c.value)
        if not raw:
            raise BadRequest(f"changes[{i}]: needs a 'value', or 'delete': true", request_id=rid)
        # A plain line's values are canonical once shallow (values.shallow, inlined).
        if not plain or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
            try:
                # §9: stored values are compact, one-line, valid UTF-8 JSON; values
                # that already are pass through untouched (the fast path).
                raw = canonical_value(raw)
            except InvalidValue as exc:
                raise BadRequest(f"changes[{i}]: invalid value: {exc}", request_id=rid) from None
        append((collection, key, _encode(key), raw))
    return out
