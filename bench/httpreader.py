"""``python -m bench.httpreader``: CPU per ``POST /api/emit`` of the two HTTP request readers.

    python -m bench.httpreader micro [--requests N] [--runs R]   # the readers alone, in this process
    python -m bench.httpreader e2e [--requests N] [--runs R]     # a real broker, pipelined emits
    python -m bench.httpreader                                   # both

The readers: ``llhttp`` (:mod:`broker.httpwire`, llhttp through httptools, what
the broker uses) and ``pure`` (:mod:`broker.httpwire_pure`, the pure-Python
reader it used before). The requests are what the publisher (httpx) sends: eight
headers and a JSON body of about 200 bytes.

``micro`` feeds N pipelined requests to a reader whole and in random 1-4 KiB
pieces (as they arrive from a socket) and takes them out; it reports the CPU
time of this process per request.

``e2e`` starts ``tokenfan serve`` with one reader or the other (alternately,
each pinned to core 0, this process on core 1), sends N emits to a channel
nobody watches on one keep-alive connection with 64 in flight
(:class:`bench.emitter.HttpEmitter`), and reports the broker's CPU time per
request, read from ``/proc`` as the other benchmarks do: the whole emit path,
of which the reader is one part. Runs alternate between the readers so that
load from elsewhere on the machine hits both alike; every run is printed and
then the median and spread per reader.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from bench.emitter import HttpEmitter
from bench.target import TARGETS, TargetKind, pin_to, start_target

HOST = "127.0.0.1"
READERS = ("llhttp", "pure")


class _Reader(Protocol):
    def feed(self, data: bytes) -> None: ...
    def next_request(self) -> object | None: ...


def reader_class(name: str) -> Callable[[], _Reader]:
    if name == "llhttp":
        from broker.httpwire import RequestReader
        return RequestReader
    from broker.httpwire_pure import RequestReader as PureRequestReader
    return PureRequestReader


def emit_request(host: str, channel: str, token: str) -> bytes:
    """One emit as ``broker.publisher`` sends it (httpx's headers, a JSON body of about 200 bytes)."""
    body = json.dumps({"channel": channel, "event": "ai:token",
                       "data": {"token": token, "ts": time.monotonic()}}).encode()
    return (f"POST /api/emit HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
            "Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nUser-Agent: tokenfan-publisher\r\n"
            "Authorization: Bearer 0123456789abcdef0123456789abcdef\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


_TOKEN = "lorem ipsum dolor sit amet " * 4  # makes the body about 200 bytes


def _spread(values: Sequence[float]) -> str:
    return (f"median {statistics.median(values):6.2f}  min {min(values):6.2f}  max {max(values):6.2f}  "
            f"(runs: {', '.join(f'{v:.2f}' for v in values)})")


# -- micro ------------------------------------------------------------------------


def micro(requests: int, runs: int) -> dict[str, dict[str, list[float]]]:
    stream = b"".join(emit_request(f"{HOST}:8765", "bench-http", _TOKEN) for _ in range(requests))
    rng = random.Random(13)
    pieces, at = [], 0
    while at < len(stream):
        size = rng.randint(1024, 4096)
        pieces.append(stream[at:at + size])
        at += size
    print(f"micro: {requests} pipelined requests of {len(stream) // requests} bytes, {runs} runs each")
    results: dict[str, dict[str, list[float]]] = {}
    for mode, feeds in (("whole", [stream]), ("1-4 KiB pieces", pieces)):
        per_reader: dict[str, list[float]] = {name: [] for name in READERS}
        for _ in range(runs):
            for name in READERS:
                make = reader_class(name)
                reader = make()
                got = 0
                started = time.process_time()
                for piece in feeds:
                    reader.feed(piece)
                    while reader.next_request() is not None:
                        got += 1
                elapsed = time.process_time() - started
                assert got == requests, (name, got)
                per_reader[name].append(elapsed / requests * 1e6)
        for name in READERS:
            print(f"  {mode:15} {name:7} µs/request  {_spread(per_reader[name])}")
        results[mode] = per_reader
    return results


# -- end to end -----------------------------------------------------------------------


class _Emitter(HttpEmitter):
    """The bench's pipelining emitter, sending the publisher's requests."""

    def _request(self, token: str) -> bytes:
        return emit_request(self.host, self.channels[self.sent % len(self.channels)], token)


def _emit(emitter: HttpEmitter, count: int, time_limit: float) -> None:
    target = emitter.sent + count
    deadline = time.monotonic() + time_limit
    while emitter.acked < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{emitter.acked} of {target} emits answered in {time_limit} s")
        emitter.queue(target - emitter.sent, _TOKEN)
        emitter.pump()
        if emitter.acked < target:
            emitter.wait_readable(0.001)


def e2e(requests: int, runs: int, time_limit: float = 60.0) -> dict[str, list[float]]:
    for name in READERS:
        TARGETS[f"tokenfan-{name}"] = TargetKind(
            f"tokenfan-{name}", ("-m", "bench.httpreader", "serve", "--reader", name), "ws", "/ws")
    pin_to(1)
    print(f"e2e: {requests} pipelined emits (64 in flight) per run, broker on core 0, emitter on core 1")
    cpu: dict[str, list[float]] = {name: [] for name in READERS}
    for run in range(runs):
        for name in READERS if run % 2 == 0 else READERS[::-1]:
            broker = start_target(f"tokenfan-{name}", cpu=0)
            try:
                emitter = _Emitter(HOST, broker.emit_port, ["bench-http"], window=64)
                try:
                    _emit(emitter, min(2000, requests), time_limit)  # warm up
                    cpu0, wall0 = broker.cpu_seconds(), time.monotonic()
                    _emit(emitter, requests, time_limit)
                    used, wall = broker.cpu_seconds() - cpu0, time.monotonic() - wall0
                    if emitter.errors:
                        raise RuntimeError(f"{emitter.errors} emits were not answered 200")
                finally:
                    emitter.close()
            finally:
                broker.stop()
            cpu[name].append(used / requests * 1e6)
            print(f"  run {run + 1} {name:7} {used / requests * 1e6:6.2f} µs broker CPU/request, "
                  f"{requests / wall:8.0f} requests/s")
    for name in READERS:
        print(f"  {name:7} µs/request  {_spread(cpu[name])}")
    return cpu


def serve(reader: str) -> int:
    """``tokenfan serve --port 0`` reading HTTP with ``reader``."""
    import broker.http
    from broker.cli import main

    setattr(broker.http, "RequestReader", reader_class(reader))  # noqa: B010 (not exported)
    return main(["serve", "--port", "0"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpreader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=("all", "micro", "e2e", "serve"))
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per run (micro: 20000, e2e: 30000)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reader", choices=READERS, default="llhttp", help="serve: the reader to use")
    args = parser.parse_args(argv)
    if args.what == "serve":
        return serve(args.reader)
    if args.what in ("all", "micro"):
        micro(args.requests or 20000, args.runs)
    if args.what in ("all", "e2e"):
        e2e(args.requests or 30000, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
