"""The C versions of the publish hot path, when they are built.

``statecast._speedups`` (``src/statecast/_speedups.c``) holds C twins of two Python
loops that ingest runs once per change: the fast path of
:func:`statecast.core.protocol.prepare_changes` (is each value canonical as sent, §9;
each key's JSON) and :func:`statecast.core.state.encode_batch` (each record frame, §4.1,
and its ``Record``). In CPython one loop iteration per change in each of them cost
more than everything else ingest does (docs/performance.md has the profile).

The Python code stays the reference and the fallback: it runs when the extension is
not built (no compiler at install time), when ``STATECAST_NO_SPEEDUPS`` is set to
anything but ``""`` or ``0`` (to compare the two, or to rule the C out), and, for
``prepare_changes``, for every batch the C version does not accept (it returns
``None`` for anything but the common case, so every error message comes from Python).
``tests/core/test_speedups.py`` holds the two side by side.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from statecast.core.protocol import ChangeIn, PreparedChange
    from statecast.core.state import Collection, Record

__all__ = ["Speedups", "speedups", "why_not"]


class Speedups(Protocol):
    """What ``statecast._speedups`` holds (each function's docstring in the C says
    what it does)."""

    def prepare_plain(
        self, changes: list[ChangeIn], known: dict[str, str], max_key_length: int, max_depth: int, /
    ) -> list[PreparedChange] | None: ...

    def encode_records(
        self,
        batch: Sequence[PreparedChange],
        first_seq: int,
        record_type: type[Record],
        record_line: bytes,
        delete_line: Callable[[int, str, bytes], bytes],
        /,
    ) -> list[Record] | None: ...

    def install_upserts(
        self,
        records: list[Record],
        collections: dict[str, Collection],
        collection_type: type[Collection],
        /,
    ) -> int: ...

    def join_lines(  # noqa: PLR0917 (a C function: positional only)
        self,
        lines: list[bytes],
        slots: list[Record] | None,
        start: int,
        end: int,
        max_bytes: int,
        seq: int,
        /,
    ) -> tuple[bytes, int]: ...


def _load() -> tuple[Speedups | None, str | None]:
    if os.environ.get("STATECAST_NO_SPEEDUPS", "") not in ("", "0"):
        return None, "STATECAST_NO_SPEEDUPS is set"
    try:
        module = importlib.import_module("statecast._speedups")
    except ImportError as exc:
        return None, f"statecast._speedups cannot be imported ({exc})"
    return cast("Speedups", module), None


speedups: Speedups | None
"""The C module, or None when the Python code runs."""
why_not: str | None
"""Why the Python code runs (None: the C does); the server logs it at start."""
speedups, why_not = _load()
