"""Hostile HTTP clients against a broker process: bounded memory and time, answers instead of tracebacks."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import trio

from tests.abuse.conftest import StartHostile
from tests.broker.conftest import StartBroker

MiB = 1024 * 1024


def _post(port: int, path: str, payload: object) -> dict[str, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, object] = json.load(response)
        return result


def _health_time(port: int) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200
    return time.monotonic() - started


def test_pipelined_requests_on_a_connection_that_never_reads_hold_one_answer(
        hostile_broker: StartHostile) -> None:
    """Finding 3: 13.6 KB of pipelined history requests once made the broker build every answer (3.28 GB)."""
    served = hostile_broker(handshake_timeout="3s")
    # 4,000 kept publications of 1 KB: each history answer is about 4.5 MB of JSON.
    token = "x" * 1000
    for _ in range(40):
        _post(served.port, "/api/emit/batch", {"events": [
            {"channel": "ai-chat/big", "event": "ai:token", "data": {"token": token}}] * 100})
    before = served.status("VmRSS")
    request = b"GET /api/history?channel=ai-chat/big&limit=10000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    attacker = socket.create_connection(("127.0.0.1", served.port))
    try:
        attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        attacker.sendall(request * (13_600 // len(request)))  # about 190 requests, never read
        time.sleep(1.0)
        # Others are served meanwhile, and the broker holds about one answer for the attacker.
        assert _health_time(served.port) < 0.5
        grown = served.status("VmHWM") - before
        assert grown < 64 * MiB, f"peak RSS grew {grown / MiB:.0f} MiB"

        # The request deadline (3 s) cuts a connection whose answer does not drain: reading now
        # gets what was queued before the cut, then the end of the stream, not 190 answers.
        time.sleep(3.0)
        attacker.settimeout(15)
        received = 0
        while chunk := attacker.recv(1 << 20):
            received += len(chunk)
        assert received < 3 * 5 * MiB, f"{received / MiB:.0f} MiB of answers were sent"
    finally:
        attacker.close()


async def test_a_publisher_that_always_has_a_request_in_flight_is_not_cut(start_broker: StartBroker) -> None:
    """The request deadline restarts with each request, not only when the connection goes idle."""
    broker = await start_broker(handshake_timeout=1)
    body = b'{"channel": "news", "event": "x", "data": {}}'
    emit = (b"POST /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    answers = 0
    half = len(emit) // 2
    async with stream:
        # Always half a request waiting at the broker: its reader is never idle between requests.
        await stream.send_all(emit + emit[:half])
        buffer = b""
        with trio.move_on_after(2.5):
            while True:
                chunk = await stream.receive_some(65536)
                assert chunk, f"the broker closed the connection after {answers} answers"
                buffer += chunk
                while b"\r\n\r\n" in buffer and buffer.count(b"}") >= 1:
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(rest) < length:
                        break
                    assert head.startswith(b"HTTP/1.1 200"), head
                    buffer = rest[length:]
                    answers += 1
                    await stream.send_all(emit[half:] + emit[:half])  # finish one, start the next
    assert answers > 20
