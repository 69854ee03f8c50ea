"""The demo chat page and tokenfan.js in headless Chromium (Debian's), against a real broker.

The broker runs its own Trio loop in a background thread; Playwright's sync
API drives the browser from the test. A screenshot of the finished chat is
saved to ``test-artifacts/demo-chat.png`` for people to look at.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Browser, Page, expect, sync_playwright

import protocol as p
from broker import Broker, Config
from broker.ai import ChatMessage, DemoProvider

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

    def start(self, **overrides: object) -> LiveBroker:
        started = threading.Event()
        holder: dict[str, LiveBroker] = {}

        async def main() -> None:
            settings = {"ai_demo_tokens_per_second": TOKENS_PER_SECOND, **overrides}
            broker = Broker(Config(port=0, **settings))  # type: ignore[arg-type]
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
        pytest.fail(f"Chromium not found at {CHROMIUM}: .ci/run installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def expected_answer(question: str) -> str:
    demo = DemoProvider()
    return "".join(demo.answer([ChatMessage(role="user", content=question)], demo.answer_tokens))


def open_chat(browser: Browser, url: str) -> Page:
    page = browser.new_page(viewport={"width": 390, "height": 760})  # a phone-sized screen
    page.goto(url)
    expect(page.get_by_test_id("send-button")).to_be_enabled(timeout=10_000)
    return page


def assistant(page: Page) -> object:
    return page.locator('[data-testid="message"][data-role="assistant"]').last


def test_two_tabs_watch_one_answer(live: LiveBroker, browser: Browser) -> None:
    first = open_chat(browser, live.url + "/")
    share = first.get_by_test_id("share-link").get_attribute("href")
    assert share is not None and "?session=" in share
    second = open_chat(browser, share)
    first.get_by_test_id("message-input").fill("Who is late?")
    first.get_by_test_id("send-button").click()
    answer = expected_answer("Who is late?")
    for page in (first, second):
        expect(page.get_by_test_id("stop-button")).to_be_visible(timeout=5000)
    for page in (first, second):
        reply = page.locator('[data-testid="message"][data-role="assistant"]').last
        expect(reply).to_have_text(answer, timeout=15_000)
        expect(reply).to_have_attribute("data-streaming", "false")
        expect(page.get_by_test_id("stop-button")).to_be_hidden()
        user = page.locator('[data-testid="message"][data-role="user"]')
        expect(user).to_have_text(["Who is late?"])
    ARTIFACTS.mkdir(exist_ok=True)
    first.screenshot(path=str(ARTIFACTS / "demo-chat.png"), full_page=True)


def test_the_stop_button_ends_the_answer(live: LiveBroker, browser: Browser) -> None:
    page = open_chat(browser, live.url + "/")
    page.get_by_test_id("message-input").fill("Tell me everything")
    page.get_by_test_id("send-button").click()
    stop = page.get_by_test_id("stop-button")
    expect(stop).to_be_visible(timeout=5000)
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).not_to_have_text("", timeout=5000)
    stop.click()
    expect(stop).to_be_hidden(timeout=5000)
    expect(page.get_by_test_id("send-button")).to_be_enabled()
    text = reply.inner_text()
    full = expected_answer("Tell me everything")
    assert full.startswith(text) and len(text) < len(full)


def test_a_dropped_connection_mid_answer_still_ends_with_every_token_once(
        live: LiveBroker, browser: Browser) -> None:
    page = open_chat(browser, live.url + "/")
    page.get_by_test_id("message-input").fill("Keep going")
    page.get_by_test_id("send-button").click()
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).not_to_have_text("", timeout=5000)
    live.drop_connections()
    expect(page.get_by_test_id("connection-state")).to_have_text("open", timeout=10_000)
    expect(reply).to_have_text(expected_answer("Keep going"), timeout=15_000)
    expect(page.get_by_test_id("stop-button")).to_be_hidden()
    assert live.broker.statistics().hub.recoveries >= 1


def test_a_reconnect_that_cannot_recover_reloads_the_conversation(brokers: BrokerThreads,
                                                                  browser: Browser) -> None:
    # History keeps only 5 publications: after a drop mid-answer, the missed tokens are gone.
    from broker import ChannelOptions

    live = brokers.start(ai_demo_tokens_per_second=200, channels={
        "ai-chat/*": ChannelOptions(client_events=("ai:cancel",), history_size=5)})
    page = open_chat(browser, live.url + "/")
    page.get_by_test_id("message-input").fill("Again")
    page.get_by_test_id("send-button").click()
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).not_to_have_text("", timeout=5000)
    with page.expect_navigation(timeout=10_000):  # the page reloads itself
        live.drop_connections()  # ~20 tokens go by (and out of history) while it reconnects
    assert page.evaluate("performance.getEntriesByType('navigation')[0].type") == "reload"
    assert live.broker.statistics().hub.recovery_misses >= 1
