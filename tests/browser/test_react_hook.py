"""tokenfan/react in headless Chromium (Debian's) against a real broker.

The npm package is packed and installed offline into a fresh project with React, and a page that
renders components on its hooks (in ``<StrictMode>``, so each effect runs twice, as in
development) is bundled with esbuild and served from another loopback origin, as a dev server
would serve an app. The test emits events over HTTP: tokens appear, the streaming flag clears on
``ai:done``, and unmounting unsubscribes (the broker's subscriber count for the channel drops to 0).
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from playwright.sync_api import Browser, Page, expect

from broker import ChannelOptions
from tests.browser.conftest import BrokerThreads, LiveBroker
from tests.js.npm import CLIENT, node_project, pack, require_dev_tools

APP = """\
import { StrictMode, useState } from 'react'
import { createRoot } from 'react-dom/client'
import { Realtime } from 'tokenfan'
import { RealtimeProvider, useAiChat, useChannel } from 'tokenfan/react'

const params = new URLSearchParams(location.search)
const wait = params.has('backoff') ? Number(params.get('backoff')) : null
const realtime = new Realtime({ url: params.get('ws'), backoff: wait ? [wait, wait] : undefined })
realtime.onState((state) => { document.body.dataset.state = state })

function Answer ({ channel }) {
  const { text, streaming, error, ready } = useAiChat(channel)
  return (
    <p data-testid="answer" data-streaming={String(streaming)} data-ready={String(ready)}
       data-error={error ?? ''}>{text}</p>
  )
}

function Goals () {
  const [goals, setGoals] = useState([])
  const { ready } = useChannel('scores', {
    goal: ({ data, offset }) => setGoals((seen) => [...seen, `${data.team}@${offset}`]),
  }, { since: { o: 0 } })
  return (
    <ul data-testid="goals" data-ready={String(ready)}>{goals.map((goal, i) => <li key={i}>{goal}</li>)}</ul>
  )
}

function App () {
  const [shown, setShown] = useState(true)
  return (
    <>
      <button data-testid="toggle" onClick={() => setShown((now) => !now)}>{shown ? 'Hide' : 'Show'}</button>
      {shown && <><Answer channel={params.get('channel')} /><Goals /></>}
    </>
  )
}

