"""statecast._speedups (src/statecast/_speedups.c) against the Python it twins.

Each C function has a Python reference that stays the fallback (statecast.core.accel):

* ``prepare_plain``   <-> ``protocol._prepare_request`` / ``_prepare_each``: whenever the
  C returns a list it is what Python gives for the same request; where Python refuses
  a request (BadRequest) the C returns None, never a list.
* ``encode_records``  <-> ``state.encode_batch_py``: the same Records, or the same
  exception type.
* ``install_upserts`` <-> the loop of ``State.install``: a State driven with it ends
  exactly like one driven by Python alone.

Then: no reference or memory grows over 100k calls on any path, and CI builds the C.

The C module is imported directly (not through ``accel``), so these tests hold the C
to Python even when ``STATECAST_NO_SPEEDUPS`` is set. Tests marked ``xfail`` with a
"BUG:" reason document known defects of the C; each turns into a failure (strict
xfail) once the defect is fixed, and then its marker should go.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any, cast
from unittest import mock

import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from statecast import Server
from statecast.core import accel, protocol
from statecast.core import state as state_mod
from statecast.core.accel import Speedups
from statecast.core.frames import RECORD_LINE, delete_line
from statecast.core.protocol import (
    MAX_KEY_LENGTH,
    ChangeIn,
    PreparedChange,
    PublishRequest,
    parse_request,
)
from statecast.core.state import Collection, Record, Snapshot, State, encode_batch_py
from statecast.core.values import MAX_DEPTH, plain_line, shallow
from statecast.errors import BadRequest

try:
    C = cast("Speedups", importlib.import_module("statecast._speedups"))
except ImportError:  # no compiler at install time: only the CI test below runs
    HAVE_C = False
else:
    HAVE_C = True

needs_c = pytest.mark.skipif(not HAVE_C, reason="statecast._speedups is not built")


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------------
# 1. prepare_plain <-> protocol._prepare_request

VALID_NAMES = ["a", "orders", "x.y-z_9", "A" * 128]
INVALID_NAMES = ["", "no space", "a" * 129, "é", "a/b"]  # never in `known` (§9)


def note(what: str) -> None:
    """A Hypothesis event (its statistics) when under Hypothesis."""
    if currently_in_test_context():
        event(what)


def python_prepare(
    request: PublishRequest, line: bytes | None, known: dict[str, str]
) -> list[PreparedChange] | BadRequest:
    """The pure-Python path of ``_prepare_request`` (the C patched out), with its own
    copy of the known names (it adds to them)."""
    with (
        mock.patch.object(protocol, "_speedups", None),
        mock.patch.object(protocol, "_known_collections", dict(known)),
    ):
        try:
            return protocol._prepare_request(request, line)
        except BadRequest as exc:
            return exc


def c_prepare(request: PublishRequest, known: dict[str, str]) -> list[PreparedChange] | None:
    before = dict(known)
    out = C.prepare_plain(request.changes, known, MAX_KEY_LENGTH, MAX_DEPTH)
    assert known == before  # the C only reads it
    return out


def check_prepare(line: bytes, known: dict[str, str]) -> tuple[bool, bool] | None:
    """The property of prepare_plain for one line. Returns (C accepted, Python
    refused), or None when the line is not a publish request."""
    try:
        request = parse_request(line)
    except BadRequest:
        note("not a request")
        return None
    assert isinstance(request, PublishRequest)
    fast = c_prepare(request, known)
    ref = python_prepare(request, line, known)
    # The Python path decides the same with or without the line (plain_line is only a
    # shortcut): the reference is consistent with itself.
    ref_no_line = python_prepare(request, None, known)
    if isinstance(ref, BadRequest):
        assert isinstance(ref_no_line, BadRequest)
        assert str(ref_no_line) == str(ref)
    else:
        assert ref_no_line == ref
    if isinstance(ref, BadRequest):
        assert fast is None, f"C accepted what Python refuses ({ref}): {fast!r}"[:2000]
        note("Python refused")
        return False, True
    if fast is None:
        note("C declined")
        return False, False
    note("C accepted")
    assert type(fast) is list
    assert fast == ref
    assert fast == protocol._prepare_each(request, False)
    for (name, key, key_json, value), change in zip(fast, request.changes, strict=True):
        assert type(name) is str
        assert type(key) is str
        assert type(key_json) is bytes
        assert type(value) is bytes
        assert name is known[change.collection]  # the known dict's own str object
        assert key is change.key
        assert key_json == msgspec.json.encode(key)
        assert value == bytes(change.value)
    return True, False


def json_str(s: str) -> str:
    return msgspec.json.encode(s).decode()


def escape_all(s: str) -> str:
    """``s`` as a JSON string with every character spelled as a \\u escape."""
    out = []
    for ch in s:
        cp = ord(ch)
        if cp >= 0x10000:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04x}")
    return '"' + "".join(out) + '"'


# Whitespace between tokens: mostly none, so that many lines are plain (the C's case).
WS = st.sampled_from(["", "", "", "", "", "", " ", "\t", "\r\n", "  \n "])

DIGITS = "0123456789"
LONG_DIGITS = st.integers(200, 215).flatmap(lambda n: st.text(DIGITS, min_size=n, max_size=n))
NUMBERS = st.tuples(
    st.sampled_from(["", "", "-"]),
    st.one_of(
        st.just("0"),
        st.tuples(st.sampled_from("123456789"), st.text(DIGITS, max_size=6)).map("".join),
        st.tuples(st.sampled_from("123456789"), LONG_DIGITS).map("".join),
    ),
    st.one_of(st.just(""), st.text(DIGITS, min_size=1, max_size=4).map(lambda d: "." + d)),
    st.one_of(
        st.just(""),
        st.tuples(
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.text(DIGITS, min_size=1, max_size=4),
        ).map("".join),
    ),
).map("".join)

STRING_PIECES = st.one_of(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7F, exclude_characters='"\\'),
        max_size=12,
    ),
    st.text(alphabet="eE0123456789+-x[{", max_size=12),
    st.sampled_from(
        [
            '\\"',
            "\\\\",
            "\\/",
            "\\n",
            "\\t",
            "\\u0041",
            "\\u00e9",
            "\\u007f",
            "\\ud83d\\ude00",
            "\\ud800",
            "\\udc00x",
            "\\uDBFF\\uDFFF",
            "e000",
            "abce123",
            "E+12",
            "e-1",
            "+-+-+-",
            "[[[",
            "{{",
            "\x7f",
            "\x01",  # a raw control character: not JSON
        ]
    ),
    st.text(max_size=4).map(lambda s: json_str(s)[1:-1]),  # non-ASCII, escaped controls
)
JSON_STRINGS = st.lists(STRING_PIECES, max_size=6).map(lambda ps: '"' + "".join(ps) + '"')

SPECIAL_VALUES = [
    "1e400",
    "1E+999",
    "-1e-400",
    "1e99",
    "1E99",
    "1e-99",
    "1e009",
    "9" * 209 + "e99",
    "1" * 209,
    "1" * 210,
    "-" + "1" * 208,
    "-" + "1" * 209,
    "1" * 4301,
    '"' + "+-" * 105 + '"',
    '"' + "+-" * 104 + '+"',
    '"abce123"',
    '"abcE123"',
    '"e12"',
    '"e12x3"',
    '"\x7f"',
    '"a b"',
    '""',
    "[]",
    "{}",
    "true",
    "null",
    "[" * 64 + "]" * 64,
    "[" * 65 + "]" * 65,
    "[" + ",".join(["[]"] * 64) + "]",
    '"' + "[" * 65 + '"',
]


def nest(value: str, depth: int, kind: str) -> str:
    if kind == "[":
        return "[" * depth + value + "]" * depth
    return '{"a":' * depth + value + "}" * depth


SCALARS = st.one_of(
    NUMBERS,
    JSON_STRINGS,
    st.sampled_from(["true", "false", "null"]),
    st.sampled_from(SPECIAL_VALUES),
)


def _arrays(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(st.lists(st.tuples(WS, children, WS), max_size=4), WS).map(
        lambda t: "[" + ",".join(a + v + b for a, v, b in t[0]) + t[1] + "]"
    )


def _objects(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    member = st.tuples(WS, JSON_STRINGS, WS, WS, children, WS).map(
        lambda t: t[0] + t[1] + t[2] + ":" + t[3] + t[4] + t[5]
    )
    return st.tuples(st.lists(member, max_size=4), WS).map(
        lambda t: "{" + ",".join(t[0]) + t[1] + "}"
    )


TREES = st.recursive(
    SCALARS, lambda children: st.one_of(_arrays(children), _objects(children)), max_leaves=8
)
VALUES = st.one_of(
    TREES,
    st.tuples(TREES, st.integers(58, 70), st.sampled_from("[{")).map(lambda t: nest(*t)),
    st.integers(60, 68).map(lambda n: "[" + ",".join(["[]"] * n) + "]"),  # many openers
    st.integers(60, 68).map(lambda n: '"' + "{" * n + '"'),  # openers inside a string
    # Long plain strings: 64-byte blocks of the C's scan, with "e" + digits and runs
    # of digits falling across their boundaries.
    st.text(alphabet="aeE0123456789+-x.[{", min_size=40, max_size=300).map(lambda s: '"' + s + '"'),
    st.tuples(st.integers(0, 140), LONG_DIGITS).map(lambda t: '"' + "x" * t[0] + t[1] + '"'),
)

KEYS = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7F), max_size=12),
    st.text(max_size=6),  # non-ASCII, controls
    st.integers(1020, 1030).map(lambda n: "k" * n),
    st.integers(1020, 1030).map(lambda n: "é" * n),
    st.sampled_from(["", 'a"b', "a\\b", "\x7f", " ", "é", "\U0001f600", "\x00", "k"]),
)


@st.composite
def key_json(draw: st.DrawFn) -> str:
    how = draw(st.sampled_from(["plain", "plain", "plain", "escaped", "raw"]))
    if how == "raw":  # spellings that are not a msgspec encode: lone surrogates, etc.
        return draw(st.sampled_from(['"\\ud800"', '"\\u0041\\u0042"', '"a\\/b"', '"\\u007f"']))
    key = draw(KEYS)
    return json_str(key) if how == "plain" else escape_all(key)


# A tame line (most of them): valid names, printable keys, compact values, few deletes;
# the C's common case and its near misses. A wild line: anything above.
TAME_SCALARS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["true", "false", "null", "1.5", "-0.25e-3", "2E+10", "1e99"]),
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7F, exclude_characters='"\\'),
        max_size=20,
    ).map(lambda s: '"' + s + '"'),
)
TAME_VALUES = st.recursive(
    TAME_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda vs: "[" + ",".join(vs) + "]"),
        st.lists(st.tuples(TAME_SCALARS, children), max_size=4).map(
            lambda ms: "{" + ",".join(f"{json_str(k)}:{v}" for k, v in ms) + "}"
        ),
    ),
    max_leaves=10,
)
PLAIN_KEYS = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7F, exclude_characters='"\\'),
    min_size=1,
    max_size=16,
)
TAME_KEYS = st.one_of(
    PLAIN_KEYS,
    PLAIN_KEYS,
    PLAIN_KEYS,
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7F), min_size=1, max_size=16
    ),
)


@st.composite
def change_json(draw: st.DrawFn, tame: bool) -> str:
    if tame:
        name = json_str(draw(st.sampled_from(VALID_NAMES)))
        key = json_str(draw(TAME_KEYS))
        kinds = ["upsert"] * 30 + ["delete", "no value", "if_seq"]
        value = draw(st.one_of(*[TAME_VALUES] * 6, VALUES))
    else:
        name = json_str(draw(st.sampled_from(VALID_NAMES + INVALID_NAMES)))
        key = draw(key_json())
        kinds = ["upsert"] * 8 + ["delete", "delete with value", "no value", "if_seq"]
        value = draw(VALUES)
    kind = draw(st.sampled_from(kinds))
    parts = [f'"collection":{name}', f'"key":{key}']
    if kind not in {"delete", "no value"}:
        parts.append(f'"value":{draw(WS)}{value}')
    if kind.startswith("delete"):
        parts.append('"delete":true')
    elif draw(st.integers(0, 9)) == 0:
        parts.append('"delete":false')
    if kind == "if_seq":
        parts.append(f'"if_seq":{draw(st.integers(0, 5))}')
    parts = draw(st.permutations(parts))
    ws = "" if tame and draw(st.integers(0, 3)) else draw(WS)
    return "{" + ws + f",{ws}".join(parts) + "}"


@st.composite
def publish_lines(draw: st.DrawFn) -> bytes:
    tame = draw(st.integers(0, 3)) > 0
    changes = draw(st.lists(change_json(tame), min_size=0 if not tame else 1, max_size=5))
    ws = "" if tame else draw(WS)
    fields = ['"op":"publish"', f'"changes":[{ws}{",".join(changes)}{ws}]']
    if draw(st.booleans()):
        fields.append('"id":7')
    return ("{" + ws + ",".join(draw(st.permutations(fields))) + "}").encode()


ALL_KNOWN = {n: n for n in VALID_NAMES}
KNOWN = st.one_of(
    st.just(ALL_KNOWN),
    st.just(ALL_KNOWN),
    st.sets(st.sampled_from(VALID_NAMES)).map(lambda s: {n: n for n in s}),
)


def line_of(*changes: tuple[str, str, str | None], extra: str = "") -> bytes:
    """A compact publish line: (collection, key, value JSON or None for a delete)."""
    out = []
    for name, key, value in changes:
        c = f'{{"collection":{json_str(name)},"key":{json_str(key)}'
        c += ',"delete":true}' if value is None else f',"value":{value}{extra}}}'
        out.append(c)
    return ('{"op":"publish","changes":[' + ",".join(out) + "]}").encode()


@needs_c
@fuzz(400)
@given(line=publish_lines(), known=KNOWN)
@example(line=line_of(("a", "k", "1")), known={"a": "a"})
@example(line=line_of(("a", "k", "[" * 65 + "]" * 65)), known={"a": "a"})
def test_prepare_plain_matches_python(line: bytes, known: dict[str, str]) -> None:
    check_prepare(line, known)


def block_cases() -> list[tuple[str, bool]]:
    """Values around the C's 64-byte blocks: an "e" then three digits or signs (a
    suspect exponent) and digit runs of 209/210, at every offset across the first two
    block boundaries, with the block after them whole or not. (value JSON, whether the
    C accepts it)"""
    out = []
    for pad in range(52, 136):
        x = "x" * pad
        for tail in ("", "x" * 70):
            out += [
                (f'"{x}e123{tail}"', False),
                (f'"{x}E+-9{tail}"', False),
                (f'"{x}e12x{tail}"', True),
                (f'"{x}e1x23{tail}"', True),
                (f'"{x}' + "1" * 209 + f'{tail}"', True),
                (f'"{x}' + "1" * 210 + f'{tail}"', False),
                (f'"{x}' + "1" * 104 + "x" + "1" * 105 + f'{tail}"', True),
                (f'"{x}' + "[" * (pad % 3) + f'{tail}"', True),
            ]
    out += [("1" * n, n < 210) for n in range(120, 300, 7)]
    out += [('"' + "x" * n + '"', True) for n in range(0, 200)]
    return out


ACCEPT, DECLINE = True, False
OK, REFUSED = False, True

EDGE_CASES: list[tuple[str, str, bool, bool]] = [
    # (key, value JSON, C accepts, Python refuses)
    ("k", "[" * 64 + "]" * 64, ACCEPT, OK),
    ("k", "[" * 65 + "]" * 65, DECLINE, REFUSED),
    ("k", '{"a":' * 64 + "1" + "}" * 64, ACCEPT, OK),
    ("k", '{"a":' * 65 + "1" + "}" * 65, DECLINE, REFUSED),
    ("k", "[" + ",".join(["[]"] * 63) + "]", ACCEPT, OK),  # 64 openers, depth 2
    ("k", "[" + ",".join(["[]"] * 64) + "]", DECLINE, OK),  # 65 openers, depth 2
    ("k", '"' + "[" * 64 + '"', ACCEPT, OK),
    ("k", '"' + "[" * 65 + '"', DECLINE, OK),
    ("k", "1" * 209, ACCEPT, OK),
    ("k", "1" * 210, DECLINE, OK),
    ("k", "-" + "1" * 208, ACCEPT, OK),
    ("k", "-" + "1" * 209, DECLINE, OK),
    ("k", "1" * 4301, DECLINE, REFUSED),
    ("k", "9" * 209 + "e99", ACCEPT, OK),
    ("k", "1e99", ACCEPT, OK),
    ("k", "1E99", ACCEPT, OK),
    ("k", "1e-99", DECLINE, OK),
    ("k", "1e009", DECLINE, OK),
    ("k", "1e400", DECLINE, REFUSED),
    ("k", "1E+999", DECLINE, REFUSED),
    ("k", "-1e-400", DECLINE, OK),
    ("k", '"abce123"', DECLINE, OK),
    ("k", '"abcE123"', DECLINE, OK),
    ("k", '"e12"', ACCEPT, OK),
    ("k", '"e1-x"', ACCEPT, OK),
    ("k", '"' + "+-" * 104 + '+"', ACCEPT, OK),  # a run of 209 signs
    ("k", '"' + "+-" * 105 + '"', DECLINE, OK),  # 210
    ("k", '"a\x7fb"', ACCEPT, OK),
    ("k", '"a b"', DECLINE, OK),
    ("k", '"\\u0041"', DECLINE, OK),
    ("k", '"\\ud83d\\ude00"', DECLINE, OK),
    ("k", '"é"', DECLINE, OK),
    ("k", '""', ACCEPT, OK),
    ("k", "{}", ACCEPT, OK),
    ("k", "[]", ACCEPT, OK),
    ("k", "true", ACCEPT, OK),
    ("k", "-0", ACCEPT, OK),
    ("k" * MAX_KEY_LENGTH, "1", ACCEPT, OK),
    ("k" * (MAX_KEY_LENGTH + 1), "1", DECLINE, REFUSED),
    ("é" * MAX_KEY_LENGTH, "1", DECLINE, OK),
    ("é" * (MAX_KEY_LENGTH + 1), "1", DECLINE, REFUSED),
    ("", "1", DECLINE, REFUSED),
    (" ", "1", ACCEPT, OK),
    ("\x7f", "1", ACCEPT, OK),
    ("~!#$%&'()*+,-./:;<=>?@[]^_`{|}", "1", ACCEPT, OK),
    ('a"b', "1", DECLINE, OK),
    ("a\\b", "1", DECLINE, OK),
    ("a\x1fb", "1", DECLINE, OK),
    ("é", "1", DECLINE, OK),
]


@needs_c
@pytest.mark.parametrize(("key", "value", "accepts", "refused"), EDGE_CASES)
def test_prepare_plain_edge_cases(key: str, value: str, accepts: bool, refused: bool) -> None:
    known = {"a": "a"}
    # Alone, and after a plain change (the C builds that one's tuple first).
    for line in (line_of(("a", key, value)), line_of(("a", "p", "0"), ("a", key, value))):
        assert check_prepare(line, known) == (accepts, refused)


@needs_c
def test_prepare_plain_block_boundaries() -> None:
    known = {"a": "a"}
    for value, accepts in block_cases():
        assert check_prepare(line_of(("a", "k", value)), known) == (accepts, False), value


@needs_c
def test_prepare_plain_declines_the_uncommon() -> None:
    known = {"a": "a", "b": "b"}
    cases = {
        "a delete": line_of(("a", "k", "1"), ("a", "k", None)),
        "an unknown collection": line_of(("a", "k", "1"), ("orders", "k", "1")),
        "an invalid collection": line_of(("a", "k", "1"), ("no space", "k", "1")),
        "no value": b'{"op":"publish","changes":[{"collection":"a","key":"k"}]}',
        "no changes": b'{"op":"publish","changes":[]}',
        "a key spelled with escapes": b'{"op":"publish","changes":'
        b'[{"collection":"a","key":"\\u006b","value":1}]}',
    }
    got = {why: check_prepare(line, known) for why, line in cases.items()}
    assert got == {
        "a delete": (False, False),
        "an unknown collection": (False, False),
        "an invalid collection": (False, True),
        "no value": (False, True),
        "no changes": (False, True),
        "a key spelled with escapes": (True, False),  # the decoded key is plain
    }
    # Whitespace around a value, an if_seq, "delete": false: still the common case.
    line = b'{"op":"publish","changes":[{"collection":"b","key":"k","value": 1 ,"if_seq":3},'
    line += b'{"collection":"a","key":"j","value":[1,{"x":2}],"delete":false}]}'
    assert check_prepare(line, known) == (True, False)


def raw_change(value: bytes, name: str = "a", key: str = "k") -> ChangeIn:
    return ChangeIn(collection=name, key=key, value=msgspec.Raw(value))


def c_should_accept(raw: bytes) -> bool:
    """The C's rule for a value, written with values.py: printable ASCII without
    backslashes, at most MAX_DEPTH opening brackets, and no suspicion of a number out
    of range (a three-digit exponent, a run of 210 digits and signs)."""
    return bool(raw) and plain_line(raw) and shallow(raw)


VALUE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([*b'eE0123456789+-x"[{]}:, \\\x7f\x80\xff\x00\t']), max_size=300).map(
        bytes
    ),
    st.lists(st.sampled_from([*b"eE01+-x"]), min_size=60, max_size=400).map(bytes),
    st.tuples(
        st.integers(0, 200),
        st.integers(205, 215),
        st.sampled_from([*b"0123456789+-"]),
        st.integers(0, 140),
    ).map(lambda t: b"x" * t[0] + bytes([t[2]]) * t[1] + b"x" * t[3]),
    st.tuples(
        st.integers(0, 200), st.sampled_from([b"e", b"E"]), st.integers(0, 4), st.integers(1, 140)
    ).map(lambda t: b"x" * t[0] + t[1] + b"1" * t[2] + b"x" * t[3]),
    st.tuples(st.integers(0, 140), st.integers(60, 70)).map(
        lambda t: b"x" * t[0] + b"[" * t[1] + b"]" * t[1]
    ),
)


@needs_c
@fuzz(600)
@given(raw=VALUE_BYTES, prefix=st.integers(0, 2))
def test_prepare_plain_value_rule(raw: bytes, prefix: int) -> None:
    """The C's scan of a value (scalar and 64-byte SSE2 blocks) against its rule,
    on any bytes (the C does not parse JSON: msgspec already has)."""
    known = {"a": "a"}
    changes = [raw_change(b"1", key=f"p{i}") for i in range(prefix)] + [raw_change(raw)]
    got = C.prepare_plain(changes, known, MAX_KEY_LENGTH, MAX_DEPTH)
    assert (got is not None) == c_should_accept(raw)
    if got is not None:
        assert got[-1] == ("a", "k", b'"k"', raw)


@needs_c
def test_prepare_plain_arguments() -> None:
    changes = [raw_change(b"1")]
    assert C.prepare_plain([], {"a": "a"}, 1024, 64) is None
    assert C.prepare_plain(changes, {"a": "a"}, 0, 64) is None  # key longer than 0
    assert C.prepare_plain([raw_change(b"[1]")], {"a": "a"}, 1024, 0) is None
    assert C.prepare_plain(changes, {}, 1024, 64) is None
    with pytest.raises(TypeError):
        C.prepare_plain(tuple(changes), {"a": "a"}, 1024, 64)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.prepare_plain(changes, ["a"], 1024, 64)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.prepare_plain(changes, {"a": "a"}, "1024", 64)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        C.prepare_plain(changes, {"a": "a"}, 1024, 2**64)
    with pytest.raises(TypeError):
        C.prepare_plain(changes, {"a": "a"}, 1024)  # type: ignore[call-arg]
    # A str subclass is never the common case.
    assert C.prepare_plain([raw_change(b"1", key=S("k"))], {"a": "a"}, 1024, 64) is None
    assert C.prepare_plain([raw_change(b"1", name=S("a"))], {"a": "a"}, 1024, 64) is None
    # A value that is not a buffer: the exception Python's bytes() raises too.
    bad = ChangeIn(collection="a", key="k", value="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.prepare_plain([raw_change(b"1"), bad], {"a": "a"}, 1024, 64)


# ---------------------------------------------------------------------------
# 2. encode_records <-> state.encode_batch_py


Outcome = list[Record] | None | type[BaseException]


def outcome(fn: Callable[[], list[Record] | None]) -> Outcome:
    try:
        return fn()
    except Exception as exc:
        return type(exc)


def fits(batch: Sequence[Any], first: int) -> bool:
    """Every seq of the batch is well inside a C long long: the C must take it."""
    return first >= 0 and first + len(batch) < 2**63 - 1


def check_encode(batch: Sequence[Any], first: int) -> Outcome:
    """encode_records against encode_batch_py: the same Records or the same exception
    type; None (Python does it) only for seqs outside 0 .. 2**63-1. And encode_batch,
    which runs the C and falls back on its None, is encode_batch_py."""
    c = outcome(lambda: C.encode_records(batch, first, Record, RECORD_LINE, delete_line))
    py = outcome(lambda: encode_batch_py(batch, first))
    if c is None:
        assert not fits(batch, first), "the C declined seqs it can write"
        note("C declined")
    else:
        assert c == py
        note("C encoded" if isinstance(c, list) else "both raised")
    if isinstance(c, list):
        assert all(type(r) is Record for r in c)
        assert all(type(r.line) is bytes for r in c)
        assert [r.seq for r in c] == list(range(first, first + len(batch)))
    with mock.patch.object(state_mod, "_speedups", C):
        assert outcome(lambda: state_mod.encode_batch(batch, first)) == py
    return c


NAMES = st.one_of(
    st.sampled_from(["a", "orders", "é", "日本", "\U0001f600", "x" * 128, ""]),
    st.text(max_size=8),
)


def as_view(b: bytes) -> memoryview:
    return memoryview(b)


BYTES_LIKE = st.one_of(
    st.binary(max_size=30),
    st.binary(max_size=30).map(bytearray),
    st.binary(max_size=30).map(as_view),
)
PREPARED = st.tuples(
    NAMES,
    st.text(max_size=10),
    st.one_of(st.text(max_size=10).map(msgspec.json.encode), BYTES_LIKE),
    st.one_of(st.none(), st.binary(max_size=30), BYTES_LIKE),
)
SEQS = st.one_of(
    st.integers(0, 3),
    st.integers(2**62 - 3, 2**62 + 3),
    st.integers(1, 2**62),
    st.integers(2**63 - 12, 2**63 + 3),
    st.integers(-3, -1),
)


@needs_c
@fuzz(300)
@given(batch=st.lists(PREPARED, max_size=8), first=SEQS, as_tuple=st.booleans())
def test_encode_records_matches_python(
    batch: list[tuple[str, str, Any, Any]], first: int, as_tuple: bool
) -> None:
    check_encode(tuple(batch) if as_tuple else batch, first)


class Encodes(str):
    """A str whose encode() is its own: Python's reference calls it."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"other"


