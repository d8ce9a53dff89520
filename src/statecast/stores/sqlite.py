"""The SQLite store: the state survives restarts and crashes (docs/durability.md).

One writer thread owns the database connection. Batches submitted on the loop
thread queue up for it; it takes everything queued, gives the batches their seqs,
writes them in **one transaction** (group commit) and only then hands the records
back to the loop thread, which installs them in the in-memory state and acks. So an
``ack`` always means "on disk", and nobody ever sees a change that a crash could
take back. Reads never touch the database: the state and the change log are kept in
memory, loaded once at start.

**Log first.** The acknowledged commit writes only the change log: one ``changes``
row holding the whole group, and the new ``seq``. The ``records`` table (the state
on disk) is brought up to date later, by the *fold*: the same writer thread, between
commits and when it does not compete with publishers (_FOLD_EAGER), applies the
committed changes after ``folded_seq`` to ``records`` in transactions of its own,
each moving ``folded_seq`` with the rows it writes (so the two always agree, whenever
the process dies). The fold's commits
skip their own fsync: the next acknowledged commit's fsync covers them, and one lost
to a power cut is only done again. Trimming never deletes a log row that is not
folded yet, and a start loads ``records`` (the state at ``folded_seq``) and replays
the log rows after it, which are then folded in the background.

Schema (version 4; see MIGRATIONS for what versions 1 to 3 lacked)::

    statecast_meta(key PRIMARY KEY, value)   format, schema_version, epoch, seq,
                                             folded_seq, source_position (a JSON
                                             object: source name -> position), ...
    records(collection, key, seq, line)      the state at folded_seq: one row per live record
    changes(first_seq PRIMARY KEY, last_seq, body)   the log, one row per commit: every
                                             change after folded_seq, and the retained ones
    idempotency_keys(seq PRIMARY KEY, key UNIQUE, at)  §3.3: the key of a batch, written by
                                             the commit that writes the batch (its last
                                             seq, when), kept for the dedupe window

``line`` is the encoded frame (§4.1 ``record`` for upserts, §4.2 ``change`` for
deletes), so loading needs no JSON work at all. A ``changes`` row holds every change
of one group commit: their lines, in seq order, one after the other (one row written
per commit instead of one per change, and nothing to encode but a join). Reading it
back decodes only the head of each line (type, seq, collection, key). Versions 1 and
2 wrote a msgpack array of ``[collection, key, deleted, line]`` instead; such rows
are read as they are (:func:`_lines_of`) until they are trimmed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import msgspec
from msgspec import UNSET

from statecast._version import __version__
from statecast.core.changelog import ChangeLog
from statecast.core.dedupe import DEFAULT_KEEP, DEFAULT_WINDOW, KeyRecord
from statecast.core.frames import DELETE_LINE, RECORD_LINE
from statecast.core.protocol import COLLECTION_RE, Conditions, PreparedChange
from statecast.core.state import Record, State, encode_batch
from statecast.core.store import Committed, Install, KeyStamp, Position, ToLoop, new_epoch
from statecast.core.values import MAX_DEPTH, InvalidValue, canonical_value
from statecast.errors import InternalError, StoreError, Unavailable

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

log = logging.getLogger("statecast.stores.sqlite")

SCHEMA_VERSION: Final = 4
FORMAT: Final = "statecast"

_SCHEMA: Final = """
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
CREATE TABLE idempotency_keys (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    at REAL NOT NULL
);
"""
_KEYS_TABLE: Final = _SCHEMA[_SCHEMA.index("CREATE TABLE idempotency_keys") :].rstrip(";\n ")
_KEY: Final = "INSERT OR REPLACE INTO idempotency_keys (key, seq, at) VALUES (?, ?, ?)"

_UPSERT: Final = (
    "INSERT INTO records (collection, key, seq, line) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (collection, key) DO UPDATE SET seq=excluded.seq, line=excluded.line"
)
_DELETE: Final = "DELETE FROM records WHERE collection=? AND key=?"
_LOG: Final = "INSERT INTO changes (first_seq, last_seq, body) VALUES (?, ?, ?)"
# Log rows of versions 1 and 2 (and of the migration to version 2).
_encode_segment = msgspec.msgpack.Encoder().encode
_decode_segment = msgspec.msgpack.Decoder(list[tuple[str, str, bool, bytes]]).decode


class _Head(msgspec.Struct):
    """The head of a logged frame line (the decoder skips the value unread)."""

    type: str
    seq: int
    collection: str
    key: str


_decode_head = msgspec.json.Decoder(_Head).decode

# How many changes one group commit takes at most, and how many commit segments one
# trim transaction deletes at most (so that trimming never holds up commits for long).
_MAX_GROUP = 50_000
_TRIM_STEP = 200
# Checkpoints (copying the WAL into the database file) wait while publishers keep the
# writer busy (a commit in the last _BUSY seconds): they would compete with the
# commits for the disk and the CPU. A burst is checkpointed after it, unless the WAL
# grows past _WAL_DEFER bytes first. The writer checkpoints in its own commits only
# past _WAL_BACKSTOP pages (4 KiB), if the checkpoint thread falls that far behind.
_BUSY = 0.1
_WAL_DEFER = 512 << 20
_WAL_BACKSTOP = (1 << 30) // 4096
# The fold: changes folded into the records table per transaction (a batch that
# arrives meanwhile waits for at most one of them, a few milliseconds), and how far
# the fold may fall behind the log before commits wait for it: past this, the writer
# folds as much as it commits (publishers then go at the fold's pace), which bounds
# the log rows kept for it on disk and the replay at start.
_FOLD_CHUNK = 1000
_MAX_UNFOLDED = 1_000_000
_FOLD_SYNCHRONOUS: Final = "NORMAL"  # see _fold
# When the fold runs, between commits. A fold transaction costs the writer a few
# milliseconds, and the process CPU time, so it runs when it does not compete with
# publishers: at once whenever no batch is queued while it is less than _FOLD_EAGER
# changes behind (a light load keeps the records table current); further behind (a
# burst), once no batch has come for _FOLD_IDLE seconds, and then until one comes; and
# while batches keep coming without a pause, one chunk every _FOLD_EVERY seconds (so
# that such a load is folded too, 5,000 changes a second at least).
_FOLD_EAGER = 10_000
_FOLD_IDLE = 0.005
_FOLD_EVERY = 0.2
_FOLD_RETRY = 0.5  # seconds before a fold that failed (locked, disk full) is tried again
# Seconds between two trims of the idempotency keys (a walk of the newest
# ``dedupe_keep`` rows of the seq index, then a range delete).
_KEYS_TRIM_EVERY = 10.0
# For tests only: seconds each fold transaction waits before its commit, so that a
# fold can be seen running and killed in the middle (tests/stores/test_sqlite_fold.py).
_FOLD_DELAY_ENV: Final = "STATECAST_TEST_FOLD_DELAY"


# -- migrations -------------------------------------------------------------------------
# Version 2: every stored value is canonical (docs/protocol.md §9). Statecast 0.1 stored
# values as they were sent, so its databases may hold values with whitespace and raw
# newlines (pretty-printed JSON), invalid UTF-8, lone surrogate escapes, or more than
# MAX_DEPTH levels of nesting, in the records and in the change log.
_RECORD_HEAD, _RECORD_TAIL = RECORD_LINE.rsplit(b"%s", 1)  # ..."value":  and  }\n
# Printable ASCII that needs no further look (as in values.py): no whitespace, control
# or non-ASCII bytes, no backslash (escapes), and the opening brackets are counted.
_PLAIN: Final = bytes(b for b in range(0x21, 0x80) if b not in b"[{\\")
_MAX_WARNINGS: Final = 100  # then only a count, in the summary
_encode_json = msgspec.json.encode
_decode_raw_segment = msgspec.msgpack.Decoder(
    list[tuple[msgspec.Raw, msgspec.Raw, bool, bytes]]
).decode
_decode_msgpack_str = msgspec.msgpack.Decoder(str).decode
_SELECT_RECORDS: Final = (
    "SELECT typeof(collection) = 'text' AND typeof(key) = 'text', CAST(collection AS BLOB), "
    "CAST(key AS BLOB), seq, CAST(line AS BLOB) FROM records"
)


def _names_of(texts: object, c_b: bytes, k_b: bytes) -> tuple[str, str]:
    """A record's collection and key as text, or :class:`InvalidValue` saying why not."""
    if not texts:
        raise InvalidValue("its collection or key is not stored as text")
    try:
        c, k = c_b.decode(), k_b.decode()
    except UnicodeDecodeError:
        raise InvalidValue("its collection or key is not valid UTF-8") from None
    _check_names(c, k)
    return c, k


