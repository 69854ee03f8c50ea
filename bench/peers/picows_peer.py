"""Peer: ``picows`` (Cython, asyncio), sending the same bytes to each subscriber in a loop."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import msgpack
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from bench.peers._asyncio_emit import start_emit_server
from bench.peers._http import Channels

channels = Channels()
subscribers: dict[str, set[WSTransport]] = {}


class Subscriber(WSListener):
    def __init__(self) -> None:
        self.joined: list[str] = []

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            message = msgpack.unpackb(frame.get_payload_as_bytes())
            if message.get("t") == "sub":
                subscribers.setdefault(message["ch"], set()).add(transport)
                self.joined.append(message["ch"])
                transport.send(WSMsgType.BINARY, channels.ok_frame(message))
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for channel in self.joined:
            subscribers.get(channel, set()).discard(transport)


def publish(channel: str, event: str, data: Any) -> int:
    offset, message = channels.ev_frame(channel, event, data)
    for transport in subscribers.get(channel, ()):
        transport.send(WSMsgType.BINARY, message)
    return offset


def listener_factory(request: WSUpgradeRequest) -> Subscriber:
    return Subscriber()


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    emit_server = await start_emit_server(publish)
    server = await ws_create_server(listener_factory, "127.0.0.1", 0)
    ws_port = server.sockets[0].getsockname()[1]
    emit_port = emit_server.sockets[0].getsockname()[1]
    print(f"peer listening {ws_port} {emit_port}", flush=True)
    await stop.wait()
    server.close()
    emit_server.close()


if __name__ == "__main__":
    asyncio.run(main())