ODD_BATCHES: list[tuple[str, list[Any]]] = [
    ("empty", []),
    ("lists, not tuples", [["a", "k", b'"k"', b"1"], ["a", "k", b'"k"', None]]),
    ("three items", [("a", "k", b'"k"', b"1"), ("a", "k", b'"k"')]),
    ("five items", [("a", "k", b'"k"', b"1", 0)]),
    ("not iterable", [("a", "k", b'"k"', b"1"), 5]),
    ("a str of four", ["abcd"]),
    ("a str value", [("a", "k", b'"k"', "1")]),
    ("a str key_json", [("a", "k", '"k"', b"1")]),
    ("an int value", [("a", "k", b'"k"', 1)]),
    ("a lone surrogate name", [("a", "k", b'"k"', b"1"), ("\ud800", "k", b'"k"', b"1")]),
    ("a lone surrogate name, delete", [("\ud800", "k", b'"k"', None)]),
    ("a bytes name", [(b"a", "k", b'"k"', b"1")]),
    ("an int name", [(1, "k", b'"k"', b"1")]),
    ("a None name", [(None, "k", b'"k"', b"1")]),
    ("a bytes name, delete", [(b"a", "k", b'"k"', None)]),
    ("a non-contiguous value", [("a", "k", b'"k"', memoryview(b"1x2x3")[::2])]),
    ("a str subclass name", [(type("S", (str,), {})("a"), "k", b'"k"', b"1")]),
    ("a str subclass with its own encode", [(Encodes("a"), "k", b'"k"', b"1")]),
    ("a bytes subclass value", [("a", "k", b'"k"', type("B", (bytes,), {})(b"1"))]),
]
FIRST_SEQS = [0, 1, 2**62, -1, 2**63 - 3, 2**63 - 2, 2**63 - 1, 2**63, 2**64 + 5]


