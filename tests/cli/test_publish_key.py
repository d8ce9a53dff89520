"""``statecast publish --idempotency-key`` and ``--if-seq`` (issue 14, protocol
§3.3.1, §3.3.2), run as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tests.helpers import CMD, TIMEOUT, LineClient, ServeProcess, free_port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    srv = ServeProcess(tmp_path, "--port", str(free_port()))
    yield srv
    if srv.p.poll() is None:
        srv.stop(signal.SIGKILL)


def publish(
    server: ServeProcess, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STATECAST_URL=f"tcp://127.0.0.1:{server.port}")
    return subprocess.run(
        [*CMD, "publish", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        env=env,
        check=False,
    )


def seq_of(server: ServeProcess) -> int:
    with LineClient(server.port) as c:
        return int(c.hello["seq"])


def test_the_same_key_twice_is_applied_once(server: ServeProcess) -> None:
    r = publish(server, "--idempotency-key", "fill-1", "orders", "O-1", '{"qty": 1}')
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
    assert "duplicate" not in r.stderr
    r = publish(server, "--idempotency-key", "fill-1", "orders", "O-1", '{"qty": 1}')
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr  # the original seq
    assert "duplicate: already applied at seq 1" in r.stderr
    assert "nothing was applied again" in r.stderr
    assert seq_of(server) == 1
    # Without a key, each run is a publish of its own.
    assert publish(server, "orders", "O-1", '{"qty": 1}').stdout == "2\n"


def test_if_seq_and_conflicts(server: ServeProcess) -> None:
    assert publish(server, "--if-seq", "0", "orders", "O-1", "1").stdout == "1\n"
    r = publish(server, "--if-seq", "0", "orders", "O-1", "2")
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    assert "conflict: changes[0]: orders/'O-1' exists (at seq 1)" in r.stderr
    assert "nothing of the batch was applied" in r.stderr
    assert publish(server, "--if-seq", "1", "orders", "O-1", "2").stdout == "2\n"
    assert publish(server, "--if-seq", "1", "--delete", "orders", "O-1").returncode == 3
    r = publish(server, "--if-seq", "2", "--delete", "orders", "O-1")
    assert (r.returncode, r.stdout) == (0, "3\n"), r.stderr
    assert seq_of(server) == 3


def test_usage_errors(server: ServeProcess) -> None:
    r = publish(server, "--if-seq", "0", "--delete", "orders", "O-1")
    assert r.returncode == 2
    assert "--if-seq" in r.stderr
    assert "must not exist" in r.stderr
    r = publish(server, "--if-seq", "-1", "orders", "O-1", "1")
    assert r.returncode == 2
    assert "--if-seq" in r.stderr
    r = publish(server, "--ndjson", "--if-seq", "1", stdin="")
    assert r.returncode == 2
    assert '"if_seq" on each line' in r.stderr
    r = publish(server, "--idempotency-key", "k" * 257, "orders", "O-1", "1")
    assert r.returncode == 2
    assert "--idempotency-key" in r.stderr
    assert seq_of(server) == 0
    help_text = publish(server, "--help").stdout
    assert "Exit status" in help_text
    assert "3  conflict" in help_text


def test_ndjson_runs_again_with_the_same_key_are_duplicates(server: ServeProcess) -> None:
    lines = "".join(
        msgspec.json.encode({"collection": "fills", "key": f"F-{i}", "value": i}).decode() + "\n"
        for i in range(25)
    )
    args = ("--ndjson", "--batch", "10", "--idempotency-key", "import-7")
    r = publish(server, *args, stdin=lines)
    assert (r.returncode, r.stdout) == (0, "25\n"), r.stderr
    assert "duplicates" not in r.stderr
    r = publish(server, *args, stdin=lines)
    assert (r.returncode, r.stdout) == (0, "25\n"), r.stderr
    assert "(3 of 3 batches were duplicates)" in r.stderr
    assert seq_of(server) == 25
    stale = '{"collection":"fills","key":"F-0","value":-1,"if_seq":99}\n'
    r = publish(server, "--ndjson", "--batch", "10", stdin=lines + stale)
    assert r.returncode == 3, r.stderr
    assert "conflict: batch 3: changes[5]: fills/'F-0' is at seq 26, not 99" in r.stderr
    assert seq_of(server) == 45  # batches 1 and 2 applied, not batch 3
