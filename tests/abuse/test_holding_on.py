"""Finding 4, the connections that hold memory without taking part.

A client that never reads what it is sent, however busily it sends pings,
and a client that leaves a fragmented message unfinished, are both cut.
"""

from __future__ import annotations

import contextlib

import trio
import wsproto.events as wse

import protocol as p
from tests.broker.conftest import OpenRaw, StartBroker


async def _all_closed(broker_connections: set[object]) -> None:
    while broker_connections:  # noqa: ASYNC110 (the broker keeps no event for "a connection ended")
        await trio.sleep(0.05)


async def test_a_reader_that_never_reads_is_cut_whatever_it_sends(
        start_broker: StartBroker, open_raw: OpenRaw) -> None:
    broker = await start_broker(idle_timeout=2, ping_interval=0.5, shutdown_timeout=0.5,
                                outbox_limit=16 * 1024 * 1024)
    client = await open_raw(broker, rcvbuf=4096)
    await client.command(p.Sub(id=1, ch="news"))
    for _ in range(1500):  # about 6 MB: more than the sockets hold, less than outbox_limit
        broker.emit_nowait("news", "x", {"pad": "y" * 4000})
        await trio.lowlevel.checkpoint()

    async def chatter() -> None:
        with contextlib.suppress(OSError):  # until the broker cuts it
            while True:  # unsolicited pongs and pings: "I am alive", while reading nothing
                await client.send(wse.Pong(payload=b"still here"))
                await client.command(p.Ping(id=2))
                await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter)
        [connection] = broker.connections
        assert connection.outbox.statistics().bytes_queued > 0
        with trio.fail_after(6):
            await _all_closed(broker.connections)
        nursery.cancel_scope.cancel()
    assert connection.close_code is p.Code.SLOW_CONSUMER
    # What it never read is released from the memory budget, not leaked.
    assert broker.memory.used == 0 and not broker.memory._large


async def test_an_unfinished_message_is_not_kept(start_broker: StartBroker, open_raw: OpenRaw) -> None:
    broker = await start_broker(handshake_timeout=1, ping_interval=0.5, idle_timeout=30, shutdown_timeout=0.5)
    client = await open_raw(broker)
    # The first fragment of a message that never ends, then a client that stays chatty.
    await client.send(wse.BytesMessage(data=b"\x00" * 60_000, message_finished=False))
    async with trio.open_nursery() as nursery:
        async def chatter() -> None:
            with contextlib.suppress(OSError):  # until the broker cuts it
                while True:
                    await client.send(wse.Ping(payload=b"hi"))
                    await trio.sleep(0.2)

        nursery.start_soon(chatter)
        [connection] = broker.connections
        with trio.fail_after(5):
            await _all_closed(broker.connections)
        nursery.cancel_scope.cancel()
    assert connection.close_code is p.Code.BAD_FRAME
    assert broker.memory.used == 0
