"""Crash safety of the SQLite store: SIGKILL at random moments while clients publish.

After every restart: every acknowledged change is there, no batch is half there, and a
subscriber that was live before the crash resumes from its last seq, under the same
epoch, to exactly the state a fresh sync gives.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LineClient, ServeProcess, wait_for


class Publisher(threading.Thread):
    """Publishes batches of three changes until the server goes away; records acks."""

    def __init__(self, port: int, name: str, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.tag = name
        self.pause = pause  # seconds between an ack and the next publish
        self.acked: list[int] = []  # batch numbers acknowledged
        self.sent = 0

    def run(self) -> None:
        try:
            c = LineClient(self.port)
        except OSError:
            return
        with c:
            k = 0
            while True:
                k += 1
                batch = [
                    {"collection": "t", "key": f"{self.tag}-{k}-{part}", "value": k}
                    for part in "abc"
                ]
                try:
                    c.send({"op": "publish", "id": k, "changes": batch})
                    self.sent = k
                    reply = c.read()
                except (OSError, EOFError):
                    return
                assert reply["type"] == "ack", reply
                assert reply["id"] == k
                self.acked.append(k)
                if self.pause:
                    time.sleep(self.pause)


class Replica:
    """A live subscriber's copy of the state."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], Any] = {}
        self.seq = 0
        self.epoch = ""

    def apply(self, f: dict[str, Any]) -> None:
        if f["type"] != "change":
            return
        assert f["seq"] == self.seq + 1, f"gap or duplicate: {f['seq']} after {self.seq}"
        key = (f["collection"], f["key"])
        if f.get("deleted"):
            self.data.pop(key, None)
        else:
            self.data[key] = f["value"]
        self.seq = f["seq"]

    def follow(self, c: LineClient, stop: threading.Event) -> None:
        c.sock.settimeout(0.2)
        while not stop.is_set():
            try:
                self.apply(c.read())
            except TimeoutError:
                continue
            except (OSError, EOFError):
                return


def fresh_state(port: int) -> tuple[int, dict[tuple[str, str], Any]]:
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    return frames[-1]["seq"], {
        (f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"
    }


def crash_cycle(
    tmp_path: Path,
    args: tuple[str, ...],
    *,
    cycle: int,
    replica: Replica,
    rng: random.Random,
    acked: dict[str, set[int]],
    sent: dict[str, int],
) -> None:
    """One server life: the replica resumes, three clients publish, then SIGKILL at a
    random moment; records what each publisher had acked and sent."""
    server = ServeProcess(tmp_path, *args)
    try:
        # The replica resumes from where it was when the last server died.
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
                assert reply["type"] == "subscribed", reply  # no resync after a crash
                assert sub.hello["epoch"] == replica.epoch
            stop = threading.Event()
            follower = threading.Thread(target=replica.follow, args=(sub, stop), daemon=True)
            follower.start()
            pubs = [Publisher(server.port, f"c{cycle}p{n}") for n in range(3)]
            for p in pubs:
                p.start()
            wait_for(
                lambda pubs=pubs: all(p.acked for p in pubs),  # type: ignore[misc]
                "every publisher's first ack",
            )
            time.sleep(rng.uniform(0.0, 0.6))  # then die at a random moment
            server.p.send_signal(signal.SIGKILL)
            for p in pubs:
                p.join(10)
                acked[p.tag] = set(p.acked)
                sent[p.tag] = p.sent
            stop.set()
            follower.join(10)
    finally:
        server.stop(signal.SIGKILL)
    assert sum(len(p.acked) for p in pubs) > 0, "no publish was acknowledged in time"


def check_batches(
    data: dict[tuple[str, str], object], acked: dict[str, set[int]], sent: dict[str, int]
) -> None:
    """Every batch whole; every acked batch present; nothing present that was never
    sent (at most the one in flight at a kill is present without its ack)."""
    present: dict[tuple[str, int], set[str]] = {}
    for (_, key), _value in data.items():
        tag, num, part = key.rsplit("-", 2)
        present.setdefault((tag, int(num)), set()).add(part)
    for (tag, n), parts in present.items():
        assert parts == {"a", "b", "c"}, f"batch {tag}-{n} is partial: {parts}"
    for tag, ks in acked.items():
        missing = [k for k in ks if (tag, k) not in present]
        assert not missing, f"acknowledged batches of {tag} lost: {missing[:10]}"
        extra = {k for (t, k) in present if t == tag} - ks
        assert extra <= {sent[tag]}, f"{tag}: batches present that were never acked: {extra}"


@pytest.mark.slow
def test_sigkill_while_publishing_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(7)
    acked: dict[str, set[int]] = {}
    sent: dict[str, int] = {}
    replica = Replica()
    args = ("--store", "sqlite:crash.db", "--heartbeat", "0")
    for cycle in range(5):
        crash_cycle(tmp_path, args, cycle=cycle, replica=replica, rng=rng, acked=acked, sent=sent)

    server = ServeProcess(tmp_path, *args)
    try:
        seq, data = fresh_state(server.port)
        # The replica catches up from its last seq, and ends equal to a fresh sync.
        with LineClient(server.port) as sub:
            reply = sub.request({"op": "subscribe", "from": replica.seq, "epoch": replica.epoch})
            assert reply["type"] == "subscribed", reply
            while replica.seq < seq:
                replica.apply(sub.read())
        assert replica.data == data
    finally:
        code, output = server.stop()
    assert code == 0, output
    check_batches(data, acked, sent)
