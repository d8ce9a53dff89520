"""WebSocket fan-out: N subscribers on /ws, one TCP publisher, end to end; then the same
over TCP in the same run, and the ratio.

    python bench/ws_fanout.py [--subscribers 1000] [--changes 5000] [--value-size 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp

from common import StatecastProcess, cpu_seconds, free_port, machine, new_loop, print_result
from fanout import change_lines, fanout_result, publish_windowed, statecast_run


async def ws_run(n_subs: int, n_changes: int, batch: int, size: int) -> dict[str, Any]:
    http_port = free_port()
    srv = StatecastProcess(http_port=http_port)
    counts = [0] * n_subs
    nbytes = [0] * n_subs
    done = asyncio.Event()
    remaining = n_subs

    async def subscriber(i: int, http: aiohttp.ClientSession, ready: asyncio.Event) -> None:
        nonlocal remaining
        async with http.ws_connect(f"http://127.0.0.1:{http_port}/ws", max_msg_size=0) as ws:
            await ws.send_str('{"op":"subscribe"}')
            async for msg in ws:
                data = msg.data
                if '"subscribed"' in data:
                    ready.set()
                    continue
                if '"hello"' in data:
                    continue
                counts[i] += data.count("\n") + 1
                nbytes[i] += len(data)
                if counts[i] >= n_changes:
                    remaining -= 1
                    if not remaining:
                        done.set()
                    return

    try:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as http:
            readies = [asyncio.Event() for _ in range(n_subs)]
            tasks = [asyncio.create_task(subscriber(i, http, readies[i])) for i in range(n_subs)]
            for r in readies:
                await r.wait()
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            await reader.readline()
            lines = change_lines(n_changes, batch, size)
            t0 = time.perf_counter()
            cpu0 = cpu_seconds(srv.pid)
            await publish_windowed(reader, writer, lines)
            await done.wait()
            elapsed = time.perf_counter() - t0
            server_cpu = (cpu_seconds(srv.pid) - cpu0) / elapsed
            writer.close()
            await asyncio.gather(*tasks)
        return fanout_result(
            n_subs, n_changes, elapsed, sum(nbytes), server_cpu, **{"publish batch": batch}
        )
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--value-size", type=int, default=200)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    loop = new_loop()
    ws = loop.run_until_complete(
        ws_run(args.subscribers, args.changes, args.batch, args.value_size)
    )
    print_result("statecast fan-out (WebSocket)", ws)
    tcp = loop.run_until_complete(
        statecast_run(args.subscribers, args.changes, args.batch, args.value_size)
    )
    print_result("statecast fan-out (TCP), same run", tcp)
    print(f"== ratio WebSocket/TCP: {ws['deliveries/s'] / tcp['deliveries/s']:.2f}")
    loop.close()


if __name__ == "__main__":
    main()
