"""Property: whatever the emits, the nodes they go to, the watchers' disconnects and
reconnects (to any node), and cuts of the nodes' pub/sub connections, every watcher's text is
exactly what was emitted, in order, once."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as p
from bench.redisproc import RedisServer
from broker import Broker, Config
from broker.client import connect
from broker.redis.resp import RedisAddress, open_connection
from tests.broker.conftest import ONE_ADDRESS_MANY_CLIENTS

NODES = 3
WATCHERS = 3

Step = tuple[str, int, int]  # (what, which node or watcher, which node)

steps = st.lists(st.one_of(
    st.tuples(st.just("emit"), st.integers(0, NODES - 1), st.integers(1, 5)),  # n tokens on a node
    st.tuples(st.just("leave"), st.integers(0, WATCHERS - 1), st.just(0)),
    st.tuples(st.just("join"), st.integers(0, WATCHERS - 1), st.integers(0, NODES - 1)),
    st.tuples(st.just("pause"), st.just(0), st.just(0)),
    st.tuples(st.just("cut"), st.just(0), st.just(0)),  # Redis drops every node's pub/sub connection
), min_size=1, max_size=25)


@dataclass
class Watcher:
    """A watcher's view: what it has read, and its connection while it has one."""

    tokens: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    epoch: str | None = None
    leaving: trio.Event | None = None  #: while connected
    ended: trio.Event | None = None
    done: trio.Event = field(default_factory=trio.Event)  #: set when it has read the last token


counter = itertools.count()


async def _scenario(url: str, plan: list[Step]) -> None:
    channel = f"ai-chat/prop-{next(counter)}"
    emitted: list[str] = []
    async with trio.open_nursery() as nursery:
        nodes = [Broker(Config(port=0, engine=url, **ONE_ADDRESS_MANY_CLIENTS)) for _ in range(NODES)]
        for node in nodes:
            await nursery.start(node.serve)
        watchers = [Watcher() for _ in range(WATCHERS)]

        async def watch(watcher: Watcher, node: Broker, leaving: trio.Event, ended: trio.Event, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            """One connection of a watcher, in a task of its own: subscribe, read until told to
            leave, then close (politely: the close handshake, not a cancelled one)."""
            try:
                async with connect(f"ws://127.0.0.1:{node.port}/ws", reconnect=False) as client:
                    since = p.Position(o=watcher.offsets[-1] if watcher.offsets else 0, ep=watcher.epoch)
                    sub = await client.subscribe(channel, since=since)
                    assert sub.epoch and watcher.epoch in (None, sub.epoch)
                    watcher.epoch = sub.epoch
                    task_status.started()
                    async with trio.open_nursery() as reading:
                        async def read() -> None:
                            async for event in sub:
                                watcher.tokens.append(event.data["token"])
                                watcher.offsets.append(event.offset)
                                if event.data["token"] == "<end>":
                                    watcher.done.set()

                        reading.start_soon(read)
                        await leaving.wait()
                        reading.cancel_scope.cancel()
            finally:
                ended.set()

        async def join(watcher: Watcher, node: Broker) -> None:
            watcher.leaving, watcher.ended = trio.Event(), trio.Event()
            await nursery.start(watch, watcher, node, watcher.leaving, watcher.ended)

        async def leave(watcher: Watcher) -> None:
            if watcher.leaving is not None and watcher.ended is not None:
                watcher.leaving.set()
                await watcher.ended.wait()
                watcher.leaving = watcher.ended = None

        for index, watcher in enumerate(watchers):
            await join(watcher, nodes[index % NODES])
        for what, which, node_index in plan:
            if what == "emit":
                # Emits of one node keep their order; the last is awaited, so the next step's
                # emits (maybe on another node) come after these.
                for count in range(node_index, 0, -1):
                    token = f"<{len(emitted)}>"
                    emitted.append(token)
                    if count > 1:
                        nodes[which].emit_nowait(channel, "ai:token", {"token": token})
                    else:
                        await nodes[which].emit(channel, "ai:token", {"token": token})
            elif what == "leave":
                await leave(watchers[which])
            elif what == "join" and watchers[which].leaving is None:
                await join(watchers[which], nodes[node_index])
            elif what == "cut":
                async with open_connection(RedisAddress.parse(url)) as redis:
                    await redis.execute("CLIENT", "KILL", "TYPE", "pubsub")
            else:
                await trio.sleep(0.01)
        for index, watcher in enumerate(watchers):
            if watcher.leaving is None:
                await join(watcher, nodes[index % NODES])
        emitted.append("<end>")
        await nodes[0].emit(channel, "ai:token", {"token": "<end>"})
        with trio.fail_after(10):
            for watcher in watchers:
                await watcher.done.wait()
        for watcher in watchers:
            await leave(watcher)
        nursery.cancel_scope.cancel()
    for watcher in watchers:
        assert "".join(watcher.tokens) == "".join(emitted)
        assert watcher.offsets == list(range(1, len(watcher.offsets) + 1))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_every_watcher_reads_exactly_what_was_emitted(redis_server: RedisServer, plan: list[Step]) -> None:
    trio.run(_scenario, redis_server.url, plan)
