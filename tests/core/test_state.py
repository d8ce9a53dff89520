"""The state and its snapshots, with objects only (docs/protocol.md §5.1)."""

from __future__ import annotations

import random

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast.core.protocol import Change, prepare_changes
from statecast.core.state import Record, Snapshot, State


def put(state: State, collection: str, key: str, value: object) -> int:
    return state.apply(prepare_changes([Change(collection, key, value)]))[-1].seq


def delete(state: State, collection: str, key: str) -> int:
    return state.apply(prepare_changes([Change(collection, key, delete=True)]))[-1].seq


def contents(state: State) -> dict[tuple[str, str], tuple[int, object]]:
    out = {}
    for coll in state.collections.values():
        for rec in coll.records():
            frame = msgspec.json.decode(rec.line)
            out[(rec.collection, rec.key)] = (rec.seq, frame["value"])
    return out


def read_all(snap: Snapshot, step: int = 1 << 20) -> dict[tuple[str, str], tuple[int, object]]:
    out = {}
    while not snap.done:
        for line in snap.read(step):
            f = msgspec.json.decode(line)
            assert f["type"] == "record"
            key = (f["collection"], f["key"])
            assert key not in out, f"{key} twice in one snapshot"
            out[key] = (f["seq"], f["value"])
    return out


def test_batch_gets_consecutive_seqs() -> None:
    s = State()
    recs = s.apply(prepare_changes([Change("a", "1", 1), Change("b", "2", 2), Change("a", "1", 3)]))
    assert [r.seq for r in recs] == [1, 2, 3]
    assert s.seq == 3
    assert contents(s) == {("a", "1"): (3, 3), ("b", "2"): (2, 2)}
    assert len(s) == 2


def test_delete_removes_and_missing_delete_still_counts() -> None:
    s = State()
    put(s, "a", "1", 1)
    put(s, "a", "2", 2)
    put(s, "a", "3", 3)
    assert delete(s, "a", "1") == 4
    assert delete(s, "a", "nope") == 5
    assert contents(s) == {("a", "2"): (2, 2), ("a", "3"): (3, 3)}
    # The index follows the slot that was swapped into the hole.
    assert s.get("a", "3") is not None
    assert s.get("a", "1") is None
    put(s, "a", "1", 9)
    assert contents(s)[("a", "1")] == (6, 9)


def test_snapshot_is_the_state_at_its_seq_while_writes_continue() -> None:
    s = State()
    for i in range(3000):
        put(s, "c", f"k{i}", i)
    expected = contents(s)
    snap = s.snapshot()
    assert snap.seq == 3000
    got: dict[tuple[str, str], tuple[int, object]] = {}
    n = 0
    while not snap.done:
        for line in snap.read(2000):  # about 30 records a step
            f = msgspec.json.decode(line)
            got[(f["collection"], f["key"])] = (f["seq"], f["value"])
        # Between steps: overwrite, delete, re-insert, and insert new keys and collections.
        put(s, "c", f"k{n % 3000}", -1)
        delete(s, "c", f"k{(n * 7) % 3000}")
        put(s, "c", f"k{(n * 7) % 3000}", "back")
        put(s, "c", f"new{n}", n)
        put(s, f"other{n % 3}", "x", n)
        n += 1
    assert n > 10
    assert got == expected
    assert s.open_snapshots == 0


def test_concurrent_snapshots_each_see_their_own_seq() -> None:
    rng = random.Random(3)
    s = State()
    snaps: list[tuple[Snapshot, dict[tuple[str, str], tuple[int, object]]]] = []
    results = []
    partial: dict[Snapshot, dict[tuple[str, str], tuple[int, object]]] = {}
    for step in range(3000):
        key = f"k{rng.randrange(200)}"
        if rng.random() < 0.2:
            delete(s, "c", key)
        else:
            put(s, rng.choice(["c", "d"]), key, step)
        if step % 300 == 0:
            snap = s.snapshot()
            snaps.append((snap, contents(s)))
            partial[snap] = {}
        for snap, _ in snaps:
            if not snap.done:
                for line in snap.read(100):
                    f = msgspec.json.decode(line)
                    partial[snap][(f["collection"], f["key"])] = (f["seq"], f["value"])
    for snap, expected in snaps:
        partial[snap].update(read_all(snap))
        results.append(partial[snap] == expected)
    assert all(results)
    assert s.open_snapshots == 0


