"""The state: collections of records, and consistent snapshots of it. No I/O.

Snapshots stream while producers keep publishing, so a snapshot must see the state
exactly as it was at its seq S (docs/protocol.md §5.1) without copying it. This is
done with three rules that hold only while at least one snapshot is open:

* Each collection keeps its records in a list (``slots``) with a ``key -> position``
  index. A snapshot walks positions ``0 .. len(slots)`` as they were when it opened;
  keys inserted later are appended past that end, and every one of them has a seq
  greater than S.
* A record that is replaced keeps the record it replaced in ``prev`` (a version
  chain), so a snapshot that meets a record newer than S walks back to the newest
  version <= S. On every write the chain is trimmed to the versions an open snapshot
  still needs: at most one per open snapshot.
* A delete leaves a tombstone in its slot instead of removing the slot, so positions
  never move.

When the last snapshot closes, chains are dropped and tombstone slots removed. With no
snapshot open, a delete removes its slot at once (swap with the last slot, O(1)).
A snapshot's own memory is a cursor: a position and a few references.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from operator import attrgetter

import msgspec

from statecast.core.accel import speedups as _speedups
from statecast.core.frames import RECORD_LINE, change_line_from_record_line, delete_line
from statecast.core.protocol import PreparedChange

__all__ = ["Collection", "Record", "Snapshot", "State", "encode_batch"]

# How many slots a snapshot reads between checks of its byte budget.
_SLICE = 256
_get_seq = attrgetter("seq")


class Record(msgspec.Struct, gc=False):
    """One version of one key: the change that wrote it, encoded once.

    ``line`` is the §4.1 ``record`` frame of an upsert, or the §4.2 ``change`` frame
    of a delete (``deleted`` is then true). The same object serves the snapshot, the
    change log and the fan-out.

    A msgspec Struct rather than a class: it is created several times faster, and with
    ``gc=False`` the cyclic garbage collector never scans the millions of records a
    state holds (records only point to older records, so they never form a cycle).
    """

    seq: int
    collection: str
    key: str
    line: bytes
    deleted: bool
    prev: Record | None = None
    # The version this change replaced (None: the key did not exist), set when it is
    # installed and kept while the change log retains this change: a where-filtered
    # subscriber that catches up from the log needs it to tell a record moving out of
    # its view from one that was never in it (§3.7). UNSET: not known (a change loaded
    # from disk whose previous version is older than the retained log).
    before: Record | msgspec.UnsetType | None = msgspec.UNSET

    def change_line(self) -> bytes:
        """The §4.2 ``change`` frame of this change."""
        return self.line if self.deleted else change_line_from_record_line(self.line)

    def value_json(self) -> bytes | None:
        """The JSON text of the value (None for a delete), sliced from the line: in
        ``..."key":K,"value":V}\n`` the first ``,"value":`` ends the key, since a
        key's JSON string cannot hold an unescaped quote."""
        if self.deleted:
            return None
        line = self.line
        return line[line.index(b',"value":') + 9 : -2]

    def __repr__(self) -> str:
        kind = "delete" if self.deleted else "upsert"
        return f"<Record {kind} seq={self.seq} {self.collection}/{self.key}>"


def encode_batch(batch: Sequence[PreparedChange], first_seq: int) -> list[Record]:
    """Give a validated batch consecutive seqs from ``first_seq`` and encode each
    change's frame, once. Pure: any thread may call it (a store's writer does).

    Runs as C (``_speedups.encode_records``, :mod:`statecast.core.accel`) when that is
    built, for seqs below 2**63; :func:`encode_batch_py` is the same in Python."""
    if _speedups is not None:
        records = _speedups.encode_records(batch, first_seq, Record, RECORD_LINE, delete_line)
        if records is not None:
            return records
    return encode_batch_py(batch, first_seq)


def encode_batch_py(batch: Sequence[PreparedChange], first_seq: int) -> list[Record]:
    """:func:`encode_batch` in Python (the reference for the C version)."""
    out: list[Record] = []
    append = out.append
    seq = first_seq - 1
    names: dict[str, bytes] = {}
    for name, key, key_json, value_json in batch:
        seq += 1
        if value_json is not None:
            name_b = names.get(name)
            if name_b is None:
                name_b = names[name] = name.encode()
            line = RECORD_LINE % (seq, name_b, key_json, value_json)  # §4.1
            append(Record(seq, name, key, line, False))
        else:
            append(Record(seq, name, key, delete_line(seq, name, key_json), True))
    return out


