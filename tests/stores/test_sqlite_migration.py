"""The SQLite store's migration to format version 2: canonical values (docs/durability.md).

Statecast 0.1 stored values as they were sent. These tests write version-1 databases by
hand, as 0.1 wrote them (same schema, same frame lines, same msgpack log rows), with the
bad rows it could hold, then open them with a real server and look at what clients get.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import msgspec
import pytest

from statecast import Server, StoreError
from statecast.core.frames import DELETE_LINE, RECORD_LINE
from statecast.core.values import MAX_DEPTH
from tests.helpers import LineClient

LOGGER = "statecast.stores.sqlite"
EPOCH = "0123456789abcdef"

# The schema statecast 0.1 created (format version 1), exactly as its _SCHEMA had it.
V1_SCHEMA = """
CREATE TABLE statecast_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE records (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    line BLOB NOT NULL,
    PRIMARY KEY (collection, key)
) WITHOUT ROWID;
CREATE TABLE changes (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    body BLOB NOT NULL
);
"""


class AsText(bytes):
    """A key stored as TEXT that is not valid UTF-8 (plain ``bytes`` keys are stored as
    BLOBs, which is what Python's sqlite3 does with a bytes parameter)."""


Key = str | bytes


def _msgpack_str(s: Key) -> bytes:
    raw = s.encode() if isinstance(s, str) else bytes(s)
    n = len(raw)
    if n < 32:
        return bytes([0xA0 | n]) + raw
    if n < 256:
        return b"\xd9" + bytes([n]) + raw
    return b"\xda" + n.to_bytes(2, "big") + raw


def msgpack_segment(items: Sequence[tuple[str, Key, bool, bytes]]) -> bytes:
    """A ``changes`` body as 0.1 wrote it (msgpack ``[[collection, key, deleted, line]]``),
    encoded by hand so that a key can be bytes that are not UTF-8."""
    n = len(items)
    out = [bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")]
    for c, k, deleted, line in items:
        out.append(b"\x94" + _msgpack_str(c) + _msgpack_str(k))
        out.append((b"\xc3" if deleted else b"\xc2") + msgspec.msgpack.encode(line))
    return b"".join(out)


def key_json(k: Key) -> bytes:
    return msgspec.json.encode(k) if isinstance(k, str) else b'"' + bytes(k) + b'"'


class V1Database:
    """The history of a version-1 database: commits of (collection, key, value text or
    None for a delete), the value text stored verbatim, as 0.1 did."""

    def __init__(self) -> None:
        self.seq = 0
        self.records: dict[tuple[str, Key], tuple[int, bytes]] = {}
        self.segments: list[tuple[int, int, bytes]] = []

    def commit(self, *changes: tuple[str, Key, bytes | None]) -> int:
        first = self.seq + 1
        items: list[tuple[str, Key, bool, bytes]] = []
        for c, k, value in changes:
            self.seq += 1
            if value is None:
                line = DELETE_LINE % (self.seq, c.encode(), key_json(k))
                self.records.pop((c, k), None)
            else:
                line = RECORD_LINE % (self.seq, c.encode(), key_json(k), value)
                self.records[(c, k)] = (self.seq, line)
            items.append((c, k, value is None, line))
        self.segments.append((first, self.seq, msgpack_segment(items)))
        return self.seq

    def write(self, path: Path, *, log_from: int = 1) -> None:
        """Write the database; the log keeps the commits from seq ``log_from`` on."""
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN")
            for statement in V1_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO statecast_meta (key, value) VALUES (?, ?)",
                [
                    ("format", "statecast"),
                    ("schema_version", "1"),
                    ("epoch", EPOCH),
                    ("seq", str(self.seq)),
                    ("created_at", "2026-11-01T09:00:00Z"),
                    ("created_by", "statecast 0.1.0"),
                ],
            )
            for (c, k), (seq, line) in self.records.items():
                if isinstance(k, AsText):
                    conn.execute(
                        "INSERT INTO records VALUES (?, CAST(? AS TEXT), ?, ?)",
                        (c, bytes(k), seq, line),
                    )
                else:
                    conn.execute("INSERT INTO records VALUES (?, ?, ?, ?)", (c, k, seq, line))
            conn.executemany(
                "INSERT INTO changes (first_seq, last_seq, body) VALUES (?, ?, ?)",
                [s for s in self.segments if s[1] >= log_from],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()


def dump(path: Path) -> tuple[list[Any], list[Any], dict[str, str]]:
    """Every row of the database (keys and lines as stored bytes)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        records = conn.execute(
            "SELECT CAST(collection AS BLOB), CAST(key AS BLOB), seq, line FROM records "
            "ORDER BY 1, 2"
        ).fetchall()
        changes = conn.execute("SELECT * FROM changes ORDER BY first_seq").fetchall()
        meta = dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())
    return records, changes, meta


@contextlib.contextmanager
def serving(path: Path) -> Iterator[Server]:
    srv = Server(store=f"sqlite:{path}", http_port=None, port=0, heartbeat=None).start_in_thread()
    try:
        yield srv
    finally:
        srv.stop_in_thread()


def depth(v: object) -> int:
    if isinstance(v, dict):
        return 1 + max(map(depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(depth, v), default=0)
    return 0


class RawClient(LineClient):
    """Reads the server's lines as bytes, and checks each is a canonical frame."""

    def __enter__(self) -> Self:
        return self

    def line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("connection closed by the server")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def frame(self) -> dict[str, Any]:
        """One frame, which must be one line of valid UTF-8, compact JSON (§9)."""
        line = self.line()
        line.decode("utf-8")  # strict: no invalid UTF-8, no encoded surrogates
        assert msgspec.json.format(line, indent=-1) == line, line  # compact, valid JSON
        frame = msgspec.json.decode(line)  # rejects lone surrogate escapes
        assert isinstance(frame, dict)
        assert depth(frame.get("value")) <= MAX_DEPTH
        return frame

    def sync(self) -> tuple[int, dict[tuple[str, str], object]]:
        self.send({"op": "sync"})
        assert self.frame()["type"] == "snapshot_begin"
        data = {}
        while (f := self.frame())["type"] == "record":
            data[(f["collection"], f["key"])] = f["value"]
        assert f["type"] == "snapshot_end"
        return f["seq"], data

    def changes_from(self, after: int, until: int) -> list[dict[str, Any]]:
        sub = self.request({"op": "subscribe", "from": after, "epoch": EPOCH})
        assert sub["type"] == "subscribed", sub
        return [self.frame() for _ in range(until - after)]


PRETTY = b'{\n  "qty" : 10,\n\t"tags": [ "a", "b" ],\r\n  "px": 2.50\n}'
PRETTY_LATER = b'{ "qty" : 11 }'
CRLF = b"[\r\n 1,\r\n 2\r\n]"
DEEP = b"[" * 100 + b"]" * 100
DEEP_OK = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
UNREPAIRABLE = {
    "ff": b'"\xff"',  # a byte that is never UTF-8
    "surrogate": b'"\xed\xa0\x80"',  # an encoded surrogate
    "overlong": b'"\xc0\x80"',  # an overlong form
    "lone-escape": b'"\\ud800"',  # a lone surrogate escape
    "deep": DEEP,  # more than 64 levels
}


def bad_history() -> V1Database:
    h = V1Database()
    h.commit(("orders", "O-1", b'{"qty":1}'), ("orders", "O-2", b'{"qty":2,"px":2.50}'))  # 1-2
    h.commit(("orders", "O-3", PRETTY))  # 3
    h.commit(*[("notes", k, v) for k, v in UNREPAIRABLE.items()])  # 4-8
    h.commit(("orders", "O-1", PRETTY_LATER))  # 9
    h.commit(("notes", "later", b'"caf\xe9"'))  # 10: latin-1, rewritten at 11
    h.commit(("notes", "later", b'"fine"'), ("orders", "O-2", None))  # 11-12
    h.commit(("orders", "O-4", CRLF))  # 13
    h.commit(("notes", "deep-ok", DEEP_OK))  # 14: exactly 64 levels is fine
    h.commit(("orders", "clé", '"café €"'.encode()))  # 15: valid non-ASCII
    h.commit(("orders", 'q"uote\\', b'"tab\\there"'))  # 16: a key that needs escapes
    return h


def test_bad_values_are_repaired_or_dropped_and_resume_stays_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "v1.db"
    h = bad_history()
    h.write(path)
    assert h.seq == 16
    with serving(path) as srv:
        assert srv.epoch == EPOCH  # resuming clients keep going
        # The five dropped records are deleted by new changes 17-21.
        assert srv.seq == 21
        with RawClient(srv.port) as c:
            seq, data = c.sync()
            assert seq == 21
            assert data == {
                ("orders", "O-1"): {"qty": 11},
                ("orders", "O-3"): json.loads(PRETTY),
                ("orders", "O-4"): [1, 2],
                ("notes", "later"): "fine",
                ("notes", "deep-ok"): json.loads(DEEP_OK),
                ("orders", "clé"): "café €",
                ("orders", 'q"uote\\'): "tab\there",
            }
        # The whole log: consecutive, only valid lines; bad upserts became deletes.
        with RawClient(srv.port) as c:
            log = c.changes_from(0, 21)
        assert [f["seq"] for f in log] == list(range(1, 22))
        by_seq = {f["seq"]: f for f in log}
        assert by_seq[3]["value"] == json.loads(PRETTY)
        assert by_seq[9]["value"] == {"qty": 11}
        assert by_seq[13]["value"] == [1, 2]
        for s, k in zip(range(4, 9), UNREPAIRABLE, strict=True):
            assert by_seq[s] == {
                "type": "change",
                "seq": s,
                "collection": "notes",
                "key": k,
                "deleted": True,
            }
        assert by_seq[10]["deleted"] is True
        assert by_seq[11]["value"] == "fine"
        assert by_seq[12]["deleted"] is True  # a real delete, kept
        appended = [(f["collection"], f["key"], f.get("deleted")) for f in log[16:]]
        assert appended == [("notes", k, True) for k in sorted(UNREPAIRABLE)]
        # A client that had everything up to 16 (it may hold the bad values) gets the
        # deletes of the dropped records when it resumes: its replica equals the state.
        with RawClient(srv.port) as c:
            tail = c.changes_from(16, 21)
        assert {(f["collection"], f["key"]) for f in tail} == {("notes", k) for k in UNREPAIRABLE}
        assert all(f["deleted"] for f in tail)

    check_warnings([r.getMessage() for r in caplog.records if r.levelno == logging.WARNING])
    assert any(
        "migrated" in r.getMessage() and "version 2" in r.getMessage() for r in caplog.records
    )

    # The newest version now (4: log-first, docs/durability.md, with the table of
    # idempotency keys); a second open finds nothing to do and changes nothing.
    records, changes, meta = dump(path)
    assert meta["schema_version"] == "4"
    assert meta["folded_seq"] == "21"
    assert meta["seq"] == "21"
    assert meta["epoch"] == EPOCH
    caplog.clear()
    with serving(path) as srv, RawClient(srv.port) as c:
        assert c.sync() == (21, data)
        assert [f["seq"] for f in c.changes_from(0, 21)] == list(range(1, 22))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if "migrated" in r.getMessage()]
    assert dump(path) == (records, changes, meta)


def check_warnings(warnings: list[str]) -> None:
    """Each repaired or dropped row of bad_history() is named, with its seq and why."""
    text = "\n".join(warnings)
    assert "repaired record orders/'O-3' (seq 3): whitespace removed" in text
    assert "repaired record orders/'O-1' (seq 9): whitespace removed" in text
    assert "repaired logged change orders/'O-4' (seq 13): whitespace removed" in text
    assert "dropped record notes/'ff' (seq 4): invalid UTF-8" in text
    assert "dropped record notes/'surrogate' (seq 5): invalid UTF-8" in text
    assert "dropped record notes/'overlong' (seq 6): invalid UTF-8" in text
    assert "dropped record notes/'lone-escape' (seq 7): a lone surrogate escape" in text
    assert "dropped record notes/'deep' (seq 8): nested deeper than 64 levels" in text
    assert "logged change notes/'later' (seq 10) turned into a delete: invalid UTF-8" in text
    assert "logged change notes/'deep' (seq 8) turned into a delete" in text
    assert "deleted by new changes, seqs 17-21" in text
    # 3 records and 3 logged changes repaired, 5 records dropped, 6 changes converted.
    assert len(warnings) == 3 + 3 + 5 + 6 + 2, text  # + the deletes and the summary


def test_keys_that_cannot_be_decoded_are_dropped_and_the_log_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key that is not UTF-8 cannot be named in any frame, not even a delete: its
    record is dropped, and the log keeps only the changes after it, so that clients
    resuming from before it sync again instead of missing it."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "v1.db"
    h = V1Database()
    h.commit(("orders", "O-1", b'{"qty":1}'))  # 1
    h.commit(("orders", b"\xffblob", b"1"), ("orders", "O-2", b"2"))  # 2-3: BLOB key
    # 4-6: a TEXT key that is not UTF-8, in the middle of a commit
    h.commit(
        ("orders", "O-3", b"3"),
        ("orders", AsText(b"\xc0\x80text"), b"4"),
        ("orders", "O-4", b"[ 5 ]"),
    )
    h.commit(("orders", "O-1", b'{"qty":2}'))  # 7
    h.write(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        types = conn.execute("SELECT typeof(key) FROM records ORDER BY seq").fetchall()
    assert [t for (t,) in types] == ["blob", "text", "text", "text", "text", "text"]
    with serving(path) as srv, RawClient(srv.port) as c:
        assert srv.seq == 7  # nothing can be appended for them
        assert c.sync()[1] == {
            ("orders", "O-1"): {"qty": 2},
            ("orders", "O-2"): 2,
            ("orders", "O-3"): 3,
            ("orders", "O-4"): [5],
        }
        for after in (0, 4):
            err = c.request({"op": "subscribe", "from": after, "epoch": EPOCH})
            assert err["type"] == "error"
            assert err["code"] == "resync_required"
        # The rest of the commit that held the bad key is still there, repaired.
        tail = c.changes_from(5, 7)
        assert [(f["seq"], f["key"], f["value"]) for f in tail] == [
            (6, "O-4", [5]),
            (7, "O-1", {"qty": 2}),
        ]
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert (
        "dropped record orders/b'\\xffblob' (seq 2): its collection or key is not stored as text"
    ) in text
    assert (
        "dropped record orders/b'\\xc0\\x80text' (seq 5): its collection or key is not valid UTF-8"
    ) in text
    assert "dropped the logged changes up to seq 5" in text
    assert "change 2: its collection or key is not valid UTF-8 text" in text
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT first_seq, last_seq FROM changes").fetchall() == [
            (6, 6),
            (7, 7),
        ]
        assert conn.execute("SELECT count(*) FROM records").fetchone() == (4,)


def test_a_clean_database_is_left_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "v1.db"
    h = V1Database()
    for i in range(200):
        h.commit(
            ("orders", f"O-{i % 50}", b'{"qty":%d,"px":2.50,"note":"a b\\n\\"c\\""}' % i),
            ("people", f"p-{i % 7} é", '{"name":"Zoë","tags":[["x"]]}'.encode()),
            ("orders", f"O-{(i + 25) % 50}", None),
        )
    h.write(path)
    records, changes, meta = dump(path)
    with serving(path) as srv:
        assert srv.seq == 600
    assert dump(path) == (
        records,
        changes,
        {**meta, "schema_version": "4", "folded_seq": "600"},
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("nothing to repair" in r.getMessage() for r in caplog.records)


def test_thousands_of_bad_rows_log_the_first_hundred_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = tmp_path / "v1.db"
    h = V1Database()
    for i in range(0, 1000, 100):
        h.commit(*[("c", f"k{j}", b'{ "i": %d }' % j) for j in range(i, i + 100)])
    h.write(path)
    with serving(path) as srv, RawClient(srv.port) as c:
        _, data = c.sync()
        assert data == {("c", f"k{j}"): {"i": j} for j in range(1000)}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 101, messages[-3:]
    assert "1000 records repaired" in messages[-1]
    assert "1000 logged changes repaired" in messages[-1]
    assert "1900 more warnings not shown" in messages[-1]


def test_the_v1_fixture_writes_what_statecast_writes(tmp_path: Path) -> None:
    """The hand-made log rows are byte for byte what the store encodes."""
    items = [("c", "k", False, b"line"), ("c", "é" * 40, True, b"x" * 300)]
    assert msgpack_segment(items) == msgspec.msgpack.encode(items)


def test_a_failed_migration_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import statecast.stores.sqlite as sqlite_store  # noqa: PLC0415

    path = tmp_path / "v1.db"
    bad_history().write(path)
    before = dump(path)

    def fail(self: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_store._CanonicalValues, "_append_deletes", fail)
    with pytest.raises(StoreError, match=r"cannot open .*: disk I/O error"), serving(path):
        pass
    assert dump(path) == before
    monkeypatch.undo()
    with serving(path) as srv:  # and the next start migrates it
        assert srv.seq == 21
