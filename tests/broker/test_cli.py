"""The tokenfan command, run as a user would: serve, emit, tail, signals, bad config.

Whatever goes wrong, the command says it on stderr in one line (a fixed few
for tail's notices), never with a traceback, and exits 1 (runtime failure),
2 (usage or configuration) or 130 (interrupted).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from broker import Broker, Config, EmitError

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


async def read_to_end(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    with trio.fail_after(15):
        while chunk := await stream.receive_some(4096):
            buffer += chunk
    return bytes(buffer).decode()


def stderr_lines(stderr: bytes | str, count: int = 1) -> list[str]:
    """The lines of ``stderr``, after checking there are ``count`` of them and no traceback."""
    text = stderr if isinstance(stderr, str) else stderr.decode()
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == count, text
    return lines


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process([*TOKENFAN, *args], capture_stdout=True, capture_stderr=True,
                                      check=False, env=None if env is None else {**os.environ, **env})


async def stop(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens: bound, not listening, so connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def not_tokenfan(nursery: trio.Nursery) -> int:
    """The port of an HTTP server that answers every request with an HTML 404, as a web server would."""

    async def answer(stream: trio.SocketStream) -> None:
        request = bytearray()
        try:
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in request:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                head, _, body = bytes(request).partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                while len(body) < length:  # read it all, or closing would reset the connection
                    body += await stream.receive_some(4096)
                page = b"<html><body><h1>404 Not Found</h1><p>nginx</p></body></html>"
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n"
                                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                      % (len(page), page))
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_serve_tail_emit_and_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = await trio.lowlevel.open_process([*TOKENFAN, "serve", "--port", "0"], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, env=env)
    assert server.stdout is not None
    procs = [server]
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
        procs.append(tail)
        tail_json = await trio.lowlevel.open_process(
            [*TOKENFAN, "tail", "--json", "--no-reconnect", "--url", f"ws://127.0.0.1:{port}/ws",
             "ai-chat/cli"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append(tail_json)
        errors = [bytearray(), bytearray()]
        for proc, error in zip((tail, tail_json), errors, strict=True):
            assert proc.stderr is not None
            await read_until(proc.stderr, error, b"subscribed to ai-chat/cli")

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

        bad = await run("emit", "--url", base, "ai-chat/cli", "e", "[" * 40 + "]" * 40, env=env)
        assert bad.returncode == 1
        # The error text of the broker's JSON answer, not the JSON itself.
        line = stderr_lines(bad.stderr)[0]
        assert line.startswith("tokenfan: 400 Bad Request: body: ") and "{" not in line
        assert line.endswith(" is nested deeper than 32 levels")

        server.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await server.wait() == 0
            # The tails (--no-reconnect) were told the server is going away and exit on their own.
            for proc, error in zip((tail, tail_json), errors, strict=True):
                assert await proc.wait() == 1
                assert proc.stderr is not None
                lines = stderr_lines(await read_to_end(proc.stderr, error), 2)
                assert lines[0].startswith("subscribed to ai-chat/cli after offset 0 (epoch ")
                assert lines[1] == ("tokenfan: connection closed: server shutting down "
                                    "(code 4100, reconnect=True)")
    finally:
        for proc in procs:
            await stop(proc)


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
        assert stderr_lines(result.stderr) == [
            "session cli1: also watch it with tokenfan tail --since 0 ai-chat/cli1"]
        bad = await run("chat", "--url", base, "--provider", "nope", "hi")
        assert bad.returncode == 1
        # Refused before it began: no hint to watch a session that streams nothing.
        assert stderr_lines(bad.stderr) == [
            "tokenfan: 400 Bad Request: unknown provider 'nope'; known: demo, openai"]
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
        lines = stderr_lines(await read_to_end(chat.stderr, bytearray()), 2)
        assert lines[1] == "tokenfan: cancelled"
    finally:
        server.kill()
        await server.wait()


# -- one line, never a traceback -------------------------------------------------------


async def test_version() -> None:
    result = await run("--version")
    assert result.returncode == 0
    assert result.stdout.decode() == f"tokenfan {importlib.metadata.version('tokenfan')}\n"


async def test_help_lists_the_exit_codes() -> None:
    result = await run("--help")
    assert result.returncode == 0
    assert "exit codes:" in result.stdout.decode()
    assert "130  interrupted (Ctrl-C)" in result.stdout.decode()


async def test_an_unknown_option_shows_the_usage_of_the_command_it_was_given_to() -> None:
    result = await run("serve", "--bogus")
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("usage: tokenfan serve [-h] [--host HOST] [--port PORT]")
    assert lines[-1] == "tokenfan serve: error: unrecognized arguments: --bogus"
    result = await run("tail", "x", "--bogus")
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == "tokenfan tail: error: unrecognized arguments: --bogus"
    # Before the command, it is the top level's.
    result = await run("--bogus", "serve")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("usage: tokenfan [-h] [--version]")
    assert result.stderr.decode().splitlines()[-1] == "tokenfan: error: unrecognized arguments: --bogus"


async def test_tail_where_nothing_listens_without_reconnect(closed_port: int) -> None:
    url = f"ws://127.0.0.1:{closed_port}/ws"
    result = await run("tail", "--no-reconnect", "--url", url, "ai-chat/x")
    assert result.returncode == 1
    assert stderr_lines(result.stderr) == [f"tokenfan: cannot reach {url}: Connection refused"]


async def test_tail_of_an_invalid_channel_is_a_usage_error(broker: Broker) -> None:
    result = await run("tail", "--url", f"ws://127.0.0.1:{broker.port}/ws", "bad channel")
    assert result.returncode == 2
    assert stderr_lines(result.stderr) == [
        "tokenfan: channel name 'bad channel' has characters outside A-Z a-z 0-9 and _ . : / -"]


async def test_tail_of_a_server_that_is_not_tokenfan(not_tokenfan: int) -> None:
    # Reconnection is on, but retrying cannot turn a web server into a broker: tail ends.
    url = f"ws://127.0.0.1:{not_tokenfan}/ws"
    result = await run("tail", "--url", url, "ai-chat/x")
    assert result.returncode == 1
    assert stderr_lines(result.stderr) == [
        f"tokenfan: {url} is not a tokenfan broker (it answered 404 Not Found)"]


async def test_bad_urls_are_usage_errors() -> None:
    for command in (["tail", "--url", "ftp://x", "ai-chat/x"], ["emit", "--url", "x", "ch", "ev", "1"],
                    ["chat", "--url", "ws:/", "hi"]):
        result = await run(*command)
        assert result.returncode == 2
        assert stderr_lines(result.stderr)[0].startswith("tokenfan: --url must look like ")
    for command in (["tail", "--url", "wss://example.com/ws", "ai-chat/x"],
                    ["chat", "--url", "https://example.com", "hi"]):
        result = await run(*command)
        assert result.returncode == 2
        assert "TLS (wss://, https://) is not supported" in stderr_lines(result.stderr)[0]
    result = await run("tail", "--epoch", "e", "ai-chat/x")
    assert result.returncode == 2
    assert stderr_lines(result.stderr) == ["tokenfan: --epoch needs --since"]


async def test_tail_waits_for_the_broker_then_streams(nursery: trio.Nursery) -> None:
    with socket.socket() as placeholder:  # bound, not listening: refused until the broker takes it
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws"
        tail = await trio.lowlevel.open_process([*TOKENFAN, "tail", "--url", url, "ai-chat/late"],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert tail.stdout is not None and tail.stderr is not None
        try:
            error = bytearray()
            await read_until(tail.stderr, error, b"\n")
            waiting = (f"tokenfan: cannot reach {url}: Connection refused; "
                       "waiting for the broker (retrying with backoff)")
            assert bytes(error).decode() == waiting + "\n"
            await trio.sleep(1.5)  # several attempts, one notice
            placeholder.close()
            broker: Broker = await nursery.start(Broker(Config(port=port)).serve)
            await read_until(tail.stderr, error, b"subscribed to ai-chat/late")
            broker.emit_nowait("ai-chat/late", "ai:token", {"token": "made it"})
            broker.emit_nowait("ai-chat/late", "ai:done", {})
            assert (await read_until(tail.stdout, bytearray(), b"[ai:done] {}\n")).decode() == (
                "made it\n[ai:done] {}\n")
            tail.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                assert await tail.wait() == 130
            lines = stderr_lines(await read_to_end(tail.stderr, error), 2)
            assert lines[0] == waiting
            assert lines[1].startswith("subscribed to ai-chat/late after offset 0 (epoch ")
        finally:
            await stop(tail)


async def test_emit_failures_are_one_line(closed_port: int, not_tokenfan: int) -> None:
    result = await run("emit", "--url", f"http://127.0.0.1:{closed_port}", "ch", "ev", "{}")
    assert result.returncode == 1
    assert stderr_lines(result.stderr) == [f"tokenfan: cannot reach http://127.0.0.1:{closed_port}: "
                                           "Connection refused"]
    result = await run("emit", "--url", f"http://127.0.0.1:{not_tokenfan}", "ch", "ev", "{}")
    assert result.returncode == 1
    assert stderr_lines(result.stderr) == [
        f"tokenfan: http://127.0.0.1:{not_tokenfan} is not a tokenfan broker (it answered 404 Not Found)"]
    result = await run("emit", "ch", "ev", "{nope")
    assert result.returncode == 2
    assert stderr_lines(result.stderr)[0].startswith("tokenfan: DATA is not valid JSON: ")
    # Names are checked before anything is sent, as tail does.
    result = await run("emit", "--url", f"http://127.0.0.1:{closed_port}", "bad channel", "ev", "{}")
    assert result.returncode == 2
    assert stderr_lines(result.stderr) == [
        "tokenfan: channel name 'bad channel' has characters outside A-Z a-z 0-9 and _ . : / -"]


async def test_chat_failures_are_one_line(broker: Broker, closed_port: int, not_tokenfan: int) -> None:
    result = await run("chat", "--url", f"http://127.0.0.1:{broker.port}", "--session", "bad session", "hi")
    assert result.returncode == 2
    assert stderr_lines(result.stderr) == [
        "tokenfan: --session 'bad session' makes a bad channel name: channel name 'ai-chat/bad session' "
        "has characters outside A-Z a-z 0-9 and _ . : / -"]
    result = await run("chat", "--url", f"http://127.0.0.1:{closed_port}", "hi")
    assert result.returncode == 1
    assert stderr_lines(result.stderr) == [f"tokenfan: cannot reach http://127.0.0.1:{closed_port}: "
                                           "Connection refused"]
    result = await run("chat", "--url", f"http://127.0.0.1:{not_tokenfan}", "hi")
    assert result.returncode == 1
    assert stderr_lines(result.stderr) == [
        f"tokenfan: http://127.0.0.1:{not_tokenfan} is not a tokenfan broker (it answered 404 Not Found)"]


async def test_emit_error_names_data_as_the_caller_wrote_it(broker: Broker) -> None:
    # In-process only (no command reaches Broker.emit); here because issue 12 asked for it with the rest.
    deep: list[object] = []
    for _ in range(40):
        deep = [deep]
    for data, message in [({1: 2}, "map keys in data must be strings"),
                          (object(), "data holds an unsupported msgpack type (object)"),
                          (deep, "data is nested deeper than 32 levels"),
                          (2**70, "data holds an integer outside msgpack's range (-2**63 to 2**64-1)")]:
        with pytest.raises(EmitError) as raised:
            broker.emit_nowait("ai-chat/x", "ev", data)
        assert str(raised.value) == message


async def test_tokenfan_url_names_the_broker_for_the_client_commands(
        broker: Broker, closed_port: int) -> None:
    env = {**os.environ, "TOKENFAN_URL": f"http://127.0.0.1:{broker.port}"}
    result = await run("emit", "news", "x", "{}", env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["offset"] == 1
    # --url still wins over the environment.
    result = await run("emit", "--url", f"http://127.0.0.1:{closed_port}", "news", "x", "{}", env=env)
    assert result.returncode == 1 and str(closed_port) in stderr_lines(result.stderr)[0]
    # The broker itself does not take TOKENFAN_URL for one of its options.
    env["TOKENFAN_PORT"] = "not-a-port"
    result = await run("serve", env=env)
    assert result.returncode == 2 and "TOKENFAN_PORT" in stderr_lines(result.stderr)[0]
