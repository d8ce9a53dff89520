"""statecast.core.values: the canonical form of stored values (docs/protocol.md §9)."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from statecast.core import values
from statecast.core.values import MAX_DEPTH, InvalidValue, canonical_value, check_text

__all__: list[str] = []


def nested(depth: int, inner: bytes = b"1") -> bytes:
    """``inner`` inside ``depth`` levels, alternating arrays and objects."""
    out = inner
    for level in range(depth):
        out = b"[" + out + b"]" if level % 2 else b'{"k":' + out + b"}"
    return out


def comb(depth: int) -> bytes:
    """``depth`` levels with an empty sibling at each: no long run of ``[``."""
    out = b"[]"
    for _ in range(depth - 1):
        out = b"[[]," + out + b"]"
    return out


def depth_of(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max(map(depth_of, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(depth_of, v.values()), default=0)
    return 0


# --- the fast path -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"1",
        b"-12.5e+3",
        b"null",
        b"true",
        b'"x"',
        b'""',
        b"[]",
        b"{}",
        b'{"x":1}',
        b'{"id":12345,"tags":["a","b"],"stock":{"a":1,"b":null},"ok":false,"p":19.99}',
        b'[[[[[{"a":[1,2,{"b":[]}]}]]]]]',
        b'"a\\"b\\\\c\\n\\u0041\\u00e9"',  # escapes, none a surrogate
        b'"~!@#$%^&*()_+`-=|;:,./<>?\x7f"',
        b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
    ],
)
def test_compact_ascii_is_returned_as_is(raw: bytes) -> None:
    assert canonical_value(raw) is raw


def test_fast_path_counts_brackets_in_strings_but_stays_exact() -> None:
    raw = b'"' + b"[" * 1000 + b"]" * 1000 + b'"'
    assert canonical_value(raw) is raw  # slow path: not nested at all


# --- whitespace ----------------------------------------------------------------------


def test_pretty_printed_value_becomes_compact() -> None:
    raw = b'{\n"x": 1,\r\n\t"y":[1, 2]}'
    out = canonical_value(raw)
    assert out == b'{"x":1,"y":[1,2]}'
    assert msgspec.json.decode(out) == msgspec.json.decode(raw)


def test_whitespace_around_the_value_goes() -> None:
    assert canonical_value(b" \n[ ]\r\n") == b"[]"
    assert canonical_value(b'{ "a" : { } , "b" : [ 1 , "x" ] }') == b'{"a":{},"b":[1,"x"]}'


def test_spaces_inside_strings_are_kept_and_the_object_too() -> None:
    raw = b'{"name":"widget alpha","note":"a  b\\t c"}'
    assert canonical_value(raw) is raw
    assert canonical_value(b'{"name": "widget alpha"}') == b'{"name":"widget alpha"}'


def test_numbers_keep_their_text() -> None:
    raw = b"[ 1E5, 1.0000000000000000001, -0, 1e300, 123456789012345678901234567890 ]"
    assert canonical_value(raw) == raw.replace(b" ", b"")
    assert canonical_value(b'{"a":1, "a":2}') == b'{"a":1,"a":2}'


# --- UTF-8 ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["é", "café au lait", "😀", "日本語", "\u2028", "a\x7fb"])
def test_valid_utf8_is_kept(text: str) -> None:
    compact = msgspec.json.encode({"t": text, "l": [text]})
    assert canonical_value(compact) is compact
    pretty = json.dumps({"t": text, "l": [text]}, indent=2, ensure_ascii=False).encode()
    out = canonical_value(pretty)
    assert out == compact
    assert msgspec.json.decode(out) == {"t": text, "l": [text]}


@pytest.mark.parametrize(
    "raw",
    [
        b'"\xff"',
        b'"\xed\xa0\x80"',  # an encoded surrogate (U+D800)
        b'"\xc0\x80"',  # overlong NUL
        b'"\xe0\x80\xaf"',  # overlong "/"
        b'"\xf4\x90\x80\x80"',  # beyond U+10FFFF
        b'"caf\xc3"',  # truncated sequence
        b'{"k":"ok","v":["\xff"]}',
        b'{"\xff":1}',
    ],
)
def test_invalid_utf8_is_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidValue, match=r"^invalid UTF-8$"):
        canonical_value(raw)


# --- surrogate escapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'"\\ud800"',
        b'"\\udc00x"',
        b'"\\uDBFF"',
        b'"\\ud800\\u0041"',
        b'"\\ud800\\ud800"',
        b'"\\udc00\\ud800"',
        b'["\\ud83d"]',
        b'{"\\ud800":1}',
    ],
)
def test_lone_surrogate_escapes_are_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidValue, match=r"^a lone surrogate escape"):
        canonical_value(raw)


@pytest.mark.parametrize("raw", [b'"\\ud83d\\ude00"', b'"\\uD83D\\uDE00!"', b'"\\udbff\\udfff"'])
def test_surrogate_pairs_are_accepted(raw: bytes) -> None:
    assert canonical_value(raw) is raw
    assert msgspec.json.decode(raw).encode("utf-8")


def test_escaped_backslash_before_u_is_not_an_escape() -> None:
    raw = b'"\\\\ud800"'  # a backslash, then the letters "ud800"
    assert canonical_value(raw) is raw


# --- control characters --------------------------------------------------------------


@pytest.mark.parametrize("raw", [b'"a\x01b"', b'"a\x00"', b'"a\nb"', b'"\t"', b'"a\x1fb"'])
def test_raw_control_characters_in_strings_are_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidValue, match=r"^not valid JSON: "):
        canonical_value(raw)


def test_escaped_control_characters_are_fine() -> None:
    for raw in (b'"a\\u0001b"', b'"a\\nb\\r\\t"', b'"\\u0000"'):
        assert canonical_value(raw) is raw


# --- depth ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [nested, comb, lambda d: b"[" * d + b"]" * d])
def test_depth_limit_is_exact(make: Any) -> None:
    ok = make(MAX_DEPTH)
    assert depth_of(msgspec.json.decode(ok)) == MAX_DEPTH
    assert canonical_value(ok) == ok
    assert canonical_value(ok.replace(b",", b", ")) == ok
    too_deep = make(MAX_DEPTH + 1)
    with pytest.raises(InvalidValue, match=r"^nested deeper than 64 levels$"):
        canonical_value(too_deep)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        nested(100_000),
        comb(100_000),
        b"[" * 100_000,
        b"[" * 1000 + b'"' + b"]" * 1000,
    ],
)
def test_very_deep_values_are_rejected_quickly(raw: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(InvalidValue):
        canonical_value(raw)
    assert time.perf_counter() - start < 1.0


def test_depth_just_under_what_msgspec_survives() -> None:
    with pytest.raises(InvalidValue, match="nested deeper"):
        canonical_value(b"[" * 900 + b"]" * 900)


def test_brackets_in_strings_do_not_count() -> None:
    brackets = b"[" * 500 + b"{" * 500
    raw = b'{"a":"' + brackets + b'","b":["\\"' + brackets + b'"]}'
    assert canonical_value(raw) is raw
    assert canonical_value(raw.replace(b'"b":', b'"b": ')) == raw


def test_many_shallow_brackets_are_fine() -> None:
    raw = b"[" + b",".join([b'{"a":[1]}'] * 10_000) + b"]"
    assert canonical_value(raw) is raw
    assert canonical_value(raw.replace(b",", b", ")) == raw


def test_unbalanced_deep_brackets_are_rejected() -> None:
    with pytest.raises(InvalidValue, match="not valid JSON"):
        canonical_value(b"]" + comb(40))


# --- not JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"not json",
        b'{"a": }',
        b"[1, 2",
        b"[1, ]",
        b"1 2",
        b"NaN ",
        b"\xef\xbb\xbf1",  # a BOM
        b'"unterminated ' + b"[" * 100,
        b'"\\x" ',
    ],
)
def test_not_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidValue):
        canonical_value(raw)


def test_invalid_value_is_a_value_error_with_a_short_reason() -> None:
    with pytest.raises(ValueError, match=r"^not valid JSON: ") as info:
        canonical_value(b"[1, ")
    assert isinstance(info.value, InvalidValue)
    assert "\n" not in str(info.value)


# --- the property --------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


def assert_canonical(out: bytes) -> None:
    assert all(b >= 0x20 for b in out)
    out.decode("utf-8")
    assert canonical_value(out) is out  # idempotent, by identity


@given(json_values)
def test_round_trips(v: Any) -> None:
    compact = msgspec.json.encode(v)
    out = canonical_value(compact)
    assert out == compact
    assert msgspec.json.decode(out) == v
    assert_canonical(out)
    for pretty in (
        json.dumps(v, indent=2).encode(),
        json.dumps(v, indent="\t", ensure_ascii=False).encode(),
        msgspec.json.format(compact, indent=3).replace(b"\n", b"\r\n"),
    ):
        out = canonical_value(pretty)
        assert msgspec.json.decode(out) == v
        assert_canonical(out)


# Not st.text(alphabet=...): given a union of strategies as alphabet, it drew no
# surrogates at all in practice (Hypothesis 6.170).
surrogate_heavy_text = st.lists(
    st.sampled_from(["a", " ", "é", "\\", '"', "\ud800", "\udbff", "\udc00", "\udfff"])
    | st.characters(exclude_categories=[]),
    max_size=12,
).map("".join)


@given(surrogate_heavy_text)
def test_escaped_surrogates_are_accepted_exactly_when_paired(text: str) -> None:
    escaped = json.dumps(text).encode()  # ASCII: each surrogate as a backslash-u escape
    if check_text(json.loads(escaped)):  # json.loads joins pairs, keeps lone ones
        assert msgspec.json.decode(canonical_value(escaped)) == json.loads(escaped)
        assert canonical_value(escaped) == escaped
    else:
        with pytest.raises(InvalidValue):
            canonical_value(escaped)


@given(surrogate_heavy_text)
def test_raw_surrogates_are_invalid_utf8(text: str) -> None:
    raw = json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if check_text(text):
        assert msgspec.json.decode(canonical_value(raw)) == text
    else:
        with pytest.raises(InvalidValue, match="invalid UTF-8"):
            canonical_value(raw)


# --- check_text ----------------------------------------------------------------------


def test_check_text() -> None:
    assert check_text("")
    assert check_text("plain-key")
    assert check_text("clé 😀 日本")
    assert not check_text("\ud800")
    assert not check_text("a\udc00b")
    assert not check_text("é\udfff")
    assert not check_text("\udbff\udfff")  # a pair of code points is still two surrogates


# --- what the module relies on in msgspec (docstring findings) -----------------------


class _Change(msgspec.Struct):
    key: str
    value: msgspec.Raw


def test_msgspec_rejects_invalid_utf8_in_str_fields_with_unicode_decode_error() -> None:
    with pytest.raises(UnicodeDecodeError):
        msgspec.json.decode(b'{"key":"\xff","value":1}', type=_Change)
    change = msgspec.json.decode(b'{"key":"k","value":"\xff"}', type=_Change)
    assert bytes(change.value) == b'"\xff"'  # a Raw field does not check UTF-8


def test_msgspec_rejects_lone_surrogate_escapes() -> None:
    for raw in (b'"\\ud800"', b'"\\udc00x"', b'"\\ud800\\u0041"'):
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(b'{"key":' + raw + b',"value":1}', type=_Change)
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(b'{"key":"k","value":' + raw + b"}", type=_Change)
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.format(raw, indent=-1)


def test_msgspec_big_numbers() -> None:
    big = 2**200 + 1
    assert msgspec.json.decode(str(big).encode()) == big
    assert msgspec.json.encode(big) == str(big).encode()
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b"1e400")
    assert msgspec.json.format(b"[ 1e400 ]", indent=-1) == b"[1e400]"


def test_msgspec_recursion_is_not_a_decode_error() -> None:
    with pytest.raises(RecursionError):
        msgspec.json.decode(b'{"key":"k","value":' + b"[" * 5000 + b"]" * 5000 + b"}")


def test_module_is_pure() -> None:
    tree = ast.parse(Path(values.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"__future__", "re", "typing", "msgspec", "statecast.errors"}


@pytest.mark.parametrize(
    "raw",
    [
        b"1e400",
        b"[-1E+999]",
        b'{"a":1e400}',
        b"[ 1e400 ]",
        b"9" * 5001,
        b'{"x":' + b"1" * 4400 + b"}",
        # found by an adversarial run: a long mantissa with a two-digit exponent
        b"1" * 250 + b"e60",
        b"[" + b"1" * 300 + b"e99]",
        b"-" + b"9" * 210 + b".5e99",
        b'{"a" : ' + b"1" * 250 + b"E+60}",  # and on the slow path
    ],
)
def test_numbers_no_client_can_read_are_refused(raw: bytes) -> None:
    """§9: a stored value must decode in every client (msgspec and JavaScript have no
    1e400): such a number is refused, on the fast path and the slow one."""
    with pytest.raises(InvalidValue, match="number out of range"):
        canonical_value(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'"e1000"',
        b'"' + b"7" * 400 + b'"',
        b"1e308",
        b"[1e-300]",
        b"9" * 209 + b"e99",  # just under 10^308
        b"1" * 250 + b"e-60",
        b"0." + b"1" * 400 + b"e99",
    ],
)
def test_what_only_looks_like_a_big_number_is_kept(raw: bytes) -> None:
    assert canonical_value(raw) == raw
