"""The browser client (broker/static/tokenfan.js): its codec against the vectors, and how it is served."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import trio

from broker import Broker

ROOT = Path(__file__).resolve().parents[2]


def test_the_js_codec_passes_the_protocol_vectors() -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is needed for the browser client's tests (.ci/run installs it)"
    result = subprocess.run([node, "--test", str(ROOT / "tests" / "js")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


async def test_the_broker_serves_the_client_and_its_imports(broker: Broker) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port or 0)
    async with stream:
        for path in ("/tokenfan.js", "/tokenfan.d.ts", "/vendor/msgpack/index.mjs",
                     "/vendor/msgpack/utils/int.mjs"):
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += await stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            local = ROOT / "broker" / "static" / path.lstrip("/")
            assert body == local.read_bytes()
            if path.endswith(("js", "mjs")):
                assert b"Content-Type: text/javascript" in head
        await stream.send_all(b"GET /vendor/msgpack/../../http.py HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"404" in (await stream.receive_some(65536)).split(b"\r\n")[0]
