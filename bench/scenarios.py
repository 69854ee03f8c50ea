"""Load scenarios. Each runs a broker process and the swarm, and returns a result dict.

Every loop here is bounded in count and in time, talks only to loopback, and
stops the processes it started.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from bench.emitter import HttpEmitter
from bench.swarm import Swarm
from bench.target import BrokerProcess, pin_to, raise_fd_limit, start_tokenfan

HOST = "127.0.0.1"


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {key: float("nan") for key in ("p50", "p90", "p99", "p999", "max")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999),
            "max": round(ordered[-1], 3)}


def _result(scenario: str, target: str, subscribers: int, tokens: int, rate: float | None,
            swarm: Swarm, cpu_s: float, wall_s: float, rss_mib: float,
            extra: dict[str, Any]) -> dict[str, Any]:
    res = swarm.result
    expected = subscribers * tokens
    lost = expected - res.delivered
    failed = lost != 0 or res.out_of_order != 0 or res.duplicates != 0
    return {
        "scenario": scenario, "target": target, "subscribers": subscribers, "tokens": tokens,
        "rate": rate, "expected": expected, "delivered": res.delivered, "lost": lost,
        "out_of_order": res.out_of_order, "duplicates": res.duplicates,
        "disconnected": res.disconnected, "ok": not failed,
        "deliveries_per_s": None if failed else round(res.delivered / wall_s),
        "deliveries_per_cpu_s": None if failed or cpu_s <= 0 else round(res.delivered / cpu_s),
        "broker_cpu_s": round(cpu_s, 3), "wall_s": round(wall_s, 3),
        "latency_ms": _percentiles(res.latencies_ms),
        "broker_rss_mib": round(rss_mib, 1),
        "rss_per_conn_kib": round(rss_mib * 1024 / max(subscribers, 1), 2),
        **extra,
    }


def burst(*, subscribers: int = 1000, tokens: int = 500, batching: bool = True, window: int = 64,
          time_limit: float = 120.0) -> dict[str, Any]:
    """N subscribers of one channel; M tokens emitted as fast as the broker takes them."""
    raise_fd_limit()
    previous_affinity = pin_to(1)
    swarm = Swarm()
    emitter: HttpEmitter | None = None
    broker: BrokerProcess | None = None
    try:
        broker = start_tokenfan(env={"TOKENFAN_BATCHING": "true" if batching else "false",
                                     "TOKENFAN_MAX_CONNECTIONS": str(subscribers + 100)}, cpu=0)
        channel = "bench/burst"
        swarm.connect(HOST, broker.port, [channel] * subscribers)
        emitter = HttpEmitter(HOST, broker.port, channel, window=window)
        expected = subscribers * tokens
        cpu0, wall0 = broker.cpu_seconds(), time.monotonic()
        deadline = wall0 + time_limit
        while swarm.result.delivered < expected and time.monotonic() < deadline:
            if emitter.sent < tokens:
                emitter.queue(tokens - emitter.sent)
            emitter.pump()
            swarm.poll(0.001)
            if swarm.result.disconnected == subscribers:
                break
        # Drain stragglers briefly (bounded) so late duplicates would be seen.
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            swarm.poll(0.01)
        wall = time.monotonic() - wall0
        cpu = broker.cpu_seconds() - cpu0
        rss = broker.peak_rss_mib()
        return _result("burst", "tokenfan", subscribers, tokens, None, swarm, cpu, wall, rss,
                       {"batching": batching, "emit_errors": emitter.errors,
                        "latency_mean_ms": round(statistics.fmean(swarm.result.latencies_ms), 3)
                        if swarm.result.latencies_ms else None})
    finally:
        if emitter is not None:
            emitter.close()
        swarm.close()
        if broker is not None:
            broker.stop()
        os.sched_setaffinity(0, previous_affinity)
