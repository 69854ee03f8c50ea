"""Peer: ``trio-websocket`` used the obvious way: ``await ws.send_message()`` per subscriber."""

from __future__ import annotations

import contextlib
import signal
from functools import partial
from typing import Any

import msgpack
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from bench.peers._http import BAD_EMIT, Channels, emitted, parse_emit, parse_requests

channels = Channels()
subscribers: dict[str, set[WebSocketConnection]] = {}


async def handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    joined: list[str] = []
    try:
        while True:
            message = await ws.get_message()
            if isinstance(message, str):
                continue
            frame = msgpack.unpackb(message)
            if frame.get("t") == "sub":
                subscribers.setdefault(frame["ch"], set()).add(ws)
                joined.append(frame["ch"])
                await ws.send_message(channels.ok_frame(frame))
    except ConnectionClosed:
        pass
    finally:
        for channel in joined:
            subscribers.get(channel, set()).discard(ws)


async def publish(channel: str, event: str, data: Any) -> int:
    offset, message = channels.ev_frame(channel, event, data)
    for ws in list(subscribers.get(channel, ())):
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(message)
    return offset


async def emit_connection(stream: trio.SocketStream) -> None:
    buffer = bytearray()
    async with stream:
        while data := await stream.receive_some(65536):
            buffer += data
            out = []
            for request in parse_requests(buffer):
                emit = parse_emit(request)
                out.append(BAD_EMIT if emit is None else emitted(await publish(*emit)))
            await stream.send_all(b"".join(out))


async def main() -> None:
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(lambda task_status: serve_websocket(
            handler, "127.0.0.1", 0, ssl_context=None, task_status=task_status))
        [emit_listener] = await nursery.start(partial(trio.serve_tcp, emit_connection, 0, host="127.0.0.1"))
        print(f"peer listening {ws_server.port} {emit_listener.socket.getsockname()[1]}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main)
