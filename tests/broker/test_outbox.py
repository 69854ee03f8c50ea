"""The outbox on a real socket pair: fast path, queueing, joined writes, overflow, death."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

import protocol as p
from broker.backlog import Backlog
from broker.config import ChannelOptions
from broker.outbox import Outbox, OutboxState


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield a, b
    a.close()
    b.close()


def drain(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_fast_path_writes_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    outbox = Outbox(a.fileno(), limit=1 << 20)
    assert outbox.offer(b"hello ") and outbox.offer(b"world")
    assert drain(b) == b"hello world"
    assert outbox.statistics().bytes_queued == 0


async def test_backlog_is_queued_then_written_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    outbox = Outbox(a.fileno(), limit=1 << 20)
    chunks = [bytes([i % 251]) * 1000 for i in range(300)]  # far more than the socket buffers hold
    for chunk in chunks:
        assert outbox.offer(chunk)
    assert outbox.statistics().bytes_queued > 0
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run_writer)
        with trio.fail_after(5):
            while len(received) < 300_000:
                await trio.lowlevel.wait_readable(b)
                received += drain(b)
        outbox.close()
    assert bytes(received) == b"".join(chunks)
    assert outbox.statistics().bytes_queued == 0


async def test_overflow_keeps_a_half_written_frame_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    overflowed: list[bool] = []
    outbox = Outbox(a.fileno(), limit=20_000, overflow_frames=b"<BYE>",
                    on_overflow=lambda: overflowed.append(True))
    frames = [b"[" + bytes([65 + i % 26]) * 998 + b"]" for i in range(200)]
    accepted = 0
    for frame in frames:
        if not outbox.offer(frame):
            break
        accepted += 1
    assert overflowed == [True]
    assert outbox.overflowed and outbox.state is OutboxState.CLOSING
    assert not outbox.offer(b"late")
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run_writer)
        with trio.fail_after(5):
            while not received.endswith(b"<BYE>"):
                await trio.lowlevel.wait_readable(b)
                received += drain(b)
    body = bytes(received[:-5])
    # Whole frames only: a prefix of what was offered, cut at a frame boundary.
    assert len(body) % 1000 == 0
    assert body == b"".join(frames[: len(body) // 1000])
    assert 0 < len(body) // 1000 <= accepted


async def test_dead_socket_makes_the_writer_return(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    outbox = Outbox(a.fileno(), limit=1 << 20)
    b.close()
    with trio.fail_after(5):
        while outbox.offer(b"x" * 10_000):
            pass
        await outbox.run_writer()
    assert outbox.state is OutboxState.DEAD
    assert outbox.statistics().bytes_queued == 0


async def test_a_half_sent_head_holds_only_what_is_charged(pair: tuple[socket.socket, socket.socket]) -> None:
    """Shrinking a queue whose head is half on the wire copies out its unsent frames.

    A view of the head would keep the whole offered object alive, sent part and all,
    while only the view's length counts against the send buffer and memory_limit.
    """
    a, _b = pair
    outbox = Outbox(a.fileno(), limit=1 << 20, backlog=Backlog(lambda channel: ChannelOptions()))
    frames = [p.ws_frame(p.encode(p.Ev(ch=f"c/{i % 7}", ev="x", d="y" * 2000, o=i))) for i in range(200)]
    replay = b"".join(frames)  # 400 KB in one object, as a replay is offered
    assert outbox.offer(replay)
    assert outbox.statistics().bytes_queued < len(replay)  # the kernel took some of it
    while outbox.statistics().bytes_queued < (1 << 20) // 4:  # past the shrink mark
        assert outbox.offer(frames[0])
    stats = outbox.statistics()
    assert stats.state is OutboxState.OPEN
    assert stats.bytes_held <= stats.bytes_queued + len(frames[0]), stats


def _tokens(channel: str, first: int, count: int, size: int = 100) -> list[bytes]:
    return [p.ws_frame(p.encode(p.Ev(ch=channel, ev="ai:token", d={"token": "t" * size}, o=first + i)))
            for i in range(count)]


def _received_events(data: bytes) -> list[p.Ev]:
    frames = p.split_ws_frames(data)
    assert frames is not None
    return [frame for _opcode, _start, payload, end in frames
            for frame in p.decode_message(data[payload:end], peer=p.Peer.SERVER, limits=p.SERVER_LIMITS)
            if isinstance(frame, p.Ev)]


async def test_a_shrink_decodes_only_what_no_shrink_has_seen(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A compact offer is never coalesced again, and tokens queued after a shrink are coalesced
    among themselves, each byte decoded once (a queue past its mark is not decoded whole again)."""
    a, b = pair
    backlog = Backlog(lambda channel: ChannelOptions())
    outbox = Outbox(a.fileno(), limit=1 << 20, backlog=backlog)
    compact = b"".join(_tokens("c", 0, 1000))  # coalescable, but offered as compact: left as it is
    assert outbox.offer(compact, compact=True)  # more than the socket takes: the rest is queued
    assert backlog.statistics().coalesced == 0
    later = _tokens("c", 1000, 2000)
    for frame in later:
        assert outbox.offer(frame)
    coalesced = backlog.statistics().coalesced
    assert 0 < coalesced < len(later)  # only the later tokens were coalesced
    received = bytearray()
    outbox.close()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run_writer)
        with trio.fail_after(5):
            while outbox.statistics().bytes_queued:
                await trio.lowlevel.wait_readable(b)
                received += drain(b)
    received += drain(b)
    events = _received_events(bytes(received))
    assert [event.o for event in events[:1000]] == list(range(1000))  # the compact part, untouched
    text = "".join(event.d["token"] for event in events[1000:])
    assert text == "t" * 100 * 2000 and events[-1].o == 2999
    assert len(events) - 1000 == len(later) - coalesced
