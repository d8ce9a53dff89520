"""Text-format PostgreSQL values to JSON-able values: every row of the mapping, arrays, errors."""

from __future__ import annotations

import base64
import re
from functools import cache

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statecast.sources.pgoutput import Insert, Relation, decode
from statecast.sources.pgtypes import (
    ARRAY_ELEMENT_OIDS,
    SESSION_SETTINGS,
    Oid,
    PgTypeError,
    array_element_oid,
    convert,
    convert_array,
    parse_array,
    session_options,
)
from tests.sources.capture_pgoutput import BIN_NAME, DATA_DIR, read_capture


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- scalars -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (Oid.INT2, "-32768", -32768),
        (Oid.INT4, "2147483647", 2147483647),
        (Oid.INT8, "-9223372036854775808", -9223372036854775808),
        (Oid.OID, "4294967295", 4294967295),
        (Oid.FLOAT4, "1.5", 1.5),
        (Oid.FLOAT8, "3.141592653589793", 3.141592653589793),
        (Oid.FLOAT8, "-0", -0.0),
        (Oid.FLOAT8, "1e+300", 1e300),
        (Oid.FLOAT8, "1.5e-07", 1.5e-07),
        (Oid.FLOAT4, "NaN", "NaN"),
        (Oid.FLOAT8, "Infinity", "Infinity"),
        (Oid.FLOAT8, "-Infinity", "-Infinity"),
        (Oid.NUMERIC, "12345678901234567890.123456789", "12345678901234567890.123456789"),
        (Oid.NUMERIC, "1.500", "1.500"),
        (Oid.NUMERIC, "NaN", "NaN"),
        (Oid.NUMERIC, "-Infinity", "-Infinity"),
        (Oid.BOOL, "t", True),
        (Oid.BOOL, "f", False),
        (Oid.TEXT, 'he said "hi", \\ ok', 'he said "hi", \\ ok'),
        (Oid.TEXT, "", ""),
        (Oid.VARCHAR, "värchar ✓", "värchar ✓"),
        (Oid.BPCHAR, "ab ", "ab "),
        (Oid.NAME, "a_name", "a_name"),
        (Oid.CHAR, "x", "x"),
        (Oid.UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (Oid.INTERVAL, "1 year 2 mons 3 days 04:05:06.7", "1 year 2 mons 3 days 04:05:06.7"),
        (Oid.INTERVAL, "-00:00:01", "-00:00:01"),
        # timestamptz: ISO 8601, offset as +HH:MM (seconds only when PostgreSQL has them)
        (Oid.TIMESTAMPTZ, "2024-01-02 03:04:05.123+00", "2024-01-02T03:04:05.123+00:00"),
        (Oid.TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00", "2024-01-02T03:04:05.123456+00:00"),
        (Oid.TIMESTAMPTZ, "2024-01-02 03:04:05+00", "2024-01-02T03:04:05+00:00"),
        (Oid.TIMESTAMPTZ, "2024-01-02 08:34:05+05:30", "2024-01-02T08:34:05+05:30"),
        (Oid.TIMESTAMPTZ, "2024-01-02 00:04:05-03", "2024-01-02T00:04:05-03:00"),
        (Oid.TIMESTAMPTZ, "1850-01-01 00:00:00+05:53:28", "1850-01-01T00:00:00+05:53:28"),
        (Oid.TIMESTAMPTZ, "12024-01-02 03:04:05+00", "12024-01-02T03:04:05+00:00"),
        (Oid.TIMESTAMPTZ, "infinity", "infinity"),
        (Oid.TIMESTAMPTZ, "-infinity", "-infinity"),
        (Oid.TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC", "0044-03-15 12:00:00+00 BC"),
        # timestamp: ISO 8601, no offset
        (Oid.TIMESTAMP, "2024-01-02 03:04:05.123456", "2024-01-02T03:04:05.123456"),
        (Oid.TIMESTAMP, "2024-01-02 03:04:05", "2024-01-02T03:04:05"),
        (Oid.TIMESTAMP, "infinity", "infinity"),
        (Oid.TIMESTAMP, "0044-03-15 12:00:00 BC", "0044-03-15 12:00:00 BC"),
        (Oid.DATE, "2024-02-29", "2024-02-29"),
        (Oid.DATE, "-infinity", "-infinity"),
        (Oid.DATE, "0044-03-15 BC", "0044-03-15 BC"),
        (Oid.TIME, "13:14:15", "13:14:15"),
        (Oid.TIME, "13:14:15.5", "13:14:15.5"),
        (Oid.TIME, "24:00:00", "24:00:00"),
        (Oid.TIMETZ, "13:14:15.25+02", "13:14:15.25+02:00"),
        (Oid.TIMETZ, "13:14:15-09:30", "13:14:15-09:30"),
        # json, jsonb: embedded
        (Oid.JSON, '{"b": [1, 2.5, null], "a": "x"}', {"b": [1, 2.5, None], "a": "x"}),
        (Oid.JSONB, '{"a": "x", "b": [1, 2.5, null]}', {"a": "x", "b": [1, 2.5, None]}),
        (Oid.JSONB, "[]", []),
        (Oid.JSONB, '"s"', "s"),
        (Oid.JSONB, "null", None),
        (Oid.JSONB, "true", True),
        (Oid.JSONB, "123456789012345678901234567890", 123456789012345678901234567890),
        (Oid.JSON, '"\\u00e9\\ud83d\\ude00"', "é😀"),
        (Oid.JSON, '{"big": 1e400, "ok": 1.5}', {"big": "1e400", "ok": 1.5}),
        # bytea: base64
        (Oid.BYTEA, "\\x00010203fffe", b64(b"\x00\x01\x02\x03\xff\xfe")),
        (Oid.BYTEA, "\\x", ""),
        (Oid.BYTEA, "abc\\000\\\\\\377", b64(b"abc\x00\\\xff")),  # bytea_output = escape
        (Oid.BYTEA, "", ""),
        # unknown OIDs: the text
        (16385, "happy", "happy"),
        (Oid.MONEY, "$1.50", "$1.50"),
        (Oid.INET, "10.0.0.1/8", "10.0.0.1/8"),
        (603, "(1,1),(0,0)", "(1,1),(0,0)"),
        (1020, "{(1,1),(0,0);(2,2),(1,1)}", "{(1,1),(0,0);(2,2),(1,1)}"),  # box[]: ';'
    ],
)
def test_scalar_mapping(oid: int, text: str, expected: object) -> None:
    result = convert(oid, text)
    assert result == expected
    assert type(result) is type(expected)
    msgspec.json.encode(result)  # JSON-able


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", 12),
        ("-7", -7),
        ("0", 0),
        ("100.50", 100.5),
        ("12345678901234567890", 12345678901234567890),
        ("0.1", 0.1),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("1" + "0" * 400 + ".5", "1" + "0" * 400 + ".5"),  # beyond a float: exact text
    ],
)
def test_numeric_as_number(text: str, expected: object) -> None:
    result = convert(Oid.NUMERIC, text, numeric_as_number=True)
    assert result == expected
    assert type(result) is type(expected)
    assert convert(Oid.NUMERIC, text) == text  # the default: exact text


