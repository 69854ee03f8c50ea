"""The publisher's requests and answers, sans-IO: what each call sends and what each answer means.

Both publishers build a :class:`Call` here, send it with their own httpx
client inside :func:`transport_errors`, and hand the status and body to
``call.parse``, which returns the result or raises a :class:`Rejected` that
carries the broker's ``error`` text. Nothing here does I/O, so the sync and
async publishers cannot drift apart.

Emits travel as msgpack (``Content-Type: application/msgpack``), so their
data may hold anything :meth:`broker.Broker.emit` accepts, ``bytes``
included. Each event is packed once, when it is emitted; a batch body is
those packed events behind a map and array header, so joining emits into a
batch copies bytes and packs nothing again.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import httpx
import msgpack

from broker.publisher.errors import (
    AnswerFailed,
    BadResponse,
    BrokerTimedOut,
    BrokerUnreachable,
    InvalidEvent,
    Rejected,
)

T = TypeVar("T")

MSGPACK = "application/msgpack"


# -- results -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    """Where an emitted event landed: its ``offset`` within the channel's ``epoch``."""

    channel: str
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Emit:
    """One event of :meth:`emit_batch`; a ``(channel, event, data)`` tuple does as well."""

    channel: str
    event: str
    data: Any = None
    persist: bool | None = None  #: keep it in history (None: the channel's default)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatResult:
    """The broker's answer to ``POST /ai/chat``.

    With ``wait=True`` the answer is over: ``reason`` is ``stop``, ``length``
    (``ai_max_tokens`` reached) or ``cancelled``, and ``tokens`` counts the
    ``ai:token`` events sent. With ``wait=False`` it is still streaming to
    ``channel`` and both are None.
    """

    channel: str
    reason: str | None
    tokens: int | None

    @property
    def finished(self) -> bool:
        return self.reason is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEvent:
    """One kept publication. msgpack ``bin`` data reads as ``{"$bin": "<hex>"}`` (the JSON API's form)."""

    offset: int
    event: str
    data: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryPage:
    """One page of ``GET /api/history`` (see docs/history.md).

    ``publications`` follow ``since``, in offset order (offsets kept out of
    history are skipped). When ``more`` is true, ask again with
    ``since=page.next``. ``recovered`` is false when ``epoch`` was given and
    is not current, or publications after ``since`` were trimmed.
    """

    channel: str
    epoch: str | None
    top: int  #: the channel's latest offset
    recovered: bool
    more: bool
    next: int
    publications: tuple[HistoryEvent, ...]


# -- calls ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Call(Generic[T]):
    """One HTTP request to the broker and the function that reads its answer."""

    method: Literal["GET", "POST"]
    path: str
    parse: Callable[[int, bytes], T]
    body: bytes | None = None
    content_type: str | None = None
    params: Mapping[str, str] | None = None
    #: The answer may take as long as the broker lets it (``/ai/chat`` with ``wait``,
    #: bounded by its ``ai_time_limit``): no read timeout.
    long: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type} if self.content_type else {}


def encode_event(channel: str, event: str, data: Any, persist: bool | None) -> bytes:
    """One event as the broker's emit body, msgpack-packed.

    Raises:
        InvalidEvent: msgpack cannot encode ``data`` (a set, an object, an int
            beyond 64 bits, nesting deeper than msgpack allows).
    """
    item: dict[str, Any] = {"channel": channel, "event": event, "data": data}
    if persist is not None:
        item["persist"] = persist
    try:
        packed: bytes = msgpack.packb(item)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidEvent(f"cannot send {event!r} on {channel!r}: its data cannot be encoded: "
                           f"{exc}") from None
    return packed


def encode_events(events: Iterable[Emit | tuple[str, str, Any]]) -> list[bytes]:
    """Pack the events of :meth:`emit_batch`, in order."""
    packed = []
    for item in events:
        if isinstance(item, Emit):
            packed.append(encode_event(item.channel, item.event, item.data, item.persist))
        else:
            channel, event, data = item
            packed.append(encode_event(channel, event, data, None))
    return packed


