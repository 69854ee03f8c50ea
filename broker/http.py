"""The HTTP side of the broker's one port, on h11: the JSON API and the WebSocket upgrade.

Theory of operation
-------------------
:func:`serve_http` reads requests from one TCP connection with h11 and
answers them until the client goes away, a request asks for ``/ws`` with
``Upgrade: websocket``, or something is wrong enough to close. Responses to
pipelined requests are written together when the next read would block.

Every request body is bounded by ``max_body_size`` (413), parsed by its
content type (JSON, or msgpack with ``application/msgpack``; 415 otherwise)
and validated in full before anything is emitted, so a bad event in a batch
emits nothing. Errors are JSON ``{"ok": false, "error": "..."}`` naming the
problem.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
import msgpack
import trio

from broker.sockio import receive_some
from protocol import LocalProtocolError, channel_problem, data_problem, event_problem

if TYPE_CHECKING:
    from broker.server import Broker

log = logging.getLogger("tokenfan.http")

_MAX_HEAD = 16 * 1024


class HttpError(Exception):
    """A request failed with ``status``; ``message`` says why in words a user can act on."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []
        self.close = close


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A WebSocket upgrade request, handed to :mod:`broker.ws` with the bytes that followed it."""

    request: h11.Request
    trailing: bytes


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> _Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return _Response(status, body, "application/json", tuple(headers or ()))


# -- request parsing ------------------------------------------------------------


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def parse_body(request: h11.Request, body: bytes) -> Any:
    """Decode a request body by its Content-Type (JSON when absent)."""
    content_type = (_header(request, b"content-type") or "application/json").split(";")[0].strip().lower()
    if content_type in ("application/json", "text/json"):
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"body is not valid JSON: {exc}") from None
    if content_type in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise HttpError(400, f"body is not valid msgpack: {type(exc).__name__} {exc}".strip()) from None
    raise HttpError(415, f"unsupported Content-Type {content_type!r}; "
                    "send application/json or application/msgpack")


def parse_event(item: object, where: str) -> tuple[str, str, Any]:
    """Validate one ``{"channel", "event", "data"}`` object; return its parts."""
    if not isinstance(item, dict):
        raise HttpError(400, f"{where} must be an object with channel, event and data")
    for key in ("channel", "event"):
        if key not in item:
            raise HttpError(400, f"{where} is missing {key!r}")
    channel, event, data = item["channel"], item["event"], item.get("data")
    problem = channel_problem(channel) or event_problem(event) or data_problem(data)
    if problem is not None:
        raise HttpError(400, f"{where}: {problem}")
    return channel, event, data


# -- routes -----------------------------------------------------------------------


_INDEX = b"""<!doctype html><meta charset="utf-8"><title>tokenfan</title>
<h1>tokenfan is running</h1>
<p>WebSocket: <code>/ws</code> &middot; emit: <code>POST /api/emit</code> &middot;
health: <a href="/healthz"><code>GET /healthz</code></a></p>
<p>Try: <code>tokenfan tail --url ws://HOST:PORT/ws demo</code> in one terminal and
<code>tokenfan emit --url http://HOST:PORT demo ai:token '{"token": "hi"}'</code> in another.</p>
"""


def _route(broker: Broker, request: h11.Request, body: bytes) -> _Response:
    path = request.target.split(b"?", 1)[0].decode("latin-1")
    method = request.method.decode("latin-1")
    routes: dict[str, tuple[str, Callable[[], _Response]]] = {
        "/": ("GET", lambda: _Response(200, _INDEX, "text/html; charset=utf-8")),
        "/healthz": ("GET", lambda: json_response(200, broker.health())),
        "/api/emit": ("POST", lambda: _emit(broker, request, body)),
        "/api/emit/batch": ("POST", lambda: _emit_batch(broker, request, body)),
        "/ws": ("GET", lambda: json_response(426, {"ok": False, "error": "/ws speaks WebSocket only: "
                                                   "send Upgrade: websocket"}, [("Upgrade", "websocket")])),
    }
    if path not in routes:
        raise HttpError(404, f"no such path {path[:200]!r}")
    allowed, handler = routes[path]
    if method != allowed and not (method == "HEAD" and allowed == "GET"):
        raise HttpError(405, f"{path} accepts {allowed}, not {method}", [("Allow", allowed)])
    return handler()


def _emit(broker: Broker, request: h11.Request, body: bytes) -> _Response:
    channel, event, data = parse_event(parse_body(request, body), "body")
    try:
        pub = broker.publish(channel, event, data)
    except LocalProtocolError as exc:
        raise HttpError(400, str(exc)) from None
    return json_response(200, {"ok": True, "offset": pub.offset, "epoch": pub.epoch})


def _emit_batch(broker: Broker, request: h11.Request, body: bytes) -> _Response:
    payload = parse_body(request, body)
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise HttpError(400, "body must be an object with a list 'events'")
    items = payload["events"]
    limit = broker.config.max_batch_events
    if len(items) > limit:
        raise HttpError(413, f"batch has {len(items)} events; the limit is {limit}")
    events = [parse_event(item, f"events[{i}]") for i, item in enumerate(items)]
    # Validated in full above; only an unencodable value could fail now, and
    # parse_event's data_problem already rules those out.
    pubs = [broker.publish(channel, event, data) for channel, event, data in events]
    return json_response(200, {"ok": True, "results": [
        {"channel": p.channel, "offset": p.offset, "epoch": p.epoch} for p in pubs]})


# -- the connection loop -------------------------------------------------------------


class _Reader:
    """Reads one request (head and bounded body) at a time from an h11 connection."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, max_body: int) -> None:
        self.stream = stream
        self.conn = conn
        self.max_body = max_body
        self.out: list[bytes] = []  # responses waiting to be written

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            await self.stream.send_all(data)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self.flush()
            data = await receive_some(self.stream.socket.fileno())
            self.conn.receive_data(data)

    async def read_body(self, request: h11.Request) -> bytes:
        length = _header(request, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise HttpError(413, f"body of {length} bytes is over the {self.max_body}-byte limit",
                            close=True)
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:
                    raise HttpError(413, f"body is over the {self.max_body}-byte limit", close=True)
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:  # pragma: no cover - h11 yields only Data then EndOfMessage here
                raise HttpError(400, "unexpected HTTP event in body", close=True)

    def respond(self, response: _Response, *, head_only: bool = False) -> None:
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))), *response.headers]
        self.out.append(self.conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        if not head_only:
            self.out.append(self.conn.send(h11.Data(data=response.body)) or b"")
        self.out.append(self.conn.send(h11.EndOfMessage()) or b"")


def _is_upgrade(request: h11.Request) -> bool:
    upgrade = (_header(request, b"upgrade") or "").lower()
    return "websocket" in upgrade


async def serve_http(broker: Broker, stream: trio.SocketStream) -> Upgrade | None:
    """Answer HTTP requests on ``stream``; return the WebSocket upgrade request if one comes."""
    config = broker.config
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
    reader = _Reader(stream, conn, config.max_body_size)
    while True:
        request: h11.Request | None = None
        try:
            # The whole request, head and body, must arrive within the handshake timeout.
            with trio.fail_after(config.handshake_timeout):
                event = await reader.next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return None
                assert isinstance(event, h11.Request)
                request = event
                if _is_upgrade(request):
                    path = request.target.split(b"?", 1)[0]
                    if path != b"/ws":
                        raise HttpError(404, f"WebSocket endpoint is /ws, not {path.decode('latin-1')!r}",
                                        close=True)
                    # h11 pauses after an upgrade request; its body is empty by the spec.
                    event = await reader.next_event()
                    if isinstance(event, h11.EndOfMessage):
                        await reader.flush()
                        return Upgrade(request, conn.trailing_data[0])
                    raise HttpError(400, "a WebSocket upgrade request must not have a body", close=True)
                body = await reader.read_body(request)
            response = _route(broker, request, body)
            reader.respond(response, head_only=request.method == b"HEAD")
        except HttpError as exc:
            if not await _send_error(reader, exc):
                return None
            if exc.close:
                await reader.flush()
                return None
        except h11.RemoteProtocolError as exc:
            await _send_error(reader, HttpError(exc.error_status_hint, f"bad HTTP request: {exc}",
                                                close=True))
            await reader.flush()
            return None
        except trio.TooSlowError:
            if request is not None or conn.their_state is not h11.IDLE:
                await _send_error(reader, HttpError(408, "request took too long to arrive", close=True))
                await reader.flush()
            return None
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await reader.flush()
            return None
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            await reader.flush()
            return None


async def _send_error(reader: _Reader, exc: HttpError) -> bool:
    """Queue a JSON error response if the state machine allows one; say whether it did."""
    if reader.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return False
    headers = list(exc.headers)
    if exc.close:
        headers.append(("Connection", "close"))
    try:
        reader.respond(json_response(exc.status, {"ok": False, "error": exc.message}, headers))
    except h11.LocalProtocolError:
        return False
    return True