@pytest.mark.parametrize(
    "oid",
    sorted({*(getattr(Oid, name) for name in dir(Oid) if name.isupper()), *ARRAY_ELEMENT_OIDS}),
)
def test_null_is_none_for_every_type(oid: int) -> None:
    assert convert(oid, None) is None
    assert convert(oid, None, numeric_as_number=True) is None


def test_float_special_values_are_strings_because_json_has_none() -> None:
    for text in ("NaN", "Infinity", "-Infinity"):
        assert convert(Oid.FLOAT8, text) == text
        assert msgspec.json.decode(msgspec.json.encode(convert(Oid.FLOAT4, text))) == text


@pytest.mark.parametrize(
    ("oid", "text", "match"),
    [
        (Oid.INT4, "abc", "integer"),
        (Oid.INT4, "1.5", "integer"),
        (Oid.INT8, "", "integer"),
        (Oid.INT2, " 1", "integer"),
        (Oid.INT4, "١٢", "integer"),
        (Oid.DATE, "٢٠٢٤-01-02", "date"),
        (Oid.FLOAT8, "abc", "float"),
        (Oid.FLOAT8, "inf", "float"),
        (Oid.FLOAT8, "nan", "float"),
        (Oid.BOOL, "true", "bool"),
        (Oid.BOOL, "", "bool"),
        (Oid.TIMESTAMPTZ, "Tue Jan 02 03:04:05.123 2024 UTC", "DateStyle ISO"),
        (Oid.TIMESTAMPTZ, "2024-01-02 03:04:05", "timestamptz"),
        (Oid.TIMESTAMP, "2024-01-02 03:04:05+00", "timestamp"),
        (Oid.TIMESTAMP, "01/02/2024 03:04:05", "DateStyle ISO"),
        (Oid.DATE, "01/02/2024", "DateStyle ISO"),
        (Oid.TIME, "1:2:3", "time"),
        (Oid.TIMETZ, "13:14:15", "timetz"),
        (Oid.JSONB, "{", "json"),
        (Oid.JSON, "", "json"),
        # `json` keeps its text as written: a lone surrogate escape is valid there, and
        # no record value can carry one (the row is skipped, not the source stopped).
        (Oid.JSON, '{"a":"\\ud800"}', "lone surrogate"),
        (Oid.JSON, "[" * 5000 + "]" * 5000, "nested too deeply"),  # not a RecursionError
        (Oid.JSONB, '{"a":' * 3000 + "1" + "}" * 3000, "nested too deeply"),
        (Oid.JSON, '["x", {"\\udc00": 1e400}]', "lone surrogate"),
        (Oid.BYTEA, "\\xzz", "bytea"),
        (Oid.BYTEA, "\\x0", "bytea"),
        (Oid.BYTEA, "a\\b", "bytea"),
        (Oid.BYTEA, "a\\400", "bytea"),
        (Oid.BYTEA, "€", "bytea"),
        (Oid.NUMERIC, "abc", "numeric"),
    ],
)
def test_malformed_text_raises_pgtype_error(oid: int, text: str, match: str) -> None:
    with pytest.raises(PgTypeError, match=match):
        convert(oid, text, numeric_as_number=True)


