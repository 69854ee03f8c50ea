"""``python -m bench``: load scenarios against tokenfan and its peers.

    python -m bench run SCENARIO --target T [--subscribers N] [--tokens M] [--rate R] [--json FILE]
    python -m bench run history-scale [--scales 10000,100000,1000000,2000000]
    python -m bench compare [--quick] --out DIR

Scenarios: burst, paced, slow, channels, churn, idle, ai, history-scale (tokenfan only).
Targets: tokenfan, websockets, picows, trio-websocket, sse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import scenarios
from bench.progress import ProgressBar
from bench.target import TARGETS


def _positive(kind: type[int] | type[float]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _scales(text: str) -> tuple[int, ...]:
    try:
        scales = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts such as 10000,100000, got {text}") from None
    if not scales or min(scales) < 100:
        raise argparse.ArgumentTypeError(f"channel counts must be at least 100, got {text}")
    return scales


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="one scenario against one target")
    run.add_argument("scenario", choices=sorted(scenarios.SCENARIOS))
    run.add_argument("--target", default="tokenfan", choices=sorted(TARGETS))
    run.add_argument("--subscribers", type=_positive(int), default=1000)
    run.add_argument("--tokens", type=_positive(int), default=500)
    run.add_argument("--rate", type=_positive(float), help="tokens per second per channel (paced)")
    run.add_argument("--channels", type=_positive(int), default=1)
    run.add_argument("--no-batching", action="store_true", help="tokenfan: one token per write")
    run.add_argument("--slow-share", type=float, default=0.0, help="share of subscribers that pause")
    run.add_argument("--slow-ms", type=float, default=0.0, help="how long they pause, in ms")
    run.add_argument("--churn", type=float, default=0.0,
                     help="subscribers per second that leave and are replaced mid-stream")
    run.add_argument("--scales", type=_scales, default=(),
                     help="history-scale: channel counts, comma-separated (default: 10k, 100k, 1M, 2M)")
    run.add_argument("--time-limit", type=_positive(float), default=120.0)
    run.add_argument("--json", help="append the result as one JSON line to this file")

    compare = commands.add_parser("compare", help="the standard comparison of every target")
    compare.add_argument("--quick", action="store_true", help="smaller runs (under 2 minutes)")
    compare.add_argument("--out", required=True, help="directory for results.jsonl, report.md, plots")
    compare.add_argument("--targets", help="comma-separated subset of targets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        from bench.compare import compare

        targets = args.targets.split(",") if args.targets else list(TARGETS)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            print(f"unknown target(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        return compare(Path(args.out), quick=args.quick, targets=targets)
    if args.scenario in ("paced", "slow", "churn", "ai") and args.rate is None:
        args.rate = 50.0
    if args.scenario == "churn" and not args.churn:
        args.churn = 100.0
    params = scenarios.Params(
        scenario=args.scenario, target=args.target, subscribers=args.subscribers, tokens=args.tokens,
        rate=args.rate, channels=args.channels, batching=not args.no_batching,
        slow_share=args.slow_share, slow_ms=args.slow_ms, churn=args.churn, time_limit=args.time_limit,
        scales=args.scales)
    with ProgressBar(f"{args.scenario}/{args.target}") as bar:
        result = scenarios.SCENARIOS[args.scenario](params, bar.update)
    line = json.dumps({k: v for k, v in result.items() if k != "latency_cdf_ms"})
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
