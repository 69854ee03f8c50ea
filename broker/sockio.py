"""Reading from sockets without a large buffer per read.

``socket.recv(65536)`` allocates 64 KiB for every call and shrinks it to what
arrived; with thousands of mostly idle connections those transient blocks
fragment the heap and cost far more resident memory than the connections
themselves. :func:`receive_some` reads into one buffer shared by the whole
broker (all readers run in one thread, and the bytes are copied out before
anything else can run) and returns exactly the bytes that arrived.
"""

from __future__ import annotations

import os

import trio

_BUFFER_SIZE = 64 * 1024
_shared = bytearray(_BUFFER_SIZE)
_view = memoryview(_shared)


async def receive_some(fd: int) -> bytes:
    """Wait until ``fd`` is readable and return what arrived; ``b""`` at end of stream or on error."""
    while True:
        try:
            count = os.readv(fd, [_shared])
        except BlockingIOError:
            count = -1
        except OSError:  # reset by peer and friends: the stream is over
            count = 0
        if count < 0:
            # Wait outside the except block, so the exception (and its traceback)
            # is not kept alive for as long as the connection stays idle.
            await trio.lowlevel.wait_readable(fd)
            continue
        data = bytes(_view[:count])  # copied before any other task can touch the buffer
        await trio.lowlevel.checkpoint()
        return data