def test_a_numeric_of_more_digits_than_python_converts_stays_exact_text() -> None:
    big = "9" * 5000
    assert convert(Oid.NUMERIC, big, numeric_as_number=True) == big
    assert convert(Oid.NUMERIC, "-" + big, numeric_as_number=True) == "-" + big


def test_pgtype_error_is_a_value_error_and_shortens_long_text() -> None:
    assert issubclass(PgTypeError, ValueError)
    with pytest.raises(PgTypeError) as info:
        convert(Oid.INT4, "x" * 1000)
    assert len(str(info.value)) < 200


# -- arrays ------------------------------------------------------------------------------------

FIXTURE_TEXT_ARRAY = (
    '{plain,"with space","comma,inside","quote\\"inside","back\\\\slash","","NULL",NULL,'
    '"{braces}",ünï}'
)


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (1007, "{1,2,3}", [1, 2, 3]),
        (1007, "{}", []),
        (1007, "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        (1007, "[0:1][1:2]={{5,6},{7,8}}", [[5, 6], [7, 8]]),
        (1007, "[-3:-2]={1,2}", [1, 2]),
        (1007, "{{{1},{2}},{{3},{NULL}}}", [[[1], [2]], [[3], [None]]]),
        (1007, "{NULL,1}", [None, 1]),
        (1007, "{ 1 , 2 }", [1, 2]),
        (1005, "{-1}", [-1]),
        (1016, "{-9223372036854775808,0}", [-9223372036854775808, 0]),
        (1028, "{1}", [1]),
        (
            1009,
            FIXTURE_TEXT_ARRAY,
            [
                "plain",
                "with space",
                "comma,inside",
                'quote"inside',
                "back\\slash",
                "",
                "NULL",
                None,
                "{braces}",
                "ünï",
            ],
        ),
        (1009, "{null,Null,nULL}", [None, None, None]),
        (1009, '{"null"}', ["null"]),
        (1009, "{NULL\\ }", ["NULL "]),
        (1009, "{\\NULL}", ["NULL"]),  # an escaped unquoted NULL is the string
        (1009, "{a\\,b,c\\}d,e\\\\f}", ["a,b", "c}d", "e\\f"]),
        (1009, "{a b,  c d  }", ["a b", "c d"]),
        (1009, "{a\\ }", ["a "]),  # escaped trailing whitespace is kept
        (1009, '{"  padded  "}', ["  padded  "]),
        (1009, '{{"a","b"},{"c",NULL}}', [["a", "b"], ["c", None]]),
        (1015, '{"a b",c}', ["a b", "c"]),
        (1014, '{"ab ","x  "}', ["ab ", "x  "]),
        (1003, "{pg_catalog}", ["pg_catalog"]),
        (1002, '{a,"\\\\"}', ["a", "\\"]),
        (1021, "{1.5,NaN}", [1.5, "NaN"]),
        (1022, "{1.5,NaN,-Infinity}", [1.5, "NaN", "-Infinity"]),
        (1000, "{t,f,NULL}", [True, False, None]),
        (1231, "{0.1,NaN,-5}", ["0.1", "NaN", "-5"]),
        (3807, '{"{\\"k\\": [1]}","\\"s\\"","null"}', [{"k": [1]}, "s", None]),
        (199, '{"[1, 2]",NULL}', [[1, 2], None]),
        (1001, '{"\\\\x0102","\\\\x",NULL}', [b64(b"\x01\x02"), "", None]),
        (
            1185,
            '{"2024-01-02 03:04:05+00",infinity,NULL}',
            ["2024-01-02T03:04:05+00:00", "infinity", None],
        ),
        (1115, '{"2024-01-02 03:04:05.5"}', ["2024-01-02T03:04:05.5"]),
        (1182, "{2024-01-02,-infinity}", ["2024-01-02", "-infinity"]),
        (1183, "{13:14:15}", ["13:14:15"]),
        (1270, "{13:14:15+02}", ["13:14:15+02:00"]),
        (1187, '{"1 day",-00:00:01}', ["1 day", "-00:00:01"]),
        (2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
        (1041, "{10.0.0.1/8,::1}", ["10.0.0.1/8", "::1"]),
    ],
)
def test_array_mapping(oid: int, text: str, expected: object) -> None:
    result = convert(oid, text)
    assert result == expected
    msgspec.json.encode(result)


