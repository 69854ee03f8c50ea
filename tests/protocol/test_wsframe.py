"""Pre-built server WebSocket frames parse as the same frames in wsproto's client."""

from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from protocol import LocalProtocolError, Opcode, ws_close_frame, ws_frame


def client_reads(data: bytes) -> list[object]:
    conn = Connection(ConnectionType.CLIENT)
    conn.receive_data(data)
    return list(conn.events())


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_binary_frame_of_every_length_class(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    [event] = client_reads(ws_frame(payload))
    assert isinstance(event, BytesMessage)
    assert event.data == payload
    assert event.message_finished


def test_several_frames_in_one_write() -> None:
    events = client_reads(ws_frame(b"a") + ws_frame(b"bc") + ws_frame("é".encode(), Opcode.TEXT))
    assert [(type(e).__name__, e.data) for e in events] == [  # type: ignore[attr-defined]
        ("BytesMessage", b"a"), ("BytesMessage", b"bc"), ("TextMessage", "é")]
    assert isinstance(events[2], TextMessage)


def test_ping_and_close() -> None:
    ping, close = client_reads(ws_frame(b"hb", Opcode.PING) + ws_close_frame(4101, "slow ✓" * 40))
    assert isinstance(ping, Ping) and ping.payload == b"hb"
    assert isinstance(close, CloseConnection)
    assert close.code == 4101
    assert close.reason.startswith("slow ✓")
    assert len(close.reason.encode()) <= 123


def test_control_frames_are_capped() -> None:
    with pytest.raises(LocalProtocolError, match="control frame"):
        ws_frame(b"x" * 126, Opcode.PING)
