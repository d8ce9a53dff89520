"""The SQLite store: durability, recovery, retention and faults (docs/durability.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from statecast import Change, Server, StoreError, Unavailable
from statecast.stores.sqlite import SCHEMA_VERSION
from tests.helpers import TIMEOUT, LineClient, wait_for


def sqlite_server(path: Path, **settings: Any) -> Server:
    return Server(
        http_port=None, port=0, store=f"sqlite:{path}", heartbeat=None, shutdown_grace=2, **settings
    ).start_in_thread()


def state_of(port: int) -> tuple[int, dict[tuple[str, str], object]]:
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    data = {(f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"}
    return frames[-1]["seq"], data


def test_restart_keeps_state_seq_epoch_and_log(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    srv = sqlite_server(db)
    epoch = srv.epoch
    for i in range(50):
        srv.publish([Change("orders", f"O-{i % 10}", {"i": i}), Change("fills", f"F-{i}", i)])
    srv.delete("orders", "O-3")
    before = state_of(srv.port)
    srv.stop_in_thread()

    srv = sqlite_server(db)
    try:
        assert srv.epoch == epoch
        assert srv.seq == 101
        assert state_of(srv.port) == before
        # A subscriber that had seen up to seq 90 resumes without a full sync.
        with LineClient(srv.port) as c:
            sub = c.request({"op": "subscribe", "from": 90, "epoch": epoch})
            assert sub["type"] == "subscribed"
            frames = [c.read() for _ in range(11)]
            assert [f["seq"] for f in frames] == list(range(91, 102))
            assert frames[-1] == {
                "type": "change",
                "seq": 101,
                "collection": "orders",
                "key": "O-3",
                "deleted": True,
            }
            srv.put("orders", "O-3", "back")
            assert c.read()["seq"] == 102
    finally:
        srv.stop_in_thread()


def test_new_database_gets_a_new_epoch(tmp_path: Path) -> None:
    a = sqlite_server(tmp_path / "a.db")
    b = sqlite_server(tmp_path / "b.db")
    try:
        assert a.epoch != b.epoch
        assert a.seq == b.seq == 0
    finally:
        a.stop_in_thread()
        b.stop_in_thread()


def test_one_server_per_database(tmp_path: Path) -> None:
    srv = sqlite_server(tmp_path / "s.db")
    try:
        with pytest.raises(StoreError, match="in use by another statecast server"):
            sqlite_server(tmp_path / "s.db")
    finally:
        srv.stop_in_thread()


@contextlib.contextmanager
def left_untouched(path: Path) -> Iterator[None]:
    """The file's bytes and time stamp stay as they were, and nothing appears beside it."""
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    yield
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_file_that_is_not_a_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    with (
        left_untouched(path),
        pytest.raises(StoreError, match=re.escape(f"{path} is not a statecast database")),
    ):
        sqlite_server(path)


def test_another_applications_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    with left_untouched(path), pytest.raises(StoreError, match=r"not a statecast database.*users"):
        sqlite_server(path)


def test_a_newer_format_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    sqlite_server(path).stop_in_thread()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE statecast_meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    with (
        left_untouched(path),
        pytest.raises(StoreError, match=rf"format version 99, newer than .*\({SCHEMA_VERSION}\)"),
    ):
        sqlite_server(path)


_SET_META = "UPDATE statecast_meta SET value='{}' WHERE key='{}'"


@pytest.mark.parametrize(
    ("sql", "said"),
    [
        (_SET_META.format("abc", "schema_version"), "schema_version is 'abc'"),
        (_SET_META.format("9" * 5001, "schema_version"), "schema_version"),
        (_SET_META.format("-5", "schema_version"), "schema_version is -5"),
        ("DELETE FROM statecast_meta WHERE key='schema_version'", "schema_version is None"),
        ("DELETE FROM statecast_meta WHERE key='epoch'", "no epoch"),
        (_SET_META.format("xyz", "seq"), "seq is 'xyz'"),
    ],
    ids=["text", "5001-digits", "negative", "no-version", "no-epoch", "seq-text"],
)
def test_a_damaged_meta_table_is_refused_with_a_message(
    tmp_path: Path, sql: str, said: str
) -> None:
    """Found by an adversarial run: each of these was a traceback (ValueError, KeyError,
    TypeError) instead of a message naming the file and what is wrong."""
    path = tmp_path / "s.db"
    sqlite_server(path).stop_in_thread()
    conn = sqlite3.connect(path)
    conn.execute(sql)
    conn.commit()
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    with pytest.raises(StoreError, match=rf"s\.db is damaged: .*{re.escape(said)}"):
        sqlite_server(path)


def test_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    sqlite_server(path).stop_in_thread()
    conn = sqlite3.connect(path)
    meta = dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())
    conn.close()
    assert meta["format"] == "statecast"
    assert meta["schema_version"] == str(SCHEMA_VERSION)
    assert meta["created_by"].startswith("statecast ")


def test_change_log_is_trimmed_and_the_file_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    srv = sqlite_server(path, retain=2000)
    value = {"pad": "x" * 300}
    sizes = []
    try:
        for rnd in range(6):
            for i in range(50):  # 100 keys, updated over and over
                srv.publish([Change("hot", f"k{(i * 2 + j) % 100}", value) for j in range(2)])
            for _ in range(20):
                srv.publish([Change("hot", f"k{j}", {"r": rnd, **value}) for j in range(100)])
            # The database file proper, once what the WAL holds is copied into it.
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            sizes.append(os.path.getsize(path))
            assert os.path.getsize(f"{path}-wal") < 64 << 20
        assert srv.stats()["retained_changes"] == 2000
    finally:
        srv.stop_in_thread()
    conn = sqlite3.connect(path)
    retained, last = conn.execute(
        "SELECT sum(last_seq - first_seq + 1), max(last_seq) FROM changes"
    ).fetchone()
    conn.close()
    assert last == 6 * (100 + 2000)
    assert 2000 <= retained <= 2000 + 1000  # retain, plus at most the trimming slack
    # 12,600 changes of 100 keys: the file stops growing once the log is trimmed.
    assert sizes[-1] <= sizes[2] * 1.2, sizes


