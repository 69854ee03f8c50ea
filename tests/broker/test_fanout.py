"""Publications reach every subscriber, in order, on the right channels only."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.lowlevel

from broker import Broker, EmitError
from broker.client import CommandError, Event, Subscription, connect
from protocol import Code
from tests.broker.conftest import StartBroker, ws_url


async def collect(sub: Subscription, count: int, into: list[Event]) -> None:
    async for event in sub:
        into.append(event)
        if len(into) == count:
            return


@pytest.mark.parametrize("batching", [True, False])
async def test_many_clients_get_every_event_in_order(start_broker: StartBroker, batching: bool) -> None:
    broker = await start_broker(batching=batching)
    clients, events = 40, 150
    received: list[list[Event]] = [[] for _ in range(clients)]
    async with contextlib.AsyncExitStack() as stack:
        subs = []
        for _ in range(clients):
            client = await stack.enter_async_context(connect(ws_url(broker)))
            subs.append(await client.subscribe("ai-chat/room-1"))
        assert {sub.offset for sub in subs} == {0}
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for sub, into in zip(subs, received, strict=True):
                    nursery.start_soon(collect, sub, events, into)
                for i in range(events):
                    pub = await broker.emit("ai-chat/room-1", "ai:token", {"token": f"t{i}"})
                    assert pub.offset == i + 1
                    if i % 10 == 0:
                        await trio.lowlevel.checkpoint()
    for into in received:
        assert [e.offset for e in into] == list(range(1, events + 1))
        assert [e.data["token"] for e in into] == [f"t{i}" for i in range(events)]
        assert {e.event for e in into} == {"ai:token"}


async def test_channels_stay_separate(broker: Broker) -> None:
    async with connect(ws_url(broker)) as one, connect(ws_url(broker)) as two:
        a = await one.subscribe("a")
        b = await two.subscribe("b")
        both = await two.subscribe("a")
        broker.emit_nowait("a", "x", 1)
        broker.emit_nowait("b", "y", 2)
        broker.emit_nowait("a", "z", 3)
        got_a: list[Event] = []
        got_b: list[Event] = []
        got_both: list[Event] = []
        with trio.fail_after(5):
            await collect(a, 2, got_a)
            await collect(b, 1, got_b)
            await collect(both, 2, got_both)
        assert [(e.event, e.data, e.offset) for e in got_a] == [("x", 1, 1), ("z", 3, 2)]
        assert [(e.event, e.data, e.offset) for e in got_b] == [("y", 2, 1)]
        assert got_both == got_a


async def test_unsubscribe_stops_delivery(broker: Broker) -> None:
    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("news")
        keep = await client.subscribe("keep")
        broker.emit_nowait("news", "n", 1)
        await sub.unsubscribe()
        broker.emit_nowait("news", "n", 2)
        broker.emit_nowait("keep", "k", 3)
        with trio.fail_after(5):
            assert (await keep.__anext__()).data == 3
        remaining = [event.data async for event in sub]
        assert remaining == [1]
        assert broker.hub.statistics().subscriptions == 1


async def test_subscriber_sees_only_offsets_above_the_one_it_was_told(start_broker: StartBroker) -> None:
    broker = await start_broker(batching=True)
    async with connect(ws_url(broker)) as first, connect(ws_url(broker)) as second:
        await first.subscribe("c")
        broker.emit_nowait("c", "e", "before")  # still pending in the hub when the next sub arrives
        late = await second.subscribe("c")
        assert late.offset == 1
        broker.emit_nowait("c", "e", "after")
        with trio.fail_after(5):
            event = await late.__anext__()
        assert (event.offset, event.data) == (2, "after")


async def test_emit_validates_input(broker: Broker) -> None:
    with pytest.raises(EmitError, match="channel name"):
        broker.emit_nowait("bad channel", "e", None)
    with pytest.raises(EmitError, match="event name"):
        broker.emit_nowait("c", "", None)
    with pytest.raises(EmitError, match="unsupported msgpack type"):
        broker.emit_nowait("c", "e", {"x": object()})
    with pytest.raises(EmitError, match="map keys"):
        broker.emit_nowait("c", "e", {1: "x"})
    assert broker.hub.statistics().publications == 0


async def test_emit_without_subscribers_reaches_no_one(broker: Broker) -> None:
    first = await broker.publish("empty", "e", 1)
    second = await broker.publish("empty", "e", 2)
    assert (first.offset, second.offset) == (1, 1)
    assert first.epoch != second.epoch
    assert broker.hub.statistics().channels == 0


async def test_client_handlers_like_the_browser_api(broker: Broker) -> None:
    text: list[str] = []
    done = trio.Event()
    async with connect(ws_url(broker)) as client:
        chat = client.channel("ai-chat/abc")
        chat.on("ai:token", lambda e: text.append(e.data["token"])).on("ai:done", lambda e: done.set())
        await chat.subscribe()
        for token in ["Hel", "lo", "!"]:
            broker.emit_nowait("ai-chat/abc", "ai:token", {"token": token})
        broker.emit_nowait("ai-chat/abc", "ai:done", {})
        with trio.fail_after(5):
            await done.wait()
        assert "".join(text) == "Hello!"
        assert chat.offset == 4


async def test_pub_ping_hello_and_client_publish_policy(broker: Broker) -> None:
    async with connect(ws_url(broker)) as watcher, connect(ws_url(broker)) as other:
        sub = await watcher.subscribe("ai-chat/s1")
        assert await other.hello(client="test") == "tokenfan/0.1.0"
        await other.ping()
        offset, epoch = await other.publish("ai-chat/s1", "ai:cancel", {})
        assert (offset, epoch) == (1, sub.epoch)
        with trio.fail_after(5):
            event = await sub.__anext__()
        assert (event.event, event.data, event.offset) == ("ai:cancel", {}, 1)
        with pytest.raises(CommandError) as info:
            await other.publish("ai-chat/s1", "ai:token", {"token": "forged"})
        assert info.value.code == Code.NOT_ALLOWED
        with pytest.raises(CommandError) as info:
            await other.publish("news", "ai:cancel", {})
        assert info.value.code == Code.NOT_ALLOWED
        assert "may not publish" in info.value.msg


async def test_publisher_that_never_yields_keeps_pending_bounded(broker: Broker) -> None:
    from broker.hub import MAX_PENDING_BYTES

    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("tight", buffer=10_000)
        channel = broker.hub.channel("tight")
        assert channel is not None
        most = 0
        for i in range(5000):  # about 1 MB, published without a checkpoint
            broker.emit_nowait("tight", "blob", {"token": f"{i:0100d}"})
            most = max(most, channel.log_bytes)
        assert most < MAX_PENDING_BYTES + 200
        got: list[Event] = []
        with trio.fail_after(10):
            await collect(sub, 5000, got)
    assert [e.offset for e in got] == list(range(1, 5001))
