"""A page on another origin imports tokenfan.js from the broker and starts an answer (CORS, for real).

The app's page is served by a small HTTP server of the test's on another port.
Chromium maps the name ``app.example`` to 127.0.0.1, so the same page can also
be opened from an origin the broker does not allow.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.browser.conftest import CHROMIUM, BrokerThreads

PAGE = """<!doctype html><meta charset="utf-8"><title>an app</title>
<pre id="answer"></pre><p id="status">loading</p>
<script type="module">
  const broker = '%(broker)s'
  const status = document.getElementById('status')
  try {
    const { Realtime } = await import(broker + '/tokenfan.js')
    const realtime = new Realtime({ url: broker.replace('http', 'ws') + '/ws' })
    realtime.onState((state) => { document.body.dataset.realtime = state })
    const channel = realtime.channel('ai-chat/cors')
    channel.on('ai:token', ({ data }) => { document.getElementById('answer').textContent += data.token })
           .on('ai:done', () => { status.textContent = 'done' })
           .subscribe({ since: { o: 0 } })
    const reply = await fetch(broker + '/ai/chat', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ message: 'hello from another origin', sessionId: 'cors', wait: false }),
    })
    status.textContent = 'posted ' + reply.status
  } catch (error) {
    status.textContent = 'failed: ' + error.name
  }
</script>
"""


@pytest.fixture
def app_server() -> Iterator[tuple[int, dict[str, str]]]:
    """A plain HTTP server for the app's page; the test puts the page's text in the dict."""
    pages: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages["page"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], pages
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mapped_browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--host-resolver-rules=MAP app.example 127.0.0.1"])
        yield browser
        browser.close()


def test_a_page_on_a_loopback_origin_uses_the_broker(
        brokers: BrokerThreads, app_server: tuple[int, dict[str, str]], mapped_browser: Browser) -> None:
    live = brokers.start(ai_demo_tokens_per_second=400)
    port, pages = app_server
    pages["page"] = PAGE % {"broker": live.url}
    page = mapped_browser.new_page()
    page.goto(f"http://localhost:{port}/")
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=15_000)
    assert len(page.locator("#answer").text_content() or "") > 20


def test_a_page_on_a_foreign_origin_may_load_the_client_but_not_use_the_broker(
        brokers: BrokerThreads, app_server: tuple[int, dict[str, str]], mapped_browser: Browser) -> None:
    live = brokers.start()
    port, pages = app_server
    pages["page"] = PAGE % {"broker": live.url}
    page = mapped_browser.new_page()
    page.goto(f"http://app.example:{port}/")
    # The client loads and subscribes; the POST is stopped by the browser at the preflight.
    page.wait_for_function("document.getElementById('status').textContent.startsWith('failed')",
                           timeout=15_000)
    assert page.locator("#status").text_content() == "failed: TypeError"
    assert live.broker.ai.conversation("cors") == []  # no answer was started
    # Nor may it open a WebSocket to the broker (the upgrade names its Origin: 403).
    page.wait_for_timeout(1000)
    assert page.evaluate("document.body.dataset.realtime") != "open"
    assert not live.broker.connections
