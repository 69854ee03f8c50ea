"""History, recovery after reconnect and late joins, over real sockets."""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as p
from broker import Broker, ChannelOptions, EmitError
from broker.client import Event, Subscribed, Subscription, connect
from broker.history import (
    _RECORD,
    EXPIRY_MIN_STEP,
    EXPIRY_STEPS,
    SLOT_COST,
    STREAM_COST,
    EngineStatistics,
    MemoryEngine,
)
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
            broker.emit_nowait(channel, "ai:token", {"token": f"a{i}"})
        seen = await take(sub, 5)
    assert offsets(seen) == [1, 2, 3, 4, 5]
    epoch = sub.epoch
    for i in range(7):
        broker.emit_nowait(channel, "ai:token", {"token": f"b{i}"})
    async with connect(ws_url(broker)) as second:
        again = await second.subscribe(channel, since=p.Position(o=5, ep=epoch))
        assert (again.recovered, again.epoch) == (True, epoch)
        missed = await take(again, 7)
        assert offsets(missed) == list(range(6, 13))
        assert [e.data["token"] for e in missed] == [f"b{i}" for i in range(7)]
        broker.emit_nowait(channel, "ai:token", {"token": "live"})
        live = await take(again, 1)
        assert (live[0].offset, live[0].data) == (13, {"token": "live"})
    assert broker.hub.statistics().recoveries == 1


async def test_unrecoverable_positions_get_recovered_false_and_no_replay(start_broker: StartBroker) -> None:
    broker = await start_broker(channels={"h/*": ChannelOptions(history_size=3)})
    epoch, top = "", 0
    for i in range(10):
        pub = await broker.publish("h/1", "e", i)
        epoch, top = pub.epoch, pub.offset
    async with connect(ws_url(broker)) as client:
        for since in (p.Position(o=2, ep=epoch),  # trimmed: only 8, 9, 10 are kept
                      p.Position(o=8, ep="another-epoch"),  # stale epoch
                      p.Position(o=1000, ep=epoch)):  # from the future
            sub = await client.subscribe("h/1", since=since)
            assert (sub.recovered, sub.offset, sub.epoch) == (False, top, epoch)
            top = (await broker.emit("h/1", "e", "live")).offset
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
        await broker.emit(channel, "ai:token", {"token": word})
    async with connect(ws_url(broker)) as client:
        told: list[Subscribed] = []
        late = await client.channel(channel).on_subscribed(told.append).subscribe(since=p.Position(o=0))
        assert (told[0].recovered, told[0].offset) == (True, 0)
        so_far = await take(late, 4)
        broker.emit_nowait(channel, "ai:done", {"reason": "stop", "tokens": 4})
        done = await take(late, 1)
    assert "".join(e.data["token"] for e in so_far) == "The answer so far"
    assert (done[0].event, done[0].offset) == ("ai:done", 5)


async def test_catching_up_past_trimmed_history_gets_what_is_kept(start_broker: StartBroker) -> None:
    broker = await start_broker(channels={"h/*": ChannelOptions(history_size=3)})
    for i in range(6):
        await broker.emit("h/x", "e", i)
    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("h/x", since=p.Position(o=0))
        assert not sub.recovered  # offsets 1-3 were trimmed
        replay = await take(sub, 3)
        assert [(e.offset, e.data) for e in replay] == [(4, 3), (5, 4), (6, 5)]


async def test_publications_racing_recoveries_arrive_exactly_once(broker: Broker) -> None:
    channel = "ai-chat/race"
    total = 3000
    epoch = (await broker.publish(channel, "ai:token", {"token": "0"})).epoch
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
            broker.emit_nowait(channel, "ai:token", {"token": str(i)})
            if i % 7 == 0:
                await trio.lowlevel.checkpoint()  # let subscriptions land between any two publications
    assert len(results) == 20
    for since, got in results:
        assert got == list(range(since + 1, total + 1))


