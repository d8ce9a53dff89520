"""The hand-off from producer threads to the loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from statecast.core.protocol import Change, PreparedChange, prepare_changes
from statecast.errors import ShuttingDown
from statecast.inbox import PublishInbox

Item = tuple[list[PreparedChange], concurrent.futures.Future[int]]


def test_bursts_from_threads_wake_the_loop_rarely_and_keep_each_threads_order() -> None:
    handled: list[list[Item]] = []
    seq = 0

    def handle(items: list[Item]) -> None:
        nonlocal seq
        handled.append(items)
        for batch, fut in items:
            seq += len(batch)
            fut.set_result(seq)

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        inbox: PublishInbox[list[PreparedChange]] = PublishInbox(loop, handle)
        results: list[list[int]] = [[] for _ in range(4)]

        def producer(n: int) -> None:
            for i in range(200):
                fut = inbox.put(prepare_changes([Change("c", f"{n}-{i}", i)]))
                results[n].append(fut.result(10))

        threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()

        def join_all() -> None:
            for t in threads:
                t.join()

        await asyncio.to_thread(join_all)
        inbox.close()
        with pytest.raises(ShuttingDown):
            inbox.put(prepare_changes([Change("c", "late", 0)]))
        return results

    results = asyncio.run(main())
    all_seqs = sorted(s for r in results for s in r)
    assert all_seqs == list(range(1, 801))
    assert all(r == sorted(r) for r in results)  # each thread's publishes in its order
    assert sum(len(items) for items in handled) == 800
