"""The subscriber swarm: thousands of WebSocket subscribers in one process, on raw sockets and epoll.

No coroutine or thread per subscriber: each is a non-blocking socket with a
small parse state, and one epoll loop reads them all. Every frame is parsed
(WebSocket header, then each msgpack value in the message) and checked: the
offsets of a subscriber must be consecutive from the first one expected, with
no duplicate and no gap. Latency comes from a ``ts`` field in the event data,
set by the emitter from ``time.monotonic()`` (one clock for every process on
this machine).
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

_KEY = base64.b64encode(b"tokenfan-bench!!").decode()


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A masked client-to-server WebSocket frame (RFC 6455 §5.3)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def upgrade_request(host: str, port: int, path: str = "/ws") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


@dataclass
class Subscriber:
    """One subscriber's socket and what it has seen."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    next_offset: int = 1  #: the offset the next event must carry
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    closed: bool = False
    bye_code: int | None = None


@dataclass
class SwarmResult:
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    disconnected: int = 0
    latencies_ms: list[float] = field(default_factory=list)


def _connect(host: str, port: int, rcvbuf: int | None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(upgrade_request(host, port))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("broker closed the connection during the handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise ConnectionError(f"WebSocket upgrade refused: {status.decode(errors='replace')}")
    return sock


class Swarm:
    """N WebSocket subscribers to one or more channels, driven by :meth:`poll`."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.subscribers: dict[int, Subscriber] = {}
        self.result = SwarmResult()
        self._unpacker_opts: dict[str, Any] = {"raw": False}

    def connect(self, host: str, port: int, channels: list[str], *, rcvbuf: int | None = None) -> None:
        """Connect one subscriber per channel name given (blocking), subscribe, wait for the oks."""
        for index, channel in enumerate(channels):
            sock = _connect(host, port, rcvbuf)
            sock.sendall(client_frame(msgpack.packb({"t": "sub", "id": 1, "ch": channel})))
            reply = sock.recv(4096)
            frames = self._frames(bytearray(reply))
            if not frames or frames[0].get("t") != "ok":
                raise ConnectionError(f"subscriber {index} was refused: {frames}")
            sock.setblocking(False)
            self.subscribers[sock.fileno()] = Subscriber(sock, next_offset=frames[0]["o"] + 1)
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    @staticmethod
    def _frames(buffer: bytearray) -> list[dict[str, Any]]:
        """Parse whole WebSocket frames out of ``buffer`` (consuming them); return their protocol frames."""
        out: list[dict[str, Any]] = []
        pos = 0
        size = len(buffer)
        while size - pos >= 2:
            second = buffer[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = struct.unpack_from("!H", buffer, pos + 2)[0]
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = struct.unpack_from("!Q", buffer, pos + 2)[0]
                start = pos + 10
            if size < start + length:
                break
            opcode = buffer[pos] & 0x0F
            if opcode == 0x2:
                payload = bytes(buffer[start:start + length])
                try:
                    out.append(msgpack.unpackb(payload, raw=False))
                except msgpack.ExtraData:  # several frames in one message
                    unpacker = msgpack.Unpacker(raw=False)
                    unpacker.feed(payload)
                    out.extend(unpacker)
            elif opcode == 0x8:
                code = struct.unpack_from("!H", buffer, start)[0] if length >= 2 else 1005
                out.append({"t": "_close", "code": code})
            pos = start + length
        del buffer[:pos]
        return out

    def poll(self, timeout: float,
             on_event: Callable[[Subscriber, dict[str, Any], float], None] | None = None) -> int:
        """Read whatever is ready within ``timeout`` seconds; return how many events arrived."""
        got = 0
        for fd, _mask in self.epoll.poll(timeout):
            sub = self.subscribers.get(fd)
            if sub is None:
                continue
            try:
                data = sub.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                self._drop(sub)
                continue
            sub.buffer += data
            for frame in self._frames(sub.buffer):
                kind = frame.get("t")
                if kind == "ev":
                    got += 1
                    self._check(sub, frame, now)
                    if on_event is not None:
                        on_event(sub, frame, now)
                elif kind == "bye":
                    sub.bye_code = frame.get("code")
                elif kind == "_close":
                    self._drop(sub)
        return got

    def _check(self, sub: Subscriber, frame: dict[str, Any], now: float) -> None:
        result = self.result
        offset = frame["o"]
        first = frame.get("o0", offset)
        if first == sub.next_offset:
            covered = offset - first + 1
            sub.delivered += covered
            result.delivered += covered
            sub.next_offset = offset + 1
        elif first > sub.next_offset:
            gap = first - sub.next_offset
            sub.lost += gap
            result.lost += gap
            covered = offset - first + 1
            sub.delivered += covered
            result.delivered += covered
            sub.next_offset = offset + 1
        elif offset < sub.next_offset:
            sub.duplicates += 1
            result.duplicates += 1
        else:
            sub.out_of_order += 1
            result.out_of_order += 1
        data = frame.get("d")
        if isinstance(data, dict):
            ts = data.get("ts")
            if isinstance(ts, float):
                result.latencies_ms.append((now - ts) * 1000.0)

    def _drop(self, sub: Subscriber) -> None:
        if sub.closed:
            return
        sub.closed = True
        self.result.disconnected += 1
        fd = sub.sock.fileno()
        self.epoll.unregister(fd)
        del self.subscribers[fd]
        sub.sock.close()

    def close(self) -> None:
        for sub in list(self.subscribers.values()):
            sub.sock.close()
        self.subscribers.clear()
        self.epoll.close()
