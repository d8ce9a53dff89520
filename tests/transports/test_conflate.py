"""Conflation over real sockets (§3.9, §7): a conflated replica follows a firehose
and ends equal to the state; under ``--slow-consumer conflate`` a subscriber that reads
slowly stays connected and converges."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec

import statecast
from statecast import Change, Server
from tests.helpers import TIMEOUT, LineClient, frames_of


def fresh_state(port: int) -> tuple[int, dict[tuple[str, str], object]]:
    with LineClient(port) as c:
        c.send({"op": "sync"})
        frames = c.read_until("snapshot_end")
    return frames[-1]["seq"], {
        (f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"
    }


def test_a_conflated_replica_follows_a_firehose_and_ends_exact() -> None:
    srv = Server(store="memory", http_port=None, port=0, heartbeat=0.2).start_in_thread()
    try:
        stop = threading.Event()

        def firehose() -> None:
            i = 0
            while not stop.is_set() and i < 20_000:
                srv.publish([Change("quotes", f"S{i % 20}", {"px": i}) for _ in range(1)])
                i += 1

        async def main() -> tuple[int, int, dict[str, object]]:
            async with statecast.Replica(f"tcp://127.0.0.1:{srv.port}", conflate=0.05) as replica:
                await replica.wait_synced()
                t = threading.Thread(target=firehose)
                t.start()
                await asyncio.to_thread(t.join)
                seq = srv.seq
                changes = replica.changes()
                async with asyncio.timeout(TIMEOUT):
                    while replica.seq < seq:  # each change wakes this up; none is lost
                        await anext(changes)
                assert replica.status == "live"
                return replica.changes_applied, replica.full_syncs, dict(replica["quotes"])

        applied, full_syncs, quotes = asyncio.run(main())
        _, state = fresh_state(srv.port)
        assert quotes == {k: v for (c, k), v in state.items() if c == "quotes"}
        assert full_syncs == 1  # seqs skip, and that is not taken for a gap
        assert applied < 20_000  # conflated: fewer frames than changes
    finally:
        srv.stop_in_thread()


def test_a_slow_reader_is_conflated_not_cut_off_and_converges() -> None:
    srv = Server(
        store="memory",
        http_port=None,
        port=0,
        heartbeat=None,
        max_pending=64 * 1024,
        slow_consumer="conflate",
    ).start_in_thread()
    try:
        with LineClient(srv.port, rcvbuf=4096) as slow:
            slow.send({"op": "subscribe"})
            assert slow.read_until("subscribed")[-1]["type"] == "subscribed"
            # Flood while it does not read: it falls behind by far more than 64 KiB
            # (and more than the kernel's socket buffers hold).
            i = 0
            deadline = time.monotonic() + TIMEOUT * 3
            while not any(c.session is not None and c.session.degraded for c in srv.connections):
                assert time.monotonic() < deadline, "the slow subscriber was never conflated"
                srv.publish([Change("q", f"k{j}", {"i": i, "pad": "x" * 500}) for j in range(30)])
                i += 1
            for n in range(i, i + 20):  # more changes while conflated
                srv.publish([Change("q", f"k{j}", {"i": n}) for j in range(30)])
            final_seq = srv.seq
            # Now it reads: everything buffered, the conflated state, then every change.
            copy: dict[str, object] = {}
            seen: list[str] = []
            deadline = time.monotonic() + TIMEOUT * 3
            seq = 0
            while time.monotonic() < deadline:
                f = slow.read()
                seen.append(f["type"])
                assert f["type"] != "error", f
                if f["type"] == "change":
                    assert f["seq"] > seq
                    seq = f["seq"]
                    copy[f["key"]] = f.get("value")
                if f["type"] == "conflating" and not f["on"]:
                    break
            assert "conflating" in seen
            _, state = fresh_state(srv.port)
            assert copy == {k: v for (_, k), v in state.items()}
            assert seq <= final_seq
            srv.publish([Change("q", "after", 1)])  # every change again, one by one
            f = slow.read()
            assert (f["type"], f["seq"], f["key"]) == ("change", final_seq + 1, "after")
        assert srv.stats()["slow_consumer_disconnects"] == 0
    finally:
        srv.stop_in_thread()


def test_conflate_is_echoed_and_checked_over_tcp() -> None:
    srv = Server(store="memory", http_port=None, port=0, heartbeat=None).start_in_thread()
    try:
        with LineClient(srv.port) as c:
            c.send({"op": "sync", "live": True, "conflate": 0.25, "id": 1})
            end = c.read_until("snapshot_end")[-1]
            assert end["conflate"] == 0.25
            c.sock.sendall(b'{"op":"ping","conflate":"x"}\n{"op":"subscribe","conflate":-1}\n')
            frames = frames_of(c.sock.recv(1 << 16))
            assert frames[0]["type"] == "pong"  # unknown fields are ignored
            assert frames[1]["code"] == "bad_request"
            msgspec.json.encode(frames)
    finally:
        srv.stop_in_thread()
