"""The pgoutput decoder: on a stream captured from PostgreSQL 15, on handcrafted bytes, on junk.

The captured fixture (``data/pgoutput_capture.bin``) comes from ``capture_pgoutput.py``; the
expected sequence below is written from that script's SQL, not from the decoder.  The slow test
captures the same scenario from a live private server and checks it the same way.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast.sources.pgoutput import (
    PG_EPOCH,
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    PgOutputError,
    Relation,
    Truncate,
    TupleValue,
    Type,
    Update,
    decode,
    format_lsn,
    parse_lsn,
    pg_timestamp,
)
from tests.sources.capture_pgoutput import (
    BIN_NAME,
    DATA_DIR,
    SERVER_SETTINGS,
    TRANSACTIONS,
    Captured,
    capture,
    document_body,
    read_capture,
)
from tests.sources.pgserver import PgServer

# -- the captured stream -----------------------------------------------------------------------


@cache
def captured() -> tuple[Captured, ...]:
    return tuple(read_capture(DATA_DIR / BIN_NAME))


def decoded(messages: Sequence[Captured]) -> list[Message]:
    return [decode(message.payload) for message in messages]


Norm = tuple[object, ...]

ALL_TYPES_COLUMNS = (
    ("id", 23, 1, -1),
    ("c_int2", 21, 0, -1),
    ("c_int8", 20, 0, -1),
    ("c_oid", 26, 0, -1),
    ("c_float4", 700, 0, -1),
    ("c_float8", 701, 0, -1),
    ("c_numeric", 1700, 0, -1),
    ("c_numeric_12_3", 1700, 0, (12 << 16 | 3) + 4),
    ("c_bool", 16, 0, -1),
    ("c_text", 25, 0, -1),
    ("c_varchar", 1043, 0, 20 + 4),
    ("c_char", 1042, 0, 3 + 4),
    ("c_name", 19, 0, -1),
    ("c_timestamp", 1114, 0, -1),
    ("c_timestamptz", 1184, 0, -1),
    ("c_date", 1082, 0, -1),
    ("c_time", 1083, 0, -1),
    ("c_interval", 1186, 0, -1),
    ("c_json", 114, 0, -1),
    ("c_jsonb", 3802, 0, -1),
    ("c_int4_arr", 1007, 0, -1),
    ("c_text_arr", 1009, 0, -1),
    ("c_int4_2d", 1007, 0, -1),
    ("c_int8_arr", 1016, 0, -1),
    ("c_float8_arr", 1022, 0, -1),
    ("c_bool_arr", 1000, 0, -1),
    ("c_numeric_arr", 1231, 0, -1),
    ("c_varchar_arr", 1015, 0, -1),
    ("c_jsonb_arr", 3807, 0, -1),
    ("c_bytea", 17, 0, -1),
    ("c_uuid", 2950, 0, -1),
    ("c_mood", "public.mood", 0, -1),  # a user type: its OID varies, its Type message names it
)
ALL_TYPES_ROW_1 = (
    "1",
    "32767",
    "9223372036854775807",
    "4294967295",
    "1.5",
    "3.141592653589793",
    "12345678901234567890.123456789",
    "1.500",
    "t",
    'he said "hi", \\ ok',
    "värchar ✓",
    "ab ",
    "a_name",
    "2024-01-02 03:04:05.123456",
    "2024-01-02 01:04:05.123456+00",  # written at +02, printed in the session's UTC
    "2024-02-29",
    "13:14:15.5",
    "1 year 2 mons 3 days 04:05:06.7",
    '{"b": [1, 2.5, null], "a": "x"}',  # json keeps the text
    '{"a": "x", "b": [1, 2.5, null]}',  # jsonb normalises it
    "{1,2,3}",
    '{plain,"with space","comma,inside","quote\\"inside","back\\\\slash","","NULL",NULL,'
    '"{braces}",ünï}',
    "{{1,2},{3,4}}",
    "{-9223372036854775808,0}",
    "{1.5,NaN,-Infinity}",
    "{t,f,NULL}",
    "{0.1,NaN,-5}",
    '{"a b",c}',
    '{"{\\"k\\": [1]}","\\"s\\"","null"}',
    "\\x00010203fffe",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "happy",
)
_N = None
ALL_TYPES_ROW_2 = (
    *("2", _N, _N, _N, "-Infinity", "NaN", "NaN", _N, "f", "", _N, _N, _N),
    *("infinity", "-infinity", "infinity", _N, _N, "[]", "null", "{}", "{}"),
    *("[0:1][1:2]={{5,6},{7,8}}", _N, _N, _N, _N, _N, _N, "\\x", _N, _N),
)
ALL_TYPES_ROW_3 = ("3", *[None] * 31)

ACCOUNTS_V1 = (("id", 23, 1, -1), ("name", 25, 0, -1), ("balance", 1700, 0, -1))
ACCOUNTS_V2 = (*ACCOUNTS_V1, ("email", 25, 0, -1))
LINE_ITEMS = (("order_id", 23, 1, -1), ("line", 23, 1, -1), ("sku", 25, 0, -1), ("qty", 23, 0, -1))
# REPLICA IDENTITY FULL: every column is part of the key.
AUDIT_LOG = (("at", 1082, 1, -1), ("who", 25, 1, -1), ("what", 25, 1, -1))
DOCUMENTS = (("id", 23, 1, -1), ("title", 25, 0, -1), ("body", 25, 0, -1))


def rel(name: str, identity: str, columns: tuple[tuple[object, ...], ...]) -> Norm:
    return ("R", "public", name, identity, columns)


EXPECTED: list[Norm] = [
    # insert all_types: a user type (Type), then the relation, then three rows
    ("B",),
    ("Y", "public", "mood"),
    rel("all_types", "d", ALL_TYPES_COLUMNS),
    ("I", "all_types", ALL_TYPES_ROW_1),
    ("I", "all_types", ALL_TYPES_ROW_2),
    ("I", "all_types", ALL_TYPES_ROW_3),
    ("C",),
    # insert accounts (one statement, three rows)
    ("B",),
    rel("accounts", "d", ACCOUNTS_V1),
    ("I", "accounts", ("1", "alice", "100.50")),
    ("I", "accounts", ("2", "bob", "0")),
    ("I", "accounts", ("3", "carol", "-7")),
    ("C",),
    # update: the key is unchanged, so no old tuple
    ("B",),
    ("U", "accounts", None, None, ("1", "alice", "200.25")),
    ("C",),
    # update primary key: the old key ('K', other columns null), then the new row
    ("B",),
    ("U", "accounts", "K", ("2", None, None), ("20", "bob", "0")),
    ("C",),
    # delete: the old key only
    ("B",),
    ("D", "accounts", "K", ("3", None, None)),
    ("C",),
    # multi-table transaction: one Begin/Commit around three tables' changes
    ("B",),
    rel("line_items", "d", LINE_ITEMS),
    ("I", "line_items", ("1", "1", "apple", "3")),
    ("I", "line_items", ("1", "2", "pear", "1")),
    ("I", "line_items", ("2", "1", "fig", "9")),
    rel("audit_log", "f", AUDIT_LOG),
    ("I", "audit_log", ("2024-05-06", "alice", "ordered")),
    ("I", "audit_log", ("2024-05-06", "bob", None)),
    ("U", "accounts", None, None, ("1", "alice", "190.25")),
    ("C",),
    # update composite key: both old key columns
    ("B",),
    ("U", "line_items", "K", ("1", "2", None, None), ("1", "3", "pear", "2")),
    ("C",),
    # replica identity full: whole old rows ('O')
    ("B",),
    ("U", "audit_log", "O", ("2024-05-06", "bob", None), ("2024-05-06", "bob", "paid")),
    ("D", "audit_log", "O", ("2024-05-06", "alice", "ordered")),
    ("C",),
    # toast insert: the whole > 8 KB body
    ("B",),
    rel("documents", "d", DOCUMENTS),
    ("I", "documents", ("1", "v1", document_body())),
    ("C",),
    # toast update: the untouched, out-of-line body is 'u'
    ("B",),
    ("U", "documents", None, None, ("1", "v2", UNCHANGED)),
    ("C",),
    # add column: the new shape is announced before the insert that uses it
    ("B",),
    rel("accounts", "d", ACCOUNTS_V2),
    ("I", "accounts", ("4", "dave", "1", "dave@example.com")),
    ("C",),
    # truncate: one message for both tables; options CASCADE (1) | RESTART IDENTITY (2)
    ("B",),
    rel("line_items", "d", LINE_ITEMS),
    rel("audit_log", "f", AUDIT_LOG),
    ("T", 3, ("line_items", "audit_log")),
    ("C",),
    # origin: replayed from 'upstream' (origin LSN 0/ABCDEF0)
    ("B",),
    ("O", 0xABCDEF0, "upstream"),
    rel("accounts", "d", ACCOUNTS_V2),
    ("I", "accounts", ("5", "eve", "5", None)),
    ("C",),
    # a non-transactional logical message arrives on its own, outside any transaction
    ("M", False, "statecast", b"at once"),
    # logical message: a transactional one inside its transaction
    ("B",),
    ("M", True, "statecast", b"in a transaction"),
    ("D", "documents", "K", ("1", None, None)),
    ("C",),
]


def normalize(messages: Sequence[Message]) -> list[Norm]:
    """The stable part of each message: relation ids and user type OIDs become names."""
    relations: dict[int, str] = {}
    types: dict[int, str] = {}
    out: list[Norm] = []
    for message in messages:
        match message:
            case Begin():
                out.append(("B",))
            case Commit():
                out.append(("C",))
            case Origin(commit_lsn=lsn, name=name):
                out.append(("O", lsn, name))
            case Type(type_oid=oid, namespace=namespace, name=name):
                types[oid] = f"{namespace}.{name}"
                out.append(("Y", namespace, name))
            case Relation():
                relations[message.relation_id] = message.name
                columns = tuple(
                    (c.name, types.get(c.type_oid, c.type_oid), c.flags, c.type_modifier)
                    for c in message.columns
                )
                out.append(
                    ("R", message.namespace, message.name, message.replica_identity, columns)
                )
            case Insert(relation_id=rid, new=new):
                out.append(("I", relations[rid], new))
            case Update(relation_id=rid, old_kind=kind, old=old, new=new):
                out.append(("U", relations[rid], kind, old, new))
            case Delete(relation_id=rid, old_kind=kind, old=old):
                out.append(("D", relations[rid], kind, old))
            case Truncate(options=options, relation_ids=ids):
                out.append(("T", options, tuple(relations[i] for i in ids)))
            case LogicalMessage(prefix=prefix, content=content):
                out.append(("M", message.transactional, prefix, content))
    return out


def check_transactions(messages: Sequence[Message]) -> None:
    """Begin/Commit pair up, their LSNs agree and increase, changes sit inside them."""
    begin: Begin | None = None
    last_end = 0
    last_xid = -1
    commits = 0
    for message in messages:
        if isinstance(message, Begin):
            assert begin is None, "Begin inside a transaction"
            begin = message
            assert message.final_lsn > last_end
            assert message.xid > last_xid
            last_xid = message.xid
        elif isinstance(message, Commit):
            assert begin is not None, "Commit without Begin"
            assert message.flags == 0
            assert message.commit_lsn == begin.final_lsn
            assert message.end_lsn > message.commit_lsn
            assert message.commit_ts == begin.commit_ts
            last_end = message.end_lsn
            begin = None
            commits += 1
        elif isinstance(message, LogicalMessage):
            if message.transactional:
                assert begin is not None
                assert last_end <= message.lsn < begin.final_lsn
            else:
                assert begin is None
                assert message.lsn >= last_end
        elif isinstance(message, Insert | Update | Delete | Truncate | Origin):
            assert begin is not None, f"{message} outside a transaction"
    assert begin is None, "stream ends inside a transaction"
    assert commits == len(TRANSACTIONS)


def check_tuples_match_relations(messages: Sequence[Message]) -> None:
    relations: dict[int, Relation] = {}
    for message in messages:
        if isinstance(message, Relation):
            relations[message.relation_id] = message
        elif isinstance(message, Insert | Update | Delete):
            relation = relations[message.relation_id]
            tuples = [getattr(message, "new", None), getattr(message, "old", None)]
            for values in tuples:
                if values is not None:
                    assert len(values) == len(relation.columns)
        elif isinstance(message, Truncate):
            assert all(rid in relations for rid in message.relation_ids)


def check_commit_times(messages: Sequence[Message], *, not_before: datetime) -> None:
    begins = [m for m in messages if isinstance(m, Begin)]
    origin = [
        b
        for b, label in zip(begins, (t.label for t in TRANSACTIONS), strict=True)
        if label == "origin"
    ]
    # The origin transaction carries the commit time given to pg_replication_origin_xact_setup.
    assert [b.commit_time for b in origin] == [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)]
    local = [b.commit_time for b in begins if b not in origin]
    assert local == sorted(local)
    assert not_before <= local[0] <= local[-1] <= datetime.now(UTC)


def test_fixture_is_the_expected_sequence() -> None:
    messages = decoded(captured())
    actual = normalize(messages)
    for index, (got, want) in enumerate(zip(actual, EXPECTED, strict=False)):
        assert got == want, f"message {index}"
    assert len(actual) == len(EXPECTED)


def test_fixture_transactions_and_lsns() -> None:
    messages = decoded(captured())
    check_transactions(messages)
    check_tuples_match_relations(messages)
    check_commit_times(messages, not_before=datetime(2024, 1, 3, tzinfo=UTC))


def test_fixture_details() -> None:
    messages = decoded(captured())
    relations = [m for m in messages if isinstance(m, Relation)]
    all_types = relations[0]
    assert all_types.name == "all_types"
    assert [c.name for c in all_types.key_columns] == ["id"]
    line_items = next(r for r in relations if r.name == "line_items")
    assert [c.name for c in line_items.key_columns] == ["order_id", "line"]
    assert all(c.is_key for c in next(r for r in relations if r.name == "audit_log").columns)
    (mood,) = [m for m in messages if isinstance(m, Type)]
    assert mood.type_oid == all_types.columns[-1].type_oid >= 16384
    (truncate,) = [m for m in messages if isinstance(m, Truncate)]
    assert truncate.cascade
    assert truncate.restart_identity
    assert set(truncate.relation_ids) == {
        r.relation_id
        for r in relations
        if r.name
        in (
            "line_items",
            "audit_log",
        )
    }
    toast_update = next(m for m in messages if isinstance(m, Update) and m.new[-1] is UNCHANGED)
    assert toast_update.new == ("1", "v2", UNCHANGED)
    (origin,) = [m for m in messages if isinstance(m, Origin)]
    assert format_lsn(origin.commit_lsn) == "0/ABCDEF0"


def test_every_truncation_of_a_captured_message_is_rejected() -> None:
    for message in captured():
        for cut in range(len(message.payload)):
            with pytest.raises(PgOutputError):
                decode(message.payload[:cut])


def test_a_trailing_byte_is_rejected() -> None:
    for message in captured():
        with pytest.raises(PgOutputError, match="trailing"):
            decode(message.payload + b"\x00")


@pytest.mark.slow
def test_live_server_stream_decodes() -> None:
    """The same scenario, captured now from a private server, decodes to the same sequence.

    Relation (and Type) messages are compared loosely: when a server re-announces a relation
    may differ between PostgreSQL versions, so each must only be one of the expected shapes.
    """
    pytest.importorskip("psycopg2")
    started = time.monotonic()
    before = datetime.now(UTC).replace(microsecond=0)
    with PgServer(settings=SERVER_SETTINGS) as pg:
        conn = pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version_num")
                row = cur.fetchone()
        finally:
            conn.close()
        assert row is not None
        if int(row[0]) < 140000:
            pytest.skip("the scenario uses pgoutput's 'messages' option (PostgreSQL 14+)")
        result = capture(pg.dsn, timeout=60)
    messages = decoded(result.messages)
    check_transactions(messages)
    check_tuples_match_relations(messages)
    check_commit_times(messages, not_before=before)
    actual = normalize(messages)
    shapes = {norm for norm in EXPECTED if norm[0] in ("R", "Y")}
    assert {norm for norm in actual if norm[0] in ("R", "Y")} <= shapes
    assert [n for n in actual if n[0] not in ("R", "Y")] == [
        n for n in EXPECTED if n[0] not in ("R", "Y")
    ]
    assert time.monotonic() - started < 60


# -- the private server (tests/sources/pgserver.py) -------------------------------------------


def test_pgserver_skips_without_binaries(tmp_path: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match="not found"):
        PgServer(bin_dir=tmp_path)


@pytest.mark.slow
def test_pgserver_lifecycle() -> None:
    psycopg2 = pytest.importorskip("psycopg2")

    def query(pg: PgServer, sql: str) -> object:
        conn = pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                row = cur.fetchone()
                assert row is not None
                return row[0]
        finally:
            conn.close()

    with PgServer(settings={"application_name": "it's quoted"}) as pg:
        assert pg.port != 5432
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        assert pg.dsn == f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres"
        assert query(pg, "SHOW listen_addresses") == "127.0.0.1"
        assert query(pg, "SHOW wal_level") == "logical"
        assert query(pg, "SHOW max_replication_slots") == "10"
        assert query(pg, "SHOW application_name") == "it's quoted"  # settings are quoted
        assert str(query(pg, "SHOW unix_socket_directories")).startswith(str(pg.root))
        repl = pg.connect(replication=True)
        repl.close()
        pg.execute("CREATE TABLE t (x int)", "INSERT INTO t VALUES (1)")
        pid = pg.pid
        pg.kill()  # a crash: committed rows survive, the restart recovers
        assert not pg.is_running()
        with pytest.raises(psycopg2.OperationalError):
            pg.connect()
        pg.start()
        assert pg.pid != pid
        assert query(pg, "SELECT count(*) FROM t") == 1
        pg.stop()
        assert not pg.is_running()
        pg.stop()  # idempotent
        pg.restart()
        assert query(pg, "SELECT x FROM t") == 1
        root = pg.root
        assert root is not None
        assert "database system is ready to accept connections" in pg.log()
    assert not root.exists()
    pg.close()  # idempotent


# -- handcrafted messages ----------------------------------------------------------------------


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def tuple_data(values: Sequence[TupleValue]) -> bytes:
    out = struct.pack(">H", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        elif isinstance(value, str):
            raw = value.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
        else:
            assert isinstance(value, bytes)
            out += b"b" + struct.pack(">i", len(value)) + value
    return out


LSN = 0x0000_0016_B374_D848
TS = 757_479_845_123_456  # 2024-01-02 03:04:05.123456 UTC

HANDCRAFTED: list[tuple[bytes, Message]] = [
    (
        b"B" + struct.pack(">QqI", LSN, TS, 4_000_000_000),
        Begin(final_lsn=LSN, commit_ts=TS, xid=4_000_000_000),
    ),
    (
        b"C" + struct.pack(">BQQq", 0, LSN, LSN + 48, TS),
        Commit(flags=0, commit_lsn=LSN, end_lsn=LSN + 48, commit_ts=TS),
    ),
    (b"O" + struct.pack(">Q", LSN) + cstr("node_a"), Origin(commit_lsn=LSN, name="node_a")),
    (
        b"R"
        + struct.pack(">I", 16384)
        + cstr("")
        + cstr("t")
        + b"i"
        + struct.pack(">H", 2)
        + b"\x01"
        + cstr("id")
        + struct.pack(">Ii", 20, -1)
        + b"\x00"
        + cstr("naïve")
        + struct.pack(">Ii", 1043, 24),
        Relation(
            relation_id=16384,
            namespace="",
            name="t",
            replica_identity="i",
            columns=(Column(1, "id", 20, -1), Column(0, "naïve", 1043, 24)),
        ),
    ),
    (
        b"R" + struct.pack(">I", 7) + cstr("s") + cstr("empty") + b"n" + struct.pack(">H", 0),
        Relation(relation_id=7, namespace="s", name="empty", replica_identity="n", columns=()),
    ),
    (
        b"Y" + struct.pack(">I", 16400) + cstr("public") + cstr("mood"),
        Type(type_oid=16400, namespace="public", name="mood"),
    ),
    (
        b"I"
        + struct.pack(">I", 16384)
        + b"N"
        + tuple_data(["1", None, UNCHANGED, b"\x00\xff", ""]),
        Insert(relation_id=16384, new=("1", None, UNCHANGED, b"\x00\xff", "")),
    ),
    (
        b"I" + struct.pack(">I", 1) + b"N" + tuple_data([]),
        Insert(relation_id=1, new=()),
    ),
    (
        b"U" + struct.pack(">I", 16384) + b"N" + tuple_data(["1", "x"]),
        Update(relation_id=16384, old_kind=None, old=None, new=("1", "x")),
    ),
    (
        b"U"
        + struct.pack(">I", 16384)
        + b"K"
        + tuple_data(["1", None])
        + b"N"
        + tuple_data(["2", "x"]),
        Update(relation_id=16384, old_kind="K", old=("1", None), new=("2", "x")),
    ),
    (
        b"U"
        + struct.pack(">I", 16384)
        + b"O"
        + tuple_data(["1", "a"])
        + b"N"
        + tuple_data(["1", "b"]),
        Update(relation_id=16384, old_kind="O", old=("1", "a"), new=("1", "b")),
    ),
    (
        b"D" + struct.pack(">I", 16384) + b"K" + tuple_data(["1", None]),
        Delete(relation_id=16384, old_kind="K", old=("1", None)),
    ),
    (
        b"D" + struct.pack(">I", 16384) + b"O" + tuple_data(["1", "a"]),
        Delete(relation_id=16384, old_kind="O", old=("1", "a")),
    ),
    (
        b"T" + struct.pack(">IB", 2, 0) + struct.pack(">II", 16384, 16390),
        Truncate(options=0, relation_ids=(16384, 16390)),
    ),
    (b"T" + struct.pack(">IB", 0, 2), Truncate(options=2, relation_ids=())),
    (
        b"M" + struct.pack(">BQ", 1, LSN) + cstr("pfx") + struct.pack(">i", 3) + b"a\x00b",
        LogicalMessage(flags=1, lsn=LSN, prefix="pfx", content=b"a\x00b"),
    ),
    (
        b"M" + struct.pack(">BQ", 0, LSN) + cstr("") + struct.pack(">i", 0),
        LogicalMessage(flags=0, lsn=LSN, prefix="", content=b""),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), HANDCRAFTED, ids=lambda v: "")
def test_handcrafted_message_decodes(raw: bytes, expected: Message) -> None:
    assert decode(raw) == expected
    assert decode(bytearray(raw)) == expected
    assert decode(memoryview(raw)) == expected


@pytest.mark.parametrize(("raw", "expected"), HANDCRAFTED, ids=lambda v: "")
def test_handcrafted_message_truncated_or_overlong(raw: bytes, expected: Message) -> None:
    for cut in range(len(raw)):
        with pytest.raises(PgOutputError):
            decode(raw[:cut])
    with pytest.raises(PgOutputError, match="trailing"):
        decode(raw + b"x")


def test_helpers() -> None:
    begin = decode(HANDCRAFTED[0][0])
    assert isinstance(begin, Begin)
    assert begin.commit_time == datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert pg_timestamp(0) == PG_EPOCH
    assert pg_timestamp(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert format_lsn(LSN) == "16/B374D848"
    assert format_lsn(0) == "0/0"
    assert parse_lsn("16/B374D848") == LSN
    assert parse_lsn("0/0") == 0
    for bad in ("", "16", "/1", "1/", "x/1", "123456789/0", "1/2/3"):
        with pytest.raises(ValueError, match="not an LSN"):
            parse_lsn(bad)
    assert repr(UNCHANGED) == "UNCHANGED"
    relation = HANDCRAFTED[3][1]
    assert isinstance(relation, Relation)
    assert relation.key_columns == (Column(1, "id", 20, -1),)
    message = HANDCRAFTED[-2][1]
    assert isinstance(message, LogicalMessage)
    assert message.transactional
    truncate = HANDCRAFTED[-3][1]
    assert isinstance(truncate, Truncate)
    assert truncate.restart_identity
    assert not truncate.cascade


def test_messages_are_frozen_with_slots() -> None:
    begin = Begin(final_lsn=1, commit_ts=2, xid=3)
    with pytest.raises(AttributeError):
        begin.xid = 4  # type: ignore[misc]
    assert not hasattr(begin, "__dict__")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "empty message"),
        (b"Z", "unknown message type 'Z'"),
        (b"\xff", "unknown message type 0xff"),
        (b"S\x00\x00\x00\x01\x01", "Stream Start .* not part of protocol version 1"),
        (b"b" + bytes(20), "Begin Prepare"),
        (b"B" + bytes(19), "Begin message truncated"),
        (b"I\x00\x00\x00\x01X\x00\x00", "expected 'N'"),
        (b"U\x00\x00\x00\x01X\x00\x00", "expected 'K', 'O' or 'N'"),
        (b"U\x00\x00\x00\x01K\x00\x00K\x00\x00", "expected 'N' after the old tuple"),
        (b"D\x00\x00\x00\x01N\x00\x00", "expected 'K' or 'O'"),
        (b"I\x00\x00\x00\x01N\x00\x01x", "unknown kind 'x'"),
        (b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xff", "negative length"),
        (b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x05ab", "truncated"),
        (b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x01\xff", "not UTF-8"),
        (b"I\x00\x00\x00\x01N\xff\xff", r"new tuple \(65535 columns\)"),
        (b"O" + bytes(8) + b"abc", "no terminator"),
        (b"Y\x00\x00\x00\x01\xc3\x00t\x00", "not UTF-8"),
        (b"T\xff\xff\xff\xff\x00", "relation ids"),
        (b"R\x00\x00\x00\x01\x00r\x00d\x00\x05", "columns"),
        (b"M\x01" + bytes(8) + b"p\x00\x00\x00\x00\x09abc", "content"),
    ],
)
def test_malformed_messages_raise_pgoutput_error(raw: bytes, match: str) -> None:
    with pytest.raises(PgOutputError, match=match):
        decode(raw)


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(PgOutputError, match="expected bytes"):
        decode("B")  # type: ignore[arg-type]


def test_pgoutput_error_is_a_value_error() -> None:
    assert issubclass(PgOutputError, ValueError)


# -- properties ----------------------------------------------------------------------------------

tuple_values = st.lists(
    st.one_of(st.none(), st.just(UNCHANGED), st.text(), st.binary()), max_size=20
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_pgoutput_error(raw: bytes) -> None:
    try:
        decode(raw)
    except PgOutputError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(b"BCORYIUDTM"), st.binary(max_size=64))
def test_random_bodies_raise_only_pgoutput_error(kind: int, body: bytes) -> None:
    try:
        decode(bytes([kind]) + body)
    except PgOutputError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_captured_messages_raise_only_pgoutput_error(data: st.DataObject) -> None:
    message = data.draw(st.sampled_from(captured())).payload
    position = data.draw(st.integers(0, len(message) - 1))
    byte = data.draw(st.integers(0, 255))
    corrupted = message[:position] + bytes([byte]) + message[position + 1 :]
    try:
        decode(corrupted)
    except PgOutputError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), tuple_values, st.one_of(st.none(), tuple_values))
def test_update_round_trips(
    relation_id: int, new: list[TupleValue], old: list[TupleValue] | None
) -> None:
    raw = b"U" + struct.pack(">I", relation_id)
    if old is not None:
        raw += b"O" + tuple_data(old)
    raw += b"N" + tuple_data(new)
    assert decode(raw) == Update(
        relation_id=relation_id,
        old_kind=None if old is None else "O",
        old=None if old is None else tuple(old),
        new=tuple(new),
    )
