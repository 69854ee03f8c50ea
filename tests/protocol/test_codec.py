"""Encoding and decoding frames: round trips, splitting, limits and bad input."""

from __future__ import annotations

import msgpack
import pytest

from protocol import (
    Bye,
    Code,
    Decoder,
    Err,
    Ev,
    Hello,
    Limits,
    LocalProtocolError,
    Ok,
    Peer,
    Ping,
    Position,
    Pub,
    RemoteProtocolError,
    Sub,
    Unsub,
    data_problem,
    decode_message,
    encode,
    encode_batch,
    encode_event,
)

CLIENT_FRAMES = [
    Hello(id=1, token="t", client="c"),
    Sub(id=2, ch="ai-chat/xyz", since=Position(o=2**40, ep="k3x9")),
    Unsub(id=3, ch="ai-chat/xyz"),
    Pub(id=4, ch="ai-chat/xyz", ev="ai:cancel", d={"why": ["user", 1, None, b"\x00"]}),
    Ping(id=5),
]
SERVER_FRAMES = [
    Ok(id=2, ch="ai-chat/xyz", o=17, ep="k3x9", recovered=True),
    Err(id=3, code=Code.NOT_SUBSCRIBED, msg="not subscribed"),
    Ev(ch="ai-chat/xyz", ev="ai:token", d={"token": "héllo"}, o=18, o0=15),
    Bye(code=Code.SHUTTING_DOWN, msg="bye", reconnect=True),
]


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def decode_one(value: object, peer: Peer = Peer.CLIENT) -> object:
    frames = decode_message(pack(value), peer=peer)
    assert len(frames) == 1
    return frames[0]


def decode_error(data: bytes, peer: Peer = Peer.CLIENT, **limits: int) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(data, peer=peer, limits=Limits(**limits))
    return info.value


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: f.TYPE)
def test_client_frame_round_trip(frame: object) -> None:
    assert decode_message(encode(frame), peer=Peer.CLIENT) == [frame]  # type: ignore[arg-type]


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: f.TYPE)
def test_server_frame_round_trip(frame: object) -> None:
    assert decode_message(encode(frame), peer=Peer.SERVER) == [frame]  # type: ignore[arg-type]


def test_batch_split_at_every_position_gives_the_same_frames() -> None:
    data = encode_batch(SERVER_FRAMES)
    for cut in range(len(data) + 1):
        decoder = Decoder(peer=Peer.SERVER)
        decoder.feed(data[:cut])
        frames = list(decoder)
        decoder.feed(data[cut:])
        frames += list(decoder)
        decoder.end_of_message()
        assert frames == SERVER_FRAMES, cut


def test_byte_by_byte_feeding() -> None:
    data = encode_batch(CLIENT_FRAMES)
    decoder = Decoder(peer=Peer.CLIENT)
    frames = []
    for byte in data:
        decoder.feed(bytes([byte]))
        frames += list(decoder)
    assert frames == CLIENT_FRAMES
    assert decoder.buffered == 0


def test_pub_without_d_decodes_as_nil() -> None:
    assert decode_one({"t": "pub", "id": 1, "ch": "c", "ev": "e"}) == Pub(id=1, ch="c", ev="e")


def test_unknown_keys_are_ignored() -> None:
    assert decode_one({"t": "ping", "id": 9, "future": [1, 2]}) == Ping(id=9)


def test_codes_decode_as_plain_ints_when_unknown() -> None:
    frame = decode_one({"t": "err", "id": 1, "code": 4999, "msg": "new"}, Peer.SERVER)
    assert frame == Err(id=1, code=4999, msg="new")


@pytest.mark.parametrize(
    ("wire", "code", "frame_id", "fragment"),
    [
        ({"t": "nope", "id": 3}, Code.UNKNOWN_TYPE, 3, "unknown frame type 'nope'"),
        ({"t": "ev", "id": 3}, Code.UNKNOWN_TYPE, 3, "unknown frame type 'ev'"),
        ({"id": 3}, Code.BAD_FRAME, 3, "key t"),
        ({"t": "sub", "id": 4}, Code.BAD_FRAME, 4, "missing key ch"),
        ({"t": "sub", "id": 4, "ch": ""}, Code.INVALID_FIELD, 4, "must not be empty"),
        ({"t": "sub", "id": 4, "ch": "a b"}, Code.INVALID_FIELD, 4, "characters outside"),
        ({"t": "sub", "id": 4, "ch": "x" * 256}, Code.INVALID_FIELD, 4, "limit is 255"),
        ({"t": "sub", "id": 4, "ch": 7}, Code.INVALID_FIELD, 4, "must be a string"),
        ({"t": "sub", "id": 5, "ch": "a", "since": 3}, Code.INVALID_FIELD, 5, "since must be a map"),
        ({"t": "sub", "id": 5, "ch": "a", "since": {"o": -1, "ep": "e"}}, Code.INVALID_FIELD, 5,
         "since.o must be between"),
        ({"t": "sub", "id": 5, "ch": "a", "since": {"o": 1, "ep": 7}}, Code.INVALID_FIELD, 5,
         "since.ep must be a string"),
        ({"t": "pub", "id": 6, "ch": "a", "ev": "bad event"}, Code.INVALID_FIELD, 6, "event name"),
        ({"t": "pub", "id": 6, "ch": "a", "ev": "e", "d": {1: 2}}, None, None, "invalid msgpack"),
        ({"t": "hello", "id": 7, "token": 5}, Code.INVALID_FIELD, 7, "token must be a string"),
        ({"t": "ping", "id": 0}, Code.BAD_FRAME, None, "id must be between 1 and"),
        ({"t": "ping", "id": True}, Code.BAD_FRAME, None, "id must be an integer, got bool"),
        ({"t": "ping", "id": 2**53}, Code.BAD_FRAME, None, "id must be between 1 and"),
        ({"t": "ping"}, Code.BAD_FRAME, None, "missing key id"),
    ],
)
def test_invalid_frames_name_the_problem(
    wire: dict[object, object], code: Code | None, frame_id: int | None, fragment: str
) -> None:
    error = decode_error(pack(wire))
    assert fragment in error.msg
    assert error.id == frame_id
    assert error.recoverable == (frame_id is not None)
    if code is not None:
        assert error.code == code


