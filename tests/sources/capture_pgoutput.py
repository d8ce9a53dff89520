"""Capture a real pgoutput stream into ``tests/sources/data/`` (and a library for the live test).

Run from the repository root to regenerate the fixtures::

    .venv/bin/python -m tests.sources.capture_pgoutput            # or: --out DIR, --dsn DSN

It starts a private :class:`~tests.sources.pgserver.PgServer` (or uses ``--dsn``, a database
that has ``wal_level=logical`` and may be scribbled on), creates the tables of :data:`SCHEMA`
(every type that :mod:`statecast.sources.pgtypes` maps), a publication ``FOR ALL TABLES`` and a
``pgoutput`` slot, runs the labelled :data:`TRANSACTIONS`, then reads the slot with psycopg2's
``LogicalReplicationConnection`` (``proto_version '1'``, ``messages 'true'``) until every
transaction's Commit has arrived, and writes:

* ``pgoutput_capture.bin``: the raw ``XLogData`` payloads, in stream order.  Format: the
  8-byte magic :data:`MAGIC`, then per message a big-endian ``u64`` WAL start (``data_start``)
  and ``u32`` length, then that many payload bytes.  :func:`read_capture` reads it.
* ``pgoutput_capture.json``: what produced it -- server version, session settings, stream
  options, the schema and each transaction's label and SQL, and per message its type byte and
  WAL start.  The expected decoded contents live in ``tests/sources/test_pgoutput.py``, written
  by hand from the SQL here, not from the decoder.

The server's default ``timezone`` is deliberately not UTC (``Asia/Kolkata``): the replication
connection sets ``TimeZone=UTC`` (and the other :data:`statecast.sources.pgtypes.SESSION_SETTINGS`)
through its startup options, and the captured ``timestamptz`` texts show ``+00``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

from statecast.sources.pgtypes import session_options
from tests.sources.pgserver import PgServer

if TYPE_CHECKING:
    import psycopg2.extensions

__all__ = [
    "BIN_NAME",
    "DATA_DIR",
    "JSON_NAME",
    "MAGIC",
    "PUBLICATION",
    "SCHEMA",
    "SERVER_SETTINGS",
    "SLOT",
    "STREAM_OPTIONS",
    "TRANSACTIONS",
    "CaptureResult",
    "Captured",
    "Transaction",
    "capture",
    "document_body",
    "main",
    "read_capture",
    "write_capture",
]

DATA_DIR: Final = Path(__file__).resolve().parent / "data"
BIN_NAME: Final = "pgoutput_capture.bin"
JSON_NAME: Final = "pgoutput_capture.json"
MAGIC: Final = b"PGOCAP1\n"
_HEADER: Final = struct.Struct(">QI")

PUBLICATION: Final = "statecast_pub"
SLOT: Final = "statecast_capture"
STREAM_OPTIONS: Final = {
    "proto_version": "1",
    "publication_names": PUBLICATION,
    "messages": "true",
}
SERVER_SETTINGS: Final[dict[str, str | int]] = {"timezone": "Asia/Kolkata"}
"""Settings for the private server: a non-UTC default the session options must override."""


def document_body() -> str:
    """The > 8 KB, barely compressible text that the TOAST transactions store (9,600 chars)."""
    return "".join(hashlib.md5(str(i).encode()).hexdigest() for i in range(300))


SCHEMA: Final = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    """CREATE TABLE all_types (
        id int4 PRIMARY KEY,
        c_int2 int2, c_int8 int8, c_oid oid,
        c_float4 float4, c_float8 float8,
        c_numeric numeric, c_numeric_12_3 numeric(12, 3),
        c_bool bool,
        c_text text, c_varchar varchar(20), c_char char(3), c_name name,
        c_timestamp timestamp, c_timestamptz timestamptz, c_date date, c_time time,
        c_interval interval,
        c_json json, c_jsonb jsonb,
        c_int4_arr int4[], c_text_arr text[], c_int4_2d int4[][],
        c_int8_arr int8[], c_float8_arr float8[], c_bool_arr bool[], c_numeric_arr numeric[],
        c_varchar_arr varchar[], c_jsonb_arr jsonb[],
        c_bytea bytea, c_uuid uuid, c_mood mood
    )""",
    "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL, balance numeric NOT NULL)",
    """CREATE TABLE line_items (
        order_id int, line int, sku text NOT NULL, qty int NOT NULL,
        PRIMARY KEY (order_id, line)
    )""",
    "CREATE TABLE audit_log (at date NOT NULL, who text NOT NULL, what text)",
    "ALTER TABLE audit_log REPLICA IDENTITY FULL",
    "CREATE TABLE documents (id int PRIMARY KEY, title text NOT NULL, body text NOT NULL)",
    # Out of line and uncompressed, whatever pglz would make of it: an update that leaves it
    # alone sends it as 'u' (unchanged TOAST).
    "ALTER TABLE documents ALTER COLUMN body SET STORAGE EXTERNAL",
    f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES",
    "SELECT pg_replication_origin_create('upstream')",
]


@dataclass(frozen=True, slots=True)
class Transaction:
    """One transaction of the scenario: run in one psycopg2 transaction (one Begin/Commit)."""

    label: str
    statements: tuple[str, ...]
    origin: bool = False
    """Run with the replication origin ``upstream`` set up (the stream shows an Origin)."""


_BODY_SQL: Final = "(SELECT string_agg(md5(i::text), '' ORDER BY i) FROM generate_series(0, 299) i)"

TRANSACTIONS: Final = (
    Transaction(
        "insert all_types",
        (
            """INSERT INTO all_types VALUES (
                1, 32767, 9223372036854775807, 4294967295,
                1.5, 3.141592653589793,
                '12345678901234567890.123456789', 1.5,
                true,
                'he said "hi", \\ ok', 'värchar ✓', 'ab', 'a_name',
                '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.123456+02', '2024-02-29',
                '13:14:15.5', '1 year 2 mons 3 days 04:05:06.7',
                '{"b": [1, 2.5, null], "a": "x"}', '{"b": [1, 2.5, null], "a": "x"}',
                '{1,2,3}', ARRAY['plain', 'with space', 'comma,inside', 'quote"inside',
                                 'back\\slash', '', 'NULL', NULL, '{braces}', 'ünï'],
                '{{1,2},{3,4}}',
                '{-9223372036854775808,0}', '{1.5,NaN,-Infinity}', '{t,f,NULL}',
                '{0.1,NaN,-5}', '{"a b",c}', ARRAY['{"k": [1]}'::jsonb, '"s"', 'null'],
                '\\x00010203fffe', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy'
            )""",
            """INSERT INTO all_types (id, c_float4, c_float8, c_numeric, c_bool, c_text,
                c_timestamp, c_timestamptz, c_date, c_int4_arr, c_text_arr, c_int4_2d, c_bytea,
                c_json, c_jsonb)
            VALUES (2, '-Infinity', 'NaN', 'NaN', false, '',
                'infinity', '-infinity', 'infinity', '{}', '{}', '[0:1][1:2]={{5,6},{7,8}}',
                '\\x', '[]', 'null')""",
            "INSERT INTO all_types (id) VALUES (3)",
        ),
    ),
    Transaction(
        "insert accounts",
        ("INSERT INTO accounts VALUES (1, 'alice', 100.50), (2, 'bob', 0), (3, 'carol', -7)",),
    ),
    Transaction("update", ("UPDATE accounts SET balance = 200.25 WHERE id = 1",)),
    Transaction("update primary key", ("UPDATE accounts SET id = 20 WHERE id = 2",)),
    Transaction("delete", ("DELETE FROM accounts WHERE id = 3",)),
    Transaction(
        "multi-table transaction",
        (
            "INSERT INTO line_items VALUES (1, 1, 'apple', 3), (1, 2, 'pear', 1), (2, 1, 'fig', 9)",
            "INSERT INTO audit_log VALUES ('2024-05-06', 'alice', 'ordered'),"
            " ('2024-05-06', 'bob', NULL)",
            "UPDATE accounts SET balance = balance - 10 WHERE id = 1",
        ),
    ),
    Transaction(
        "update composite key",
        ("UPDATE line_items SET line = 3, qty = 2 WHERE order_id = 1 AND line = 2",),
    ),
    Transaction(
        "replica identity full",
        (
            "UPDATE audit_log SET what = 'paid' WHERE who = 'bob'",
            "DELETE FROM audit_log WHERE who = 'alice'",
        ),
    ),
    Transaction("toast insert", (f"INSERT INTO documents VALUES (1, 'v1', {_BODY_SQL})",)),
    Transaction("toast update", ("UPDATE documents SET title = 'v2' WHERE id = 1",)),
    Transaction(
        "add column",
        (
            "ALTER TABLE accounts ADD COLUMN email text",
            "INSERT INTO accounts VALUES (4, 'dave', 1, 'dave@example.com')",
        ),
    ),
    Transaction("truncate", ("TRUNCATE line_items, audit_log RESTART IDENTITY CASCADE",)),
    Transaction(
        "origin",
        (
            "SELECT pg_replication_origin_xact_setup('0/ABCDEF0', '2024-01-02 03:04:05+00')",
            "INSERT INTO accounts VALUES (5, 'eve', 5, NULL)",
        ),
        origin=True,
    ),
    Transaction(
        "logical message",
        (
            "SELECT pg_logical_emit_message(true, 'statecast', 'in a transaction')",
            "DELETE FROM documents WHERE id = 1",
        ),
    ),
)
"""The scenario, in order; each yields exactly one Begin ... Commit in the stream."""

_NON_TRANSACTIONAL: Final = "SELECT pg_logical_emit_message(false, 'statecast', 'at once')"
"""Run (autocommit) just before the last transaction: a Message outside any Begin/Commit."""


@dataclass(frozen=True, slots=True)
class Captured:
    """One ``XLogData`` message: its WAL start and its pgoutput payload."""

    data_start: int
    payload: bytes


def write_capture(path: Path, messages: Sequence[Captured]) -> None:
    with path.open("wb") as out:
        out.write(MAGIC)
        for message in messages:
            out.write(_HEADER.pack(message.data_start, len(message.payload)))
            out.write(message.payload)


def read_capture(path: Path) -> list[Captured]:
    """The messages of a ``.bin`` capture (see the module docstring for the format)."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a pgoutput capture (bad magic)")
    pos = len(MAGIC)
    out = []
    while pos < len(data):
        if pos + _HEADER.size > len(data):
            raise ValueError(f"{path}: truncated record header at offset {pos}")
        data_start, length = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        if pos + length > len(data):
            raise ValueError(f"{path}: truncated record at offset {pos}")
        out.append(Captured(data_start, data[pos : pos + length]))
        pos += length
    return out


