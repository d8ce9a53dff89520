"""Grant rules: what a connection may read, publish and refresh to (core/policy.py)."""

from __future__ import annotations

import ast
import math
import re
import uuid
from pathlib import Path

import pytest

from statecast.core import policy
from statecast.core.filters import parse_where, share_where
from statecast.core.policy import ALL, NONE, Grant
from statecast.errors import ConfigError, Forbidden, Unauthorized

EXP = 1_700_000_000.75


def grant(
    read: frozenset[str] | None = frozenset({"orders", "positions"}),
    publish: frozenset[str] | None = frozenset({"orders"}),
    where: dict[str, object] | None = None,
    sub: str = "alice",
    exp: float | None = EXP,
) -> Grant:
    return Grant(sub=sub, read=read, publish=publish, where=where, exp=exp)


def fs(*names: str) -> frozenset[str]:
    return frozenset(names)


# -- purity -------------------------------------------------------------------------


def test_policy_imports_only_stdlib_msgspec_and_errors() -> None:
    source = Path(policy.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            imported.add(node.module)
    allowed = {
        "__future__",
        "collections.abc",
        "copy",
        "dataclasses",
        "json",
        "math",
        "msgspec",
        "re",
        "typing",
        "statecast.errors",
    }
    assert imported <= allowed


# -- anonymous ----------------------------------------------------------------------


def test_anonymous_reads_and_publishes_everything() -> None:
    g = Grant.ANONYMOUS
    assert Grant.anonymous() is g
    assert g.read is ALL
    assert g.publish is ALL
    assert g.where is None
    assert g.exp is None
    assert g.readable(None) is None
    assert g.readable(fs("a", "b")) == fs("a", "b")
    g.check_publish(["anything", "at.all"])
    assert g.may_read("x")
    assert g.may_publish("x")
    assert not g.expired(1e12)
    assert g.seconds_left(0) is None
    assert g.to_frame() == {
        "sub": "anonymous",
        "read": "*",
        "where": None,
        "publish": "*",
        "exp": None,
    }


# -- read ---------------------------------------------------------------------------


def test_readable_omitted_collections_mean_the_grants_read_set() -> None:
    assert grant().readable(None) == fs("orders", "positions")


def test_readable_allows_a_subset() -> None:
    g = grant()
    assert g.readable(fs("orders")) == fs("orders")
    assert g.readable({"orders", "positions"}) == fs("orders", "positions")


def test_readable_forbids_naming_a_collection_outside_read() -> None:
    with pytest.raises(Forbidden, match=r"'alice' may not read collection 'audit'") as info:
        grant().readable(fs("orders", "zz", "audit"), rid=7)
    assert info.value.request_id == 7
    assert info.value.code == "forbidden"


def test_readable_all_grant_passes_requests_through() -> None:
    g = grant(read=ALL)
    assert g.readable(None) is None
    assert g.readable(fs("x")) == fs("x")


def test_readable_with_no_read_rights_forbids_everything() -> None:
    g = grant(read=NONE)
    with pytest.raises(Forbidden, match="may not read any collection"):
        g.readable(None)
    with pytest.raises(Forbidden):
        g.readable(fs("orders"))


# -- publish ------------------------------------------------------------------------


def test_check_publish_allows_listed_collections() -> None:
    grant().check_publish(["orders", "orders"])
    grant(publish=ALL).check_publish(["x", "y"])


def test_check_publish_names_the_first_forbidden_collection() -> None:
    with pytest.raises(Forbidden, match=r"may not publish to collection 'positions'") as info:
        grant().check_publish(["orders", "positions", "audit"], rid="p1")
    assert info.value.request_id == "p1"


def test_check_publish_with_none_forbids_everything() -> None:
    g = grant(publish=NONE)
    assert not g.may_publish("orders")
    with pytest.raises(Forbidden, match="'orders'"):
        g.check_publish(["orders"])
    g.check_publish([])  # an empty batch publishes nothing


# -- refresh ------------------------------------------------------------------------


def test_refresh_same_scopes_later_exp_is_allowed() -> None:
    old = grant()
    new = grant(exp=EXP + 3600)
    old.check_refresh(new, live=[fs("orders")])
    assert old.may_refresh_to(new)


def test_refresh_earlier_exp_is_allowed() -> None:
    assert grant().may_refresh_to(grant(exp=EXP - 10))


def test_refresh_may_not_change_sub() -> None:
    with pytest.raises(Forbidden, match="may not change the subject") as info:
        grant().check_refresh(grant(sub="mallory"), rid=3)
    assert info.value.request_id == 3
    assert not grant().may_refresh_to(grant(sub="mallory"))


@pytest.mark.parametrize(
    ("old", "new", "added"),
    [
        (fs("orders"), fs("orders", "audit"), "audit"),
        (fs("orders"), ALL, "*"),
        (NONE, fs("orders"), "orders"),
    ],
)
def test_refresh_may_not_widen_read_or_publish(
    old: frozenset[str] | None, new: frozenset[str] | None, added: str
) -> None:
    with pytest.raises(Forbidden, match=rf"may not widen 'read' \(it adds '{re.escape(added)}'"):
        grant(read=old).check_refresh(grant(read=new))
    with pytest.raises(Forbidden, match=r"may not widen 'publish'"):
        grant(publish=old).check_refresh(grant(publish=new))


def test_refresh_may_narrow_read_and_publish() -> None:
    old = grant(read=ALL, publish=ALL)
    assert old.may_refresh_to(grant(read=fs("orders"), publish=NONE))
    assert grant().may_refresh_to(grant(read=fs("orders"), publish=NONE))


def test_refresh_must_still_cover_the_live_subscription() -> None:
    old = grant()
    narrower = grant(read=fs("orders"))
    assert old.may_refresh_to(narrower, live=[fs("orders")])
    with pytest.raises(Forbidden, match=r"live subscription .*'positions'"):
        old.check_refresh(narrower, live=[fs("orders", "positions")])
    # A subscription to everything (under a read-all grant) needs a read-all refresh.
    everything = grant(read=ALL)
    assert everything.may_refresh_to(grant(read=ALL), live=[None])
    with pytest.raises(Forbidden, match=r"may not read '\*'"):
        everything.check_refresh(grant(read=fs("orders")), live=[None])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (None, {"account": "ACC-1"}),
        ({"account": "ACC-1"}, None),
        ({"account": "ACC-1"}, {"account": "ACC-2"}),
        ({"qty": 1}, {"qty": 1.0}),
        ({"qty": 1}, {"qty": True}),
        ({"account": "ACC-1"}, {"account": "ACC-1", "desk": "fx"}),
    ],
)
def test_refresh_may_not_change_where(
    old: dict[str, object] | None, new: dict[str, object] | None
) -> None:
    with pytest.raises(Forbidden, match="may not change the 'where' filter"):
        grant(where=old).check_refresh(grant(where=new))


