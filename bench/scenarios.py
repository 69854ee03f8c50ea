"""Load scenarios. Each starts a target process and the C swarm, drives an emitter, returns a result.

Every loop here is bounded in count and in time, talks only to loopback, and
stops the processes it started. The target runs pinned to core 0; the swarm
and this process (the emitter) share core 1.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from bench.cswarm import CSwarm, SwarmSpec
from bench.emitter import HttpEmitter
from bench.target import TARGETS, BrokerProcess, pin_to, raise_fd_limit, start_target
from broker.ai import DemoProvider

HOST = "127.0.0.1"
Progress = Callable[[float], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    """One run's shape."""

    scenario: str
    target: str
    subscribers: int = 1000
    tokens: int = 500
    rate: float | None = None  #: tokens per second per channel; None: as fast as possible
    channels: int = 1
    batching: bool = True  #: tokenfan only
    window: int = 64  #: emit requests in flight when unpaced
    slow_share: float = 0.0
    slow_ms: float = 0.0
    churn: float = 0.0  #: subscribers per second that leave and are replaced mid-stream
    time_limit: float = 120.0


@contextmanager
def _harness() -> Iterator[ExitStack]:
    """This process on core 1 with a high descriptor limit; the processes registered on the
    stack (``stack.callback(proc.stop)``) are stopped on the way out, last started first."""
    raise_fd_limit()
    previous_affinity = pin_to(1)
    try:
        with ExitStack() as stack:
            yield stack
    finally:
        os.sched_setaffinity(0, previous_affinity)


def _target_env(params: Params) -> dict[str, str]:
    if params.target != "tokenfan":
        return {}
    return {"TOKENFAN_BATCHING": "true" if params.batching else "false",
            "TOKENFAN_MAX_CONNECTIONS": str(params.subscribers + 100),
            "TOKENFAN_IDLE_TIMEOUT": "600", "TOKENFAN_PING_INTERVAL": "300"}