class Collection:
    __slots__ = ("index", "lines", "live", "name", "slots", "tombstones")

    def __init__(self, name: str) -> None:
        self.name = name
        self.index: dict[str, int] = {}
        self.slots: list[Record] = []
        # ``slots[i].line`` for every i, kept beside the slots: a snapshot takes a
        # chunk of frames as one list slice, without touching each Record (one cache
        # miss per record, a third of a snapshot's time in the server).
        self.lines: list[bytes] = []
        self.live = 0  # records that are not tombstones
        self.tombstones: list[str] = []  # keys whose slot holds a tombstone

    def __len__(self) -> int:
        return self.live

    def get(self, key: str) -> Record | None:
        pos = self.index.get(key)
        if pos is None:
            return None
        rec = self.slots[pos]
        return None if rec.deleted else rec

    def records(self) -> Iterator[Record]:
        """The current records (not a snapshot: don't publish while iterating)."""
        return (r for r in self.slots if not r.deleted)

    def _swap_remove(self, key: str) -> None:
        pos = self.index.pop(key)
        last = self.slots.pop()
        line = self.lines.pop()
        if pos < len(self.slots):
            self.slots[pos] = last
            self.lines[pos] = line
            self.index[last.key] = pos


class State:
    """All collections, the seq of the last applied change, and open snapshots."""

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self.collections: dict[str, Collection] = {}
        self._open: dict[Snapshot, int] = {}  # open snapshots and their seqs
        self._open_seqs: list[int] = []  # their distinct seqs, newest first
        self._dirty: list[Record] = []  # records whose prev is set
        self._dirty_limit = 1 << 16
        # Bytes of old versions kept alive for open snapshots (an estimate: counted as
        # versions are chained, recounted when chains are trimmed), and its bound: past
        # it, the oldest open snapshot is cut (§7, --max-snapshot-retained).
        self.retained = 0
        self.max_retained: int | None = None
        self.snapshots_cut = 0

    # -- reading -------------------------------------------------------------
    def get(self, collection: str, key: str) -> Record | None:
        coll = self.collections.get(collection)
        return None if coll is None else coll.get(key)

    def __len__(self) -> int:
        return sum(c.live for c in self.collections.values())

    def first_mismatch(
        self, batch: Sequence[PreparedChange], conditions: Sequence[tuple[int, int]]
    ) -> tuple[int, int, int] | None:
        """§3.3.2: the first condition (change index, seq) of ``batch`` whose record is
        not at that seq (0: absent), as (index, expected seq, current seq); None when
        all hold. One loop with no call per change (a guarded publish checks every
        change: ``Collection.get`` per change would cost as much again)."""
        collections = self.collections
        if len(conditions) == len(batch) and not any(seq for _, seq in conditions):
            # Every change creates its record (if_seq 0 on all, the usual guarded
            # insert): when no key is in its collection's index, all hold, at C speed.
            # (A key in the index may be a tombstone: then the loop below decides.)
            names = {c[0] for c in batch}
            if all(
                (coll := collections.get(n)) is None
                or coll.index.keys().isdisjoint([c[1] for c in batch if c[0] == n])
                for n in names
            ):
                return None
        name = None
        index: dict[str, int] | None = None
        slots: list[Record] = []
        for i, expected in conditions:
            c = batch[i]
            if c[0] != name:
                name = c[0]
                coll = collections.get(name)
                index, slots = (None, []) if coll is None else (coll.index, coll.slots)
            pos = None if index is None else index.get(c[1])
            if pos is None:
                current = 0
            else:
                rec = slots[pos]
                current = 0 if rec.deleted else rec.seq
            if current != expected:
                return i, expected, current
        return None

    @property
    def open_snapshots(self) -> int:
        return len(self._open)

    # -- writing -------------------------------------------------------------
    def apply(self, batch: Sequence[PreparedChange]) -> list[Record]:
        """Encode and install one batch: its changes get the next consecutive seqs."""
        records = encode_batch(batch, self.seq + 1)
        self.install(records)
        return records

    def install(self, records: Sequence[Record]) -> None:
        """Make a batch of encoded records (from :func:`encode_batch`) the current
        state, atomically: no snapshot can see part of it."""
        if records and records[0].seq != self.seq + 1:
            raise ValueError(f"batch starts at seq {records[0].seq}, state is at {self.seq}")
        protect = bool(self._open)
        collections = self.collections
        coll: Collection | None = None
        todo: Iterable[Record] = records
        if _speedups is not None and not protect and isinstance(records, list):
            # C: the same loop for the upserts up to the first delete (accel).
            done = _speedups.install_upserts(records, collections, Collection)
            if done:
                todo = itertools.islice(records, done, None)
        for rec in todo:
            name = rec.collection
            if coll is None or coll.name != name:
                coll = collections.get(name)
                if coll is None:
                    coll = collections[name] = Collection(name)
            key = rec.key
            pos = coll.index.get(key)
            if not rec.deleted:
                if pos is None:
                    rec.before = None
                    coll.index[key] = len(coll.slots)
                    coll.slots.append(rec)
                    coll.lines.append(rec.line)
                    coll.live += 1
                else:
                    old = rec.before = coll.slots[pos]
                    if old.deleted:
                        coll.live += 1
                    if protect:
                        self._chain(rec, old)
                    coll.slots[pos] = rec
                    coll.lines[pos] = rec.line
            elif pos is not None:
                old = rec.before = coll.slots[pos]
                if not old.deleted:
                    coll.live -= 1
                if protect:
                    self._chain(rec, old)
                    coll.slots[pos] = rec
                    coll.lines[pos] = rec.line
                    coll.tombstones.append(key)
                else:
                    coll._swap_remove(key)
            else:
                rec.before = None  # a delete of a key that did not exist
        if records:
            self.seq = records[-1].seq
        if protect:
            self._enforce_retained()

    def load(self, records: Iterable[Record], seq: int) -> None:
        """Fill an empty state with records (a store recovering), at ``seq``.

        Records of one collection should come together (a store reads them in key
        order): each run of them is added in bulk.
        """
        if self._open or self.collections or self.seq:
            raise RuntimeError("load() needs an empty state with no open snapshot")
        collections = self.collections
        for name, group in itertools.groupby(records, key=attrgetter("collection")):
            coll = collections.get(name)
            if coll is None:
                coll = collections[name] = Collection(name)
            base = len(coll.slots)
            recs = list(group)
            coll.slots.extend(recs)
            coll.lines.extend([r.line for r in recs])
            coll.index.update({r.key: base + i for i, r in enumerate(recs)})
            coll.live += len(recs)
        self.seq = seq

    def _chain(self, new: Record, old: Record) -> None:
        """Keep ``old`` reachable from ``new`` for the open snapshots that need it."""
        new.prev = old
        self._trim(new)
        self._dirty.append(new)
        if new.prev is not None:
            self.retained += len(old.line)
        if len(self._dirty) > self._dirty_limit:
            self._prune()

    def _enforce_retained(self) -> None:
        """Cut the oldest open snapshots until the versions kept for the others fit in
        ``max_retained`` (after a whole batch is installed: never in the middle)."""
        limit = self.max_retained
        if limit is None or self.retained <= limit:
            return
        self._prune()
        while self.retained > limit and self._open:
            oldest = min(self._open, key=self._open.__getitem__)
            oldest.cut = True
            self.snapshots_cut += 1
            oldest.close()  # releases its versions: _release() recounts

    def _trim(self, head: Record) -> None:
        """Unlink the versions behind ``head`` that no open snapshot needs.

        A snapshot at S needs the newest version <= S, and only that one.
        """
        seqs = self._open_seqs
        n = len(seqs)
        i = 0
        while i < n and seqs[i] >= head.seq:  # snapshots that head serves itself
            i += 1
        tail = head
        v = head.prev
        while v is not None and i < n:
            if v.seq <= seqs[i]:
                tail.prev = v
                tail = v
                while i < n and seqs[i] >= v.seq:
                    i += 1
            v = v.prev
        tail.prev = None

    def _prune(self) -> None:
        """Trim every chain; forget records that no longer chain; recount what the
        chains keep alive."""
        keep: list[Record] = []
        retained = 0
        for rec in self._dirty:
            self._trim(rec)
            v = rec.prev
            if v is not None:
                keep.append(rec)
                while v is not None:
                    retained += len(v.line)
                    v = v.prev
        self._dirty = keep
        self._dirty_limit = max(1 << 16, 2 * len(keep))
        self.retained = retained

    # -- snapshots -----------------------------------------------------------
    def snapshot(self, collections: frozenset[str] | None = None) -> Snapshot:
        """Open a snapshot of the state as it is now (at ``self.seq``).

        It must be closed (``Snapshot.close``) when no longer read, or the state
        keeps old versions for it.
        """
        if collections is None:
            colls = list(self.collections.values())
        else:
            colls = [c for name, c in self.collections.items() if name in collections]
        snap = Snapshot(self, self.seq, colls)
        self._open[snap] = self.seq
        if not self._open_seqs or self._open_seqs[0] != self.seq:
            self._open_seqs.insert(0, self.seq)
        return snap

    def _release(self, snap: Snapshot) -> None:
        if self._open.pop(snap, None) is None:
            return
        if self._open:
            self._open_seqs = sorted(set(self._open.values()), reverse=True)
            self._prune()
            return
        self._open_seqs = []
        self.retained = 0
        # The last snapshot closed: drop version chains and tombstone slots.
        for rec in self._dirty:
            rec.prev = None
        self._dirty = []
        self._dirty_limit = 1 << 16
        for coll in self.collections.values():
            if coll.tombstones:
                for key in coll.tombstones:
                    pos = coll.index.get(key)
                    if pos is not None and coll.slots[pos].deleted:
                        coll._swap_remove(key)
                coll.tombstones = []


