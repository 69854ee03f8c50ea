"""Load scenarios. Each starts a target process (and most the C swarm), drives an emitter, returns a result.

Every loop here is bounded in count and in time, talks only to loopback, and
stops the processes it started. The target runs pinned to core 0; the swarm
and this process (the emitter) share core 1.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
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
    scales: tuple[int, ...] = ()  #: history-scale: channel counts (default :data:`HISTORY_SCALES`)


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


def target_env(params: Params) -> dict[str, str]:
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
        broker = start_target(params.target, env=target_env(params), cpu=0)
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
        cpu0 = broker.cpu_seconds()
        wall = emit_stream(params, emitter, swarm, progress)
        cpu = broker.cpu_seconds() - cpu0
        result = swarm.finish(timeout=30, stop=True)
        return summarize(params, broker, result, cpu=cpu, wall=wall,
                          rss_per_conn_kib=(connected_rss - base_rss) * 1024 / params.subscribers,
                          emit_errors=emitter.errors)


def emit_stream(params: Params, emitter: HttpEmitter, swarm: CSwarm, progress: Progress | None) -> float:
    """Emit ``tokens`` on each channel (paced at ``rate``, or as fast as the window lets) until the
    swarm has everything or ``time_limit`` passes; return the seconds it took."""
    total = params.tokens * params.channels
    wall0 = time.monotonic()
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
    return time.monotonic() - wall0


def ask_all(params: Params, port: int) -> int:
    """``POST /ai/chat`` (``wait: false``) for sessions ``bench-0`` … on ``port``; return the failures."""
    errors = 0
    for index in range(params.channels):
        body = json.dumps({"message": f"question {index}", "sessionId": f"bench-{index}",
                           "wait": False}).encode()
        request = urllib.request.Request(f"http://{HOST}:{port}/ai/chat", body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                errors += reply.status != 202
        except (urllib.error.URLError, OSError):
            errors += 1
    return errors


def wait_for_swarm(params: Params, swarm: CSwarm, progress: Progress | None) -> float:
    """Wait until the swarm has every answer (or ``time_limit``); return the seconds it took."""
    wall0 = time.monotonic()
    deadline = wall0 + params.time_limit
    while swarm.running() and time.monotonic() < deadline:
        if progress is not None:
            progress(min((time.monotonic() - wall0) * (params.rate or 50.0) / 60, 1.0))
        time.sleep(0.05)
    return time.monotonic() - wall0


def ai_env(params: Params) -> dict[str, str]:
    """The broker settings of the ai scenario."""
    # Every session is asked from this one address at once: its /ai/chat rate limit is lifted.
    return {**target_env(params), "TOKENFAN_AI_DEMO_TOKENS_PER_SECOND": str(params.rate or 50.0),
            "TOKENFAN_AI_MAX_GENERATIONS": str(params.channels + 10), "TOKENFAN_AI_TIMESTAMPS": "true",
            "TOKENFAN_AI_REQUEST_BURST": str(params.channels + 10)}


def idle(params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Connect ``subscribers`` idle subscribers and report the broker's resident memory per connection."""
    with _harness() as stack:
        broker = start_target(params.target, env=target_env(params), cpu=0)
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
        broker = start_target("tokenfan", env=ai_env(params), cpu=0)
        stack.callback(broker.stop)
        spec = SwarmSpec(host=HOST, port=broker.port, subscribers=params.subscribers,
                         channels=params.channels, prefix="ai-chat/bench-", tokens=AI_EVENTS_PER_ANSWER,
                         timeout=params.time_limit)
        swarm = CSwarm(spec)
        stack.callback(swarm.close)
        swarm.wait_ready(timeout=min(params.time_limit, 300))
        cpu0, wall0 = broker.cpu_seconds(), time.monotonic()
        errors = ask_all(params, broker.emit_port)
        wait_for_swarm(params, swarm, progress)
        wall = time.monotonic() - wall0
        cpu = broker.cpu_seconds() - cpu0
        result = swarm.finish(timeout=30, stop=True)
        summary = summarize(params, broker, result, cpu=cpu, wall=wall, rss_per_conn_kib=0.0,
                             emit_errors=errors)
        summary["tokens"] = AI_EVENTS_PER_ANSWER
        return summary


