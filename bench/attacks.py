"""The hostile clients of ``python -m bench.abuse``, run as their own process (``python -m bench.attacks``).

Each attack is a *slot* routine: one hostile connection that does its worst,
and when the broker cuts it, connects again and does it again, until the
process is told to stop (a line or the end of standard input) or its time runs
out (``--seconds``). ``--counts replay=200,flood=1200`` says how many slots of
each attack run at once. Every loop is bounded by that time (and the flood
also by a number of connection attempts); every connection goes to the broker
on 127.0.0.1 (the flood from 127.0.0.2).

The attacks (issue 13):

``replay``
    A message of 100 ``sub {since: {o: 0}}`` / ``unsub`` pairs on the channel
    with a long history, read in full; sent again each time its 200 answers are in.
``nonreaders``
    A socket with a 4 KiB receive buffer that subscribes to the honest channel
    and catches up on about 480 KB of the long history, then never reads,
    sending a WebSocket ping and a protocol ``ping`` every second.
``history``
    About 190 pipelined ``GET /api/history?...&limit=10000`` of the long
    history in one send, on a socket that never reads.
``fragments``
    The 60 KB first fragment of a WebSocket message that is never finished
    (then a WebSocket ping every second).
``flood``
    Connections from 127.0.0.2 that send half a request head and wait.
``pub``
    ``pub ai:cancel`` with 60 KB of data, one message after another as fast
    as the socket takes them, reading the answers.
``idle``
    The control: a WebSocket connection that does nothing at all.

When it stops, the process prints one JSON object: per attack, connections
made, connection failures, how they ended (close codes, HTTP statuses), bytes
sent and received, answers read, and this process's CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

import protocol as p

HOST = "127.0.0.1"
#: Where the half-open flood comes from: another loopback address, so the honest clients'
#: address keeps its own share of ``max_http_connections_per_ip``.
FLOOD_SOURCE = "127.0.0.2"
#: The flood's connection attempts, at most, per process.
FLOOD_ATTEMPTS = 100_000
#: How long the attackers wait for their first connections before saying READY anyway.
RAMP_SECONDS = 5.0
#: Publications a ``nonreaders`` slot catches up on from the long history (about 480 KB of 4 KB
#: tokens: less than half of the default 1 MiB send buffer, so it is replayed whole).
NONREADER_REPLAY = 120
#: Pipelined history requests in one send (about 13.6 KB, as in issue 13's finding 3).
HISTORY_PIPELINE = 190
PAIRS = 100
FRAGMENT_BYTES = 60_000
PUB_DATA_BYTES = 60_000
#: Each attacking socket's kernel send buffer (SO_SNDBUF; the kernel doubles it).
ATTACKER_SNDBUF = 128 * 1024

_UPGRADE = (f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dG9rZW5mYW4tYWJ1c2UhIQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
_TCP_ESTABLISHED = 1


def client_frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True) -> bytes:
    """One masked client-to-server WebSocket frame (RFC 6455 §5.2) carrying ``payload``."""
    key = os.urandom(4)
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    mask = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(size, "big")
    return head + key + masked


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """What the attackers aim at."""

    port: int
    honest_channel: str  #: the channel the honest subscribers watch
    history_channel: str  #: the channel with the long history
    history_top: int  #: its last offset


@dataclass(slots=True)
class Stats:
    """What one attack's slots did."""

    connections: int = 0  #: connections made (and, for WebSocket attacks, upgraded)
    failed: int = 0  #: connections refused, reset or not upgraded
    ended: Counter[str] = field(default_factory=Counter)  #: how connections ended
    sent: int = 0  #: bytes sent
    received: int = 0  #: bytes received
    answers: int = 0  #: ok/err frames read (replay, pub)

    def as_dict(self) -> dict[str, object]:
        return {"connections": self.connections, "failed": self.failed, "ended": dict(self.ended),
                "sent_mib": round(self.sent / 2**20, 1), "received_mib": round(self.received / 2**20, 1),
                "answers": self.answers}


