"""What one subscription sees: a set of collections and a where filter (§3.1, §3.7).

A :class:`View` is hashable: the fan-out groups subscribers by view, and builds one
blob per distinct view per flush, whatever the number of subscribers sharing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from statecast.core.filters import Where

__all__ = ["ALL", "View"]


@dataclass(frozen=True, slots=True)
class View:
    collections: frozenset[str] | None = None  # None: every collection
    where: Where | None = None  # None: every record of those collections

    def selects(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    def accepts_line(self, line: bytes) -> bool:
        """Whether a snapshot's §4.1 ``record`` line is in this view (collections are
        chosen by the snapshot itself; this checks the where filter)."""
        where = self.where
        if where is None:
            return True
        return where.matches_json(line[line.index(b',"value":') + 9 : -2])


ALL = View()
