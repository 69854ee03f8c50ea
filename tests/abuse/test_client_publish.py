"""Finding 5: a client's publications are bounded in size and rate; ai:cancel is a command, not content."""

from __future__ import annotations

import pytest
import trio

import protocol as p
from broker import Broker
from broker.client import CommandError, connect
from tests.broker.conftest import StartBroker, http_json


async def _history(broker: Broker, channel: str) -> list[dict[str, object]]:
    status, body = await trio.to_thread.run_sync(
        http_json, f"http://127.0.0.1:{broker.port}/api/history?channel={channel}")
    assert status == 200, body
    publications: list[dict[str, object]] = body["publications"]
    return publications


async def test_a_client_cannot_fill_everyones_history(start_broker: StartBroker) -> None:
    """Once, 60 KB ai:cancel publications filled the 256 MiB history cap in 5 s and evicted every channel."""
    broker = await start_broker(client_publish_rate=20, client_input_rate=16 * 1024 * 1024)
    broker.emit("ai-chat/other", "ai:token", {"token": "kept"})
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        with pytest.raises(CommandError) as too_big:
            await client.publish("ai-chat/x", "ai:cancel", {"junk": "x" * 60_000})
        assert too_big.value.code == p.Code.FRAME_TOO_LARGE and "max_client_data" in too_big.value.msg
        refused = 0
        for _ in range(200):
            try:
                await client.publish("ai-chat/x", "ai:cancel", {"junk": "x" * 4000})
            except CommandError as exc:
                assert exc.code == p.Code.RATE_LIMITED and "client_publish_rate" in exc.msg
                refused += 1
        assert refused >= 150  # a burst of 20, then about 20 a second while the loop runs
        assert broker.engine.statistics().bytes < 64 * 1024
    assert [pub["data"] for pub in await _history(broker, "ai-chat/other")] == [{"token": "kept"}]
    assert await _history(broker, "ai-chat/x") == []


async def test_ai_cancel_reaches_watchers_with_no_data_and_stays_out_of_history(
        start_broker: StartBroker) -> None:
    broker = await start_broker()
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        watcher = await client.subscribe("ai-chat/y")
        offset, _ = await client.publish("ai-chat/y", "ai:cancel", {"reason": "a 3 KB essay" * 200})
        with trio.fail_after(5):
            event = await watcher.__anext__()
        assert (event.event, event.data, event.offset) == ("ai:cancel", {}, offset)
    assert await _history(broker, "ai-chat/y") == []


async def test_a_client_that_sends_fast_is_read_at_its_input_rate(
        start_broker: StartBroker) -> None:
    """Refused publications still cost CPU to read: past client_input_rate the client waits."""
    broker = await start_broker(client_input_rate=64 * 1024)  # bursts of 256 KiB
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        started = trio.current_time()
        for _ in range(40):  # 40 x 20 KB: 800 KB, refused as too large, yet read
            with pytest.raises(CommandError):
                await client.publish("ai-chat/z", "ai:cancel", {"junk": "j" * 20_000})
        took = trio.current_time() - started
    assert took > 5.0, f"800 KB at 64 KiB/s (256 KiB burst) took only {took:.1f} s"
