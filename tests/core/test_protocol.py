"""Request parsing and change validation, with bytes only (docs/protocol.md §3, §6, §9)."""

from __future__ import annotations

import msgspec
import pytest

from statecast import BadRequest, Change
from statecast.core.protocol import (
    PingRequest,
    PublishRequest,
    SubscribeRequest,
    SyncRequest,
    parse_request,
    prepare_changes,
)
from statecast.errors import ERRORS_BY_CODE, error_from_code


def test_sync_request_with_all_fields() -> None:
    req = parse_request(b'{"op":"sync","id":"a1","collections":["orders","x.y-z_1"],"live":true}')
    assert req == SyncRequest(id="a1", collections=["orders", "x.y-z_1"], live=True)


def test_subscribe_request_maps_from() -> None:
    req = parse_request(b'{"op":"subscribe","from":42,"epoch":"e1","id":7}')
    assert req == SubscribeRequest(id=7, from_=42, epoch="e1")


def test_unknown_fields_are_ignored() -> None:
    assert parse_request(b'{"op":"ping","x":{"nested":[1]},"id":1}') == PingRequest(id=1)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"sync me", SyncRequest()),
        (b"SYNC", SyncRequest()),
        (b"  watch  ", SyncRequest(live=True)),
        (b"subscribe", SubscribeRequest()),
        (b"ping\r", PingRequest()),
    ],
)
def test_words_for_people_typing(line: bytes, expected: object) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"hello", "unknown command 'hello'"),
        (b"{", "malformed JSON"),
        (b'{"op":"nope"}', "Invalid value 'nope'"),
        (b"{}", "missing required field `op`"),
        (b'["sync"]', "unknown command"),
        (b'{"op":"sync","live":"yes"}', "$.live"),
        (b'{"op":"sync","collections":[]}', "must not be empty"),
        (b'{"op":"sync","collections":["bad name"]}', "invalid collection name"),
        (b'{"op":"subscribe","from":-1}', "'from' must be"),
        (b'{"op":"publish"}', "missing required field `changes`"),
        (b'{"op":"publish","changes":{}}', "$.changes"),
        (b"\xff\xfe", "unknown command"),
    ],
)
def test_bad_requests_say_what_is_wrong(line: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(line)
    assert fragment in info.value.message


def test_id_is_echoed_on_validation_errors() -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(b'{"op":"sync","live":1,"id":"x9"}')
    assert info.value.request_id == "x9"


def test_publish_batch_keeps_raw_values_made_compact() -> None:
    """§9: values are kept as sent (numbers exactly as written), minus whitespace."""
    req = parse_request(
        b'{"op":"publish","changes":[{"collection":"c","key":"k","value":{ "a" :\t[1, 2.50]}},'
        b'{"collection":"c","key":"j","delete":true},{"collection":"c","key":"n","value":null}]}'
    )
    assert isinstance(req, PublishRequest)
    batch = prepare_changes(req)
    assert batch == [
        ("c", "k", b'"k"', b'{"a":[1,2.50]}'),
        ("c", "j", b'"j"', None),
        ("c", "n", b'"n"', b"null"),
    ]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"collection": "c", "key": "k"}, "needs a 'value'"),
        ({"collection": "bad/name", "key": "k", "value": 1}, "invalid collection name"),
        ({"collection": "c" * 129, "key": "k", "value": 1}, "invalid collection name"),
        ({"collection": "c", "key": "", "value": 1}, "non-empty"),
        ({"collection": "c", "key": "k" * 1025, "value": 1}, "longer than 1024"),
    ],
)
def test_one_invalid_change_rejects_the_batch(change: dict[str, object], fragment: str) -> None:
    good = {"collection": "c", "key": "ok", "value": 1}
    line = msgspec.json.encode({"op": "publish", "id": 5, "changes": [good, change]})
    req = parse_request(line)
    assert isinstance(req, PublishRequest)
    with pytest.raises(BadRequest) as info:
        prepare_changes(req)
    assert fragment in info.value.message
    assert "changes[1]" in info.value.message
    assert info.value.request_id == 5


def test_empty_publish_is_rejected() -> None:
    req = parse_request(b'{"op":"publish","changes":[]}')
    assert isinstance(req, PublishRequest)
    with pytest.raises(BadRequest, match="must not be empty"):
        prepare_changes(req)


def test_embedding_api_changes() -> None:
    batch = prepare_changes(
        [
            Change("orders", "O-1", {"qty": 5}),
            {"collection": "orders", "key": "O-2", "value": [1, "x"]},
            Change("orders", "O-3", delete=True),
        ]
    )
    assert batch == [
        ("orders", "O-1", b'"O-1"', b'{"qty":5}'),
        ("orders", "O-2", b'"O-2"', b'[1,"x"]'),
        ("orders", "O-3", b'"O-3"', None),
    ]
    assert prepare_changes(Change("a", "b", 1)) == [("a", "b", b'"b"', b"1")]
    with pytest.raises(BadRequest, match="not JSON-serialisable"):
        prepare_changes([Change("a", "b", object())])
    with pytest.raises(BadRequest, match="at least one"):
        prepare_changes([])


def test_every_error_code_maps_back_to_its_class() -> None:
    for code, cls in ERRORS_BY_CODE.items():
        err = error_from_code(code, "m", request_id=1)
        assert type(err) is cls
        assert err.code == code
    assert error_from_code("new_code", "m").code == "internal"
