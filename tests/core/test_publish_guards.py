"""§3.3 idempotency keys and ``if_seq`` preconditions, in the core (no sockets).

The engine decides a publish (its key, its conditions) against the state it will be
applied on. With a store that commits later (SQLite, NATS), batches submitted and
not yet committed are taken into account: a publish that depends on one waits for
it. ``LaterStore`` below is such a store whose commits the test releases by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from statecast.core.dedupe import Dedupe
from statecast.core.engine import Duplicate, Engine, _InFlight
from statecast.core.protocol import (
    Change,
    Conditions,
    PreparedChange,
    conditions_of,
    parse_publish_body,
    parse_request,
    prepare_publish,
)
from statecast.core.state import encode_batch
from statecast.core.store import Committed, KeyStamp
from statecast.errors import BadRequest, Conflict, ProtocolError, Unavailable
from statecast.stores.memory import MemoryStore
from tests.peer import Peer, new_engine


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class LaterStore(MemoryStore):
    """A memory store whose batches commit when the test says (like SQLite's writer)."""

    commits_at_once = False

    def __init__(self) -> None:
        super().__init__(1000)
        self.held: list[tuple[Sequence[PreparedChange], Committed, KeyStamp | None]] = []
        self.keys_committed: list[KeyStamp] = []

    def submit(
        self,
        batch: Sequence[PreparedChange],
        done: Committed,
        key: KeyStamp | None = None,
        conditions: Conditions | None = None,
    ) -> None:
        self.held.append((batch, done, key))

    def commit(self, n: int = 1, *, fail: bool = False) -> None:
        """Commit (or fail) the ``n`` oldest batches held, in order."""
        for _ in range(n):
            batch, done, key = self.held.pop(0)
            if fail:
                done(None, Unavailable("the store cannot be written"))
                continue
            # Seqs follow what is committed: the engine installs before the next one.
            if key is not None:
                self.keys_committed.append(key)
            done(encode_batch(batch, self.state.seq + 1), None)


Results = list[int | ProtocolError]


def publish(
    engine: Engine, *changes: Change, key: str | None = None, results: Results | None = None
) -> Results:
    """Publish; the results list gets the answer (at once, or when the store commits)."""
    out: Results = [] if results is None else results
    p = prepare_publish(list(changes), idempotency_key=key)
    engine.publish(p.batch, out.append, conditions=p.conditions, key=p.key)
    return out


def value(engine: Engine, key: str) -> Any:
    rec = engine.store.state.get("c", key)
    return None if rec is None else rec.value_json()


# -- preconditions ------------------------------------------------------------------------


def test_if_seq_holds_or_nothing_of_the_batch_is_applied() -> None:
    engine = new_engine()
    (s1,) = publish(engine, Change("c", "a", 1, if_seq=0))
    assert s1 == 1
    (s2,) = publish(engine, Change("c", "a", 2, if_seq=1), Change("c", "b", 1, if_seq=0))
    assert s2 == 3
    # The second condition fails: the first change is not applied either.
    (err,) = publish(engine, Change("c", "b", 9), Change("c", "a", 3, if_seq=1))
    assert isinstance(err, Conflict)
    assert (err.change, err.current_seq) == (1, 2)
    assert "changes[1]: c/'a' is at seq 2, not 1 (if_seq)" in err.message
    assert engine.seq == 3
    assert (value(engine, "a"), value(engine, "b")) == (b"2", b"1")
    assert engine.conflicts == 1


def test_if_seq_zero_means_the_record_must_not_exist() -> None:
    engine = new_engine()
    publish(engine, Change("c", "a", 1))
    (err,) = publish(engine, Change("c", "a", 2, if_seq=0))
    assert isinstance(err, Conflict)
    assert err.current_seq == 1
    assert "exists (at seq 1), and if_seq 0 says it must not" in err.message
    # Deleted, it does not exist: 0 holds again, and a delete may name its seq.
    (s,) = publish(engine, Change("c", "a", delete=True, if_seq=1))
    assert s == 2
    (s,) = publish(engine, Change("c", "a", 3, if_seq=0))
    assert s == 3
    (err,) = publish(engine, Change("c", "missing", 1, if_seq=5))
    assert isinstance(err, Conflict)
    assert err.current_seq == 0
    assert "does not exist, and if_seq says it is at seq 5" in err.message


def test_if_seq_zero_holds_for_a_record_deleted_under_an_open_snapshot() -> None:
    """A deleted record stays in its collection as a tombstone while a snapshot is
    open: it does not exist for if_seq."""
    engine = new_engine()
    publish(engine, Change("c", "a", 1), Change("c", "b", 1))
    snap = engine.snapshot(None)
    publish(engine, Change("c", "a", delete=True))
    (err,) = publish(engine, Change("c", "a", 2, if_seq=0), Change("c", "b", 2, if_seq=0))
    assert isinstance(err, Conflict)
    assert (err.change, err.current_seq) == (1, 2)
    (s,) = publish(engine, Change("c", "a", 2, if_seq=0), Change("c", "new", 1, if_seq=0))
    assert s == 5
    snap.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"collection": "c", "key": "k", "value": 1, "if_seq": -1}, "if_seq"),
        ({"collection": "c", "key": "k", "value": 1, "if_seq": 1.5}, "if_seq"),
        ({"collection": "c", "key": "k", "value": 1, "if_seq": True}, "if_seq"),
        ({"collection": "c", "key": "k", "value": 1, "if_seq": "3"}, "if_seq"),
        ({"collection": "c", "key": "k", "delete": True, "if_seq": 0}, "must not exist"),
    ],
)
def test_bad_if_seq_is_a_bad_request_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        prepare_publish([change])
    line = (
        b'{"op":"publish","changes":[%s]}'
        % str(change).replace("'", '"').replace("True", "true").encode()
    )
    with pytest.raises(BadRequest, match=r"changes\[0\]\.if_seq|\$\.changes\[0\]\.if_seq"):
        conditions_of(parse_request(line).changes)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "length >= 1"),
        ("x" * 257, "length <= 256"),
        (5, "got `int`"),
        (["k"], "got `array`"),
    ],
)
def test_bad_idempotency_keys_are_bad_requests(key: object, message: str) -> None:
    import msgspec  # noqa: PLC0415

    body = msgspec.json.encode(
        {"idempotency_key": key, "changes": [{"collection": "c", "key": "k", "value": 1}]}
    )
    with pytest.raises(BadRequest, match=rf"{message}.*idempotency_key"):
        parse_publish_body(body)
    with pytest.raises(BadRequest, match="idempotency_key"):
        prepare_publish([Change("c", "k", 1)], idempotency_key=key)  # type: ignore[arg-type]