def test_filtered_snapshot() -> None:
    s = State()
    put(s, "a", "1", 1)
    put(s, "b", "1", 2)
    put(s, "c", "1", 3)
    got = read_all(s.snapshot(frozenset({"a", "c", "missing"})))
    assert got == {("a", "1"): (1, 1), ("c", "1"): (3, 3)}


def test_empty_snapshot_closes_at_once() -> None:
    s = State()
    snap = s.snapshot()
    assert snap.read(100) == []
    assert snap.done
    assert snap.count == 0


def test_versions_and_tombstones_are_released_with_the_last_snapshot() -> None:
    s = State()
    for i in range(100):
        put(s, "c", f"k{i}", i)
    snap = s.snapshot()
    for i in range(50):
        delete(s, "c", f"k{i}")
        put(s, "c", f"k{i + 50}", "new")
    coll = s.collections["c"]
    assert len(coll.slots) == 100  # tombstones hold their slots while the snapshot is open
    assert any(r.prev is not None for r in coll.slots)
    assert len(read_all(snap)) == 100
    assert len(coll.slots) == 50
    assert all(r.prev is None and not r.deleted for r in coll.slots)
    assert sorted(coll.index) == sorted(f"k{i}" for i in range(50, 100))
    assert all(coll.slots[pos].key == key for key, pos in coll.index.items())


def test_abandoned_snapshot_releases_on_close() -> None:
    s = State()
    put(s, "c", "k", 1)
    snap = s.snapshot()
    put(s, "c", "k", 2)
    snap.close()
    snap.close()  # idempotent
    assert s.open_snapshots == 0
    assert s.collections["c"].slots[0].prev is None
    assert snap.read(100) == []


def test_version_chains_stay_short_under_a_long_snapshot() -> None:
    s = State()
    put(s, "c", "hot", 0)
    old = s.snapshot()  # never read: the floor stays at seq 1
    for i in range(1000):
        put(s, "c", "hot", i)
    chain = 0
    head: Record | None = s.collections["c"].slots[0]
    while head is not None and head.prev is not None:
        chain += 1
        head = head.prev
    # Only the version the open snapshot needs is kept below the head.
    assert chain == 1
    mid = s.snapshot()
    for i in range(10):
        put(s, "c", "hot", f"after{i}")
    versions = []
    head = s.collections["c"].slots[0]
    while head is not None:
        versions.append(head.seq)
        head = head.prev
    assert versions == [1011, 1001, 1]  # head, the one for `mid`, the one for `old`
    assert read_all(mid) == {("c", "hot"): (1001, 999)}
    assert read_all(old) == {("c", "hot"): (1, 0)}


# -- reading in chunks: the quick path (slots unchanged since S) and the version walk --


def test_a_tombstone_kept_for_an_older_snapshot_is_not_sent() -> None:
    # Nothing is installed while `snap` streams, yet one of its slots holds a
    # tombstone that the older, still open snapshot keeps in place.
    s = State()
    for i in range(1000):  # several read slices
        put(s, "c", f"k{i}", i)
    older = s.snapshot()
    delete(s, "c", "k700")
    put(s, "c", "k5", "new")
    snap = s.snapshot()
    expected = contents(s)
    got = read_all(snap, step=3000)
    assert ("c", "k700") not in got
    assert got == expected
    assert snap.count == len(expected) == snap.total
    assert len(read_all(older)) == 1000


def test_writes_between_reads_fall_back_to_the_versions_at_s() -> None:
    s = State()
    for i in range(2000):
        put(s, "c", f"k{i}", i)
    expected = contents(s)
    snap = s.snapshot()
    got = {}
    first = snap.read(20_000)  # the quick path: nothing written since S
    for line in first:
        f = msgspec.json.decode(line)
        got[(f["collection"], f["key"])] = (f["seq"], f["value"])
    put(s, "c", "k1999", "late")  # in a slice not read yet
    put(s, "c", "k0", "late")  # in one already sent
    got.update(read_all(snap, step=20_000))
    assert got == expected


