"""Finding 1 of issue 13: history at many channels once froze the broker.

Past ``history_max_bytes``, every publish copied the list of all streams, the
expiry sweep walked every stream each second and ``/healthz`` summed them: at a
million channels one emit took seconds, then minutes, and SIGTERM went
unanswered. Accounting counted a fifth of what a stream cost, so the cap did
not cap memory either.

Replayed here over real sockets against ``tokenfan serve``: a publisher floods
200,000 new channels through pipelined batch emits (the cap holds about 27,000
of them; it held 77,000 as history used to count them) while a WebSocket
client pings; then a burst of channels with a short TTL replaces them all and
expires in the same second or two; then SIGTERM arrives in the middle of
another flood.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from broker.client import connect
from tests.abuse.conftest import ServedBroker

MiB = 1024 * 1024
CAP = 16 * MiB
SHUTDOWN_TIMEOUT = 2.0
CONFIG = f"""
history_max_bytes = {CAP}
shutdown_timeout = "{SHUTDOWN_TIMEOUT}s"
[channels."flood/*"]
history_size = 10
[channels."burst/*"]
history_size = 10
history_ttl = "2s"
"""
BATCH = 1000
CHANNELS = 200_000
BURST = 30_000


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedBroker]:
    """``tokenfan serve`` with :data:`CONFIG`; its log must hold no traceback when the test ends."""
    config = tmp_path / "tokenfan.toml"
    config.write_text(CONFIG)
    log = tmp_path / "broker.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "broker.cli", "serve", "--port", "0",
                                    "--config", str(config)], stdout=subprocess.PIPE, stderr=sink)
    assert process.stdout is not None
    match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", process.stdout.readline().decode())
    if match is None:
        process.kill()
        process.wait()
        pytest.fail(f"the broker did not start: {log.read_text()}")
    broker = ServedBroker(process, int(match.group(1)), log)
    try:
        yield broker
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert "Traceback" not in broker.log_text(), broker.log_text()


def _batches(prefix: str, first: int, count: int) -> list[bytes]:
    """Pipelined ``POST /api/emit/batch`` requests, each one publication on each of BATCH new channels."""
    requests = []
    for start in range(first, first + count, BATCH):
        events = [{"channel": f"{prefix}/{i}", "event": "ai:token", "data": {"token": "t"}}
                  for i in range(start, start + BATCH)]
        body = json.dumps({"events": events}).encode()
        requests.append(b"POST /api/emit/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return requests


async def _flood(port: int, requests: list[bytes]) -> int:
    """Send the requests back to back on one connection; return how many were answered 200
    before the broker closed it, if it did."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answered = 0

    async def send() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the broker shut down
            await stream.send_all(b"".join(requests))

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        pending = b""
        while answered < len(requests):
            try:
                data = await stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            pending += data
            # Every answer here is "HTTP/1.1 200 OK ... Content-Length: N\r\n\r\n" + N bytes.
            while (end := pending.find(b"\r\n\r\n")) >= 0:
                head = pending[:end]
                length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
                if len(pending) < end + 4 + length:
                    break
                answered += head.startswith(b"HTTP/1.1 200 ")
                pending = pending[end + 4 + length:]
    return answered


def _get(port: int, path: str, payload: object = None) -> tuple[float, dict[str, object]]:
    """A blocking GET (or POST of ``payload``) on a new connection; how long it took and the answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    return time.monotonic() - started, body


class Pinger:
    """Round trips an application ping every 10 ms and keeps the slowest, per phase."""

    def __init__(self) -> None:
        self.worst = 0.0

    def phase(self) -> float:
        """The slowest round trip since the last call."""
        worst, self.worst = self.worst, 0.0
        return worst

    async def run(self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with connect(f"ws://127.0.0.1:{port}/ws", reconnect=False) as client:
            await client.ping()
            task_status.started()
            while True:
                started = trio.current_time()
                await client.ping()
                self.worst = max(self.worst, trio.current_time() - started)
                await trio.sleep(0.01)


async def test_a_flood_of_channels_leaves_the_broker_responsive_and_its_memory_capped(
        served: ServedBroker) -> None:
    port = served.port
    flood, burst = _batches("flood", 0, CHANNELS), _batches("burst", 0, BURST)
    more = _batches("flood", CHANNELS, CHANNELS)
    base_rss = served.status("VmRSS")
    pinger = Pinger()
    async with trio.open_nursery() as nursery:
        await nursery.start(pinger.run, port)

        # 200,000 channels, the last three quarters of them each pushing the least recently
        # published stream out of history. (Once: a quarter of a second per emit.)
        started = trio.current_time()
        with trio.fail_after(15):
            assert await _flood(port, flood) == len(flood)
        flooded = trio.current_time() - started
        assert flooded < 12, f"{CHANNELS} emits took {flooded:.1f} s"
        during_flood = pinger.phase()

        # One more emit, a health check and a ping are quick; the cap caps memory.
        emit_time, emitted = await trio.to_thread.run_sync(
            _get, port, "/api/emit", {"channel": "flood/last", "event": "ai:token", "data": {"token": "!"}})
        health_time, health = await trio.to_thread.run_sync(_get, port, "/healthz")
        assert emitted["ok"] and emit_time < 0.5 and health_time < 0.5, (emit_time, health_time)
        history = health["history_bytes"]
        assert isinstance(history, int) and CAP * 0.9 < history <= CAP
        grown = served.status("VmRSS") - base_rss
        assert grown < 1.25 * history + 4 * MiB, f"RSS grew {grown / MiB:.0f} MiB for {history / MiB:.0f}"

        # A burst of channels with a 2 s TTL takes all of history; 2 s later they all expire.
        assert await _flood(port, burst) == len(burst)
        health = (await trio.to_thread.run_sync(_get, port, "/healthz"))[1]
        assert health["history_publications"] > 20_000
        pinger.phase()
        with trio.fail_after(6):
            while health["history_publications"]:
                await trio.sleep(0.2)
                health = (await trio.to_thread.run_sync(_get, port, "/healthz"))[1]
        during_expiry = pinger.phase()
        print(f"flood {flooded:.1f} s, pings {during_flood * 1000:.0f} / {during_expiry * 1000:.0f} ms, "
              f"rss {grown / MiB:.1f} MiB for {history / MiB:.1f} MiB")
        assert during_flood < 0.5, f"a ping took {during_flood * 1000:.0f} ms during the flood"
        assert during_expiry < 0.1, f"a ping took {during_expiry * 1000:.0f} ms during the expiry"
        nursery.cancel_scope.cancel()

    # SIGTERM in the middle of another flood: the broker stops within its shutdown timeout.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_flood, port, more)
        await trio.sleep(0.5)
        served.process.send_signal(signal.SIGTERM)
        started = trio.current_time()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await trio.to_thread.run_sync(served.process.wait, SHUTDOWN_TIMEOUT + 3)
        stopped = trio.current_time() - started
        assert served.process.poll() == 0, f"still running {stopped:.1f} s after SIGTERM"
        print(f"stopped in {stopped:.2f} s")
        assert stopped < SHUTDOWN_TIMEOUT + 2, f"SIGTERM took {stopped:.1f} s"
        nursery.cancel_scope.cancel()
