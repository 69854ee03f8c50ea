"""``tokenfan serve --engine``: processes on one private Redis are one broker; a dead Redis is one line."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request

import trio

from bench.redisproc import RedisServer, free_port
from tests.broker.test_cli import TOKENFAN, read_line, stderr_lines, stop


async def test_two_serve_processes_share_channels(redis_server: RedisServer) -> None:
    servers: list[trio.Process] = []
    try:
        addresses = []
        for _ in range(2):
            server = await trio.lowlevel.open_process(
                [*TOKENFAN, "serve", "--port", "0", "--engine", redis_server.url],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ))
            servers.append(server)
            assert server.stdout is not None
            with trio.fail_after(20):
                line = await read_line(server.stdout, bytearray())
            addresses.append(line.removeprefix("tokenfan listening on http://").strip())
        tail = await trio.lowlevel.open_process(
            [*TOKENFAN, "tail", "--url", f"ws://{addresses[1]}/ws", "--json", "ai-chat/cli"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        servers.append(tail)
        await trio.sleep(1)  # tail subscribes
        body = json.dumps({"channel": "ai-chat/cli", "event": "ai:token", "data": {"token": "over"}}).encode()
        request = urllib.request.Request(f"http://{addresses[0]}/api/emit", body,
                                         headers={"Content-Type": "application/json"})
        with await trio.to_thread.run_sync(urllib.request.urlopen, request) as response:
            assert json.load(response)["offset"] == 1
        assert tail.stdout is not None
        with trio.fail_after(10):
            frame = json.loads(await read_line(tail.stdout, bytearray()))
        assert frame["d"] == {"token": "over"} and frame["o"] == 1
    finally:
        for server in servers:
            await stop(server)


async def test_an_unreachable_engine_is_one_line_and_exit_1() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with trio.fail_after(30):
        result = await trio.run_process([*TOKENFAN, "serve", "--port", "0", "--engine", url],
                                        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    [line] = stderr_lines(result.stderr)
    assert line.startswith(f"tokenfan: engine: cannot connect to Redis at {url}")
    result = await trio.run_process([*TOKENFAN, "serve", "--engine", "redis://h/x"], capture_stdout=True,
                                    capture_stderr=True, check=False)
    assert result.returncode == 2 and b"engine: must be memory or a redis:// URL" in result.stderr
