"""The SQLite store as a SourceStore (core/store.py, docs/postgres.md "The SQLite store"):
a source's position is committed by the same transaction as the batch taken from it,
is loaded at start, and ``reset()`` starts over under a new epoch.

The PostgreSQL source's own tests (tests/sources/test_postgres.py) run these through a
real database, kill -9 included; here the store is driven directly.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from statecast.core.protocol import PreparedChange, prepare_change
from statecast.core.state import Record
from statecast.core.store import SourceStore
from statecast.errors import ProtocolError, StoreError
from statecast.stores.sqlite import SQLiteStore
from tests.helpers import TIMEOUT
from tests.stores.test_sqlite import lock_database


def run_now(fn: Callable[[], None]) -> None:
    """``to_loop`` for a store driven without a loop: callbacks run in the writer."""
    fn()


@contextlib.contextmanager
def opened(path: Path, retain: int = 1000) -> Iterator[SQLiteStore]:
    store = SQLiteStore(path, retain=retain)
    store.open(run_now)
    try:
        yield store
    finally:
        store.close()


def upsert(key: str, value: object) -> PreparedChange:
    return prepare_change({"collection": "orders", "key": key, "value": value})


def commit(
    store: SQLiteStore, batch: list[PreparedChange], position: tuple[str, str] | None
) -> tuple[list[Record] | None, ProtocolError | None]:
    """Submit one batch (with a source position, or without) and wait for its answer;
    install the records as the engine would."""
    answer: list[tuple[list[Record] | None, ProtocolError | None]] = []
    done = threading.Event()

    def committed(records: list[Record] | None, error: ProtocolError | None) -> None:
        if records:
            store.state.install(records)
            store.log.extend(records)
        answer.append((records, error))
        done.set()

    if position is None:
        store.submit(batch, committed)
    else:
        store.submit_source(batch, committed, position)
    assert done.wait(TIMEOUT)
    return answer[0]


def meta_of(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT key, value FROM statecast_meta").fetchall())


def test_the_sqlite_store_is_a_source_store(tmp_path: Path) -> None:
    with opened(tmp_path / "s.db") as store:
        assert isinstance(store, SourceStore)
        assert store.positions == {}


def test_a_position_is_committed_with_its_batch_and_loaded_at_start(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with opened(path) as store:
        records, error = commit(store, [upsert("O-1", {"qty": 1})], ("pg", "0/10"))
        assert error is None
        assert records is not None
        assert [r.seq for r in records] == [1]
        assert store.positions == {"pg": "0/10"}
        commit(store, [upsert("O-2", {"qty": 2})], None)  # a plain publish keeps it
        commit(store, [upsert("O-1", {"qty": 3})], ("pg", "0/20"))
        commit(store, [upsert("O-3", {"qty": 3})], ("other", "7"))
        epoch = store.epoch
    assert meta_of(path)["source_position"] == '{"pg":"0/20","other":"7"}'
    with opened(path) as store:
        assert store.positions == {"pg": "0/20", "other": "7"}
        assert store.epoch == epoch
        assert store.state.seq == 4


def test_an_empty_batch_commits_only_its_position(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with opened(path) as store:
        commit(store, [upsert("O-1", 1)], ("pg", "0/10"))
        records, error = commit(store, [], ("pg", "0/30"))
        assert (records, error) == ([], None)
        assert store.state.seq == 1
        assert store.positions == {"pg": "0/30"}
        records, _ = commit(store, [upsert("O-2", 2)], None)
        assert records is not None
        assert [r.seq for r in records] == [2]
    with opened(path) as store:
        assert store.positions == {"pg": "0/30"}
        assert store.state.seq == 2
        assert [r.seq for r in store.log.read(0, 10)] == [1, 2]


def test_a_failed_commit_keeps_the_old_position(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with opened(path) as store:
        commit(store, [upsert("O-1", 1)], ("pg", "0/10"))
        with lock_database(path):
            records, error = commit(store, [upsert("O-2", 2)], ("pg", "0/20"))
        assert records is None
        assert error is not None
        assert error.code == "unavailable"
        assert store.positions == {"pg": "0/10"}
        commit(store, [upsert("O-3", 3)], None)
    with opened(path) as store:
        assert store.positions == {"pg": "0/10"}
        assert sorted(r.key for r in store.state.collections["orders"].records()) == ["O-1", "O-3"]


def test_reset_starts_over_under_a_new_epoch(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with opened(path) as store:
        for i in range(50):
            commit(store, [upsert(f"O-{i}", i)], ("pg", f"0/{i}"))
        old_epoch = store.epoch
        store.reset()
        assert store.epoch != old_epoch
        assert store.positions == {}
        assert store.state.seq == 0
        assert len(store.state) == 0
        assert len(store.log) == 0
        records, _ = commit(store, [upsert("N-1", "new")], ("pg", "1/0"))
        assert records is not None
        assert [r.seq for r in records] == [1]
        new_epoch = store.epoch
    meta = meta_of(path)
    assert (meta["seq"], meta["epoch"]) == ("1", new_epoch)
    with opened(path) as store:
        assert store.epoch == new_epoch
        assert store.positions == {"pg": "1/0"}
        assert [r.key for r in store.state.collections["orders"].records()] == ["N-1"]
        assert [r.key for r in store.log.read(0, 10)] == ["N-1"]


def test_an_unreadable_position_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with opened(path) as store:
        commit(store, [upsert("O-1", 1)], ("pg", "0/10"))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE statecast_meta SET value='[1' WHERE key='source_position'")
        conn.commit()
    with pytest.raises(StoreError, match="damaged: its source position cannot be read"):
        SQLiteStore(path, retain=1000).open(run_now)