def test_refresh_where_compares_as_json_not_by_key_order() -> None:
    a = grant(where={"account": "ACC-1", "desk": ["fx", "rates"]})
    b = grant(where={"desk": ["fx", "rates"], "account": "ACC-1"})
    assert a.may_refresh_to(b)


# -- frames and claims --------------------------------------------------------------


def test_to_frame_sorts_and_floors() -> None:
    g = grant(read=fs("positions", "orders"), publish=NONE, where={"account": "ACC-1"}, exp=EXP)
    assert g.to_frame() == {
        "sub": "alice",
        "read": ["orders", "positions"],
        "where": {"account": "ACC-1"},
        "publish": [],
        "exp": math.floor(EXP),
    }
    frame = g.to_frame()
    where = frame["where"]
    assert isinstance(where, dict)
    where["account"] = "changed"  # a copy: the grant is untouched
    assert g.where == {"account": "ACC-1"}


@pytest.mark.parametrize(
    "g",
    [
        grant(read=fs("positions", "orders"), publish=NONE, where={"account": "ACC-1"}),
        grant(read=ALL, publish=ALL, where=None, exp=None),
        grant(read=NONE, publish=fs("b", "a"), where={"n": {"in": [1, 2.5, True]}}),
    ],
)
def test_frame_fields_are_to_frame_in_order(g: Grant) -> None:
    """The session builds ``authed`` from frame_fields(): the same values as
    to_frame(), in the frame's field order (sub, read, where, publish, exp)."""
    frame = g.to_frame()
    assert g.frame_fields() == tuple(frame[k] for k in ("sub", "read", "where", "publish", "exp"))


