"""A minimal sans-IO HTTP/1.1 request parser and response builder for the peers' emit endpoint.

Enough for the bench's emitter (keep-alive, pipelining, Content-Length bodies); not a general server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    body: bytes


def parse_requests(buffer: bytearray) -> list[Request]:
    """Remove and return every complete request at the front of ``buffer``."""
    requests: list[Request] = []
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return requests
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        method, target, _version = head[0].split(" ", 2)
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(buffer) < end + 4 + length:
            return requests
        requests.append(Request(method, target, bytes(buffer[end + 4:end + 4 + length])))
        del buffer[:end + 4 + length]


def response(status: int, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def parse_emit(request: Request) -> tuple[str, str, Any] | None:
    """The channel, event and data of an emit request, or None when it is malformed."""
    try:
        payload = json.loads(request.body)
        return payload["channel"], payload["event"], payload.get("data")
    except (ValueError, KeyError, TypeError):
        return None


BAD_EMIT = response(400, {"ok": False})


def emitted(offset: int) -> bytes:
    """The response to an emit that got ``offset``."""
    return response(200, {"ok": True, "offset": offset})


class Channels:
    """Channel offsets: the part of the job every peer shares."""

    def __init__(self) -> None:
        self.top: dict[str, int] = {}

    def next_offset(self, channel: str) -> int:
        offset = self.top.get(channel, 0) + 1
        self.top[channel] = offset
        return offset

    def ok_frame(self, sub: dict[str, Any]) -> bytes:
        """The msgpack ``ok`` answering a ``sub`` frame: the channel's top offset."""
        channel = sub["ch"]
        return msgpack.packb({"t": "ok", "id": sub["id"], "ch": channel, "o": self.top.get(channel, 0),
                              "ep": "peer", "recovered": False})

    def ev_frame(self, channel: str, event: str, data: Any) -> tuple[int, bytes]:
        """The next offset of ``channel`` and the msgpack ``ev`` frame carrying it (encoded once)."""
        offset = self.next_offset(channel)
        return offset, msgpack.packb({"t": "ev", "ch": channel, "ev": event, "d": data, "o": offset})