@needs_c
@pytest.mark.parametrize(("why", "batch"), ODD_BATCHES, ids=[w for w, _ in ODD_BATCHES])
@pytest.mark.parametrize("first", FIRST_SEQS)
def test_encode_records_odd_inputs(why: str, batch: list[Any], first: int) -> None:
    check_encode(batch, first)


@needs_c
def test_encode_records_takes_seqs_up_to_2_63() -> None:
    """(The C once read first_seq as a long long: OverflowError from 2**63, and
    first_seq + i wrapped to a negative seq past 2**63 - 1.)"""
    batch = [("a", "k", b'"k"', b"1"), ("a", "k", b'"k"', None), ("b", "j", b'"j"', b"[]")]
    for first in (0, 1, 2**62, 2**63 - 5):
        assert isinstance(check_encode(batch, first), list)
    for first in (-1, 2**63 - 2, 2**63, 2**64 + 5, -(2**64)):
        check_encode(batch, first)  # None or the same: encode_batch is Python's either way


@needs_c
def test_encode_records_unhashable_name() -> None:
    """An unhashable name: the same TypeError as encode_batch_py's names cache."""
    check_encode([(["a"], "k", b'"k"', b"1")], 1)


@needs_c
def test_encode_records_arguments() -> None:
    batch = [("a", "k", b'"k"', b"1")]
    assert C.encode_records(iter(batch), 1, Record, RECORD_LINE, delete_line) == (  # type: ignore[arg-type]
        encode_batch_py(batch, 1)
    )
    with pytest.raises(TypeError):
        C.encode_records(5, 1, Record, RECORD_LINE, delete_line)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.encode_records(batch, 1, Record, RECORD_LINE)  # type: ignore[call-arg]
    # A first_seq that is not an int is declined: encode_batch_py formats it.
    assert C.encode_records(batch, "1", Record, RECORD_LINE, delete_line) is None  # type: ignore[arg-type]

    def failing(*args: object) -> bytes:
        raise KeyError("no")

    with pytest.raises(KeyError):
        C.encode_records(batch, 1, failing, RECORD_LINE, delete_line)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        C.encode_records([("a", "k", b'"k"', None)], 1, Record, RECORD_LINE, failing)