async def test_history_expires_after_its_ttl_and_the_stream_is_forgotten(
        start_broker: StartBroker, autojump_clock: trio.testing.MockClock) -> None:
    broker = await start_broker(channels={"t/*": ChannelOptions(history_size=100, history_ttl=10.0)})
    first = await broker.publish("t/1", "e", 1)
    broker.emit_nowait("t/1", "e", 2)
    await trio.sleep(6)
    broker.emit_nowait("t/1", "e", 3)
    await trio.sleep(5.5)  # 11.5 s after the first two: the 1 s sweep at 11 s dropped them
    assert broker.statistics().history.kept == 1
    page = broker.engine.since("t/1", after=2, epoch=first.epoch, limit=10, max_bytes=1 << 20)
    assert page.recovered and len(page.frames) == 1
    assert not broker.engine.since("t/1", after=1, epoch=first.epoch, limit=10, max_bytes=1 << 20).recovered
    await trio.sleep(6)
    stats = broker.statistics().history
    assert (stats.kept, stats.bytes, stats.streams) == (0, 0, 0)
    again = await broker.publish("t/1", "e", 4)
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
        broker.emit_nowait("news", "e", 1, persist=True)
    broker.emit_nowait("ai-chat/p", "typing", {}, persist=False)
    broker.emit_nowait("ai-chat/p", "ai:token", {"token": "kept"})
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
        epoch = (await broker.publish(channel, "ai:token", {"token": f"t{i}", "raw": b"\x00\x01"})).epoch
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


# -- the memory engine at any number of channels (issue 13, finding 1) ------------------------


def _engine(max_bytes: int = 1 << 30, **options: Any) -> MemoryEngine:
    channel_options = ChannelOptions(**{"history_size": 10, "history_ttl": 10.0, **options})
    return MemoryEngine(lambda name: channel_options, max_bytes=max_bytes)


def _check(engine: MemoryEngine, now: float | None = None) -> None:
    """Every running total equals a count made the slow way; the order and expiry structures
    hold exactly the streams with history."""
    streams = engine._streams
    with_history = [s for s in streams.values() if s.kept]
    charged = sum(STREAM_COST + sys.getsizeof(s.name) + s.kept * SLOT_COST + len(s.data) * 9 // 8
                  for s in with_history)
    stats = engine.statistics()
    assert (stats.streams, stats.histories) == (len(streams), len(with_history))
    assert (stats.kept, stats.bytes) == (sum(s.kept for s in with_history), charged)
    assert stats.bytes <= engine._max_bytes
    for s in streams.values():  # the records: ends rising to the last frame's, times in order
        records = list(_RECORD.iter_unpack(s.meta))
        assert [e for e, _ in records] == sorted(e for e, _ in records)
        assert [t for _, t in records] == sorted(t for _, t in records)
        assert not records or records[-1][0] - records[0][0] <= len(s.data) <= records[-1][0]
    assert all(s.holds > 0 for s in streams.values() if not s.kept)  # nothing left for nobody
    # The publish-order ring: the streams with history, least recently published first.
    ring, node = [], engine._lru.newer
    while node is not engine._lru:
        assert node is not None and node.newer is not None and node.newer.older is node
        ring.append(node)
        node = node.newer
    assert sorted(map(id, ring)) == sorted(map(id, with_history))
    last_times = [_RECORD.unpack_from(s.meta, len(s.meta) - 16)[1] for s in ring]
    assert last_times == sorted(last_times)
    # Each stream with history is filed in one expiry bucket, no later than its oldest deadline
    # (unless it never expires).
    filed = {id(s): key for key, bucket in engine._buckets.items() for s in bucket}
    expiring = [s for s in with_history if math.isfinite(s.options.history_ttl)]
    assert len(filed) == sum(len(b) for b in engine._buckets.values()) == len(expiring)
    for key, bucket in engine._buckets.items():
        assert all(bucket[s.slot] is s and s.bucket is bucket for s in bucket)
        assert key in engine._due
    for s in expiring:
        assert filed[id(s)] <= s.oldest_time() + s.options.history_ttl + EXPIRY_MIN_STEP
    if now is not None:  # swept at ``now``: nothing older than its TTL (and a bucket's span) is left
        assert all(s.oldest_time() >= now - s.options.history_ttl - EXPIRY_MIN_STEP for s in with_history)


