"""The emit endpoint for the asyncio peers: ``POST /api/emit`` on its own port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bench.peers._http import BAD_EMIT, emitted, parse_emit, parse_requests

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
                    emit = parse_emit(request)
                    out.append(BAD_EMIT if emit is None else emitted(publish(*emit)))
                writer.write(b"".join(out))
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)
