"""§3.3 idempotency keys and ``if_seq`` over real sockets, with the SQLite store: the
promise survives restarts and ``kill -9``; racing read-modify-writes lose nothing;
HTTP says the same as TCP. (The core's rules: tests/core/test_publish_guards.py; the
client's retries through a cutting proxy: tests/client/test_publish_retry.py.)"""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TIMEOUT, Frame, LineClient, ServeProcess, frames_of


def batch_of(n: int) -> list[dict[str, Any]]:
    """Batch ``n``: a fill of three changes (execution, order, position)."""
    return [
        {"collection": "executions", "key": f"E-{n}", "value": {"order": f"O-{n % 7}", "qty": n}},
        {"collection": "orders", "key": f"O-{n % 7}", "value": {"filled": n}},
        {"collection": "positions", "key": "ACC-1", "value": {"last": n}},
    ]


def publish_line(n: int) -> bytes:
    body = {"op": "publish", "id": n, "idempotency_key": f"fill-{n}", "changes": batch_of(n)}
    return json.dumps(body).encode() + b"\n"


def send_all_and_read_acks(port: int, numbers: list[int]) -> dict[int, Frame]:
    """Pipeline the publishes, read every answer (a dead server ends the reading)."""
    acks: dict[int, Frame] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"".join(publish_line(n) for n in numbers))
        buf = b""
        while len(acks) < len(numbers):
            try:
                data = sock.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for frame in frames_of(b"\n".join(lines) + b"\n" if lines else b""):
                if frame["type"] in ("ack", "error"):
                    acks[frame["id"]] = frame
    return acks


def dump(port: int) -> tuple[int, dict[tuple[str, str], Any]]:
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    return frames[-1]["seq"], {
        (f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"
    }


def expected_state(numbers: range) -> dict[tuple[str, str], Any]:
    state: dict[tuple[str, str], Any] = {}
    for n in numbers:
        for c in batch_of(n):
            state[(c["collection"], c["key"])] = c["value"]
    return state


def test_retries_after_kill9_are_applied_exactly_once(tmp_path: Path) -> None:
    total = 300
    numbers = list(range(1, total + 1))
    rng = random.Random(14)
    first_acks: dict[int, Frame] = {}
    for _ in range(3):  # three kills, each at a random point of a pipelined flood
        proc = ServeProcess(tmp_path, "--store", "sqlite")
        killer = threading.Timer(rng.uniform(0.005, 0.05), proc.p.send_signal, (signal.SIGKILL,))
        killer.start()
        acks = send_all_and_read_acks(proc.port, numbers)
        killer.join()
        proc.stop(signal.SIGKILL)
        for n, frame in acks.items():
            if frame["type"] == "ack":
                first_acks.setdefault(n, frame)
    # The publisher retries everything, whatever it heard.
    proc = ServeProcess(tmp_path, "--store", "sqlite")
    try:
        acks = send_all_and_read_acks(proc.port, numbers)
        assert all(frame["type"] == "ack" for frame in acks.values()), acks
        assert sorted(acks) == numbers
        # What was acknowledged before the kills comes back as a duplicate, same seq.
        for n, frame in first_acks.items():
            assert acks[n] == {**frame, "duplicate": True}
        seq, state = dump(proc.port)
        assert seq == 3 * total  # every batch applied once: three seqs each, no more
        assert sorted(frame["seq"] for frame in acks.values()) == list(range(3, seq + 1, 3))
        assert state == expected_state(range(1, total + 1))
    finally:
        proc.stop()


def test_keys_survive_a_restart_and_the_window_is_a_setting(tmp_path: Path) -> None:
    proc = ServeProcess(tmp_path, "--store", "sqlite", "--dedupe-window", "600")
    try:
        assert send_all_and_read_acks(proc.port, [1]) == {1: {"type": "ack", "seq": 3, "id": 1}}
    finally:
        proc.stop()
    proc = ServeProcess(tmp_path, "--store", "sqlite")
    try:
        acks = send_all_and_read_acks(proc.port, [1, 2])
        assert acks == {
            1: {"type": "ack", "seq": 3, "id": 1, "duplicate": True},
            2: {"type": "ack", "seq": 6, "id": 2},
        }
    finally:
        proc.stop()


def read_counter(c: LineClient) -> tuple[int, int]:
    c.send({"op": "sync", "collections": ["counters"]})
    frames = c.read_until("snapshot_end")
    rec = next((f for f in frames if f["type"] == "record" and f["key"] == "n"), None)
    return (0, 0) if rec is None else (rec["seq"], rec["value"])


def test_racing_read_modify_writes_with_if_seq_lose_no_increment(tmp_path: Path) -> None:
    proc = ServeProcess(tmp_path, "--store", "sqlite")
    per_writer = 60
    successes = [0, 0]
    conflicts = [0, 0]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            with LineClient(proc.port) as c:
                while successes[i] < per_writer:
                    seq, value = read_counter(c)
                    answer = c.request(
                        {
                            "op": "publish",
                            "id": 1,
                            "changes": [
                                {
                                    "collection": "counters",
                                    "key": "n",
                                    "value": value + 1,
                                    "if_seq": seq,
                                }
                            ],
                        }
                    )
                    if answer["type"] == "ack":
                        successes[i] += 1
                    else:
                        assert answer["code"] == "conflict", answer
                        assert answer["change"] == 0
                        assert answer["current_seq"] > seq
                        conflicts[i] += 1
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 6)
        assert not errors, errors
        with LineClient(proc.port) as c:
            seq, value = read_counter(c)
        assert value == sum(successes) == 2 * per_writer
        assert seq == 2 * per_writer  # one seq per successful increment, none for conflicts
    finally:
        proc.stop()


def http_post(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/publish",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def http_server(tmp_path: Path) -> Any:
    http_port = free_http_port()
    proc = ServeProcess(tmp_path, "--store", "memory", "--http-port", str(http_port))
    yield proc, http_port
    proc.stop()


def free_http_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_http_publish_takes_keys_and_preconditions(http_server: Any) -> None:
    _, port = http_server
    change = {"collection": "orders", "key": "O-1", "value": {"qty": 1}, "if_seq": 0}
    body = {"idempotency_key": "k-1", "changes": [change]}
    assert http_post(port, body) == (200, {"type": "ack", "seq": 1})
    assert http_post(port, body) == (200, {"type": "ack", "seq": 1, "duplicate": True})
    status, answer = http_post(port, {"changes": [change]})
    assert status == 409
    assert answer["code"] == "conflict"
    assert (answer["change"], answer["current_seq"]) == (0, 1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"idempotency_key": "x" * 300, "changes": [change]}, "idempotency_key"),
        ({"changes": [{**change, "if_seq": -2}]}, "if_seq"),
        (
            {"changes": [{"collection": "orders", "key": "O-1", "delete": True, "if_seq": 0}]},
            "if_seq",
        ),
    ]
    for bad, field in cases:
        status, answer = http_post(port, bad)
        assert status == 400
        assert answer["code"] == "bad_request"
        assert field in answer["message"]
