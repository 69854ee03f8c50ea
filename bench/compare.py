"""``python -m bench compare``: every target through the standard scenarios, in one run.

Writes ``results.jsonl`` (one result object per run), ``report.md`` (tables,
ratios and tokenfan's targets, each marked met or not) and two plots:
``latency_cdf.png`` (paced, 1,000 subscribers) and ``deliveries_per_cpu_s.png``
(burst). The full run stays under 10 minutes on the reference machine;
``--quick`` under 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.progress import ProgressBar
from bench.scenarios import SCENARIOS, Params


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes of the standard runs."""

    burst_subs: int
    burst_tokens: int
    paced_subs: int
    paced_big_subs: int
    paced_tokens: int
    slow_subs: int
    channels: int
    channel_subs: int
    channel_tokens: int
    idle_sizes: tuple[int, ...]
    ai_sessions: int


FULL = Plan(burst_subs=1000, burst_tokens=500, paced_subs=1000, paced_big_subs=10_000, paced_tokens=250,
            slow_subs=1000, channels=500, channel_subs=1000, channel_tokens=20, idle_sizes=(1000, 10_000),
            ai_sessions=100)
QUICK = Plan(burst_subs=200, burst_tokens=100, paced_subs=200, paced_big_subs=1000, paced_tokens=50,
             slow_subs=200, channels=100, channel_subs=200, channel_tokens=10, idle_sizes=(1000,),
             ai_sessions=10)

#: Peers that cannot keep up with the big paced run inside its time limit are still run, once.
BIG_PACED_TARGETS = ("tokenfan", "websockets", "picows")


def runs(plan: Plan, targets: list[str]) -> Iterator[Params]:
    for target in targets:
        yield Params(scenario="burst", target=target, subscribers=plan.burst_subs, tokens=plan.burst_tokens,
                     time_limit=90)
        if target == "tokenfan":
            yield Params(scenario="burst", target=target, subscribers=plan.burst_subs,
                         tokens=plan.burst_tokens, batching=False, time_limit=90)
    for target in targets:
        yield Params(scenario="paced", target=target, subscribers=plan.paced_subs, tokens=plan.paced_tokens,
                     rate=50.0, time_limit=60)
    for target in targets:
        if target in BIG_PACED_TARGETS:
            yield Params(scenario="paced", target=target, subscribers=plan.paced_big_subs,
                         tokens=plan.paced_tokens, rate=50.0, time_limit=60)
    for target in targets:
        yield Params(scenario="slow", target=target, subscribers=plan.slow_subs, tokens=plan.paced_tokens,
                     rate=50.0, slow_share=0.1, slow_ms=1000, time_limit=60)
    for target in targets:
        yield Params(scenario="churn", target=target, subscribers=plan.slow_subs, tokens=plan.paced_tokens,
                     rate=50.0, churn=100.0, time_limit=60)
    for target in targets:
        yield Params(scenario="channels", target=target, subscribers=plan.channel_subs,
                     channels=plan.channels, tokens=plan.channel_tokens, time_limit=60)
    if "tokenfan" in targets:  # the others have no /ai/chat
        yield Params(scenario="ai", target="tokenfan", subscribers=plan.ai_sessions * 50,
                     channels=plan.ai_sessions, rate=50.0, time_limit=60)
    for size in plan.idle_sizes:
        for target in targets:
            yield Params(scenario="idle", target=target, subscribers=size, tokens=0, time_limit=120)


