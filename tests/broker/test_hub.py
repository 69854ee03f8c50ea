"""The hub on real socket pairs: walks that yield mid-channel still deliver every frame once, in order."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

import protocol as p
from broker.config import ChannelOptions
from broker.history import MemoryEngine
from broker.hub import CHECK_EVERY, Hub
from broker.outbox import Outbox

SUBSCRIBERS = CHECK_EVERY * 8 + 50


def make_hub(*, batching: bool) -> Hub:
    # Turns of no time at all: the walk yields every CHECK_EVERY offers, so a test sees it yield.
    return Hub(MemoryEngine(lambda channel: ChannelOptions(), max_bytes=1 << 20), batching=batching,
               turn_seconds=0.0)


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(SUBSCRIBERS)]
    for a, b in made:
        a.setblocking(False)
        b.setblocking(False)
    yield made
    for a, b in made:
        a.close()
        b.close()


def offsets_received(sock: socket.socket) -> list[int]:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            break
        data += chunk
    decoder = p.Decoder(peer=p.Peer.SERVER, limits=p.SERVER_LIMITS)
    offsets = []
    pos = 0
    while pos < len(data):  # server frames: unmasked, short payloads here
        length = data[pos + 1] & 0x7F
        decoder.feed(data[pos + 2:pos + 2 + length])
        pos += 2 + length
        offsets += [f.o for f in decoder if isinstance(f, p.Ev)]
    return offsets


async def test_frames_published_mid_walk_reach_everyone_once_in_order(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    hub = make_hub(batching=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run_flusher)
        for a, _ in pairs:
            hub.subscribe("c", Outbox(a.fileno(), limit=1 << 20))
        channel = hub.channel("c")
        assert channel is not None
        hub.publish("c", "ai:token", {"token": "one"}, persist=False)
        # Wait until the flusher has yielded in the middle of its walk.
        for _ in range(100):
            seqs = set(channel.subscribers.values())
            if len(seqs) > 1:
                break
            await trio.lowlevel.checkpoint()
        assert len(set(channel.subscribers.values())) > 1, "the walk never yielded mid-channel"
        hub.publish("c", "ai:token", {"token": "two"}, persist=False)
        hub.publish("c", "ai:token", {"token": "three"}, persist=False)
        await trio.testing.wait_all_tasks_blocked()
        assert not channel.behind
        assert channel.log == []  # everything sent to everyone, log trimmed
        nursery.cancel_scope.cancel()
    for _, b in pairs:
        assert offsets_received(b) == [1, 2, 3]


async def test_unbatched_hub_sends_inside_publish(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    hub = make_hub(batching=False)
    for a, _ in pairs[:10]:
        hub.subscribe("c", Outbox(a.fileno(), limit=1 << 20))
    hub.publish("c", "e", 1, persist=False)
    hub.publish("c", "e", 2, persist=False)
    for _, b in pairs[:10]:
        assert offsets_received(b) == [1, 2]
