"""Peer: Server-Sent Events, one HTTP response stream per watcher (asyncio streams).

``GET /sse?ch=NAME`` opens a stream; ``POST /api/emit`` on the same port publishes. Each
event is one JSON ``data:`` line, encoded once and written to every watcher's stream.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.parse
from typing import Any

from bench.peers._http import BAD_EMIT, Channels, emitted, parse_emit, parse_requests

channels = Channels()
watchers: dict[str, set[asyncio.StreamWriter]] = {}


def publish(channel: str, event: str, data: Any) -> int:
    offset = channels.next_offset(channel)
    line = ("data: " + json.dumps({"t": "ev", "ch": channel, "ev": event, "d": data, "o": offset},
                                  separators=(",", ":")) + "\n\n").encode()
    for writer in watchers.get(channel, ()):
        writer.write(line)
    return offset


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    buffer = bytearray()
    try:
        while data := await reader.read(65536):
            buffer += data
            out = []
            for request in parse_requests(buffer):
                if request.method == "GET" and request.target.startswith("/sse"):
                    query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.target).query)
                    channel = query.get("ch", [""])[0]
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Cache-Control: no-cache\r\n\r\n")
                    writer.write(f'data: {{"t":"ok","o":{channels.top.get(channel, 0)}}}\n\n'.encode())
                    watchers.setdefault(channel, set()).add(writer)
                    try:
                        await reader.read()  # until the watcher goes away
                    finally:
                        watchers[channel].discard(writer)
                    return
                emit = parse_emit(request)
                out.append(BAD_EMIT if emit is None else emitted(publish(*emit)))
            writer.write(b"".join(out))
    finally:
        writer.close()


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    print(f"peer listening {port} {port}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
