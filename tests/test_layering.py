"""Guards of the layout (docs/architecture.md): what each layer may load.

Each check imports in a fresh interpreter, so that what another test imported
earlier cannot hide an arrow that should not be there.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
import {module}
loaded = set(sys.modules)
bad = sorted(name for name in {forbidden!r} if name in loaded)
print(",".join(bad))
"""

CORE = [
    "statecast.core.protocol",
    "statecast.core.frames",
    "statecast.core.framing",
    "statecast.core.state",
    "statecast.core.changelog",
    "statecast.core.fanout",
    "statecast.core.pacing",
    "statecast.core.store",
    "statecast.core.engine",
    "statecast.core.session",
    "statecast.core.filters",
    "statecast.core.policy",
    "statecast.core.values",
    "statecast.core.accel",
]
IO = ["asyncio", "socket", "sqlite3", "aiohttp", "ssl", "selectors"]
SERVER_SIDE = [
    "aiohttp",
    "sqlite3",
    "statecast.server",
    "statecast.transports.tcp",
    "statecast.stores.sqlite",
    "prometheus_client",
]


def loaded(module: str, forbidden: list[str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(module=module, forbidden=forbidden)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out.split(",") if out else []


@pytest.mark.parametrize("module", CORE)
def test_the_core_does_no_io(module: str) -> None:
    assert loaded(module, IO) == []


@pytest.mark.parametrize(
    "module", ["statecast.client", "statecast.client.replica", "statecast.client.blocking"]
)
def test_the_client_does_not_load_the_server(module: str) -> None:
    assert loaded(module, SERVER_SIDE) == []


def test_import_statecast_loads_almost_nothing() -> None:
    assert loaded("statecast", [*SERVER_SIDE, "asyncio", "msgspec"]) == []


def test_stores_do_not_load_transports() -> None:
    forbidden = ["aiohttp", "statecast.server", "statecast.transports.tcp"]
    assert loaded("statecast.stores.sqlite", forbidden) == []


def test_no_runtime_import_cycle() -> None:
    """Every module imports alone, first, in a fresh interpreter: a cycle that only
    closes through an incidental import shows up as an ImportError here."""
    import pkgutil  # noqa: PLC0415

    import statecast  # noqa: PLC0415

    names = [m.name for m in pkgutil.walk_packages(statecast.__path__, "statecast.")]
    names = [n for n in names if not n.endswith("__main__")]
    script = (
        "import importlib, subprocess, sys\n"
        f"names = {names!r}\n"
        "for n in names:\n"
        "    r = subprocess.run([sys.executable, '-c', 'import ' + n], capture_output=True)\n"
        "    if r.returncode: print(n, r.stderr.decode().strip().splitlines()[-1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out == ""
