"""Hypothesis properties: round trips over generated frames, split invariance, garbage safety."""

from __future__ import annotations

import contextlib

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Bye,
    Decoder,
    Err,
    Ev,
    Frame,
    Gap,
    Hello,
    Ok,
    Peer,
    Ping,
    Position,
    Pub,
    RemoteProtocolError,
    Sub,
    Unsub,
    decode_message,
    encode_batch,
)

NAME_CHARS = st.sampled_from("abcXYZ019_.:/-")
names = st.text(NAME_CHARS, min_size=1, max_size=40)
ids = st.integers(1, 2**53 - 1)
offsets = st.integers(0, 2**64 - 1)
texts = st.text(max_size=50)
data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                       max_size=4),
    max_leaves=12,
)
positions = st.builds(Position, o=offsets, ep=st.none() | texts)

client_frames = st.one_of(
    st.builds(Hello, id=ids, token=st.none() | texts, client=st.none() | texts),
    st.builds(Sub, id=ids, ch=names, since=st.none() | positions),
    st.builds(Unsub, id=ids, ch=names),
    st.builds(Pub, id=ids, ch=names, ev=names, d=data),
    st.builds(Ping, id=ids),
)
server_frames = st.one_of(
    st.builds(Ok, id=ids, ch=st.none() | names, o=st.none() | offsets, ep=st.none() | texts,
              recovered=st.none() | st.booleans(), server=st.none() | texts),
    st.builds(Err, id=ids, code=st.integers(4000, 4999), msg=texts),
    st.builds(Ev, ch=names, ev=names, d=data, o=offsets, o0=st.none() | offsets),
    st.builds(Gap, ch=names, o0=offsets, o=offsets),
    st.builds(Bye, code=st.integers(4000, 4999), msg=texts, reconnect=st.booleans()),
)


@given(st.lists(client_frames, min_size=1, max_size=6))
def test_client_frames_round_trip(frames: list[Frame]) -> None:
    assert decode_message(encode_batch(frames), peer=Peer.CLIENT) == frames


@given(st.lists(server_frames, min_size=1, max_size=6))
def test_server_frames_round_trip(frames: list[Frame]) -> None:
    assert decode_message(encode_batch(frames), peer=Peer.SERVER) == frames


@given(st.lists(server_frames, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_splitting_anywhere_gives_the_same_frames(frames: list[Frame], cuts: list[int]) -> None:
    data = encode_batch(frames)
    points = [*sorted({min(c, len(data)) for c in cuts}), len(data)]
    decoder = Decoder(peer=Peer.SERVER)
    decoded: list[Frame] = []
    start = 0
    for point in points:
        decoder.feed(data[start:point])
        decoded += list(decoder)
        start = point
    decoder.end_of_message()
    assert decoded == frames


def _drain(decoder: Decoder) -> None:
    """Read frames until the decoder needs data; recoverable errors skip one frame."""
    for _ in range(10_000):
        try:
            if decoder.next_frame() is None:
                return
        except RemoteProtocolError as exc:
            if not exc.recoverable:
                return
    raise AssertionError("decoder kept producing frames from bounded input")


@settings(max_examples=300)
@given(st.binary(max_size=300), st.sampled_from(list(Peer)))
def test_arbitrary_bytes_only_raise_remote_protocol_error(garbage: bytes, peer: Peer) -> None:
    decoder = Decoder(peer=peer)
    decoder.feed(garbage)
    _drain(decoder)
    with contextlib.suppress(RemoteProtocolError):
        decoder.end_of_message()


@settings(max_examples=300)
@given(data, st.sampled_from(list(Peer)))
def test_arbitrary_msgpack_values_only_raise_remote_protocol_error(value: object, peer: Peer) -> None:
    decoder = Decoder(peer=peer)
    decoder.feed(msgpack.packb(value, use_bin_type=True))
    _drain(decoder)


@settings(max_examples=200)
@given(st.lists(client_frames, min_size=1, max_size=4), st.integers(0, 200), st.binary(max_size=4))
def test_corrupted_frames_only_raise_remote_protocol_error(
    frames: list[Frame], position: int, noise: bytes
) -> None:
    data = bytearray(encode_batch(frames))
    position = min(position, len(data))
    data[position:position + len(noise)] = noise
    decoder = Decoder(peer=Peer.CLIENT)
    decoder.feed(bytes(data))
    _drain(decoder)
