"""Newline framing of the request stream (docs/protocol.md §1), with no I/O."""

from __future__ import annotations

from statecast.errors import TooLarge

__all__ = ["LineReader"]


class LineReader:
    """Splits a byte stream into lines, holding at most ``max_line`` bytes of a
    partial line.

    ``feed()`` stores bytes; ``next_line()`` returns the next complete line without
    its ``\\n`` (``\\r\\n`` is accepted too), or ``None`` when no full line is
    buffered. A line longer than ``max_line`` raises :class:`TooLarge`; the stream is
    then unusable (§1), so the reader refuses further input.
    """

    __slots__ = ("_broken", "_buf", "_pos", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._pos = 0  # start of the first unread line in _buf
        self._broken = False

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        if self._pos:
            # Drop consumed lines before growing, so the buffer stays small.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_line(self) -> bytes | None:
        if self._broken:
            return None
        buf = self._buf
        end = buf.find(b"\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > self.max_line:
                self._broken = True
                raise TooLarge(f"request line longer than {self.max_line} bytes")
            return None
        if end - self._pos > self.max_line:
            self._broken = True
            raise TooLarge(f"request line longer than {self.max_line} bytes")
        line = bytes(buf[self._pos : end])
        if end + 1 == len(buf):
            # All read: an idle connection keeps no request bytes (an auth line, with
            # its token, is about 300: docs/performance.md, access control).
            buf.clear()
            self._pos = 0
        else:
            self._pos = end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def has_line(self) -> bool:
        """Whether a complete line is buffered (cheap: one ``find``)."""
        return not self._broken and self._buf.find(b"\n", self._pos) >= 0

    def feed_eof(self) -> None:
        """The stream ended: a last line without its ``\n`` is a line too (§1)."""
        if not self._broken and len(self._buf) > self._pos:
            self._buf += b"\n"

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet returned as lines."""
        return len(self._buf) - self._pos