#: Channel counts ``history-scale`` measures at (``--scales`` picks others).
HISTORY_SCALES = (10_000, 100_000, 1_000_000, 2_000_000)
#: Single emits timed one by one at each scale, each to a new channel.
HISTORY_EMITS = 2000
#: Single emits pipelined (64 in flight) at each scale, each to a new channel: the broker's CPU per emit.
HISTORY_PIPELINED = 20_000
_HISTORY_BATCH = 1000  # events per pipelined POST /api/emit/batch while filling
MiB = 1024 * 1024


def history_scale(params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """History at many channels (issue 13, finding 1): for each scale N, a broker whose
    ``history_max_bytes`` holds about N channels of one small publication; 1.05 N channels
    made through pipelined batch emits, so the cap is reached and every later one trims the
    least recently published; then :data:`HISTORY_EMITS` emits to new channels, timed one by
    one, and :data:`HISTORY_PIPELINED` more pipelined for the broker's CPU per emit; and the RSS
    the history added, against the bytes history accounts for."""
    scales = params.scales or HISTORY_SCALES
    total = sum(scales) * 1.05
    done = 0.0
    rows = []
    with _harness():
        for count in scales:
            def step(fraction: float, base: float = done, count: int = count) -> None:
                if progress is not None:
                    progress(min((base + fraction * count * 1.05) / total, 1.0))
            rows.append(_history_at(count, params.time_limit, step))
            done += count * 1.05
    first, last = rows[0], rows[-1]
    ratios = [row["rss_over_accounted"] for row in rows]
    return {"scenario": "history-scale", "target": "tokenfan", "scales": rows,
            # From the smallest scale to the largest: 1.0 is flat.
            "emit_p99_growth": round(last["emit_p99_ms"] / first["emit_p99_ms"], 2),
            "emit_cpu_growth": round(last["pipelined_emit_cpu_us"] / first["pipelined_emit_cpu_us"], 2),
            "rss_over_accounted_range": [min(ratios), max(ratios)],
            "ok": all(row["ok"] for row in rows)}


def _history_at(count: int, time_limit: float, progress: Progress) -> dict[str, Any]:
    from broker.history import stream_charge
    from protocol import encode_event, ws_frame

    names = (f"ai-chat/h{i:08d}" for i in range(int(count * 1.05)))
    sample = "ai-chat/h00000000"
    frame = len(ws_frame(encode_event(sample, "ai:token", {"token": "t"}, 1)))
    cap = count * stream_charge(sample, 1, frame)
    with ExitStack() as stack:
        broker = start_target("tokenfan", env={"TOKENFAN_HISTORY_MAX_BYTES": str(cap)}, cpu=0)
        stack.callback(broker.stop)
        time.sleep(0.3)
        base_rss = broker.rss_mib()
        sock = socket.create_connection((HOST, broker.port), timeout=30)
        stack.callback(sock.close)
        started = time.monotonic()
        filled, batches = _fill(sock, names, int(count * 1.05), started + time_limit, progress)
        fill_s = time.monotonic() - started
        health = _health(broker.port)
        rss = broker.rss_mib()
        latencies = _single_emits(sock, HISTORY_EMITS)
        emitter = HttpEmitter(HOST, broker.port, [f"ai-chat/p{i:08d}" for i in range(HISTORY_PIPELINED)])
        stack.callback(emitter.close)
        cpu0 = broker.cpu_seconds()
        while emitter.acked < HISTORY_PIPELINED and time.monotonic() < started + 2 * time_limit:
            emitter.queue(HISTORY_PIPELINED - emitter.sent)
            emitter.pump()
            emitter.wait_readable(0.001)
        emit_cpu = (broker.cpu_seconds() - cpu0) / HISTORY_PIPELINED
        health_started = time.monotonic()
        _health(broker.port)
        health_ms = (time.monotonic() - health_started) * 1000
        sock.close()
        stop_started = time.monotonic()
        code = broker.stop()
        stop_s = time.monotonic() - stop_started
    kept = int(health["history_publications"])
    accounted = int(health["history_bytes"])
    grown = (rss - base_rss) * MiB
    latencies.sort()
    return {
        "channels": count, "history_max_bytes": cap, "filled": filled, "fill_s": round(fill_s, 1),
        # A batch is 1,000 emits; the slowest also holds the broker's longest pause while filling
        # (CPython's full garbage collections walk every stream).
        "fill_batch_p50_ms": round(sorted(batches)[len(batches) // 2] * 1000, 1),
        "fill_batch_max_ms": round(max(batches) * 1000, 1),
        "channels_with_history": kept,
        "emit_p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "emit_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "emit_max_ms": round(latencies[-1] * 1000, 3),
        "pipelined_emit_cpu_us": round(emit_cpu * 1e6, 1),
        "healthz_ms": round(health_ms, 2), "stop_s": round(stop_s, 2), "exit_code": code,
        "rss_mib": round(rss, 1), "rss_per_channel": round(grown / kept) if kept else None,
        "accounted_per_channel": round(accounted / kept) if kept else None,
        "rss_over_accounted": round(grown / accounted, 3) if accounted else 0.0,
        "ok": (filled == int(count * 1.05) and code == 0 and 0 < accounted <= cap
               and emitter.acked == HISTORY_PIPELINED and emitter.errors == 0),
    }


def _fill(sock: socket.socket, names: Iterator[str], count: int, deadline: float,
          progress: Progress) -> tuple[int, list[float]]:
    """Emit one token on each of ``count`` channels in batches; return how many were answered
    and each batch's round trip (seconds)."""
    # One batch at a time (a connection whose next request is always in flight never has its
    # request deadline, handshake_timeout, moved: it is cut after it).
    answered = 0
    times = []
    reader = _Responses(sock)
    while answered * _HISTORY_BATCH < count and time.monotonic() < deadline:
        events = [{"channel": name, "event": "ai:token", "data": {"token": "t"}}
                  for name in itertools.islice(names, _HISTORY_BATCH)]
        request = _post("/api/emit/batch", {"events": events})
        started = time.perf_counter()
        sock.sendall(request)
        if reader.next_status() != 200:
            break
        times.append(time.perf_counter() - started)
        answered += 1
        progress(min(answered * _HISTORY_BATCH, count) / count)
    return min(answered * _HISTORY_BATCH, count), times


def _single_emits(sock: socket.socket, count: int) -> list[float]:
    """Emit to ``count`` new channels one at a time; each one's round trip, in seconds."""
    reader = _Responses(sock)
    latencies = []
    for i in range(count):
        request = _post("/api/emit", {"channel": f"ai-chat/e{i:08d}", "event": "ai:token",
                                      "data": {"token": "t"}})
        started = time.perf_counter()
        sock.sendall(request)
        if reader.next_status() != 200:
            raise RuntimeError("an emit failed")
        latencies.append(time.perf_counter() - started)
    return latencies


def _post(path: str, payload: object) -> bytes:
    body = json.dumps(payload).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class _Responses:
    """Reads HTTP responses (with Content-Length) off a blocking socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def next_status(self) -> int:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0 or len(self.buffer) < end + 4 + self._length(end):
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self.buffer += data
        status = int(self.buffer[9:12])
        del self.buffer[:end + 4 + self._length(end)]
        return status

    def _length(self, end: int) -> int:
        for line in bytes(self.buffer[:end]).lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return int(line.split(b":")[1])
        return 0


def _health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=30) as reply:
        health: dict[str, Any] = json.load(reply)
    return health


def summarize(params: Params, broker: BrokerProcess, swarm: dict[str, Any], *, cpu: float, wall: float,
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
    "history-scale": history_scale,
}
