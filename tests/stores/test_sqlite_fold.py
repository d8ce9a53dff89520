"""The SQLite store's fold (docs/durability.md): an ack commits the change log only;
the records table is brought up to date later, in transactions of its own, and a start
replays what is not folded yet.

Here: the replay at start (state, log, ``Record.before``), trimming that keeps what is
not folded, the migration from format version 2, a fold that cannot write, and kill -9
in the middle of a fold running in a real ``statecast serve``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec import UNSET

import statecast.stores.sqlite as sqlite_store
from statecast import Change, Server
from statecast.core.frames import RECORD_LINE
from statecast.core.state import Record
from statecast.stores.sqlite import SQLiteStore
from tests.helpers import TIMEOUT, LineClient, ServeProcess, wait_for
from tests.stores.test_sqlite import lock_database
from tests.stores.test_sqlite_crash import Publisher, Replica, check_batches, fresh_state

LOGGER = "statecast.stores.sqlite"

Data = dict[tuple[str, str], Any]


def serving(path: Path, **settings: Any) -> Server:
    return Server(
        http_port=None, port=0, store=f"sqlite:{path}", heartbeat=None, shutdown_grace=2, **settings
    ).start_in_thread()


def store_of(srv: Server) -> SQLiteStore:
    store = srv._store
    assert isinstance(store, SQLiteStore)
    return store


@contextlib.contextmanager
def no_fold(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Servers started meanwhile never fold: the records table stays as it is."""

    def off(self: SQLiteStore) -> bool:
        self._fold_retry_at = math.inf
        return False

    with monkeypatch.context() as m:
        m.setattr(SQLiteStore, "_fold", off)
        yield