def test_frame_fields_share_rather_than_copy() -> None:
    a = grant(read=fs("orders"), where={"account": "ACC-1"}, sub="a")
    b = grant(read=fs("orders"), where={"account": "ACC-1"}, sub="b")
    assert a.frame_fields()[1] is b.frame_fields()[1]  # one sorted list per scope
    assert a.frame_fields()[2] is a.where  # the grant's own (shared, read-only) where


def test_claim_parts_and_of_parts_give_the_from_claims_grant() -> None:
    claims: dict[str, object] = {
        "sub": "carol",
        "exp": 1_700_000_000,
        "read": ["orders", "positions"],
        "publish": "*",
        "where": {"account": "ACC-7"},
    }
    parts = policy.claim_parts(claims["read"], claims["publish"], claims["where"])
    assert parts[0] == fs("orders", "positions")
    assert parts[1] is ALL
    assert parts[2] == {"account": "ACC-7"}
    assert parts[2] is not claims["where"]  # the shared private copy
    assert Grant.of_parts("carol", 1_700_000_000, parts) is Grant.from_claims(claims)
    # no where: key b"", and the grant has none
    none = policy.claim_parts(None, None, None)
    assert none == (NONE, NONE, None, b"")
    assert Grant.of_parts("dave", 5, none).where is None


def test_claim_parts_names_the_claim_that_is_wrong() -> None:
    with pytest.raises(Unauthorized, match="'where' claim must be a JSON object") as info:
        policy.claim_parts(["orders"], None, [1], rid=4)
    assert info.value.request_id == 4
    with pytest.raises(Unauthorized, match="'publish' claim must be"):
        policy.claim_parts(["orders"], "none", None)


def test_subject_is_checked_before_the_other_claims() -> None:
    """Both paths of tokens.py report the first fault in the same order: sub, exp,
    where, read, publish."""
    with pytest.raises(Unauthorized, match="'sub' claim must be a non-empty string"):
        Grant.from_claims({"sub": "", "exp": 5, "read": 7, "publish": 7, "where": [1]})
    with pytest.raises(Unauthorized, match="'exp' claim must be a number"):
        Grant.from_claims({"sub": "a", "exp": "soon", "read": 7, "publish": 7, "where": [1]})
    with pytest.raises(Unauthorized, match="'where' claim must be a JSON object"):
        Grant.from_claims({"sub": "a", "exp": 5, "read": 7, "publish": 7, "where": [1]})
    with pytest.raises(Unauthorized, match="'read' claim must be"):
        Grant.from_claims({"sub": "a", "exp": 5, "read": 7, "publish": 7})


def test_claims_roundtrip() -> None:
    g = grant(where={"account": "ACC-1"}, exp=1_700_000_000)
    assert Grant.from_claims(g.to_claims()) == g
    g2 = grant(read=ALL, publish=ALL, exp=1_700_000_000)
    assert g2.to_claims() == {"sub": "alice", "read": "*", "publish": "*", "exp": 1_700_000_000}
    assert Grant.from_claims(g2.to_claims()) == g2


def test_from_claims_missing_read_and_publish_mean_none() -> None:
    g = Grant.from_claims({"sub": "bob", "exp": 5, "read": None})
    assert g.read == NONE
    assert g.publish == NONE
    assert g.where is None
    assert g.exp == 5.0


