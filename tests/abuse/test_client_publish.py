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
    broker.emit_nowait("ai-chat/other", "ai:token", {"token": "kept"})
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


async def test_heavy_senders_share_one_rate_and_light_ones_never_wait(start_broker: StartBroker) -> None:
    """Per-connection rates add up with the number of connections; heavy_input_rate does not."""
    broker = await start_broker(client_input_rate=1024 * 1024, heavy_input_rate=256 * 1024,
                                client_publish_rate=1000, client_frame_burst=1000)
    url = f"ws://127.0.0.1:{broker.port}/ws"
    junk = {"junk": "j" * 50_000}  # refused as too large (max_client_data), yet read

    finished: list[float] = []

    async def flood() -> None:
        async with connect(url, reconnect=False) as client:
            for _ in range(48):  # 2.4 MB: the first 2 MiB (half the burst) light, the rest heavy
                with pytest.raises(CommandError):
                    await client.publish("ai-chat/z", "ai:cancel", junk)
        finished.append(trio.current_time())

    async with connect(url, reconnect=False) as light:
        started = trio.current_time()
        pings: list[float] = []
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(flood)
            for _ in range(10):
                await trio.sleep(0.2)
                sent = trio.current_time()
                await light.ping()
                pings.append(trio.current_time() - sent)
        took = max(finished) - started
    # About 1.5 s here (4 x 0.3 MB heavy at 256 KiB/s, less refills); 0.1 s without: each would have
    # been read at once (it stays within its own 4 MiB burst).
    assert took > 1.0, f"4 heavy senders took only {took:.1f} s at a shared 256 KiB/s"
    assert max(pings) < 0.1, f"a light client's ping took {max(pings) * 1000:.0f} ms"
