"""Every frame, defined once in core/frames.py: golden bytes of what the server writes,
and the client decodes each one back (docs/protocol.md §2-§4, §6, §8).

The golden lines are the exact bytes of statecast 0.1.0's wire, before frames had one
definition: the refactor must not change a byte.
"""

from __future__ import annotations

import msgspec
import pytest

from statecast.core.frames import (
    PROTOCOL_VERSION,
    RECORD_LINE,
    Ack,
    Authed,
    Bye,
    ChangeFrame,
    Conflating,
    ErrorFrame,
    Frame,
    Heartbeat,
    Hello,
    Pong,
    Record,
    SnapshotBegin,
    SnapshotEnd,
    Stats,
    Subscribed,
    change_line_from_record_line,
    decode_frame,
    delete_line,
    encode,
    encode_error,
    encode_heartbeat,
)
from statecast.core.state import encode_batch
from statecast.errors import ResyncRequired, SlowConsumer

STATS = Stats(
    seq=7,
    epoch="ep",
    connections=2,
    connections_accepted=9,
    subscribers=1,
    records=5,
    open_snapshots=0,
    changes_published=7,
    deliveries=3,
    slow_consumer_disconnects=0,
    publishes_failed=1,
    retained_changes=7,
    store="memory",
    uptime=1.5,
    id=4,
)

GOLDEN: list[tuple[Frame, bytes]] = [
    (
        Hello("statecast", "1.2.3", PROTOCOL_VERSION, "ep", 9),
        b'{"type":"hello","server":"statecast","version":"1.2.3","protocol":1,"epoch":"ep","seq":9}\n',
    ),
    (
        SnapshotBegin(5, "ep", 3, "r1"),
        b'{"type":"snapshot_begin","seq":5,"epoch":"ep","count":3,"id":"r1"}\n',
    ),
    (SnapshotBegin(5, "ep"), b'{"type":"snapshot_begin","seq":5,"epoch":"ep"}\n'),
    (SnapshotEnd(5, 3, 1), b'{"type":"snapshot_end","seq":5,"count":3,"id":1}\n'),
    (SnapshotEnd(5, 3), b'{"type":"snapshot_end","seq":5,"count":3}\n'),
    (Subscribed(8, "ep", 2), b'{"type":"subscribed","seq":8,"epoch":"ep","id":2}\n'),
    (Ack(12), b'{"type":"ack","seq":12}\n'),
    (Ack(12, "p"), b'{"type":"ack","seq":12,"id":"p"}\n'),
    (Pong(3, 0), b'{"type":"pong","seq":3,"id":0}\n'),
    (Heartbeat(44), b'{"type":"heartbeat","seq":44}\n'),
    (Bye("shutdown"), b'{"type":"bye","reason":"shutdown"}\n'),
    (
        ErrorFrame("bad_request", "no", 7),
        b'{"type":"error","code":"bad_request","message":"no","id":7}\n',
    ),
    (
        Record(4, "orders", "O-1", {"qty": 1}),
        b'{"type":"record","seq":4,"collection":"orders","key":"O-1","value":{"qty":1}}\n',
    ),
    (
        ChangeFrame(4, "orders", "O-1", {"qty": 1}),
        b'{"type":"change","seq":4,"collection":"orders","key":"O-1","value":{"qty":1}}\n',
    ),
    (
        ChangeFrame(5, "orders", "O-1", deleted=True),
        b'{"type":"change","seq":5,"collection":"orders","key":"O-1","deleted":true}\n',
    ),
    # New in 0.2 (§3.8, §3.9, §7).
    (Conflating(True), b'{"type":"conflating","on":true}\n'),
    (Conflating(False), b'{"type":"conflating","on":false}\n'),
    (
        Subscribed(8, "ep", 2, 0.1),
        b'{"type":"subscribed","seq":8,"epoch":"ep","id":2,"conflate":0.1}\n',
    ),
    (SnapshotEnd(5, 3, None, 1.0), b'{"type":"snapshot_end","seq":5,"count":3,"conflate":1.0}\n'),
    (
        Authed("alice", ["orders", "positions"], {"account": "ACC-1"}, [], 1700000000, 1),
        b'{"type":"authed","sub":"alice","read":["orders","positions"],'
        b'"where":{"account":"ACC-1"},"publish":[],"exp":1700000000,"id":1}\n',
    ),
    (
        Authed("engine", "*", None, "*", None),
        b'{"type":"authed","sub":"engine","read":"*","where":null,"publish":"*","exp":null}\n',
    ),
    (
        STATS,
        b'{"type":"stats","seq":7,"epoch":"ep","connections":2,"connections_accepted":9,'
        b'"subscribers":1,"records":5,"open_snapshots":0,"changes_published":7,'
        b'"deliveries":3,"slow_consumer_disconnects":0,"publishes_failed":1,'
        b'"retained_changes":7,"store":"memory","uptime":1.5,"id":4}\n',
    ),
]


@pytest.mark.parametrize(("frame", "line"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_bytes_and_back(frame: Frame, line: bytes) -> None:
    assert encode(frame) == line
    assert decode_frame(line[:-1]) == frame


def test_every_frame_type_has_golden_bytes() -> None:
    tested = {type(frame) for frame, _ in GOLDEN}
    assert tested == set(Frame.__args__)


def test_the_hot_path_lines_are_the_struct_encodings() -> None:
    key_json = msgspec.json.encode('we"ird\nkey\u2028')
    key = 'we"ird\nkey\u2028'
    (upsert, delete) = encode_batch(
        [("orders", key, key_json, b'{"px":1.5}'), ("orders", key, key_json, None)], 12
    )
    assert upsert.line == RECORD_LINE % (12, b"orders", key_json, b'{"px":1.5}')
    assert upsert.line == encode(Record(12, "orders", key, {"px": 1.5}))
    assert upsert.change_line() == change_line_from_record_line(upsert.line)
    assert upsert.change_line() == encode(ChangeFrame(12, "orders", key, {"px": 1.5}))
    assert delete.line == delete_line(13, "orders", key_json)
    assert delete.line == encode(ChangeFrame(13, "orders", key, deleted=True))
    assert encode_heartbeat(44) == encode(Heartbeat(44))
    for line in (upsert.line, upsert.change_line(), delete.line):
        assert line.count(b"\n") == 1
        assert line.endswith(b"\n")


def test_error_frames_from_exceptions() -> None:
    assert encode_error(ResyncRequired("gone", request_id=3)) == (
        b'{"type":"error","code":"resync_required","message":"gone","id":3}\n'
    )
    assert encode_error(SlowConsumer("behind")) == (
        b'{"type":"error","code":"slow_consumer","message":"behind"}\n'
    )
    frame = decode_frame(encode_error(SlowConsumer("behind"))[:-1])
    assert isinstance(frame, ErrorFrame)
    assert isinstance(frame.exception(), SlowConsumer)
