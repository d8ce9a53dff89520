"""statecast.core.filters: where filters (docs/protocol.md §3.7). Objects only."""

from __future__ import annotations

import ast
import pickle
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import statecast.core.filters as filters_module
from statecast.core.filters import (
    MAX_FIELD_LENGTH,
    MAX_FIELDS,
    MAX_IN_VALUES,
    MAX_STRING_LENGTH,
    FilterSet,
    Where,
    conjoin,
    parse_where,
    transition,
)
from statecast.errors import BadRequest

__all__: list[str] = []


def w(obj: object) -> Where:
    """parse_where for a where that is known to be a real filter."""
    parsed = parse_where(obj)
    assert parsed is not None
    return parsed


def enc(value: object) -> bytes:
    return msgspec.json.encode(value)


# ---------------------------------------------------------------------------
# Parsing


def test_no_filter() -> None:
    assert parse_where(None) is None
    assert parse_where({}) is None


def test_valid_forms() -> None:
    eq = w({"status": "open"})
    assert eq.to_json() == {"status": "open"}
    assert eq.fields == frozenset({"status"})
    many = w({"account": {"in": ["A", "B"]}, "qty": 5, "live": True, "note": None})
    assert many.to_json() == {
        "account": {"in": ["A", "B"]},
        "live": True,
        "note": None,
        "qty": 5,
    }
    assert not many.empty


def test_value_and_single_in_are_the_same_filter() -> None:
    assert w({"a": 1}) == w({"a": {"in": [1]}})
    assert w({"a": {"in": [1]}}).to_json() == {"a": 1}


def test_canonical_equality_and_hash() -> None:
    a = w({"x": {"in": ["b", "a", "b"]}, "y": 1})
    b = w({"y": {"in": [1, 1.0]}, "x": {"in": ["a", "b"]}})
    assert a == b
    assert hash(a) == hash(b)
    assert {a: "group"}[b] == "group"
    assert a.to_json() == b.to_json() == {"x": {"in": ["a", "b"]}, "y": 1}
    assert list(a.to_json()) == ["x", "y"]


def test_numbers_are_canonical_and_bools_are_not_numbers() -> None:
    assert w({"n": 1}) == w({"n": 1.0}) == w({"n": 1e0})
    assert w({"n": 0}) == w({"n": -0.0})
    assert w({"n": 1.0}).to_json() == {"n": 1}
    assert isinstance(w({"n": 1.0}).to_json()["n"], int)
    assert w({"n": 1.5}).to_json() == {"n": 1.5}
    assert w({"n": True}) != w({"n": 1})
    assert w({"n": False}) != w({"n": 0})
    assert w({"n": None}) != w({"n": False})
    both = w({"n": {"in": [1, True, 0, False, None]}})
    assert both.to_json() == {"n": {"in": [None, False, True, 0, 1]}}
    assert w({"n": "1"}) != w({"n": 1})


def test_in_values_sorted_by_kind_then_value() -> None:
    where = w({"f": {"in": ["b", 2.5, True, None, -3, "a", False, 10]}})
    assert where.to_json() == {"f": {"in": [None, False, True, -3, 2.5, 10, "a", "b"]}}


def test_empty_in_matches_nothing() -> None:
    nothing = w({"a": {"in": []}, "b": 1})
    assert nothing is not None
    assert nothing.empty
    assert nothing == Where.NOTHING
    assert hash(nothing) == hash(Where.NOTHING)
    assert not nothing.matches({"a": 1, "b": 1})
    assert nothing.fields == frozenset()
    assert parse_where(Where.NOTHING.to_json()) == Where.NOTHING


def test_round_trip_and_pickle() -> None:
    where = w({"a": {"in": [3, "x", None]}, "b": False})
    assert parse_where(where.to_json()) == where
    assert parse_where(msgspec.json.decode(enc(where.to_json()))) == where
    assert pickle.loads(pickle.dumps(where)) == where
    assert repr(where) == 'Where({"a":{"in":[null,3,"x"]},"b":false})'