_BATCH_PREFIX: bytes = b"\x81" + msgpack.packb("events")  # a map of one key, "events"


def emit_call(channel: str, packed: bytes) -> Call[Published]:
    """``POST /api/emit`` of one event, packed by :func:`encode_event` for ``channel``."""

    def parse(status: int, body: bytes) -> Published:
        payload = _payload(status, body, "POST /api/emit")
        return Published(channel=channel, offset=_field(payload, "offset", int, body),
                         epoch=_field(payload, "epoch", str, body))

    return Call(method="POST", path="/api/emit", body=packed, content_type=MSGPACK, parse=parse)


def batch_call(packed: Sequence[bytes]) -> Call[list[Published]]:
    """``POST /api/emit/batch`` of packed events: all are published, in order, or none."""
    header: bytes = msgpack.Packer().pack_array_header(len(packed))
    expected = len(packed)

    def parse(status: int, body: bytes) -> list[Published]:
        payload = _payload(status, body, "POST /api/emit/batch")
        results = payload.get("results")
        if not isinstance(results, list) or len(results) != expected:
            raise BadResponse(f"POST /api/emit/batch: expected {expected} results, got {_snippet(body)}")
        return [_publication(item, "POST /api/emit/batch", body) for item in results]

    return Call(method="POST", path="/api/emit/batch", body=_BATCH_PREFIX + header + b"".join(packed),
                content_type=MSGPACK, parse=parse)


def chat_call(session_id: str, message: str, *, wait: bool, provider: str | None,
              model: str | None) -> Call[ChatResult]:
    """``POST /ai/chat``: the broker streams an answer to ``ai-chat/{session_id}``."""
    request: dict[str, Any] = {"message": message, "sessionId": session_id, "wait": wait}
    if provider is not None:
        request["provider"] = provider
    if model is not None:
        request["model"] = model
    return Call(method="POST", path="/ai/chat", body=json.dumps(request).encode(),
                content_type="application/json", parse=_chat_result, long=wait)


def cancel_call(session_id: str) -> Call[bool]:
    """``POST /ai/cancel``: stop the session's answer; the result says whether one was running."""

    def parse(status: int, body: bytes) -> bool:
        return _field(_payload(status, body, "POST /ai/cancel"), "cancelled", bool, body)

    return Call(method="POST", path="/ai/cancel", body=json.dumps({"sessionId": session_id}).encode(),
                content_type="application/json", parse=parse)


def history_call(channel: str, *, since: int | None, epoch: str | None,
                 limit: int | None) -> Call[HistoryPage]:
    """``GET /api/history``: one page of the channel's kept publications."""
    params = {"channel": channel}
    for key, value in (("since", since), ("epoch", epoch), ("limit", limit)):
        if value is not None:
            params[key] = str(value)
    return Call(method="GET", path="/api/history", params=params, parse=_history_page)


# -- answers ---------------------------------------------------------------------------


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return repr(text[:limit] + ("…" if len(text) > limit else "")) if text else "an empty body"