def on_disk(path: Path) -> tuple[dict[str, str], Data, list[tuple[int, int]]]:
    """The meta rows, the records table (values decoded) and the log rows' seq ranges."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        meta = dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())
        records = {
            (c, k): msgspec.json.decode(line)["value"]
            for c, k, line in conn.execute("SELECT collection, key, line FROM records")
        }
        rows = conn.execute("SELECT first_seq, last_seq FROM changes ORDER BY first_seq").fetchall()
    return meta, records, rows


def folded(path: Path) -> bool:
    meta, _, _ = on_disk(path)
    return meta["folded_seq"] == meta["seq"]


def sync(port: int) -> tuple[int, Data]:
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    data = {(f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"}
    return frames[-1]["seq"], data


def changes_after(port: int, epoch: str, after: int, until: int) -> list[dict[str, Any]]:
    with LineClient(port) as c:
        reply = c.request({"op": "subscribe", "from": after, "epoch": epoch})
        assert reply["type"] == "subscribed", reply
        return [c.read() for _ in range(until - after)]


class History:
    """What was published, to check a server against: the state after each seq."""

    def __init__(self) -> None:
        self.seq = 0
        self.data: Data = {}
        self.versions: list[tuple[str, str, Any]] = []  # (collection, key, value | UNSET)

    def publish(self, srv: Server, changes: list[Change]) -> None:
        assert srv.publish(changes) == self.seq + len(changes)
        for ch in changes:
            self.seq += 1
            key = (ch.collection, ch.key)
            if ch.delete:
                self.data.pop(key, None)
                self.versions.append((*key, UNSET))
            else:
                self.data[key] = ch.value
                self.versions.append((*key, ch.value))

    def previous(self, seq: int) -> tuple[int, Any] | None:
        """The version of the key of change ``seq`` just before it: (its seq, its value
        or UNSET for a delete), None if the key was never written before."""
        c, k, _ = self.versions[seq - 1]
        for s in range(seq - 1, 0, -1):
            cc, kk, value = self.versions[s - 1]
            if (cc, kk) == (c, k):
                return s, value
        return None


def busy_history(h: History, srv: Server, rounds: int, rnd: random.Random) -> None:
    """Upserts, overwrites and deletes of a few dozen keys in three collections."""
    for _ in range(rounds):
        batch = []
        for _ in range(rnd.randint(1, 8)):
            coll = rnd.choice(["orders", "fills", "notes"])
            key = f"k{rnd.randint(0, 40)}"
            if rnd.random() < 0.2:
                batch.append(Change(coll, key, delete=True))
            else:
                batch.append(Change(coll, key, {"n": h.seq, "s": rnd.choice(["open", "done"])}))
        h.publish(srv, batch)


def check_before(store: SQLiteStore, h: History) -> None:
    """Every retained change knows the version it replaced, or says it does not know
    (UNSET); none is wrong (Record.before)."""
    log_ = store.log
    for rec in log_.read(log_.first_seq - 1, len(log_)):
        before = rec.before
        if before is UNSET:
            continue
        prev = h.previous(rec.seq)
        if before is None:
            # The key did not exist: never written, or deleted last.
            assert prev is None or prev[1] is UNSET, (rec, prev)
            continue
        assert isinstance(before, Record)
        assert prev is not None, rec
        assert (before.seq, before.collection, before.key) == (prev[0], rec.collection, rec.key)
        if before.deleted:  # (loaded changes name a retained delete; live ones None)
            assert prev[1] is UNSET
        else:
            assert msgspec.json.decode(before.line)["value"] == prev[1]


def test_an_ack_commits_the_log_and_the_fold_follows(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    srv = serving(path)
    try:
        h = History()
        busy_history(h, srv, 200, random.Random(1))
        wait_for(lambda: folded(path), "the fold to catch up")
        meta, records, rows = on_disk(path)
        assert records == h.data
        assert int(meta["seq"]) == h.seq
        # Every ack committed one log row per group commit, consecutive.
        assert rows[0][0] == 1
        assert rows[-1][1] == h.seq
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(rows))
        assert store_of(srv).folds > 0
    finally:
        srv.stop_in_thread()


@pytest.mark.parametrize("folded_first", [0, 150])
def test_a_start_replays_what_is_not_folded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    folded_first: int,
) -> None:
    """Some commits folded (or none), the rest only in the log: a start serves the
    exact state and log, each replayed change knows what it replaced, and the fold
    then catches up."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "s.db"
    rnd = random.Random(folded_first)
    h = History()
    srv = serving(path, retain=400)
    busy_history(h, srv, folded_first, rnd)
    wait_for(lambda: folded(path), "the fold to catch up")
    srv.stop_in_thread()
    with no_fold(monkeypatch):
        srv = serving(path, retain=400)
        epoch = srv.epoch
        busy_history(h, srv, 150, rnd)
        srv.stop_in_thread()
    meta, _, _ = on_disk(path)
    done = int(meta["folded_seq"])
    assert done < h.seq
    assert h.seq > 400  # the log on disk holds more than the retained window

    srv = serving(path, retain=400)
    try:
        assert srv.epoch == epoch
        assert srv.seq == h.seq
        assert sync(srv.port) == (h.seq, h.data)
        assert f"{h.seq - done} replayed from the log (folded up to seq {done})" in caplog.text
        # The log, from its first retained change: exactly what was published.
        log = changes_after(srv.port, epoch, h.seq - 400, h.seq)
        for f in log:
            c, k, value = h.versions[f["seq"] - 1]
            assert (f["collection"], f["key"]) == (c, k)
            if value is UNSET:
                assert f["deleted"] is True
            else:
                assert f["value"] == value
        store = store_of(srv)
        check_before(store, h)
        # The replayed changes know what they replaced, even when older than the log.
        replayed = store.log.read(max(done, h.seq - 400), h.seq - max(done, h.seq - 400))
        assert all(r.before is not UNSET for r in replayed)
        wait_for(lambda: folded(path), "the fold to catch up")
        assert on_disk(path)[1] == h.data
        busy_history(h, srv, 20, rnd)
        assert sync(srv.port) == (h.seq, h.data)
    finally:
        srv.stop_in_thread()
    srv = serving(path, retain=400)
    try:
        assert sync(srv.port) == (h.seq, h.data)
        check_before(store_of(srv), h)
    finally:
        srv.stop_in_thread()


