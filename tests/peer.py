"""Drive the sans-I/O core with bytes and objects only: a Session and what a
transport would do with it (``Peer``), an engine on the memory store, and a publish
helper. Shared by the core tests; no sockets, no event loop."""

from __future__ import annotations

from typing import Any

import msgspec

from statecast.core.engine import Engine
from statecast.core.protocol import Change, prepare_changes
from statecast.core.session import Limits, Session
from statecast.errors import ProtocolError
from statecast.stores.memory import MemoryStore
from tests.helpers import Frame, frames_of

__all__ = ["Peer", "by_type", "new_engine", "publish"]


class Peer:
    """A session plus what a transport would do with it, all in memory.

    Like the TCP transport, live deliveries first flush the session's own output,
    so ``wire`` holds the bytes in the order a socket would carry them.
    """

    def __init__(self, engine: Engine, max_line: int = 1 << 20, **options: Any) -> None:
        self.wire = bytearray()
        options.setdefault("limits", Limits(max_line=max_line))
        self.session = Session(engine, self, version="test", **options)
        self._read = 0
        self.collect()

    def deliver(self, blob: bytes) -> None:
        self.collect()
        self.wire += blob

    def collect(self) -> None:
        self.wire += self.session.data_to_send()

    def send(self, request: Frame | bytes) -> None:
        data = request if isinstance(request, bytes) else msgspec.json.encode(request) + b"\n"
        self.session.receive_data(data)
        self.collect()

    def tick(self) -> None:
        self.session.tick()
        self.collect()

    def pump(self, step: int = 1 << 20) -> None:
        while self.session.streaming:
            self.session.pump(step)
            self.collect()

    def frames(self) -> list[Frame]:
        """Frames not returned before."""
        data = bytes(self.wire[self._read :])
        self._read = len(self.wire)
        return frames_of(data)


def new_engine(retain: int = 1000) -> Engine:
    return Engine(MemoryStore(retain))  # flushes happen when the test calls them


def publish(engine: Engine, *changes: Change) -> int:
    """Publish through the engine; the memory store commits before returning."""
    results: list[int | ProtocolError] = []
    engine.publish(prepare_changes(list(changes)), results.append)
    (result,) = results
    assert isinstance(result, int)
    return result


def by_type(frames: list[Frame], ftype: str) -> list[Frame]:
    return [f for f in frames if f["type"] == ftype]