def run(params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Run one scenario against one target and return its result object."""
    if params.target not in TARGETS:
        raise ValueError(f"unknown target {params.target!r}; known: {', '.join(TARGETS)}")
    with _harness() as stack:
        broker = start_target(params.target, env=_target_env(params), cpu=0)
        stack.callback(broker.stop)
        base_rss = broker.rss_mib()
        channels = [f"bench/ch-{i}" for i in range(params.channels)]
        spec = SwarmSpec(host=HOST, port=broker.port, mode=broker.kind.mode, path=broker.kind.path,
                         subscribers=params.subscribers, channels=params.channels, prefix="bench/ch-",
                         tokens=params.tokens, timeout=params.time_limit, slow_share=params.slow_share,
                         slow_ms=params.slow_ms, churn=params.churn)
        swarm = CSwarm(spec)
        stack.callback(swarm.close)
        swarm.wait_ready(timeout=min(params.time_limit, 300))
        connected_rss = broker.rss_mib()
        emitter = HttpEmitter(HOST, broker.emit_port, channels, window=params.window)
        stack.callback(emitter.close)
        total = params.tokens * params.channels
        cpu0, wall0 = broker.cpu_seconds(), time.monotonic()
        deadline = wall0 + params.time_limit
        interval = None if params.rate is None else 1.0 / (params.rate * params.channels)
        next_at = wall0
        while swarm.running() and time.monotonic() < deadline:
            if emitter.sent < total:
                if interval is None:
                    emitter.queue(total - emitter.sent)
                elif time.monotonic() >= next_at:
                    emitter.queue(1)
                    next_at += interval
            emitter.pump()
            if progress is not None:
                progress(min(emitter.sent / total, 1.0))
            # Sleep until the broker answers or the next paced emit is due (at most 1 ms),
            # so the swarm on this core gets the CPU it needs.
            wait = 0.001 if interval is None else max(0.0, min(0.001, next_at - time.monotonic()))
            emitter.wait_readable(wait)
        wall = time.monotonic() - wall0
        cpu = broker.cpu_seconds() - cpu0
        result = swarm.finish(timeout=30, stop=True)
        return _summarize(params, broker, result, cpu=cpu, wall=wall,
                          rss_per_conn_kib=(connected_rss - base_rss) * 1024 / params.subscribers,
                          emit_errors=emitter.errors)


def idle(params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Connect ``subscribers`` idle subscribers and report the broker's resident memory per connection."""
    with _harness() as stack:
        broker = start_target(params.target, env=_target_env(params), cpu=0)
        stack.callback(broker.stop)
        time.sleep(0.5)
        base = broker.rss_mib()
        spec = SwarmSpec(host=HOST, port=broker.port, mode=broker.kind.mode, path=broker.kind.path,
                         subscribers=params.subscribers, channels=params.channels, tokens=0,
                         timeout=params.time_limit)
        swarm = CSwarm(spec)
        stack.callback(swarm.close)
        swarm.wait_ready(timeout=min(params.time_limit, 300))
        time.sleep(1.0)  # let allocations settle
        loaded = broker.rss_mib()
        if progress is not None:
            progress(1.0)
        swarm.finish(timeout=30, stop=True)
        per_conn = (loaded - base) * 1024 / params.subscribers
        return {"scenario": params.scenario, "target": params.target, "subscribers": params.subscribers,
                "tokens": 0, "rate": None, "expected": 0, "delivered": 0, "lost": 0, "out_of_order": 0,
                "duplicates": 0, "ok": True, "deliveries_per_s": None, "deliveries_per_cpu_s": None,
                "broker_cpu_s": None, "latency_ms": None, "broker_rss_mib": round(loaded, 1),
                "broker_base_rss_mib": round(base, 1), "rss_per_conn_kib": round(per_conn, 2)}


#: Events per answer of the demo provider: ai:start, its tokens, ai:done.
AI_EVENTS_PER_ANSWER = DemoProvider().answer_tokens + 2


def ai(params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """``channels`` sessions answered at once through ``POST /ai/chat`` (demo provider at ``rate``
    tokens/s), each watched by ``subscribers / channels`` subscribers: latency from the broker's
    emit (``ai_timestamps``) to each watcher, and the broker's CPU."""
    if params.target != "tokenfan":
        raise ValueError("the ai scenario measures tokenfan's /ai/chat; other targets have none")
    with _harness() as stack:
        env = {**_target_env(params), "TOKENFAN_AI_DEMO_TOKENS_PER_SECOND": str(params.rate or 50.0),
               "TOKENFAN_AI_MAX_GENERATIONS": str(params.channels + 10), "TOKENFAN_AI_TIMESTAMPS": "true"}
        broker = start_target("tokenfan", env=env, cpu=0)
        stack.callback(broker.stop)
        spec = SwarmSpec(host=HOST, port=broker.port, subscribers=params.subscribers,
                         channels=params.channels, prefix="ai-chat/bench-", tokens=AI_EVENTS_PER_ANSWER,
                         timeout=params.time_limit)
        swarm = CSwarm(spec)
        stack.callback(swarm.close)
        swarm.wait_ready(timeout=min(params.time_limit, 300))
        cpu0, wall0 = broker.cpu_seconds(), time.monotonic()
        errors = 0
        for index in range(params.channels):
            body = json.dumps({"message": f"question {index}", "sessionId": f"bench-{index}",
                               "wait": False}).encode()
            request = urllib.request.Request(f"http://{HOST}:{broker.emit_port}/ai/chat", body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    errors += reply.status != 202
            except (urllib.error.URLError, OSError):
                errors += 1
        deadline = wall0 + params.time_limit
        while swarm.running() and time.monotonic() < deadline:
            if progress is not None:
                progress(min((time.monotonic() - wall0) * (params.rate or 50.0) / 60, 1.0))
            time.sleep(0.05)
        wall = time.monotonic() - wall0
        cpu = broker.cpu_seconds() - cpu0
        result = swarm.finish(timeout=30, stop=True)
        summary = _summarize(params, broker, result, cpu=cpu, wall=wall, rss_per_conn_kib=0.0,
                             emit_errors=errors)
        summary["tokens"] = AI_EVENTS_PER_ANSWER
        return summary


def _summarize(params: Params, broker: BrokerProcess, swarm: dict[str, Any], *, cpu: float, wall: float,
               rss_per_conn_kib: float, emit_errors: int) -> dict[str, Any]:
    # The swarm knows what each subscription should have seen (churn changes it).
    expected = int(swarm.get("expected", params.subscribers * params.tokens))
    delivered = int(swarm["delivered"])
    lost = expected - delivered
    disorder = int(swarm["out_of_order"])
    duplicates = int(swarm["duplicates"])
    failed = (lost != 0 or disorder != 0 or duplicates != 0 or emit_errors != 0) \
        and broker.kind.promises_order
    return {
        "scenario": params.scenario, "target": params.target, "subscribers": params.subscribers,
        "tokens": params.tokens, "rate": params.rate, "channels": params.channels,
        "batching": params.batching if params.target == "tokenfan" else None,
        "expected": expected, "delivered": delivered, "lost": lost, "out_of_order": disorder,
        "duplicates": duplicates, "disconnected": int(swarm["disconnected"]), "emit_errors": emit_errors,
        "churned": int(swarm.get("churned", 0)),
        "ok": not failed,
        "deliveries_per_s": None if failed else round(delivered / wall),
        "deliveries_per_cpu_s": None if failed or cpu <= 0 else round(delivered / cpu),
        "broker_cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
        "latency_ms": swarm["latency_ms"], "latency_cdf_ms": swarm["cdf"],
        "healthy_latency_ms": swarm.get("healthy_latency_ms"),
        "broker_rss_mib": round(broker.peak_rss_mib(), 1),
        "rss_per_conn_kib": round(rss_per_conn_kib, 2),
    }


SCENARIOS: dict[str, Callable[[Params, Progress | None], dict[str, Any]]] = {
    "burst": run, "paced": run, "slow": run, "channels": run, "churn": run, "idle": idle, "ai": ai,
}