def test_a_filtered_subscriber_resumes_through_a_replayed_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replayed change knows the version it replaced even when that version is older
    than the retained log, so a where-filtered subscriber resumes across the restart
    and learns that a record moved out of its view (§3.7)."""
    path = tmp_path / "s.db"
    with no_fold(monkeypatch):
        srv = serving(path, retain=5)
        srv.put("orders", "A", {"s": "open"})  # 1
        for i in range(5):
            srv.put("orders", f"F{i}", {"s": "done"})  # 2-6
        srv.put("orders", "A", {"s": "done"})  # 7: A leaves the view s=open
        epoch = srv.epoch
        srv.stop_in_thread()
    srv = serving(path, retain=5)
    try:
        with LineClient(srv.port) as c:
            reply = c.request(
                {"op": "subscribe", "from": 6, "epoch": epoch, "where": {"s": "open"}}
            )
            assert reply["type"] == "subscribed", reply
            assert c.read() == {
                "type": "change",
                "seq": 7,
                "collection": "orders",
                "key": "A",
                "deleted": True,
            }
    finally:
        srv.stop_in_thread()


def test_trimming_keeps_what_is_not_folded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.db"
    h = History()
    rnd = random.Random(3)
    with no_fold(monkeypatch):
        srv = serving(path, retain=100)
        busy_history(h, srv, 1500, rnd)  # some 6,700 changes: many times retain + slack
        srv.stop_in_thread()
    meta, records, rows = on_disk(path)
    assert meta["folded_seq"] == "0"
    assert records == {}
    assert rows[0][0] == 1  # nothing trimmed: none of it is folded
    srv = serving(path, retain=100)
    try:
        assert sync(srv.port) == (h.seq, h.data)
        wait_for(lambda: folded(path), "the fold to catch up", TIMEOUT * 2)
        busy_history(h, srv, 20, rnd)  # trimming runs between commits
        wait_for(lambda: folded(path), "the fold to catch up")
    finally:
        srv.stop_in_thread()
    meta, records, rows = on_disk(path)
    assert records == h.data
    kept = rows[-1][1] - rows[0][0] + 1
    assert 100 <= kept <= 100 + 1000 + 50  # retain, the slack, and one commit at most


V2_SCHEMA = """
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


def test_a_version_2_database_is_migrated_and_its_log_rows_still_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Version 2 kept its records up to date in every commit, and wrote log rows as
    msgpack arrays: it is all folded, and the old rows are read beside new ones."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "v2.db"
    epoch = "00112233aabbccdd"
    items = []
    for s in range(1, 11):
        value = b'{"v":%d}' % s
        line = RECORD_LINE % (s, b"c", b'"k%d"' % (s % 4), value)
        items.append(("c", f"k{s % 4}", False, line))
    records = {}
    for s, (c, k, _, line) in enumerate(items, 1):
        records[(c, k)] = (s, line)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in V2_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany(
            "INSERT INTO statecast_meta VALUES (?, ?)",
            [("format", "statecast"), ("schema_version", "2"), ("epoch", epoch), ("seq", "10")],
        )
        conn.executemany(
            "INSERT INTO records VALUES (?, ?, ?, ?)",
            [(c, k, s, line) for (c, k), (s, line) in records.items()],
        )
        conn.execute("INSERT INTO changes VALUES (1, 4, ?)", (msgspec.msgpack.encode(items[:4]),))
        conn.execute("INSERT INTO changes VALUES (5, 10, ?)", (msgspec.msgpack.encode(items[4:]),))
    srv = serving(path)
    try:
        assert srv.epoch == epoch
        assert sync(srv.port) == (10, {("c", f"k{s % 4}"): {"v": s} for s in range(7, 11)})
        srv.publish([Change("c", "k1", {"v": 11}), Change("c", "k2", delete=True)])
    finally:
        srv.stop_in_thread()
    assert "migrated" in caplog.text
    meta, _, _ = on_disk(path)
    assert meta["schema_version"] == str(sqlite_store.SCHEMA_VERSION) == "4"
    srv = serving(path)
    try:
        log = changes_after(srv.port, epoch, 0, 12)
        assert [f["seq"] for f in log] == list(range(1, 13))
        assert [f.get("value") for f in log[:10]] == [{"v": s} for s in range(1, 11)]
        assert log[10]["value"] == {"v": 11}
        assert log[11]["deleted"] is True
        assert sync(srv.port)[1] == {
            ("c", "k3"): {"v": 7},
            ("c", "k0"): {"v": 8},
            ("c", "k1"): {"v": 11},
        }
    finally:
        srv.stop_in_thread()


