"""AI answers across nodes on one private Redis: one per session, stop from anywhere, shared
conversations, and ``generator_lost`` when the node running an answer dies."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import trio

import protocol as p
from bench.redisproc import RedisServer
from broker import Broker
from broker.client import Event, connect
from tests.broker.fake_openai import ANSWER, FakeOpenAI
from tests.broker.test_cli import read_line, stop
from tests.redis.nodes import StartNode, post, take, ws


async def events_until_end(sub: Any, seconds: float = 20) -> list[Event]:
    events: list[Event] = []
    with trio.fail_after(seconds):
        async for event in sub:
            events.append(event)
            if event.event in ("ai:done", "ai:error"):
                return events
    return events


async def test_one_answer_per_session_across_nodes_and_a_stop_from_another_node(
        start_node: StartNode) -> None:
    a = await start_node(ai_demo_tokens_per_second=20.0)
    b = await start_node(ai_demo_tokens_per_second=20.0)
    async with connect(ws(b)) as watcher:
        sub = await watcher.subscribe("ai-chat/one")
        status, body = await trio.to_thread.run_sync(post, a, "/ai/chat",
                                                     {"message": "tell me a long story", "sessionId": "one",
                                                      "wait": False})
        assert status == 202, body
        [start] = await take(sub, 1)
        assert start.event == "ai:start"
        status, body = await trio.to_thread.run_sync(post, b, "/ai/chat",
                                                     {"message": "again", "sessionId": "one", "wait": False})
        assert status == 409 and "already answering" in body["error"]
        await take(sub, 3)  # it streams, from node a
        status, body = await trio.to_thread.run_sync(post, b, "/ai/cancel", {"sessionId": "one"})
        assert status == 200 and body["cancelled"] is True
        rest = await events_until_end(sub)
    assert rest[-1].event == "ai:done" and rest[-1].data["reason"] == "cancelled"
    assert a.ai.running == 0
    # The claim is gone with the answer: the next question may go to either node.
    status, body = await trio.to_thread.run_sync(post, b, "/ai/chat",
                                                 {"message": "short", "sessionId": "one", "wait": False})
    assert status == 202


async def test_a_watchers_stop_on_another_node_reaches_the_answer(start_node: StartNode) -> None:
    a = await start_node(ai_demo_tokens_per_second=20.0)
    b = await start_node()
    async with connect(ws(b)) as watcher:
        sub = await watcher.subscribe("ai-chat/pub")
        await trio.to_thread.run_sync(post, a, "/ai/chat",
                                      {"message": "go on", "sessionId": "pub", "wait": False})
        await take(sub, 3)
        await watcher.publish("ai-chat/pub", "ai:cancel", {})
        rest = await events_until_end(sub)
    assert rest[-1].event == "ai:done" and rest[-1].data["reason"] == "cancelled"


async def test_a_follow_up_on_another_node_has_the_conversation(start_node: StartNode,
                                                                 nursery: trio.Nursery) -> None:
    upstream = FakeOpenAI(delay=0)
    await nursery.start(upstream.serve)
    settings = {"ai_provider": "openai", "openai_base_url": upstream.base_url, "openai_api_key": "k",
                "openai_model": "ok"}
    a, b = await start_node(**settings), await start_node(**settings)
    status, body = await trio.to_thread.run_sync(post, a, "/ai/chat",
                                                 {"message": "first", "sessionId": "conv"})
    assert status == 200 and body["tokens"] == len(ANSWER)
    status, body = await trio.to_thread.run_sync(post, b, "/ai/chat",
                                                 {"message": "second", "sessionId": "conv"})
    assert status == 200
    messages = upstream.requests[-1]["messages"]
    assert messages == [{"role": "user", "content": "first"},
                        {"role": "assistant", "content": "".join(ANSWER)},
                        {"role": "user", "content": "second"}]


async def test_watchers_hear_generator_lost_when_the_answering_node_dies(
        start_node: StartNode, redis_server: RedisServer) -> None:
    watching: Broker = await start_node()
    answering = await trio.lowlevel.open_process(
        [sys.executable, "-m", "broker.cli", "serve", "--port", "0", "--engine", redis_server.url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "TOKENFAN_AI_DEMO_TOKENS_PER_SECOND": "10"})
    try:
        assert answering.stdout is not None
        with trio.fail_after(20):
            line = await read_line(answering.stdout, bytearray())
        node = int(line.rsplit(":", 1)[1])  # its port
        async with connect(ws(watching)) as watcher:
            sub = await watcher.subscribe("ai-chat/lost")
            status, _ = await trio.to_thread.run_sync(
                post, node, "/ai/chat", {"message": "a long one", "sessionId": "lost", "wait": False})
            assert status == 202
            await take(sub, 3)
            answering.kill()  # kill -9: no ai:error from it, no release of its claim
            await answering.wait()
            started = trio.current_time()
            rest = await events_until_end(sub, seconds=30)
            waited = trio.current_time() - started
        assert rest[-1].event == "ai:error" and rest[-1].data["code"] == "generator_lost"
        assert waited < 20
        assert watching.ai.shared is not None and watching.ai.shared.lost_published == 1
    finally:
        await stop(answering)


async def test_a_killed_node_loses_nothing_redis_holds(start_node: StartNode,
                                                       redis_server: RedisServer) -> None:
    """A watcher's node is killed (kill -9) mid-answer: the watcher reconnects to another node and
    recovers exactly, and again to the killed node once it is restarted."""
    answering = await start_node(ai_demo_tokens_per_second=40.0)
    doomed = await trio.lowlevel.open_process(
        [sys.executable, "-m", "broker.cli", "serve", "--port", "0", "--engine", redis_server.url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert doomed.stdout is not None
        with trio.fail_after(20):
            port = int((await read_line(doomed.stdout, bytearray())).rsplit(":", 1)[1])
        async with connect(f"ws://127.0.0.1:{port}/ws", reconnect=False) as watcher:
            sub = await watcher.subscribe("ai-chat/kill")
            status, _ = await trio.to_thread.run_sync(
                post, answering, "/ai/chat", {"message": "go", "sessionId": "kill", "wait": False})
            assert status == 202
            seen = await take(sub, 5)
            doomed.kill()
            await doomed.wait()
        async with connect(ws(answering)) as watcher:
            since = p.Position(o=seen[-1].offset, ep=sub.epoch)
            again = await watcher.subscribe("ai-chat/kill", since=since)
            rest = await events_until_end(again)
        events = seen + rest
        assert [event.offset for event in events] == list(range(events[0].offset, events[-1].offset + 1))
        assert events[0].event == "ai:start" and events[-1].event == "ai:done"
        assert events[-1].data["tokens"] == len(events) - 2
        # The killed node, started again, serves the same history.
        doomed = await trio.lowlevel.open_process(
            [sys.executable, "-m", "broker.cli", "serve", "--port", "0", "--engine", redis_server.url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert doomed.stdout is not None
        with trio.fail_after(20):
            port = int((await read_line(doomed.stdout, bytearray())).rsplit(":", 1)[1])
        async with connect(f"ws://127.0.0.1:{port}/ws", reconnect=False) as watcher:
            replay = await watcher.subscribe("ai-chat/kill", since=p.Position(o=0, ep=sub.epoch))
            replayed = await events_until_end(replay)
        assert "".join(e.data.get("token", "") for e in replayed) == "".join(
            e.data.get("token", "") for e in events)
    finally:
        await stop(doomed)
