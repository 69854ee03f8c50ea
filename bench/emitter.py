"""An HTTP emitter: pipelined ``POST /api/emit`` requests on one keep-alive connection, non-blocking."""

from __future__ import annotations

import json
import select
import socket
import time


class HttpEmitter:
    """Sends token events to ``channels`` (round robin) with at most ``window`` requests in flight.

    Each event's data is ``{"token": ..., "ts": time.monotonic()}``, taken just
    before the request is written, so subscribers can measure emit-to-read latency.
    """

    def __init__(self, host: str, port: int, channels: list[str], *, window: int = 64,
                 path: str = "/api/emit") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.host = host
        self.channels = channels
        self.path = path
        self.window = window
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self._out = bytearray()
        self._in = bytearray()

    def _request(self, token: str) -> bytes:
        channel = self.channels[self.sent % len(self.channels)]
        body = json.dumps({"channel": channel, "event": "ai:token",
                           "data": {"token": token, "ts": time.monotonic()}}).encode()
        return (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def queue(self, count: int, token: str = "tok") -> int:
        """Queue up to ``count`` more requests within the window; return how many were queued."""
        room = min(count, self.window - (self.sent - self.acked))
        for _ in range(max(room, 0)):
            self._out += self._request(token)
            self.sent += 1
        return max(room, 0)

    def pump(self) -> None:
        """Write what is queued and read responses, without blocking."""
        if self._out:
            try:
                written = self.sock.send(self._out)
                del self._out[:written]
            except BlockingIOError:
                pass
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            if not data:
                raise ConnectionError("broker closed the emitter connection")
            self._in += data
        self._parse()

    def _parse(self) -> None:
        while True:
            end = self._in.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._in[:end]).lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(self._in) < end + 4 + length:
                return
            if not head.startswith(b"http/1.1 200"):
                self.errors += 1
            self.acked += 1
            del self._in[:end + 4 + length]

    def wait_readable(self, timeout: float) -> None:
        """Block until a response arrives or ``timeout`` seconds pass."""
        if timeout > 0:
            select.select([self.sock], [], [], timeout)

    def close(self) -> None:
        self.sock.close()
