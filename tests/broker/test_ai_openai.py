"""The openai provider against a real OpenAI-compatible streaming server on loopback."""

from __future__ import annotations

import pytest
import trio

from broker import Broker
from broker.ai import ChatMessage, ProviderError
from broker.ai.openai import OpenAIProvider
from broker.client import Event, connect
from tests.broker.conftest import StartBroker, ws_url
from tests.broker.fake_openai import ANSWER, FakeOpenAI
from tests.broker.test_ai_chat import answer_text, api, until_terminal

QUESTION = [ChatMessage(role="user", content="Hi")]


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOpenAI:
    upstream = FakeOpenAI(delay=2.0)
    await nursery.start(upstream.serve)
    return upstream


async def test_the_provider_parses_the_stream_and_its_quirks(fake: FakeOpenAI) -> None:
    provider = OpenAIProvider(base_url=fake.base_url, api_key="sk-test", timeout=5)
    pieces = [p async for p in provider.stream(QUESTION, model="ok", max_tokens=50)]
    assert pieces == ANSWER
    assert fake.requests[0] == {"model": "ok", "stream": True, "max_tokens": 50,
                                "messages": [{"role": "user", "content": "Hi"}]}
    assert fake.authorization == ["Bearer sk-test"]
    keyless = OpenAIProvider(base_url=fake.base_url, timeout=5)
    assert [p async for p in keyless.stream(QUESTION, model="ok", max_tokens=5)] == ANSWER
    assert fake.authorization[1] is None


@pytest.mark.parametrize(
    ("model", "code"),
    [("cut", "upstream_disconnected"), ("429", "upstream_rate_limited"), ("500", "upstream_http_error"),
     ("garbage", "upstream_bad_stream"), ("slow", "upstream_timeout")],
)
async def test_upstream_failures_become_provider_errors(fake: FakeOpenAI, model: str, code: str) -> None:
    provider = OpenAIProvider(base_url=fake.base_url, timeout=0.5)
    pieces: list[str] = []
    with pytest.raises(ProviderError) as info, trio.fail_after(5):
        async for piece in provider.stream(QUESTION, model=model, max_tokens=50):
            pieces.append(piece)
    assert info.value.code == code
    assert info.value.status == (504 if code == "upstream_timeout" else 502)
    assert pieces == ANSWER[:len(pieces)]  # what came before the failure stands


async def test_an_unreachable_upstream() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    provider = OpenAIProvider(base_url=f"http://127.0.0.1:{port}/v1", timeout=2)
    with pytest.raises(ProviderError) as info:
        async for _ in provider.stream(QUESTION, model="ok", max_tokens=5):
            pass
    assert info.value.code == "upstream_unreachable"


async def chat(broker: Broker, session: str, model: str, watchers: int = 1
               ) -> tuple[int, dict[str, object], list[list[Event]]]:
    async with connect(ws_url(broker)) as client:
        subs = [await client.subscribe(f"ai-chat/{session}") for _ in range(1)]
        async with connect(ws_url(broker)) as other:
            if watchers > 1:
                subs.append(await other.subscribe(f"ai-chat/{session}"))
            seen: list[list[Event]] = [[] for _ in subs]
            async with trio.open_nursery() as nursery:
                async def watch(index: int) -> None:
                    seen[index] = await until_terminal(subs[index])

                for index in range(len(subs)):
                    nursery.start_soon(watch, index)
                status, body = await api(broker, "/ai/chat", {"message": "Hi", "sessionId": session,
                                                              "provider": "openai", "model": model})
    return status, body, seen


async def test_two_watchers_see_the_upstream_text(start_broker: StartBroker, fake: FakeOpenAI) -> None:
    broker = await start_broker(openai_base_url=fake.base_url)
    status, body, seen = await chat(broker, "o1", "ok", watchers=2)
    assert (status, body["reason"], body["tokens"]) == (200, "stop", len(ANSWER))
    for events in seen:
        assert answer_text(events) == "".join(ANSWER)
        assert events[0].data == {"model": "ok", "prompt": "Hi"}
        assert events[-1].event == "ai:done"


@pytest.mark.parametrize(
    ("model", "code", "status"),
    [("cut", "upstream_disconnected", 502), ("429", "upstream_rate_limited", 502),
     ("garbage", "upstream_bad_stream", 502), ("slow", "upstream_timeout", 504)],
)
async def test_every_upstream_failure_ends_in_ai_error(start_broker: StartBroker, fake: FakeOpenAI,
                                                       model: str, code: str, status: int) -> None:
    broker = await start_broker(openai_base_url=fake.base_url, ai_upstream_timeout=0.5)
    got, body, seen = await chat(broker, f"f-{model}", model)
    assert (got, body["code"]) == (status, code)
    assert seen[0][-1].event == "ai:error" and seen[0][-1].data["code"] == code
    assert broker.ai.running == 0
    assert broker.health()["ok"] is True


async def test_cancel_stops_the_upstream_request(start_broker: StartBroker, fake: FakeOpenAI) -> None:
    broker = await start_broker(openai_base_url=fake.base_url)
    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("ai-chat/drip")
        assert (await api(broker, "/ai/chat", {"message": "Hi", "sessionId": "drip", "provider": "openai",
                                               "model": "drip", "wait": False}))[0] == 202
        with trio.fail_after(5):
            async for event in sub:
                if event.event == "ai:token":
                    break
        assert (await api(broker, "/ai/cancel", {"sessionId": "drip"}))[1]["cancelled"] is True
        events = await until_terminal(sub)
    assert events[-1].data["reason"] == "cancelled"
    with trio.fail_after(5):
        while fake.closed_early == 0:  # noqa: ASYNC110 - the upstream saw its client go away
            await trio.sleep(0.01)


async def test_concurrent_sessions_stay_separate(start_broker: StartBroker, fake: FakeOpenAI) -> None:
    broker = await start_broker(openai_base_url=fake.base_url, ai_demo_tokens_per_second=200)
    results: dict[str, list[Event]] = {}

    async def one(session: str, provider: str) -> None:
        async with connect(ws_url(broker)) as client:
            sub = await client.subscribe(f"ai-chat/{session}")
            async with trio.open_nursery() as nursery:
                request = {"message": "Hi", "sessionId": session, "provider": provider, "model": "ok"}
                nursery.start_soon(api, broker, "/ai/chat", request)
                results[session] = await until_terminal(sub)

    async with trio.open_nursery() as nursery:
        for index in range(3):
            nursery.start_soon(one, f"up{index}", "openai")
            nursery.start_soon(one, f"demo{index}", "demo")
    for index in range(3):
        assert answer_text(results[f"up{index}"]) == "".join(ANSWER)
        assert {e.channel for e in results[f"up{index}"]} == {f"ai-chat/up{index}"}
        demo = results[f"demo{index}"]
        assert demo[-1].event == "ai:done" and answer_text(demo) != "".join(ANSWER)