# ---------------------------------------------------------------------------
# 3. install_upserts <-> State.install


class Spy:
    """state._speedups with install_upserts counted."""

    def __init__(self) -> None:
        self.encode_records = C.encode_records
        self.installed = 0

    def install_upserts(
        self, records: list[Record], collections: dict[str, Collection], ctype: type[Collection]
    ) -> int:
        n: int = C.install_upserts(records, collections, ctype)
        self.installed += n
        return n


class Twin:
    """One State run with the C (a Spy) and one with Python alone, op for op."""

    def __init__(self) -> None:
        self.spy = Spy()
        self.c = State()
        self.py = State()
        self.snaps: list[tuple[Snapshot, Snapshot]] = []
        self.by_seq: tuple[dict[int, Record], dict[int, Record]] = ({}, {})

    def apply(self, batch: list[PreparedChange]) -> None:
        with mock.patch.object(state_mod, "_speedups", self.spy):
            got_c = self.c.apply(batch)
        with mock.patch.object(state_mod, "_speedups", None):
            got_py = self.py.apply(batch)
        assert got_c == got_py
        for got, by_seq in zip((got_c, got_py), self.by_seq, strict=True):
            for rec in got:
                by_seq[rec.seq] = rec
        self.check()

    def open(self, only: frozenset[str] | None) -> None:
        self.snaps.append((self.c.snapshot(only), self.py.snapshot(only)))

    def read(self, i: int, max_bytes: int) -> None:
        if self.snaps:
            a, b = self.snaps[i % len(self.snaps)]
            assert a.read(max_bytes) == b.read(max_bytes)
            self.check()

    def close(self, i: int) -> None:
        if self.snaps:
            a, b = self.snaps.pop(i % len(self.snaps))
            a.close()
            b.close()
            self.check()

    def check(self) -> None:
        assert dump(self.c) == dump(self.py)
        # `before` is the very record object the change replaced.
        for s, by_seq in zip((self.c, self.py), self.by_seq, strict=True):
            for coll in s.collections.values():
                for rec in coll.slots:
                    b = rec.before
                    if isinstance(b, Record):
                        assert b is by_seq[b.seq]
                    else:
                        assert b is None