def test_a_fold_that_cannot_write_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the write lock: the fold gives up at once (it never waits
    for a lock: the writer must stay free for commits) and goes on once it is gone."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    path = tmp_path / "s.db"
    h = History()
    with no_fold(monkeypatch):
        srv = serving(path)
        busy_history(h, srv, 300, random.Random(5))
        srv.stop_in_thread()
    locker = lock_database(path)
    released = False
    try:
        srv = serving(path)  # the load only reads
        try:
            assert sync(srv.port) == (h.seq, h.data)
            wait_for(lambda: "failed: database is locked" in caplog.text, "a fold to fail")
            assert locker.stdin is not None
            locker.stdin.write("\n")
            locker.stdin.close()
            locker.wait(TIMEOUT)
            released = True
            wait_for(lambda: folded(path), "the fold to catch up")
            assert on_disk(path)[1] == h.data
        finally:
            srv.stop_in_thread()
    finally:
        if not released:
            locker.kill()
            locker.wait(TIMEOUT)
        if locker.stdout is not None:
            locker.stdout.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- kill -9 in the middle of a fold ---------------------------------------------------------


def fold_of_log(path: Path) -> tuple[int, int, Data]:
    """(seq, folded_seq, the state the log gives at folded_seq), from a copy of the
    files a killed server left (so that the restart still finds them as they were)."""
    copy = path.parent / "inspect"
    copy.mkdir(exist_ok=True)
    for name in (path.name, f"{path.name}-wal"):
        if (path.parent / name).exists():
            shutil.copy(path.parent / name, copy / name)
    db = copy / path.name
    meta, records, _ = on_disk(db)
    seq, done = int(meta["seq"]), int(meta["folded_seq"])
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT first_seq, last_seq, body FROM changes ORDER BY first_seq")
        state: Data = {}
        expect = 1
        for first, last, body in rows:
            assert first == expect, "the log is not consecutive from seq 1"
            expect = last + 1
            for s, line in enumerate(body.splitlines(), first):
                if s > done:
                    break
                f = msgspec.json.decode(line)
                assert f["seq"] == s
                if f.get("deleted"):
                    state.pop((f["collection"], f["key"]), None)
                else:
                    state[(f["collection"], f["key"])] = f["value"]
        assert expect == seq + 1
    # The fold's transaction moved folded_seq with its rows: the records table is the
    # state at folded_seq exactly.
    assert records == state
    shutil.rmtree(copy)
    return seq, done, state


def saw(server: ServeProcess, text: str, since: int) -> bool:
    """Whether the server printed a line holding ``text`` after its first ``since``."""
    return any(text in ln for ln in server.lines[since:])


def bulk_load(port: int, cycle: int) -> None:
    """40,000 changes published flat out (7,000 keys): a large unfolded log, since the
    writer folds little while batches keep coming."""
    with LineClient(port) as bulk:
        for b in range(40):
            changes = [
                {"collection": "bulk", "key": f"b{(b * 1000 + i) % 7000}", "value": [cycle, b, i]}
                for i in range(1000)
            ]
            bulk.send({"op": "publish", "id": b, "changes": changes})
        for _ in range(40):
            assert bulk.read()["type"] == "ack"


