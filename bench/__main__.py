"""``python -m bench``: run load scenarios against a broker process.

    python -m bench burst [--subscribers 1000] [--tokens 500] [--no-batching] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import scenarios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    burst = commands.add_parser("burst", help="N subscribers, M tokens as fast as possible")
    burst.add_argument("--subscribers", type=int, default=1000)
    burst.add_argument("--tokens", type=int, default=500)
    burst.add_argument("--no-batching", action="store_true", help="one token per write")
    burst.add_argument("--window", type=int, default=64, help="emit requests in flight (default 64)")
    burst.add_argument("--time-limit", type=float, default=120.0, help="seconds before giving up")
    burst.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)

    if args.subscribers < 1 or args.tokens < 1:
        parser.error("--subscribers and --tokens must be at least 1")
    result = scenarios.burst(subscribers=args.subscribers, tokens=args.tokens,
                             batching=not args.no_batching, window=args.window, time_limit=args.time_limit)
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
