"""``python -m bench.engine``: how fast one node publishes into Redis, and ingests from it (issue 15).

    python -m bench.engine                          # both runs, 200,000 token publications each
    python -m bench.engine --publications 500000 --channels 100 --json FILE

Each run starts a private ``redis-server`` (a free loopback port, no persistence), and one
broker *node*: a :class:`broker.redis.engine.RedisEngine` alone in its own process, pinned to
core 0, nothing else of the broker around it (no sockets to subscribers), so what is measured
is the engine's own cost.

``publish``
    The node publishes ``--publications`` token publications (``ai:token {token}`` of
    ``--token-bytes``, kept in history as ``ai-chat/*`` keeps them) round robin over
    ``--channels`` channels with ``emit_nowait``'s path, waiting for an offset every
    :data:`WINDOW` publications (so at most that many wait in the node). Reported:
    publications a second (wall clock) and per CPU-second of the node.
``ingest``
    The node follows the channels; another process (core 1, with Redis) publishes the same
    way, or with ``--fast-publisher`` sends one script call built once (the engine's own, 512
    publications) again and again, so that the node and Redis set the pace; the node counts
    what its mirrors deliver. Reported: publications a second from the first delivery to the
    last, and per CPU-second of the node in that time.

Both runs report Redis's own CPU (``INFO cpu``) and the Redis commands per publication
(``INFO commandstats``: every command, the script's inner ones included). Targets (issue 15):
≥ 100,000 publications a second each way, on one core; commands per token well under one.
Bounded: every run stops after its publications or ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import deque
from typing import Any

import trio

from bench.redisproc import RedisServer
from bench.results import report
from bench.target import pin_to
from broker.config import ChannelOptions
from broker.redis.engine import MAX_BATCH, RedisEngine, _Queued
from broker.redis.resp import Pending, RedisAddress, open_connection
from broker.redis.scripts import PUBLISH

#: Publications a node lets wait for their offsets before it waits for one.
WINDOW = 4096
OPTIONS = ChannelOptions(history_size=10_000, history_ttl=3600.0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _publish(url: str, publications: int, channels: int, token: str) -> dict[str, float]:
    engine = RedisEngine(url, lambda channel: OPTIONS)
    names = [f"ai-chat/bench-{i}" for i in range(channels)]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        start, cpu = time.perf_counter(), _cpu()
        for index in range(publications):
            channel = names[index % channels]
            if index % WINDOW == WINDOW - 1 or index == publications - 1:
                await engine.publish(channel, "ai:token", {"token": token}, persist=True)
            else:
                engine.publish_nowait(channel, "ai:token", {"token": token}, persist=True)
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu
        nursery.cancel_scope.cancel()
    return {"publications": publications, "seconds": seconds, "cpu_s": cpu,
            "round_trips": engine.round_trips}


async def _blast(url: str, publications: int, channels: int, token: str) -> dict[str, float]:
    """Publish as the engine does, but with one script call built once and sent again and again:
    a publisher that costs next to nothing, so the ingesting node and Redis set the pace."""

    engine = RedisEngine(url, lambda channel: OPTIONS)
    names = [f"ai-chat/bench-{i}" for i in range(channels)]
    groups: dict[str, list[_Queued]] = {}
    for index in range(MAX_BATCH):
        item = engine._encode(names[index % channels], "ai:token", {"token": token}, persist=True, done=None)
        groups.setdefault(item.channel, []).append(item)
    command = engine._script_call(groups)
    start, cpu = time.perf_counter(), _cpu()
    async with open_connection(RedisAddress.parse(url)) as redis:
        await redis.execute("SCRIPT", "LOAD", PUBLISH)
        pending: deque[Pending] = deque()
        for _ in range(0, publications, MAX_BATCH):
            pending.append(await redis.send_encoded(command, 1))
            if len(pending) >= 4:
                await pending.popleft().replies()
        while pending:
            await pending.popleft().replies()
    return {"publications": publications, "seconds": time.perf_counter() - start, "cpu_s": _cpu() - cpu,
            "round_trips": -(-publications // MAX_BATCH)}


async def _ingest(url: str, publications: int, channels: int, seconds: float) -> dict[str, float]:
    got = 0
    first_at = last_at = 0.0
    cpu_first = cpu_last = 0.0
    done = trio.Event()

    def deliver(channel: str, frame: bytes) -> None:
        nonlocal got, first_at, last_at, cpu_first, cpu_last
        got += 1
        if got == 1:
            first_at, cpu_first = time.perf_counter(), _cpu()
        if got == publications:
            last_at, cpu_last = time.perf_counter(), _cpu()
            done.set()

    engine = RedisEngine(url, lambda channel: OPTIONS, deliver=deliver)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for index in range(channels):
            await engine.lease(f"ai-chat/bench-{index}")
        print("READY", flush=True)
        with trio.move_on_after(seconds):
            await done.wait()
        nursery.cancel_scope.cancel()
    if not done.is_set():
        return {"publications": got, "seconds": 0.0, "cpu_s": 0.0, "complete": 0.0}
    return {"publications": got, "seconds": last_at - first_at, "cpu_s": cpu_last - cpu_first,
            "gaps_filled": engine.gaps_filled, "complete": 1.0}


async def _redis_figures(url: str) -> dict[str, float]:
    async with open_connection(RedisAddress.parse(url)) as redis:
        cpu = (await redis.execute("INFO", "cpu")).decode()
        stats = (await redis.execute("INFO", "commandstats")).decode()
    figures: dict[str, float] = {}
    for line in cpu.splitlines():
        key, _, value = line.partition(":")
        if key in ("used_cpu_sys", "used_cpu_user"):
            figures[key] = float(value)
    calls = 0
    for line in stats.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            if name not in ("cmdstat_info", "cmdstat_script", "cmdstat_hello", "cmdstat_client"):
                calls += int(dict(part.split("=") for part in fields.split(","))["calls"])
    figures["commands"] = calls
    return figures


def _child(argv: list[str], core: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.engine", *argv], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "TOKENFAN_BENCH_CORE": str(core)})


def run(mode: str, publications: int, channels: int, token_bytes: int, seconds: float, *,
        fast: bool = False) -> dict[str, Any]:
    server = RedisServer()
    server.start(core=1)  # the node has core 0 to itself
    try:
        before = trio.run(_redis_figures, server.url)
        common = ["--url", server.url, "--publications", str(publications), "--channels", str(channels),
                  "--token-bytes", str(token_bytes), "--timeout", str(seconds)]
        if mode == "publish":
            node = _child(["_publish", *common], core=0)
            out, _ = node.communicate(timeout=seconds + 30)
            result = json.loads(out.splitlines()[-1])
        else:
            node = _child(["_ingest", *common], core=0)
            assert node.stdout is not None
            if node.stdout.readline().strip() != "READY":
                raise RuntimeError("the ingesting node did not start")
            publisher = _child(["_blast" if fast else "_publish", *common], core=1)
            publisher.communicate(timeout=seconds + 30)
            out, _ = node.communicate(timeout=seconds + 30)
            result = json.loads(out.splitlines()[-1])
        after = trio.run(_redis_figures, server.url)
    finally:
        server.close()
    count = result["publications"]
    redis_cpu = sum(after[key] - before[key] for key in ("used_cpu_sys", "used_cpu_user"))
    return {"mode": mode + (" (fast publisher)" if fast else ""), "publications": count,
            "channels": channels, "token_bytes": token_bytes,
            "per_second": round(count / result["seconds"]) if result["seconds"] else 0,
            "per_cpu_second": round(count / result["cpu_s"]) if result["cpu_s"] else 0,
            "node_cpu_s": round(result["cpu_s"], 3), "seconds": round(result["seconds"], 3),
            "redis_cpu_s": round(redis_cpu, 3),
            "redis_commands_per_publication": round((after["commands"] - before["commands"]) / max(count, 1),
                                                    4),
            **{key: value for key, value in result.items()
               if key in ("round_trips", "complete", "gaps_filled")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="both",
                        choices=["both", "publish", "ingest", "_publish", "_ingest", "_blast"])
    parser.add_argument("--fast-publisher", action="store_true",
                        help="ingest: publish with one prebuilt script call, sent again and again")
    parser.add_argument("--publications", type=int, default=200_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--token-bytes", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--url")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args(argv)
    if args.mode.startswith("_"):  # a node, started by run()
        pin_to(int(os.environ.get("TOKENFAN_BENCH_CORE", "0")))
        if args.mode in ("_publish", "_blast"):
            publish = _publish if args.mode == "_publish" else _blast
            result = trio.run(publish, args.url, args.publications, args.channels, "t" * args.token_bytes)
        else:
            result = trio.run(_ingest, args.url, args.publications, args.channels, args.timeout)
        print(json.dumps(result), flush=True)
        return 0
    modes = ["publish", "ingest"] if args.mode == "both" else [args.mode]
    for mode in modes:
        report(run(mode, args.publications, args.channels, args.token_bytes, args.timeout,
                   fast=args.fast_publisher and mode == "ingest"), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