def _run_transactions(conn: psycopg2.extensions.connection) -> None:
    conn.autocommit = False
    with conn.cursor() as cur:
        for index, txn in enumerate(TRANSACTIONS):
            if index == len(TRANSACTIONS) - 1:
                conn.autocommit = True
                cur.execute(_NON_TRANSACTIONAL)
                conn.autocommit = False
            if txn.origin:
                cur.execute("SELECT pg_replication_origin_session_setup('upstream')")
            for statement in txn.statements:
                cur.execute(statement)
            conn.commit()
            if txn.origin:
                cur.execute("SELECT pg_replication_origin_session_reset()")
                conn.commit()


def _read_stream(
    repl: psycopg2.extensions.connection, *, commits: int, timeout: float
) -> list[Captured]:
    """Read the slot until ``commits`` Commit messages arrived; bounded by ``timeout``."""
    import psycopg2.extras  # noqa: PLC0415  (psycopg2 only where the capture runs)

    cur = repl.cursor()
    assert isinstance(cur, psycopg2.extras.ReplicationCursor)
    cur.start_replication(slot_name=SLOT, decode=False, options=dict(STREAM_OPTIONS))
    out: list[Captured] = []
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < commits:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"only {seen} of {commits} commits after {timeout}s ({len(out)} messages)"
            )
        message = cur.read_message()
        if message is None:
            select.select([cur], [], [], min(remaining, 1.0))
            continue
        payload = bytes(message.payload)
        out.append(Captured(message.data_start, payload))
        if payload[:1] == b"C":
            seen += 1
    return out


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What :func:`capture` read: the messages, and the sidecar document describing them."""

    messages: list[Captured]
    info: dict[str, object]


def capture(dsn: str, *, timeout: float = 30.0) -> CaptureResult:
    """Set up :data:`SCHEMA` in ``dsn``'s database, run :data:`TRANSACTIONS`, read them back.

    The database must have ``wal_level=logical``, no slot named :data:`SLOT` and none of the
    schema's objects; the slot is dropped again at the end.  Reading is bounded by ``timeout``.
    """
    import psycopg2  # noqa: PLC0415  (psycopg2 only where the capture runs)
    import psycopg2.extras  # noqa: PLC0415

    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    repl = psycopg2.connect(
        dsn,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        options=session_options(),
        connect_timeout=10,
    )
    try:
        with conn.cursor() as cur:
            for statement in SCHEMA:
                cur.execute(statement)
            cur.execute("SHOW server_version")
            row = cur.fetchone()
        repl_cur = repl.cursor()
        assert isinstance(repl_cur, psycopg2.extras.ReplicationCursor)
        repl_cur.create_replication_slot(SLOT, output_plugin="pgoutput")
        _run_transactions(conn)
        messages = _read_stream(repl, commits=len(TRANSACTIONS), timeout=timeout)
    finally:
        repl.close()
        try:
            _drop_slot(conn, timeout=timeout)
        finally:
            conn.close()
    info: dict[str, object] = {
        "generated_by": "python -m tests.sources.capture_pgoutput",
        "server_version": row[0] if row else None,
        "server_settings": SERVER_SETTINGS,
        "session_options": session_options(),
        "stream_options": STREAM_OPTIONS,
        "format": "magic PGOCAP1\\n, then per message: u64 data_start, u32 length, payload",
        "schema": list(SCHEMA),
        "transactions": [
            {"label": t.label, "origin": t.origin, "sql": list(t.statements)} for t in TRANSACTIONS
        ],
        "non_transactional_before_last": _NON_TRANSACTIONAL,
        "messages": [
            {"type": chr(m.payload[0]), "data_start": _lsn(m.data_start), "size": len(m.payload)}
            for m in messages
        ],
    }
    return CaptureResult(messages, info)


def _drop_slot(conn: psycopg2.extensions.connection, *, timeout: float) -> None:
    """Drop :data:`SLOT`, waiting for the closed replication connection's walsender to exit."""
    import psycopg2.errors  # noqa: PLC0415

    conn.rollback()
    conn.autocommit = True
    deadline = time.monotonic() + timeout
    with conn.cursor() as cur:
        while True:
            try:
                cur.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (SLOT,),
                )
                return
            except psycopg2.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    parser.add_argument("--dsn", help="use this database instead of a private server")
    args = parser.parse_args(argv)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.dsn:
        result = capture(args.dsn)
    else:
        try:
            with PgServer(settings=SERVER_SETTINGS) as pg:
                result = capture(pg.dsn)
        except pytest.skip.Exception as exc:
            print(f"cannot start PostgreSQL: {exc}", file=sys.stderr)
            return 2
    write_capture(out_dir / BIN_NAME, result.messages)
    (out_dir / JSON_NAME).write_text(json.dumps(result.info, indent=2) + "\n")
    size = os.path.getsize(out_dir / BIN_NAME)
    print(f"wrote {len(result.messages)} messages ({size} bytes) to {out_dir / BIN_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