@pytest.mark.parametrize("escaped", [b"a\\ud800", b"\\udc00b", "\u00e9t\u00e9".encode()])
def test_idempotency_keys_must_be_valid_unicode_text_over_the_wire(escaped: bytes) -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    peer.send(
        b'{"op":"publish","id":1,"idempotency_key":"' + escaped + b'",'
        b'"changes":[{"collection":"c","key":"k","value":1}]}\n'
    )
    (frame,) = peer.frames()
    if escaped.isascii():  # a lone surrogate: msgspec refuses the line
        assert frame["code"] == "bad_request"
        assert "surrogate" in frame["message"]
        assert engine.seq == 0
    else:
        assert frame == {"type": "ack", "seq": 1, "id": 1}


def test_a_conditional_publish_waits_for_batches_in_flight_on_its_records() -> None:
    store = LaterStore()
    engine = Engine(store)
    first = publish(engine, Change("c", "a", 1))
    publish(engine, Change("c", "a", 2))  # in flight, unconditional: not tracked yet
    guarded = publish(engine, Change("c", "a", 3, if_seq=2))
    later = publish(engine, Change("c", "b", 1))  # after it, waits behind it: order holds
    assert first == guarded == later == []
    assert len(store.held) == 2
    store.commit(2)
    # Now decided against seq 2, and submitted, and the one behind it too.
    assert len(store.held) == 2
    store.commit(2)
    assert guarded == [3]
    assert later == [4]
    assert value(engine, "a") == b"3"


def test_racing_conditional_publishes_on_one_record_one_wins() -> None:
    store = LaterStore()
    engine = Engine(store)
    publish(engine, Change("c", "n", 0))
    store.commit()
    a = publish(engine, Change("c", "n", 1, if_seq=1))
    b = publish(engine, Change("c", "n", 1, if_seq=1))  # read the same seq: must lose
    c = publish(engine, Change("c", "other", 1, if_seq=0))  # behind b, in order
    assert len(store.held) == 1  # b waits for a's commit: it writes the record b names
    store.commit()
    assert a == [2]
    assert len(b) == 1
    assert isinstance(b[0], Conflict)
    assert b[0].current_seq == 2
    store.commit()
    assert c == [3]