def _sweep(engine: MemoryEngine, now: float, budget: int = 1000) -> int:
    """Expire at ``now`` the way the broker does; return how many calls it took."""
    calls = 1
    while engine.expire(now, budget=budget):
        calls += 1
    return calls


def test_the_cap_trims_the_least_recently_published_streams_first() -> None:
    engine = _engine()
    cost = [engine.publish(f"c/{i}", "e", "x" * 20, persist=True, now=0.0) for i in range(5)]
    one = STREAM_COST + sys.getsizeof("c/0") + SLOT_COST + len(cost[0].frame) * 9 // 8
    assert engine.statistics().bytes == 5 * one
    engine._max_bytes = 5 * one
    engine.publish("c/0", "e", "x" * 20, persist=True, now=1.0)  # c/0 is now the newest
    assert [engine.position(f"c/{i}")[1] for i in range(5)] == [2, 0, 1, 1, 1]  # c/1 forgotten
    engine.publish("c/5", "e", "x" * 20, persist=True, now=2.0)
    assert [engine.position(f"c/{i}")[1] for i in range(6)] == [2, 0, 0, 1, 1, 1]
    stats = engine.statistics()
    assert (stats.trimmed_for_bytes, stats.histories) == (2, 4)
    _check(engine)


def test_a_held_stream_keeps_its_position_but_is_not_charged_without_history() -> None:
    engine = _engine(max_bytes=2000)
    engine.hold("h/1")
    engine.hold("n/1")
    assert engine.statistics().bytes == 0  # held without history: charged to the subscriptions
    first = engine.publish("h/1", "e", "a", persist=True, now=0.0)
    assert engine.statistics().histories == 1
    for i in range(20):  # other channels push h/1's history out
        engine.publish(f"o/{i}", "e", "b" * 100, persist=True, now=1.0)
        _check(engine)
    assert engine.position("h/1") == (first.epoch, 1)
    assert engine.since("h/1", after=0, epoch=first.epoch, limit=10, max_bytes=1 << 20).recovered is False
    assert engine.publish("h/1", "e", "c", persist=True, now=2.0).offset == 2  # same epoch, next offset
    engine.release("h/1")
    assert engine.position("h/1")[1] == 2  # still has history
    engine.release("n/1")
    assert engine.position("n/1") == ("", 0)
    _check(engine)


def test_data_that_cannot_be_encoded_leaves_no_stream() -> None:
    engine = _engine()
    with pytest.raises(p.LocalProtocolError):
        engine.publish("c/1", "e", 1 << 70, persist=True, now=0.0)
    assert engine.statistics().streams == 0


def test_expiry_looks_at_a_budget_of_streams_per_call() -> None:
    engine = _engine(history_ttl=5.0)
    for i in range(5000):
        engine.publish(f"c/{i}", "e", i, persist=True, now=i / 5000)  # all due within a second
    assert not engine.expire(4.0, budget=100)  # nothing due yet
    assert engine.statistics().kept == 5000
    assert _sweep(engine, 7.0, budget=1000) == 5  # five full batches
    assert engine.statistics() == EngineStatistics(streams=0, histories=0, kept=0, bytes=0,
                                                   trimmed_for_bytes=0)
    _check(engine)


def test_expiry_is_late_by_at_most_a_bucket_span() -> None:
    engine = _engine(history_ttl=10.0, history_size=100)
    for t in range(40):
        engine.publish("c", "e", t, persist=True, now=t / 4)  # one every 0.25 s, for 10 s
    _check(engine)
    for now in (10.0, 12.3, 15.0, 19.74):
        _sweep(engine, now)
        kept = [t for _, t in _RECORD.iter_unpack(engine._streams["c"].meta)]
        assert kept[0] >= now - 10.0 - EXPIRY_MIN_STEP  # the expired ones are gone
        assert len(kept) >= sum(1 for t in range(40) if t / 4 >= now - 10.0)  # no live one is
        _check(engine, now)
    _sweep(engine, 20.0 + EXPIRY_MIN_STEP)
    assert engine.statistics().streams == 0


