"""Encoding frames to msgpack bytes and decoding them back, sans-IO.

Theory of operation
-------------------
A WebSocket message carries one or more msgpack values back to back; each is
one frame, a map with string keys. :func:`encode` and :func:`encode_batch`
turn frames into those bytes. A :class:`Decoder` is fed bytes (whole
messages, or a stream cut anywhere) and hands back frames one at a time from
:meth:`Decoder.next_frame`.

Bounds hold while decoding: an unfinished frame may not grow past
``limits.max_frame_size`` (so a peer cannot make us buffer without end), the
C unpacker caps string, array and map sizes at that same bound, and nesting
inside ``d`` is capped by ``limits.max_nesting``. Any input either yields
frames or raises :class:`~protocol.errors.RemoteProtocolError`; nothing else
escapes.

There are two depths of failure. If the bytes are not msgpack, the stream is
lost and the decoder stays broken: every later call raises the same error.
If a well-formed map is not a valid frame, only that frame is rejected; when
its ``id`` could be read the error is recoverable and decoding continues with
the next frame.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Any, Final

import msgpack

from protocol.codes import Code
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    CLIENT_FRAME_TYPES,
    SERVER_FRAME_TYPES,
    ClientFrame,
    Frame,
    Position,
    ServerFrame,
)
from protocol.limits import (
    CLIENT_LIMITS,
    MAX_ID,
    MAX_OFFSET,
    Limits,
    channel_problem,
    event_problem,
)


class Peer(Enum):
    """Whose frames a decoder reads."""

    CLIENT = "client"  #: frames sent by clients (a server decodes these)
    SERVER = "server"  #: frames sent by servers (a client decodes these)


_TYPES: Final[dict[Peer, dict[str, type[Any]]]] = {
    Peer.CLIENT: dict(CLIENT_FRAME_TYPES),
    Peer.SERVER: dict(SERVER_FRAME_TYPES),
}

# Every field name means the same kind of value in every frame that has it.
_FIELD_KINDS: Final[dict[str, str]] = {
    "id": "id", "code": "code",
    "ch": "channel", "ev": "event",
    "o": "offset", "o0": "offset",
    "token": "token", "client": "text", "ep": "text", "msg": "text", "server": "text",
    "user": "text", "exp": "offset",
    "recovered": "bool", "reconnect": "bool",
    "since": "position", "d": "data",
}

_ALWAYS_ENCODED: Final = frozenset({"d"})


# -- encoding -----------------------------------------------------------------


def to_wire(frame: Frame) -> dict[str, Any]:
    """The msgpack map of ``frame``: ``"t"`` first, then its fields in declaration order."""
    wire: dict[str, Any] = {"t": frame.TYPE}
    for field in dataclasses.fields(frame):
        value = getattr(frame, field.name)
        if value is None and field.name not in _ALWAYS_ENCODED:
            continue
        if isinstance(value, Position):
            value = {"o": value.o} if value.ep is None else {"o": value.o, "ep": value.ep}
        wire[field.name] = value
    return wire


def encode(frame: Frame) -> bytes:
    """Encode one frame as msgpack bytes.

    Raises:
        LocalProtocolError: ``frame`` holds a value msgpack cannot encode.
    """
    try:
        return msgpack.packb(to_wire(frame), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {frame.TYPE} frame: {exc}") from exc


def encode_event(ch: str, ev: str, d: Any, o: int) -> bytes:
    """Encode ``Ev(ch=ch, ev=ev, d=d, o=o)`` without building the dataclass (the publish hot path).

    The bytes are identical to :func:`encode` of that frame.

    Raises:
        LocalProtocolError: ``d`` holds a value msgpack cannot encode.
    """
    try:
        return msgpack.packb({"t": "ev", "ch": ch, "ev": ev, "d": d, "o": o}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode ev frame: {exc}") from exc


def data_problem(value: object, limits: Limits = CLIENT_LIMITS, *, field: str = "d") -> str | None:
    """Say what is wrong with a ``d`` value (types, map keys, nesting), or return None.

    The message calls the value ``field``: ``d`` as in frames; an API whose
    callers write ``data`` passes ``field="data"``.
    """
    return _check_data(value, limits, field)


def encode_batch(frames: Iterable[Frame]) -> bytes:
    """Encode several frames back to back, as one WebSocket message carries them."""
    return b"".join(encode(frame) for frame in frames)


# -- validation ---------------------------------------------------------------


def _read_id(wire: dict[Any, Any]) -> int | None:
    value = wire.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID:
        return value
    return None


#: The integers msgpack can carry.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _string_problem(text: str, field: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{field} holds a string that is not valid Unicode (a lone surrogate such as \\ud800)"
    return None


def _check_data(value: object, limits: Limits, field: str = "d") -> str | None:
    """Say what is wrong with a ``d`` value, or None. Iterative, so depth cannot blow the stack.

    Everything msgpack would refuse to encode is caught here (so a batch that
    passes can be published whole), and so are NaN and the infinities, which
    msgpack carries but JSON (the HTTP API's history, browsers' JSON.parse of
    it) cannot.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limits.max_nesting:
                return f"{field} is nested deeper than {limits.max_nesting} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"map keys in {field} must be strings"
                    problem = _string_problem(key, field)
                    if problem is not None:
                        return problem
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            problem = _string_problem(item, field)
            if problem is not None:
                return problem
        elif item is None or isinstance(item, (bool, bytes)):
            continue
        elif isinstance(item, int):
            if not _INT_MIN <= item <= _INT_MAX:
                return f"{field} holds an integer outside msgpack's range (-2**63 to 2**64-1)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{field} holds {item!r}: NaN and infinities are refused (JSON cannot carry them)"
        else:
            return f"{field} holds an unsupported msgpack type ({type(item).__name__})"
    return None