def test_a_failed_batch_lets_the_conditional_behind_it_decide_on_the_old_state() -> None:
    store = LaterStore()
    engine = Engine(store)
    publish(engine, Change("c", "a", 1))
    store.commit()
    doomed = publish(engine, Change("c", "a", 2, if_seq=1))
    after = publish(engine, Change("c", "a", 3, if_seq=1))
    store.commit(fail=True)
    assert isinstance(doomed[0], Unavailable)
    store.commit()
    assert after == [2]


# -- idempotency keys ---------------------------------------------------------------------


def test_a_key_seen_before_is_answered_with_the_first_ack_and_not_applied() -> None:
    engine = new_engine()
    (s,) = publish(engine, Change("c", "a", 1), Change("c", "b", 1), key="fill-1")
    assert s == 2
    assert not isinstance(s, Duplicate)
    publish(engine, Change("c", "z", 1))
    (again,) = publish(engine, Change("c", "a", 1), Change("c", "b", 1), key="fill-1")
    assert isinstance(again, Duplicate)
    assert again == 2
    assert engine.seq == 3
    assert engine.duplicates == 1
    (other,) = publish(engine, Change("c", "a", 5), key="fill-2")
    assert other == 4


def test_a_retry_while_the_first_is_committing_waits_for_its_outcome() -> None:
    store = LaterStore()
    engine = Engine(store)
    first = publish(engine, Change("c", "a", 1), key="k")
    retry = publish(engine, Change("c", "a", 1), key="k")
    assert len(store.held) == 1  # the retry is not submitted
    store.commit()
    assert first == [1]
    assert retry == [1]
    assert isinstance(retry[0], Duplicate)
    assert store.keys_committed == [("k", engine.clock())] or store.keys_committed[0][0] == "k"


def test_a_retry_after_the_first_failed_is_applied() -> None:
    store = LaterStore()
    engine = Engine(store)
    first = publish(engine, Change("c", "a", 1), key="k")
    retry = publish(engine, Change("c", "a", 1), key="k")
    store.commit(fail=True)
    assert isinstance(first[0], Unavailable)
    assert len(store.held) == 1
    store.commit()
    assert retry == [1]
    assert not isinstance(retry[0], Duplicate)


def test_keys_are_kept_for_the_window_and_at_least_the_newest_n() -> None:
    clock = Clock()
    d = Dedupe(window=60, keep=3)
    for i in range(5):
        d.add(f"k{i}", i + 1, clock.now)
    assert all(d.seq_of(f"k{i}", clock.now) == i + 1 for i in range(5))  # all in the window
    clock.now += 61
    assert d.seq_of("k0", clock.now) is None  # past the window, not among the 3 newest
    assert [d.seq_of(f"k{i}", clock.now) for i in range(2, 5)] == [3, 4, 5]
    assert len(d) == 3
    d.add("k5", 6, clock.now)
    assert d.seq_of("k2", clock.now) is None
    assert d.seq_of("k5", clock.now) == 6


def test_the_engine_forgets_keys_past_the_window() -> None:
    clock = Clock()
    engine = Engine(MemoryStore(1000), dedupe_window=10, dedupe_keep=0, clock=clock)
    publish(engine, Change("c", "a", 1), key="k")
    clock.now += 5
    assert isinstance(publish(engine, Change("c", "a", 1), key="k")[0], Duplicate)
    clock.now += 6
    (s,) = publish(engine, Change("c", "a", 1), key="k")
    assert s == 2
    assert not isinstance(s, Duplicate)


def test_ack_frames_say_duplicate_and_conflicts_name_the_change() -> None:
    engine = new_engine()
    peer = Peer(engine)
    peer.frames()
    body = b'"changes":[{"collection":"c","key":"a","value":1,"if_seq":0}]'
    peer.send(b'{"op":"publish","id":1,"idempotency_key":"k",' + body + b"}\n")
    peer.send(b'{"op":"publish","id":2,"idempotency_key":"k",' + body + b"}\n")
    peer.send(b'{"op":"publish","id":3,' + body + b"}\n")
    assert peer.frames() == [
        {"type": "ack", "seq": 1, "id": 1},
        {"type": "ack", "seq": 1, "id": 2, "duplicate": True},
        {
            "type": "error",
            "code": "conflict",
            "message": "changes[0]: c/'a' exists (at seq 1), and if_seq 0 says it must not; "
            "nothing of the batch was applied",
            "id": 3,
            "change": 0,
            "current_seq": 1,
        },
    ]