def test_a_long_ttl_uses_few_expiry_buckets_and_an_infinite_one_none() -> None:
    engine = MemoryEngine(lambda name: ChannelOptions(history_size=10, history_ttl=(
        math.inf if name.startswith("inf") else 30 * 86400.0)), max_bytes=1 << 30)
    for i in range(20_000):
        engine.publish(f"c/{i}", "e", i, persist=True, now=float(i * 60))  # a minute apart, two weeks
        engine.publish(f"inf/{i}", "e", i, persist=True, now=float(i * 60))
    assert len(engine._buckets) <= EXPIRY_STEPS + 1
    _sweep(engine, 1e9)
    assert engine.statistics().histories == 20_000  # the infinite ones
    _check(engine)


def test_the_streams_table_shrinks_after_a_mass_expiry() -> None:
    engine = _engine(history_ttl=1.0)
    for i in range(100_000):
        engine.publish(f"c/{i}", "e", i, persist=True, now=0.0)
    engine.publish("late", "e", 1, persist=True, now=10.0)
    big = sys.getsizeof(engine._streams)
    _sweep(engine, 5.0)
    assert engine.statistics().streams == 1
    assert sys.getsizeof(engine._streams) < big / 100


@given(st.lists(st.tuples(st.sampled_from(["pub", "keep", "skip", "hold", "release", "sweep"]),
                          st.integers(0, 7), st.integers(0, 300)), max_size=200),
       st.integers(300, 4000), st.integers(1, 5))
@settings(max_examples=150, deadline=None)
def test_random_operations_keep_every_total_and_structure_exact(
        ops: list[tuple[str, int, int]], max_bytes: int, budget: int) -> None:
    options = {"a": ChannelOptions(history_size=3, history_ttl=2.0),
               "b": ChannelOptions(history_size=50, history_ttl=30.0),
               "n": ChannelOptions()}
    engine = MemoryEngine(lambda name: options[name[0]], max_bytes=max_bytes)
    holds: dict[str, int] = {}
    now = 0.0
    for op, index, size in ops:
        channel = f"{'abn'[index % 3]}/{index}"
        now += size / 100
        if op in ("pub", "keep", "skip"):
            persist = op != "skip" and options[channel[0]].persist
            epoch, top = engine.position(channel)
            stored = engine.publish(channel, "e", "x" * size, persist=persist, now=now)
            assert stored.offset == top + 1 and (top == 0 or stored.epoch == epoch)
        elif op == "hold":
            engine.hold(channel)
            holds[channel] = holds.get(channel, 0) + 1
        elif op == "release" and holds.get(channel):
            engine.release(channel)
            holds[channel] -= 1
        elif op == "sweep":
            _sweep(engine, now, budget)
            _check(engine, now)
        _check(engine)
        assert all(engine.position(c)[0] for c, n in holds.items() if n)  # held streams are kept
    _sweep(engine, now + 100)
    _check(engine, now + 100)
    assert engine.statistics().kept == 0


def test_a_stream_forgotten_before_its_first_publication_comes_back_in_its_epoch() -> None:
    engine = MemoryEngine(lambda channel: ChannelOptions(history_size=10), max_bytes=1 << 20)
    engine.hold("a")
    epoch, _ = engine.position("a")
    engine.release("a")  # every subscriber left before anything was published: forgotten
    assert engine.position("a") == ("", 0)
    engine.hold("a")
    assert engine.position("a") == (epoch, 0)
    engine.publish("a", "x", {}, persist=True, now=0.0)
    replay = engine.since("a", after=0, epoch=epoch, limit=10, max_bytes=1 << 20)
    assert replay.recovered and len(replay.frames) == 1
    # Once something was published, a forgotten stream's epoch is never reused.
    engine.release("a")
    engine.expire(10_000.0)
    engine.hold("a")
    assert engine.position("a")[0] != epoch
