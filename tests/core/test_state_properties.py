"""Property: whatever the interleaving of publishes, syncs, stream steps, flushes,
disconnects and resumes, every client ends with exactly the server's state, having
seen each change once and in order (docs/protocol.md §5)."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecast.core.engine import Engine
from statecast.core.protocol import Change, prepare_changes
from statecast.stores.memory import MemoryStore
from tests.peer import Peer

KEYS = [f"k{i}" for i in range(8)]
COLLECTIONS = ["a", "b"]


class Replica:
    """What a careful client keeps: its copy of the state and its last seq."""

    def __init__(
        self,
        engine: Engine,
        selection: list[str] | None,
        history: dict[int, dict[tuple[str, str], Any]],
    ) -> None:
        self.engine = engine
        self.history = history  # the server's state after each seq
        self.selection = selection
        self.data: dict[tuple[str, str], Any] = {}
        self.seq = -1  # nothing applied yet
        self.epoch: str | None = None
        self.peer: Peer | None = None
        self._snapshot: dict[tuple[str, str], Any] | None = None
        self._snapshot_seq = -1
        self._snapshot_total = -1
        self.resyncs = 0

    def connect(self) -> None:
        self.peer = Peer(self.engine)
        req: dict[str, Any]
        if self.seq < 0:
            req = {"op": "sync", "live": True}
        else:
            req = {"op": "subscribe", "from": self.seq, "epoch": self.epoch}
        if self.selection is not None:
            req["collections"] = self.selection
        self.peer.send(req)
        self.read()

    def disconnect(self) -> None:
        if self.peer is not None:
            self.read()
            self.peer.session.close()
            self.peer = None

    def step(self, size: int) -> None:
        if self.peer is not None and self.peer.session.streaming:
            self.peer.session.pump(size)
            self.peer.collect()
            self.read()

    def read(self) -> None:
        assert self.peer is not None
        for f in self.peer.frames():
            t = f["type"]
            if t == "hello":
                assert f["epoch"] == self.engine.epoch
            elif t == "snapshot_begin":
                self._snapshot = {}
                self._snapshot_seq = f["seq"]
                self._snapshot_total = f["count"]
                self.epoch = f["epoch"]
            elif t == "record":
                assert self._snapshot is not None
                assert f["seq"] <= self._snapshot_seq, "a record newer than its snapshot"
                key = (f["collection"], f["key"])
                assert key not in self._snapshot, "a record twice in one snapshot"
                self._snapshot[key] = f["value"]
            elif t == "snapshot_end":
                assert self._snapshot is not None
                assert f["seq"] == self._snapshot_seq
                assert f["count"] == len(self._snapshot) == self._snapshot_total
                # Exactly the state after change S: nothing more, nothing less.
                assert self._snapshot == self.selected(self.history[f["seq"]])
                self.data, self._snapshot = self._snapshot, None
                self.seq = f["seq"]
            elif t == "subscribed":
                assert f["seq"] == self.seq
            elif t == "change":
                assert f["seq"] > self.seq, "change seqs only increase"
                if self.selection is None:
                    assert f["seq"] == self.seq + 1, "unfiltered seqs are consecutive"
                key = (f["collection"], f["key"])
                if f.get("deleted"):
                    self.data.pop(key, None)
                else:
                    self.data[key] = f["value"]
                self.seq = f["seq"]
            elif t == "error":
                assert f["code"] in ("resync_required", "slow_consumer"), f
                self.peer.session.close()
                self.seq = -1  # start over with a full sync
                self.resyncs += 1
                self.connect()
                return
            else:
                raise AssertionError(f"unexpected frame {f}")

    def selected(self, state: dict[tuple[str, str], Any]) -> dict[tuple[str, str], Any]:
        if self.selection is None:
            return state
        return {k: v for k, v in state.items() if k[0] in self.selection}


def server_contents(engine: Engine) -> dict[tuple[str, str], Any]:
    out = {}
    for coll in engine.store.state.collections.values():
        assert coll.lines == [r.line for r in coll.slots]  # kept beside the slots
        for rec in coll.records():
            out[(coll.name, rec.key)] = msgspec.json.decode(rec.line)["value"]
    return out


change = st.builds(
    lambda c, k, v, d: Change(c, k, delete=True) if d else Change(c, k, v),
    st.sampled_from(COLLECTIONS),
    st.sampled_from(KEYS),
    st.integers(0, 1000),
    st.booleans(),
)
action = st.one_of(
    st.tuples(st.just("publish"), st.lists(change, min_size=1, max_size=4)),
    st.tuples(st.just("step"), st.integers(0, 2), st.integers(1, 400)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reconnect"), st.integers(0, 2)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(change, max_size=30),
    actions=st.lists(action, max_size=60),
    retain=st.integers(1, 40),
)
def test_clients_always_end_with_the_exact_state(
    initial: list[Change], actions: list[tuple[Any, ...]], retain: int
) -> None:
    engine = Engine(MemoryStore(retain))
    history: dict[int, dict[tuple[str, str], Any]] = {0: {}}

    def publish(changes: list[Change]) -> None:
        # The model: apply one change at a time to a dict, remember each state.
        model = dict(history[engine.seq])
        seq = engine.seq
        for c in changes:
            seq += 1
            if c.delete:
                model.pop((c.collection, c.key), None)
            else:
                model[(c.collection, c.key)] = c.value
            history[seq] = dict(model)
        acks: list[object] = []
        engine.publish(prepare_changes(changes), acks.append)
        assert acks == [seq]
        assert server_contents(engine) == model

    for c in initial:
        publish([c])
    replicas = [Replica(engine, s, history) for s in (None, ["a"], None)]
    for r in replicas:
        r.connect()
    for act in actions:
        if act[0] == "publish":
            publish(act[1])
        elif act[0] == "step":
            replicas[act[1]].step(act[2])
        elif act[0] == "flush":
            engine.fanout.flush()
            for r in replicas:
                if r.peer is not None:
                    r.read()
        elif act[0] == "reconnect":
            r = replicas[act[1]]
            r.disconnect()
            r.connect()
    engine.fanout.flush()
    for r in replicas:
        while r.peer is not None and r.peer.session.streaming:
            r.step(1 << 20)
        engine.fanout.flush()
        assert r.peer is not None
        r.read()
        assert r.seq == engine.seq or r.selection is not None
        assert r.data == r.selected(history[engine.seq])
    for r in replicas:
        r.disconnect()
    server_contents(engine)  # tombstones removed with the last snapshot: lines too
    assert engine.store.state.open_snapshots == 0
    assert engine.fanout.subscriber_count == 0