# -- atomicity, by property -----------------------------------------------------------------

KEYS = ["a", "b", "c", "d"]
change_st = st.tuples(
    st.sampled_from(KEYS),
    st.one_of(st.none(), st.integers(0, 5)),  # value, or None: a delete
    # if_seq: none; the seq the publisher reads from the state now (as a client reads
    # its replica: batches in flight are not in it yet); or any seq.
    st.one_of(st.none(), st.just("read"), st.integers(0, 12)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(change_st, min_size=1, max_size=4), min_size=1, max_size=25),
    commit_every=st.integers(1, 4),
)
def test_a_batch_with_a_failing_precondition_is_invisible_to_every_reader(
    batches: list[list[tuple[str, int | None, int | str | None]]], commit_every: int
) -> None:
    """Against a model: a batch applies whole when every if_seq holds on the state it
    is applied on, else not at all; a live subscriber, the state and the log see the
    same. Commits are released in bunches, so that batches wait on each other."""
    store = LaterStore()
    engine = Engine(store)
    peer = Peer(engine)
    peer.send({"op": "subscribe"})
    sent: list[list[tuple[str, int | None, int | None]]] = []
    outcomes: list[Results] = []
    for n, spec in enumerate(batches):
        changes = []
        used: list[tuple[str, int | None, int | None]] = []
        for key, val, choice in spec:
            if choice == "read":
                rec = engine.store.state.get("c", key)
                if_seq: int | None = 0 if rec is None else rec.seq
            else:
                if_seq = None if isinstance(choice, str) else choice
            if val is None and if_seq == 0:
                if_seq = None  # a bad request, tested above
            used.append((key, val, if_seq))
            changes.append(
                Change("c", key, delete=True, if_seq=if_seq)
                if val is None
                else Change("c", key, val, if_seq=if_seq)
            )
        sent.append(used)
        outcomes.append(publish(engine, *changes))
        if n % commit_every == 0:
            store.commit(len(store.held))
    while store.held:
        store.commit(len(store.held))
    # Replay the model in the order the engine decided (arrival order).
    model: dict[str, tuple[int, int]] = {}  # key -> (seq, value)
    seq = 0
    for used, result in zip(sent, outcomes, strict=True):
        (answer,) = result
        holds = all(
            if_seq is None or model.get(key, (0, 0))[0] == if_seq for key, _, if_seq in used
        )
        if not holds:
            assert isinstance(answer, Conflict)
            continue
        assert answer == seq + len(used)
        for key, val, _ in used:
            seq += 1
            if val is None:
                model.pop(key, None)
            else:
                model[key] = (seq, val)
    assert engine.seq == seq
    coll = engine.store.state.collections.get("c")
    records = [] if coll is None else coll.records()
    assert {r.key: (r.seq, int(r.value_json() or b"")) for r in records} == model
    check_subscriber(engine, peer, seq, model)


def check_subscriber(
    engine: Engine, peer: Peer, seq: int, model: dict[str, tuple[int, int]]
) -> None:
    """The subscriber got every applied change once, no other, and holds the model."""
    engine.fanout.flush()
    peer.collect()
    copy: dict[str, tuple[int, int]] = {}
    seen: list[int] = []
    for f in peer.frames():
        if f["type"] != "change":
            continue
        seen.append(f["seq"])
        if f.get("deleted"):
            copy.pop(f["key"], None)
        else:
            copy[f["key"]] = (f["seq"], f["value"])
    assert seen == list(range(1, seq + 1))
    assert copy == model


def test_a_record_written_by_two_batches_in_flight_stays_held_until_both_commit() -> None:
    inflight = _InFlight()
    a = {"c": {"k", "a"}}
    b = {"c": {"k", "b"}, "d": {"x"}}
    inflight.hold(a)
    inflight.hold(b)
    inflight.let_go(a)
    assert inflight.touches({"c": {"k"}})
    assert not inflight.touches({"c": {"a"}})
    assert inflight.touches({"d": {"x", "y"}})
    inflight.let_go(b)
    assert not inflight.touches({"c": {"k", "a", "b"}, "d": {"x"}})
    assert not inflight
