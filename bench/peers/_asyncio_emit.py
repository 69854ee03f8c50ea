"""The emit endpoint for the asyncio peers: ``POST /api/emit`` on its own port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bench.peers._http import parse_emit, parse_requests, response

Publish = Callable[[str, str, Any], int]


async def start_emit_server(publish: Publish) -> asyncio.Server:
    """Listen on a free loopback port; each valid emit calls ``publish`` and answers its offset."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                out = []
                for request in parse_requests(buffer):
                    try:
                        channel, event, payload = parse_emit(request.body)
                    except (ValueError, KeyError, TypeError):
                        out.append(response(400, {"ok": False}))
                        continue
                    out.append(response(200, {"ok": True, "offset": publish(channel, event, payload)}))
                writer.write(b"".join(out))
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)