def _check_names(c: str, k: str) -> None:
    if not COLLECTION_RE.fullmatch(c):
        raise InvalidValue("its collection name is not valid")
    if not k:
        raise InvalidValue("its key is empty")


def _plain_line(line: bytes) -> bool:
    """Whether a stored line is canonical at a glance: printable ASCII with no
    whitespace or escapes, with at most MAX_DEPTH + 1 opening brackets (the frame's
    own "{" is one), ending in its newline. The test of canonical_value's fast path,
    on the whole line: the line of almost every clean row passes it."""
    rest = line.translate(None, _PLAIN)
    return len(rest) <= MAX_DEPTH + 2 and rest[-1:] == b"\n" and not rest[:-1].strip(b"[{")


def _upsert_line(seq: int, c: bytes, key_json: bytes, line: bytes) -> bytes:
    """The canonical §4.1 line of a stored upsert line: ``line`` itself when it already
    is. Raises :class:`InvalidValue` when its value cannot be stored (any more)."""
    head = _RECORD_HEAD % (seq, c, key_json)
    if not (line.startswith(head) and line.endswith(_RECORD_TAIL)):
        raise InvalidValue("the stored frame does not match its seq, collection and key")
    value = line[len(head) : -len(_RECORD_TAIL)]
    fixed = canonical_value(value)
    return line if fixed is value else head + fixed + _RECORD_TAIL


_Change = tuple[str, str, bool, bytes]  # collection, key, deleted, line: one logged change


def _lines_of(first: int, last: int, body: bytes) -> list[bytes]:
    """The frame lines of one ``changes`` row (seqs ``first``-``last``), in seq order.
    Raises ValueError when the row cannot be read."""
    if body[:1] != b"{":  # a msgpack array: written by version 1 or 2
        try:
            lines = [item[3] for item in _decode_segment(body)]
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"the log row of seqs {first}-{last} cannot be read: {exc}") from None
    else:
        # Canonical JSON holds no raw CR or LF: each line ends at its LF.
        if body[-1:] != b"\n" or b"\r" in body:
            raise ValueError(f"the log row of seqs {first}-{last} is not frame lines")
        lines = body.splitlines(keepends=True)
    if len(lines) != last - first + 1:
        raise ValueError(f"the log row of seqs {first}-{last} holds {len(lines)} changes")
    return lines


def _head(seq: int, line: bytes) -> _Head:
    """The head of the frame line of change ``seq``; ValueError if it is not that."""
    try:
        head = _decode_head(line)
    except msgspec.DecodeError as exc:
        raise ValueError(f"change {seq} of the log cannot be read: {exc}") from None
    if head.seq != seq:
        raise ValueError(f"the log holds change {head.seq} in the place of change {seq}")
    return head


def _changes_of(first: int, last: int, body: bytes) -> list[_Change]:
    """The changes of one ``changes`` row, in seq order; ValueError if it cannot be read."""
    out: list[_Change] = []
    for seq, line in enumerate(_lines_of(first, last, body), first):
        head = _head(seq, line)
        out.append((head.collection, head.key, head.type == "change", line))
    return out


class _LogLoad:
    """The log rows read at start (SQLiteStore._load): from seq ``read_from`` on, the
    changes the log keeps (seq ``start`` or later) and those to replay (after
    ``folded``)."""

    def __init__(self, by_seq: dict[int, Record], read_from: int, start: int, folded: int) -> None:
        self.by_seq = by_seq  # the records of the records table retained in the log
        self.read_from = read_from
        self.start = start
        self.folded = folded
        self.latest: dict[tuple[str, str], Record] = {}  # the last retained change of a key
        self.names: dict[str, str] = {}  # one str per collection name

    def row(self, first: int, last: int, body: bytes) -> tuple[list[Record], list[Record]]:
        """The changes of one log row: (for the log, to replay).

        A change that the records table holds shares its object (found by its seq,
        nothing to decode). A folded change knows the version it replaced when that
        version is retained too (else UNSET, Record.before); a replayed one learns it
        when it is installed."""
        by_seq, latest, names = self.by_seq, self.latest, self.names
        start, folded = self.start, self.folded
        logged: list[Record] = []
        tail: list[Record] = []
        s = max(first, self.read_from)
        for line in _lines_of(first, last, body)[s - first :]:
            rec = by_seq.get(s) if s <= folded else None
            if rec is None:
                head = _head(s, line)
                name = names.setdefault(head.collection, head.collection)
                rec = Record(s, name, head.key, line, head.type == "change")
            if s > folded:  # not in the records table yet: replayed
                tail.append(rec)
                if s >= start:
                    logged.append(rec)
            else:
                key = (rec.collection, rec.key)
                rec.before = latest.get(key, UNSET)
                latest[key] = rec
                logged.append(rec)
            s += 1
        return logged, tail