def test_numeric_array_as_numbers() -> None:
    assert convert(1231, "{0.1,NaN,-5,NULL}", numeric_as_number=True) == [0.1, "NaN", -5, None]
    assert convert(1231, "{0.1,NaN,-5}") == ["0.1", "NaN", "-5"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1,2",
        "{1,2",
        "{1,2}}",
        "{1,,2}",
        "{,}",
        "{1} x",
        '{"a}',
        '{a"b}',
        "{a{b}",
        "{a\\",
        '{"a\\',
        "[1:2]{1,2}",
        "[x]={1}",
        "{{1},",
        "{1 2 ,}",
    ],
)
def test_malformed_arrays_raise_pgtype_error(text: str) -> None:
    with pytest.raises(PgTypeError, match="malformed array"):
        parse_array(text)


def test_malformed_array_element_raises_pgtype_error() -> None:
    with pytest.raises(PgTypeError, match="integer"):
        convert(1007, "{1,x}")


def test_parse_array_gives_strings_and_none() -> None:
    assert parse_array('{{"a",NULL},{"",b}}') == [["a", None], ["", "b"]]


def test_user_defined_array_types() -> None:
    # An enum[] has an OID of its own: the source learns the element type from the catalog
    # (or a Type message) and converts with convert_array.
    assert convert(16390, "{sad,happy}") == "{sad,happy}"
    assert convert_array(16385, "{sad,NULL,happy}") == ["sad", None, "happy"]
    assert convert_array(Oid.NUMERIC, "{1.5}", numeric_as_number=True) == [1.5]
    assert array_element_oid(1007) == Oid.INT4
    assert array_element_oid(Oid.INT4) is None


def pg_array_text(items: list[object]) -> str:
    """What PostgreSQL's array_out prints (quoting only when needed)."""
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(pg_array_text(item))
        else:
            assert isinstance(item, str)
            if (
                item == ""
                or item.upper() == "NULL"
                or re.search(r'[{},"\\ \t\n\r\v\f]', item) is not None
            ):
                escaped = item.replace("\\", "\\\\").replace('"', '\\"')
                parts.append(f'"{escaped}"')
            else:
                parts.append(item)
    return "{" + ",".join(parts) + "}"


