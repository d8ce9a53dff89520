"""The SQLite store keeps §3.3.1 idempotency keys with their batches: written by the
commit that writes the batch, loaded at start for the engine, and trimmed to what the
engine remembers (the dedupe window, and at least the newest ``dedupe_keep``)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import statecast.stores.sqlite as sqlite_store
from statecast.core.protocol import prepare_change
from statecast.core.state import Record
from statecast.errors import ProtocolError
from statecast.stores.sqlite import SQLiteStore
from tests.helpers import TIMEOUT


def run_now(fn: Callable[[], None]) -> None:
    fn()


def commit(store: SQLiteStore, n: int, key: tuple[str, float] | None) -> int:
    done = threading.Event()
    seqs: list[int] = []

    def committed(records: list[Record] | None, error: ProtocolError | None) -> None:
        assert records is not None, error
        store.state.install(records)
        seqs.append(records[-1].seq)
        done.set()

    change = prepare_change({"collection": "c", "key": f"k{n}", "value": n})
    store.submit([change], committed, key)
    assert done.wait(TIMEOUT)
    return seqs[0]


def keys_on_disk(path: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return list(conn.execute("SELECT key, seq FROM idempotency_keys ORDER BY seq"))


def test_keys_commit_with_their_batch_load_at_start_and_are_trimmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_KEYS_TRIM_EVERY", 0.0)
    path = tmp_path / "s.db"
    old = time.time() - 1000  # past the window
    store = SQLiteStore(path, retain=100, dedupe_window=60, dedupe_keep=3)
    store.open(run_now)
    try:
        for n in range(6):
            commit(store, n, (f"old-{n}", old + n))
        commit(store, 6, None)  # no key: nothing written for it
        commit(store, 7, ("new", time.time()))
    finally:
        store.close()
    # The newest 3 are kept however old; older ones past the window go.
    assert keys_on_disk(path) == [("old-4", 5), ("old-5", 6), ("new", 8)]
    store = SQLiteStore(path, retain=100, dedupe_window=60, dedupe_keep=3)
    store.open(run_now)
    try:
        assert [(k, s) for k, s, _ in store.idempotency_keys()] == [
            ("old-4", 5),
            ("old-5", 6),
            ("new", 8),
        ]
        assert store.idempotency_keys() == []  # handed over once
    finally:
        store.close()


def test_the_window_keeps_every_recent_key_beyond_the_newest_n(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, retain=100, dedupe_window=600, dedupe_keep=2)
    store.open(run_now)
    try:
        for n in range(5):
            commit(store, n, (f"k-{n}", time.time()))
    finally:
        store.close()
    store = SQLiteStore(path, retain=100, dedupe_window=600, dedupe_keep=2)
    store.open(run_now)
    try:
        assert [k for k, _, _ in store.idempotency_keys()] == [f"k-{n}" for n in range(5)]
    finally:
        store.close()
