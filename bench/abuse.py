"""``python -m bench.abuse``: what hostile clients cost the honest ones (issue 13's proof).

    python -m bench.abuse                        # every attack, then the table (about 3.5 minutes)
    python -m bench.abuse replay flood           # some of them
    python -m bench.abuse pub --hostile 4 --repeat 3 --json FILE

Attacks: control (idle connections), replay, nonreaders, history, fragments,
flood, pub, all (1-6 at once), all-but-1-3 (2, 4, 5, 6 at once); see
:mod:`bench.attacks` for what each connection does.

For each attack, one ``tokenfan serve`` (pinned to core 0, as ``python -m
bench`` starts it, with ``TOKENFAN_MEMORY_LIMIT`` = ``--memory-limit``) gets a
16 MB history on one channel (4,000 tokens of 4 KB on ``ai-chat/abuse-big``),
then two ``paced`` streams to honest subscribers (the C swarm: 1,000
subscribers, 250 tokens at 50 a second, one emit at a time):

1. without the attack (the baseline), on channel ``bench/base-0``;
2. with it, on ``bench/attack-0``: the swarm connects, the broker's RSS is
   read (the *base*), its peak RSS is reset (``/proc/PID/clear_refs``), the
   attackers (:mod:`bench.attacks`, their own process on core 1 at nice 19, so
   the swarm and the emitter come first) connect and attack for ``--warmup``
   seconds, then the stream runs under the attack.

Reported per attack: the honest subscribers' p99 latency (emit to read) with
and without the attack and its ratio (target ≤ 1.5), whether every honest
subscriber got every token in order, the broker's base RSS and peak RSS
(``VmHWM``) under attack against ``memory_limit`` (target: peak ≤
``memory_limit`` + base), its CPU time during the stream, ``/healthz``'s
memory figures after it, and what the attackers did. Each result is printed as
one JSON line; the markdown table and the targets follow.

Bounded: each attack run (both streams) takes 15-40 s; the attackers stop by
themselves after 30 s, and the stream gives up after 30 s; if the broker's RSS
passes ``--rss-ceiling`` the attackers are killed (and past four times that,
the broker), and the run says so. Traffic goes to 127.0.0.1 only (the flood
comes from 127.0.0.2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.cswarm import CSwarm, SwarmSpec
from bench.emitter import HttpEmitter
from bench.progress import ProgressBar
from bench.results import report
from bench.target import BrokerProcess, pin_to, raise_fd_limit, start_target
from broker.config import parse_size

HOST = "127.0.0.1"
MiB = 1024 * 1024
HISTORY_CHANNEL = "ai-chat/abuse-big"
#: The long history: this many tokens of :data:`HISTORY_TOKEN_BYTES` (16 MB).
HISTORY_TOKENS = 4000
HISTORY_TOKEN_BYTES = 4000

#: The attacks, in the order they run, and what each row of the table calls them.
ATTACKS: dict[str, str] = {
    "control": "0. control: idle WebSocket connections",
    "replay": "1. replay amplification (100 sub/unsub pairs of a 16 MB history per message)",
    "nonreaders": "2. non-readers (4 KiB receive buffer, 480 KB queued each, pings)",
    "history": "3. pipelined GET /api/history, never read",
    "fragments": "4. unfinished 60 KB fragmented messages",
    "flood": "5. half-open connections from 127.0.0.2",
    "pub": "6. pub ai:cancel flood, 60 KB data",
    "all": "7. all of 1-6 at once",
    "all-but-1-3": "7b. all of 2, 4, 5, 6 at once",
}
#: The attack routines (:data:`bench.attacks.ATTACKS`) each attack runs; the mixes split their
#: hostile connections evenly among theirs.
ROUTINES: dict[str, tuple[str, ...]] = {
    "control": ("idle",), "replay": ("replay",), "nonreaders": ("nonreaders",), "history": ("history",),
    "fragments": ("fragments",), "flood": ("flood",), "pub": ("pub",),
    "all": ("replay", "nonreaders", "history", "fragments", "flood", "pub"),
    "all-but-1-3": ("nonreaders", "fragments", "flood", "pub"),
}
#: Hostile connections of each attack on its own; the mixes split :data:`ALL_HOSTILE` among theirs.
HOSTILE = 200
#: The flood on its own holds more, past ``max_http_connections_per_ip`` (1,024).
FLOOD_HOSTILE = 1200
ALL_HOSTILE = 1000
P99_TARGET = 1.5


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    attack: str
    subscribers: int = 1000
    tokens: int = 250
    rate: float = 50.0
    hostile: int | None = None  #: hostile connections (None: the attack's default)
    memory_limit: int = 256 * MiB
    history_tokens: int = HISTORY_TOKENS
    warmup: float = 3.0  #: seconds of attack before the honest stream starts
    time_limit: float = 30.0  #: the attackers' own limit; the stream's too
    rss_ceiling: int = 1024 * MiB  #: kill the attackers if the broker's RSS passes this


def counts(attack: str, hostile: int | None) -> dict[str, int]:
    """Hostile connections per attack routine for ``attack``."""
    routines = ROUTINES[attack]
    if len(routines) > 1:
        share, extra = divmod(ALL_HOSTILE if hostile is None else hostile, len(routines))
        return {name: share + (index < extra) for index, name in enumerate(routines)}
    default = FLOOD_HOSTILE if attack == "flood" else HOSTILE
    return {routines[0]: default if hostile is None else hostile}


# -- the broker and its long history -------------------------------------------------------


@contextlib.contextmanager
def _harness() -> Iterator[None]:
    """This process on core 1 with a high descriptor limit."""
    raise_fd_limit()
    previous = pin_to(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def _broker_env(params: Params) -> dict[str, str]:
    # The broker's own defaults for every limit (idle_timeout, ping_interval, outbox_limit, ...):
    # what a deployment gets. Only the memory limit is set, so the cap is visible.
    return {"TOKENFAN_MEMORY_LIMIT": str(params.memory_limit)}


def _post(port: int, path: str, payload: object, timeout: float = 30) -> dict[str, Any]:
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        body: dict[str, Any] = json.load(reply)
    return body


def fill_history(port: int, tokens: int) -> int:
    """``tokens`` tokens of 4 KB on :data:`HISTORY_CHANNEL`; return its last offset."""
    top = 0
    for first in range(0, tokens, 100):
        events = [{"channel": HISTORY_CHANNEL, "event": "ai:token",
                   "data": {"token": f"{index:05d}" + "x" * (HISTORY_TOKEN_BYTES - 5)}}
                  for index in range(first, min(first + 100, tokens))]
        body = _post(port, "/api/emit/batch", {"events": events})
        top = int(body["results"][-1]["offset"])
    return top


def _health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=5) as reply:
            health: dict[str, Any] = json.load(reply)
        return health
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": str(exc)}


def source_version() -> str:
    """The last commit that changed ``broker/`` or ``protocol/``, with ``+dirty`` if they differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h", "--", "broker", "protocol"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "broker", "protocol"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS (Linux ≥ 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- the attackers' process ------------------------------------------------------------------


