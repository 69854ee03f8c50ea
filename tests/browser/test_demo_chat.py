"""The demo chat page and tokenfan.js in headless Chromium (Debian's), against a real broker.

The brokers run their own Trio loops in background threads (``conftest.py``);
Playwright's sync API drives the browser from the test. Screenshots of the
finished chat (``test-artifacts/demo-chat.png``), of a stopped answer and of
the broker-down message are saved for people to look at.
"""

from __future__ import annotations

import urllib.request

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Request, Response, expect

from broker import ChannelOptions
from broker.ai import ChatMessage, DemoProvider
from tests.browser.conftest import ARTIFACTS, BrokerThreads, LiveBroker

#: Fast enough that a whole answer takes about two seconds, slow enough to click Stop in the middle.
TOKENS_PER_SECOND = 100


@pytest.fixture
def live(brokers: BrokerThreads) -> LiveBroker:
    return brokers.start(ai_demo_tokens_per_second=TOKENS_PER_SECOND)


def expected_answer(question: str) -> str:
    demo = DemoProvider()
    return "".join(demo.answer([ChatMessage(role="user", content=question)], demo.answer_tokens))


def open_chat(browser: Browser, url: str, problems: list[str] | None = None) -> Page:
    """A phone-sized tab on ``url``; with ``problems``, what the browser complains about is appended to it."""
    page = browser.new_page(viewport={"width": 390, "height": 760})
    if problems is not None:
        def console(message: ConsoleMessage) -> None:
            if message.type in ("error", "warning"):
                problems.append(f"console {message.type}: {message.text}")

        def failed(request: Request) -> None:
            problems.append(f"request failed: {request.url} {request.failure}")

        def response(reply: Response) -> None:
            if reply.status >= 400:
                problems.append(f"HTTP {reply.status}: {reply.url}")

        page.on("console", console)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("requestfailed", failed)
        page.on("response", response)
    page.goto(url)
    expect(page.get_by_test_id("send-button")).to_be_enabled(timeout=10_000)
    return page


def assistant(page: Page) -> Locator:
    return page.locator('[data-testid="message"][data-role="assistant"]').last


def ask(page: Page, question: str) -> None:
    page.get_by_test_id("message-input").fill(question)
    page.get_by_test_id("send-button").click()


def stop_broker(brokers: BrokerThreads, live: LiveBroker) -> None:
    """Shut one broker down now (its port is free when this returns)."""
    [entry] = [entry for entry in brokers.running if entry[0] is live]
    live.call(live.broker.shutdown)
    entry[1].join(15)
    brokers.running.remove(entry)


def test_two_tabs_watch_one_answer(live: LiveBroker, browser: Browser) -> None:
    problems: list[str] = []
    first = open_chat(browser, live.url + "/", problems)
    share = first.get_by_test_id("share-link").get_attribute("href")
    assert share is not None and "?session=" in share
    second = open_chat(browser, share, problems)
    ask(first, "Who is late?")
    answer = expected_answer("Who is late?")
    for page in (first, second):
        expect(page.get_by_test_id("stop-button")).to_be_visible(timeout=5000)
    for page in (first, second):
        reply = assistant(page)
        expect(reply).to_have_text(answer, timeout=15_000)
        expect(reply).to_have_attribute("data-streaming", "false")
        expect(reply).to_have_attribute("data-status", "done")
        expect(reply.get_by_test_id("message-status")).to_have_count(0)  # finished: no label
        expect(page.get_by_test_id("stop-button")).to_be_hidden()
        user = page.locator('[data-testid="message"][data-role="user"]')
        expect(user).to_have_text(["Who is late?"])
    expect(first.get_by_test_id("notice")).to_be_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    first.screenshot(path=str(ARTIFACTS / "demo-chat.png"), full_page=True)
    assert problems == []