class _Frames:
    """Skims what the broker sends: counts the answers (``ok``/``err``) and keeps the close code,
    skipping the payload of every other frame without copying it."""

    __slots__ = ("_pending", "_skip", "answers", "close_code")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._skip = 0
        self.answers = 0
        self.close_code: int | None = None

    def feed(self, data: bytes) -> None:
        start = min(self._skip, len(data))
        self._skip -= start
        if start == len(data):
            return
        buf = self._pending
        buf += memoryview(data)[start:]
        pos = 0
        while len(buf) - pos >= 2:
            size, head = buf[pos + 1] & 0x7F, 2
            if size == 126:
                if len(buf) - pos < 4:
                    break
                size, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif size == 127:
                if len(buf) - pos < 10:
                    break
                size, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            opcode = buf[pos] & 0x0F
            if opcode == 0x8 or (opcode == 0x2 and size < 256):  # a close frame, or maybe an answer
                if len(buf) - pos < head + size:
                    break
                payload = bytes(buf[pos + head:pos + head + size])
                if opcode == 0x8:
                    self.close_code = int.from_bytes(payload[:2], "big") if size >= 2 else 1005
                elif b"\xa1t\xa2ok" in payload[:8] or b"\xa1t\xa3err" in payload[:8]:
                    self.answers += 1
                pos += head + size
            else:
                available = len(buf) - pos - head
                if available < 0:
                    break
                if available >= size:
                    pos += head + size
                else:
                    self._skip = size - available
                    pos = len(buf)
        del buf[:pos]


async def _send_all(sock: trio.socket.SocketType, data: bytes, stats: Stats) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        stats.sent += sent
        view = view[sent:]


def _still_open(sock: trio.socket.SocketType) -> bool:
    """Whether the broker has not closed the connection (from TCP_INFO, without reading)."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return False
    return bool(state == _TCP_ESTABLISHED)


async def _connect(target: Target, stats: Stats, *, rcvbuf: int = 0,
                   source: str | None = None) -> trio.socket.SocketType | None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # A real attacker's send buffers are on its own machine; here they would share this
        # host's TCP memory with the broker and the honest swarm (hundreds of MiB of autotuned
        # buffers push every socket into TCP memory pressure), so they are capped.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ATTACKER_SNDBUF)
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((HOST, target.port))
    except OSError:
        sock.close()
        stats.failed += 1
        return None
    return sock


async def _upgrade(target: Target, stats: Stats, *, rcvbuf: int = 0) -> trio.socket.SocketType | None:
    """A WebSocket connection to the broker's ``/ws`` (the 101 read, nothing after it), or None."""
    sock = await _connect(target, stats, rcvbuf=rcvbuf)
    if sock is None:
        return None
    try:
        await _send_all(sock, _UPGRADE, stats)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 16_384:
            chunk = await sock.recv(4096)
            if not chunk:
                break
            head += chunk
    except OSError:
        head = b""
    if not head.startswith(b"HTTP/1.1 101"):
        stats.failed += 1
        stats.ended[f"http {head[9:12].decode(errors='replace') or 'closed'}"] += 1
        sock.close()
        return None
    stats.connections += 1
    return sock


async def _read_all(sock: trio.socket.SocketType, stats: Stats, frames: _Frames,
                    on_data: Callable[[], Awaitable[None]] | None = None) -> None:
    """Read (and skim) until the broker closes the connection."""
    with contextlib.suppress(OSError):
        while data := await sock.recv(1 << 20):
            stats.received += len(data)
            answers = frames.answers
            frames.feed(data)
            stats.answers += frames.answers - answers
            if on_data is not None:
                await on_data()


def _ended(stats: Stats, frames: _Frames | None) -> None:
    code = None if frames is None else frames.close_code
    stats.ended["closed" if code is None else str(code)] += 1


