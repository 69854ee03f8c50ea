"""A WebSocket client on a plain socket that reads only when told: a reader as slow as a test wants."""

from __future__ import annotations

import socket

import trio
import wsproto
import wsproto.events as wse

import protocol as p
from broker import Broker


class RawClient:
    """A WebSocket client on a plain socket that reads only when told to."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.frames: list[p.Frame] = []
        self.close_code: int | None = None
        self._decoder = p.Decoder(peer=p.Peer.SERVER, limits=p.SERVER_LIMITS)

    @classmethod
    async def open(cls, broker: Broker, rcvbuf: int | None = None) -> RawClient:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", broker.port))
        client = cls(sock)
        await client.send(wse.Request(host="127.0.0.1", target="/ws"))
        while not any(isinstance(e, wse.AcceptConnection) for e in await client.receive()):
            pass
        return client

    async def send(self, event: wse.Event) -> None:
        await self.sock.send(self.ws.send(event))

    async def command(self, frame: p.ClientFrame) -> None:
        await self.send(wse.Message(data=p.encode(frame)))

    async def receive(self) -> list[wse.Event]:
        data = await self.sock.recv(65536)
        self.ws.receive_data(data or None)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, wse.BytesMessage):
                self._decoder.feed(event.data)
                self.frames += list(self._decoder)
            elif isinstance(event, wse.CloseConnection):
                self.close_code = event.code
        return events

    async def read_until_closed(self) -> None:
        with trio.fail_after(10):
            while self.close_code is None:
                await self.receive()

    async def read_for(self, seconds: float) -> None:
        """Read whatever arrives for ``seconds`` (or until the connection closes)."""
        with trio.move_on_after(seconds):
            while self.close_code is None:
                await self.receive()