def test_the_page_has_an_icon_served_at_favicon_ico_too(live: LiveBroker, browser: Browser) -> None:
    problems: list[str] = []
    page = open_chat(browser, live.url + "/", problems)
    icon = page.locator('link[rel="icon"]').get_attribute("href")
    assert icon == "/favicon.svg"
    for path in (icon, "/favicon.ico"):
        with urllib.request.urlopen(live.url + path, timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"] == "image/svg+xml"
            assert reply.read().startswith(b"<svg")
    page.goto(live.url + "/favicon.ico")  # what a browser asks for without being told
    page.goto(live.url + "/")
    expect(page.get_by_test_id("send-button")).to_be_enabled(timeout=10_000)
    assert problems == []


def test_how_to_use_a_real_model_is_one_click_away(live: LiveBroker, browser: Browser) -> None:
    page = open_chat(browser, live.url + "/")
    how = page.get_by_test_id("real-model")
    expect(how.locator("pre").first).to_be_hidden()
    how.get_by_text("Use a real model").click()
    expect(how.locator("pre").first).to_be_visible()
    expect(how).to_contain_text("TOKENFAN_AI_PROVIDER=openai")
    expect(how).to_contain_text("OPENAI_API_KEY")
    expect(how).to_contain_text("openai_base_url")


def test_the_stop_button_ends_the_answer_marked_stopped(live: LiveBroker, browser: Browser) -> None:
    page = open_chat(browser, live.url + "/")
    ask(page, "Tell me everything")
    stop = page.get_by_test_id("stop-button")
    expect(stop).to_be_visible(timeout=5000)
    reply = assistant(page)
    expect(reply).to_have_attribute("data-status", "streaming")
    expect(reply).not_to_have_text("", timeout=5000)
    stop.click()
    expect(stop).to_be_hidden(timeout=5000)
    expect(reply).to_have_attribute("data-status", "stopped")
    expect(reply.get_by_test_id("message-status")).to_have_text("stopped")
    expect(reply.get_by_test_id("message-status")).to_be_visible()
    expect(page.get_by_test_id("send-button")).to_be_enabled()
    text = reply.get_by_test_id("message-text").text_content()
    full = expected_answer("Tell me everything")
    assert text and full.startswith(text) and len(text) < len(full)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-chat-stopped.png"), full_page=True)
    # A tab that opens the conversation later sees the same mark, from the channel's history.
    late = open_chat(browser, page.url)
    expect(assistant(late)).to_have_attribute("data-status", "stopped")
    expect(assistant(late).get_by_test_id("message-status")).to_have_text("stopped")


def test_a_failed_answer_is_marked_error(brokers: BrokerThreads, browser: Browser) -> None:
    live = brokers.start(ai_demo_tokens_per_second=10, ai_time_limit=0.5)
    page = open_chat(browser, live.url + "/")
    ask(page, "Take your time")
    reply = assistant(page)
    expect(reply).to_have_attribute("data-status", "error", timeout=5000)
    expect(reply.get_by_test_id("message-status")).to_contain_text("ai_time_limit")
    expect(page.get_by_test_id("send-button")).to_be_enabled()


def test_with_the_broker_down_sending_says_so_and_a_retry_works_once_it_is_back(
        brokers: BrokerThreads, browser: Browser) -> None:
    live = brokers.start(ai_demo_tokens_per_second=TOKENS_PER_SECOND)
    port = live.broker.port
    page = open_chat(browser, live.url + "/")
    failed_posts: list[str] = []
    page.on("requestfailed", lambda request: failed_posts.append(request.url)
            if request.url.endswith("/ai/chat") else None)
    stop_broker(brokers, live)
    expect(page.get_by_test_id("connection-state")).not_to_have_text("open", timeout=5000)
    send, notice = page.get_by_test_id("send-button"), page.get_by_test_id("notice")
    expect(notice).to_be_hidden()
    ask(page, "Are you there?")
    expect(notice).to_be_visible(timeout=5000)
    expect(notice).to_contain_text(f"Cannot reach the broker at 127.0.0.1:{port}")
    expect(notice).to_contain_text("Failed to fetch")
    expect(send).to_be_enabled()
    expect(page.get_by_test_id("message-input")).to_have_value("Are you there?")  # kept for the retry
    expect(page.get_by_test_id("message")).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-chat-broker-down.png"), full_page=True)
    send.click()  # still down: the same message again
    expect(send).to_be_enabled(timeout=5000)
    expect(notice).to_contain_text("Cannot reach the broker")
    assert len(failed_posts) == 2
    # The broker comes back on the same port: the page reconnects to a stream it cannot recover (a new
    # broker) and reloads; the unsent message survives the reload.
    with page.expect_navigation(timeout=15_000):
        brokers.start(port=port, ai_demo_tokens_per_second=TOKENS_PER_SECOND)
    expect(send).to_be_enabled(timeout=10_000)
    expect(page.get_by_test_id("message-input")).to_have_value("Are you there?")
    send.click()
    reply = assistant(page)
    expect(reply).to_have_text(expected_answer("Are you there?"), timeout=15_000)
    expect(reply).to_have_attribute("data-status", "done")
    expect(notice).to_be_hidden()


def test_a_dropped_connection_mid_answer_still_ends_with_every_token_once(
        live: LiveBroker, browser: Browser) -> None:
    page = open_chat(browser, live.url + "/")
    ask(page, "Keep going")
    reply = assistant(page)
    expect(reply).not_to_have_text("", timeout=5000)
    live.drop_connections()
    expect(page.get_by_test_id("connection-state")).to_have_text("open", timeout=10_000)
    expect(reply).to_have_text(expected_answer("Keep going"), timeout=15_000)
    expect(page.get_by_test_id("stop-button")).to_be_hidden()
    assert live.broker.statistics().hub.recoveries >= 1


def test_a_reconnect_that_cannot_recover_reloads_the_conversation(brokers: BrokerThreads,
                                                                  browser: Browser) -> None:
    # History keeps only 5 publications: after a drop mid-answer, the missed tokens are gone.
    live = brokers.start(ai_demo_tokens_per_second=200, channels={
        "ai-chat/*": ChannelOptions(client_events=("ai:cancel",), history_size=5)})
    page = open_chat(browser, live.url + "/")
    ask(page, "Again")
    reply = assistant(page)
    expect(reply).not_to_have_text("", timeout=5000)
    with page.expect_navigation(timeout=10_000):  # the page reloads itself
        live.drop_connections()  # ~20 tokens go by (and out of history) while it reconnects
    assert page.evaluate("performance.getEntriesByType('navigation')[0].type") == "reload"
    assert live.broker.statistics().hub.recovery_misses >= 1
