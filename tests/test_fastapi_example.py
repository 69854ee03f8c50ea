"""docs/examples/fastapi_app.py under uvicorn on asyncio, against a real broker, watched over WebSocket.

The broker runs on its own Trio loop in a thread (tests/broker/test_publisher.py's
BrokerThread); the watcher, a broker.client on Trio, in another thread; the
app under uvicorn on asyncio in the test's thread, as it would in production.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import trio
import uvicorn

from broker.client import Event, connect
from tests.broker.test_publisher import BrokerThread

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "fastapi_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Watcher:
    """Subscribes to channels on a Trio thread and keeps their events until ``ai:done`` or ``ai:error``."""

    def __init__(self, port: int, channels: list[str]) -> None:
        self.events: dict[str, list[Event]] = {channel: [] for channel in channels}
        self.subscribed = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._watch, port), daemon=True)
        self.thread.start()
        assert self.subscribed.wait(10), "the watcher did not subscribe"

    async def _watch(self, port: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}/ws") as client, trio.open_nursery() as nursery:
            for channel in self.events:
                nursery.start_soon(self._read, await client.subscribe(channel), self.events[channel])
            self.subscribed.set()

    @staticmethod
    async def _read(subscription: Any, events: list[Event]) -> None:
        with trio.fail_after(20):
            async for event in subscription:
                events.append(event)
                if event.event in ("ai:done", "ai:error"):
                    return


async def serve_and_ask(app: Any, asks: list[dict[str, Any]]) -> list[httpx.Response]:
    """Run ``app`` under uvicorn on a free port, POST each ask to /chat (concurrently), then stop."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", ws="none", http="h11"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn offers a flag, not an event)
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return list(await asyncio.gather(*(client.post("/chat", json=ask) for ask in asks)))
    finally:
        server.should_exit = True
        await serving
        sock.close()


@pytest.fixture
def broker() -> Any:
    broker = BrokerThread()
    yield broker
    broker.stop()


def test_the_fastapi_example_streams_an_answer(broker: BrokerThread) -> None:
    example = load_example()
    watcher = Watcher(broker.broker.port or 0, ["ai-chat/s1", "ai-chat/s2"])
    asks = [{"message": "Who is late?", "sessionId": "s1"}, {"message": "Why a raven?", "sessionId": "s2"}]

    replies = asyncio.run(serve_and_ask(example.create_app(broker.url), asks))

    assert [(r.status_code, r.json()) for r in replies] == [
        (202, {"ok": True, "channel": "ai-chat/s1"}), (202, {"ok": True, "channel": "ai-chat/s2"})]
    watcher.thread.join(20)
    for ask in asks:
        events = watcher.events[f"ai-chat/{ask['sessionId']}"]
        assert events[0].event == "ai:start"
        assert events[0].data == {"model": example.MODEL, "prompt": ask["message"]}
        tokens = [e.data["token"] for e in events if e.event == "ai:token"]

        async def expected(prompt: str) -> str:
            return "".join([token async for token in example.fake_llm(prompt)])

        assert "".join(tokens) == asyncio.run(expected(ask["message"]))
        assert "".join(tokens).startswith(f"You asked: {ask['message']}")
        assert events[-1].event == "ai:done" and events[-1].data == {"reason": "stop", "tokens": len(tokens)}
        assert [e.offset for e in events] == list(range(1, len(events) + 1))  # nothing lost or repeated
    assert broker.broker.accepted <= 3  # the watcher and the app's pooled connections, not one per token


def test_the_fastapi_example_answers_400_to_a_bad_request(broker: BrokerThread) -> None:
    example = load_example()
    asks: list[dict[str, Any]] = [{"message": "hi"}, {"sessionId": "s1"}, {"message": "", "sessionId": "s1"},
                                  {"message": "hi", "sessionId": "not a channel"}]

    replies = asyncio.run(serve_and_ask(example.create_app(broker.url), asks))

    assert [r.status_code for r in replies] == [400] * 4
    missing_session, missing_message, empty, bad_channel = (r.json() for r in replies)
    assert missing_session["ok"] is False and missing_session["error"].startswith("sessionId: Field required")
    assert missing_message["error"].startswith("message: Field required")
    assert empty["error"].startswith("message: String should have at least 1 character")
    assert bad_channel["error"].startswith("body: channel name 'ai-chat/not a channel' has characters")


def test_the_example_is_importable_as_documented() -> None:
    """``uvicorn fastapi_app:app`` finds an app, and making it connects to nothing."""
    example = load_example()
    assert example.app.router.lifespan_context is not None
    assert any(getattr(route, "path", None) == "/chat" for route in example.app.routes)