def test_where_is_immutable_and_built_by_parse() -> None:
    where = w({"a": 1})
    with pytest.raises(AttributeError):
        where._empty = True
    with pytest.raises(AttributeError):
        del where._conds
    with pytest.raises(TypeError, match="parse_where"):
        Where({"a": frozenset({1})})


def test_limits_at_the_boundary_are_accepted() -> None:
    assert len(w({f"f{i}": i for i in range(MAX_FIELDS)}).fields) == MAX_FIELDS
    w({"a": {"in": list(range(MAX_IN_VALUES))}})
    w({"x" * MAX_FIELD_LENGTH: 1})
    w({"a": "s" * MAX_STRING_LENGTH})
    w({"a": {"in": ["s" * MAX_STRING_LENGTH]}})
    # Duplicates count as sent, and a full list of one value is fine.
    assert w({"a": {"in": [7] * MAX_IN_VALUES}}) == w({"a": 7})


_MALFORMED: list[tuple[object, str]] = [
    ([], "where: must be an object, not an array"),
    ("status=open", "where: must be an object, not a string"),
    (1, "where: must be an object, not a number"),
    (True, "where: must be an object, not a boolean"),
    ({"status": {"gt": 1}}, "where.status: unknown operator 'gt' (use a value, or {\"in\": [...]}"),
    ({"status": {"in": [1], "eq": 2}}, "where.status: unknown operator 'eq'"),
    ({"status": {}}, "where.status: an empty object is not a condition"),
    ({"account": {"in": "A"}}, "where.account: 'in' must be a list, not a string"),
    ({"account": {"in": {"A": 1}}}, "where.account: 'in' must be a list, not an object"),
    ({"account": {"in": None}}, "where.account: 'in' must be a list, not null"),
    ({"account": {"in": 3}}, "where.account: 'in' must be a list, not a number"),
    ({"a": {"b": {"c": 1}}}, "where.a: unknown operator 'b'"),
    ({"a": {"b": 1}}, "where.a: unknown operator 'b'"),
    ({"tags": [1, 2]}, "where.tags: a condition cannot be an array"),
    ({"tags": []}, "where.tags: a condition cannot be an array"),
    ({"a": {"in": [[1]]}}, "where.a.in[0]: expected a string, number, boolean or null, not an"),
    ({"a": {"in": [1, {"x": 1}]}}, "where.a.in[1]: expected a string, number, boolean or null"),
    ({"a": {"in": [1, {"in": [1]}]}}, "where.a.in[1]: expected a string, number, boolean or null"),
    ({f"f{i}": i for i in range(MAX_FIELDS + 1)}, "where: 33 fields (at most 32)"),
    ({"a": {"in": list(range(MAX_IN_VALUES + 1))}}, "where.a: 'in' has 1001 values (at most 1000)"),
    ({"": 1}, "where: field name '' must be 1 to 128 characters"),
    ({"x" * (MAX_FIELD_LENGTH + 1): 1}, "where: field name 'xxxxxxxx"),
    ({"a": "s" * (MAX_STRING_LENGTH + 1)}, "where.a: a string is longer than 1024 characters"),
    ({"a": {"in": ["ok", "s" * 1025]}}, "where.a.in[1]: a string is longer than 1024"),
    ({"a": float("nan")}, "where.a: numbers must be finite"),
    ({"a": {"in": [float("inf")]}}, "where.a.in[0]: numbers must be finite"),
    ({1: 2}, "where: field names must be strings, not a number"),
    ({"a": {1, 2}}, "where.a: expected a string, number, boolean or null, not a set"),
    ({"a b": [1]}, 'where["a b"]: a condition cannot be an array'),
    ({"ok": 1, "bad": {"in": "x"}}, "where.bad: 'in' must be a list"),
]


