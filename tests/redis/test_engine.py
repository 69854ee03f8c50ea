"""Several brokers on one private redis-server act as one: fan-out, offsets, recovery, outages."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import trio
import trio.lowlevel

import protocol as p
from bench.redisproc import RedisServer
from broker import Broker, ChannelOptions, Config, ConfigError, EngineUnavailable
from broker.client import StreamLost, Subscribed, connect
from tests.broker.conftest import ONE_ADDRESS_MANY_CLIENTS
from tests.redis.nodes import StartNode, post, take, ws


async def test_a_publication_on_one_node_reaches_subscribers_on_every_node(start_node: StartNode) -> None:
    a, b, c = await start_node(), await start_node(), await start_node()
    async with connect(ws(a)) as on_a, connect(ws(b)) as on_b:
        subs = [await on_a.subscribe("ai-chat/x"), await on_b.subscribe("ai-chat/x")]
        first = await c.emit("ai-chat/x", "ai:token", {"token": "one"})  # in-process, on a third node
        status, body = await trio.to_thread.run_sync(
            post, b, "/api/emit", {"channel": "ai-chat/x", "event": "ai:token", "data": {"token": "two"}})
        assert status == 200 and body["offset"] == first.offset + 1 and body["epoch"] == first.epoch
        await on_a.publish("ai-chat/x", "ai:cancel", {})  # a client's pub, on node a
        for sub in subs:
            events = await take(sub, 3)
            assert [(e.event, e.offset) for e in events] == [
                ("ai:token", first.offset), ("ai:token", first.offset + 1), ("ai:cancel", first.offset + 2)]
            assert [e.data for e in events[:2]] == [{"token": "one"}, {"token": "two"}]


async def test_cross_node_fan_out_in_order(start_node: StartNode) -> None:
    """1,000 events to 50 clients on each of two nodes, emitted on a third: all, in order, once."""
    nodes = [await start_node(), await start_node()]
    emitter = await start_node()
    got: dict[int, list[int]] = {}
    async with trio.open_nursery() as nursery:
        ready = trio.Semaphore(0)

        async def watch(index: int, node: Broker) -> None:
            async with connect(ws(node)) as client:
                sub = await client.subscribe("news/all")
                ready.release()
                got[index] = [event.data["n"] for event in await take(sub, 1000, seconds=30)]

        for index in range(100):
            nursery.start_soon(watch, index, nodes[index % 2])
        for _ in range(100):
            await ready.acquire()
        for n in range(1000):
            emitter.emit_nowait("news/all", "tick", {"n": n})
            if n % 100 == 0:
                await trio.lowlevel.checkpoint()
    assert got == {index: list(range(1000)) for index in range(100)}


async def test_recovery_on_another_node(start_node: StartNode) -> None:
    a, b = await start_node(), await start_node()
    async with connect(ws(a)) as client:
        sub = await client.subscribe("ai-chat/r")
        for i in range(5):
            await a.emit("ai-chat/r", "ai:token", {"token": f"t{i}"})
        seen = await take(sub, 5)
    last = seen[-1]
    assert sub.epoch
    for i in range(5, 9):  # while the watcher is away
        await b.emit("ai-chat/r", "ai:token", {"token": f"t{i}"})
    said: list[Subscribed] = []
    async with connect(ws(b)) as client:
        again = client.channel("ai-chat/r").on_subscribed(said.append)
        await again.subscribe(since=p.Position(o=last.offset, ep=sub.epoch))
        await a.emit("ai-chat/r", "ai:token", {"token": "t9"})  # live, from the other node
        events = await take(again, 5)
    assert said and said[0].recovered
    assert [e.data["token"] for e in events] == [f"t{i}" for i in range(5, 10)]
    assert [e.offset for e in events] == list(range(last.offset + 1, last.offset + 6))


async def test_history_over_http_comes_from_redis(start_node: StartNode) -> None:
    a, b = await start_node(), await start_node()
    for i in range(3):
        await a.emit("ai-chat/h", "ai:token", {"token": f"t{i}"})
    a.emit_nowait("ai-chat/h", "typing", {}, persist=False)
    last = await a.emit("ai-chat/h", "ai:done", {})
    url = f"http://127.0.0.1:{b.port}/api/history?channel=ai-chat/h&since=1"
    with await trio.to_thread.run_sync(urllib.request.urlopen, url) as response:
        body = json.load(response)
    assert body["recovered"] and body["top"] == last.offset and body["epoch"] == last.epoch
    assert [(pub["offset"], pub["event"]) for pub in body["publications"]] == [
        (2, "ai:token"), (3, "ai:token"), (5, "ai:done")]  # 4 was not kept
    health = f"http://127.0.0.1:{a.port}/healthz"
    with await trio.to_thread.run_sync(urllib.request.urlopen, health) as response:
        engine = json.load(response)["engine"]
    assert engine["kind"] == "redis" and engine["connected"] and engine["published"] == 5
    assert engine["url"].startswith("redis://127.0.0.1:") and engine["errors"] == 0


async def test_an_unreachable_redis_is_a_clear_error(redis_server: RedisServer) -> None:
    url = redis_server.url
    redis_server.kill()
    broker = Broker(Config(port=0, engine=url))
    with pytest.raises(ConfigError, match=r"engine: cannot connect to Redis at redis://127\.0\.0\.1"):
        await broker.serve()
    with pytest.raises(ConfigError, match=r"engine: must be memory or a redis:// URL"):
        Config(engine="postgres://x")


async def test_emits_fail_clearly_while_redis_is_away_and_work_when_it_is_back(
        start_node: StartNode, redis_server: RedisServer) -> None:
    a = await start_node()
    await a.emit("ai-chat/o", "ai:token", {"token": "before"})
    redis_server.kill()
    with trio.fail_after(10):
        while True:
            try:
                await a.emit("ai-chat/o", "ai:token", {"token": "lost"})
            except EngineUnavailable:
                break
            await trio.sleep(0.05)
    status, body = await trio.to_thread.run_sync(
        post, a, "/api/emit", {"channel": "ai-chat/o", "event": "ai:token", "data": {"token": "x"}})
    assert status == 503 and "retry" in body["error"]
    redis_server.start(port=redis_server.port)
    with trio.fail_after(15):
        while True:
            try:
                pub = await a.emit("ai-chat/o", "ai:token", {"token": "after"})
                break
            except EngineUnavailable:
                await trio.sleep(0.1)
    assert pub.offset == 1  # Redis kept nothing: a new stream, a new epoch


async def redis_command(server: RedisServer, *args: str | int) -> object:
    from broker.redis.resp import RedisAddress, open_connection

    async with open_connection(RedisAddress.parse(server.url)) as redis:
        return await redis.execute(*args)


async def test_a_cut_pubsub_connection_loses_nothing(start_node: StartNode,
                                                     redis_server: RedisServer) -> None:
    """Redis drops the node's subscriber connection mid-stream: it follows again and reads what it
    missed from the stream, so its subscribers see every publication once, in order."""
    watching, emitting = await start_node(), await start_node()
    async with connect(ws(watching)) as client:
        sub = await client.subscribe("ai-chat/cut")
        async with trio.open_nursery() as nursery:
            async def emit_all() -> None:
                for n in range(300):
                    await emitting.emit("ai-chat/cut", "tick", {"n": n})
                    if n == 100:
                        # Both nodes' pub/sub connections (each follows the control channel).
                        assert await redis_command(redis_server, "CLIENT", "KILL", "TYPE", "pubsub") == 2
                    await trio.sleep(0.002)

            nursery.start_soon(emit_all)
            events = await take(sub, 300, seconds=20)
    assert [event.data["n"] for event in events] == list(range(300))
    assert [event.offset for event in events] == list(range(1, 301))
    assert watching.redis is not None and watching.redis.gaps_filled >= 1


async def test_redis_away_for_two_seconds_mid_stream(start_node: StartNode,
                                                     redis_server: RedisServer) -> None:
    """Emits fail clearly while Redis is away. Redis comes back empty (no persistence): the stream
    began again, so the subscriber is told to reconnect (bye 4105), and the client, resubscribing,
    hears ``recovered: false`` and the new epoch. Nothing arrives twice or out of order."""
    node = await start_node()
    published: list[tuple[str, int]] = []
    refused = 0
    said: list[Subscribed] = []
    resubscribed = trio.Event()

    def on_subscribed(subscribed: Subscribed) -> None:
        said.append(subscribed)
        if subscribed.resubscribed:
            resubscribed.set()

    async with connect(ws(node)) as client:
        sub = client.channel("ai-chat/away").on_subscribed(on_subscribed)
        await sub.subscribe()
        for n in range(20):
            pub = await node.emit("ai-chat/away", "tick", {"n": n})
            published.append((pub.epoch, pub.offset))
        redis_server.kill()
        with trio.fail_after(5):
            while True:
                try:
                    await node.emit("ai-chat/away", "tick", {"n": -1})
                except EngineUnavailable:
                    refused += 1
                    break
        await trio.sleep(2)
        redis_server.start(port=redis_server.port)
        with trio.fail_after(15):
            await resubscribed.wait()
        for n in range(20, 30):
            pub = await node.emit("ai-chat/away", "tick", {"n": n})
            published.append((pub.epoch, pub.offset))
        before = await take(sub, 20)
        with pytest.raises(StreamLost):  # the client's word for "reload: the stream began again"
            await take(sub, 1)
        after = await take(sub, 10)
    assert refused == 1
    assert [event.data["n"] for event in before + after] == list(range(30))
    assert [event.offset for event in before + after] == list(range(1, 21)) + list(range(1, 11))
    assert said[1].recovered is False and said[1].epoch != said[0].epoch
    assert [pub[1] for pub in published] == list(range(1, 21)) + list(range(1, 11))
    assert {pub[0] for pub in published[20:]} == {said[1].epoch}


async def test_restarted_redis_with_appendonly_keeps_recovery(nursery: trio.Nursery) -> None:
    server = RedisServer(appendonly=True)
    server.start()
    try:
        node = Broker(Config(port=0, engine=server.url, **ONE_ADDRESS_MANY_CLIENTS))
        await nursery.start(node.serve)
        first = await node.emit("ai-chat/aof", "ai:token", {"token": "a"})
        await node.emit("ai-chat/aof", "ai:token", {"token": "b"})
        await redis_command(server, "SAVE")  # not needed with appendfsync everysec, but quick
        server.kill()
        server.start(port=server.port)
        with trio.fail_after(15):
            while True:
                try:
                    third = await node.emit("ai-chat/aof", "ai:token", {"token": "c"})
                    break
                except EngineUnavailable:
                    await trio.sleep(0.1)
        assert (third.offset, third.epoch) == (first.offset + 2, first.epoch)
        said: list[Subscribed] = []
        async with connect(ws(node)) as client:
            sub = client.channel("ai-chat/aof").on_subscribed(said.append)
            await sub.subscribe(since=p.Position(o=first.offset, ep=first.epoch))
            events = await take(sub, 2)
        assert said[0].recovered and [e.data["token"] for e in events] == ["b", "c"]
    finally:
        server.close()


async def test_names_nobody_publishes_on_do_not_pile_up_in_redis(start_node: StartNode,
                                                                  redis_server: RedisServer) -> None:
    """Subscribing gives a channel its epoch in Redis, but only for a minute unless something is
    published: a client subscribing to many names leaves no lasting keys."""
    node = await start_node()
    async with connect(ws(node)) as client:
        for index in range(20):
            await client.subscribe(f"names/n{index}")
        await node.emit("names/n0", "e", 1)
    ttls = [await redis_command(redis_server, "TTL", f"tokenfan:{{names/n{index}}}:meta")
            for index in range(20)]
    assert all(0 < ttl <= 60 for ttl in ttls[1:]), ttls  # never published on: a minute
    assert isinstance(ttls[0], int) and ttls[0] > 3600  # published on: kept as its history is


async def test_many_channels_are_followed_again_after_a_cut(start_node: StartNode,
                                                            redis_server: RedisServer) -> None:
    """600 followed channels (more than one batch) are followed again after Redis cuts the node's
    pub/sub connection; what was published on each meanwhile is read back from its stream."""
    kept = {"channels": {"many/*": ChannelOptions(history_size=10)}}
    watching, emitting = await start_node(**kept), await start_node(**kept)
    channels = [f"many/c{index}" for index in range(600)]
    async with connect(ws(watching)) as a, connect(ws(watching)) as b, connect(ws(watching)) as c:
        subs = [await (a, b, c)[index // 200].subscribe(channel) for index, channel in enumerate(channels)]
        await redis_command(redis_server, "CLIENT", "KILL", "TYPE", "pubsub")
        for channel in channels:  # while the node follows them all again
            emitting.emit_nowait(channel, "e", channel)
        await emitting.emit(channels[-1], "e", "last")
        for sub, channel in zip(subs, channels, strict=True):
            [event] = await take(sub, 1)
            assert event.data == channel


async def test_scripts_forgotten_by_redis_are_loaded_again(start_node: StartNode,
                                                           redis_server: RedisServer) -> None:
    node = await start_node()
    await node.emit("ai-chat/s", "e", 1)
    await redis_command(redis_server, "SCRIPT", "FLUSH")
    with pytest.raises(EngineUnavailable, match="NOSCRIPT"):
        await node.emit("ai-chat/s", "e", 2)  # this one is refused, and the scripts reloaded
    assert (await node.emit("ai-chat/s", "e", 3)).offset == 2