def lock_database(path: Path) -> subprocess.Popen[str]:
    """Another process that holds a write lock on the database until told to stop."""
    code = (
        "import sqlite3, sys\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "c.execute('ROLLBACK')\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "locked"
    return p


def test_locked_database_fails_publishes_until_it_is_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="statecast.stores.sqlite")
    path = tmp_path / "s.db"
    srv = sqlite_server(path, sqlite_busy_timeout=0.2)
    try:
        srv.put("c", "before", 1)
        locker = lock_database(path)
        try:
            with LineClient(srv.port) as c:
                for i in range(3):
                    err = c.request(
                        {
                            "op": "publish",
                            "id": i,
                            "changes": [{"collection": "c", "key": "k", "value": i}],
                        }
                    )
                    assert err["type"] == "error"
                    assert err["code"] == "unavailable"
                    assert err["id"] == i
                    assert "locked" in err["message"]
                with pytest.raises(Unavailable):
                    srv.put("c", "k", "embedded")
                # Reads go on from what is committed.
                seq, data = state_of(srv.port)
                assert (seq, data) == (1, {("c", "before"): 1})
                assert c.request({"op": "subscribe"})["seq"] == 1
        finally:
            assert locker.stdin is not None
            locker.stdin.write("\n")
            locker.stdin.close()
            locker.wait(TIMEOUT)
            assert locker.stdout is not None
            locker.stdout.close()
        assert srv.put("c", "after", 2) == 2  # recovered by itself
    finally:
        srv.stop_in_thread()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # once per outage
    assert "cannot write" in errors[0].getMessage()
    assert any("can be written again" in r.getMessage() for r in caplog.records)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, or a skip saying why there can be none."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {exc}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_full_disk_fails_publishes_and_recovers(small_fs: Path) -> None:
    srv = sqlite_server(small_fs / "s.db")
    try:
        value = {"pad": "y" * 2000}
        with pytest.raises(Unavailable, match="full"):  # noqa: PT012 (fill it up, bounded)
            for i in range(2000):
                srv.publish([Change("big", f"k{i}", value)])
        seq = srv.seq
        assert seq > 10
        got, data = state_of(srv.port)  # still serving what was committed
        assert got == seq
        assert len(data) == seq
        _mount("-o", "remount,size=64m", str(small_fs))
        wait_for(lambda: _publishes(srv), "publishes to work again")
    finally:
        srv.stop_in_thread()


def _publishes(srv: Server) -> bool:
    try:
        srv.put("after", "k", 1)
    except Unavailable:
        return False
    return True


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def test_read_only_file_fails_publishes_and_recovers(tmp_path: Path) -> None:
    """The database files become immutable (chattr +i: even root, even through open
    file descriptors, cannot write them), then writable again."""
    path = tmp_path / "s.db"
    srv = sqlite_server(path)
    try:
        srv.put("c", "k", 1)
        files = [path, Path(f"{path}-wal")]
        try:
            _chattr("+i", *files)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot make files immutable here (needs root and chattr): {exc}")
        try:
            with pytest.raises(Unavailable, match="cannot be written"):
                srv.put("c", "k", 2)
            with pytest.raises(Unavailable):
                srv.put("c", "k", 3)
            assert state_of(srv.port) == (1, {("c", "k"): 1})
        finally:
            _chattr("-i", *files)
        wait_for(lambda: _publishes(srv), "publishes to work again")
        assert state_of(srv.port)[1][("c", "k")] == 1
    finally:
        srv.stop_in_thread()


def test_an_older_database_is_migrated_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migration path: a file of this version opened by a statecast that knows the
    next one."""
    import statecast.stores.sqlite as sqlite_store  # noqa: PLC0415

    path = tmp_path / "s.db"
    srv = sqlite_server(path)
    srv.put("c", "k", 1)
    srv.stop_in_thread()
    ran: list[int] = []

    def to_v2(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE extra (x INTEGER)")
        ran.append(1)

    monkeypatch.setattr(sqlite_store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(sqlite_store.MIGRATIONS, SCHEMA_VERSION, to_v2)
    srv = sqlite_server(path)
    try:
        assert srv.seq == 1
        assert state_of(srv.port) == (1, {("c", "k"): 1})
    finally:
        srv.stop_in_thread()
    assert ran == [1]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        version = conn.execute(
            "SELECT value FROM statecast_meta WHERE key='schema_version'"
        ).fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert version == str(SCHEMA_VERSION + 1)
    assert "extra" in tables


def test_a_failed_start_releases_the_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            Server(
                http_port=None, port=port, store=f"sqlite:{path}", heartbeat=None
            ).start_in_thread()
    srv = sqlite_server(path)  # not "in use by another statecast server"
    srv.stop_in_thread()


def test_publish_then_eof_still_gets_its_durable_ack(tmp_path: Path) -> None:
    """``echo '{"op":"publish",...}' | nc host 8989``: the ack comes after the commit,
    after the client closed its side; the server waits for it before closing."""
    srv = sqlite_server(tmp_path / "s.db")
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
            s.sendall(b'{"op":"publish","changes":[{"collection":"c","key":"k","value":1}]}\n')
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        frames = [msgspec.json.decode(line) for line in data.splitlines()]
        assert [f["type"] for f in frames] == ["hello", "ack"]
        assert frames[1]["seq"] == 1
    finally:
        srv.stop_in_thread()
