"""Publish to a tokenfan broker from any Python app: asyncio, Trio, or blocking code.

The broker's HTTP API (emit, emit batch, ``/ai/chat``, ``/ai/cancel``,
history) as two clients with the same methods:

- :class:`AsyncPublisher`, on httpx and anyio, for asyncio apps (FastAPI,
  Starlette, aiohttp, Django async) and Trio apps alike. Emits made in the
  same tick of the event loop are joined into one request; see
  :mod:`broker.publisher.aio`.
- :class:`Publisher`, blocking, for scripts, workers and WSGI apps.

Both reuse keep-alive connections, send ``api_key`` as ``Authorization:
Bearer``, and raise the errors of :mod:`broker.publisher.errors` (root
:class:`PublishError`). See docs/publishing.md.

Embedding the broker (:mod:`broker.server`) and the WebSocket client
(:mod:`broker.client`) run on Trio only; this module is how asyncio code
talks to a broker.
"""

from broker.publisher.aio import AsyncPublisher, PublisherStatistics
from broker.publisher.calls import ChatResult, Emit, HistoryEvent, HistoryPage, Published
from broker.publisher.errors import (
    AnswerFailed,
    BadResponse,
    BrokerTimedOut,
    BrokerUnreachable,
    EmitsFailed,
    InvalidEvent,
    PublisherClosed,
    PublishError,
    Rejected,
    TooManyPending,
)
from broker.publisher.sync import Publisher

__all__ = [
    "AnswerFailed", "AsyncPublisher", "BadResponse", "BrokerTimedOut", "BrokerUnreachable", "ChatResult",
    "Emit", "EmitsFailed", "HistoryEvent", "HistoryPage", "InvalidEvent", "PublishError", "Published",
    "Publisher", "PublisherClosed", "PublisherStatistics", "Rejected", "TooManyPending",
]
