"""Token source: any OpenAI-compatible ``/v1/chat/completions`` endpoint with ``"stream": true``.

OpenAI, vLLM, Ollama, llama.cpp's server and LM Studio all speak it. The
request goes through httpx, which runs on Trio through anyio; the caller's
cancel scope cancels it (closing the upstream connection).

The answer is a server-sent-event stream (``text/event-stream``): events
separated by blank lines, each with ``data:`` lines (joined with newlines when
there are several), ``:`` comment lines as keep-alives. Each event's data is a
JSON chunk whose ``choices[0].delta.content`` carries the next piece; the
first chunk usually carries only ``delta.role``, some carry an empty or null
``content``, the last carries ``finish_reason``; ``data: [DONE]`` ends it.
Anything else (a non-JSON data line, a chunk without ``choices``) is a
malformed stream.

Failures become :class:`ProviderError`: ``upstream_unreachable`` (connection
refused, DNS), ``upstream_timeout`` (no first byte, or a stall, within
``timeout``; status 504), ``upstream_rate_limited`` (HTTP 429),
``upstream_http_error`` (any other non-200), ``upstream_bad_stream``
(malformed), ``upstream_disconnected`` (the stream ended before ``[DONE]`` or
a ``finish_reason``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import httpx

from broker.ai.providers import ChatMessage, ProviderError

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIProvider:
    """Streams chat completions from an OpenAI-compatible server."""

    def __init__(self, *, base_url: str = DEFAULT_BASE_URL, api_key: str = "",
                 default_model: str = "gpt-4o-mini", timeout: float = 30.0) -> None:
        """
        Args:
            base_url: up to and including ``/v1``, e.g. ``http://127.0.0.1:11434/v1`` for Ollama.
            api_key: sent as ``Authorization: Bearer``; empty sends none (local servers).
            default_model: the model when a request names none.
            timeout: longest wait for the connection, the first byte, and between two reads.
        """
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.default_model = default_model
        self.timeout = timeout

    async def stream(self, messages: Sequence[ChatMessage], *, model: str,
                     max_tokens: int) -> AsyncGenerator[str, None]:
        body = {"model": model, "stream": True, "max_tokens": max_tokens,
                "messages": [{"role": m.role, "content": m.content} for m in messages]}
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client, \
                    client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:300].decode("utf-8", "replace").strip()
                    code = "upstream_rate_limited" if response.status_code == 429 else "upstream_http_error"
                    raise ProviderError(code, f"{url} answered {response.status_code}: {detail}")
                finished = done = False
                events = _sse_data(response.aiter_lines())
                async with contextlib.aclosing(events):
                    async for data in events:
                        if done:
                            continue  # read to the end, so the response's generators finish
                        if data.strip() == "[DONE]":
                            done = True
                            continue
                        piece, finish = _parse_chunk(data)
                        if piece:
                            yield piece
                        finished = finished or finish is not None
                if not (done or finished):
                    raise ProviderError("upstream_disconnected", f"{url} ended the stream before [DONE]")
        except httpx.ConnectError as exc:
            raise ProviderError("upstream_unreachable", f"cannot connect to {url}: {exc}") from None
        except httpx.TimeoutException:
            raise ProviderError("upstream_timeout", f"{url} sent nothing for {self.timeout:g}s",
                                status=504) from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise ProviderError("upstream_disconnected", f"{url} broke off the answer: {exc}") from None
        except httpx.HTTPError as exc:
            raise ProviderError("upstream_error", f"request to {url} failed: {exc}") from None


async def _sse_data(lines: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """The data of each server-sent event (``data:`` lines joined with newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith(":"):
            continue  # a comment: keep-alive
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # event:, id:, retry: and unknown fields carry nothing we use
    if data:
        yield "\n".join(data)


def _parse_chunk(data: str) -> tuple[str, str | None]:
    """``(content piece, finish_reason)`` of one ``chat.completion.chunk``."""
    try:
        chunk: Any = json.loads(data)
        choice = chunk["choices"][0] if chunk["choices"] else {}
        delta = choice.get("delta") or {}
        content = delta.get("content") or ""
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise ProviderError("upstream_bad_stream", f"not a chat completion chunk: {data[:200]!r}") from None
    if not isinstance(content, str):
        raise ProviderError("upstream_bad_stream", f"delta.content is not text: {data[:200]!r}")
    return content, finish if isinstance(finish, str) else None