def dump(s: State) -> Any:
    return (
        s.seq,
        s.retained,
        s.open_snapshots,
        [
            (
                name,
                c.name,
                list(c.index.items()),
                list(c.slots),  # Records compare all fields: seq ... prev, before
                list(c.lines),
                [r.line for r in c.slots],
                c.live,
                list(c.tombstones),
            )
            for name, c in s.collections.items()
        ],
    )


COLLS = ["a", "b", "é"]
RKEYS = ["k0", "k1", "k2", "k3", "日本"]
CHANGES = st.tuples(
    st.sampled_from(COLLS),
    st.sampled_from(RKEYS),
    st.one_of(st.none(), st.sampled_from([b"1", b'"x"', b"[1,2]", b'{"a":"\xc3\xa9"}'])),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("batch"), st.lists(CHANGES, max_size=8)),
        st.tuples(st.just("open"), st.sampled_from([None, frozenset(["a"]), frozenset(COLLS)])),
        st.tuples(st.just("read"), st.integers(0, 5), st.integers(1, 300)),
        st.tuples(st.just("close"), st.integers(0, 5)),
    ),
    max_size=25,
)


def prepared(changes: Sequence[tuple[str, str, bytes | None]]) -> list[PreparedChange]:
    return [(n, k, msgspec.json.encode(str(k)), v) for n, k, v in changes]


def run_ops(ops: list[Any]) -> Twin:
    t = Twin()
    for op in ops:
        if op[0] == "batch":
            t.apply(prepared(op[1]))
        elif op[0] == "open":
            t.open(op[1])
        elif op[0] == "read":
            t.read(op[1], op[2])
        else:
            t.close(op[1])
    while t.snaps:
        t.close(0)
    return t


@needs_c
@fuzz(300)
@given(ops=OPS)
def test_install_upserts_matches_python(ops: list[Any]) -> None:
    t = run_ops(ops)
    note("C installed some" if t.spy.installed else "C installed none")