class Attackers:
    """A running ``python -m bench.attacks`` process."""

    def __init__(self, port: int, counts: dict[str, int], *, honest_channel: str, history_top: int,
                 seconds: float) -> None:
        def prepare() -> None:
            pin_to(1)
            os.nice(19)  # the swarm and the emitter, on the same core, come first
            raise_fd_limit()

        args = [sys.executable, "-m", "bench.attacks", "--port", str(port), "--seconds", str(seconds),
                "--counts", ",".join(f"{name}={count}" for name, count in counts.items()),
                "--honest-channel", honest_channel, "--history-channel", HISTORY_CHANNEL,
                "--history-top", str(history_top)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=prepare)
        self.killed = False

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"the attackers said nothing within {timeout:.0f} s")
            chunk = os.read(fd, 1)
            if not chunk:
                raise RuntimeError(f"the attackers exited: {data!r} {self._stderr()}")
            data += chunk
        return data.decode()

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def wait_ready(self, timeout: float = 30) -> int:
        """Block until the attackers made their first connections; return how many slots did."""
        line = self._line(timeout)
        if not line.startswith("READY"):
            raise RuntimeError(f"the attackers said {line!r}")
        return int(line.split()[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.killed = True

    def stop(self, timeout: float = 10) -> dict[str, Any]:
        """Tell the attackers to stop; return what they did (empty if they were killed)."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(b"STOP\n")
            self.proc.stdin.flush()
        if self.killed:
            return {}
        try:
            result: dict[str, Any] = json.loads(self._line(timeout))
        except (TimeoutError, RuntimeError, ValueError) as exc:
            return {"error": str(exc)}
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):  # a STOP still buffered for a process that is gone
                    stream.close()


# -- one honest stream, with or without attackers ----------------------------------------------


#: Past this many times the RSS ceiling the harness kills the broker too.
BROKER_KILL_FACTOR = 4


class _Watch:
    """Samples the broker's RSS; kills the attackers if it passes the ceiling, and the broker if it
    passes :data:`BROKER_KILL_FACTOR` times the ceiling (an attack's work going on without them)."""

    def __init__(self, broker: BrokerProcess, ceiling: int, attackers: Attackers | None) -> None:
        self.broker = broker
        self.ceiling_mib = ceiling / MiB
        self.attackers = attackers
        self.peak_mib = 0.0
        self.ceiling_hit: float | None = None  #: seconds into the attack when the ceiling was passed
        self.broker_killed = False
        self._started = time.monotonic()
        self._next = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 0.05
        if self.broker_killed:
            return
        if self.broker.proc.poll() is not None:
            raise RuntimeError(f"the broker exited with code {self.broker.proc.returncode}")
        rss = self.broker.rss_mib()
        self.peak_mib = max(self.peak_mib, rss)
        if rss > BROKER_KILL_FACTOR * self.ceiling_mib:  # still growing with no attacker left
            self.broker.proc.kill()
            self.broker_killed = True
        if rss > self.ceiling_mib and self.attackers is not None and self.ceiling_hit is None:
            self.ceiling_hit = round(now - self._started, 1)
            self.attackers.kill()

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(0.02)


def _stream(broker: BrokerProcess, params: Params, prefix: str, attack: dict[str, int] | None,
            history_top: int, progress: Callable[[float], None] | None) -> dict[str, Any]:
    """``params.tokens`` paced tokens to ``params.subscribers`` honest subscribers of ``prefix + "0"``,
    with the attackers of ``attack`` (None: none) under way."""
    channel = prefix + "0"
    spec = SwarmSpec(host=HOST, port=broker.port, subscribers=params.subscribers, channels=1, prefix=prefix,
                     tokens=params.tokens, timeout=params.time_limit + 30)
    with contextlib.ExitStack() as stack:
        swarm = CSwarm(spec)
        stack.callback(swarm.close)
        swarm.wait_ready(timeout=60)
        time.sleep(0.3)
        base_rss = broker.rss_mib()
        peak_reset = _reset_peak(broker.pid)
        attackers = None
        if attack is not None:
            attackers = Attackers(broker.port, attack, honest_channel=channel, history_top=history_top,
                                  seconds=params.time_limit)
            stack.callback(attackers.close)
        watch = _Watch(broker, params.rss_ceiling, attackers)
        watch_started = time.monotonic()
        if attackers is not None:
            attackers.wait_ready()
            watch.sleep(params.warmup)
        emitter = HttpEmitter(HOST, broker.emit_port, [channel], window=64)
        stack.callback(emitter.close)
        cpu0, wall0 = broker.cpu_seconds(), time.monotonic()
        deadline = wall0 + params.time_limit
        interval, next_at = 1.0 / params.rate, wall0
        while swarm.running() and time.monotonic() < deadline:
            if emitter.sent < params.tokens and time.monotonic() >= next_at:
                emitter.queue(1)
                next_at += interval
            emitter.pump()
            watch.tick()
            if progress is not None:
                progress(emitter.sent / params.tokens)
            emitter.wait_readable(max(0.0, min(0.001, next_at - time.monotonic())))
        wall = time.monotonic() - wall0
        cpu = broker.cpu_seconds() - cpu0
        swarm_result = swarm.finish(timeout=30, stop=True)
        health = _health(broker.port) if not watch.broker_killed else {"error": "killed"}
        watch.tick()
        attacked = attackers.stop() if attackers is not None else None
        peak = max(broker.peak_rss_mib(), watch.peak_mib) if peak_reset else watch.peak_mib
    expected = int(swarm_result["expected"])
    delivered = int(swarm_result["delivered"])
    complete = (expected == params.subscribers * params.tokens and delivered == expected
                and not swarm_result["out_of_order"] and not swarm_result["duplicates"]
                and not swarm_result["disconnected"] and not emitter.errors)
    return {
        "channel": channel, "expected": expected, "delivered": delivered,
        "lost": expected - delivered, "out_of_order": swarm_result["out_of_order"],
        "duplicates": swarm_result["duplicates"], "disconnected": swarm_result["disconnected"],
        "emit_errors": emitter.errors, "complete": complete,
        "latency_ms": swarm_result["healthy_latency_ms"],
        "broker_cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
        "base_rss_mib": round(base_rss, 1), "peak_rss_mib": round(peak, 1),
        "rss_ceiling_hit_s": watch.ceiling_hit, "broker_killed": watch.broker_killed,
        "stream_started_s": round(wall0 - watch_started, 1),
        "health": {key: health.get(key) for key in ("connections", "memory_used", "memory_limit",
                                                    "memory_shed", "slow_disconnects", "error")
                   if key in health},
        "attackers": attacked,
    }


def run(params: Params, progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """One attack: a baseline stream, then the same stream under the attack, on one broker."""
    if params.attack not in ATTACKS:
        raise ValueError(f"unknown attack {params.attack!r}; known: {', '.join(ATTACKS)}")
    attack = counts(params.attack, params.hostile)

    def step(base: float) -> Callable[[float], None]:
        return lambda fraction: progress(base + fraction / 2) if progress is not None else None

    with _harness(), contextlib.ExitStack() as stack:
        version = source_version()
        broker = start_target("tokenfan", env=_broker_env(params), cpu=0)
        stack.callback(broker.stop)
        top = fill_history(broker.port, params.history_tokens)
        baseline = _stream(broker, params, "bench/base-", None, top, step(0.0))
        attacked = _stream(broker, params, "bench/attack-", attack, top, step(0.5))
        exit_code = broker.stop()
    p99_base = baseline["latency_ms"]["p99"]
    p99_attack = attacked["latency_ms"]["p99"]
    ratio = p99_attack / p99_base if p99_base > 0 else float("inf")
    limit_mib = params.memory_limit / MiB
    rss_bound = limit_mib + attacked["base_rss_mib"]
    result = {
        "attack": params.attack, "hostile": sum(attack.values()), "hostile_split": attack,
        "subscribers": params.subscribers, "tokens": params.tokens, "rate": params.rate,
        "memory_limit_mib": round(limit_mib, 1), "history_mb": round(params.history_tokens
                                                                    * HISTORY_TOKEN_BYTES / 1e6, 1),
        "baseline": baseline, "under_attack": attacked,
        "p99_baseline_ms": p99_base, "p99_attack_ms": p99_attack, "p99_ratio": round(ratio, 2),
        "rss_bound_mib": round(rss_bound, 1), "rss_ceiling_mib": round(params.rss_ceiling / MiB),
        "p99_met": ratio <= P99_TARGET,
        "rss_met": attacked["peak_rss_mib"] <= rss_bound and attacked["rss_ceiling_hit_s"] is None,
        "complete_met": baseline["complete"] and attacked["complete"],
        "broker_exit_code": exit_code, "source": version,
    }
    result["ok"] = result["p99_met"] and result["rss_met"] and result["complete_met"]
    return result


# -- report ------------------------------------------------------------------------------------


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def _ended(attackers: dict[str, Any] | None) -> str:
    """How the hostile connections ended, summed over the routines (close codes, HTTP statuses)."""
    if not attackers or "attacks" not in attackers:
        return "killed" if attackers == {} else "?"
    ended: dict[str, int] = {}
    made = 0
    for stats in attackers["attacks"].values():
        made += stats["connections"]
        for how, count in stats["ended"].items():
            ended[how] = ended.get(how, 0) + count
    listed = ", ".join(f"{how} ×{count:,}" for how, count in sorted(ended.items(), key=lambda kv: -kv[1]))
    return f"{made:,} made; ended: {listed or 'none'}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| attack | hostile | honest p99 ms without / with | ratio (≤ 1.5) | every token to every "
             "honest subscriber | broker CPU s in the stream without / with | base RSS MiB | peak RSS MiB "
             "| limit + base MiB | counted `memory_used` MiB | hostile connections |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base, under = r["baseline"], r["under_attack"]
        hit = under["rss_ceiling_hit_s"]
        peak = f"{under['peak_rss_mib']:.0f}" + ("" if r["rss_met"] else " **no**")
        if hit is not None:
            peak += f" (attack killed at the {r['rss_ceiling_mib']:.0f} MiB ceiling, {hit:.1f} s in)"
        if under["broker_killed"]:
            peak += f" (broker killed at {BROKER_KILL_FACTOR}× the ceiling)"
        ratio = f"{r['p99_ratio']:.2f}" + ("" if r["p99_met"] else " **no**")
        if hit is not None and hit < under["stream_started_s"] + under["wall_s"]:
            ratio += " (†)"
        used = under["health"].get("memory_used")
        lines.append(
            f"| {ATTACKS[r['attack']]} | {r['hostile']:,} | {r['p99_baseline_ms']:.1f} / "
            f"{r['p99_attack_ms']:.1f} | {ratio} | {_yes(base['complete'])} / {_yes(under['complete'])} | "
            f"{base['broker_cpu_s']:.2f} / {under['broker_cpu_s']:.2f} | {under['base_rss_mib']:.0f} | "
            f"{peak} | {r['rss_bound_mib']:.0f} | {'?' if used is None else f'{used / MiB:.0f}'} | "
            f"{_ended(under['attackers'])} |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attack, over its pairs of runs: the median p99 ratio (and the range), the highest peak RSS
    against its bound, and whether every honest subscriber got everything in every pair."""
    by_attack: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_attack.setdefault(r["attack"], []).append(r)
    out = []
    for attack, runs in by_attack.items():
        ratios = sorted(r["p99_ratio"] for r in runs)
        median = statistics.median(ratios)
        worst = max(runs, key=lambda r: r["under_attack"]["peak_rss_mib"] - r["rss_bound_mib"])
        out.append({"attack": attack, "pairs": len(runs), "p99_ratios": ratios, "p99_ratio_median": median,
                    "p99_met": median <= P99_TARGET, "peak_rss_mib": worst["under_attack"]["peak_rss_mib"],
                    "rss_bound_mib": worst["rss_bound_mib"], "rss_met": all(r["rss_met"] for r in runs),
                    "complete_met": all(r["complete_met"] for r in runs)})
    return out


def targets(results: list[dict[str, Any]]) -> str:
    lines = []
    for v in verdicts(results):
        spread = "" if v["pairs"] == 1 else f" median of {v['pairs']} pairs: {v['p99_ratios']}"
        lines.append(f"{v['attack']:11} honest p99 under attack ≤ {P99_TARGET}x without: "
                     f"{'met' if v['p99_met'] else 'not met'} ({v['p99_ratio_median']:.2f}x{spread}); "
                     f"RSS ≤ memory_limit + base: {'met' if v['rss_met'] else 'not met'} "
                     f"({v['peak_rss_mib']:.0f} vs {v['rss_bound_mib']:.0f} MiB); "
                     f"every token to every honest subscriber: {'met' if v['complete_met'] else 'not met'}")
    return "\n".join(lines)


def _size(text: str) -> int:
    try:
        return parse_size(text, "--memory-limit")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attacks", nargs="*", metavar="ATTACK",
                        help=f"some of: {', '.join(ATTACKS)} (default: all, in that order)")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--hostile", type=int, default=None,
                        help=f"hostile connections (default: {HOSTILE} per attack, {FLOOD_HOSTILE} for the "
                             f"flood, {ALL_HOSTILE} split among all six for 'all')")
    parser.add_argument("--memory-limit", type=_size, default=256 * MiB)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rss-ceiling", type=_size, default=1024 * MiB,
                        help="kill the attackers if the broker's RSS passes this (default 1GiB)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of runs (without, with) per attack, each on a new broker; the p99 "
                             "target is checked on the median ratio")
    parser.add_argument("--json", help="append each result as one JSON line to this file")
    args = parser.parse_args(argv)
    unknown = [attack for attack in args.attacks if attack not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    results = []
    for attack in [name for name in args.attacks or list(ATTACKS) for _ in range(max(1, args.repeat))]:
        params = Params(attack=attack, subscribers=args.subscribers, tokens=args.tokens, rate=args.rate,
                        hostile=args.hostile, memory_limit=args.memory_limit, warmup=args.warmup,
                        rss_ceiling=args.rss_ceiling)
        with ProgressBar(f"abuse/{attack}") as bar:
            result = run(params, bar.update)
        report(result, args.json)
        results.append(result)
    print()
    print(table(results))
    print()
    print(targets(results))
    met = all(v["p99_met"] and v["rss_met"] and v["complete_met"] for v in verdicts(results))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
