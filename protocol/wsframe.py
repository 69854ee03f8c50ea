"""Server-to-client WebSocket frame bytes, built once and shared.

Server frames are unmasked (RFC 6455 §5.1) and tokenfan negotiates no
extension, so the bytes of a frame depend on its payload alone: the broker
builds them once per publication and writes the same ``bytes`` object to every
subscriber (DESIGN.md §2). wsproto is still used for the handshake and for
reading client frames; this module only writes.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from protocol.errors import LocalProtocolError


class Opcode(IntEnum):
    """WebSocket opcodes (RFC 6455 §5.2)."""

    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_FIN = 0x80
_CONTROL_MAX = 125


def ws_frame(payload: bytes, opcode: Opcode = Opcode.BINARY) -> bytes:
    """Return a complete, final, unmasked WebSocket frame carrying ``payload``."""
    size = len(payload)
    first = _FIN | opcode
    if opcode >= Opcode.CLOSE and size > _CONTROL_MAX:
        raise LocalProtocolError(f"control frame payload of {size} bytes exceeds {_CONTROL_MAX}")
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


def ws_close_frame(code: int, reason: str = "") -> bytes:
    """Return a close frame with ``code`` and a reason cut to fit a control frame."""
    encoded = reason.encode("utf-8")[: _CONTROL_MAX - 2]
    # Cutting may split a UTF-8 sequence; drop the partial character.
    encoded = encoded.decode("utf-8", "ignore").encode("utf-8")
    return ws_frame(struct.pack("!H", code) + encoded, Opcode.CLOSE)


def split_ws_frames(data: bytes | memoryview) -> list[tuple[Opcode, int, int, int]] | None:
    """Split bytes made of whole, final, unmasked frames (what the server writes).

    Returns ``(opcode, start, payload_start, end)`` for each frame, or None if
    ``data`` is anything else (a fragment, a masked frame, an HTTP response).
    """
    frames: list[tuple[Opcode, int, int, int]] = []
    size = len(data)
    index = 0
    while index < size:
        if size - index < 2:
            return None
        first, second = data[index], data[index + 1]
        if not first & _FIN or first & 0x70 or second & 0x80:
            return None
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            return None
        length, header = second & 0x7F, 2
        if length == 126:
            if size - index < 4:
                return None
            length, header = struct.unpack_from("!H", data, index + 2)[0], 4
        elif length == 127:
            if size - index < 10:
                return None
            length, header = struct.unpack_from("!Q", data, index + 2)[0], 10
        end = index + header + length
        if end > size:
            return None
        frames.append((opcode, index, index + header, end))
        index = end
    return frames