def test_from_claims_dedupes_lists() -> None:
    g = Grant.from_claims({"sub": "bob", "exp": 5, "read": ["a", "a", "b"], "publish": []})
    assert g.read == fs("a", "b")
    assert g.publish == NONE


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": 5}, "no 'sub' claim"),
        ({"sub": "", "exp": 5}, "'sub' claim must be a non-empty string"),
        ({"sub": 5, "exp": 5}, "'sub' claim must be a non-empty string"),
        ({"sub": "a\nb", "exp": 5}, "printable"),
        ({"sub": "x" * 257, "exp": 5}, "at most 256"),
        ({"sub": "a"}, "no 'exp' claim"),
        ({"sub": "a", "exp": "soon"}, "'exp' claim must be a number"),
        ({"sub": "a", "exp": True}, "'exp' claim must be a number"),
        ({"sub": "a", "exp": math.inf}, "'exp' claim must be a number"),
        ({"sub": "a", "exp": 5, "read": "orders"}, r"'read' claim must be \"\*\" or a list"),
        ({"sub": "a", "exp": 5, "read": {"a": 1}}, "'read' claim must be"),
        (
            {"sub": "a", "exp": 5, "read": ["ok", 1]},
            "'read' claim has an invalid collection name 1",
        ),
        ({"sub": "a", "exp": 5, "read": ["*"]}, r"invalid collection name '\*'"),
        ({"sub": "a", "exp": 5, "publish": ["bad name"]}, "'publish' claim has an invalid"),
        ({"sub": "a", "exp": 5, "publish": "none"}, "'publish' claim must be"),
        ({"sub": "a", "exp": 5, "where": ["x"]}, "'where' claim must be a JSON object"),
        ({"sub": "a", "exp": 5, "where": "account=1"}, "'where' claim must be a JSON object"),
        ({"sub": "a", "exp": 5, "where": {"x": math.nan}}, "NaN or Infinity"),
        # json.loads lets a lone surrogate through; no frame can carry one (authed
        # echoes the where claim), so it is refused with the claim named.
        ({"sub": "a", "exp": 5, "where": {"account": "\ud800"}}, "lone surrogate"),
        ({"sub": "a", "exp": 5, "where": {"\udc00": 1}}, "lone surrogate"),
        ({"sub": "a", "exp": 5, "where": {"a": {"in": ["x", "\ud800"]}}}, "lone surrogate"),
    ],
)
def test_from_claims_rejects_bad_shapes(claims: dict[str, object], message: str) -> None:
    with pytest.raises(Unauthorized, match=message) as info:
        Grant.from_claims(claims, rid=9)
    assert type(info.value) is Unauthorized
    assert info.value.request_id == 9


# -- the dataclass ------------------------------------------------------------------


def test_grant_is_frozen_hashable_and_copies_where() -> None:
    where: dict[str, object] = {"account": "ACC-1"}
    g = grant(where=where)
    where["account"] = "ACC-2"
    assert g.where == {"account": "ACC-1"}
    assert hash(g) == hash(grant(where={"account": "other"}))  # where is not hashed...
    assert g != grant(where={"account": "other"})  # ...but is compared
    with pytest.raises(AttributeError):
        g.sub = "bob"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sub": ""},
        {"read": fs("bad name")},
        {"publish": {"orders"}},
        {"where": {"x": math.nan}},
        {"where": ["x"]},
        {"exp": math.nan},
        {"exp": "soon"},
    ],
)
def test_grant_validates_its_fields(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"sub": "alice", "read": ALL, "publish": ALL}
    with pytest.raises(ConfigError):
        Grant(**{**base, **kwargs})  # type: ignore[arg-type]


def test_expiry_helpers() -> None:
    g = grant(exp=100.0)
    assert not g.expired(99.9)
    assert g.expired(100.0)
    assert not g.expired(100.5, leeway=1)
    assert g.seconds_left(40) == 60
    assert g.seconds_left(140) == 0


