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