def _payload(status: int, body: bytes, what: str) -> dict[str, Any]:
    """The JSON object of a successful answer.

    Raises:
        Rejected: a status other than 2xx, with the broker's ``error`` text (or,
            when the body is not the broker's, the start of the body).
        BadResponse: a 2xx answer that is not ``{"ok": true, ...}``.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not 200 <= status < 300:
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            raise Rejected(status, payload["error"])
        raise Rejected(status, f"{what} answered {_snippet(body)}")
    if not isinstance(payload, dict) or payload.get("ok") is not True:
        raise BadResponse(f"{what} answered {status} with {_snippet(body)}, not the broker's "
                          '{"ok": true, ...}: is the URL a tokenfan broker?')
    return payload


def _field(payload: Mapping[str, Any], key: str, kind: type[T], body: bytes) -> T:
    value = payload.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadResponse(f"the broker's answer has no {kind.__name__} {key!r}: {_snippet(body)}")
    return value


def _publication(item: object, what: str, body: bytes) -> Published:
    if not isinstance(item, dict):
        raise BadResponse(f"{what}: a result is not an object: {_snippet(body)}")
    return Published(channel=_field(item, "channel", str, body), offset=_field(item, "offset", int, body),
                     epoch=_field(item, "epoch", str, body))


def _chat_result(status: int, body: bytes) -> ChatResult:
    if status in (502, 504):
        try:
            failed = json.loads(body)
        except ValueError:
            failed = None
        if isinstance(failed, dict) and isinstance(failed.get("code"), str) \
                and isinstance(failed.get("channel"), str):
            raise AnswerFailed(status, str(failed.get("error")), code=failed["code"],
                               channel=failed["channel"], tokens=int(failed.get("tokens") or 0))
    payload = _payload(status, body, "POST /ai/chat")
    channel = _field(payload, "channel", str, body)
    if status == 202:
        return ChatResult(channel=channel, reason=None, tokens=None)
    return ChatResult(channel=channel, reason=_field(payload, "reason", str, body),
                      tokens=_field(payload, "tokens", int, body))


def _history_page(status: int, body: bytes) -> HistoryPage:
    payload = _payload(status, body, "GET /api/history")
    items = _field(payload, "publications", list, body)
    publications = []
    for item in items:
        if not isinstance(item, dict):
            raise BadResponse(f"GET /api/history: a publication is not an object: {_snippet(body)}")
        publications.append(HistoryEvent(offset=_field(item, "offset", int, body),
                                          event=_field(item, "event", str, body), data=item.get("data")))
    epoch = payload.get("epoch")
    return HistoryPage(channel=_field(payload, "channel", str, body),
                       epoch=epoch if isinstance(epoch, str) else None,
                       top=_field(payload, "top", int, body),
                       recovered=_field(payload, "recovered", bool, body),
                       more=_field(payload, "more", bool, body), next=_field(payload, "next", int, body),
                       publications=tuple(publications))


# -- transport -------------------------------------------------------------------------


def base_url(url: str) -> str:
    """The broker's HTTP base URL from ``http(s)://host:port[/prefix]`` or its ``ws(s)://…/ws`` URL.

    Raises:
        ValueError: anything else.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected the broker's URL, such as http://127.0.0.1:8765, got {url!r}")
    path = parts.path.rstrip("/")
    if parts.scheme in ("ws", "wss") and path.endswith("/ws"):
        path = path[:-3]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def client_options(url: str, *, api_key: str | None, timeout: float | None,
                   max_connections: int) -> dict[str, Any]:
    """Keyword arguments for ``httpx.Client`` and ``httpx.AsyncClient``.

    Idle connections are kept 5 s, less than the broker's default 10 s
    ``handshake_timeout`` after which it closes them, so a reused connection
    is one the broker still has.
    """
    headers = {"User-Agent": "tokenfan-publisher", "Accept": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": url, "headers": headers, "timeout": httpx.Timeout(timeout),
            "limits": httpx.Limits(max_connections=max_connections,
                                   max_keepalive_connections=max_connections, keepalive_expiry=5.0)}


def request_timeout(call: Call[Any], timeout: float | None) -> httpx.Timeout:
    return httpx.Timeout(timeout, read=None) if call.long else httpx.Timeout(timeout)


@contextmanager
def transport_errors(url: str) -> Iterator[None]:
    """Turn httpx's errors inside the block into the publisher's."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise BrokerTimedOut(url, f"timed out ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise BrokerUnreachable(url, str(exc) or type(exc).__name__) from exc
    except httpx.DecodingError as exc:
        raise BadResponse(f"the answer from {url} cannot be decoded: {exc}") from exc
