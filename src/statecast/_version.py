"""The installed version of statecast, in one place that imports nothing of ours."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("statecast")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
