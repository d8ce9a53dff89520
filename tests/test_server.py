"""The server over real sockets: each guarantee of docs/protocol.md, end to end."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from statecast import BadRequest, Change, Server, ServerStateError, ShuttingDown
from tests.helpers import TIMEOUT, Frame, LineClient, frames_of, wait_for


def state_of(client: LineClient, **request: Any) -> tuple[int, dict[tuple[str, str], Any]]:
    client.send({"op": "sync", **request})
    frames = client.read_until("snapshot_end")
    assert frames[0]["type"] == "snapshot_begin"
    data = {(f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"}
    assert frames[-1]["count"] == len(data)
    return frames[-1]["seq"], data


def test_hello(server: Server) -> None:
    server.put("orders", "O-1", {"qty": 1})
    with LineClient(server.port) as c:
        assert c.hello == {
            "type": "hello",
            "server": "statecast",
            "version": server.version,
            "protocol": 1,
            "epoch": server.epoch,
            "seq": 1,
        }


def test_sync_me_like_nc(server: Server) -> None:
    """``nc localhost 8989 <<< 'sync me'``: the snapshot, then the server closes."""
    server.publish([Change("orders", f"O-{i}", {"i": i}) for i in range(1000)])
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall(b"sync me\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    frames = frames_of(data)
    assert [f["type"] for f in frames[:2]] == ["hello", "snapshot_begin"]
    assert frames[-1] == {"type": "snapshot_end", "seq": 1000, "count": 1000}
    assert {f["key"] for f in frames if f["type"] == "record"} == {f"O-{i}" for i in range(1000)}


def test_every_direct_answer_carries_the_id(server: Server) -> None:
    with LineClient(server.port) as c:
        c.send({"op": "sync", "id": "a"})
        frames = c.read_until("snapshot_end")
        assert frames[0]["id"] == "a"
        assert frames[-1]["id"] == "a"
        assert c.request({"op": "ping", "id": 2}) == {"type": "pong", "seq": 0, "id": 2}
        ack = c.request(
            {"op": "publish", "id": 3, "changes": [{"collection": "c", "key": "k", "value": 1}]}
        )
        assert ack == {"type": "ack", "seq": 1, "id": 3}
        sub = c.request({"op": "subscribe", "id": 4})
        assert sub == {"type": "subscribed", "seq": 1, "epoch": server.epoch, "id": 4}
        err = c.request({"op": "subscribe", "id": 5})
        assert (err["type"], err["code"], err["id"]) == ("error", "bad_request", 5)


def test_live_sync_while_four_threads_publish(server: Server) -> None:
    """No gap and no duplicate between the snapshot and the live changes (§5.2)."""
    server.publish([Change("pos", f"P{i}", {"v": 0, "pad": "x" * 200}) for i in range(5000)])
    stop = threading.Event()
    published: list[int] = []

    def producer(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            batch = [
                Change("pos", f"P{(n * 1000 + i) % 5000}", {"v": i, "pad": "y" * 200}),
                Change("orders", f"{n}-{i}", {"v": i}),
            ]
            if i % 5 == 0:
                batch.append(Change("orders", f"{n}-{i - 3}", delete=True))
            published.append(server.publish(batch))

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        with LineClient(server.port) as live:
            wait_for(lambda: len(published) > 50, "producers to start")
            live.send({"op": "sync", "live": True})
            frames = live.read_until("snapshot_end")
            data = {
                (f["collection"], f["key"]): f["value"] for f in frames if f["type"] == "record"
            }
            seq = frames[-1]["seq"]
            assert len(data) == frames[-1]["count"]
            time.sleep(0.3)  # let producers run while we are live
            stop.set()
            for t in threads:
                t.join()
            final = server.seq
            while seq < final:
                f = live.read()
                if f["type"] != "change":
                    continue
                assert f["seq"] == seq + 1, "a gap or a duplicate"
                seq = f["seq"]
                key = (f["collection"], f["key"])
                if f.get("deleted"):
                    data.pop(key, None)
                else:
                    data[key] = f["value"]
        with LineClient(server.port) as fresh:
            fresh_seq, fresh_data = state_of(fresh)
        assert fresh_seq == final
        assert data == fresh_data
        assert len(published) == len(set(published))
    finally:
        stop.set()


def test_resume_and_resync_required(server: Server) -> None:
    for i in range(10):
        server.put("c", f"k{i}", i)
    with LineClient(server.port) as c:
        sub = c.request({"op": "subscribe", "from": 4, "epoch": server.epoch})
        assert sub["seq"] == 4
        assert [c.read()["seq"] for _ in range(6)] == [5, 6, 7, 8, 9, 10]
    with LineClient(server.port) as c:
        err = c.request({"op": "subscribe", "from": 4, "epoch": "someone-else", "id": 1})
        assert err["code"] == "resync_required"
        assert c.request({"op": "ping"})["type"] == "pong"  # still usable


def test_retention_limit() -> None:
    with Server(store="memory", http_port=None, port=0, retain=5, heartbeat=None) as srv:
        for i in range(20):
            srv.put("c", f"k{i}", i)
        with LineClient(srv.port) as c:
            assert c.request({"op": "subscribe", "from": 10})["code"] == "resync_required"
            assert c.request({"op": "subscribe", "from": 15})["type"] == "subscribed"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"{not json}\n", "malformed JSON"),
        (b'{"op":"launch"}\n', "Invalid value 'launch'"),
        (b"\x00\x01\xff\n", "unknown command"),
        (b"make me a sandwich\n", "unknown command 'make'"),
        (b'{"op":"publish","changes":[{"collection":"a b","key":"k","value":1}]}\n', "collection"),
        (b'{"op":"sync","collections":"orders"}\n', "$.collections"),
    ],
)
def test_bad_input_gets_an_error_and_the_connection_lives(
    server: Server, line: bytes, fragment: str
) -> None:
    with LineClient(server.port) as c:
        c.send(line)
        err = c.read()
        assert err["type"] == "error"
        assert err["code"] == "bad_request"
        assert fragment in err["message"]
        assert c.request({"op": "ping"})["type"] == "pong"
    assert server.seq == 0


def test_oversized_line_gets_too_large_and_closes() -> None:
    with Server(store="memory", http_port=None, port=0, max_line=4096, heartbeat=None) as srv:
        with LineClient(srv.port) as c:
            c.send(b"x" * 10_000)
            rest = frames_of(c.read_all())
            assert rest == [
                {
                    "type": "error",
                    "code": "too_large",
                    "message": "request line longer than 4096 bytes",
                }
            ]
        wait_for(lambda: srv.stats()["connections"] == 0, "the connection to close")
        with LineClient(srv.port) as c:  # the server is fine
            assert c.request({"op": "ping"})["type"] == "pong"


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_slow_consumer_is_cut_off_and_others_are_not_slowed(event_loop: str) -> None:
    limit = 256 * 1024
    with Server(
        store="memory",
        http_port=None,
        port=0,
        max_pending=limit,
        heartbeat=None,
        event_loop=event_loop,
    ) as srv:
        slow = LineClient(srv.port, rcvbuf=4096)
        assert slow.request({"op": "subscribe"})["type"] == "subscribed"
        fast = LineClient(srv.port)
        assert fast.request({"op": "subscribe"})["type"] == "subscribed"
        got = 0
        value = {"pad": "z" * 1000}
        # The slow client never reads; the publisher must never block on it, and the
        # fast subscriber gets everything. Kernel buffers take a few MB first.
        for i in range(5000):
            srv.publish([Change("c", f"k{j}", value) for j in range(10)])
            while got < (i + 1) * 10:
                f = fast.read()
                assert f["seq"] == got + 1
                got += 1
            if srv.stats()["slow_consumer_disconnects"]:
                break
        assert srv.stats()["slow_consumer_disconnects"] == 1
        assert srv.stats()["subscribers"] == 1
        data = slow.read_all()  # what it still had on the way, then the end
        frames = frames_of(data[: data.rfind(b"\n") + 1])
        seqs = [f["seq"] for f in frames if f["type"] == "change"]
        assert seqs == list(range(1, len(seqs) + 1))  # whole frames, in order, no gap

        errors = [f for f in frames if f["type"] == "error"]
        assert all(e["code"] == "slow_consumer" for e in errors)
        slow.close()
        # It can resume from its last seq on a new connection.
        with LineClient(srv.port) as again:
            last = seqs[-1] if seqs else 0
            assert again.request({"op": "subscribe", "from": last})["seq"] == last
            assert again.read()["seq"] == last + 1
        fast.close()


def test_heartbeat_to_an_idle_subscriber() -> None:
    with Server(store="memory", http_port=None, port=0, heartbeat=0.2) as srv:
        srv.put("c", "k", 1)
        with LineClient(srv.port) as c:
            c.request({"op": "subscribe"})
            # Nothing else is sent to an idle subscriber: the next frame is a heartbeat
            # carrying the seq up to which everything has been sent (§4.3).
            assert c.read() == {"type": "heartbeat", "seq": 1}
            assert c.read() == {"type": "heartbeat", "seq": 1}
            srv.put("c", "k", 2)
            assert c.read()["type"] == "change"


def test_shutdown_says_bye_to_everyone() -> None:
    srv = Server(
        store="memory", http_port=None, port=0, heartbeat=None, shutdown_grace=5
    ).start_in_thread()
    port = srv.port
    srv.publish([Change("c", f"k{i}", {"pad": "p" * 500}) for i in range(20_000)])
    live = LineClient(srv.port)
    live.request({"op": "subscribe"})
    syncing = LineClient(srv.port)
    syncing.send({"op": "sync"})
    syncing.read()  # snapshot_begin: the rest waits in socket buffers
    idle = LineClient(srv.port)
    stopper = threading.Thread(target=srv.stop_in_thread)
    stopper.start()
    try:
        for c in (live, idle):
            assert frames_of(c.read_all()) == [{"type": "bye", "reason": "shutdown"}]
        tail = frames_of(syncing.read_all())
        assert tail[-1] == {"type": "bye", "reason": "shutdown"}
        assert all(f["type"] == "record" for f in tail[:-1])
    finally:
        stopper.join(TIMEOUT)
        for c in (live, syncing, idle):
            c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_publish_api_from_many_threads(server: Server) -> None:
    seqs: list[int] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        for i in range(250):
            s = server.publish([Change("t", f"{n}-{i}", i), Change("t", f"{n}-last", i)])
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(2, 4001, 2))  # each batch's two changes are adjacent
    with LineClient(server.port) as c:
        seq, data = state_of(c)
    assert seq == 4000
    assert len(data) == 8 * 251
    assert all(data[("t", f"{n}-last")] == 249 for n in range(8))


def test_publish_api_errors(server: Server) -> None:
    with pytest.raises(BadRequest, match="invalid collection"):
        server.publish([Change("ok", "k", 1), Change("not ok", "k", 1)])
    with pytest.raises(BadRequest, match="not JSON-serialisable"):
        server.put("c", "k", {"x": object()})
    assert server.seq == 0
    with pytest.raises(ServerStateError, match="not running"):
        Server(store="memory", http_port=None, port=0).publish([Change("c", "k", 1)])


def test_publish_after_stop_is_refused() -> None:
    srv = Server(store="memory", http_port=None, port=0, heartbeat=None).start_in_thread()
    srv.put("c", "k", 1)
    srv.stop_in_thread()
    with pytest.raises((ShuttingDown, ServerStateError)):
        srv.put("c", "k", 2)


def test_async_api_on_the_server_loop() -> None:
    async def main() -> list[Frame]:
        async with Server(store="memory", http_port=None, port=0, heartbeat=None) as srv:
            with pytest.raises(ServerStateError, match="apublish"):
                srv.publish([Change("c", "k", 0)])
            assert await srv.apublish([Change("c", "k", 1)]) == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            await reader.readline()  # hello
            writer.write(b"watch\n")
            frames = [frames_of(await reader.readline())[0] for _ in range(3)]
            await srv.apublish([Change("c", "k", delete=True)])
            frames.append(frames_of(await reader.readline())[0])
            writer.close()
            await writer.wait_closed()
            return frames

    frames = asyncio.run(main())
    assert [f["type"] for f in frames] == ["snapshot_begin", "record", "snapshot_end", "change"]
    assert frames[-1] == {
        "type": "change",
        "seq": 2,
        "collection": "c",
        "key": "k",
        "deleted": True,
    }


def test_stats(server: Server) -> None:
    server.put("c", "k", 1)
    with LineClient(server.port) as c:
        c.request({"op": "subscribe"})
        stats = server.stats()
        assert stats["connections"] == 1
        assert stats["subscribers"] == 1
        assert stats["seq"] == 1
        assert stats["records"] == 1
