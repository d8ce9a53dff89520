"""Filling a server with records over the TCP publish op (used by other benchmarks)."""

from __future__ import annotations

import socket
import time

from common import encode


def record_value(i: int, size: int) -> dict[str, object]:
    v: dict[str, object] = {
        "order_id": f"ORD-{i:08d}",
        "account": f"EQ-{i % 17:02d}",
        "px": 100 + (i % 1000) / 100,
        "qty": 100 * (1 + i % 50),
        "pad": "",
    }
    v["pad"] = "x" * max(0, size - len(encode(v)))
    return v


def publish_lines(n: int, batch: int, size: int, collection: str = "orders") -> list[bytes]:
    lines = []
    for b in range(0, n, batch):
        changes = [
            {"collection": collection, "key": f"O-{i:08d}", "value": record_value(i, size)}
            for i in range(b, min(n, b + batch))
        ]
        lines.append(encode({"op": "publish", "changes": changes}) + b"\n")
    return lines


def publish_all(port: int, lines: list[bytes], window: int = 8) -> float:
    """Send every publish line, keeping `window` unacknowledged; seconds taken."""
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    f.readline()  # hello
    t0 = time.perf_counter()
    acked = 0
    for i, line in enumerate(lines):
        s.sendall(line)
        while i - acked >= window:
            reply = f.readline()
            assert b'"ack"' in reply, reply
            acked += 1
    while acked < len(lines):
        reply = f.readline()
        assert b'"ack"' in reply, reply
        acked += 1
    elapsed = time.perf_counter() - t0
    f.close()
    s.close()
    return elapsed
