"""The demo chat in headless Chromium against a broker with ``[auth]`` and ``demo = true``.

The page asks ``POST /demo/token`` for a token scoped to its own session, gives it to the client
(``getToken``) and sends it as ``Authorization: Bearer`` on ``/ai/chat``. Without it the broker
answers 401, and a WebSocket client that sends no token is turned away with 4009.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, Request, WebSocket, expect

import broker.http
from broker.config import AuthConfig
from tests.browser.conftest import BrokerThreads, LiveBroker
from tests.browser.test_demo_chat import TOKENS_PER_SECOND, ask, assistant, expected_answer, open_chat

SECRET = "browser-demo-secret-" * 3  # 60 bytes


@pytest.fixture
def live(brokers: BrokerThreads) -> LiveBroker:
    return brokers.start(auth=AuthConfig(jwt_secret=(SECRET,)), demo=True,
                         ai_demo_tokens_per_second=TOKENS_PER_SECOND)


def session_of(url: str) -> str:
    [session] = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["session"]
    return session


def test_the_demo_streams_with_its_own_token_and_the_api_wants_one(live: LiveBroker,
                                                                    browser: Browser) -> None:
    problems: list[str] = []
    page = open_chat(browser, live.url + "/", problems)
    session = session_of(page.url)
    chats: list[Request] = []
    page.on("request", lambda request: chats.append(request) if request.url.endswith("/ai/chat") else None)
    share = page.get_by_test_id("share-link").get_attribute("href")
    assert share is not None
    watcher = open_chat(browser, share, problems)  # a second tab on the session: its own token
    ask(page, "Who is late?")
    for tab in (page, watcher):
        reply = assistant(tab)
        expect(reply).to_have_text(expected_answer("Who is late?"), timeout=15_000)
        expect(reply).to_have_attribute("data-status", "done")
        expect(tab.get_by_test_id("connection-state")).to_have_text("open")
    assert problems == []
    # The page sent its token, and the token grants this session only.
    [chat] = chats
    authorization = chat.all_headers().get("authorization", "")
    assert authorization.startswith("Bearer ")
    claims = jwt.decode(authorization.removeprefix("Bearer "), SECRET, algorithms=["HS256"])
    assert claims["channels"] == [f"ai-chat/{session}"] and claims["ai"] == [session]
    assert claims["exp"] - time.time() <= broker.http.DEMO_TOKEN_TTL

    # Without the token the API answers 401, and with it another session is refused (403).
    post = """async ([sessionId, authorization]) => (await fetch('/ai/chat', {
        method: 'POST', body: JSON.stringify({ message: 'hi', sessionId, wait: false }),
        headers: { 'Content-Type': 'application/json',
                   ...(authorization ? { Authorization: authorization } : {}) },
    })).status"""
    assert page.evaluate(post, [session, None]) == 401
    assert page.evaluate(post, ["someone-else", authorization]) == 403
    # A client that connects without getToken is turned away (4009) and does not try again.
    refused: dict[str, Any] = page.evaluate("""async (channel) => {
        const { Realtime } = await import('/tokenfan.js')
        const realtime = new Realtime({ url: `ws://${location.host}/ws` })
        const error = await realtime.channel(channel).subscribe().ready().catch((e) => e)
        return { code: error.code, state: realtime.state, message: error.message }
    }""", f"ai-chat/{session}")
    assert refused["code"] == 4009 and refused["state"] == "closed", refused
    assert "authenticate first" in refused["message"]


def test_the_page_refreshes_its_token_and_keeps_its_connection(
        brokers: BrokerThreads, browser: Browser, monkeypatch: pytest.MonkeyPatch) -> None:
    # Demo tokens that live 3 s instead of 10 minutes (the broker reads the lifetime per request).
    monkeypatch.setattr(broker.http, "DEMO_TOKEN_TTL", 3.0)
    live = brokers.start(auth=AuthConfig(jwt_secret=(SECRET,)), demo=True,
                         ai_demo_tokens_per_second=TOKENS_PER_SECOND)
    problems: list[str] = []
    sockets: list[WebSocket] = []
    tokens: list[Request] = []
    page = browser.new_page()
    page.on("websocket", lambda socket: sockets.append(socket))
    page.on("request", lambda request: tokens.append(request)
            if request.url.endswith("/demo/token") else None)
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.goto(live.url + "/")
    expect(page.get_by_test_id("send-button")).to_be_enabled(timeout=10_000)
    started = time.time()
    page.wait_for_timeout(4500)  # past the first token's exp (at most 3 s after it was minted)
    ask(page, "Still there?")
    reply = assistant(page)
    expect(reply).to_have_text(expected_answer("Still there?"), timeout=15_000)
    expect(reply).to_have_attribute("data-status", "done")
    assert time.time() - started > 4
    assert len(sockets) == 1  # one connection all along: refreshed, never expired
    assert len(tokens) >= 3  # the first token and at least two refreshes
    expect(page.get_by_test_id("connection-state")).to_have_text("open")
    expect(page.get_by_test_id("notice")).to_be_hidden()
    assert problems == []
