"""The SQLite store: the state survives restarts and crashes (docs/durability.md).

One writer thread owns the database connection. Batches submitted on the loop
thread queue up for it; it takes everything queued, gives the batches their seqs,
writes them in **one transaction** (group commit) and only then hands the records
back to the loop thread, which installs them in the in-memory state and acks. So an
``ack`` always means "on disk", and nobody ever sees a change that a crash could
take back. Reads never touch the database: the state and the change log are kept in
memory, loaded once at start.

Schema (version 2; version 1 had the same tables, but values as sent, see MIGRATIONS)::

    statecast_meta(key PRIMARY KEY, value)   format, schema_version, epoch, seq, ...
    records(collection, key, seq, line)      the state: one row per live record
    changes(first_seq PRIMARY KEY, last_seq, body)   the retained log, one row per commit

``line`` is the encoded frame (§4.1 ``record`` for upserts, §4.2 ``change`` for
deletes), so loading needs no JSON work at all. A ``changes`` row holds every change
of one group commit, as a msgpack array of ``[collection, key, deleted, line]`` in seq
order: one row written per commit instead of one per change.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
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
from statecast.core.frames import DELETE_LINE, RECORD_LINE
from statecast.core.protocol import COLLECTION_RE, PreparedChange
from statecast.core.state import Record, State, encode_batch
from statecast.core.store import Committed, Install, ToLoop, new_epoch
from statecast.core.values import MAX_DEPTH, InvalidValue, canonical_value
from statecast.errors import InternalError, StoreError, Unavailable

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

log = logging.getLogger("statecast.stores.sqlite")

SCHEMA_VERSION: Final = 2
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
"""

_UPSERT: Final = (
    "INSERT INTO records (collection, key, seq, line) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (collection, key) DO UPDATE SET seq=excluded.seq, line=excluded.line"
)
_DELETE: Final = "DELETE FROM records WHERE collection=? AND key=?"
_LOG: Final = "INSERT INTO changes (first_seq, last_seq, body) VALUES (?, ?, ?)"
_encode_segment = msgspec.msgpack.Encoder().encode
_decode_segment = msgspec.msgpack.Decoder(list[tuple[str, str, bool, bytes]]).decode

# How many changes one group commit takes at most, and how many commit segments one
# trim transaction deletes at most (so that trimming never holds up commits for long).
_MAX_GROUP = 50_000
_WAL_BACKSTOP = 4000  # pages
_TRIM_STEP = 200


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


# Migrations from version N to N + 1, run in order inside one transaction when an
# older database is opened.
MIGRATIONS: Final[dict[int, Callable[[sqlite3.Connection], None]]] = {
    1: lambda conn: _CanonicalValues(conn)(),
}


class _Batch:
    __slots__ = ("batch", "done", "records")

    def __init__(self, batch: Sequence[PreparedChange], done: Committed) -> None:
        self.batch = batch
        self.done = done
        self.records: list[Record] | None = None


_Job = _Batch | Callable[[], None] | None  # a batch, a flush marker, or stop


