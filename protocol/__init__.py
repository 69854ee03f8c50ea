"""The tokenfan wire protocol, sans-IO: frames, msgpack codec, codes and WebSocket framing.

This package imports neither trio nor socket; ``broker`` and the clients
drive it. See ``docs/protocol.md`` for the specification.
"""

from protocol.codec import (
    Decoder,
    Peer,
    data_problem,
    decode_message,
    encode,
    encode_batch,
    encode_event,
    from_wire,
    to_wire,
)
from protocol.codes import Code
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.frames import (
    Bye,
    ClientFrame,
    Err,
    Ev,
    Frame,
    Gap,
    Hello,
    Ok,
    Ping,
    Position,
    Pub,
    ServerFrame,
    Sub,
    Unsub,
)
from protocol.limits import CLIENT_LIMITS, SERVER_LIMITS, Limits, channel_problem, event_problem
from protocol.wsframe import Opcode, split_ws_frames, ws_close_frame, ws_frame

__all__ = [
    "CLIENT_LIMITS", "SERVER_LIMITS", "Bye", "ClientFrame", "Code", "Decoder", "Err", "Ev",
    "Frame", "Gap", "Hello", "Limits", "LocalProtocolError", "Ok", "Opcode", "Peer", "Ping",
    "Position", "ProtocolError", "Pub", "RemoteProtocolError", "ServerFrame", "Sub", "Unsub",
    "channel_problem", "data_problem", "decode_message", "encode", "encode_batch", "encode_event",
    "event_problem",
    "from_wire", "split_ws_frames", "to_wire", "ws_close_frame", "ws_frame",
]
