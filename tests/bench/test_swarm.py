"""The C swarm counts and checks what it receives; scenarios run end to end against real targets."""

from __future__ import annotations

import struct
import threading

import msgpack
import pytest
import trio

from bench import scenarios
from bench.cswarm import CSwarm, SwarmSpec


def server_frame(value: dict[str, object]) -> bytes:
    payload = msgpack.packb(value)
    assert len(payload) < 126
    return struct.pack("!BB", 0x82, len(payload)) + payload


def ev(offset: int, first: int | None = None) -> dict[str, object]:
    frame: dict[str, object] = {"t": "ev", "ch": "bench/ch-0", "ev": "ai:token",
                                "d": {"token": "x", "ts": 1.0}, "o": offset}
    if first is not None:
        frame["o0"] = first
    return frame


class ScriptedServer:
    """A WebSocket server on a thread: accepts, answers the sub with ok, sends a scripted stream."""

    def __init__(self, stream: bytes) -> None:
        self.stream = stream
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._thread.join(10)

    async def _main(self) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._ready.set()
        with trio.fail_after(20):
            stream = await listeners[0].accept()
            async with stream:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive_some(4096)
                await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                      b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
                await stream.receive_some(4096)  # the sub frame
                await stream.send_all(server_frame({"t": "ok", "id": 1, "o": 0}))
                await stream.send_all(self.stream)
                await trio.sleep(0.5)
                await stream.send_all(b"\x88\x02\x03\xe8")  # close frame
        for listener in listeners:
            await listener.aclose()


def test_swarm_finds_gaps_duplicates_and_coalesced_ranges() -> None:
    # 1, 2, then 5 (3 and 4 lost), 4 (a duplicate by now), 6-8 coalesced, 9.
    frames = [ev(1), ev(2), ev(5), ev(4), ev(8, first=6), ev(9)]
    with ScriptedServer(b"".join(server_frame(f) for f in frames)) as server:
        swarm = CSwarm(SwarmSpec(host="127.0.0.1", port=server.port, subscribers=1, tokens=9, timeout=10),
                       cpu=None)
        try:
            swarm.wait_ready(10)
            result = swarm.finish(15)
        finally:
            swarm.close()
    assert result["delivered"] == 1 + 1 + 1 + 3 + 1
    assert result["lost_gaps"] == 2
    assert result["duplicates"] == 1
    assert result["samples"] == 6


@pytest.mark.parametrize("target", ["tokenfan", "websockets", "sse"])
def test_burst_scenario_delivers_everything(target: str) -> None:
    result = scenarios.run(scenarios.Params(scenario="burst", target=target, subscribers=20, tokens=30,
                                            time_limit=60))
    assert result["ok"] is True, result
    assert (result["expected"], result["delivered"], result["lost"]) == (600, 600, 0)
    assert result["deliveries_per_cpu_s"] > 0
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "p999", "max"}


def test_idle_scenario_measures_memory() -> None:
    result = scenarios.idle(scenarios.Params(scenario="idle", target="tokenfan", subscribers=50, tokens=0,
                                             time_limit=60))
    assert result["ok"] is True
    assert result["rss_per_conn_kib"] > 0


def test_ai_scenario_counts_every_event_of_every_answer() -> None:
    result = scenarios.ai(scenarios.Params(scenario="ai", target="tokenfan", subscribers=12, channels=3,
                                           rate=400, time_limit=60))
    assert result["ok"] is True, result
    assert (result["expected"], result["delivered"]) == (12 * scenarios.AI_EVENTS_PER_ANSWER,) * 2
    assert result["latency_ms"]["p99"] > 0  # ai:token carries ts with ai_timestamps
