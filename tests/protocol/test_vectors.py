"""Every vector in protocol/vectors.json, both ways: frames encode to its hex, its hex decodes to frames."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from protocol import Peer, decode_message, encode_batch, from_wire, to_wire
from tests.protocol.vector_frames import SOURCES, VECTORS_PATH, from_json

VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())
FRAME_TYPES = {"hello", "sub", "unsub", "pub", "ping", "ok", "err", "ev", "gap", "bye"}


def _peer(vector: dict[str, Any]) -> Peer:
    return Peer.CLIENT if vector["from"] == "client" else Peer.SERVER


def test_there_are_enough_vectors_covering_every_frame_type() -> None:
    assert len(VECTORS) >= 25
    seen = {frame["t"] for vector in VECTORS for frame in vector["frames"]}
    assert seen == FRAME_TYPES
    assert any(len(vector["frames"]) > 1 for vector in VECTORS)


def test_vectors_file_matches_its_source() -> None:
    assert [[v["name"], v["from"], v["frames"]] for v in VECTORS] == [list(s) for s in SOURCES]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_decodes_to_its_frames(vector: dict[str, Any]) -> None:
    expected = [from_wire(from_json(f), peer=_peer(vector)) for f in vector["frames"]]
    assert decode_message(bytes.fromhex(vector["hex"]), peer=_peer(vector)) == expected


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_frames_encode_to_its_hex(vector: dict[str, Any]) -> None:
    frames = [from_wire(from_json(f), peer=_peer(vector)) for f in vector["frames"]]
    assert encode_batch(frames).hex() == vector["hex"]
    assert [to_wire(f) for f in frames] == [from_json(f) for f in vector["frames"]]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_hex_is_the_msgpack_of_its_json(vector: dict[str, Any]) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(bytes.fromhex(vector["hex"]))
    assert list(unpacker) == [from_json(f) for f in vector["frames"]]
