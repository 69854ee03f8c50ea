"""POST /ai/chat with the demo provider: watchers, limits, cancellation, time limit, bad input."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from broker import Broker, Config
from broker.ai import ChatMessage, DemoProvider
from broker.client import Event, Subscription, connect
from tests.broker.conftest import StartBroker, http_json, ws_url


async def api(broker: Broker, path: str, payload: object) -> tuple[int, dict[str, Any]]:
    return await trio.to_thread.run_sync(http_json, f"http://127.0.0.1:{broker.port}{path}", payload)


async def until_terminal(sub: Subscription) -> list[Event]:
    events: list[Event] = []
    with trio.fail_after(20):
        async for event in sub:
            events.append(event)
            if event.event in ("ai:done", "ai:error"):
                return events
    raise AssertionError("the subscription ended first")


def answer_text(events: list[Event]) -> str:
    return "".join(e.data["token"] for e in events if e.event == "ai:token")


async def test_two_watchers_see_the_same_answer_then_done(start_broker: StartBroker) -> None:
    broker = await start_broker(ai_demo_tokens_per_second=500)
    async with connect(ws_url(broker)) as one, connect(ws_url(broker)) as two:
        subs = [await c.subscribe("ai-chat/s1") for c in (one, two)]
        async with trio.open_nursery() as nursery:
            seen: list[list[Event]] = [[], []]

            async def watch(index: int) -> None:
                seen[index] = await until_terminal(subs[index])

            for index in range(2):
                nursery.start_soon(watch, index)
            status, body = await api(broker, "/ai/chat", {"message": "Who is late?", "sessionId": "s1"})
    assert status == 200
    demo = broker.ai.providers["demo"]
    assert isinstance(demo, DemoProvider)
    expected = "".join(demo.answer([ChatMessage(role="user", content="Who is late?")], demo.answer_tokens))
    for events in seen:
        assert events[0].event == "ai:start"
        assert events[0].data == {"model": "tokenfan-demo", "prompt": "Who is late?"}
        assert answer_text(events) == expected
        assert events[-1].event == "ai:done"
        assert events[-1].data == {"reason": "stop", "tokens": demo.answer_tokens}
    assert body == {"ok": True, "channel": "ai-chat/s1", "tokens": demo.answer_tokens, "reason": "stop"}
    # The conversation is kept for the follow-up.
    turns = broker.ai.conversation("s1")
    assert [(t.role, t.content) for t in turns] == [("user", "Who is late?"), ("assistant", expected)]


async def test_one_answer_per_session_and_a_global_cap(start_broker: StartBroker) -> None:
    broker = await start_broker(ai_demo_tokens_per_second=20, ai_max_generations=2)
    assert (await api(broker, "/ai/chat", {"message": "a", "sessionId": "x", "wait": False}))[0] == 202
    status, body = await api(broker, "/ai/chat", {"message": "b", "sessionId": "x"})
    assert status == 409 and "already answering" in body["error"]
    assert (await api(broker, "/ai/chat", {"message": "c", "sessionId": "y", "wait": False}))[0] == 202
    status, body = await api(broker, "/ai/chat", {"message": "d", "sessionId": "z"})
    assert status == 429 and "ai_max_generations" in body["error"]
    for session in ("x", "y"):
        assert (await api(broker, "/ai/cancel", {"sessionId": session}))[1]["cancelled"] is True
    assert (await api(broker, "/ai/cancel", {"sessionId": "x"}))[1]["cancelled"] is False


async def test_a_watcher_cancels_with_ai_cancel(start_broker: StartBroker) -> None:
    broker = await start_broker(ai_demo_tokens_per_second=20)
    async with connect(ws_url(broker)) as watcher:
        sub = await watcher.subscribe("ai-chat/c1")
        async with trio.open_nursery() as nursery:
            results: list[tuple[int, dict[str, Any]]] = []

            async def ask() -> None:
                results.append(await api(broker, "/ai/chat", {"message": "Go on", "sessionId": "c1"}))

            nursery.start_soon(ask)
            with trio.fail_after(10):
                async for event in sub:
                    if event.event == "ai:token":
                        break
            started = trio.current_time()
            await watcher.publish("ai-chat/c1", "ai:cancel", {})
            events = await until_terminal(sub)
            assert trio.current_time() - started < 1.0
    assert events[-1].event == "ai:done" and events[-1].data["reason"] == "cancelled"
    assert results == [(200, {"ok": True, "channel": "ai-chat/c1", "tokens": events[-1].data["tokens"],
                              "reason": "cancelled"})]
    assert broker.ai.running == 0


async def test_the_time_limit_ends_in_ai_error_and_504(start_broker: StartBroker) -> None:
    broker = await start_broker(ai_demo_tokens_per_second=10, ai_time_limit=0.3)
    async with connect(ws_url(broker)) as watcher:
        sub = await watcher.subscribe("ai-chat/slow")
        status, body = await api(broker, "/ai/chat", {"message": "Take your time", "sessionId": "slow"})
        events = await until_terminal(sub)
    assert status == 504 and body["code"] == "timeout"
    assert events[-1].event == "ai:error" and events[-1].data["code"] == "timeout"
    assert "ai_time_limit" in events[-1].data["message"]
    assert broker.ai.conversation("slow") == []  # a failed answer is not remembered


async def test_max_tokens_ends_with_reason_length(start_broker: StartBroker) -> None:
    broker = await start_broker(ai_demo_tokens_per_second=1000, ai_max_tokens=5)
    status, body = await api(broker, "/ai/chat", {"message": "Short", "sessionId": "len"})
    assert (status, body["reason"], body["tokens"]) == (200, "length", 5)


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ([], 400, "body must be an object"),
        ({"sessionId": "a"}, 400, "message must be a non-empty string"),
        ({"message": "  ", "sessionId": "a"}, 400, "message must be a non-empty string"),
        ({"message": "x" * 40_000, "sessionId": "a"}, 400, "longer than 32768"),
        ({"message": "hi"}, 400, "sessionId must be a non-empty string"),
        ({"message": "hi", "sessionId": "a b"}, 400, "bad channel name"),
        ({"message": "hi", "sessionId": "a", "model": 3}, 400, "model must be a string"),
        ({"message": "hi", "sessionId": "a", "wait": "no"}, 400, "wait must be true or false"),
        ({"message": "hi", "sessionId": "a", "provider": "gpt"}, 400, "unknown provider 'gpt'; known: demo"),
    ],
)
async def test_bad_chat_requests_are_named(broker: Broker, payload: object, status: int,
                                           message: str) -> None:
    got, body = await api(broker, "/ai/chat", payload)
    assert got == status
    assert message in body["error"]
    assert broker.ai.running == 0


async def test_cancel_needs_a_session_id(broker: Broker) -> None:
    status, body = await api(broker, "/ai/cancel", {"session": "x"})
    assert status == 400 and "sessionId" in body["error"]


async def test_rollup_joins_small_fast_tokens(start_broker: StartBroker) -> None:
    broker = await start_broker(ai_demo_tokens_per_second=400, ai_rollup=0.05)
    async with connect(ws_url(broker)) as watcher:
        sub = await watcher.subscribe("ai-chat/roll")
        status, body = await api(broker, "/ai/chat", {"message": "Who is late?", "sessionId": "roll"})
        events = await until_terminal(sub)
    demo = broker.ai.providers["demo"]
    assert isinstance(demo, DemoProvider)
    expected = "".join(demo.answer([ChatMessage(role="user", content="Who is late?")], demo.answer_tokens))
    tokens = [e for e in events if e.event == "ai:token"]
    assert answer_text(events) == expected
    assert 1 < len(tokens) < demo.answer_tokens / 3  # about 20 pieces per 50 ms window
    assert (status, body["tokens"]) == (200, demo.answer_tokens)
    assert events[-1].data["tokens"] == demo.answer_tokens


async def test_shutdown_ends_running_answers_before_saying_bye(nursery: trio.Nursery) -> None:
    broker = Broker(Config(port=0, ai_demo_tokens_per_second=5))
    await nursery.start(broker.serve)
    async with connect(ws_url(broker), reconnect=False) as watcher:
        sub = await watcher.subscribe("ai-chat/bye")
        status, _ = await api(broker, "/ai/chat", {"message": "Long", "sessionId": "bye", "wait": False})
        assert status == 202
        with trio.fail_after(5):
            async for event in sub:
                if event.event == "ai:token":
                    break
        broker.shutdown()
        events = await until_terminal(sub)
    assert events[-1].event == "ai:error" and events[-1].data["code"] == "shutting_down"
