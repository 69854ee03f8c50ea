"""The blocking publisher: the broker's HTTP API on one ``httpx.Client`` (for scripts, workers, WSGI)."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from broker.publisher.calls import (
    Call,
    ChatResult,
    Emit,
    HistoryPage,
    Published,
    base_url,
    batch_call,
    cancel_call,
    chat_call,
    client_options,
    emit_call,
    encode_event,
    encode_events,
    history_call,
    request_timeout,
    transport_errors,
)
from broker.publisher.errors import PublisherClosed

T = TypeVar("T")


class Publisher:
    """Publish to a tokenfan broker over HTTP, blocking. Use it as ``with Publisher(url) as pub:``.

    Each call is one request on a pool of keep-alive connections that the
    calls share (``max_connections``), so a loop of emits uses one
    connection. The publisher may be shared by threads. Every method raises
    the errors of :mod:`broker.publisher.errors`; ``timeout`` bounds the
    connect and each read and write of a request, in seconds (None: no
    limit), except the wait for a finished ``chat``, which the broker bounds
    with its ``ai_time_limit``.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float | None = 10.0,
                 max_connections: int = 10) -> None:
        self.url = base_url(url)
        self._timeout = timeout
        self._http = httpx.Client(**client_options(self.url, api_key=api_key, timeout=timeout,
                                                   max_connections=max_connections))
        self.requests = 0  #: HTTP requests made so far

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections; later calls raise :class:`PublisherClosed`."""
        self._http.close()

    def _call(self, call: Call[T]) -> T:
        if self._http.is_closed:
            raise PublisherClosed("this Publisher is closed")
        self.requests += 1
        with transport_errors(self.url):
            response = self._http.request(call.method, call.path, content=call.body, params=call.params,
                                          headers=call.headers, timeout=request_timeout(call, self._timeout))
        return call.parse(response.status_code, response.content)

    def emit(self, channel: str, event: str, data: Any = None, *, persist: bool | None = None) -> Published:
        """Publish ``event`` with ``data`` on ``channel`` (``POST /api/emit``).

        ``persist`` overrides whether the channel keeps it in history.

        Raises:
            Rejected: 400 naming what is wrong (channel or event name, data, persist).
            InvalidEvent: ``data`` cannot be encoded; nothing was sent.
        """
        return self._call(emit_call(channel, encode_event(channel, event, data, persist)))

    def emit_batch(self, events: Iterable[Emit | tuple[str, str, Any]]) -> list[Published]:
        """Publish several events in one request (``POST /api/emit/batch``), in order.

        All or nothing: one bad event rejects the batch (Rejected 400 naming
        ``events[i]``) and none is published; more events than the broker's
        ``max_batch_events`` (1000 by default) is Rejected 413.
        """
        return self._call(batch_call(encode_events(events)))

    def chat(self, session_id: str, message: str, *, wait: bool = True, provider: str | None = None,
             model: str | None = None) -> ChatResult:
        """Ask the broker's AI path to answer ``message``, streaming to ``ai-chat/{session_id}``.

        With ``wait`` (the default) this returns when the answer ends; without,
        as soon as it starts streaming. Subscribe before calling so no token is missed.

        Raises:
            Rejected: 400 a bad field, 409 the session is already answering, 429 too many answers.
            AnswerFailed: (with ``wait``) the answer ended in ``ai:error``.
        """
        return self._call(chat_call(session_id, message, wait=wait, provider=provider, model=model))

    def cancel(self, session_id: str) -> bool:
        """Stop the session's answer (``POST /ai/cancel``); True if one was running."""
        return self._call(cancel_call(session_id))

    def history(self, channel: str, *, since: int | None = None, epoch: str | None = None,
                limit: int | None = None) -> HistoryPage:
        """One page of the channel's kept publications after ``since`` (``GET /api/history``)."""
        return self._call(history_call(channel, since=since, epoch=epoch, limit=limit))