Ready = Callable[[], None]
Slot = Callable[[Target, Stats, Ready], Awaitable[None]]


async def replay(target: Target, stats: Stats, ready: Ready) -> None:
    pairs: list[p.ClientFrame] = []
    for index in range(PAIRS):
        pairs += [p.Sub(id=2 * index + 1, ch=target.history_channel, since=p.Position(o=0)),
                  p.Unsub(id=2 * index + 2, ch=target.history_channel)]
    message = client_frame(p.encode_batch(pairs))
    while True:
        sock = await _upgrade(target, stats)
        if sock is None:
            await trio.sleep(0.1)
            continue
        ready()
        frames = _Frames()
        sent_for = 0

        async def again(sock: trio.socket.SocketType = sock, frames: _Frames = frames) -> None:
            nonlocal sent_for
            if frames.answers >= sent_for + 2 * PAIRS:  # every answer in: ask again
                sent_for += 2 * PAIRS
                await _send_all(sock, message, stats)

        with sock, contextlib.suppress(OSError):
            await _send_all(sock, message, stats)
            await _read_all(sock, stats, frames, again)
        _ended(stats, frames)
        await trio.sleep(0.05)


async def nonreaders(target: Target, stats: Stats, ready: Ready) -> None:
    since = p.Position(o=max(0, target.history_top - NONREADER_REPLAY))
    subscribe = client_frame(p.encode_batch([p.Sub(id=1, ch=target.honest_channel),
                                             p.Sub(id=2, ch=target.history_channel, since=since)]))
    chatter = client_frame(b"alive", opcode=0x9) + client_frame(p.encode(p.Ping(id=3)))
    await _hold_open(target, stats, ready, subscribe, chatter, rcvbuf=4096)


async def _hold_open(target: Target, stats: Stats, ready: Ready, first: bytes, every_second: bytes,
                     *, rcvbuf: int = 0) -> None:
    """Upgrade, send ``first``, then ``every_second`` each second until cut; connect again."""
    while True:
        sock = await _upgrade(target, stats, rcvbuf=rcvbuf)
        if sock is None:
            await trio.sleep(0.1)
            continue
        ready()
        with sock, contextlib.suppress(OSError):
            await _send_all(sock, first, stats)
            while _still_open(sock):
                await trio.sleep(1.0)
                await _send_all(sock, every_second, stats)
        _ended(stats, None)
        await trio.sleep(0.05)


async def history(target: Target, stats: Stats, ready: Ready) -> None:
    request = (f"GET /api/history?channel={target.history_channel}&limit=10000 HTTP/1.1\r\n"
               f"Host: {HOST}\r\n\r\n").encode() * HISTORY_PIPELINE
    while True:
        sock = await _connect(target, stats, rcvbuf=4096)
        if sock is None:
            await trio.sleep(0.1)
            continue
        stats.connections += 1
        ready()
        with sock, contextlib.suppress(OSError):
            await _send_all(sock, request, stats)
            while _still_open(sock):  # noqa: ASYNC110 (polling TCP state: nothing to wait on)
                await trio.sleep(0.25)
        _ended(stats, None)
        await trio.sleep(0.05)


async def fragments(target: Target, stats: Stats, ready: Ready) -> None:
    first = client_frame(b"\x00" * FRAGMENT_BYTES, fin=False)
    ping = client_frame(b"alive", opcode=0x9)
    await _hold_open(target, stats, ready, first, ping)


class _Budget:
    """Connection attempts left to the flood, shared by its slots."""

    left = FLOOD_ATTEMPTS


async def flood(target: Target, stats: Stats, ready: Ready) -> None:
    partial = f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\n".encode()  # and never the rest
    while _Budget.left > 0:
        _Budget.left -= 1
        sock = await _connect(target, stats, source=FLOOD_SOURCE)
        if sock is None:
            await trio.sleep(0.05)
            continue
        stats.connections += 1
        ready()
        reply = b""
        with sock:
            try:
                await _send_all(sock, partial, stats)
                while len(reply) < 65_536 and (chunk := await sock.recv(65_536)):
                    reply += chunk
                stats.received += len(reply)
                stats.ended[f"http {reply[9:12].decode(errors='replace')}" if reply else "closed"] += 1
            except OSError:
                stats.ended["reset"] += 1
    ready()
    await trio.sleep_forever()


