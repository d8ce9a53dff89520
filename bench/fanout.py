"""Fan-out: N subscribers on N TCP connections, one publisher, end to end.

Measures change deliveries per second, from the first publish until every subscriber
has every change, for statecast and (when installed) Redis pub/sub with the same
message count and size, in the same run.

    python bench/fanout.py [--subscribers 1000] [--changes 5000] [--value-size 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from common import (
    Counter,
    RedisProcess,
    StatecastProcess,
    cpu_seconds,
    encode,
    machine,
    new_loop,
    print_result,
)

REDIS_MARKER = b"*3\r\n$7\r\nmessage\r\n"


def value_of(size: int, i: int) -> dict[str, Any]:
    # A JSON value of about `size` bytes, like a small order record.
    v = {"i": i, "px": 101.25, "qty": 300, "side": "buy", "account": "EQ-LS-01", "pad": ""}
    v["pad"] = "x" * max(0, size - len(encode(v)))
    return v


async def connect_all(n: int, port: int, marker: bytes, hello: bytes) -> list[Counter]:
    loop = asyncio.get_running_loop()
    subs = []
    for _ in range(n):
        _, proto = await loop.create_connection(lambda: Counter(marker), "127.0.0.1", port)
        proto.transport.write(hello)  # type: ignore[union-attr]
        subs.append(proto)
    return subs


async def wait_counts(subs: list[Counter], target: int, until_bytes: bool = False) -> None:
    """Until every subscriber counted ``target`` markers (or got any byte)."""
    loop = asyncio.get_running_loop()
    waits = []
    for s in subs:
        s.target = target
        s.any_byte = until_bytes
        s.done = loop.create_future()
        if s.bytes if until_bytes else s.count >= target:
            s.done.set_result(None)
        waits.append(s.done)
    await asyncio.gather(*waits)


def fanout_result(
    n_subs: int, n_changes: int, elapsed: float, nbytes: int, server_cpu: float, **extra: Any
) -> dict[str, Any]:
    """The figures every fan-out run reports, in the same order."""
    return {
        "subscribers": n_subs,
        "changes": n_changes,
        **extra,
        "seconds": elapsed,
        "deliveries/s": n_subs * n_changes / elapsed,
        "MB/s to subscribers": nbytes / elapsed / 1e6,
        "server CPU (cores busy)": server_cpu,
    }


def change_lines(n_changes: int, batch: int, size: int) -> list[bytes]:
    """The publish requests of the fan-out benchmarks: batches of 200-byte-ish values."""
    lines = []
    for b in range(0, n_changes, batch):
        changes = [
            {"collection": "orders", "key": f"O-{i % 10_000}", "value": value_of(size, i)}
            for i in range(b, min(n_changes, b + batch))
        ]
        lines.append(encode({"op": "publish", "changes": changes}) + b"\n")
    return lines


async def publish_windowed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lines: list[bytes], window: int = 8
) -> None:
    """Send every line, with at most ``window`` unacknowledged."""
    acked = 0
    for i, line in enumerate(lines):
        writer.write(line)
        if i - acked >= window:
            await reader.readline()
            acked += 1


async def statecast_run(n_subs: int, n_changes: int, batch: int, size: int) -> dict[str, Any]:
    srv = StatecastProcess()
    try:
        subs = await connect_all(n_subs, srv.port, b"\n", b'{"op":"subscribe"}\n')
        await wait_counts(subs, 2)  # hello, subscribed
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        await reader.readline()
        lines = change_lines(n_changes, batch, size)
        frame_size = len(lines[0]) // batch
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(srv.pid)
        await publish_windowed(reader, writer, lines)
        await wait_counts(subs, 2 + n_changes)
        elapsed = time.perf_counter() - t0
        server_cpu = (cpu_seconds(srv.pid) - cpu0) / elapsed
        writer.close()
        for s in subs:
            s.transport.close()  # type: ignore[union-attr]
        return fanout_result(
            n_subs,
            n_changes,
            elapsed,
            sum(s.bytes for s in subs),
            server_cpu,
            **{"publish batch": batch, "change frame bytes (about)": frame_size},
        )
    finally:
        srv.stop()


async def redis_run(n_subs: int, n_changes: int, batch: int, size: int) -> dict[str, Any]:
    srv = RedisProcess()
    try:
        sub_cmd = b"*2\r\n$9\r\nSUBSCRIBE\r\n$6\r\norders\r\n"
        subs = await connect_all(n_subs, srv.port, REDIS_MARKER, sub_cmd)
        # Wait for every SUBSCRIBE confirmation before publishing.
        await wait_counts(subs, 0, until_bytes=True)
        _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        payloads = [encode(value_of(size, i)) for i in range(n_changes)]
        cmds = [
            b"*3\r\n$7\r\nPUBLISH\r\n$6\r\norders\r\n$%d\r\n%s\r\n" % (len(p), p) for p in payloads
        ]
        chunks = [b"".join(cmds[i : i + batch]) for i in range(0, n_changes, batch)]
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(srv.proc.pid)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        await wait_counts(subs, n_changes)
        elapsed = time.perf_counter() - t0
        server_cpu = (cpu_seconds(srv.proc.pid) - cpu0) / elapsed
        writer.close()
        for s in subs:
            s.transport.close()  # type: ignore[union-attr]
        return fanout_result(
            n_subs,
            n_changes,
            elapsed,
            sum(s.bytes for s in subs),
            server_cpu,
            **{"publish pipeline": batch},
        )
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    loop = new_loop()
    sc = loop.run_until_complete(
        statecast_run(args.subscribers, args.changes, args.batch, args.value_size)
    )
    print_result("statecast fan-out (TCP)", sc)
    if not args.no_redis:
        try:
            rd = loop.run_until_complete(
                redis_run(args.subscribers, args.changes, args.batch, args.value_size)
            )
        except FileNotFoundError as exc:
            print(f"== redis: skipped ({exc})")
        else:
            print_result("redis pub/sub", rd)
            print(f"== ratio statecast/redis: {sc['deliveries/s'] / rd['deliveries/s']:.2f}")
    loop.close()


if __name__ == "__main__":
    main()