elements = st.one_of(st.none(), st.text(alphabet=st.characters(exclude_characters="\x00")))
arrays = st.recursive(
    st.lists(elements, max_size=6),
    lambda inner: st.lists(inner, min_size=1, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(arrays)
def test_array_text_round_trips(items: list[object]) -> None:
    assert parse_array(pg_array_text(items)) == items
    assert convert(1009, pg_array_text(items)) == items


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_random_array_text_raises_only_pgtype_error(text: str) -> None:
    try:
        parse_array(text)
    except PgTypeError:
        pass


# -- session settings --------------------------------------------------------------------------


def test_session_options() -> None:
    assert SESSION_SETTINGS["TimeZone"] == "UTC"
    assert SESSION_SETTINGS["DateStyle"] == "ISO"
    options = session_options()
    assert options.startswith("-c TimeZone=UTC ")
    assert "-c bytea_output=hex" in options
    assert " " not in "".join(SESSION_SETTINGS.values())  # no quoting needed


# -- the captured stream -------------------------------------------------------------------------


@cache
def captured_all_types() -> tuple[Relation, tuple[Insert, ...]]:
    messages = [decode(m.payload) for m in read_capture(DATA_DIR / BIN_NAME)]
    relation = next(m for m in messages if isinstance(m, Relation) and m.name == "all_types")
    rows = tuple(
        m for m in messages if isinstance(m, Insert) and m.relation_id == relation.relation_id
    )
    return relation, rows


def converted_rows(*, numeric_as_number: bool = False) -> list[dict[str, object]]:
    relation, rows = captured_all_types()
    out = []
    for row in rows:
        values = {}
        for column, value in zip(relation.columns, row.new, strict=True):
            assert value is None or isinstance(value, str)
            values[column.name] = convert(
                column.type_oid, value, numeric_as_number=numeric_as_number
            )
        out.append(values)
    return out


def test_captured_all_types_rows_convert() -> None:
    row1, row2, row3 = converted_rows()
    assert row1 == {
        "id": 1,
        "c_int2": 32767,
        "c_int8": 9223372036854775807,
        "c_oid": 4294967295,
        "c_float4": 1.5,
        "c_float8": 3.141592653589793,
        "c_numeric": "12345678901234567890.123456789",
        "c_numeric_12_3": "1.500",
        "c_bool": True,
        "c_text": 'he said "hi", \\ ok',
        "c_varchar": "värchar ✓",
        "c_char": "ab ",
        "c_name": "a_name",
        "c_timestamp": "2024-01-02T03:04:05.123456",
        "c_timestamptz": "2024-01-02T01:04:05.123456+00:00",
        "c_date": "2024-02-29",
        "c_time": "13:14:15.5",
        "c_interval": "1 year 2 mons 3 days 04:05:06.7",
        "c_json": {"b": [1, 2.5, None], "a": "x"},
        "c_jsonb": {"a": "x", "b": [1, 2.5, None]},
        "c_int4_arr": [1, 2, 3],
        "c_text_arr": [
            "plain",
            "with space",
            "comma,inside",
            'quote"inside',
            "back\\slash",
            "",
            "NULL",
            None,
            "{braces}",
            "ünï",
        ],
        "c_int4_2d": [[1, 2], [3, 4]],
        "c_int8_arr": [-9223372036854775808, 0],
        "c_float8_arr": [1.5, "NaN", "-Infinity"],
        "c_bool_arr": [True, False, None],
        "c_numeric_arr": ["0.1", "NaN", "-5"],
        "c_varchar_arr": ["a b", "c"],
        "c_jsonb_arr": [{"k": [1]}, "s", None],
        "c_bytea": b64(b"\x00\x01\x02\x03\xff\xfe"),
        "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "c_mood": "happy",  # an enum: unknown OID, the text
    }
    assert {k: v for k, v in row2.items() if v is not None} == {
        "id": 2,
        "c_float4": "-Infinity",
        "c_float8": "NaN",
        "c_numeric": "NaN",
        "c_bool": False,
        "c_text": "",
        "c_timestamp": "infinity",
        "c_timestamptz": "-infinity",
        "c_date": "infinity",
        "c_json": [],
        "c_int4_arr": [],
        "c_text_arr": [],
        "c_int4_2d": [[5, 6], [7, 8]],
        "c_bytea": "",
    }
    assert row2["c_jsonb"] is None  # JSON null (jsonb 'null'), like SQL NULL in JSON
    assert row3 == {name: (3 if name == "id" else None) for name in row1}
    msgspec.json.encode([row1, row2, row3])


def test_captured_rows_with_numeric_as_number() -> None:
    row1, row2, _ = converted_rows(numeric_as_number=True)
    assert row1["c_numeric"] == 12345678901234567890.123456789
    assert row1["c_numeric_12_3"] == 1.5
    assert row1["c_numeric_arr"] == [0.1, "NaN", -5]
    assert row2["c_numeric"] == "NaN"