def _check_field(name: str, value: object, limits: Limits) -> tuple[object, str | None]:
    """Validate one field; return the value to store and a problem description or None."""
    kind = _FIELD_KINDS[name]
    if kind == "data":
        return value, _check_data(value, limits)
    if kind in ("id", "offset", "code"):
        if not isinstance(value, int) or isinstance(value, bool):
            return value, f"{name} must be an integer, got {type(value).__name__}"
        low, high = {"id": (1, MAX_ID), "offset": (0, MAX_OFFSET), "code": (0, 65535)}[kind]
        if not low <= value <= high:
            return value, f"{name} must be between {low} and {high}, got {value}"
        return value, None
    if kind == "bool":
        return value, None if isinstance(value, bool) else f"{name} must be a boolean"
    if kind == "channel":
        return value, channel_problem(value, limits)
    if kind == "event":
        return value, event_problem(value, limits)
    if kind in ("text", "token"):
        if not isinstance(value, str):
            return value, f"{name} must be a string, got {type(value).__name__}"
        longest = limits.max_token_len if kind == "token" else limits.max_text_len
        if len(value) > longest:
            return value, f"{name} is longer than {longest} characters"
        return value, None
    # kind == "position"
    if not isinstance(value, dict):
        return value, f"{name} must be a map with keys o and (optionally) ep"
    offset, problem = _check_field("o", value.get("o"), limits)
    epoch = value.get("ep")
    if problem is None and epoch is not None:
        epoch, problem = _check_field("ep", epoch, limits)
    if problem is not None:
        return value, f"{name}.{problem}"
    assert isinstance(offset, int) and (epoch is None or isinstance(epoch, str))
    return Position(o=offset, ep=epoch), None


def from_wire(wire: object, *, peer: Peer, limits: Limits = CLIENT_LIMITS) -> Frame:
    """Validate a decoded msgpack value and build the frame it describes.

    Unknown keys are ignored, so that newer peers may add optional keys.

    Raises:
        RemoteProtocolError: the value is not a valid frame from ``peer``.
    """
    if not isinstance(wire, dict):
        raise RemoteProtocolError(f"a frame must be a msgpack map, got {type(wire).__name__}")
    frame_id = _read_id(wire)
    type_name = wire.get("t")
    if not isinstance(type_name, str):
        raise RemoteProtocolError("a frame needs a string key t naming its type", id=frame_id)
    cls = _TYPES[peer].get(type_name)
    if cls is None:
        raise RemoteProtocolError(f"unknown frame type {type_name[:32]!r}",
                                  code=Code.UNKNOWN_TYPE, id=frame_id)
    kwargs: dict[str, object] = {}
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING
        if field.name not in wire or (wire[field.name] is None and field.name != "d"):
            if required:
                raise RemoteProtocolError(f"{type_name} frame is missing key {field.name}",
                                          id=frame_id)
            continue
        value, problem = _check_field(field.name, wire[field.name], limits)
        if problem is not None:
            code = Code.BAD_FRAME if field.name == "id" else Code.INVALID_FIELD
            raise RemoteProtocolError(f"{type_name}: {problem}", code=code, id=frame_id)
        kwargs[field.name] = value
    frame: Frame = cls(**kwargs)
    return frame


# -- decoding -----------------------------------------------------------------