@needs_c
def test_install_upserts_is_used_and_stops_at_a_delete() -> None:
    a1, b1, a2 = ("a", "k1", b"1"), ("b", "k1", b"2"), ("a", "k2", b"3")
    t = Twin()
    t.apply(prepared([a1, b1, a2, ("a", "k1", b"4"), ("new", "k", b"5")]))  # mixed, new
    assert t.spy.installed == 5
    t.apply(prepared([("a", "k1", None), a1, b1]))  # the first is a delete: all Python
    assert t.spy.installed == 5
    t.apply(prepared([a2, ("b", "k1", b"6"), ("b", "k9", None), a1, ("c", "x", b"7")]))
    assert t.spy.installed == 7  # the two before the delete
    t.apply([])
    t.open(None)
    t.apply(prepared([a1, ("a", "k2", None)]))  # a snapshot is open: all Python
    assert t.spy.installed == 7
    t.close(0)
    t.apply(prepared([("a", "k2", b"8"), ("a", "k2", b"9")]))  # tombstones removed: C
    assert t.spy.installed == 9
    assert t.c.collections["a"].live == 2


class S(str):
    pass


@needs_c
def test_install_upserts_odd_records_in_a_state() -> None:
    """Names and keys that are str subclasses: the C stops at them, Python goes on;
    the State ends the same."""
    t = Twin()
    t.apply(prepared([("a", "k", b"1"), (S("a"), "j", b"2"), ("a", S("i"), b"3")]))
    t.apply(prepared([("a", "i", b"4"), ("b", "k", b"5"), (S("b"), S("k"), b"6")]))
    assert t.spy.installed == 3


class NoLine:
    """An upsert record of another type whose line was never set."""

    __slots__ = ("before", "collection", "deleted", "key", "line")

    def __init__(self) -> None:
        self.collection, self.key, self.deleted = "z", "j", False


@needs_c
def test_install_upserts_direct() -> None:
    recs = [
        Record(1, "a", "k", b"1", False),
        Record(2, "b", "k", b"2", False),
        Record(3, "a", "k", b"3", False),
        Record(4, "a", "j", b"4", True),
        Record(5, "a", "i", b"5", False),
    ]
    colls: dict[str, Collection] = {}
    assert C.install_upserts(recs, colls, Collection) == 3
    a, b = colls["a"], colls["b"]
    assert (a.index, a.slots, a.lines, a.live) == ({"k": 0}, [recs[2]], [b"3"], 1)
    assert (b.index, b.slots, b.lines, b.live) == ({"k": 0}, [recs[1]], [b"2"], 1)
    assert recs[0].before is None
    assert recs[1].before is None
    assert recs[2].before is recs[0]
    assert recs[3].before is msgspec.UNSET
    assert recs[4].before is msgspec.UNSET
    assert C.install_upserts(recs[3:], colls, Collection) == 0  # a delete first
    assert C.install_upserts([], colls, Collection) == 0
    # Replacing a tombstone counts it live again.
    a.slots[0] = Record(9, "a", "k", b"t", True)
    a.live = 0
    assert C.install_upserts([Record(10, "a", "k", b"x", False)], colls, Collection) == 1
    assert a.live == 1
    assert a.lines == [b"x"]
    # Not the expected types: it stops there, for Python to go on.
    odd = Collection("odd")
    odd.index = type("D", (dict,), {})()
    colls["odd"] = odd
    assert C.install_upserts([Record(11, "odd", "k", b"1", False)], colls, Collection) == 0
    with pytest.raises(TypeError):
        C.install_upserts(tuple(recs), colls, Collection)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.install_upserts(recs, list(colls.items()), Collection)  # type: ignore[arg-type]
    # Anything that could run Python code mid-record stops it there, for Python.
    for odd_rec in (
        Record(12, "z", ["k"], b"2", False),  # type: ignore[arg-type]
        Record(12, "z", S("k"), b"2", False),
        Record(12, S("z"), "k", b"2", False),
        Record(12, "z", "k", b"2", 0),  # type: ignore[arg-type]
    ):
        assert (
            C.install_upserts([Record(11, "a", "x", b"1", False), odd_rec], colls, Collection) == 1
        )
    # An error on the way: what was installed stays, and its live count with it.
    bad = [Record(12, "z", "k", b"1", False), NoLine()]
    with pytest.raises(AttributeError):
        C.install_upserts(bad, colls, Collection)  # type: ignore[arg-type]
    assert colls["z"].slots == [bad[0]]
    assert colls["z"].live == 1


@needs_c
def test_install_upserts_truthy_deleted() -> None:
    """A replaced record whose `deleted` is truthy but not True counts as a tombstone, as
    in Python. (The C once tested `is True`.)"""

    def live(speed: object) -> int:
        with mock.patch.object(state_mod, "_speedups", speed):
            s = State(seq=1)
            c = s.collections["a"] = Collection("a")
            c.index["k"] = 0
            c.slots.append(Record(1, "a", "k", b"t", 1))  # type: ignore[arg-type]
            c.lines.append(b"t")
            s.install([Record(2, "a", "k", b"y", False)])
            return c.live

    assert live(C) == live(None)


class OtherRecord:
    """A stand-in for a record in a slot, of another type than Record, as large as one:
    every slot holds None and ``deleted`` (True) is a property, so reading it at any
    offset of Record's layout gets None, deterministically. (With a type smaller than
    Record the read goes past the object and its result is luck.)"""

    __slots__ = ("a", "b", "c", "d", "e", "f", "g")

    def __init__(self) -> None:
        self.a = self.b = self.c = self.d = self.e = self.f = self.g = None

    @property
    def deleted(self) -> bool:
        return True


@needs_c
def test_install_upserts_replaced_record_of_another_type() -> None:
    """A replaced record of another type is read as Python reads it. (The C once read it
    with the offsets of the new record's type.)"""

    def live(speed: object) -> int:
        with mock.patch.object(state_mod, "_speedups", speed):
            s = State(seq=1)
            c = s.collections["a"] = Collection("a")
            c.index["k"] = 0
            c.slots.append(OtherRecord())  # type: ignore[arg-type]
            c.lines.append(b"t")
            s.install([Record(2, "a", "k", b"y", False)])
            return c.live

    assert live(C) == live(None)


# ---------------------------------------------------------------------------
# 4. Reference counts and memory over 100k calls, on every path

CALLS = 100_000