def _segment(first: int, last: int, body: bytes) -> tuple[list[_Change], dict[int, str]]:
    """The changes of one ``changes`` row, and for those whose collection or key cannot
    be decoded (given as ``""``), why. :class:`InvalidValue` if the row cannot be read."""
    items: list[_Change]
    unnamed: dict[int, str] = {}
    try:
        items = _decode_segment(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        try:
            raw = _decode_raw_segment(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidValue(
                f"the log row of seqs {first}-{last} cannot be read ({exc})"
            ) from None
        items = []
        for i, (c_raw, k_raw, deleted, line) in enumerate(raw):
            try:
                c, k = _decode_msgpack_str(c_raw), _decode_msgpack_str(k_raw)
            except (msgspec.DecodeError, UnicodeDecodeError):
                c = k = ""
                unnamed[i] = "its collection or key is not valid UTF-8 text"
            items.append((c, k, deleted, line))
    if len(items) != last - first + 1:
        raise InvalidValue(f"the log row of seqs {first}-{last} holds {len(items)} changes")
    return items, unnamed


class _CanonicalValues:
    """Migration 1 -> 2: bring every stored value to its canonical form.

    A value that is only not compact (whitespace, raw newlines) is re-encoded: same
    JSON value, canonical text. One that cannot be stored at all (invalid UTF-8, a lone
    surrogate, too deep) is dropped, and resume stays exact:

    * in the change log, such an upsert becomes a delete of its key at the same seq,
      so the log stays consecutive and a client replaying it never gets the value;
    * a current record holding one is deleted, and the deletion is appended to the
      log as new changes (new seqs), so that a client that already got the value
      (in a snapshot or a change past its seq) drops it too when it resumes;
    * a row whose collection or key cannot be named (not valid UTF-8, stored as a blob)
      cannot be written as a valid frame, not even as a delete: a record is dropped; in
      the log, every change up to it is dropped, so clients resuming from before it
      resync instead.

    Clean rows, the common case, cost a look at their bytes: values that are already
    canonical come back from :func:`canonical_value` as the same object.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.warnings = 0
        self.repaired_records = 0
        self.repaired_changes = 0
        self.converted = 0
        self.line_updates: list[tuple[bytes, str, str]] = []
        self.dropped: list[tuple[str, str]] = []  # current records that can be named
        self.unnamed: list[tuple[bytes, bytes]] = []  # current records that cannot
        self.log_cut = 0  # the log keeps only the changes after this seq

    def __call__(self) -> None:
        t0 = time.monotonic()
        self._records()
        self._changes()
        self._append_deletes()
        if self.warnings:
            log.warning(
                "%s, canonical values (format version 2): %d records repaired, %d dropped "
                "(%d deletes appended to the log), %d logged changes repaired, %d turned "
                "into deletes%s%s, in %.2fs",
                self.conn.execute("PRAGMA database_list").fetchone()[2],
                self.repaired_records,
                len(self.dropped) + len(self.unnamed),
                len(self.dropped),
                self.repaired_changes,
                self.converted,
                f", the log cut after seq {self.log_cut}" if self.log_cut else "",
                f"; {self.warnings - _MAX_WARNINGS} more warnings not shown"
                if self.warnings > _MAX_WARNINGS
                else "",
                time.monotonic() - t0,
            )
        else:
            log.info("canonical values: nothing to repair, in %.2fs", time.monotonic() - t0)

    def _warn(self, msg: str, *args: object) -> None:
        self.warnings += 1
        if self.warnings <= _MAX_WARNINGS:
            log.warning(msg, *args)

    # -- records ---------------------------------------------------------------------
    def _records(self) -> None:
        collections: dict[bytes, bool] = {}  # collection names seen, and whether valid
        for texts, c_b, k_b, seq, line in self.conn.execute(_SELECT_RECORDS):
            if texts and k_b and k_b.isascii() and _plain_line(line):
                valid = collections.get(c_b)
                if valid is None:
                    # (latin-1 maps each byte to one character; a valid name is ASCII)
                    match = COLLECTION_RE.fullmatch(c_b.decode("latin-1"))
                    valid = collections[c_b] = match is not None
                if valid:
                    continue  # the fast path: nothing to do
            self._record(texts, c_b, k_b, seq, line)
        conn = self.conn
        conn.executemany(
            "UPDATE records SET line=? WHERE collection=? AND key=?", self.line_updates
        )
        conn.executemany(_DELETE, self.dropped)
        if self.unnamed:
            # No parameter can name them (a str cannot hold invalid UTF-8, and a bytes
            # parameter only matches a blob): one scan, with the same test.
            bad = set(self.unnamed)

            def is_unnamed(texts: object, c_b: bytes, k_b: bytes) -> bool:
                try:
                    _names_of(texts, c_b, k_b)
                except InvalidValue:
                    return (c_b, k_b) in bad
                return False

            conn.create_function("statecast_unnamed", 3, is_unnamed, deterministic=True)
            try:
                conn.execute(
                    "DELETE FROM records WHERE statecast_unnamed(typeof(collection) = 'text' "
                    "AND typeof(key) = 'text', CAST(collection AS BLOB), CAST(key AS BLOB))"
                )
            finally:
                conn.create_function("statecast_unnamed", 3, None)

    def _record(self, texts: object, c_b: bytes, k_b: bytes, seq: int, line: bytes) -> None:
        try:
            c, k = _names_of(texts, c_b, k_b)
        except InvalidValue as exc:
            self.unnamed.append((c_b, k_b))
            shown = c_b.decode("utf-8", "backslashreplace")
            self._warn("dropped record %s/%r (seq %d): %s", shown, k_b, seq, exc)
            return
        try:
            fixed = _upsert_line(seq, c_b, _encode_json(k), line)
        except InvalidValue as exc:
            self.dropped.append((c, k))
            self._warn("dropped record %s/%r (seq %d): %s", c, k, seq, exc)
            return
        if fixed is not line:
            self.line_updates.append((fixed, c, k))
            self.repaired_records += 1
            self._warn("repaired record %s/%r (seq %d): whitespace removed", c, k, seq)

    # -- the change log -------------------------------------------------------------------
    def _changes(self) -> None:
        conn = self.conn
        names: dict[str, bytes | None] = {}  # collection -> its bytes, None if not valid
        updates: list[tuple[bytes, int]] = []
        split: tuple[int, list[_Change]] | None = None  # the row the cut goes through
        for first, last, body in conn.execute(
            "SELECT first_seq, last_seq, CAST(body AS BLOB) FROM changes ORDER BY first_seq"
        ):
            try:
                items, unnamed = _segment(first, last, body)
            except InvalidValue as exc:
                self._cut(last, str(exc))
                split = None
                continue
            changed = False
            for i, item in enumerate(items):
                c, k, _, line = item
                c_b = names.get(c, b"")
                if c_b and k and _plain_line(line) and not unnamed:
                    continue  # the fast path: nothing to do
                if c_b == b"":
                    c_b = names[c] = c.encode() if COLLECTION_RE.fullmatch(c) else None
                s = first + i
                if i in unnamed or c_b is None or not k:
                    why = unnamed.get(i) or f"{c!r}/{k!r} is not a valid collection and key"
                    self._cut(s, why)
                    split = (first, items) if s < last else None
                    continue
                fixed = self._change(s, c_b, item)
                if fixed is not None:
                    items[i] = fixed
                    changed = True
            if changed:
                updates.append((_encode_segment(items), first))
        conn.executemany("UPDATE changes SET body=? WHERE first_seq=?", updates)
        if self.log_cut:
            conn.execute("DELETE FROM changes WHERE last_seq <= ?", (self.log_cut,))
            if split is not None:
                first, items = split
                conn.execute(
                    "UPDATE changes SET first_seq=?, body=? WHERE first_seq=?",
                    (self.log_cut + 1, _encode_segment(items[self.log_cut + 1 - first :]), first),
                )

    def _change(self, s: int, c_b: bytes, item: _Change) -> _Change | None:
        """What replaces one logged change (at seq ``s``, its collection's name as
        ``c_b``), or None when it is canonical already."""
        c, k, deleted, line = item
        key_json = _encode_json(k)
        if deleted:
            fixed = DELETE_LINE % (s, c_b, key_json)
            if fixed == line:
                return None
            self.repaired_changes += 1
            self._warn("repaired logged delete %s/%r (seq %d): frame re-encoded", c, k, s)
            return (c, k, True, fixed)
        try:
            fixed = _upsert_line(s, c_b, key_json, line)
        except InvalidValue as exc:
            self.converted += 1
            self._warn("logged change %s/%r (seq %d) turned into a delete: %s", c, k, s, exc)
            return (c, k, True, DELETE_LINE % (s, c_b, key_json))
        if fixed is line:
            return None
        self.repaired_changes += 1
        self._warn("repaired logged change %s/%r (seq %d): whitespace removed", c, k, s)
        return (c, k, False, fixed)

    def _cut(self, seq: int, why: str) -> None:
        """Keep only the changes after ``seq`` in the log."""
        self.log_cut = max(self.log_cut, seq)
        self._warn(
            "dropped the logged changes up to seq %d (clients resuming from before it will "
            "sync again): change %d: %s",
            seq,
            seq,
            why,
        )

    # -- deletes of the dropped records --------------------------------------------------------
    def _append_deletes(self) -> None:
        if not self.dropped:
            return
        conn = self.conn
        seq = int(conn.execute("SELECT value FROM statecast_meta WHERE key='seq'").fetchone()[0])
        first = seq + 1
        segment = []
        for c, k in self.dropped:
            seq += 1
            segment.append((c, k, True, DELETE_LINE % (seq, c.encode(), _encode_json(k))))
        conn.execute(_LOG, (first, seq, _encode_segment(segment)))
        conn.execute("UPDATE statecast_meta SET value=? WHERE key='seq'", (str(seq),))
        log.warning(
            "the %d dropped records are deleted by new changes, seqs %d-%d: clients that "
            "hold them delete them when they resume",
            len(self.dropped),
            first,
            seq,
        )


def _folded_seq(conn: sqlite3.Connection) -> None:
    """Migration 2 -> 3: log first. Version 2 updated the records table in the commit
    of every batch, so its records hold every change: ``folded_seq`` is ``seq``."""
    conn.execute(
        "INSERT INTO statecast_meta (key, value) "
        "SELECT 'folded_seq', value FROM statecast_meta WHERE key='seq'"
    )


def _idempotency_keys(conn: sqlite3.Connection) -> None:
    """Migration 3 -> 4: the table of idempotency keys (§3.3), empty."""
    conn.execute(_KEYS_TABLE)


# Migrations from version N to N + 1, run in order inside one transaction when an
# older database is opened.
MIGRATIONS: Final[dict[int, Callable[[sqlite3.Connection], None]]] = {
    1: lambda conn: _CanonicalValues(conn)(),
    2: _folded_seq,
    3: _idempotency_keys,
}


class _Batch:
    __slots__ = ("batch", "done", "key", "position", "records")

    def __init__(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        position: Position | None = None,
        key: KeyStamp | None = None,
    ) -> None:
        self.batch = batch
        self.done = done
        self.position = position  # committed with the batch (submit_source)
        self.key = key  # §3.3, committed with the batch
        self.records: list[Record] | None = None


class _Call:
    """Work for the writer thread itself (reset), between commits and folds; the
    caller waits for it."""

    __slots__ = ("done", "error", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


# A batch, a flush marker (posted to the loop once everything before it is done), work
# for the writer thread, or stop.
_Job = _Batch | _Call | Callable[[], None] | None
_POSITION_KEY: Final = "source_position"


class _Damaged(Exception):
    """The database does not hold what it should (the fold cannot go on)."""


def _meta_int(path: Path, meta: dict[str, object], key: str) -> int:
    """An integer of ``statecast_meta``; :class:`StoreError` saying the file is damaged
    when it is missing or not a plain decimal integer."""
    value = meta.get(key)
    if not isinstance(value, str | int) or not re.fullmatch(r"-?[0-9]{1,18}", str(value)):
        shown = repr(value)[:40]
        raise StoreError(f"{path} is damaged: statecast_meta {key} is {shown}, not a number")
    return int(value)


class SQLiteStore:
    def __init__(
        self,
        path: Path,
        *,
        retain: int,
        synchronous: str = "full",
        busy_timeout: float = 2.0,
        dedupe_window: float = DEFAULT_WINDOW,
        dedupe_keep: int = DEFAULT_KEEP,
    ) -> None:
        self.path = Path(path)
        # §3.3: idempotency keys are kept on disk as long as the engine remembers them
        # (core/dedupe.py), and trimmed with the log.
        self.dedupe_window = dedupe_window
        self.dedupe_keep = dedupe_keep
        self._keys: list[KeyRecord] = []  # loaded by open(), for the engine
        self._keys_at = 0.0  # when the writer last trimmed the keys
        self.description = f"sqlite:{self.path}"
        self.retain = retain
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self.state = State()
        self.log = ChangeLog(retain)
        self.epoch = ""
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._to_loop: ToLoop | None = None
        # SourceStore (docs/postgres.md): source name -> the position committed with
        # the last batch taken from it; this copy is the loop thread's, kept current as
        # commits are delivered, and the writer keeps its own (_disk_positions).
        self.positions: dict[str, str] = {}
        self._disk_positions: dict[str, str] = {}
        self._committed = 0  # the seq of the last committed change
        self._folded = 0  # the seq of the last change folded into the records table
        self._oldest_change = 1  # the oldest seq still in the changes table
        self._healthy = True
        self.commits = 0  # transactions committed (group commits)
        self.folds = 0  # fold transactions committed
        self.replayed = 0  # changes replayed from the log at start (not folded then)
        # The fold: the last log row it decoded (first seq, changes), when it stopped
        # in the middle of it; when it may try again after a failure.
        self._fold_row: tuple[int, list[_Change]] | None = None
        self._fold_retry_at = 0.0
        self._fold_at = 0.0  # when the last fold transaction ended
        self._commit_at = 0.0  # when the last acknowledged commit ended
        self._fold_delay = float(os.environ.get(_FOLD_DELAY_ENV) or 0)
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()

    # -- opening ---------------------------------------------------------------
    ready = True  # everything it holds is loaded by open()
    commits_at_once = False  # a batch waits for the writer thread's commit
    decides_at_commit = False

    def idempotency_keys(self) -> list[KeyRecord]:
        keys, self._keys = self._keys, []  # handed over once: the engine keeps them
        return keys

    def start(self, install: Install) -> None:
        pass  # every batch is committed through submit()

    def open(self, to_loop: ToLoop) -> None:
        self._to_loop = to_loop
        t0 = time.monotonic()
        self._take_lock()
        try:
            self._inspect()
            conn = self._connect()
            self._load(conn)
        except BaseException:
            self._release_lock()
            raise
        self._conn = conn
        log.info(
            "loaded %s: %d records, seq %d, %d changes retained, %d replayed from the log "
            "(folded up to seq %d), in %.2fs",
            self.path,
            len(self.state),
            self.state.seq,
            len(self.log),
            self.replayed,
            self._folded,
            time.monotonic() - t0,
        )
        self._thread = threading.Thread(target=self._run, name="statecast-sqlite", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name="statecast-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _take_lock(self) -> None:
        """One server per database: an exclusive flock on the file, for our lifetime.

        (flock, not fcntl: SQLite's own POSIX locks are not disturbed by it.)
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise StoreError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{self.path} is in use by another statecast server; "
                "give each server its own database"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _inspect(self) -> None:
        """Refuse, without writing a byte, a file that is not a statecast database of
        a version we understand."""
        if self.path.stat().st_size == 0:
            return  # new (or empty) file: ours to create
        try:
            ro = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        try:
            try:
                tables = {
                    row[0]
                    for row in ro.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path} is not a statecast database ({exc})") from None
            if not tables:
                return
            if "statecast_meta" not in tables:
                shown = ", ".join(sorted(tables)[:5])
                raise StoreError(
                    f"{self.path} is not a statecast database (it holds other tables: {shown}); "
                    "it was left untouched"
                )
            meta = dict(ro.execute("SELECT key, value FROM statecast_meta").fetchall())
        finally:
            ro.close()
        if meta.get("format") != FORMAT:
            raise StoreError(
                f"{self.path} is not a statecast database (format {meta.get('format')!r})"
            )
        version = _meta_int(self.path, meta, "schema_version")
        if version < 1:
            raise StoreError(f"{self.path} is damaged: its schema_version is {version}")
        _meta_int(self.path, meta, "seq")
        if "folded_seq" in meta:  # (added by a migration when missing)
            _meta_int(self.path, meta, "folded_seq")
        if not isinstance(meta.get("epoch"), str) or not meta["epoch"]:
            raise StoreError(f"{self.path} is damaged: it has no epoch in statecast_meta")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has format version {version}, newer than this statecast understands "
                f"({SCHEMA_VERSION}): upgrade statecast; the file was left untouched"
            )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # explicit BEGIN/COMMIT
            check_same_thread=False,  # opened here, then used by the writer thread only
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            self._pragmas(conn)
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not tables:
                self._create(conn)
            else:
                self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _pragmas(self, conn: sqlite3.Connection) -> None:
        """The per-connection settings, for the first connection and every reconnect."""
        self._commit_mode(conn)
        conn.execute("PRAGMA journal_size_limit=67108864")
        # Checkpoints run in a thread of their own (_checkpoints), not in commits;
        # the writer checkpoints only if that thread falls far behind (1 GiB).
        conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_BACKSTOP}")

    def _commit_mode(self, conn: sqlite3.Connection) -> None:
        """The settings of acknowledged commits (the fold changes them for its own)."""
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")

    def _create(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany(
            "INSERT INTO statecast_meta (key, value) VALUES (?, ?)",
            [
                ("format", FORMAT),
                ("schema_version", str(SCHEMA_VERSION)),
                ("epoch", new_epoch()),
                ("seq", "0"),
                ("folded_seq", "0"),
                ("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                ("created_by", f"statecast {__version__}"),
            ],
        )
        conn.execute("COMMIT")
        log.info("created %s (format version %d)", self.path, SCHEMA_VERSION)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(
            conn.execute("SELECT value FROM statecast_meta WHERE key='schema_version'").fetchone()[
                0
            ]
        )
        if version == SCHEMA_VERSION:
            return
        start = version
        conn.execute("BEGIN IMMEDIATE")
        try:
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
            conn.execute(
                "UPDATE statecast_meta SET value=? WHERE key='schema_version'", (str(version),)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for step in range(start + 1, version + 1):  # (all in the one transaction)
            log.info("migrated %s to format version %d", self.path, step)

    def _load(self, conn: sqlite3.Connection) -> None:
        """The state as of ``folded_seq`` from the records table, then the log rows
        after it replayed on top of it; the retained log from the log rows."""
        meta = dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())
        self.epoch = meta["epoch"]
        self.positions = self._positions_of(meta.get(_POSITION_KEY))
        self._disk_positions = dict(self.positions)
        seq = int(meta["seq"])
        folded = int(meta["folded_seq"])
        row = conn.execute("SELECT min(first_seq) FROM changes").fetchone()
        self._oldest_change = row[0] if row[0] is not None else seq + 1
        if not 0 <= folded <= seq or self._oldest_change > folded + 1:
            raise StoreError(
                f"{self.path} is damaged: its records are folded up to seq {folded}, its "
                f"log starts at seq {self._oldest_change}, its state is at seq {seq}"
            )
        # The in-memory log holds the changes from `start` on.
        start = max(seq - self.retain + 1, self._oldest_change, 1)
        by_seq = self._load_records(conn, start, folded)
        state = self.state
        changelog = ChangeLog(self.retain, last_seq=start - 1)
        # Each retained change learns the version it replaced when that version is
        # retained too; the first change of a key in the log cannot (Record.before).
        # The changes after `folded` are installed in the state as a publish installs
        # them, which tells each the version it replaced, whether retained or not.
        read_from = min(start, folded + 1)
        rows = _LogLoad(by_seq, read_from, start, folded)
        replayed = 0
        for first_seq, last_seq, body in conn.execute(
            "SELECT first_seq, last_seq, body FROM changes WHERE last_seq >= ? ORDER BY first_seq",
            (read_from,),
        ):
            try:
                logged, tail = rows.row(first_seq, last_seq, body)
            except ValueError as exc:
                raise StoreError(f"{self.path} is damaged: {exc}") from None
            if tail:
                self._replay(tail, start)
                replayed += len(tail)
            self._extend_log(changelog, logged)
        if changelog.last_seq != seq or state.seq != seq:
            raise StoreError(
                f"{self.path} is damaged: its change log ends at seq {changelog.last_seq}, "
                f"its state at seq {seq}"
            )
        changelog.unknown_until = seq
        self.log = changelog
        self._keys = self._load_keys(conn)
        self._committed = seq
        self._folded = folded
        self.replayed = replayed

    def _load_keys(self, conn: sqlite3.Connection) -> list[KeyRecord]:
        """The idempotency keys the engine must remember (core/dedupe.py): those of the
        window, and at least the ``dedupe_keep`` newest; oldest first."""
        horizon = time.time() - self.dedupe_window
        rows = conn.execute(
            "SELECT key, seq, at FROM idempotency_keys WHERE at >= ? OR seq >= coalesce(("
            "SELECT seq FROM idempotency_keys ORDER BY seq DESC LIMIT 1 OFFSET ?), 0) "
            "ORDER BY seq",
            (horizon, self.dedupe_keep - 1),
        ).fetchall()
        return [(str(k), int(s), float(a)) for k, s, a in rows]

    def _positions_of(self, text: str | None) -> dict[str, str]:
        if text is None:
            return {}
        try:
            positions = msgspec.json.decode(text, type=dict[str, str])
        except msgspec.DecodeError as exc:
            raise StoreError(
                f"{self.path} is damaged: its source position cannot be read ({exc})"
            ) from None
        return positions

    def _load_records(self, conn: sqlite3.Connection, start: int, folded: int) -> dict[int, Record]:
        """Load the records table into the state (at seq ``folded``); the records of
        seq ``start`` or later, by seq, so that the log can share their objects.

        One collection at a time, in key order (State.load): the records of a
        collection share one ``str`` for its name, and the rows are read without it."""
        records: list[Record] = []
        name = conn.execute("SELECT min(collection) FROM records").fetchone()[0]
        while name is not None:
            rows = conn.execute(
                "SELECT key, seq, line FROM records WHERE collection = ? ORDER BY key", (name,)
            )
            records += [Record(s, name, k, line, False) for k, s, line in rows]
            name = conn.execute(
                "SELECT min(collection) FROM records WHERE collection > ?", (name,)
            ).fetchone()[0]
        by_seq = {rec.seq: rec for rec in records if rec.seq >= start}
        self.state.load(records, folded)
        return by_seq

    def _replay(self, tail: list[Record], start: int) -> None:
        """Install changes of the log that the records table does not hold yet."""
        try:
            self.state.install(tail)
        except ValueError as exc:
            raise StoreError(f"{self.path} is damaged: {exc}") from None
        for rec in tail:
            if rec.seq >= start:
                break
            rec.before = UNSET  # not retained: keeps no older version alive

    def _extend_log(self, changelog: ChangeLog, recs: list[Record]) -> None:
        try:
            changelog.extend(recs)
        except ValueError as exc:
            raise StoreError(f"{self.path} is damaged: {exc}") from None

    # -- loop thread interface -----------------------------------------------------
    def submit(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        key: KeyStamp | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self._queue.put(_Batch(batch, done, None, key))

    def submit_source(
        self, batch: Sequence[PreparedChange], done: Committed, position: Position
    ) -> None:
        """SourceStore: as :meth:`submit`, and the position is written by the same
        commit, in the ``source_position`` row of statecast_meta (an empty batch
        commits only the position)."""
        self._queue.put(_Batch(batch, done, position))

    def reset(self) -> None:
        """SourceStore: start over (no records, an empty log, seq 0, a new epoch, no
        positions), in one transaction of the writer thread. Before serving only."""
        call = _Call(self._reset)
        self._queue.put(call)
        call.done.wait()
        if call.error is not None:
            if isinstance(call.error, sqlite3.Error):
                raise StoreError(f"cannot reset {self.path}: {call.error}") from None
            raise call.error

    def _reset(self) -> None:
        conn = self._connection()
        epoch = new_epoch()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM records")
            conn.execute("DELETE FROM changes")
            conn.execute("DELETE FROM idempotency_keys")
            conn.executemany(
                "UPDATE statecast_meta SET value=? WHERE key=?",
                [("0", "seq"), ("0", "folded_seq"), (epoch, "epoch")],
            )
            conn.execute("DELETE FROM statecast_meta WHERE key=?", (_POSITION_KEY,))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        log.warning(
            "%s reset: its %d records and change log are gone; new epoch %s (was %s)",
            self.path,
            len(self.state),
            epoch,
            self.epoch,
        )
        self.state = State()
        self.log = ChangeLog(self.retain)
        self.epoch = epoch
        self.positions = {}
        self._disk_positions = {}
        self._keys = []
        self._committed = self._folded = 0
        self._oldest_change = 1
        self._fold_row = None

    def flush(self, done: Callable[[], None]) -> None:
        self._queue.put(done)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
            self._checkpointer = None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None
        self._release_lock()

    # -- the checkpoint thread -------------------------------------------------------
    def _checkpoints(self) -> None:
        """Copy the WAL into the database now and then, beside the writer.

        A PASSIVE checkpoint never blocks the writer; doing it here instead of inside
        a commit (SQLite's default) keeps its reads, writes and fsync off the path of
        publishes; and it waits for a pause of the commits, up to _WAL_DEFER of WAL.
        Errors are left for the next attempt (and the writer reports a database that
        cannot be written).
        """
        conn: sqlite3.Connection | None = None
        wal = f"{self.path}-wal"
        while not self._stop_checkpoints.wait(0.2):
            try:
                if time.monotonic() - self._commit_at < _BUSY and os.path.getsize(wal) < _WAL_DEFER:
                    continue
            except OSError:
                pass  # no WAL file (yet): nothing to copy, or let SQLite say what is wrong
            try:
                if conn is None:
                    conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.debug("checkpoint of %s failed: %s", self.path, exc)
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()

    # -- the writer thread ---------------------------------------------------------
    def _run(self) -> None:
        q = self._queue
        stop = False
        while not stop:
            jobs: list[_Job] = [self._next_job()]
            changes = 0
            with contextlib.suppress(queue.Empty):
                while changes < _MAX_GROUP:
                    job = q.get_nowait()
                    jobs.append(job)
                    if isinstance(job, _Batch):
                        changes += len(job.batch)
            group: list[_Batch] = []
            for job in jobs:
                if isinstance(job, _Batch):
                    group.append(job)
                    continue
                # A flush marker, a call or stop: everything before it is written first.
                self._commit(group)
                group = []
                if job is None:
                    stop = True
                    break
                if isinstance(job, _Call):
                    job.run()
                else:
                    self._post(job)
            self._commit(group)
            if not stop:
                # Past the bound, the fold keeps pace with the commits.
                while (
                    self._committed - self._folded > _MAX_UNFOLDED
                    and time.monotonic() >= self._fold_retry_at
                    and self._fold()
                ):
                    pass
                self._trim()

    def _next_job(self) -> _Job:
        """The next job. Meanwhile the fold goes on, a chunk at a time (see
        _FOLD_EAGER): while no job is queued, or once none has come for _FOLD_IDLE
        when the fold is far behind; and one chunk first whenever the last is
        _FOLD_EVERY old."""
        q = self._queue
        idle = False
        while self._folded < self._committed:
            now = time.monotonic()
            wait = self._fold_retry_at - now
            if wait > 0:  # the last fold failed: commits only, until it may try again
                if wait == math.inf:
                    break
                try:
                    return q.get(timeout=wait)
                except queue.Empty:
                    continue
            if now - self._fold_at < _FOLD_EVERY:
                try:
                    if idle or self._committed - self._folded < _FOLD_EAGER:
                        return q.get_nowait()
                    return q.get(timeout=_FOLD_IDLE)
                except queue.Empty:
                    idle = True
            if self._fold():
                self._trim()
        return q.get()

    def _post(self, fn: Callable[[], None]) -> None:
        assert self._to_loop is not None
        try:
            self._to_loop(fn)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _commit(self, group: list[_Batch]) -> None:
        if not group:
            return
        seq, lines, keys, positions = self._encode(group)
        try:
            conn = self._connection()
            # The log only: the records table is brought up to date by the fold.
            conn.execute("BEGIN IMMEDIATE")
            try:
                if lines:  # (only a source's batch may be empty: its position alone)
                    conn.execute(_LOG, (self._committed + 1, seq, b"".join(lines)))
                    conn.execute("UPDATE statecast_meta SET value=? WHERE key='seq'", (str(seq),))
                if keys:
                    conn.executemany(_KEY, keys)
                if positions is not None:
                    conn.execute(
                        "INSERT INTO statecast_meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                        (_POSITION_KEY, msgspec.json.encode(positions).decode()),
                    )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._failed(exc, group)
            return
        except Exception:  # a bug: fail these publishes, keep the writer alive
            log.exception("internal error while committing to %s", self.path)
            self._drop_connection()

            def fail_internal() -> None:
                for job in group:
                    job.done(None, InternalError("internal error while committing"))

            self._post(fail_internal)
            return
        self._committed = seq
        if positions is not None:
            self._disk_positions = positions
        self.commits += 1
        self._commit_at = time.monotonic()
        if not self._healthy:
            self._healthy = True
            log.warning("%s can be written again: publishes are accepted", self.path)

        def deliver() -> None:
            for job in group:
                if job.position is not None:
                    self.positions[job.position[0]] = job.position[1]
                job.done(job.records, None)

        self._post(deliver)

    def _encode(
        self, group: list[_Batch]
    ) -> tuple[int, list[bytes], list[tuple[str, int, float]], dict[str, str] | None]:
        """A group's seqs and frame lines (the records go to each job), what it commits
        beside them: idempotency keys (key, the batch's last seq, when) and the source
        positions after it (None: unchanged); and the group's last seq."""
        seq = self._committed
        lines: list[bytes] = []
        positions: dict[str, str] | None = None
        keys: list[tuple[str, int, float]] = []
        for job in group:
            job.records = encode_batch(job.batch, seq + 1)
            seq += len(job.records)
            lines += [r.line for r in job.records]
            if job.key is not None:
                keys.append((job.key[0], seq, job.key[1]))
            if job.position is not None:
                if positions is None:
                    positions = dict(self._disk_positions)
                positions[job.position[0]] = job.position[1]
        return seq, lines, keys, positions

    def _failed(self, exc: sqlite3.Error, group: list[_Batch]) -> None:
        reason = str(exc)
        if self._healthy:
            # Once per outage, not once per publish.
            self._healthy = False
            log.error(
                "cannot write %s: %s; publishes fail with 'unavailable' until it can be "
                "written again (syncs and subscriptions go on)",
                self.path,
                reason,
            )
        # The connection may be unusable after an I/O error: open a new one next time.
        self._drop_connection()
        error = Unavailable(f"the store cannot be written ({reason}); try again later")

        def fail() -> None:
            for job in group:
                job.done(None, Unavailable(error.message))

        self._post(fail)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._pragmas(conn)
            self._conn = conn
        return self._conn

    # -- the fold --------------------------------------------------------------------
    def _fold(self) -> bool:
        """Fold the next committed changes (at most ``_FOLD_CHUNK``) into the records
        table, in a transaction of their own that moves ``folded_seq`` with them.

        Its commit does not wait for an fsync (``synchronous=NORMAL``): the next
        acknowledged commit's fsync covers it, and a fold lost to a power cut is only
        done again, from the log rows it left in place. Nor does it wait for a lock:
        when the database cannot be written, it is tried again later (_FOLD_RETRY), and
        the commits report the fault. False when it failed.
        """
        first = self._folded + 1
        last = min(self._committed, self._folded + _FOLD_CHUNK)
        try:
            return self._fold_changes(first, last)
        finally:
            self._fold_at = time.monotonic()

    def _fold_changes(self, first: int, last: int) -> bool:
        try:
            conn = self._connection()
            latest: dict[tuple[str, str], tuple[int, bool, bytes]] = {}
            for row_first, items in self._log_rows(conn, first, last):
                s = max(first, row_first)
                for c, k, deleted, line in items[s - row_first : last + 1 - row_first]:
                    latest[(c, k)] = (s, deleted, line)
                    s += 1
            upserts = [(c, k, s, line) for (c, k), (s, d, line) in latest.items() if not d]
            deletes = [key for key, (_, d, _) in latest.items() if d]
            log.debug("folding changes %d-%d into the records table", first, last)
            conn.execute(f"PRAGMA synchronous={_FOLD_SYNCHRONOUS}")
            conn.execute("PRAGMA busy_timeout=0")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_UPSERT, upserts)
                    conn.executemany(_DELETE, deletes)
                    conn.execute(
                        "UPDATE statecast_meta SET value=? WHERE key='folded_seq'", (str(last),)
                    )
                    if self._fold_delay:
                        time.sleep(self._fold_delay)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            finally:
                self._commit_mode(conn)
        except sqlite3.Error as exc:
            log.debug("folding changes %d-%d of %s failed: %s", first, last, self.path, exc)
            self._drop_connection()
            self._fold_row = None
            self._fold_retry_at = time.monotonic() + _FOLD_RETRY
            return False
        except Exception as exc:  # a bug, or a damaged log: no more folds in this process
            if not isinstance(exc, _Damaged):
                log.exception("internal error while folding %s", self.path)
                self._drop_connection()
            log.error(
                "cannot fold changes %d-%d of %s into its records table: %s; the log keeps "
                "them (the state served and the next start are not affected)",
                first,
                last,
                self.path,
                exc,
            )
            self._fold_row = None
            self._fold_retry_at = math.inf  # not in this process's life
            return False
        self._folded = last
        self.folds += 1
        return True

    def _log_rows(
        self, conn: sqlite3.Connection, first: int, last: int
    ) -> list[tuple[int, list[_Change]]]:
        """The log rows holding the changes ``first``-``last``, decoded: (first seq,
        changes). The last one is kept for the next call when it goes on past ``last``
        (a group commit may hold up to _MAX_GROUP changes)."""
        rows: list[tuple[int, list[_Change]]] = []
        cached = self._fold_row
        if cached is not None and cached[0] <= first < cached[0] + len(cached[1]):
            rows.append(cached)
            first = cached[0] + len(cached[1])
        if first <= last:
            expect = first
            for row_first, row_last, body in conn.execute(
                "SELECT first_seq, last_seq, body FROM changes WHERE first_seq >= "
                "(SELECT max(first_seq) FROM changes WHERE first_seq <= ?) AND first_seq <= ? "
                "ORDER BY first_seq",
                (first, last),
            ).fetchall():
                if not row_first <= expect <= row_last:
                    break
                try:
                    items = _changes_of(row_first, row_last, body)
                except ValueError as exc:
                    raise _Damaged(str(exc)) from None
                rows.append((row_first, items))
                expect = row_last + 1
            if expect <= last:
                raise _Damaged(f"the log does not hold change {expect}")
        self._fold_row = rows[-1] if rows and rows[-1][0] + len(rows[-1][1]) - 1 > last else None
        return rows

    def _trim_keys(self) -> None:
        """Drop the idempotency keys the engine has forgotten (past the window, beyond
        the ``dedupe_keep`` newest), now and then (_KEYS_TRIM_EVERY), between commits."""
        now = time.time()
        if now - self._keys_at < _KEYS_TRIM_EVERY:
            return
        self._keys_at = now
        try:
            self._connection().execute(
                "DELETE FROM idempotency_keys WHERE at < ? AND seq < coalesce(("
                "SELECT seq FROM idempotency_keys ORDER BY seq DESC LIMIT 1 OFFSET ?), 0)",
                (now - self.dedupe_window, self.dedupe_keep - 1),
            )
        except sqlite3.Error as exc:
            log.debug("trimming the idempotency keys of %s failed: %s", self.path, exc)

    def _trim(self) -> None:
        """Keep about ``retain`` changes on disk: drop whole commit segments that
        hold only older changes, and are folded, a few at a time between commits."""
        self._trim_keys()
        # Only changes that are folded: the others are the records table's to come.
        keep_from = min(self._committed - self.retain + 1, self._folded + 1)
        slack = max(1000, self.retain // 10)
        while keep_from - self._oldest_change > slack:
            try:
                conn = self._connection()
                deleted = conn.execute(
                    "DELETE FROM changes WHERE first_seq IN (SELECT first_seq FROM changes "
                    "WHERE last_seq < ? ORDER BY first_seq LIMIT ?)",
                    (keep_from, _TRIM_STEP),
                ).rowcount
                row = conn.execute("SELECT min(first_seq) FROM changes").fetchone()
            except sqlite3.Error as exc:
                log.debug("trimming the change log of %s failed: %s", self.path, exc)
                return
            self._oldest_change = row[0] if row[0] is not None else self._committed + 1
            if not deleted or not self._queue.empty():
                return  # commits first; the rest next time
