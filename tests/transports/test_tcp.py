"""The TCP transport's stream steps (transports/output.py): a syncing connection that is
alone in waiting for a turn streams bigger steps, several share the loop in small ones,
and the count of connections waiting is exact however connections end."""

from __future__ import annotations

import socket
import threading

from statecast import Change, Server
from statecast.transports import tcp
from tests.helpers import TIMEOUT, frames_of, wait_for


def read_sync(port: int, *, abort_after: int | None = None) -> int:
    """Sync everything; the records received (or stop early, with a reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b'{"op":"sync"}\n')
        buf = b""
        while b'"snapshot_end"' not in buf:
            data = s.recv(1 << 16)
            assert data
            buf += data
            if abort_after is not None and len(buf) > abort_after:
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                return -1
    return sum(1 for f in frames_of(buf[: buf.rindex(b"\n") + 1]) if f["type"] == "record")


def test_concurrent_syncs_are_whole_and_leave_no_step_counted(server: Server) -> None:
    for start in range(0, 20_000, 2_000):
        server.publish(
            [Change("c", f"k{i}", {"v": "x" * 100}) for i in range(start, start + 2_000)]
        )
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda: counts.append(read_sync(server.port))) for _ in range(4)
    ] + [
        threading.Thread(target=lambda: counts.append(read_sync(server.port, abort_after=200_000)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert sorted(counts) == [-1, -1, 20_000, 20_000, 20_000, 20_000]
    # Every scheduled step ran or was cancelled with its connection: nothing is left
    # counted as waiting (a leak would make a later lone sync take small steps).
    wait_for(lambda: not tcp._queued, "no stream step left counted")