def test_non_map_frames_are_rejected() -> None:
    for value in (1, "sub", [1, 2], None, b"x"):
        error = decode_error(pack(value))
        assert "must be a msgpack map" in error.msg
        assert not error.recoverable


def test_garbage_bytes_break_the_decoder_for_good() -> None:
    decoder = Decoder(peer=Peer.CLIENT)
    decoder.feed(b"\xc1" + encode(Ping(id=1)))
    with pytest.raises(RemoteProtocolError) as first:
        decoder.next_frame()
    assert first.value.code == Code.BAD_FRAME
    with pytest.raises(RemoteProtocolError) as second:
        decoder.next_frame()
    assert second.value is first.value


def test_recoverable_error_lets_later_frames_through() -> None:
    decoder = Decoder(peer=Peer.CLIENT)
    decoder.feed(pack({"t": "what", "id": 1}) + encode(Ping(id=2)))
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()
    assert decoder.next_frame() == Ping(id=2)


def test_message_ending_inside_a_frame_is_an_error() -> None:
    decoder = Decoder(peer=Peer.CLIENT)
    decoder.feed(encode(Ping(id=1))[:-1])
    assert decoder.next_frame() is None
    with pytest.raises(RemoteProtocolError, match="ends inside a frame"):
        decoder.end_of_message()


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    frame = encode(Pub(id=1, ch="c", ev="e", d="x" * 5000))
    decoder = Decoder(peer=Peer.CLIENT, limits=Limits(max_frame_size=1000))
    decoder.feed(frame)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code in (Code.FRAME_TOO_LARGE, Code.BAD_FRAME)
    assert decoder.buffered <= len(frame)


def test_oversized_frame_streamed_in_small_pieces_is_refused() -> None:
    decoder = Decoder(peer=Peer.CLIENT, limits=Limits(max_frame_size=1000))
    decoder.feed(b"\xdb\x00\x01\x00\x00")  # str32 header announcing 65536 bytes
    with pytest.raises(RemoteProtocolError):
        for _ in range(200):
            decoder.feed(b"a" * 100)
            decoder.next_frame()


def test_many_small_frames_over_the_frame_limit_in_total_are_fine() -> None:
    data = encode_batch([Ping(id=i) for i in range(1, 500)])
    assert len(data) > 1000
    assert len(decode_message(data, peer=Peer.CLIENT, limits=Limits(max_frame_size=1000))) == 499


def test_nesting_limit() -> None:
    deep: object = "leaf"
    for _ in range(10):
        deep = [deep]
    assert decode_message(pack({"t": "pub", "id": 1, "ch": "c", "ev": "e", "d": deep}),
                          peer=Peer.CLIENT, limits=Limits(max_nesting=10))
    error = decode_error(pack({"t": "pub", "id": 1, "ch": "c", "ev": "e", "d": [deep]}),
                         max_nesting=10)
    assert "nested deeper than 10" in error.msg
    assert error.code == Code.INVALID_FIELD


def test_very_deep_nesting_is_an_error_not_a_crash() -> None:
    error = decode_error(b"\x91" * 100_000 + b"\xc0")
    assert error.code in (Code.BAD_FRAME, Code.FRAME_TOO_LARGE)


def test_ext_types_are_rejected() -> None:
    data = pack({"t": "pub", "id": 1, "ch": "c", "ev": "e", "d": msgpack.ExtType(5, b"x")})
    assert "unsupported msgpack type" in decode_error(data).msg
    stamp = pack({"t": "pub", "id": 1, "ch": "c", "ev": "e", "d": msgpack.Timestamp(1)})
    assert "unsupported msgpack type" in decode_error(stamp).msg


def test_invalid_utf8_is_bad_msgpack() -> None:
    assert "invalid msgpack" in decode_error(b"\x81\xa1t\xa2\xff\xfe").msg


def test_encoding_an_unencodable_value_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode pub"):
        encode(Pub(id=1, ch="c", ev="e", d=object()))
    with pytest.raises(LocalProtocolError):
        encode(Ev(ch="c", ev="e", o=2**64))


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frame_size must be a positive integer"):
        Limits(max_frame_size=0)


def test_encode_event_matches_encode() -> None:
    frame = Ev(ch="ai-chat/1", ev="ai:token", d={"token": "hi", "n": [1, b"\x00"]}, o=2**40)
    assert encode_event(frame.ch, frame.ev, frame.d, frame.o) == encode(frame)
    with pytest.raises(LocalProtocolError):
        encode_event("c", "e", object(), 1)


def test_data_problem() -> None:
    assert data_problem({"token": "x", "n": [1, 2.5, None, True, b""]}) is None
    assert data_problem({1: 2}) == "map keys in d must be strings"
    assert data_problem(object()) == "d holds an unsupported msgpack type (object)"


def test_a_large_batch_in_one_message() -> None:
    # 20,000 frames, 1 MB: a decoder that copied the rest of the message per frame
    # would make this test take minutes.
    frames = [Ev(ch="c", ev="ai:token", d={"token": "x" * 20}, o=i) for i in range(20_000)]
    data = encode_batch(frames)
    assert decode_message(data, peer=Peer.SERVER, limits=Limits(max_frame_size=16 * 1024 * 1024)) == frames
