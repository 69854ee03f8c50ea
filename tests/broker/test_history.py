"""History, recovery after reconnect and late joins, over real sockets."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

import protocol as p
from broker import Broker, ChannelOptions, EmitError
from broker.client import Event, Subscribed, Subscription, connect
from broker.history import MemoryEngine
from tests.broker.conftest import StartBroker, http_json, ws_url


def offsets(events: Iterable[Event]) -> list[int]:
    """Every offset the events cover (a coalesced event covers first_offset … offset)."""
    return [o for e in events for o in range(e.first_offset, e.offset + 1)]


async def take(sub: Subscription, count: int) -> list[Event]:
    """The next events of ``sub`` until they cover ``count`` offsets."""
    got: list[Event] = []
    covered = 0
    with trio.fail_after(10):
        while covered < count:
            event = await sub.__anext__()
            got.append(event)
            covered += event.offset - event.first_offset + 1
    return got


async def test_reconnect_with_since_gets_exactly_what_was_missed(broker: Broker) -> None:
    channel = "ai-chat/recover"
    async with connect(ws_url(broker), reconnect=False) as first:
        sub = await first.subscribe(channel)
        for i in range(5):
            broker.emit(channel, "ai:token", {"token": f"a{i}"})
        seen = await take(sub, 5)
    assert offsets(seen) == [1, 2, 3, 4, 5]
    epoch = sub.epoch
    for i in range(7):
        broker.emit(channel, "ai:token", {"token": f"b{i}"})
    async with connect(ws_url(broker)) as second:
        again = await second.subscribe(channel, since=p.Position(o=5, ep=epoch))
        assert (again.recovered, again.epoch) == (True, epoch)
        missed = await take(again, 7)
        assert offsets(missed) == list(range(6, 13))
        assert [e.data["token"] for e in missed] == [f"b{i}" for i in range(7)]
        broker.emit(channel, "ai:token", {"token": "live"})
        live = await take(again, 1)
        assert (live[0].offset, live[0].data) == (13, {"token": "live"})
    assert broker.hub.statistics().recoveries == 1


async def test_unrecoverable_positions_get_recovered_false_and_no_replay(start_broker: StartBroker) -> None:
    broker = await start_broker(channels={"h/*": ChannelOptions(history_size=3)})
    epoch = ""
    for i in range(10):
        epoch = broker.publish("h/1", "e", i).epoch
    async with connect(ws_url(broker)) as client:
        for since in (p.Position(o=2, ep=epoch),  # trimmed: only 8, 9, 10 are kept
                      p.Position(o=8, ep="another-epoch"),  # stale epoch
                      p.Position(o=1000, ep=epoch)):  # from the future
            top = broker.engine.position("h/1")[1]
            sub = await client.subscribe("h/1", since=since)
            assert (sub.recovered, sub.offset, sub.epoch) == (False, top, epoch)
            broker.emit("h/1", "e", "live")
            (event,) = await take(sub, 1)
            assert event.data == "live"  # nothing was replayed before it
            await sub.unsubscribe()
        sub = await client.subscribe("h/1", since=p.Position(o=10, ep=epoch))
        assert sub.recovered
        recovered = await take(sub, 3)  # 11, 12, 13 were the "live" ones above
        assert offsets(recovered) == [11, 12, 13] and {e.data for e in recovered} == {"live"}
    assert broker.hub.statistics().recovery_misses == 3


async def test_catching_up_without_an_epoch_gets_the_stream_so_far(broker: Broker) -> None:
    channel = "ai-chat/late"
    for word in ["The", " answer", " so", " far"]:
        broker.emit(channel, "ai:token", {"token": word})
    async with connect(ws_url(broker)) as client:
        told: list[Subscribed] = []
        late = await client.channel(channel).on_subscribed(told.append).subscribe(since=p.Position(o=0))
        assert (told[0].recovered, told[0].offset) == (True, 0)
        so_far = await take(late, 4)
        broker.emit(channel, "ai:done", {"reason": "stop", "tokens": 4})
        done = await take(late, 1)
    assert "".join(e.data["token"] for e in so_far) == "The answer so far"
    assert (done[0].event, done[0].offset) == ("ai:done", 5)


async def test_catching_up_past_trimmed_history_gets_what_is_kept(start_broker: StartBroker) -> None:
    broker = await start_broker(channels={"h/*": ChannelOptions(history_size=3)})
    for i in range(6):
        broker.emit("h/x", "e", i)
    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("h/x", since=p.Position(o=0))
        assert not sub.recovered  # offsets 1-3 were trimmed
        replay = await take(sub, 3)
        assert [(e.offset, e.data) for e in replay] == [(4, 3), (5, 4), (6, 5)]


async def test_publications_racing_recoveries_arrive_exactly_once(broker: Broker) -> None:
    channel = "ai-chat/race"
    total = 3000
    epoch = broker.publish(channel, "ai:token", {"token": "0"}).epoch
    rng = random.Random(7)
    results: list[tuple[int, list[int]]] = []

    async def late_subscriber(delay: float) -> None:
        await trio.sleep(delay)
        since = rng.randrange(0, broker.engine.position(channel)[1] + 1)  # anywhere up to the top
        async with connect(ws_url(broker)) as client:
            sub = await client.subscribe(channel, since=p.Position(o=since, ep=epoch))
            assert sub.recovered
            results.append((since, offsets(await take(sub, total - since))))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(late_subscriber, rng.uniform(0, 0.05))
        for i in range(1, total):
            broker.emit(channel, "ai:token", {"token": str(i)})
            if i % 7 == 0:
                await trio.lowlevel.checkpoint()  # let subscriptions land between any two publications
    assert len(results) == 20
    for since, got in results:
        assert got == list(range(since + 1, total + 1))


async def test_history_expires_after_its_ttl_and_the_stream_is_forgotten(
        start_broker: StartBroker, autojump_clock: trio.testing.MockClock) -> None:
    broker = await start_broker(channels={"t/*": ChannelOptions(history_size=100, history_ttl=10.0)})
    first = broker.publish("t/1", "e", 1)
    broker.emit("t/1", "e", 2)
    await trio.sleep(6)
    broker.emit("t/1", "e", 3)
    await trio.sleep(5.5)  # 11.5 s after the first two: the 1 s sweep at 11 s dropped them
    assert broker.statistics().history.kept == 1
    page = broker.engine.since("t/1", after=2, epoch=first.epoch, limit=10, max_bytes=1 << 20)
    assert page.recovered and len(page.frames) == 1
    assert not broker.engine.since("t/1", after=1, epoch=first.epoch, limit=10, max_bytes=1 << 20).recovered
    await trio.sleep(6)
    stats = broker.statistics().history
    assert (stats.kept, stats.bytes, stats.streams) == (0, 0, 0)
    again = broker.publish("t/1", "e", 4)
    assert again.offset == 1 and again.epoch != first.epoch  # a new incarnation of the stream


def test_history_is_bounded_by_count_and_by_total_bytes() -> None:
    engine = MemoryEngine(lambda name: ChannelOptions(history_size=50), max_bytes=10_000)
    for i in range(200):
        engine.publish("old", "e", "x" * 50, persist=True, now=float(i))
    assert engine.statistics().kept == 50  # the count bound
    for i in range(200):
        engine.publish("new", "e", "y" * 50, persist=True, now=float(i))
    stats = engine.statistics()
    assert stats.bytes <= 10_000
    assert stats.trimmed_for_bytes > 0
    # The channel published to least recently lost its history first.
    old = engine.since("old", after=0, epoch=None, limit=1000, max_bytes=1 << 20)
    new = engine.since("new", after=0, epoch=None, limit=1000, max_bytes=1 << 20)
    assert len(new.frames) == 50
    assert len(old.frames) < 50


def test_publications_not_persisted_are_skipped_in_replays() -> None:
    engine = MemoryEngine(lambda name: ChannelOptions(history_size=10), max_bytes=1 << 20)
    stored = [engine.publish("c", "e", i, persist=i != 2, now=0.0) for i in range(1, 5)]
    page = engine.since("c", after=0, epoch=stored[0].epoch, limit=100, max_bytes=1 << 20)
    assert page.recovered and page.frames == [stored[0].frame, stored[2].frame, stored[3].frame]


async def test_persist_override_on_emits(broker: Broker) -> None:
    with pytest.raises(EmitError, match="keeps no history"):
        broker.emit("news", "e", 1, persist=True)
    broker.emit("ai-chat/p", "typing", {}, persist=False)
    broker.emit("ai-chat/p", "ai:token", {"token": "kept"})
    url = f"http://127.0.0.1:{broker.port}"
    body = await trio.to_thread.run_sync(_get_json, f"{url}/api/history?channel=ai-chat/p")
    assert [pub["event"] for pub in body["publications"]] == ["ai:token"]
    status, error = await trio.to_thread.run_sync(
        http_json, f"{url}/api/emit", {"channel": "news", "event": "e", "data": 1, "persist": True})
    assert status == 400 and "news keeps no history" in error["error"]
    status, error = await trio.to_thread.run_sync(
        http_json, f"{url}/api/emit", {"channel": "news", "event": "e", "persist": "yes"})
    assert status == 400 and "persist must be true or false" in error["error"]


def _get_json(url: str) -> dict[str, Any]:
    status, body = http_json(url)
    assert status == 200, body
    return body


async def test_history_api_pages_through_a_channel(broker: Broker) -> None:
    channel = "ai-chat/api"
    epoch = ""
    for i in range(25):
        epoch = broker.publish(channel, "ai:token", {"token": f"t{i}", "raw": b"\x00\x01"}).epoch
    base = f"http://127.0.0.1:{broker.port}/api/history"
    page = await trio.to_thread.run_sync(_get_json, f"{base}?channel={channel}&limit=10")
    assert (page["epoch"], page["top"], page["recovered"]) == (epoch, 25, True)
    assert (page["more"], page["next"]) == (True, 10)
    publications = page["publications"]
    assert publications[0] == {"offset": 1, "event": "ai:token",
                               "data": {"token": "t0", "raw": {"$bin": "0001"}}}
    rest = await trio.to_thread.run_sync(_get_json, f"{base}?channel={channel}&since=10&epoch={epoch}")
    assert [pub["offset"] for pub in rest["publications"]] == list(range(11, 26))
    assert (rest["recovered"], rest["more"]) == (True, False)
    stale = await trio.to_thread.run_sync(_get_json, f"{base}?channel={channel}&since=3&epoch=nope")
    assert (stale["recovered"], stale["publications"]) == (False, [])
    unknown = await trio.to_thread.run_sync(_get_json, f"{base}?channel=ai-chat/none")
    assert (unknown["epoch"], unknown["top"], unknown["publications"]) == (None, 0, [])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "channel is required"),
        ("?channel=bad%20name", "characters outside"),
        ("?channel=a&since=-1", "since must be an integer from 0"),
        ("?channel=a&limit=0", "limit must be an integer from 1 to 10000"),
        ("?channel=a&limit=x", "limit must be an integer"),
        ("?channel=a&colour=red", "unknown query parameter(s) colour"),
        ("?channel=a&channel=b", "'channel' is given twice"),
    ],
)
async def test_history_api_names_bad_queries(broker: Broker, query: str, message: str) -> None:
    status, body = await trio.to_thread.run_sync(
        http_json, f"http://127.0.0.1:{broker.port}/api/history{query}")
    assert status == 400
    assert message in str(body["error"])
