"""tokenfan.js with ``getToken`` in Node (realtime_auth.test.mjs), against real brokers over real sockets.

The broker with ``[auth]`` and an open one run in this test's Trio loop; Node's test runner runs
the scenarios in a child process: authenticate and refresh, refused with 4009 (no reconnect),
expired (4104) then reconnected and recovered, and no token at all on an open broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import trio

from tests.broker.conftest import StartBroker
from tests.clients_auth.conftest import API_KEY, SECRET, StartAuth

HERE = Path(__file__).resolve().parent
WS_MODULE = HERE.parents[1] / "clients" / "js" / "node_modules" / "ws" / "index.js"


async def test_the_js_client_authenticates_refreshes_and_stops_when_refused(
        auth_broker: StartAuth, start_broker: StartBroker) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is needed for these tests (make test-prereqs installs it)"
    assert WS_MODULE.exists(), "clients/js/node_modules is missing: run `make js-deps`"
    broker = await auth_broker()
    open_broker = await start_broker()
    env = {**os.environ, "TOKENFAN_WS_URL": f"ws://127.0.0.1:{broker.port}/ws",
           "TOKENFAN_HTTP_URL": f"http://127.0.0.1:{broker.port}", "TOKENFAN_SECRET": SECRET,
           "TOKENFAN_API_KEY": API_KEY, "TOKENFAN_OPEN_WS_URL": f"ws://127.0.0.1:{open_broker.port}/ws",
           "TOKENFAN_WS_MODULE": str(WS_MODULE)}
    with trio.fail_after(60):
        result = await trio.run_process([node, "--test", str(HERE / "realtime_auth.test.mjs")], env=env,
                                        capture_stdout=True, capture_stderr=True, check=False,
                                        stdin=subprocess.DEVNULL)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out[-6000:]
    assert "# pass 4" in out and "# fail 0" in out, out[-6000:]
