from __future__ import annotations

from collections.abc import Iterator

import pytest

from statecast import Server


@pytest.fixture
def server() -> Iterator[Server]:
    """A server on a free port, running on its own loop thread."""
    srv = Server(
        store="memory", http_port=None, port=0, shutdown_grace=2.0, heartbeat=None
    ).start_in_thread()
    try:
        yield srv
    finally:
        srv.stop_in_thread(timeout=30)
