"""What a ``nats://`` store keeps in JetStream, byte for byte (docs/cluster.md).

Two streams, named after ``Config.nats_stream`` (say ``S``):

**``S``, the change log**, takes the one subject ``S.log`` and nothing else: one message
per **group** of whole batches (a group commit of one node), never part of a batch.
Headers:

* ``Nats-Expected-Last-Sequence: L``: the stream sequence of the previous message
  (0: none). JetStream stores the message only if that is still the stream's last one,
  so the log is a chain that every node extends from what it has read; the header stays
  in the stored message for readers to check. (Not ``...-Last-Subject-Sequence``: a
  clustered nats-server 2.9 does not check that one atomically against publishes in
  flight, and lets two messages follow the same one.)
* ``Nats-Msg-Id``: ``<node>.<n>``, the same for every attempt of one group.
* ``Statecast-Format: 1`` (or ``2``, below), ``Statecast-Seq`` (the seq of the group's
  first change) and ``Statecast-Count`` (its number of changes).

The body is a msgpack array of batches, each an array of changes
``[collection, key, key_json, value_json or nil]`` (``PreparedChange``). A group with
batches published under idempotency keys (protocol §3.3.1) has format 2: its body is
the array ``[batches, keys]``, ``keys`` a map from a batch's index in the group to
``[key, time]`` (seconds since the epoch), so that every node learns every key with the
batch. (A group without keys keeps format 1: nodes of an older statecast read it.)

**``S_ckpt``, the checkpoints**, on two kinds of subject:

* ``S.ckpt``: one manifest per checkpoint (:class:`Manifest`, JSON), written after its
  data;
* ``S.ckpt.<id>``: the data of checkpoint ``<id>``, msgpack arrays of records
  ``[collection, key, seq, line]``, ``line`` being the §4.1 ``record`` frame.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

import msgspec

from statecast.core.protocol import PreparedChange

__all__ = [
    "COUNT_HEADER",
    "FORMAT",
    "FORMAT_HEADER",
    "MSG_ID_HEADER",
    "PREV_HEADER",
    "SEQ_HEADER",
    "Manifest",
    "Subjects",
    "decode_batches",
    "decode_chunk",
    "decode_group",
    "decode_manifest",
    "encode_batch_body",
    "encode_chunk",
    "encode_manifest",
    "epoch_of",
    "group_body",
    "keyed_group_body",
]

FORMAT: Final = 2  # the newest format read; groups without keys are written as 1
FORMAT_HEADER: Final = "Statecast-Format"
SEQ_HEADER: Final = "Statecast-Seq"
COUNT_HEADER: Final = "Statecast-Count"
PREV_HEADER: Final = "Nats-Expected-Last-Sequence"
MSG_ID_HEADER: Final = "Nats-Msg-Id"


class Subjects:
    """The streams and subjects of one log named ``stream``."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.log = f"{stream}.log"
        self.checkpoints = f"{stream}_ckpt"
        self.manifests = f"{stream}.ckpt"
        self.chunks = f"{stream}.ckpt.*"

    def chunk(self, checkpoint_id: str) -> str:
        return f"{self.stream}.ckpt.{checkpoint_id}"


def epoch_of(stream: str, created: str) -> str:
    """The epoch of a stream: a digest of its name and its creation time, as JetStream
    reports it (nanoseconds, RFC 3339). The same on every node and server; a stream
    deleted and created again under the same name gets another one."""
    return hashlib.sha256(f"{stream}\n{created}".encode()).hexdigest()[:16]


# -- the log ------------------------------------------------------------------------
_encode = msgspec.msgpack.Encoder().encode
_batches = msgspec.msgpack.Decoder(list[list[tuple[str, str, bytes, bytes | None]]])


def encode_batch_body(batch: Sequence[PreparedChange]) -> bytes:
    """One batch, msgpack-encoded once (at submit), to be joined into a group."""
    return _encode(batch)


def group_body(encoded: Sequence[bytes]) -> bytes:
    """The body of a log message: a msgpack array of already encoded batches."""
    n = len(encoded)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 1 << 16:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(encoded)


def decode_batches(body: bytes) -> list[list[PreparedChange]]:
    """The batches of a log message (raises ``msgspec.DecodeError`` if it is not one)."""
    return _batches.decode(body)


GroupKeys = dict[int, tuple[str, float]]  # a batch's index in its group -> its key, when
_keyed = msgspec.msgpack.Decoder(
    tuple[list[list[tuple[str, str, bytes, bytes | None]]], dict[int, tuple[str, float]]]
)


def keyed_group_body(encoded: Sequence[bytes], keys: GroupKeys) -> bytes:
    """The body of a format 2 log message: ``[batches, keys]``."""
    return b"\x92" + group_body(encoded) + _encode(keys)


def decode_group(body: bytes, fmt: int) -> tuple[list[list[PreparedChange]], GroupKeys]:
    """The batches of a log message of format ``fmt``, and their keys (raises
    ``msgspec.DecodeError`` if it is not one)."""
    if fmt < 2:
        return _batches.decode(body), {}
    batches, keys = _keyed.decode(body)
    return batches, keys


# -- checkpoints --------------------------------------------------------------------
ChunkRow = tuple[str, str, int, bytes]
_chunk = msgspec.msgpack.Decoder(list[tuple[str, str, int, bytes]])


def encode_chunk(rows: Sequence[ChunkRow]) -> bytes:
    return _encode(rows)


def decode_chunk(body: bytes) -> list[ChunkRow]:
    return _chunk.decode(body)


class Manifest(msgspec.Struct, forbid_unknown_fields=False):
    """One checkpoint: the state at ``seq``, which includes every ``S.log`` message up to
    stream sequence ``log_seq``, in ``chunks`` messages on ``S.ckpt.<id>`` (the first at
    stream sequence ``first_chunk``), holding ``records`` records."""

    id: str
    seq: int
    log_seq: int
    records: int
    chunks: int
    bytes: int
    epoch: str
    node: str
    created: str
    first_chunk: int = 0  # stream seq of its first data message
    format: int = FORMAT


_manifest = msgspec.json.Decoder(Manifest)


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.encode(manifest)


def decode_manifest(body: bytes) -> Manifest:
    return _manifest.decode(body)
