"""The tokenfan command, run as a user would: serve, emit, tail, signals, bad config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import trio

TOKENFAN = [sys.executable, "-m", "broker.cli"]


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    with trio.fail_after(15):
        while b"\n" not in buffer:
            chunk = await stream.receive_some(4096)
            assert chunk, f"stream ended; got {bytes(buffer)!r}"
            buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def read_until(stream: trio.abc.ReceiveStream, buffer: bytearray, marker: bytes) -> bytes:
    with trio.fail_after(15):
        while marker not in buffer:
            chunk = await stream.receive_some(4096)
            assert chunk, f"stream ended; got {bytes(buffer)!r}"
            buffer += chunk
    return bytes(buffer)


async def test_serve_tail_emit_and_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = await trio.lowlevel.open_process([*TOKENFAN, "serve", "--port", "0"], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, env=env)
    assert server.stdout is not None
    try:
        out = bytearray()
        line = await read_line(server.stdout, out)
        assert line.startswith("tokenfan listening on http://127.0.0.1:")
        base = line.rsplit(" ", 1)[1]
        port = int(base.rsplit(":", 1)[1])
        assert port > 0

        tail = await trio.lowlevel.open_process(
            [*TOKENFAN, "tail", "--no-reconnect", "--url", f"ws://127.0.0.1:{port}/ws", "ai-chat/cli"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        tail_json = await trio.lowlevel.open_process(
            [*TOKENFAN, "tail", "--json", "--no-reconnect", "--url", f"ws://127.0.0.1:{port}/ws",
             "ai-chat/cli"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert tail.stderr is not None and tail_json.stderr is not None
        for proc in (tail, tail_json):
            assert proc.stderr is not None
            await read_until(proc.stderr, bytearray(), b"subscribed to ai-chat/cli")

        for token in ["Hello", ", ", "world"]:
            result = await trio.run_process(
                [*TOKENFAN, "emit", "--url", base, "ai-chat/cli", "ai:token", json.dumps({"token": token})],
                capture_stdout=True, env=env)
            assert json.loads(result.stdout)["ok"] is True
        await trio.run_process([*TOKENFAN, "emit", "--url", base, "ai-chat/cli", "ai:done", "{}"],
                               capture_stdout=True, env=env)
        assert tail.stdout is not None and tail_json.stdout is not None
        text = await read_until(tail.stdout, bytearray(), b"[ai:done]")
        assert text.startswith(b"Hello, world\n[ai:done] {}")
        lines = (await read_until(tail_json.stdout, bytearray(), b'"ai:done"')).decode().splitlines()
        frames = [json.loads(line) for line in lines]
        assert [f["o"] for f in frames] == [1, 2, 3, 4]
        assert frames[0] == {"t": "ev", "ch": "ai-chat/cli", "ev": "ai:token",
                             "d": {"token": "Hello"}, "o": 1}

        bad = await trio.run_process([*TOKENFAN, "emit", "--url", base, "bad channel", "e", "{}"],
                                     capture_stdout=True, capture_stderr=True, check=False, env=env)
        assert bad.returncode == 1
        assert b"400" in bad.stderr and b"characters outside" in bad.stderr

        server.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await server.wait() == 0
            # The tails were told the server is going away and exit on their own.
            for proc in (tail, tail_json):
                await proc.wait()
                assert proc.stderr is not None
                message = await read_until(proc.stderr, bytearray(), b"code 4100")
                assert b"reconnect=True" in message
    finally:
        for proc in (server,):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_bad_config_exits_2() -> None:
    result = await trio.run_process([*TOKENFAN, "serve", "--port", "0"], capture_stdout=True,
                                    capture_stderr=True, check=False,
                                    env={**os.environ, "TOKENFAN_IDLE_TIMEOUT": "forever"})
    assert result.returncode == 2
    assert b"idle_timeout (environment TOKENFAN_IDLE_TIMEOUT)" in result.stderr


async def test_port_in_use_is_reported() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = await trio.run_process([*TOKENFAN, "serve", "--port", str(port)], capture_stdout=True,
                                        capture_stderr=True, check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}".encode() in result.stderr


async def start_server(env: dict[str, str]) -> tuple[trio.Process, str]:
    server = await trio.lowlevel.open_process([*TOKENFAN, "serve", "--port", "0"], stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, env={**os.environ, **env})
    assert server.stdout is not None
    line = await read_line(server.stdout, bytearray())
    return server, line.removeprefix("tokenfan listening on ").strip()


async def test_chat_prints_the_answer_as_it_streams() -> None:
    from broker.ai import ChatMessage, DemoProvider

    server, base = await start_server({"TOKENFAN_AI_DEMO_TOKENS_PER_SECOND": "400"})
    try:
        command = [*TOKENFAN, "chat", "--url", base, "--session", "cli1", "Who is late?"]
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        demo = DemoProvider()
        question = [ChatMessage(role="user", content="Who is late?")]
        expected = "".join(demo.answer(question, demo.answer_tokens))
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == expected + "\n"
        assert b"tokenfan tail --since 0 ai-chat/cli1" in result.stderr
        bad = await trio.run_process([*TOKENFAN, "chat", "--url", base, "--provider", "nope", "hi"],
                                     capture_stdout=True, capture_stderr=True, check=False)
        assert bad.returncode == 1 and b"unknown provider 'nope'" in bad.stderr
    finally:
        server.kill()
        await server.wait()


async def test_ctrl_c_cancels_the_answer() -> None:
    server, base = await start_server({"TOKENFAN_AI_DEMO_TOKENS_PER_SECOND": "5"})
    try:
        chat = await trio.lowlevel.open_process([*TOKENFAN, "chat", "--url", base, "--session", "cli2", "Hi"],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert chat.stdout is not None and chat.stderr is not None
        with trio.fail_after(10):
            assert await chat.stdout.receive_some(100)  # the first token
        chat.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await chat.wait() == 130
        message = await read_until(chat.stderr, bytearray(), b"cancelled")
        assert b"tokenfan: cancelled" in message
    finally:
        server.kill()
        await server.wait()
