"""The bench swarm counts and checks what it receives, and the burst scenario runs end to end."""

from __future__ import annotations

import socket
import struct

import msgpack

from bench import scenarios
from bench.swarm import Subscriber, Swarm


def server_frame(value: dict[str, object]) -> bytes:
    payload = msgpack.packb(value)
    assert len(payload) < 126
    return struct.pack("!BB", 0x82, len(payload)) + payload


def ev(offset: int, first: int | None = None) -> bytes:
    frame: dict[str, object] = {"t": "ev", "ch": "c", "ev": "ai:token", "d": {"token": "x", "ts": 0.0},
                                "o": offset}
    if first is not None:
        frame["o0"] = first
    return server_frame(frame)


def test_swarm_finds_gaps_duplicates_and_disorder() -> None:
    swarm = Swarm()
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        swarm.subscribers[b.fileno()] = Subscriber(b)
        swarm.epoll.register(b.fileno(), 1)
        # 1, 2, then 5 (3 and 4 lost), 4 (a duplicate by now), 6-8 coalesced, then split mid-frame.
        stream = ev(1) + ev(2) + ev(5) + ev(4) + ev(8, first=6) + ev(9)
        a.sendall(stream[:-3])
        swarm.poll(1)
        a.sendall(stream[-3:])
        swarm.poll(1)
        result = swarm.result
        assert result.delivered == 1 + 1 + 1 + 3 + 1
        assert result.lost == 2
        assert result.duplicates == 1
        assert len(result.latencies_ms) == 6
    finally:
        a.close()
        swarm.close()


def test_burst_scenario_delivers_everything() -> None:
    result = scenarios.burst(subscribers=20, tokens=30, batching=True, time_limit=60)
    assert result["ok"] is True
    assert (result["expected"], result["delivered"], result["lost"]) == (600, 600, 0)
    assert result["deliveries_per_cpu_s"] > 0
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "p999", "max"}