Op = tuple[str, int, int]
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 699), st.integers(0, 1)),
        st.tuples(st.just("delete"), st.integers(0, 699), st.integers(0, 1)),
        st.tuples(st.just("open"), st.just(0), st.just(0)),
        st.tuples(st.just("read"), st.integers(0, 3), st.sampled_from([1, 500, 8000, 1 << 20])),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 700), ops_st)
def test_every_snapshot_is_exact_at_its_seq_whatever_the_interleaving(
    initial: int, ops: list[Op]
) -> None:
    """Snapshots larger than one read slice, opened and read in any order between
    upserts and deletes: each returns exactly the state at its seq, each key once."""
    s = State()
    for i in range(initial):
        put(s, "ab"[i % 2], f"k{i}", i)
    open_: list[tuple[Snapshot, dict[tuple[str, str], tuple[int, object]]]] = []
    got: dict[Snapshot, dict[tuple[str, str], tuple[int, object]]] = {}

    def take(snap: Snapshot, lines: list[bytes]) -> None:
        for line in lines:
            f = msgspec.json.decode(line)
            key = (f["collection"], f["key"])
            assert key not in got[snap], f"{key} twice in one snapshot"
            got[snap][key] = (f["seq"], f["value"])

    for op, a, b in ops:
        if op == "put":
            put(s, "ab"[b], f"k{a}", op + str(s.seq))
        elif op == "delete":
            delete(s, "ab"[b], f"k{a}")
        elif op == "open":
            snap = s.snapshot()
            open_.append((snap, contents(s)))
            got[snap] = {}
        elif open_:
            snap = open_[a % len(open_)][0]
            take(snap, snap.read(b))
    for snap, expected in open_:
        while not snap.done:
            take(snap, snap.read(1 << 20))
        assert got[snap] == expected
        assert snap.count == len(expected)
    assert s.open_snapshots == 0


# (collection, key, value); a value of None is a delete.
_CHANGES = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from([f"k{i}" for i in range(12)]),
    st.one_of(st.none(), st.integers(0, 10**6)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_CHANGES, max_size=40),
    st.lists(
        st.tuples(
            st.integers(1, 400),  # bytes per read
            st.lists(_CHANGES, max_size=4),
        ),
        max_size=60,
    ),
)
def test_read_joined_is_read_joined(
    before: list[tuple[str, str, int | None]],
    steps: list[tuple[int, list[tuple[str, str, int | None]]]],
) -> None:
    """Snapshot.read_joined (the C join when built) gives exactly the frames read()
    gives, in the same order, while publishes overwrite, delete and re-create records
    under the two snapshots (versions, tombstones). Each step may cut the stream at
    another frame (read() takes whole chunks of slots), never inside one, and each
    returns at least one frame while any is left."""

    def change(c: str, k: str, v: int | None) -> Change:
        return Change(c, k, value=v) if v is not None else Change(c, k, delete=True)

    state = State()
    for c, k, v in before:
        state.apply(prepare_changes(change(c, k, v)))
    joined, listed = state.snapshot(), state.snapshot()
    blobs: list[bytes] = []
    lines: list[bytes] = []
    counted = 0
    for size, changes in steps:
        was_done = joined.done
        blob, count = joined.read_joined(size)
        assert count == blob.count(b"\n")
        assert count >= 1 or was_done or joined.done
        blobs.append(blob)
        counted += count
        lines += listed.read(size)
        if changes:
            state.apply(prepare_changes([change(c, k, v) for c, k, v in changes]))
    while not joined.done:
        blob, count = joined.read_joined(1 << 20)
        blobs.append(blob)
        counted += count
    while not listed.done:
        lines += listed.read(1 << 20)
    assert b"".join(blobs) == b"".join(lines)
    assert counted == len(lines) == joined.count == listed.count