class Snapshot:
    """A cursor over the state as it was at ``seq``; read it in chunks with ``read``."""

    __slots__ = ("_colls", "_ends", "_i", "_pos", "_state", "count", "cut", "seq", "total")

    def __init__(self, state: State, seq: int, colls: list[Collection]) -> None:
        self._state: State | None = state
        self.seq = seq
        self._colls = colls
        self._ends = [len(c.slots) for c in colls]
        self.total = sum(c.live for c in colls)  # records it will return in all
        self._i = 0
        self._pos = 0
        self.count = 0  # records returned so far
        self.cut = False  # closed by the state: it kept too many old versions alive

    @property
    def done(self) -> bool:
        return self._state is None

    def read(self, max_bytes: int) -> list[bytes]:
        """The next record frames, about ``max_bytes`` of them (at least one record
        when any is left). The snapshot closes itself after the last one."""
        lines: list[bytes] = []
        state = self._state
        if state is None:
            return lines
        size = 0
        seq = self.seq
        colls, ends = self._colls, self._ends
        while self._i < len(colls):
            coll = colls[self._i]
            slots = coll.slots
            end = ends[self._i]
            pos = self._pos
            while pos < end and size < max_bytes:
                stop = min(end, pos + _SLICE)
                # The usual case, at C speed: every slot of the chunk still holds its
                # version at S (nothing was installed since the snapshot opened, or
                # nothing newer than S is in the chunk) and none is a tombstone (every
                # tombstone slot's key is in ``tombstones``, kept while a snapshot is
                # open).
                if not coll.tombstones and (
                    state.seq == seq or max(map(_get_seq, slots[pos:stop])) <= seq
                ):
                    got = coll.lines[pos:stop]
                    size += sum(map(len, got))
                    lines += got
                else:
                    size += self._read_versions(slots[pos:stop], lines)
                pos = stop
            self._move_to(pos, end)
            if size >= max_bytes:
                break
        self._took(len(lines))
        return lines

    def read_joined(self, max_bytes: int) -> tuple[bytes, int]:
        """:meth:`read`, joined: the next frames as one bytes object, and how many.

        With the C speedups (:mod:`statecast.core.accel`) the frames are copied
        straight from each collection's ``lines`` into the result
        (``_speedups.join_lines``), in one pass over their lengths and one copy;
        :meth:`read` followed by ``b"".join`` takes four (a slice, ``sum(map(len))``,
        and the join's own two). A chunk that holds a record newer than S or a
        tombstone is read through its versions, as :meth:`read` does."""
        if _speedups is None:
            lines = self.read(max_bytes)
            return b"".join(lines), len(lines)
        join = _speedups.join_lines
        parts: list[bytes] = []
        state = self._state
        if state is None:
            return b"", 0
        size = count = 0
        seq = self.seq
        colls, ends = self._colls, self._ends
        while self._i < len(colls):
            coll = colls[self._i]
            end = ends[self._i]
            pos = self._pos
            # Nothing installed since S and no tombstone: every line is the frame at S.
            slots = None if state.seq == seq and not coll.tombstones else coll.slots
            while pos < end and size < max_bytes:
                blob, stop = join(coll.lines, slots, pos, end, max_bytes - size, seq)
                if stop > pos:
                    parts.append(blob)
                    size += len(blob)
                    count += stop - pos
                    pos = stop
                else:  # the slot at pos is newer than S or a tombstone
                    stop = min(end, pos + _SLICE)
                    old: list[bytes] = []
                    size += self._read_versions(coll.slots[pos:stop], old)
                    parts += old
                    count += len(old)
                    pos = stop
            self._move_to(pos, end)
            if size >= max_bytes:
                break
        self._took(count)
        return (parts[0] if len(parts) == 1 else b"".join(parts)), count

    def _move_to(self, pos: int, end: int) -> None:
        """The cursor to ``pos`` in the current collection; past its ``end``, to the
        start of the next one."""
        if pos >= end:
            self._i += 1
            self._pos = 0
        else:
            self._pos = pos

    def _took(self, n: int) -> None:
        """Count ``n`` more frames read; close once every collection is read."""
        self.count += n
        if self._i >= len(self._colls):
            self.close()

    def _read_versions(self, chunk: list[Record], lines: list[bytes]) -> int:
        """Append to ``lines`` the frames of ``chunk`` as it was at S, one slot at a
        time: a record newer than S walks back its version chain, a tombstone is
        skipped. Returns the bytes appended."""
        seq = self.seq
        size = 0
        append = lines.append
        for current in chunk:
            rec = current
            if rec.seq > seq:  # written after S: find the version at S
                older = rec.prev
                while older is not None and older.seq > seq:
                    older = older.prev
                if older is None:
                    continue
                rec = older
            if rec.deleted:
                continue
            line = rec.line
            append(line)
            size += len(line)
        return size

    def close(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            state._release(self)