class Decoder:
    """Turns bytes from a peer into frames, within :class:`~protocol.limits.Limits`.

    Usage::

        decoder = Decoder(peer=Peer.CLIENT)
        decoder.feed(message)
        while (frame := decoder.next_frame()) is not None:
            handle(frame)
        decoder.end_of_message()   # for message-framed transports such as WebSocket
    """

    def __init__(self, *, peer: Peer, limits: Limits = CLIENT_LIMITS) -> None:
        self._peer = peer
        self._limits = limits
        # A msgpack Unpacker costs about 40 KiB (its parse stack), so an idle decoder
        # holds none: one is made when bytes arrive and dropped when they are used up.
        self._unpacker: msgpack.Unpacker | None = None
        self._backlog = bytearray()  # fed but not yet handed to the unpacker
        self._fed = 0  # bytes handed to the unpacker so far
        # Stream position where the frame being decoded starts. The unpacker's
        # tell() moves through a partly decoded frame, so it cannot say this.
        self._frame_start = 0
        self._broken: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as frames."""
        return len(self._backlog) + self._fed - self._frame_start

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        self._backlog += data

    def next_frame(self) -> ClientFrame | ServerFrame | None:
        """Return the next complete frame, or None when more bytes are needed.

        Raises:
            RemoteProtocolError: the bytes are not a valid frame. When the error
                is not recoverable the decoder is broken and raises it again on
                every later call.
        """
        if self._broken is not None:
            raise self._broken
        try:
            value = self._next_value()
        except RemoteProtocolError as exc:
            self._broken = exc
            self._unpacker = None
            raise
        if value is _NEED_DATA:
            if not self.buffered:
                self._unpacker = None
                self._fed = self._frame_start = 0
            return None
        return from_wire(value, peer=self._peer, limits=self._limits)

    def __iter__(self) -> Iterator[Frame]:
        """Iterate over the frames that are complete now."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def end_of_message(self) -> None:
        """Assert that the bytes fed so far end on a frame boundary.

        Raises:
            RemoteProtocolError: a message ended inside a frame.
        """
        if self._broken is not None:
            raise self._broken
        if self.buffered:
            self._broken = RemoteProtocolError(
                f"message ends inside a frame ({self.buffered} bytes left over)")
            raise self._broken

    def _new_unpacker(self) -> msgpack.Unpacker:
        size = self._limits.max_frame_size
        return msgpack.Unpacker(
            raw=False, use_list=True, strict_map_key=True, max_buffer_size=size,
            read_size=min(size, 16 * 1024), max_str_len=size, max_bin_len=size,
            max_array_len=size, max_map_len=size, max_ext_len=size,
        )

    def _unpack_whole(self) -> object:
        """Fast path for whole frames: ``unpackb`` needs no 40 KiB Unpacker.

        Returns the first value of the backlog (keeping the rest), or
        ``_NEED_DATA`` when the backlog ends inside its first value.
        """
        size = self._limits.max_frame_size
        data = bytes(self._backlog[:size + 1])
        try:
            value = msgpack.unpackb(
                data, raw=False, use_list=True, strict_map_key=True, max_str_len=size,
                max_bin_len=size, max_array_len=size, max_map_len=size, max_ext_len=size)
            rest = b""
        except msgpack.ExtraData as extra:  # more frames follow the first
            value, rest = getattr(extra, "unpacked"), getattr(extra, "extra")  # noqa: B009 (untyped in stubs)
        except ValueError as exc:
            if "incomplete input" in str(exc):
                return _NEED_DATA
            raise RemoteProtocolError(f"invalid msgpack: {_describe(exc)}") from None
        except (TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"invalid msgpack: {_describe(exc)}") from None
        used = len(data) - len(rest)
        if used > size:
            raise RemoteProtocolError(f"frame larger than the {size}-byte limit", code=Code.FRAME_TOO_LARGE)
        del self._backlog[:used]
        if rest:
            # Several frames in one message: read the others with the streaming
            # Unpacker, which does not copy the rest of the message per frame.
            self._fed = self._frame_start = 0
            self._unpacker = self._new_unpacker()
        return value

    def _next_value(self) -> object:
        limit = self._limits.max_frame_size
        if self._unpacker is None:
            if not self._backlog:
                return _NEED_DATA
            value = self._unpack_whole()
            if value is not _NEED_DATA:
                return value
            self._unpacker = self._new_unpacker()
        unpacker = self._unpacker
        while True:
            try:
                value = unpacker.unpack()
            except msgpack.OutOfData:
                pass
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                # FormatError, StackError, UnicodeDecodeError, size limits, bad map keys...
                raise RemoteProtocolError(f"invalid msgpack: {_describe(exc)}") from None
            else:
                self._frame_start = unpacker.tell()
                return value
            # Never hand the unpacker more than the frame limit past the frame's start:
            # that bounds the memory a peer can make us spend on one unfinished frame.
            room = limit - (self._fed - self._frame_start)
            if room <= 0:
                raise RemoteProtocolError(f"frame larger than the {limit}-byte limit",
                                          code=Code.FRAME_TOO_LARGE)
            if not self._backlog:
                return _NEED_DATA
            chunk = bytes(self._backlog[:room])
            del self._backlog[:room]
            unpacker.feed(chunk)
            self._fed += len(chunk)


_NEED_DATA: Final = object()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def decode_message(data: bytes, *, peer: Peer, limits: Limits = CLIENT_LIMITS) -> list[Frame]:
    """Decode one whole message into its frames; any invalid frame raises."""
    decoder = Decoder(peer=peer, limits=limits)
    decoder.feed(data)
    frames = list(decoder)
    decoder.end_of_message()
    return frames