async def pub(target: Target, stats: Stats, ready: Ready) -> None:
    message = client_frame(p.encode(p.Pub(id=1, ch="ai-chat/abuse-pub", ev="ai:cancel",
                                          d={"junk": "x" * PUB_DATA_BYTES})))
    while True:
        sock = await _upgrade(target, stats)
        if sock is None:
            await trio.sleep(0.1)
            continue
        ready()
        frames = _Frames()
        with sock:
            async with trio.open_nursery() as nursery:
                async def read(sock: trio.socket.SocketType = sock, frames: _Frames = frames) -> None:
                    await _read_all(sock, stats, frames)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(read)
                with contextlib.suppress(OSError):
                    while True:
                        await _send_all(sock, message, stats)
                nursery.cancel_scope.cancel()
        _ended(stats, frames)
        await trio.sleep(0.05)


async def idle(target: Target, stats: Stats, ready: Ready) -> None:
    """The control: a WebSocket connection that subscribes to nothing and sends nothing."""
    while True:
        sock = await _upgrade(target, stats)
        if sock is None:
            await trio.sleep(0.1)
            continue
        ready()
        with sock:
            while _still_open(sock):  # noqa: ASYNC110 (polling TCP state: nothing to wait on)
                await trio.sleep(1.0)
        _ended(stats, None)
        await trio.sleep(0.05)


ATTACKS: dict[str, Slot] = {"idle": idle, "replay": replay, "nonreaders": nonreaders, "history": history,
                            "fragments": fragments, "flood": flood, "pub": pub}


async def run(target: Target, counts: dict[str, int], seconds: float) -> dict[str, object]:
    """Run ``counts[name]`` slots of each attack until stdin has a line or ends, or ``seconds`` pass.

    Prints ``READY`` once every slot has made its first connection (or after
    :data:`RAMP_SECONDS`); returns what the slots did.
    """
    stats = {name: Stats() for name in counts}
    slots = sum(counts.values())
    started = 0
    all_in = trio.Event()

    def ready_once() -> Ready:
        done = False

        def ready() -> None:
            nonlocal done, started
            if not done:
                done = True
                started += 1
                if started == slots:
                    all_in.set()
        return ready

    async def stop_on_stdin(scope: trio.CancelScope) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stdin.receive_some(64)
        scope.cancel()

    cpu0 = time.process_time()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_stdin, nursery.cancel_scope)
            for name, count in counts.items():
                for _ in range(count):
                    nursery.start_soon(ATTACKS[name], target, stats[name], ready_once())
            with trio.move_on_after(RAMP_SECONDS):
                await all_in.wait()
            print("READY", started, flush=True)
    return {"attacks": {name: s.as_dict() for name, s in stats.items()},
            "attacker_cpu_s": round(time.process_time() - cpu0, 2)}


def _counts(text: str) -> dict[str, int]:
    counts = {}
    for part in text.split(","):
        name, _, number = part.partition("=")
        if name not in ATTACKS or not number.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected NAME=COUNT with NAME in {', '.join(ATTACKS)}: {part!r}")
        counts[name] = int(number)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--counts", type=_counts, required=True, help="e.g. replay=200,flood=1200")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--honest-channel", required=True)
    parser.add_argument("--history-channel", required=True)
    parser.add_argument("--history-top", type=int, required=True)
    args = parser.parse_args(argv)
    target = Target(port=args.port, honest_channel=args.honest_channel,
                    history_channel=args.history_channel, history_top=args.history_top)
    result = trio.run(run, target, args.counts, min(args.seconds, 120.0))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
