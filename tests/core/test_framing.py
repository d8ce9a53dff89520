from __future__ import annotations

import pytest

from statecast.core.framing import LineReader
from statecast.errors import TooLarge


def lines(reader: LineReader) -> list[bytes]:
    out = []
    while (line := reader.next_line()) is not None:
        out.append(line)
    return out


def test_lines_split_across_feeds() -> None:
    r = LineReader(100)
    r.feed(b"ab")
    assert lines(r) == []
    r.feed(b"c\nde\r\nf")
    assert lines(r) == [b"abc", b"de"]
    r.feed(b"\n\n")
    assert lines(r) == [b"f", b""]
    assert r.buffered == 0


def test_byte_at_a_time() -> None:
    r = LineReader(100)
    got = []
    for b in b'{"op":"ping"}\nsync me\n':
        r.feed(bytes([b]))
        got += lines(r)
    assert got == [b'{"op":"ping"}', b"sync me"]


def test_line_at_the_limit_is_accepted() -> None:
    r = LineReader(10)
    r.feed(b"x" * 10 + b"\n")
    assert lines(r) == [b"x" * 10]


def test_partial_line_over_the_limit_raises_and_stops_reading() -> None:
    r = LineReader(10)
    r.feed(b"x" * 11)
    with pytest.raises(TooLarge):
        r.next_line()
    r.feed(b"\nping\n")
    assert r.next_line() is None


def test_complete_line_over_the_limit_raises() -> None:
    r = LineReader(10)
    r.feed(b"ok\n" + b"y" * 20 + b"\nafter\n")
    assert r.next_line() == b"ok"
    with pytest.raises(TooLarge):
        r.next_line()