class SQLiteStore:
    def __init__(
        self,
        path: Path,
        *,
        retain: int,
        synchronous: str = "full",
        busy_timeout: float = 2.0,
    ) -> None:
        self.path = Path(path)
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
        self._committed = 0  # the seq of the last committed change
        self._oldest_change = 1  # the oldest seq still in the changes table
        self._healthy = True
        self.commits = 0  # transactions committed (group commits)
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()

    # -- opening ---------------------------------------------------------------
    ready = True  # everything it holds is loaded by open()

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
        self._thread = threading.Thread(target=self._run, name="statecast-sqlite", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name="statecast-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()
        log.info(
            "loaded %s: %d records, seq %d, %d changes retained, in %.2fs",
            self.path,
            len(self.state),
            self.state.seq,
            len(self.log),
            time.monotonic() - t0,
        )

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
        version = int(meta.get("schema_version", "0"))
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
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA journal_size_limit=67108864")
        # Checkpoints run in a thread of their own (_checkpoints), not in commits;
        # the writer checkpoints only if that thread falls far behind (16 MB).
        conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_BACKSTOP}")

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
        log.info("migrated %s to format version %d", self.path, version)

    def _load(self, conn: sqlite3.Connection) -> None:
        meta = dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())
        self.epoch = meta["epoch"]
        seq = int(meta["seq"])
        first = max(1, seq - self.retain + 1)
        row = conn.execute("SELECT min(first_seq) FROM changes").fetchone()
        self._oldest_change = row[0] if row[0] is not None else seq + 1
        start = max(first, self._oldest_change)
        # The records, in primary key order (so by collection); the retained ones
        # indexed by seq, so that the log can share their objects.
        by_seq: dict[int, Record] = {}
        records: list[Record] = []
        for c, k, s, line in conn.execute("SELECT collection, key, seq, line FROM records"):
            rec = Record(s, c, k, line, False)
            records.append(rec)
            if s >= start:
                by_seq[s] = rec
        self.state.load(records, seq)
        del records
        changelog = ChangeLog(self.retain, last_seq=start - 1)
        # Each retained change learns the version it replaced when that version is
        # retained too; the first change of a key in the log cannot (Record.before).
        latest: dict[tuple[str, str], Record] = {}
        for first_seq, body in conn.execute(
            "SELECT first_seq, body FROM changes WHERE last_seq >= ? ORDER BY first_seq",
            (start,),
        ):
            recs: list[Record] = []
            s = first_seq - 1
            for c, k, deleted, line in _decode_segment(body):
                s += 1
                if s < start:
                    continue
                # A retained upsert that is still the current record shares its object.
                current = by_seq.get(s)
                rec = current if current is not None else Record(s, c, k, line, deleted)
                rec.before = latest.get((c, k), UNSET)
                latest[(c, k)] = rec
                recs.append(rec)
            self._extend_log(changelog, recs)
        if changelog.last_seq != seq:
            raise StoreError(
                f"{self.path} is damaged: its change log ends at seq {changelog.last_seq}, "
                f"its state at seq {seq}"
            )
        changelog.unknown_until = seq
        self.log = changelog
        self._committed = seq

    def _extend_log(self, changelog: ChangeLog, recs: list[Record]) -> None:
        try:
            changelog.extend(recs)
        except ValueError as exc:
            raise StoreError(f"{self.path} is damaged: {exc}") from None

    # -- loop thread interface -----------------------------------------------------
    def submit(self, batch: Sequence[PreparedChange], done: Committed) -> None:
        self._queue.put(_Batch(batch, done))

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
        publishes. Errors are left for the next attempt (and the writer reports a
        database that cannot be written).
        """
        conn: sqlite3.Connection | None = None
        while not self._stop_checkpoints.wait(0.2):
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
            jobs: list[_Job] = [q.get()]
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
                # A flush marker or stop: everything before it is written first.
                self._commit(group)
                group = []
                if job is None:
                    stop = True
                    break
                self._post(job)
            self._commit(group)
            if not stop:
                self._trim()

    def _post(self, fn: Callable[[], None]) -> None:
        assert self._to_loop is not None
        try:
            self._to_loop(fn)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _commit(self, group: list[_Batch]) -> None:
        if not group:
            return
        seq = self._committed
        segment: list[tuple[str, str, bool, bytes]] = []
        last: dict[tuple[str, str], Record] = {}  # the last change to each key wins
        for job in group:
            job.records = encode_batch(job.batch, seq + 1)
            seq += len(job.records)
            for r in job.records:
                segment.append((r.collection, r.key, r.deleted, r.line))
                last[(r.collection, r.key)] = r
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    _UPSERT,
                    [(r.collection, r.key, r.seq, r.line) for r in last.values() if not r.deleted],
                )
                conn.executemany(
                    _DELETE, [(r.collection, r.key) for r in last.values() if r.deleted]
                )
                conn.execute(_LOG, (self._committed + 1, seq, _encode_segment(segment)))
                conn.execute("UPDATE statecast_meta SET value=? WHERE key='seq'", (str(seq),))
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
        self.commits += 1
        if not self._healthy:
            self._healthy = True
            log.warning("%s can be written again: publishes are accepted", self.path)

        def deliver() -> None:
            for job in group:
                job.done(job.records, None)

        self._post(deliver)

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

    def _trim(self) -> None:
        """Keep about ``retain`` changes on disk: drop whole commit segments that
        hold only older changes, a few at a time between commits."""
        keep_from = self._committed - self.retain + 1
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