class Life:
    """Server lives that each end with SIGKILL inside a fold transaction."""

    def __init__(self, tmp_path: Path, args: tuple[str, ...]) -> None:
        self.tmp_path = tmp_path
        self.args = args
        self.rng = random.Random(11)
        self.acked: dict[str, set[int]] = {}
        self.sent: dict[str, int] = {}
        self.replica = Replica()
        self.inside = 0  # kills that landed inside a fold transaction

    def live(self, cycle: int) -> None:
        """The replica resumes (or syncs, the first time); a bulk load, then three
        publishers with pauses (the writer folds in the pauses); a random moment, then
        SIGKILL as the next fold transaction begins (it lasts the fold delay)."""
        server = ServeProcess(self.tmp_path, *self.args)
        replica = self.replica
        try:
            with LineClient(server.port) as sub:
                if cycle == 0:
                    sub.send({"op": "sync", "live": True})
                    frames = sub.read_until("snapshot_end")
                    replica.epoch = frames[0]["epoch"]
                    replica.seq = frames[-1]["seq"]
                else:
                    reply = sub.request(
                        {"op": "subscribe", "from": replica.seq, "epoch": replica.epoch}
                    )
                    assert reply["type"] == "subscribed", reply
                stop = threading.Event()
                follower = threading.Thread(target=replica.follow, args=(sub, stop), daemon=True)
                follower.start()
                bulk_load(server.port, cycle)
                pubs = [Publisher(server.port, f"c{cycle}p{n}", pause=0.02) for n in range(3)]
                for p in pubs:
                    p.start()
                mark = len(server.lines)
                wait_for(
                    lambda: all(p.acked for p in pubs) and saw(server, "folding changes", mark),
                    "acks, and the fold running",
                )
                time.sleep(self.rng.uniform(0.05, 0.4))
                mark = len(server.lines)
                wait_for(lambda: saw(server, "folding changes", mark), "a fold transaction")
                server.p.send_signal(signal.SIGKILL)
                for p in pubs:
                    p.join(TIMEOUT)
                    self.acked[p.tag] = set(p.acked)
                    self.sent[p.tag] = p.sent
                stop.set()
                follower.join(TIMEOUT)
        finally:
            server.stop(signal.SIGKILL)
        assert sum(len(p.acked) for p in pubs) > 0
        seq, done, _ = fold_of_log(self.tmp_path / "fold.db")
        assert done < seq, "the kill came after the fold was done"
        last_fold = [ln for ln in server.lines if "folding changes" in ln][-1]
        m = re.search(r"folding changes (\d+)-(\d+)", last_fold)
        assert m is not None
        if int(m.group(2)) > done:  # its transaction was open: rolled back
            self.inside += 1


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server is killed while it folds a large unfolded log (each fold transaction
    made slow, so that the kill lands inside one), with clients publishing: after each
    restart, the records table is the state at its folded_seq, every acked batch is
    there and none is partial, the replica resumes under the same epoch, and a fresh
    sync equals the replica."""
    monkeypatch.setenv(sqlite_store._FOLD_DELAY_ENV, "0.04")
    db = tmp_path / "fold.db"
    args = ("--store", f"sqlite:{db}", "--heartbeat", "0", "--log-level", "debug")
    lives = Life(tmp_path, args)
    for cycle in range(4):
        lives.live(cycle)
    assert lives.inside >= 2, f"only {lives.inside} of 4 kills landed inside a fold transaction"

    replica = lives.replica
    server = ServeProcess(tmp_path, *args)
    try:
        seq, data = fresh_state(server.port)
        with LineClient(server.port) as sub:
            reply = sub.request({"op": "subscribe", "from": replica.seq, "epoch": replica.epoch})
            assert reply["type"] == "subscribed", reply
            while replica.seq < seq:
                replica.apply(sub.read())
        assert replica.data == data
        # The whole log, from seq 1, replays to the same state.
        with LineClient(server.port) as c:
            reply = c.request({"op": "subscribe", "from": 0, "epoch": replica.epoch})
            assert reply["type"] == "subscribed", reply
            whole = Replica()
            while whole.seq < seq:
                whole.apply(c.read())
        assert whole.data == data
        wait_for(lambda: folded(db), "the fold to catch up", TIMEOUT * 6)
    finally:
        code, output = server.stop()
    assert code == 0, output
    assert "Traceback" not in output
    check_batches({k: v for k, v in data.items() if k[0] == "t"}, lives.acked, lives.sent)
    _, records, _ = on_disk(db)
    assert records == data
