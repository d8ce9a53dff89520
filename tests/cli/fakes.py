"""Servers that misbehave, on a free loopback port, for the client commands' tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec

HELLO = b'{"type":"hello","server":"statecast","version":"0","protocol":1,"epoch":"e","seq":0}\n'

Handler = Callable[[socket.socket], None]


@contextmanager
def fake_server(handler: Handler) -> Iterator[int]:
    """A TCP port on loopback whose connections are each given to ``handler`` in a
    thread of their own; closed (with every connection) on the way out."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        try:
            handler(conn)
        except OSError:
            pass  # the client went away

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        t.join()
        for conn in held:
            conn.close()
        listener.close()


def requests(conn: socket.socket) -> Iterator[dict[str, object]]:
    """The requests a client sends (empty lines skipped), until it closes."""
    buf = b""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                req = msgspec.json.decode(line)
                assert isinstance(req, dict)
                yield req


def silent(conn: socket.socket) -> None:
    """Accepts, then says nothing at all, not even hello."""
    for _ in requests(conn):
        pass


def hello_only(conn: socket.socket) -> None:
    """Says hello, then answers nothing."""
    conn.sendall(HELLO)
    for _ in requests(conn):
        pass


def pong_only(conn: socket.socket) -> None:
    """Says hello and answers ping; every other request goes unanswered."""
    conn.sendall(HELLO)
    for req in requests(conn):
        if req.get("op") == "ping":
            conn.sendall(b'{"type":"pong","id":%d,"seq":0}\n' % int(str(req["id"])))


def answers_then(reply: Callable[[dict[str, object]], bytes | None]) -> Handler:
    """Says hello, answers ping, and sends ``reply(request)`` for any other request
    (``None``: closes the connection)."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(HELLO)
        for req in requests(conn):
            if req.get("op") == "ping":
                conn.sendall(b'{"type":"pong","id":%d,"seq":0}\n' % int(str(req["id"])))
                continue
            data = reply(req)
            if data is None:
                conn.shutdown(socket.SHUT_RDWR)
                return
            conn.sendall(data)

    return handler