def assert_no_growth(call: Callable[[], object], watched: Sequence[object]) -> None:
    """CALLS calls leave the refcounts of ``watched``, the objects the collector
    tracks and the pymalloc blocks where they were; the last tenth of them runs under
    tracemalloc (which also sees what is not a Python object)."""
    for _ in range(1000):  # warm up: caches (a str's UTF-8, type maps), free lists
        call()
    gc.collect()
    refs = [sys.getrefcount(o) for o in watched]
    tracked = len(gc.get_objects())
    blocks = sys.getallocatedblocks()
    for _ in range(CALLS - CALLS // 10):
        call()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(CALLS // 10):
            call()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert [sys.getrefcount(o) for o in watched] == refs
    assert len(gc.get_objects()) - tracked < 50
    # A leak of one small object per call would be 100k blocks, and 10k under tracemalloc.
    assert sys.getallocatedblocks() - blocks < 2000
    assert grown < 50_000, f"{grown} bytes more after {CALLS // 10} calls"


def expect(exc: type[BaseException], fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        try:
            fn()
        except exc:
            return None
        raise AssertionError(f"{exc.__name__} not raised")

    return call


class BadBool:
    def __bool__(self) -> bool:
        raise ValueError("no")


class BadEq:
    def __hash__(self) -> int:
        return hash("a")

    def __eq__(self, other: object) -> bool:
        raise ValueError("no")


def prepare_plain_paths() -> list[tuple[str, Callable[[], object], list[object]]]:
    known = {"a": "a", "b": "b"}
    good = [raw_change(b'{"x":[1,2,"e12"]}', key=f"k{i}") for i in range(3)]
    paths: list[tuple[str, list[ChangeIn], dict[Any, Any], type[BaseException] | None]] = [
        ("accepted", good, known, None),
        ("delete", [*good, ChangeIn("a", "k", msgspec.Raw(b"1"), delete=True)], known, None),
        ("unknown", [*good, raw_change(b"1", name="zz")], known, None),
        ("key", [*good, raw_change(b"1", key="é")], known, None),
        ("value", [*good, raw_change(b"1 ")], known, None),
        ("no value", [*good, raw_change(b"")], known, None),
        ("not a buffer", [*good, ChangeIn("a", "k", "1")], known, TypeError),  # type: ignore[arg-type]
        ("bad bool", [*good, ChangeIn("a", "k", msgspec.Raw(b"1"), BadBool())], known, ValueError),  # type: ignore[arg-type]
        ("bad eq", [*good, raw_change(b"1")], {BadEq(): "a"}, ValueError),
    ]
    out: list[tuple[str, Callable[[], object], list[object]]] = []
    for why, changes, kn, exc in paths:

        def call(changes: list[ChangeIn] = changes, kn: dict[Any, Any] = kn) -> object:
            return C.prepare_plain(changes, kn, MAX_KEY_LENGTH, MAX_DEPTH)

        watched: list[object] = [changes, kn, *changes]
        for c in changes:
            watched += [c.collection, c.key, c.value]
        out.append((why, call if exc is None else expect(exc, call), watched))
    out.append(
        ("not a list", expect(TypeError, lambda: C.prepare_plain((), known, 1, 1)), [known])  # type: ignore[arg-type]
    )
    return out


def encode_records_paths() -> list[tuple[str, Callable[[], object], list[object]]]:
    up = ("a", "k", b'"k"', b"1")
    batches: list[tuple[str, list[Any], int, type[BaseException] | None]] = [
        ("upserts and deletes", [up, ("é", "k", b'"k"', None), up], 1, None),
        ("formatted by Python", [up, ("a", "k", b'"k"', bytearray(b"2"))], -1, None),
        ("three items", [up, ("a", "k", b'"k"')], 1, ValueError),
        ("not a str", [up, (1, "k", b'"k"', b"1")], 1, AttributeError),
        ("surrogate", [up, ("\ud800", "k", b'"k"', b"1")], 1, UnicodeEncodeError),
        ("bad value", [up, ("a", "k", b'"k"', "1")], 1, TypeError),
        ("bad delete", [up, (1, "k", b'"k"', None)], 1, AttributeError),
        ("seqs past 2**63", [up, up], 2**63 - 1, None),
        ("seq past 2**64", [up], 2**64, None),
    ]
    out: list[tuple[str, Callable[[], object], list[object]]] = []
    for why, batch, first, exc in batches:

        def call(batch: list[Any] = batch, first: int = first) -> object:
            return C.encode_records(batch, first, Record, RECORD_LINE, delete_line)

        watched: list[object] = [batch, Record, RECORD_LINE, delete_line, *batch]
        for item in batch:
            watched += list(item)
        out.append((why, call if exc is None else expect(exc, call), watched))
    return out


def install_upserts_paths() -> list[tuple[str, Callable[[], object], list[object]]]:
    recs = [
        Record(1, "a", "k", b"1", False),
        Record(2, "b", "k", b"2", False),
        Record(3, "a", "k", b"3", False),  # replaces the first
        Record(4, "a", "j", b"4", False),
        Record(5, "a", "k", b"5", True),  # stops here
    ]
    odd = Collection("a")
    odd.lines = ()  # type: ignore[assignment]
    no_line = [recs[0], NoLine()]
    not_str = [recs[0], Record(6, "a", ["k"], b"6", False)]  # type: ignore[arg-type]

    def fails(name: str) -> Collection:
        raise KeyError(name)

    def installs() -> object:
        return C.install_upserts(recs, {}, Collection)

    def stops() -> object:
        return C.install_upserts(recs, {"a": odd}, Collection)

    # Positions past the small-int cache (0..256): a new int per call, removed again.
    big = Collection("big")
    for i in range(300):
        big.index[f"b{i}"] = i
        big.slots.append(Record(i + 1, "big", f"b{i}", b"1", False))
        big.lines.append(b"1")
    big.live = 300
    grow = [Record(301, "big", "new", b"2", False), Record(302, "big", "b299", b"3", False)]
    big_colls = {"big": big}

    def appends() -> object:
        n = C.install_upserts(grow, big_colls, Collection)
        big.index.pop("new")
        big.slots.pop()
        big.lines.pop()
        big.slots[299] = grow[1].before  # type: ignore[assignment]
        big.lines[299] = b"1"
        big.live -= 1
        return n

    watched: list[object] = [recs, odd, Collection, *recs]
    for r in recs:
        watched += [r.collection, r.key, r.line]
    return [
        ("installs", installs, watched),
        ("past the small ints", appends, [big, *big.slots, *grow]),
        ("not the expected types", stops, watched),
        (
            "a record with no line",
            expect(AttributeError, lambda: C.install_upserts(no_line, {}, Collection)),  # type: ignore[arg-type]
            [*watched, no_line],
        ),
        (
            "a key that is not a str",
            lambda: C.install_upserts(not_str, {}, Collection),
            [*watched, not_str],
        ),
        (
            "collection_type fails",
            expect(KeyError, lambda: C.install_upserts(recs, {}, fails)),  # type: ignore[arg-type]
            [*watched, fails],
        ),
        (
            "not a list",
            expect(TypeError, lambda: C.install_upserts((), {}, Collection)),  # type: ignore[arg-type]
            watched,
        ),
    ]


def all_paths() -> list[Any]:
    if not HAVE_C:
        return []
    out = []
    for fn, paths in (
        ("prepare_plain", prepare_plain_paths()),
        ("encode_records", encode_records_paths()),
        ("install_upserts", install_upserts_paths()),
    ):
        out += [pytest.param(call, watched, id=f"{fn}: {why}") for why, call, watched in paths]
    return out


@needs_c
@pytest.mark.parametrize(("call", "watched"), all_paths())
def test_no_leak(call: Callable[[], object], watched: list[object]) -> None:
    assert_no_growth(call, watched)


# ---------------------------------------------------------------------------
# Crashes and misreads found by review (each in a fresh interpreter)

PRELUDE = """
import gc, mmap, ctypes, msgspec
from statecast import _speedups as C
from statecast.core.frames import RECORD_LINE, delete_line
from statecast.core.state import Collection, Record
"""


def run_script(body: str) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def assert_ok(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, f"exit status {p.returncode}: {p.stderr}"
    assert p.stdout == "OK\n", p.stderr


@needs_c
def test_prepare_plain_list_shrunk_during_the_loop() -> None:
    """Python code run from the loop (here a field's property) that empties the list.
    (The C once walked the list itself with its length cached: SIGSEGV.)"""
    p = run_script(
        """
        changes = []
        class Evil:
            collection, key, value = "a", "k", b"1"
            @property
            def delete(self):
                changes.clear()
                return False
        changes.extend([Evil(), Evil(), Evil()])
        try:
            C.prepare_plain(changes, {"a": "a"}, 1024, 64)
        except Exception:
            pass
        print("OK")
        """
    )
    assert_ok(p)


@needs_c
def test_encode_records_batch_shrunk_during_the_loop() -> None:
    """Python code run from the loop (here a value's __bytes__) that empties the batch.
    (The C once walked the list itself with its length cached: SIGSEGV.)"""
    p = run_script(
        """
        batch = []
        class V:
            def __bytes__(self):
                batch.clear()
                return b"1"
        batch.extend([("a", "k", b'"k"', V()), ("a", "k", b'"k"', b"2"), ("a", "k", b'"k"', b"3")])
        try:
            C.encode_records(batch, 1, Record, RECORD_LINE, delete_line)
        except Exception:
            pass
        print("OK")
        """
    )
    assert_ok(p)


@needs_c
def test_install_upserts_list_shrunk_during_the_loop() -> None:
    """collection_type() emptying the records list. (The C once walked the list itself
    with its length cached: it read a freed record.)"""
    p = run_script(
        """
        records = []
        def make(name):
            records.clear()
            return Collection(name)
        records.extend(
            [Record(i + 1, "a" if i == 0 else "b", f"k{i}", b"x", False) for i in range(3)]
        )
        try:
            n = C.install_upserts(records, {}, make)
            assert isinstance(n, int)
        except RuntimeError:
            pass
        print("OK")
        """
    )
    assert_ok(p)


@needs_c
def test_prepare_plain_reads_before_the_value() -> None:
    """A value that starts with three digits or signs: the C looks back for an "e"
    only inside the value. (It once read the byte before the buffer: a decline when
    that byte was an "e", SIGSEGV before an unreadable page.)"""
    p = run_script(
        """
        class Ch:
            __slots__ = ("collection", "key", "value", "delete")
        def ch(value):
            c = Ch()
            c.collection, c.key, c.value, c.delete = "a", "k", value, False
            return c
        # The byte before the view is an "e": "123" is then declined.
        assert C.prepare_plain([ch(memoryview(b"e123")[1:])], {"a": "a"}, 1024, 64) is not None
        # The page before the value unreadable (PROT_NONE): SIGSEGV.
        page = mmap.PAGESIZE
        m = mmap.mmap(-1, 2 * page)
        m[page:page + 3] = b"123"
        buf = (ctypes.c_char * (2 * page)).from_buffer(m)
        libc = ctypes.CDLL(None)
        assert libc.mprotect(ctypes.c_void_p(ctypes.addressof(buf)), page, 0) == 0
        assert C.prepare_plain([ch(memoryview(m)[page:page + 3])], {"a": "a"}, 1024, 64)
        print("OK")
        """
    )
    assert_ok(p)


@needs_c
def test_type_caches_outlive_their_types() -> None:
    """The C caches the field offsets of the last type it read, by identity. A type
    dropped after use and another made, often at the same address, with its fields
    at other offsets: the new one is read right. (The caches once held the type
    borrowed, and read the new type with the old offsets.)"""
    p = run_script(
        """
        known = {"a": "a", "evil": "evil"}
        FIELDS = ("collection", "key", "value", "delete")
        RFIELDS = ("before", "collection", "deleted", "key", "line")
        def change(fields, extra=()):
            T = type("T", (), {"__slots__": fields + extra})
            c = T()
            c.collection, c.key, c.value, c.delete = "a", "k", b"1", False
            for name, v in zip(extra, ("evil", False, "stolen", b"666")):
                setattr(c, name, v)
            return c
        def record(fields, extra=()):
            T = type("R", (), {"__slots__": fields + extra})
            r = T()
            r.collection, r.key, r.line, r.deleted = "a", "k", b"x", False
            for name, v in zip(extra, ("evil", False, "stolen", b"666")):
                setattr(r, name, v)
            return r
        for _ in range(20):
            assert C.prepare_plain([change(FIELDS)], known, 1024, 64)
            gc.collect()
            c = change(FIELDS, ("aaa", "bbb", "ccc", "ccd"))
            assert C.prepare_plain([c], known, 1024, 64) == [("a", "k", b'"k"', b"1")]
            del c
            assert C.install_upserts([record(RFIELDS)], {}, Collection) == 1
            gc.collect()
            colls = {}
            r = record(RFIELDS, ("aaa", "bbb", "ccc", "ccd"))
            assert C.install_upserts([r], colls, Collection) == 1
            assert list(colls) == ["a"] and list(colls["a"].index) == ["k"], colls
            assert colls["a"].lines == [b"x"]
            del colls, r
            gc.collect()
        print("OK")
        """
    )
    assert_ok(p)


# ---------------------------------------------------------------------------
# 5. CI runs the C


@pytest.mark.skipif("CI" not in os.environ, reason="only in CI (the CI variable is set)")
@pytest.mark.skipif(
    os.environ.get("STATECAST_NO_SPEEDUPS", "") not in ("", "0"),
    reason="STATECAST_NO_SPEEDUPS is set: this job runs the Python code on purpose",
)
def test_ci_builds_the_speedups() -> None:
    assert accel.speedups is not None, (
        "statecast._speedups did not build or import in CI: only the Python code is tested"
    )


def test_accel_says_why_the_python_code_runs() -> None:
    """accel.why_not names the reason when the C is off (the server's start line
    carries it); with STATECAST_NO_SPEEDUPS=0 or unset it is None where the C is built."""
    code = "from statecast.core import accel; print(accel.speedups is None, accel.why_not)"

    def run(value: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "STATECAST_NO_SPEEDUPS"}
        if value is not None:
            env["STATECAST_NO_SPEEDUPS"] = value
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    assert run("1") == "True STATECAST_NO_SPEEDUPS is set"
    if HAVE_C:
        assert run("0") == "False None"
        assert run(None) == "False None"


def test_the_server_start_line_says_when_the_c_is_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="statecast.server")
    monkeypatch.setattr(accel, "why_not", "STATECAST_NO_SPEEDUPS is set")
    s = Server(store="memory", port=0, http_port=None, heartbeat=None).start_in_thread()
    s.stop_in_thread(timeout=30)
    lines = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith(", no C speedups: STATECAST_NO_SPEEDUPS is set)")
