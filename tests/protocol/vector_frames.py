"""Source of ``protocol/vectors.json``: the frames of every vector, in JSON form.

Run ``python -m tests.protocol.vector_frames`` to regenerate the file after a
deliberate change to the wire format (the tests catch accidental ones). JSON
cannot hold bytes or integers beyond 2**53 exactly, so vectors write them as
``{"$bin": "<hex>"}`` and ``{"$bigint": "<decimal>"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS_PATH = Path(__file__).resolve().parents[2] / "protocol" / "vectors.json"

TOKEN = {"t": "ev", "ch": "ai-chat/3f2a", "ev": "ai:token"}

SOURCES: list[tuple[str, str, list[dict[str, Any]]]] = [
    ("hello, minimal", "client", [{"t": "hello", "id": 1}]),
    ("hello with token and client", "client",
     [{"t": "hello", "id": 1, "token": "secret-token", "client": "tokenfan-py/0.1"}]),
    ("sub", "client", [{"t": "sub", "id": 2, "ch": "ai-chat/xyz"}]),
    ("sub with since", "client",
     [{"t": "sub", "id": 2, "ch": "ai-chat/xyz", "since": {"o": 17, "ep": "k3x9"}}]),
    ("sub with since beyond 2^32", "client",
     [{"t": "sub", "id": 7, "ch": "news", "since": {"o": 4294967296, "ep": "e1"}}]),
    ("sub catching up from the start (since without ep)", "client",
     [{"t": "sub", "id": 3, "ch": "ai-chat/xyz", "since": {"o": 0}}]),
    ("unsub", "client", [{"t": "unsub", "id": 3, "ch": "ai-chat/xyz"}]),
    ("pub ai:cancel", "client",
     [{"t": "pub", "id": 4, "ch": "ai-chat/xyz", "ev": "ai:cancel", "d": {}}]),
    ("pub with nil data", "client", [{"t": "pub", "id": 5, "ch": "room.1", "ev": "typing", "d": None}]),
    ("pub with nested data", "client",
     [{"t": "pub", "id": 6, "ch": "room_2", "ev": "vote",
       "d": {"choice": [1, 2, {"why": ["a", "b"]}], "weight": 0.5, "final": True}}]),
    ("pub with binary data", "client",
     [{"t": "pub", "id": 8, "ch": "files", "ev": "chunk", "d": {"$bin": "00ff10"}}]),
    ("ping", "client", [{"t": "ping", "id": 5}]),
    ("ping with the largest id", "client", [{"t": "ping", "id": 9007199254740991}]),
    ("batch of client commands", "client",
     [{"t": "sub", "id": 1, "ch": "a"}, {"t": "sub", "id": 2, "ch": "b"}, {"t": "ping", "id": 3}]),
    ("ok for ping", "server", [{"t": "ok", "id": 5}]),
    ("ok for sub", "server",
     [{"t": "ok", "id": 2, "ch": "ai-chat/xyz", "o": 17, "ep": "k3x9", "recovered": False}]),
    ("ok for sub, recovered beyond 2^32", "server",
     [{"t": "ok", "id": 2, "ch": "ai-chat/xyz", "o": 8589934592, "ep": "k3x9", "recovered": True}]),
    ("ok for pub", "server", [{"t": "ok", "id": 4, "o": 18, "ep": "k3x9"}]),
    ("ok for hello", "server", [{"t": "ok", "id": 1, "server": "tokenfan/0.1.0"}]),
    ("err", "server",
     [{"t": "err", "id": 2, "code": 4002, "msg": "sub: channel name must not be empty"}]),
    ("ev ai:token", "server", [{**TOKEN, "d": {"token": "Hello"}, "o": 18}]),
    ("ev with unicode text", "server",
     [{**TOKEN, "d": {"token": "héllo 世界 🚀"}, "o": 19}]),
    ("ev with an empty token", "server", [{**TOKEN, "d": {"token": ""}, "o": 20}]),
    ("ev coalesced with o0", "server", [{**TOKEN, "d": {"token": "Hello world"}, "o": 25, "o0": 21}]),
    ("ev with offset beyond 2^53", "server",
     [{**TOKEN, "d": {"token": "x"}, "o": {"$bigint": "9007199254740993"}}]),
    ("ev with the largest offset", "server",
     [{**TOKEN, "d": {"token": "y"}, "o": {"$bigint": "18446744073709551615"}}]),
    ("ev with binary data", "server",
     [{"t": "ev", "ch": "files", "ev": "chunk", "d": {"$bin": "deadbeef"}, "o": 1}]),
    ("ev ai:done", "server",
     [{"t": "ev", "ch": "ai-chat/3f2a", "ev": "ai:done", "d": {}, "o": 30}]),
    ("ev with mixed scalar data", "server",
     [{"t": "ev", "ch": "metrics", "ev": "sample",
       "d": [-1, -129, 65536, 1.25, False, None, "s"], "o": 0}]),
    ("gap: publications dropped for a slow reader", "server",
     [{"t": "gap", "ch": "cursors/room-1", "o0": 120, "o": 245}]),
    ("bye, shutting down", "server",
     [{"t": "bye", "code": 4100, "msg": "server shutting down", "reconnect": True}]),
    ("bye, slow consumer", "server",
     [{"t": "bye", "code": 4101, "msg": "send buffer full", "reconnect": True}]),
    ("ok to an authenticating hello: user and exp", "server",
     [{"t": "ok", "id": 1, "server": "tokenfan/0.1.0", "user": "alice", "exp": 1767225600}]),
    ("bye, unauthorized (do not reconnect)", "server",
     [{"t": "bye", "code": 4009, "msg": "bad token: token expired", "reconnect": False}]),
    ("bye, token expired (reconnect with a fresh token)", "server",
     [{"t": "bye", "code": 4104, "msg": "your token expired", "reconnect": True}]),
    ("batch of tokens", "server",
     [{**TOKEN, "d": {"token": "The"}, "o": 1}, {**TOKEN, "d": {"token": " quick"}, "o": 2},
      {**TOKEN, "d": {"token": " fox"}, "o": 3}]),
    ("batch of a reply and events", "server",
     [{"t": "ok", "id": 2, "ch": "ai-chat/3f2a", "o": 3, "ep": "k3x9", "recovered": True},
      {**TOKEN, "d": {"token": " jumps"}, "o": 4}]),
]


def from_json(value: Any) -> Any:
    """Turn the JSON form of a frame value into the Python value msgpack encodes."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        if set(value) == {"$bigint"}:
            return int(value["$bigint"])
        return {key: from_json(child) for key, child in value.items()}
    if isinstance(value, list):
        return [from_json(child) for child in value]
    return value


def main() -> None:
    import msgpack

    vectors = []
    for name, sender, frames in SOURCES:
        data = b"".join(msgpack.packb(from_json(frame), use_bin_type=True) for frame in frames)
        vectors.append({"name": name, "from": sender, "frames": frames, "hex": data.hex()})
    VECTORS_PATH.write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(vectors)} vectors to {VECTORS_PATH}")


if __name__ == "__main__":
    main()