createRoot(document.getElementById('root')).render(
  <StrictMode><RealtimeProvider client={realtime}><App /></RealtimeProvider></StrictMode>
)
"""

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>tokenfan/react</title><link rel="icon" href="data:,"></head>
<body><div id="root"></div><script type="module" src="app.js"></script></body></html>
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the app: the packed package and React from a fresh project, bundled by esbuild."""
    require_dev_tools()
    work = tmp_path_factory.mktemp("react-page")
    tarball, _ = pack(work)
    project = node_project(work / "project", tarball, "module", ["react", "react-dom"])
    (project / "app.jsx").write_text(APP)
    esbuild = CLIENT / "node_modules" / ".bin" / "esbuild"
    result = subprocess.run(
        [str(esbuild), "app.jsx", "--bundle", "--format=esm", "--jsx=automatic", "--outfile=app.js",
         '--define:process.env.NODE_ENV="development"', "--log-level=warning"],
        cwd=project, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (project / "index.html").write_bytes(PAGE)

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(project), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()
    thread.join(10)


def post(live: LiveBroker, path: str, payload: object) -> None:
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(live.url + path, json.dumps(payload).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def emit(live: LiveBroker, channel: str, event: str, data: object) -> None:
    post(live, "/api/emit", {"channel": channel, "event": event, "data": data})


def subscribers(live: LiveBroker, channel: str) -> int:
    """How many connections the broker's hub has subscribed to ``channel``."""

    def count() -> int:
        hub_channel = live.broker.hub.channel(channel)
        return 0 if hub_channel is None else len(hub_channel.subscribers)

    return trio.from_thread.run_sync(count, trio_token=live.token)


def wait_for_subscribers(live: LiveBroker, channel: str, expected: int) -> None:
    deadline = time.monotonic() + 10
    while subscribers(live, channel) != expected:
        now = subscribers(live, channel)
        assert time.monotonic() < deadline, f"{channel} has {now} subscribers, not {expected}"
        time.sleep(0.02)


def open_page(browser: Browser, app: str, live: LiveBroker, channel: str,
              **more: str) -> tuple[Page, list[str]]:
    """The app, told where the broker is and which chat to show; also its console's errors and warnings."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    ws = live.url.replace("http://", "ws://") + "/ws"
    page.goto(f"{app}?{urllib.parse.urlencode({'ws': ws, 'channel': channel, **more})}")
    return page, problems


def test_the_hooks_stream_tokens_clear_streaming_and_unsubscribe_on_unmount(
        brokers: BrokerThreads, browser: Browser, app: str) -> None:
    live = brokers.start(channels={
        "ai-chat/*": ChannelOptions(client_events=("ai:cancel",), history_size=1000),
        "scores": ChannelOptions(history_size=100),
    })
    chat = "ai-chat/react-hook"
    # An answer already under way when the page opens: useAiChat reads the channel from the start.
    emit(live, chat, "ai:start", {"prompt": "A story, please"})
    emit(live, chat, "ai:token", {"token": "Once"})
    emit(live, chat, "ai:token", {"token": " upon"})

    page, problems = open_page(browser, app, live, chat)
    answer = page.get_by_test_id("answer")
    expect(answer).to_have_attribute("data-ready", "true", timeout=10_000)
    expect(answer).to_have_text("Once upon")
    expect(answer).to_have_attribute("data-streaming", "true")
    expect(page.get_by_test_id("goals")).to_have_attribute("data-ready", "true")
    # StrictMode subscribed, unsubscribed and subscribed again: one subscription is left.
    wait_for_subscribers(live, chat, 1)
    wait_for_subscribers(live, "scores", 1)

    emit(live, chat, "ai:token", {"token": " a time"})
    expect(answer).to_have_text("Once upon a time")
    expect(answer).to_have_attribute("data-streaming", "true")
    emit(live, "scores", "goal", {"team": "home"})
    emit(live, chat, "ai:done", {})
    expect(answer).to_have_attribute("data-streaming", "false")
    expect(answer).to_have_text("Once upon a time")
    expect(page.get_by_test_id("goals").locator("li")).to_have_text(["home@1"])

    page.get_by_test_id("toggle").click()  # unmount both components
    expect(answer).to_have_count(0)
    wait_for_subscribers(live, chat, 0)
    wait_for_subscribers(live, "scores", 0)
    emit(live, "scores", "goal", {"team": "away"})  # nobody is listening, history keeps it

    # Mounted again on an open connection, where StrictMode's subscribe, unsubscribe, subscribe go
    # out at once: the replay of the first subscription is ignored, so each event shows once.
    page.get_by_test_id("toggle").click()
    expect(page.get_by_test_id("goals").locator("li")).to_have_text(["home@1", "away@2"])
    expect(answer).to_have_attribute("data-ready", "true")
    expect(answer).to_have_text("Once upon a time")
    expect(answer).to_have_attribute("data-streaming", "false")
    wait_for_subscribers(live, chat, 1)
    emit(live, chat, "ai:start", {"prompt": "Another"})
    expect(answer).to_have_attribute("data-streaming", "true")
    expect(answer).to_have_text("")
    emit(live, chat, "ai:token", {"token": "The end"})
    emit(live, "scores", "goal", {"team": "home"})
    emit(live, chat, "ai:error", {"message": "model went away"})
    expect(answer).to_have_text("The end")
    expect(answer).to_have_attribute("data-streaming", "false")
    expect(answer).to_have_attribute("data-error", "model went away")
    expect(page.get_by_test_id("goals").locator("li")).to_have_text(["home@1", "away@2", "home@3"])

    page.get_by_test_id("toggle").click()
    wait_for_subscribers(live, chat, 0)
    wait_for_subscribers(live, "scores", 0)
    assert page.evaluate("document.body.dataset.state") == "open"  # the app's connection stays up
    assert problems == []


def test_use_ai_chat_reads_the_chat_again_when_a_reconnect_cannot_recover(
        brokers: BrokerThreads, browser: Browser, app: str) -> None:
    # History keeps 5 publications; the page waits 0.8 s before reconnecting.
    live = brokers.start(channels={"ai-chat/*": ChannelOptions(client_events=("ai:cancel",), history_size=5)})
    chat = "ai-chat/react-reload"
    emit(live, chat, "ai:start", {"prompt": "A story, please"})
    emit(live, chat, "ai:token", {"token": "Once"})
    emit(live, chat, "ai:token", {"token": " upon"})
    page, problems = open_page(browser, app, live, chat, backoff="800")
    answer = page.get_by_test_id("answer")
    expect(answer).to_have_text("Once upon", timeout=10_000)

    live.drop_connections()
    page.wait_for_function("document.body.dataset.state === 'reconnecting'", timeout=5000)
    tokens = [" a", " time", " there", " was", " a", " fox"]  # offsets 4-9: 4 falls out of history
    post(live, "/api/emit/batch", {"events": [{"channel": chat, "event": "ai:token", "data": {"token": token}}
                                              for token in tokens]})

    # The reconnect is told recovered: false; the hook subscribes again from what history holds,
    # rather than showing "Once upon" with a hole after it.
    expect(answer).to_have_text("".join(tokens[1:]), timeout=10_000)
    expect(answer).to_have_attribute("data-streaming", "true")
    emit(live, chat, "ai:done", {})
    expect(answer).to_have_attribute("data-streaming", "false")
    expect(answer).to_have_text("".join(tokens[1:]))
    wait_for_subscribers(live, chat, 1)
    assert live.broker.statistics().hub.recovery_misses >= 1
    assert problems == []
