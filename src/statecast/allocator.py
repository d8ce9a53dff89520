"""The C allocator's settings for a server process (glibc only).

Ingest allocates and frees a request line of about 250 KB, and its copies, for every
publish of 1,000 changes. With glibc's defaults such a buffer lands at the top of the
heap or in a mapping of its own, and is handed back to the kernel when freed (trimmed
or unmapped), so the next request faults the same pages in again: on the VM these
figures come from, page faults took about a quarter of the server's CPU during ingest
(docs/performance.md, "C for the publish hot path").

:func:`tune_malloc` raises the two thresholds involved, as ``MALLOC_TRIM_THRESHOLD_``
and ``MALLOC_MMAP_THRESHOLD_`` would: buffers up to 16 MiB come from the heap, and up
to 64 MiB of free memory at its top is kept for the next request instead of being
handed back. ``statecast serve`` calls it, since it owns its process; an application
that embeds a server decides for its own process and may call it too. It does nothing
when the environment already sets either variable or ``GLIBC_TUNABLES`` (the
operator's choice wins), or when the C library is not glibc.

Written with ctypes because no maintained package wraps ``mallopt(3)``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

log = logging.getLogger(__name__)

TRIM_THRESHOLD = 64 << 20
"""Free memory kept at the top of the heap (``M_TRIM_THRESHOLD``)."""
MMAP_THRESHOLD = 16 << 20
"""Allocations at least this big get a mapping of their own (``M_MMAP_THRESHOLD``)."""

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Set glibc's trim and mmap thresholds for a server; whether they were set."""
    if any(name in os.environ for name in _ENVIRONMENT):
        log.debug("malloc: left as the environment sets it")
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug(
        "malloc: trim threshold %d, mmap threshold %d: %s",
        TRIM_THRESHOLD,
        MMAP_THRESHOLD,
        "set" if done else "refused",
    )
    return done
