"""Fixtures for the browser tests: brokers in background threads, Debian's Chromium through Playwright.

Each broker runs its own Trio loop in a daemon thread (Playwright's sync API
drives the browser from the test's thread); ``brokers`` stops them all when the
test ends. The browser is Debian's ``/usr/bin/chromium`` (or
``TOKENFAN_CHROMIUM``); no browser is ever downloaded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Browser, sync_playwright

import protocol as p
from broker import Broker, Config

CHROMIUM = os.environ.get("TOKENFAN_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TOKENS_PER_SECOND = 40


@dataclass
class LiveBroker:
    broker: Broker
    token: trio.lowlevel.TrioToken
    url: str

    def call(self, fn: object) -> None:
        trio.from_thread.run_sync(fn, trio_token=self.token)  # type: ignore[arg-type]

    def drop_connections(self) -> None:
        """Have the broker close every WebSocket (bye SHUTTING_DOWN, reconnect: true)."""

        def drop() -> None:
            for connection in list(self.broker.connections):
                connection.close(p.Code.SHUTTING_DOWN, "test: dropping the connection")

        self.call(drop)


class BrokerThreads:
    """Brokers running their own Trio loops in background threads, stopped at the end of the test."""

    def __init__(self) -> None:
        self.running: list[tuple[LiveBroker, threading.Thread]] = []

    def start(self, *, port: int = 0, **overrides: object) -> LiveBroker:
        """A broker with ``Config(port=port, **overrides)`` (port 0: a free one)."""
        started = threading.Event()
        holder: dict[str, LiveBroker] = {}

        async def main() -> None:
            settings = {"ai_demo_tokens_per_second": TOKENS_PER_SECOND, **overrides}
            broker = Broker(Config(port=port, **settings))  # type: ignore[arg-type]
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve)
                holder["live"] = LiveBroker(broker, trio.lowlevel.current_trio_token(),
                                            f"http://127.0.0.1:{broker.port}")
                started.set()

        thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        thread.start()
        assert started.wait(10), "the broker did not start"
        self.running.append((holder["live"], thread))
        return holder["live"]

    def stop(self) -> None:
        for live, thread in self.running:
            live.call(live.broker.shutdown)
            thread.join(15)


@pytest.fixture
def brokers() -> Iterator[BrokerThreads]:
    threads = BrokerThreads()
    yield threads
    threads.stop()


@pytest.fixture
def live(brokers: BrokerThreads) -> LiveBroker:
    return brokers.start()


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `make test` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