# -- sharing --------------------------------------------------------------------------


def claims_of(sub: str = "alice", **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sub": sub,
        "exp": 2_000_000_000,
        "read": ["orders", "positions"],
        "publish": [],
        "where": {"account": "ACC-1"},
    }
    base.update(extra)
    return base


def test_equal_claims_give_one_grant() -> None:
    a = Grant.from_claims(claims_of())
    assert Grant.from_claims(claims_of()) is a
    assert Grant.from_claims(claims_of(exp=2_000_000_000.0)) is a  # the same number
    b = Grant.from_claims(claims_of("bob"))
    assert b is not a
    # Other subjects with the same claims share the parts.
    assert b.where is a.where
    assert b.read is a.read
    assert b.publish is NONE
    assert Grant.from_claims(claims_of(read=["positions", "orders"])).read is a.read


def test_shared_where_keeps_json_types_apart() -> None:
    one, real, true = (Grant.from_claims(claims_of(where={"n": v})) for v in (1, 1.0, True))
    assert [type(g.where["n"]) for g in (one, real, true) if g.where] == [int, float, bool]
    assert one.where is not real.where
    assert Grant(sub="x", where={"a": None}).where == {"a": None}
    with pytest.raises(ConfigError, match="JSON"):
        Grant(sub="x", where={"a": math.nan})  # never taken for the null just kept
    with pytest.raises(Unauthorized, match="NaN"):
        Grant.from_claims(claims_of(where={"a": math.nan}))


def test_shared_where_only_for_plain_json() -> None:
    u = uuid.UUID(int=7)
    assert Grant(sub="x", where={"id": str(u)}).where == {"id": str(u)}
    with pytest.raises(ConfigError, match="JSON"):
        Grant(sub="x", where={"id": u})  # msgspec would spell it as the string
    assert Grant(sub="x", where={"a": (1, 2)}).where == {"a": [1, 2]}  # as JSON does
    big: dict[str, object] = {"a": 10**30}  # beyond MessagePack: not shared, still a grant
    assert Grant(sub="x", where=big).where == big


def test_a_grant_where_is_never_the_callers_object() -> None:
    mine: dict[str, object] = {"account": "ACC-1"}
    g = Grant(sub="x", where=mine)
    mine["account"] = "ACC-2"
    assert g.where == {"account": "ACC-1"}
    frame = g.to_frame()
    assert frame["where"] == {"account": "ACC-1"}
    assert frame["where"] is not g.where
    claims = g.to_claims()
    assert claims["where"] is not g.where


def test_grants_share_one_parsed_filter() -> None:
    a = Grant.from_claims(claims_of("a", where={"account": "ACC-9"}))
    b = Grant.from_claims(claims_of("b", where={"account": "ACC-9"}))
    w = share_where(a.where, "token.where")
    assert w is not None
    assert parse_where(b.where, "token.where") is w  # found by identity
    assert parse_where({"account": "ACC-9"}) is w  # equal filters are one object
    assert parse_where({"account": {"in": ["ACC-9", "ACC-9"]}}) is w
    assert parse_where({"f": {"in": []}}) is parse_where({"g": 1, "h": {"in": []}})


def test_huge_numbers_are_not_times() -> None:
    with pytest.raises(Unauthorized, match="'exp' claim must be a number"):
        Grant.from_claims(claims_of(exp=10**400))


def test_sharing_tables_stay_small() -> None:
    for i in range(3 * policy._GRANTS_SIZE):
        Grant.from_claims(claims_of(f"user-{i}", where={"account": f"A-{i}"}, read=[f"c{i}"]))
    assert len(policy._grants) <= policy._GRANTS_SIZE
    assert len(policy._wheres) <= policy._SHARED_SIZE
    assert len(policy._scopes) <= policy._SHARED_SIZE
