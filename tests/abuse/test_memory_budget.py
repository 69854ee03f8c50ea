"""Finding 4: memory_limit. Past it the largest send buffers are cut first and large requests refused."""

from __future__ import annotations

import contextlib

import pytest
import trio
import wsproto.events as wse

import protocol as p
from broker.client import CommandError, connect
from tests.broker.conftest import OpenRaw, StartBroker, http_json
from tests.broker.rawclient import RawClient

MiB = 1024 * 1024


async def test_the_largest_send_buffers_are_cut_and_everyone_else_streams(
        start_broker: StartBroker, open_raw: OpenRaw) -> None:
    broker = await start_broker(memory_limit=4 * MiB, outbox_limit=8 * MiB)
    hoarders = [await open_raw(broker, rcvbuf=4096) for _ in range(6)]
    for index, hoarder in enumerate(hoarders):
        await hoarder.command(p.Sub(id=1, ch=f"big/{index}" if index < 3 else "news"))
    received = []
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        sub = await client.subscribe("news")
        for index in range(1200):  # about 2.4 MB to each subscriber of news, 1.2 MB to each big/*
            broker.emit_nowait("news", "x", {"n": index, "pad": "y" * 2000})
            if index % 2:
                broker.emit_nowait(f"big/{index % 3}", "x", {"pad": "z" * 1000})
            if index % 20 == 0:
                await trio.sleep(0.001)
        with trio.fail_after(20):
            async for event in sub:
                received.append(event.data["n"])
                if len(received) == 1200:
                    break
    assert received == list(range(1200))  # the honest reader lost nothing
    assert broker.memory.shed_count >= 1
    assert broker.memory.used <= broker.memory.limit
    # The subscribers of news held the most: they were cut first, with a code saying to come back;
    # the smaller buffers (big/*) were left alone.
    async with trio.open_nursery() as nursery:
        for hoarder in hoarders:
            nursery.start_soon(_read_briefly, hoarder)
    codes = [hoarder.close_code for hoarder in hoarders]
    assert codes[:3] == [None] * 3, codes
    assert codes[3:].count(p.Code.SLOW_CONSUMER) == broker.memory.shed_count, codes


async def _read_briefly(client: RawClient) -> None:
    with trio.move_on_after(2), contextlib.suppress(OSError):
        while client.close_code is None:
            await client.receive()


async def test_large_requests_are_refused_while_over_the_limit(
        start_broker: StartBroker, open_raw: OpenRaw) -> None:
    broker = await start_broker(memory_limit=1 * MiB, handshake_timeout=30)
    broker.emit_nowait("ai-chat/h", "ai:token", {"token": "kept"})
    holders = [await open_raw(broker) for _ in range(24)]
    for holder in holders:  # 24 unfinished 60 KB messages: about 1.4 MB held
        await holder.send(wse.BytesMessage(data=b"\x00" * 60_000, message_finished=False))
    with trio.fail_after(5):
        while not broker.memory.over:  # noqa: ASYNC110 (a test polling the broker's state)
            await trio.sleep(0.01)
    base = f"http://127.0.0.1:{broker.port}"
    status, body = await trio.to_thread.run_sync(http_json, f"{base}/api/history?channel=ai-chat/h")
    assert status == 503 and "memory_limit" in body["error"]
    status, body = await trio.to_thread.run_sync(http_json, f"{base}/ai/chat",
                                                 {"message": "hi", "sessionId": "m"})
    assert status == 503 and "memory_limit" in body["error"]
    status, body = await trio.to_thread.run_sync(http_json, f"{base}/api/emit",
                                                 {"channel": "ai-chat/h", "event": "e", "data": {}})
    assert status == 200  # small requests are served as usual
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        with pytest.raises(CommandError) as refused:
            await client.subscribe("ai-chat/h", since=p.Position(o=0))
        assert refused.value.code == p.Code.OVERLOADED
        for holder in holders:
            holder.sock.close()
        with trio.fail_after(5):
            while broker.memory.used:  # noqa: ASYNC110
                await trio.sleep(0.01)
        sub = await client.subscribe("ai-chat/h", since=p.Position(o=0))
        assert sub.recovered
    status, body = await trio.to_thread.run_sync(http_json, f"{base}/api/history?channel=ai-chat/h")
    assert status == 200 and len(body["publications"]) == 2


async def test_ai_conversations_are_charged_to_the_budget(start_broker: StartBroker) -> None:
    from broker.ai.sessions import SESSION_TTL

    broker = await start_broker(ai_demo_tokens_per_second=5000)
    base = f"http://127.0.0.1:{broker.port}"
    status, body = await trio.to_thread.run_sync(http_json, f"{base}/ai/chat",
                                                 {"message": "remember me " * 100, "sessionId": "mem"})
    assert status == 200, body
    [question, answer] = broker.ai.conversation("mem")
    assert broker.memory.used >= len(question.content) + len(answer.content)
    broker.ai.expire(trio.current_time() + SESSION_TTL + 1)
    assert broker.ai.conversation("mem") == [] and broker.memory.used == 0


async def test_http_bodies_being_read_are_charged_to_the_budget(start_broker: StartBroker) -> None:
    broker = await start_broker()
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    await stream.send_all(b"POST /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000000\r\n\r\n" + b" " * 900_000)
    with trio.fail_after(5):
        while broker.memory.used < 900_000:  # noqa: ASYNC110 (a test polling the broker's state)
            await trio.sleep(0.01)
    await stream.aclose()
    with trio.fail_after(5):
        while broker.memory.used:  # noqa: ASYNC110
            await trio.sleep(0.01)
