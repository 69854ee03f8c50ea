"""An OpenAI-compatible upstream on loopback: the real streaming format, quirks and failures included.

The request's ``model`` picks the behaviour:

- ``ok``: a role-only first chunk, an empty-content chunk, a keep-alive
  comment, the pieces of :data:`ANSWER` (one with a two-line ``data:``
  event), a ``finish_reason`` chunk, then ``data: [DONE]``;
- ``slow``: like ``ok`` but waits ``delay`` seconds before the first byte;
- ``drip``: one piece every 50 ms, forever (for cancellation);
- ``cut``: a few pieces, then the connection closes mid-stream;
- ``429`` / ``500``: that HTTP status with a JSON error;
- ``garbage``: a few pieces, then a data line that is not JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import trio

ANSWER = ["Hello", ",", " wor", "ld", "! ", "How", " can", " I", " help", "?"]


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None) -> bytes:
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@dataclass
class FakeOpenAI:
    """Serve with ``await nursery.start(fake.serve)``; ``requests`` records every request body."""

    delay: float = 2.0
    port: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)
    closed_early: int = 0  #: drip streams whose client went away

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk_ = await stream.receive_some(65536)
                if not chunk_:
                    return
                data += chunk_
            head, body = data.split(b"\r\n\r\n", 1)
            headers = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                       for line in head.split(b"\r\n")[1:] if b":" in line}
            length = int(headers.get(b"content-length", b"0"))
            while len(body) < length:
                body += await stream.receive_some(65536)
            request = json.loads(body)
            self.requests.append(request)
            auth = headers.get(b"authorization")
            self.authorization.append(auth.decode() if auth else None)
            await self._answer(stream, str(request.get("model")))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream, model: str) -> None:
        if model in ("429", "500"):
            body = json.dumps({"error": {"message": f"fake {model}"}}).encode()
            await stream.send_all(b"HTTP/1.1 %s Oops\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                  % (model.encode(), len(body), body))
            return
        if model == "slow":
            await trio.sleep(self.delay)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")
        await stream.send_all(chunk(role="assistant") + chunk(""))
        await stream.send_all(b": keep-alive\n\n")
        if model == "drip":
            try:
                while True:
                    await stream.send_all(chunk("tick "))
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed_early += 1
                raise
        for index, piece in enumerate(ANSWER):
            if model == "cut" and index == 4:
                return  # connection closes mid-stream
            if model == "garbage" and index == 4:
                await stream.send_all(b"data: {not json\n\n")
                return
            if index == 2:  # one event split over two data lines (joined with a newline)
                encoded = json.dumps({"choices": [{"index": 0, "delta": {"content": piece},
                                                   "finish_reason": None}]})
                half = encoded.index('"delta"')
                await stream.send_all(b"data: " + encoded[:half].encode() + b"\ndata: "
                                      + encoded[half:].encode() + b"\n\n")
            else:
                await stream.send_all(chunk(piece))
        await stream.send_all(chunk(finish="stop") + b"data: [DONE]\n\n")
