"""Slow consumers, idle clients, graceful shutdown and statistics."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import trio
import trio.testing

import protocol as p
from broker import Broker, Config
from broker.client import Event, ServerClosed, Subscription, connect
from tests.broker.conftest import StartBroker, ws_url
from tests.broker.rawclient import RawClient


async def collect(sub: Subscription, count: int, into: list[Event]) -> None:
    async for event in sub:
        into.append(event)
        if len(into) == count:
            return


async def test_slow_consumer_is_cut_off_while_200_others_get_everything(start_broker: StartBroker) -> None:
    # The slow client reads only at the end: give its last bytes time to wait for it.
    broker = await start_broker(outbox_limit=16 * 1024, shutdown_timeout=60)
    channel = "ai-chat/slow"
    slow = await RawClient.open(broker, rcvbuf=4096)
    await slow.command(p.Sub(id=1, ch=channel))
    async with contextlib.AsyncExitStack() as stack:
        subs = []
        for _ in range(200):
            client = await stack.enter_async_context(connect(ws_url(broker)))
            subs.append(await client.subscribe(channel, buffer=4096))
        assert broker.hub.statistics().subscriptions == 201
        received: list[list[Event]] = [[] for _ in subs]
        # "blob" is not coalesced, so this is the plain disconnect path (coalescing: test_history.py).
        payload = {"token": "x" * 1000}
        published = 0

        async def caught_up(behind: int) -> None:
            # The healthy clients are Python on the same two cores: let them keep up.
            while any(len(into) < published - behind for into in received):  # noqa: ASYNC110
                await trio.sleep(0.001)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for sub, into in zip(subs, received, strict=True):
                    nursery.start_soon(collect, sub, 10**9, into)
                # Publish until the slow reader is cut off (bounded), then a little more.
                while broker.statistics().slow_disconnects == 0:
                    assert published < 3000, "the slow consumer was never cut off"
                    broker.emit_nowait(channel, "blob", payload)
                    published += 1
                    if published % 4 == 0:
                        await caught_up(4)
                for _ in range(50):
                    broker.emit_nowait(channel, "blob", payload)
                    published += 1
                await caught_up(0)
                nursery.cancel_scope.cancel()
        for into in received:
            assert [e.offset for e in into] == list(range(1, published + 1))
    await slow.read_until_closed()
    bye = slow.frames[-1]
    assert bye == p.Bye(code=p.Code.SLOW_CONSUMER, msg="send buffer full: reading too slowly", reconnect=True)
    assert slow.close_code == p.Code.SLOW_CONSUMER
    # Whatever it got before the bye is a gapless prefix of the stream.
    offsets = [f.o for f in slow.frames if isinstance(f, p.Ev)]
    assert offsets == list(range(1, len(offsets) + 1))
    assert len(offsets) < published
    slow.sock.close()
    assert broker.statistics().slow_disconnects == 1


async def test_graceful_shutdown_says_bye(nursery: trio.Nursery) -> None:
    broker = Broker(Config(port=0, shutdown_timeout=5))
    done = trio.Event()

    async def serve_then_flag(*, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED) -> None:
        await broker.serve(task_status=task_status)
        done.set()

    await nursery.start(serve_then_flag)
    async with connect(ws_url(broker), reconnect=False) as client:
        sub = await client.subscribe("ai-chat/x")
        broker.emit_nowait("ai-chat/x", "ai:token", {"token": "last"})
        broker.shutdown()
        events = []
        with pytest.raises(ServerClosed) as info:
            async for event in sub:
                events.append(event)
        assert [e.data for e in events] == [{"token": "last"}]
        assert info.value.code == p.Code.SHUTTING_DOWN
        assert info.value.reconnect is True
    with trio.fail_after(5):
        await done.wait()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", broker.port or 0)


async def test_idle_client_is_closed(start_broker: StartBroker,
                                     autojump_clock: trio.testing.MockClock) -> None:
    broker = await start_broker(idle_timeout=60, ping_interval=20)
    client = await RawClient.open(broker)  # a raw client that never answers pings
    started = trio.current_time()
    with trio.fail_after(100):
        while client.close_code is None:
            await client.receive()
    assert client.close_code == p.Code.IDLE_TIMEOUT
    assert isinstance(client.frames[-1], p.Bye) and client.frames[-1].code == p.Code.IDLE_TIMEOUT
    # The broker's heartbeat sweeps every ping_interval, so detection comes within one sweep.
    assert 60 <= trio.current_time() - started <= 60 + 20 + 1
    client.sock.close()


async def test_client_that_answers_pings_stays(start_broker: StartBroker,
                                               autojump_clock: trio.testing.MockClock) -> None:
    broker = await start_broker(idle_timeout=60, ping_interval=20)
    async with connect(ws_url(broker)) as client:
        await trio.sleep(300)
        await client.ping()
        assert broker.statistics().connections == 1


async def test_statistics_are_immutable_snapshots(broker: Broker) -> None:
    async with connect(ws_url(broker)) as client:
        await client.subscribe("s")
        before = broker.statistics()
        broker.emit_nowait("s", "e", 1)
        after = broker.statistics()
        [connection] = broker.connections
        conn_stats = connection.statistics()
    assert (before.hub.publications, after.hub.publications) == (0, 1)
    assert before.connections == 1
    assert conn_stats.subscriptions == 1
    assert conn_stats.close_code is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.connections = 5  # type: ignore[misc]