@pytest.mark.parametrize(("obj", "message"), _MALFORMED)
def test_malformed_where_is_a_bad_request_naming_the_path(obj: object, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_where(obj)
    assert info.value.code == "bad_request"
    assert info.value.message.startswith(message), info.value.message


def test_error_path_uses_the_field_argument() -> None:
    with pytest.raises(BadRequest, match=r"^token\.where: must be an object"):
        parse_where([], field="token.where")
    with pytest.raises(BadRequest, match=r"^token\.where\.acct: 'in' must be a list"):
        parse_where({"acct": {"in": 1}}, field="token.where")


def test_long_names_are_truncated_in_messages() -> None:
    with pytest.raises(BadRequest) as info:
        parse_where({"a": {"o" * 5000: 1}})
    assert len(info.value.message) < 200


# ---------------------------------------------------------------------------
# Matching


def test_equality_and_in() -> None:
    eq = w({"status": "open"})
    assert eq.matches({"status": "open", "other": 1})
    assert not eq.matches({"status": "closed"})
    one_of = w({"account": {"in": ["A", "B"]}})
    assert one_of.matches({"account": "A"})
    assert one_of.matches({"account": "B"})
    assert not one_of.matches({"account": "C"})


def test_all_conditions_must_hold() -> None:
    both = w({"a": 1, "b": {"in": ["x", "y"]}})
    assert both.matches({"a": 1, "b": "y"})
    assert not both.matches({"a": 2, "b": "y"})
    assert not both.matches({"a": 1, "b": "z"})
    assert not both.matches({"a": 1})


def test_missing_field_never_matches_even_null() -> None:
    null = w({"note": None})
    assert null.matches({"note": None})
    assert not null.matches({})
    assert not null.matches({"Note": None})
    assert not w({"note": {"in": [None, 1]}}).matches({"other": None})


@pytest.mark.parametrize("value", [None, [], [{"a": 1}], "a", 1, True, 1.5])
def test_non_object_values_never_match(value: object) -> None:
    assert not w({"a": 1}).matches(value)
    assert not w({"a": {"in": [None, 1, "a", True]}}).matches(value)


def test_true_is_not_one() -> None:
    assert not w({"n": 1}).matches({"n": True})
    assert not w({"n": 1.0}).matches({"n": True})
    assert not w({"n": True}).matches({"n": 1})
    assert not w({"n": True}).matches({"n": 1.0})
    assert not w({"n": 0}).matches({"n": False})
    assert not w({"n": False}).matches({"n": 0})
    assert not w({"n": {"in": [0, 1]}}).matches({"n": True})
    assert not w({"n": {"in": [True, False]}}).matches({"n": 1})
    assert w({"n": True}).matches({"n": True})
    assert w({"n": {"in": [False]}}).matches({"n": False})
    assert not w({"n": False}).matches({"n": None})


def test_numbers_compare_numerically_and_exactly() -> None:
    assert w({"n": 1}).matches({"n": 1.0})
    assert w({"n": 1.0}).matches({"n": 1})
    assert w({"n": 0}).matches({"n": -0.0})
    assert w({"n": 100}).matches(msgspec.json.decode(b'{"n":1e2}'))
    assert not w({"n": 2**53 + 1}).matches({"n": 2.0**53})
    assert w({"n": 2**53}).matches({"n": 2.0**53})
    assert w({"n": 10**30}).matches({"n": 10**30})
    assert not w({"n": 1}).matches({"n": "1"})
    assert not w({"n": "1"}).matches({"n": 1})
    assert not w({"n": 0.1}).matches({"n": 0.1000001})


def test_nested_values_in_records_never_match() -> None:
    assert not w({"a": 1}).matches({"a": [1]})
    assert not w({"a": 1}).matches({"a": {"in": [1]}})
    assert not w({"a": None}).matches({"a": {}})


def test_matches_json() -> None:
    where = w({"a": {"in": [1, "x"]}})
    assert where.matches_json(b'{"a":1.0,"b":[1,2]}')
    assert where.matches_json(b'{"a":"x"}')
    assert not where.matches_json(b'{"a":true}')
    assert not where.matches_json(b"[1]")
    assert not where.matches_json(b"null")
    assert not where.matches_json(None)
    assert not Where.NOTHING.matches_json(b'{"a":1}')


# ---------------------------------------------------------------------------
# Conjunction


def test_and_of_different_fields_is_the_union_of_conditions() -> None:
    both = w({"a": 1}).and_(w({"b": "x"}))
    assert both == w({"a": 1, "b": "x"})
    assert both.matches({"a": 1, "b": "x"})
    assert not both.matches({"a": 1})


def test_and_intersects_conditions_on_one_field() -> None:
    assert w({"a": {"in": [1, 2, 3]}}).and_(w({"a": {"in": [2, 3, 4]}})) == w({"a": {"in": [2, 3]}})
    assert w({"a": {"in": [1, 2]}}).and_(w({"a": 2})) == w({"a": 2})
    assert w({"a": 1}).and_(w({"a": {"in": [1.0, 5]}})) == w({"a": 1})


def test_disjoint_conditions_match_nothing() -> None:
    assert w({"a": 1}).and_(w({"a": 2})) is Where.NOTHING
    assert w({"a": {"in": [1, 2]}}).and_(w({"a": {"in": ["1", "2"]}})) is Where.NOTHING
    assert w({"a": 1}).and_(w({"a": True})) is Where.NOTHING
    assert w({"a": 1, "b": 2}).and_(w({"b": 3})).empty
    assert Where.NOTHING.and_(w({"a": 1})) is Where.NOTHING
    assert w({"a": 1}).and_(Where.NOTHING) is Where.NOTHING
    assert not Where.NOTHING.matches({"a": 1})
    assert Where.NOTHING.to_json() == {"_nothing": {"in": []}}


def test_and_with_none_or_itself_or_wider() -> None:
    where = w({"a": 1})
    assert where.and_(None) is where
    assert where.and_(where) is where
    assert where.and_(w({"a": {"in": [1, 2]}})) is where
    assert (where & w({"b": 2})) == w({"a": 1, "b": 2})


def test_conjoin() -> None:
    token = w({"account": "A"})
    assert conjoin(None, None) is None
    assert conjoin(token, None) is token
    assert conjoin(None, token) is token
    # The client cannot widen the token's claim.
    widened = conjoin(token, w({"account": {"in": ["A", "B"]}}))
    assert widened == token
    assert conjoin(token, w({"account": "B"})) is Where.NOTHING
    narrowed = conjoin(token, w({"status": "open"}))
    assert narrowed == w({"account": "A", "status": "open"})


def test_and_can_exceed_the_parse_limit_of_fields() -> None:
    left = w({f"l{i}": i for i in range(MAX_FIELDS)})
    right = w({f"r{i}": i for i in range(MAX_FIELDS)})
    assert len(left.and_(right).fields) == 2 * MAX_FIELDS


# ---------------------------------------------------------------------------
# Properties


def _json_equal(a: object, b: object) -> bool:
    """JSON scalar equality, written independently of the module (Fractions)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, int | float) and isinstance(b, int | float):
        return Fraction(a) == Fraction(b)
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def _reference_matches(where_json: dict[str, Any], value: object) -> bool:
    if not isinstance(value, dict):
        return False
    for field, cond in where_json.items():
        if field not in value:
            return False
        allowed = cond["in"] if isinstance(cond, dict) else [cond]
        if not any(_json_equal(value[field], x) for x in allowed):
            return False
    return True


_FIELDS = ["a", "b", "c"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 0.5, -1.5, 2**53, 2.0**53, 2**53 + 1]),
    st.text(alphabet="ab1", max_size=2),
)
conditions = st.one_of(
    scalars,
    st.lists(scalars, max_size=5).map(lambda vs: {"in": vs}),
)
where_jsons = st.dictionaries(st.sampled_from(_FIELDS), conditions, max_size=3)
record_values = st.one_of(
    st.dictionaries(
        st.sampled_from([*_FIELDS, "d"]),
        st.one_of(scalars, st.lists(scalars, max_size=2), st.just({"in": [1]})),
        max_size=4,
    ),
    scalars,
    st.lists(scalars, max_size=2),
)


def _where_or_everything(obj: dict[str, Any]) -> Callable[[object], bool]:
    parsed = parse_where(obj)
    if parsed is None:
        return lambda v: True
    return parsed.matches


@given(where_jsons, record_values)
def test_matches_agrees_with_the_reference(where_json: dict[str, Any], value: object) -> None:
    parsed = parse_where(where_json)
    if parsed is None:
        assert where_json == {}
        return
    assert parsed.matches(value) == _reference_matches(where_json, value)
    assert parsed.matches_json(enc(value)) == parsed.matches(msgspec.json.decode(enc(value)))


@given(where_jsons, where_jsons, record_values)
def test_and_is_exactly_the_conjunction(
    a_json: dict[str, Any], b_json: dict[str, Any], value: object
) -> None:
    a, b = parse_where(a_json), parse_where(b_json)
    both = conjoin(a, b)
    expected = _where_or_everything(a_json)(value) and _where_or_everything(b_json)(value)
    if both is None:
        assert a is None
        assert b is None
        return
    assert both.matches(value) == expected
    if a is not None and b is not None:
        assert a.and_(b) == b.and_(a)
        assert hash(a.and_(b)) == hash(b.and_(a))
        # Never wider than either side.
        if both.matches(value):
            assert a.matches(value)
            assert b.matches(value)


@given(where_jsons.filter(bool), st.randoms(use_true_random=False))
def test_same_meaning_is_equal(where_json: dict[str, Any], rnd: Any) -> None:
    shuffled: dict[str, Any] = {}
    items = list(where_json.items())
    rnd.shuffle(items)
    for field, cond in items:
        values = list(cond["in"]) if isinstance(cond, dict) else [cond]
        values = values + values[: rnd.randint(0, len(values))]
        rnd.shuffle(values)
        shuffled[field] = {"in": values}
    a, b = w(where_json), w(shuffled)
    assert a == b
    assert hash(a) == hash(b)
    assert a.to_json() == b.to_json()
    assert w(a.to_json()) == a
    assert w(msgspec.json.decode(enc(a.to_json()))) == a


@given(where_jsons.filter(bool), where_jsons.filter(bool), st.lists(record_values, max_size=8))
def test_equal_filters_match_alike(
    a_json: dict[str, Any], b_json: dict[str, Any], values: list[object]
) -> None:
    a, b = w(a_json), w(b_json)
    if a == b:
        assert hash(a) == hash(b)
        for value in values:
            assert a.matches(value) == b.matches(value)


# ---------------------------------------------------------------------------
# Transitions and the evaluator


@pytest.mark.parametrize(
    ("was_in", "now_in", "expected"),
    [
        (False, False, None),
        (False, True, "upsert"),
        (True, True, "upsert"),
        (True, False, "delete"),
    ],
)
def test_transition_table(was_in: bool, now_in: bool, expected: str | None) -> None:
    assert transition(was_in, now_in) == expected


A = w({"account": "A"})
OPEN = w({"status": "open"})
BIG = w({"qty": {"in": [100, 1000]}})


def test_evaluate_all_filters_on_one_value() -> None:
    fs = FilterSet([A, OPEN, BIG, A])
    assert fs.filters == (A, OPEN, BIG)
    assert len(fs) == 3
    assert OPEN in fs
    assert list(fs) == [A, OPEN, BIG]
    value = enc({"account": "A", "status": "done", "qty": 100.0})
    assert fs.evaluate(value) == {A: True, OPEN: False, BIG: True}
    assert fs.vector(value) == (True, False, True)
    assert fs.evaluate(None) == {A: False, OPEN: False, BIG: False}
    assert fs.evaluate(b"[1,2]") == {A: False, OPEN: False, BIG: False}
    assert fs.evaluate(b'"A"') == {A: False, OPEN: False, BIG: False}
    assert FilterSet().evaluate(value) == {}


def test_each_value_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = filters_module._decode

    def counting(data: bytes) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(filters_module, "_decode", counting)
    fs = FilterSet([A, OPEN, BIG])
    old = enc({"account": "A", "status": "open"})
    new = enc({"account": "A", "status": "done"})
    assert fs.moves(None, old) == {A: "upsert", OPEN: "upsert"}
    assert calls == [old]
    # The old value of the next change is remembered: only the new one is decoded.
    assert fs.moves(old, new) == {A: "upsert", OPEN: "delete"}
    assert calls == [old, new]
    # The same text again (another key, another change) costs no decode at all.
    assert fs.moves(None, bytes(new)) == {A: "upsert"}
    assert calls == [old, new]


def test_moves_in_and_out() -> None:
    fs = FilterSet([OPEN])
    open_ = enc({"status": "open"})
    done = enc({"status": "done"})
    assert fs.moves(None, open_) == {OPEN: "upsert"}  # created inside the view
    assert fs.moves(open_, open_) == {OPEN: "upsert"}  # changed inside the view
    assert fs.moves(open_, done) == {OPEN: "delete"}  # moves out
    assert fs.moves(done, done) == {}  # never learns about it
    assert fs.moves(done, open_) == {OPEN: "upsert"}  # moves in, whole value
    assert fs.moves(open_, None) == {OPEN: "delete"}  # deleted while inside
    assert fs.moves(done, None) == {}  # deleted outside: nothing
    assert fs.moves(None, None) == {}  # delete of a key that never existed
    assert fs.moves(open_, b"null") == {OPEN: "delete"}  # no longer an object


def test_update_replaces_the_set() -> None:
    fs = FilterSet([A])
    value = enc({"account": "A", "status": "open"})
    assert fs.evaluate(value) == {A: True}
    fs.update([A])
    assert fs.filters == (A,)
    fs.update([OPEN, A])
    assert fs.evaluate(value) == {OPEN: True, A: True}
    fs.update([])
    assert fs.evaluate(value) == {}
    assert fs.moves(None, value) == {}


@pytest.mark.parametrize("cache_size", [0, 1, 2])
def test_small_caches_stay_correct(cache_size: int) -> None:
    fs = FilterSet([A, OPEN], cache_size=cache_size)
    values = [enc({"account": acct, "status": s}) for acct in "AB" for s in ("open", "x")]
    for _ in range(3):
        for value in values:
            decoded = msgspec.json.decode(value)
            assert fs.evaluate(value) == {A: A.matches(decoded), OPEN: OPEN.matches(decoded)}


def test_negative_cache_size_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        FilterSet(cache_size=-1)


@given(
    st.lists(where_jsons.filter(bool), min_size=1, max_size=4),
    st.one_of(st.none(), record_values),
    st.one_of(st.none(), record_values),
)
def test_moves_follow_the_transition_table(
    where_list: list[dict[str, Any]], old: object, new: object
) -> None:
    wheres = [w(x) for x in where_list]
    fs = FilterSet(wheres, cache_size=2)
    old_json = None if old is None else enc(old)
    new_json = None if new is None else enc(new)
    for _ in range(2):  # the second time from the cache
        moves = fs.moves(old_json, new_json)
        for where in wheres:
            expected = transition(where.matches_json(old_json), where.matches_json(new_json))
            assert moves.get(where) == expected


# ---------------------------------------------------------------------------
# Purity


def test_module_imports_nothing_with_io() -> None:
    source = Path(filters_module.__file__).read_text(encoding="utf-8")
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
        "math",
        "re",
        "typing",
        "msgspec",
        "statecast.errors",
    }
    assert imported <= allowed


def test_a_field_name_that_is_a_lone_surrogate_is_named_escaped() -> None:
    """JSON from json.loads (a token's claim) may hold one; msgspec cannot encode it."""
    with pytest.raises(BadRequest, match=r'where\["\\ud800"\]: unknown operator'):
        parse_where({"\ud800": {"bad": 1}})
    with pytest.raises(BadRequest, match=r'where\["a\\udc00\\"b"\]: unknown operator'):
        parse_where({'a\udc00"b': {"bad": 1}})