def compare(out: Path, *, quick: bool, targets: list[str]) -> int:
    """Run the comparison; write the results, report and plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    with results_path.open("w") as sink:
        for params in runs(QUICK if quick else FULL, targets):
            label = f"{params.scenario}/{params.target}/{params.subscribers}"
            if params.target == "tokenfan" and not params.batching:
                label += "/1-per-write"
            with ProgressBar(label) as bar:
                try:
                    result = SCENARIOS[params.scenario](params, bar.update)
                except Exception as exc:  # a peer that falls over is a result, not a crash
                    result = {"scenario": params.scenario, "target": params.target,
                              "subscribers": params.subscribers, "tokens": params.tokens,
                              "rate": params.rate, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            results.append(result)
            sink.write(json.dumps(result) + "\n")
            sink.flush()
            print(_one_line(result), file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    (out / "report.md").write_text(report(results, quick=quick, elapsed=elapsed))
    plot(results, out)
    print(f"wrote {results_path}, {out / 'report.md'} and plots in {elapsed:.0f}s", file=sys.stderr)
    return 0


def _one_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"  {result['scenario']}/{result['target']}: error {result['error']}"
    latency = result.get("latency_ms") or {}
    return (f"  {result['scenario']}/{result['target']}/{result['subscribers']}: ok={result['ok']} "
            f"per_cpu_s={result.get('deliveries_per_cpu_s')} p99={latency.get('p99')} "
            f"rss/conn={result.get('rss_per_conn_kib')}KiB")


# -- report ------------------------------------------------------------------------------


def _find(results: list[dict[str, Any]], scenario: str, target: str, *, subscribers: int | None = None,
          batching: bool | None = True) -> dict[str, Any] | None:
    for result in results:
        if result.get("scenario") != scenario or result.get("target") != target:
            continue
        if subscribers is not None and result.get("subscribers") != subscribers:
            continue
        if target == "tokenfan" and batching is not None and result.get("batching", True) != batching:
            continue
        return result
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(results: list[dict[str, Any]], scenario: str) -> list[str]:
    rows = [r for r in results if r.get("scenario") == scenario]
    if not rows:
        return []
    lines = [f"### {scenario}", "",
             "| target | subscribers | tokens | ok | delivered | lost | deliveries/s | deliveries/CPU-s "
             "| p50 ms | p99 ms | max ms | RSS MiB | RSS/conn KiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["target"] + (" (1 token/write)" if r.get("batching") is False else "")
        lat = r.get("latency_ms") or {}
        if "error" in r:
            lines.append(f"| {name} | {_fmt(r['subscribers'])} | {_fmt(r['tokens'])} | error: "
                         f"{r['error'][:80]} |||||||||")
            continue
        lines.append(
            f"| {name} | {_fmt(r['subscribers'])} | {_fmt(r['tokens'])} | {'yes' if r['ok'] else '**no**'} "
            f"| {_fmt(r.get('delivered'))} | {_fmt(r.get('lost'))} | {_fmt(r.get('deliveries_per_s'))} "
            f"| {_fmt(r.get('deliveries_per_cpu_s'))} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p99'))} "
            f"| {_fmt(lat.get('max'))} | {_fmt(r.get('broker_rss_mib'))} "
            f"| {_fmt(r.get('rss_per_conn_kib'))} |")
    return [*lines, ""]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def targets_check(results: list[dict[str, Any]], plan: Plan) -> list[tuple[str, str, bool | None]]:
    """tokenfan's targets (issue 4): (what, measured, met or None when not measured)."""
    checks: list[tuple[str, str, bool | None]] = []

    def metric(r: dict[str, Any] | None, key: str) -> Any:
        return None if r is None else r.get(key)

    def p99(r: dict[str, Any] | None) -> float | None:
        return None if r is None or not r.get("latency_ms") else r["latency_ms"].get("p99")

    def add(what: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        shown = "not measured" if value is None else f"{value:,.1f}{unit}"
        checks.append((what, shown, None if value is None else ok))

    burst = _find(results, "burst", "tokenfan", batching=True)
    single = _find(results, "burst", "tokenfan", batching=False)
    value = metric(burst, "deliveries_per_cpu_s")
    add("burst, batching: ≥ 1,000,000 deliveries per broker CPU-second", value, bool(value and value >= 1e6))
    value = metric(single, "deliveries_per_cpu_s")
    add("burst, one token per write: ≥ 150,000 deliveries per CPU-second", value,
        bool(value and value >= 150_000))
    for peer, factor in (("websockets", 10), ("picows", 5)):
        ratio = _ratio(metric(burst, "deliveries_per_cpu_s"),
                       metric(_find(results, "burst", peer), "deliveries_per_cpu_s"))
        add(f"burst: ≥ {factor}× {peer} in deliveries per CPU-second", ratio, bool(ratio and ratio >= factor),
            "×")
    paced = _find(results, "paced", "tokenfan", subscribers=plan.paced_subs)
    paced_ws = _find(results, "paced", "websockets", subscribers=plan.paced_subs)
    ratio = _ratio(metric(paced, "deliveries_per_cpu_s"), metric(paced_ws, "deliveries_per_cpu_s"))
    add(f"paced 50/s, {plan.paced_subs:,} subscribers: ≥ 1.5× websockets per CPU-second", ratio,
        bool(ratio and ratio >= 1.5), "×")
    value = p99(paced)
    add(f"paced 50/s, {plan.paced_subs:,} subscribers: p99 ≤ 15 ms", value,
        bool(value is not None and value <= 15), " ms")
    ratio = _ratio(p99(paced), p99(paced_ws))
    add(f"paced 50/s, {plan.paced_subs:,} subscribers: p99 ≤ 0.5× websockets", ratio,
        bool(ratio is not None and ratio <= 0.5), "×")
    big = _find(results, "paced", "tokenfan", subscribers=plan.paced_big_subs)
    value = p99(big) if big is not None and big.get("ok") else None
    add(f"paced 50/s, {plan.paced_big_subs:,} subscribers: p99 ≤ 150 ms", value,
        bool(value is not None and value <= 150), " ms")
    slow = _find(results, "slow", "tokenfan")
    healthy_latency = None if slow is None else slow.get("healthy_latency_ms")
    healthy = None if not healthy_latency else healthy_latency["p99"]
    ratio = _ratio(healthy, p99(paced)) if plan.slow_subs == plan.paced_subs else None
    add("slow, 10% of readers paused 1 s: the others' p99 within 1.2× of paced without them", ratio,
        bool(ratio is not None and ratio <= 1.2), "×")
    idle = _find(results, "idle", "tokenfan", subscribers=max(plan.idle_sizes))
    value = metric(idle, "rss_per_conn_kib")
    add(f"idle, {max(plan.idle_sizes):,} connections: ≤ 12 KiB of broker RSS per connection", value,
        bool(value is not None and value <= 12), " KiB")
    return checks


def report(results: list[dict[str, Any]], *, quick: bool, elapsed: float) -> str:
    plan = QUICK if quick else FULL
    lines = ["# tokenfan benchmark report", "",
             f"`python -m bench compare{' --quick' if quick else ''}` — {len(results)} runs "
             f"in {elapsed:.0f} s. "
             "Broker pinned to core 0, swarm and emitter on core 1; see docs/benchmarks.md for the method.",
             "", "## tokenfan's targets", "", "| target | measured | met |", "|---|---|---|"]
    for what, shown, met in targets_check(results, plan):
        lines.append(f"| {what} | {shown} | {'–' if met is None else 'yes' if met else '**no**'} |")
    lines += ["", "## Results", ""]
    for scenario in ("burst", "paced", "slow", "churn", "channels", "ai", "idle"):
        lines += _table(results, scenario)
    lines += ["![latency CDF](latency_cdf.png)", "", "![deliveries per CPU-second](deliveries_per_cpu_s.png)",
              ""]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------


def plot(results: list[dict[str, Any]], out: Path) -> None:
    """Latency CDF per target (paced, smaller size) and deliveries per CPU-second (burst)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paced = [r for r in results if r.get("scenario") == "paced" and r.get("latency_cdf_ms")]
    if paced:
        smallest = min(r["subscribers"] for r in paced)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in paced:
            if r["subscribers"] != smallest:
                continue
            cdf = r["latency_cdf_ms"]
            ax.plot(cdf, [i / (len(cdf) - 1) for i in range(len(cdf))], label=r["target"])
        ax.set_xscale("log")
        ax.set_xlabel("emit-to-read latency (ms, log scale)")
        ax.set_ylabel("share of deliveries")
        ax.set_title(f"paced 50 tokens/s, {smallest:,} subscribers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=110)
        plt.close(fig)
    burst = [r for r in results if r.get("scenario") == "burst" and r.get("deliveries_per_cpu_s")]
    if burst:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = [r["target"] + (" (1/write)" if r.get("batching") is False else "") for r in burst]
        values = [r["deliveries_per_cpu_s"] for r in burst]
        ax.barh(names, values, color=["#d9480f" if n.startswith("tokenfan") else "#868e96" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("deliveries per broker CPU-second (log scale)")
        ax.set_title(f"burst: {burst[0]['subscribers']:,} subscribers × {burst[0]['tokens']:,} tokens")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "deliveries_per_cpu_s.png", dpi=110)
        plt.close(fig)
