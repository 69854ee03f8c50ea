"""Peer: the ``websockets`` library (asyncio), broadcasting with ``websockets.broadcast()``."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import msgpack
from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench.peers._asyncio_emit import start_emit_server
from bench.peers._http import Channels

channels = Channels()
subscribers: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    joined: list[str] = []
    try:
        async for message in ws:
            if isinstance(message, str):
                continue
            frame = msgpack.unpackb(message)
            if frame.get("t") == "sub":
                subscribers.setdefault(frame["ch"], set()).add(ws)
                joined.append(frame["ch"])
                await ws.send(channels.ok_frame(frame))
    finally:
        for channel in joined:
            subscribers.get(channel, set()).discard(ws)


def publish(channel: str, event: str, data: Any) -> int:
    offset, message = channels.ev_frame(channel, event, data)
    broadcast(subscribers.get(channel, ()), message)
    return offset


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    emit_server = await start_emit_server(publish)
    async with serve(handler, "127.0.0.1", 0, ping_interval=None, max_queue=None) as server:
        ws_port = server.sockets[0].getsockname()[1]
        emit_port = emit_server.sockets[0].getsockname()[1]
        print(f"peer listening {ws_port} {emit_port}", flush=True)
        await stop.wait()
    emit_server.close()


if __name__ == "__main__":
    asyncio.run(main())
