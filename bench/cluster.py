"""``python -m bench.cluster``: brokers on Redis against one memory-engine broker, in the same run.

    python -m bench.cluster                       # paced and ai, once each (about a minute)
    python -m bench.cluster paced --repeat 3 --json FILE

For each scenario, first the memory engine (one ``tokenfan serve`` on core 0, the usual
scenario of :mod:`bench.scenarios`), then the cluster: a private ``redis-server`` and three
``tokenfan serve --engine redis://…``: nodes A and B (core 0, as the memory broker) take the
subscribers (the C swarm alternates between their ports), node C (core 1, with Redis, the
swarm and the emitter) takes the emits (``paced``) or the ``/ai/chat`` requests (``ai``), so
every token crosses Redis before it reaches anyone. ``--spread`` puts B on core 1 instead, so
A and B do not take turns on one core.

``paced``
    1,000 subscribers of one channel, 250 tokens at 50 a second (issue 15: cluster p99 ≤
    the memory engine's p99 + 5 ms).
``ai``
    100 sessions answered at once by the demo provider at 50 tokens a second, 50 watchers
    each (issue 15: nothing lost; cluster p99 at most twice the memory engine's; broker CPU
    per delivery at most 1.3 times it, the cluster's CPU being A + B + C + Redis).

Reported for each: delivered/expected, p99, the CPU of every process, deliveries per
CPU-second, and Redis's commands per token (``INFO commandstats``, the script's inner commands
included, and the ``EVALSHA`` calls alone). Bounded: each stream stops at its ``time_limit``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from typing import Any

import trio

from bench import scenarios
from bench.cswarm import CSwarm, SwarmSpec
from bench.emitter import HttpEmitter
from bench.redisproc import RedisServer
from bench.results import report
from bench.scenarios import HOST, Params
from bench.target import BrokerProcess, pin_to, raise_fd_limit, start_target
from broker.redis.resp import RedisAddress, open_connection


def _params(scenario: str) -> Params:
    if scenario == "paced":
        return Params(scenario="paced", target="tokenfan", subscribers=1000, tokens=250, rate=50.0,
                      time_limit=60)
    return Params(scenario="ai", target="tokenfan", subscribers=5000, channels=100, rate=50.0,
                  time_limit=90)


async def _redis_stats(url: str) -> dict[str, float]:
    async with open_connection(RedisAddress.parse(url)) as redis:
        cpu = (await redis.execute("INFO", "cpu")).decode()
        stats = (await redis.execute("INFO", "commandstats")).decode()
    figures = {"cpu": 0.0, "commands": 0.0, "evalsha": 0.0}
    for line in cpu.splitlines():
        key, _, value = line.partition(":")
        if key in ("used_cpu_sys", "used_cpu_user"):
            figures["cpu"] += float(value)
    for line in stats.splitlines():
        name, _, fields = line.partition(":")
        if name.startswith("cmdstat_") and name not in ("cmdstat_info",):
            calls = float(dict(part.split("=") for part in fields.split(","))["calls"])
            figures["commands"] += calls
            if name == "cmdstat_evalsha":
                figures["evalsha"] += calls
    return figures


def cluster(params: Params, *, spread: bool = False) -> dict[str, Any]:
    """One stream through three nodes on one Redis; see the module docstring."""
    raise_fd_limit()
    previous = pin_to(1)
    try:
        with ExitStack() as stack:
            server = RedisServer()
            server.start(core=1)
            stack.callback(server.close)
            env = scenarios.ai_env(params) if params.scenario == "ai" else scenarios.target_env(params)
            env = {**env, "TOKENFAN_ENGINE": server.url}
            nodes: list[BrokerProcess] = []
            for core in ((0, 1, 1) if spread else (0, 0, 1)):
                node = start_target("tokenfan", env=env, cpu=core)
                stack.callback(node.stop)
                nodes.append(node)
            a, b, c = nodes
            ai = params.scenario == "ai"
            spec = SwarmSpec(host=HOST, port=f"{a.port},{b.port}", subscribers=params.subscribers,
                             channels=params.channels, prefix="ai-chat/bench-" if ai else "bench/ch-",
                             tokens=scenarios.AI_EVENTS_PER_ANSWER if ai else params.tokens,
                             timeout=params.time_limit)
            swarm = CSwarm(spec)
            stack.callback(swarm.close)
            swarm.wait_ready(timeout=min(params.time_limit, 300))
            before = trio.run(_redis_stats, server.url)
            cpu0 = [node.cpu_seconds() for node in nodes]
            if ai:
                wall0 = time.monotonic()
                errors = scenarios.ask_all(params, c.emit_port)
                scenarios.wait_for_swarm(params, swarm, None)
                wall = time.monotonic() - wall0
            else:
                emitter = HttpEmitter(HOST, c.emit_port, [f"bench/ch-{i}" for i in range(params.channels)],
                                      window=params.window)
                stack.callback(emitter.close)
                wall = scenarios.emit_stream(params, emitter, swarm, None)
                errors = emitter.errors
            cpus = [node.cpu_seconds() - start for node, start in zip(nodes, cpu0, strict=True)]
            after = trio.run(_redis_stats, server.url)
            result = swarm.finish(timeout=30, stop=True)
            redis_cpu = after["cpu"] - before["cpu"]
            summary = scenarios.summarize(params, a, result, cpu=sum(cpus) + redis_cpu, wall=wall,
                                          rss_per_conn_kib=0.0, emit_errors=errors)
            tokens = params.channels * (scenarios.AI_EVENTS_PER_ANSWER if ai else params.tokens)
            summary.update({
                "target": "tokenfan-cluster", "node_cpu_s": [round(cpu, 3) for cpu in cpus],
                "redis_cpu_s": round(redis_cpu, 3),
                "redis_commands_per_token": round((after["commands"] - before["commands"]) / tokens, 3),
                "evalsha_per_token": round((after["evalsha"] - before["evalsha"]) / tokens, 3),
            })
            return summary
    finally:
        os.sched_setaffinity(0, previous)


def compare(scenario: str, *, spread: bool = False) -> dict[str, Any]:
    params = _params(scenario)
    memory = scenarios.SCENARIOS[scenario](params, None)
    on_redis = cluster(params, spread=spread)
    p99_memory, p99_cluster = memory["latency_ms"]["p99"], on_redis["latency_ms"]["p99"]
    per_cpu_memory, per_cpu_cluster = memory["deliveries_per_cpu_s"], on_redis["deliveries_per_cpu_s"]
    out: dict[str, Any] = {
        "scenario": scenario, "subscribers": params.subscribers, "channels": params.channels,
        "spread": spread,
        "memory": {key: memory[key] for key in ("expected", "delivered", "ok", "broker_cpu_s",
                                                "deliveries_per_cpu_s", "latency_ms")},
        "cluster": {key: on_redis[key] for key in (
            "expected", "delivered", "ok", "broker_cpu_s", "node_cpu_s", "redis_cpu_s",
            "deliveries_per_cpu_s", "latency_ms", "redis_commands_per_token", "evalsha_per_token")},
        "p99_memory_ms": p99_memory, "p99_cluster_ms": p99_cluster,
        "cpu_per_delivery_ratio": (round(per_cpu_memory / per_cpu_cluster, 2)
                                   if per_cpu_memory and per_cpu_cluster else None),
    }
    if scenario == "paced":
        out["target_met"] = bool(on_redis["ok"]) and p99_cluster <= p99_memory + 5
    else:
        ratio = out["cpu_per_delivery_ratio"]
        out["target_met"] = (bool(on_redis["ok"]) and p99_cluster <= 2 * p99_memory
                             and ratio is not None and ratio <= 1.3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="{paced,ai}", help="default: both")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    parser.add_argument("--spread", action="store_true",
                        help="node B on core 1 (with C, Redis and the swarm), not beside A on core 0")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - {"paced", "ai"}
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; known: paced, ai")
    for _ in range(args.repeat):
        for scenario in args.scenarios or ["paced", "ai"]:
            report(compare(scenario, spread=args.spread), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
