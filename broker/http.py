"""The HTTP side of the broker's one port: the JSON API and the WebSocket upgrade.

Theory of operation
-------------------
:func:`serve_http` reads requests from one TCP connection with
:class:`~broker.httpwire.RequestReader` and answers them until the client
goes away, a request asks for ``/ws`` with ``Upgrade: websocket`` (then the
caller takes the connection over), or something is wrong enough to close.
Responses to pipelined requests are written together when the next read
would block, so a publisher that pipelines its emits costs one write per
batch of them.

Every request body is bounded by ``max_body_size`` (413), parsed by its
content type (JSON, or msgpack with ``application/msgpack``; 415 otherwise)
and validated in full before anything is emitted, so a bad event in a batch
emits nothing. Errors are JSON ``{"ok": false, "error": "..."}`` naming the
problem. An error in an API request leaves the connection usable; a request
that is not valid HTTP gets its answer and the connection is closed.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from broker import cors
from broker.ai.sessions import CHANNEL_PREFIX, ChatRejected, parse_chat_request, result_body
from broker.auth import APP, AuthError, Grants, bearer_credential
from broker.errors import EmitError, EngineUnavailable
from broker.history import Replay
from broker.httpwire import CONTINUE, HttpError, Request, RequestHead, RequestReader, response
from broker.hub import Publication
from broker.limits import client_address, limit_key
from broker.memory import MemoryBudget
from broker.sockio import receive_some
from broker.static import STATIC_FILES
from protocol import channel_problem, data_problem, event_problem, split_ws_frames
from protocol.limits import MAX_OFFSET

if TYPE_CHECKING:
    from broker.server import Broker

_MAX_HEAD = 16 * 1024


class ApiError(HttpError):
    """An API request failed; unlike other :class:`HttpError`, the connection stays usable."""


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A WebSocket upgrade request, handed to :mod:`broker.ws` with the bytes that followed it."""

    head: RequestHead
    trailing: bytes
    client: str  #: the client's address (from X-Forwarded-For when the peer is a trusted proxy)


@dataclass(frozen=True, slots=True)
class Call:
    """One API request, with who made it: the client's address and what its credential grants."""

    head: RequestHead
    body: bytes
    client: str
    grants: Grants


def json_body(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def error_response(status: int, message: str, *, headers: tuple[tuple[str, str], ...] = (),
                   close: bool = False) -> bytes:
    return response(status, json_body({"ok": False, "error": message}), headers=headers, close=close)


# -- request bodies ----------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ApiError(400, f"body is not valid JSON: {name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """Decode a JSON body strictly (no ``NaN``/``Infinity``), with every failure a 400 naming it.

    Python's own limits become answers here: a body nested beyond the
    interpreter's recursion limit, or an integer of more than 4,300 digits.
    """
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, "body is not valid JSON for this broker: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing a number of too many digits
        raise ApiError(400, f"body is not valid JSON: {str(exc)[:200]}") from None


def parse_body(head: RequestHead, body: bytes) -> Any:
    """Decode a request body by its Content-Type, which must be given.

    A body without one is refused (415) rather than read as JSON: a page on any
    site can send a "simple" cross-origin POST with no Content-Type and no
    preflight, but not one with ``application/json``.
    """
    if "content-type" not in head.headers:
        raise ApiError(415, "Content-Type is required: send application/json (or application/msgpack)")
    content_type = head.headers["content-type"].split(";")[0].strip().lower()
    if content_type in ("application/json", "text/json"):
        return parse_json(body)
    if content_type in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ApiError(400, f"body is not valid msgpack: {type(exc).__name__} {exc}".strip()) from None
    raise ApiError(415, f"unsupported Content-Type {content_type!r}; "
                   "send application/json or application/msgpack")


def refuse_when_short_of_memory(broker: Broker) -> None:
    """``503`` for a request that would build something large while the broker is over ``memory_limit``."""
    if broker.memory.over:
        raise ApiError(503, "the broker is near its memory_limit; retry later", (("Retry-After", "1"),))


def parse_event(broker: Broker, item: object, where: str) -> tuple[str, str, Any, bool | None]:
    """Validate one ``{"channel", "event", "data", "persist"?}`` object; return its parts."""
    if not isinstance(item, dict):
        raise ApiError(400, f"{where} must be an object with channel, event and data")
    for key in ("channel", "event"):
        if key not in item:
            raise ApiError(400, f"{where} is missing {key!r}")
    channel, event, data, persist = item["channel"], item["event"], item.get("data"), item.get("persist")
    problem = (channel_problem(channel) or event_problem(event) or data_problem(data, field="data")
               or broker.persist_problem(channel, persist))
    if problem is not None:
        raise ApiError(400, f"{where}: {problem}")
    return channel, event, data, persist


# -- routes -----------------------------------------------------------------------




Handler = Callable[["Broker", Call], bytes]


def _index(broker: Broker, call: Call) -> bytes:
    """The demo chat (broker/static/index.html), on the browser client, while ``demo`` is on."""
    if not broker.config.demo_enabled:
        raise ApiError(404, "the demo page is off (demo = false, the default once [auth] is configured)")
    body, content_type = STATIC_FILES["/index.html"]
    return response(200, body, content_type, headers=(("Cache-Control", "no-cache"),))


def _health(broker: Broker, call: Call) -> bytes:
    return response(200, json_body(broker.health()))


def _ws_without_upgrade(broker: Broker, call: Call) -> bytes:
    raise ApiError(426, "/ws speaks WebSocket only: send Upgrade: websocket", (("Upgrade", "websocket"),))


def _may_publish(broker: Broker, call: Call, channel: str, event: str, data: Any, persist: bool | None,
                 where: str) -> None:
    """403 unless the caller may publish ``event`` on ``channel``: an app may publish anything; a
    user what its token's ``publish`` grants and the channel's ``client_events`` allow, within
    the limits of a client's ``pub`` (``max_client_data``, ``client_publish_rate`` per user,
    and no ``persist``)."""
    grants = call.grants
    if grants.app:
        return
    size = len(msgpack.packb(data))
    if size > broker.config.max_client_data:
        raise ApiError(413, f"{where}: data is {size} bytes as msgpack; a user's limit is "
                            f"{broker.config.max_client_data} (max_client_data)")
    if persist is not None:
        raise ApiError(403, f"{where}: users may not set persist (the channel's options decide)")
    wait = broker.user_publish_rate.take(f"user:{grants.user}", trio.current_time())
    if wait > 0:
        retry = str(math.ceil(wait))
        raise ApiError(429, f"{where}: more than {broker.config.client_publish_rate:g} publications a "
                            f"second from this user (client_publish_rate); retry in {retry} s",
                       (("Retry-After", retry),))
    if not grants.may_publish(channel):
        raise ApiError(403, f"{where}: your token does not grant publishing on {channel} "
                            "(its publish claim)")
    if not broker.channel_options(channel).allows_client_event(event):
        raise ApiError(403, f"{where}: users may not publish {event} on {channel} "
                            "(the channel's client_events)")


def _emit_event(broker: Broker, call: Call) -> tuple[str, str, Any, bool | None]:
    channel, event, data, persist = parse_event(broker, parse_body(call.head, call.body), "body")
    _may_publish(broker, call, channel, event, data, persist, "body")
    return channel, event, data, persist


def _emitted(pub: Publication) -> bytes:
    return response(200, b'{"ok":true,"offset":%d,"epoch":%s}' % (pub.offset, json_body(pub.epoch)))


def _emitted_batch(pubs: list[Publication]) -> bytes:
    return response(200, json_body({"ok": True, "results": [
        {"channel": p.channel, "offset": p.offset, "epoch": p.epoch} for p in pubs]}))


def _emit(broker: Broker, call: Call) -> bytes:
    """``POST /api/emit`` on the memory engine: published at once, answered in the same step."""
    channel, event, data, persist = _emit_event(broker, call)
    try:
        pub = broker.publish_here(channel, event, data, persist=persist, validate=False)
    except EmitError as exc:
        raise ApiError(400, str(exc)) from None
    return _emitted(pub)


def _emit_batch(broker: Broker, call: Call) -> bytes:
    """``POST /api/emit/batch`` on the memory engine."""
    events = _batch_events(broker, call)
    # Validated in full first, so nothing below can fail half way.
    return _emitted_batch([broker.publish_here(channel, event, data, persist=persist, validate=False)
                           for channel, event, data, persist in events])


def _unavailable(exc: EngineUnavailable) -> ApiError:
    return ApiError(503, f"the engine cannot publish now ({exc}); retry later", (("Retry-After", "1"),))


async def _emit_remote(broker: Broker, call: Call) -> bytes:
    """``POST /api/emit`` on the Redis engine: answered once Redis has given the offset."""
    channel, event, data, persist = _emit_event(broker, call)
    try:
        return _emitted(await broker.publish(channel, event, data, persist=persist, validate=False))
    except EmitError as exc:
        raise ApiError(400, str(exc)) from None
    except EngineUnavailable as exc:
        raise _unavailable(exc) from None


async def _emit_batch_remote(broker: Broker, call: Call) -> bytes:
    """``POST /api/emit/batch`` on the Redis engine: every event in one round trip."""
    events = _batch_events(broker, call)
    try:
        return _emitted_batch(await broker.publish_batch(events))
    except EmitError as exc:
        raise ApiError(400, str(exc)) from None
    except EngineUnavailable as exc:
        raise _unavailable(exc) from None


def _batch_events(broker: Broker, call: Call) -> list[tuple[str, str, Any, bool | None]]:
    payload = parse_body(call.head, call.body)
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise ApiError(400, "body must be an object with a list 'events'")
    items = payload["events"]
    limit = broker.config.max_batch_events
    if len(items) > limit:
        raise ApiError(413, f"batch has {len(items)} events; the limit is {limit}")
    events = [parse_event(broker, item, f"events[{i}]") for i, item in enumerate(items)]
    for index, (channel, event, data, persist) in enumerate(events):
        _may_publish(broker, call, channel, event, data, persist, f"events[{index}]")
    return events


#: Most publications one ``GET /api/history`` returns, and the default.
HISTORY_PAGE_MAX, HISTORY_PAGE_DEFAULT = 10_000, 1000
#: Most frame bytes one history page holds (the JSON is about as big): a page is built in one
#: step (about 2.5 ms here) and held until sent, so it stays small; clients page with ``next``.
_HISTORY_PAGE_BYTES = 256 * 1024
#: A byte of history answered as JSON costs about this many bytes of replay (decoded, rebuilt as
#: JSON, encoded), in the ``history_read_rate`` both share.
_JSON_COST = 3


def _json_value(value: object) -> object:
    """msgpack bin has no JSON form: write it as ``{"$bin": "<hex>"}`` (as in the test vectors)."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _query(call: Call) -> dict[str, str]:
    parts = call.head.target.split("?", 1)
    try:
        pairs = urllib.parse.parse_qsl(parts[1] if len(parts) == 2 else "", strict_parsing=False,
                                       errors="strict", max_num_fields=20)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"bad query string: {exc}") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key in query:
            raise ApiError(400, f"query parameter {key!r} is given twice")
        query[key] = value
    return query


_DIGITS = re.compile(r"[0-9]{1,20}")


def _int_param(query: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    # ASCII digits only (str.isdigit() takes "²"), and few enough for int() to be cheap.
    if _DIGITS.fullmatch(raw) is None or not low <= int(raw) <= high:
        raise ApiError(400, f"{key} must be an integer from {low} to {high}, got {raw[:40]!r}")
    return int(raw)


async def _history(broker: Broker, call: Call) -> bytes:
    """``GET /api/history?channel=…&since=…&epoch=…&limit=…``: kept publications as JSON."""
    refuse_when_short_of_memory(broker)
    query = _query(call)
    unknown = set(query) - {"channel", "since", "epoch", "limit"}
    if unknown:
        raise ApiError(400, f"unknown query parameter(s) {', '.join(sorted(unknown))}; "
                            "known: channel, since, epoch, limit")
    channel = query.get("channel")
    if channel is None:
        raise ApiError(400, "channel is required, e.g. /api/history?channel=ai-chat/42")
    problem = channel_problem(channel)
    if problem is not None:
        raise ApiError(400, problem)
    if not call.grants.may_subscribe(channel):
        raise ApiError(403, f"your token does not grant {channel} (its channels claim)")
    since = _int_param(query, "since", 0, 0, MAX_OFFSET)
    limit = _int_param(query, "limit", HISTORY_PAGE_DEFAULT, 1, HISTORY_PAGE_MAX)
    epoch = query.get("epoch") or None
    return _history_page(broker, channel, await broker.read_history(
        channel, after=since, epoch=epoch, limit=limit, max_bytes=_HISTORY_PAGE_BYTES))


def _history_page(broker: Broker, channel: str, page: Replay) -> bytes:
    broker.history_reads.spend(_JSON_COST * sum(len(frame) for frame in page.frames))
    publications = []
    for frame in page.frames:
        _opcode, _start, payload, end = split_ws_frames(frame)[0]  # type: ignore[index]
        ev = msgpack.unpackb(frame[payload:end], raw=False)
        publications.append({"offset": ev["o"], "event": ev["ev"], "data": ev["d"]})
    body = {"ok": True, "channel": channel, "epoch": page.epoch or None, "top": page.top,
            "recovered": page.recovered, "more": page.more, "next": page.last,
            "publications": publications}
    return response(200, json.dumps(body, separators=(",", ":"), ensure_ascii=False,
                                    default=_json_value).encode())


ROUTES: dict[str, tuple[str, Handler]] = {
    "/": ("GET", _index),
    "/healthz": ("GET", _health),
    "/api/emit": ("POST", _emit),
    "/api/emit/batch": ("POST", _emit_batch),
    "/ws": ("GET", _ws_without_upgrade),
}


async def _history_in_turn(broker: Broker, call: Call) -> bytes:
    """``GET /api/history``, built when its turn at ``history_read_rate`` comes (shared with replays)."""
    try:
        if broker.redis is not None:  # a Redis read waits on the network: not while holding the turn
            async with broker.history_reads.turn():
                pass
            return await _history(broker, call)
        async with broker.history_reads.turn():
            return await _history(broker, call)
    except EngineUnavailable as exc:
        raise ApiError(503, f"history cannot be read now ({exc}); retry later",
                       (("Retry-After", "1"),)) from None


def _limit_ai_rate(broker: Broker, call: Call) -> None:
    """429 with ``Retry-After`` past ``ai_request_rate`` for this user (or, on an open broker, this
    address). An app's API key is not limited here: it speaks for many users."""
    if call.grants.app and broker.auth.required:
        return
    user = call.grants.user
    # Demo tokens are minted for anyone: a fresh one is no fresh bucket.
    keyed_by_user = user is not None and not user.startswith(DEMO_USER_PREFIX)
    key = f"user:{user}" if keyed_by_user else f"ip:{limit_key(call.client)}"
    wait = broker.ai_rate.take(key, trio.current_time())
    if wait > 0:
        retry = str(math.ceil(wait))
        raise ApiError(429, f"too many AI requests (ai_request_rate: {broker.config.ai_request_rate:g} a "
                            f"second, bursts of {broker.config.ai_request_burst}); retry in {retry} s",
                       (("Retry-After", retry),))


def _may_use_ai(call: Call, session_id: str) -> None:
    if not call.grants.may_use_ai(session_id):
        raise ApiError(403, f"your token does not grant AI session {session_id[:200]!r} (its ai claim)")


async def _ai_chat(broker: Broker, call: Call) -> bytes:
    """``POST /ai/chat``: stream an answer to ``ai-chat/{sessionId}``; answer when it ends (or 202)."""
    refuse_when_short_of_memory(broker)
    try:
        chat = parse_chat_request(parse_body(call.head, call.body))
        _may_use_ai(call, chat.session_id)
        if not call.grants.app and (chat.model is not None or chat.provider is not None):
            # The operator's budget: which model answers is the app's choice, not a user's.
            raise ApiError(403, "users may not choose the model or provider; the broker's are used "
                                "(an app's API key may)")
        _limit_ai_rate(broker, call)
        generation = await broker.ai.start(chat)
    except ChatRejected as exc:
        raise ApiError(exc.status, exc.message) from None
    if not chat.wait:
        return response(202, json_body({"ok": True, "channel": chat.channel, "status": "streaming"}))
    await generation.done.wait()
    assert generation.result is not None
    status, body = result_body(generation.result)
    return response(status, json_body(body))


async def _ai_cancel(broker: Broker, call: Call) -> bytes:
    """``POST /ai/cancel {"sessionId"}``: stop the session's answer; ``cancelled`` says if one ran."""
    payload = parse_body(call.head, call.body)
    session_id = payload.get("sessionId") if isinstance(payload, dict) else None
    if not isinstance(session_id, str) or not session_id:
        raise ApiError(400, 'body must be an object like {"sessionId": "..."}')
    _may_use_ai(call, session_id)
    _limit_ai_rate(broker, call)
    shared = broker.ai.shared
    if shared is None:
        return response(200, json_body({"ok": True, "cancelled": broker.ai.cancel(session_id)}))
    # On Redis the answer may run on any node: the stop is published on its channel, which
    # that node follows while it answers.
    try:
        running = await shared.answering(session_id)
        await broker.publish(CHANNEL_PREFIX + session_id, "ai:cancel", {}, validate=False)
    except EngineUnavailable as exc:
        raise _unavailable(exc) from None
    return response(200, json_body({"ok": True, "cancelled": running}))


#: Lifetime of the demo page's tokens; the page asks for a fresh one before it ends.
DEMO_TOKEN_TTL = 600.0
#: Session ids the demo mints tokens for (with ``[auth]``): never an app's own sessions.
DEMO_SESSION_PREFIX = "demo-"
#: The ``sub`` of the demo's tokens starts with this; they are rate-limited by address, not user.
DEMO_USER_PREFIX = "demo:"


async def _demo_token(broker: Broker, call: Call) -> bytes:
    """``POST /demo/token {"sessionId"}``: a short-lived user token for the demo page's session only
    (``ai-chat/<sessionId>``); ``token`` is null on a broker that needs none."""
    if not broker.config.demo_enabled:
        raise ApiError(404, "the demo is off (demo = false)")
    payload = parse_body(call.head, call.body)
    session_id = payload.get("sessionId") if isinstance(payload, dict) else None
    if not isinstance(session_id, str) or not session_id:
        raise ApiError(400, 'body must be an object like {"sessionId": "..."}')
    channel = CHANNEL_PREFIX + session_id
    problem = channel_problem(channel)
    if problem is not None:
        raise ApiError(400, f"sessionId makes a bad channel name: {problem}")
    if not broker.auth.users:
        return response(200, json_body({"ok": True, "token": None}))
    if not session_id.startswith(DEMO_SESSION_PREFIX):
        # Anyone who can load the page can ask: the demo's sessions are apart from the app's.
        raise ApiError(403, f"the demo mints tokens for {DEMO_SESSION_PREFIX}* sessions only")
    _limit_ai_rate(broker, Call(head=call.head, body=b"", client=call.client, grants=Grants(user=None)))
    token, exp = broker.auth.mint(user=f"{DEMO_USER_PREFIX}{session_id}", ttl=DEMO_TOKEN_TTL,
                                  channels=[channel], publish=[channel], ai=[session_id])
    return response(200, json_body({"ok": True, "token": token, "exp": exp}))


AsyncHandler = Callable[["Broker", Call], Awaitable[bytes]]

#: Routes whose answer may take a while: served with the request deadline lifted.
#: Routes that are answered at once on the memory engine (:data:`ROUTES`) but wait for Redis on it.
ENGINE_ROUTES: dict[str, tuple[str, AsyncHandler]] = {
    "/api/emit": ("POST", _emit_remote),
    "/api/emit/batch": ("POST", _emit_batch_remote),
}

ASYNC_ROUTES: dict[str, tuple[str, AsyncHandler]] = {
    "/api/history": ("GET", _history_in_turn),
    "/ai/chat": ("POST", _ai_chat),
    "/ai/cancel": ("POST", _ai_cancel),
    "/demo/token": ("POST", _demo_token),
}


def _methods(path: str) -> tuple[str, ...] | None:
    """The methods ``path`` accepts, or None when there is no such path."""
    if path in STATIC_FILES:
        return ("GET", "HEAD")
    table = ASYNC_ROUTES if path in ASYNC_ROUTES else ROUTES if path in ROUTES else None
    if table is None:
        return None
    allowed = table[path][0]
    return (allowed, "HEAD") if allowed == "GET" else (allowed,)


def _preflight(broker: Broker, head: RequestHead) -> bytes:
    """``OPTIONS``: a CORS preflight's answer (204), or 403 naming what is not allowed."""
    methods = _methods(head.path)
    if methods is None:
        raise ApiError(404, f"no such path {head.path[:200]!r}")
    headers = head.headers
    try:
        allow = cors.preflight_headers(headers.get("origin"), headers.get("access-control-request-method"),
                                       headers.get("access-control-request-headers"), methods,
                                       public=head.path in STATIC_FILES,
                                       allowed=broker.config.auth.allowed_origins)
    except cors.PreflightRefused as exc:
        raise ApiError(403, str(exc)) from None
    return response(204, b"", headers=allow)


def _with_cors(broker: Broker, head: RequestHead, reply: bytes) -> bytes:
    """``reply`` with the CORS headers its request's ``Origin`` earns (unchanged without one)."""
    origin = head.headers.get("origin")
    if origin is None or head.method == "OPTIONS":
        return reply
    extra = cors.response_headers(origin, public=head.path in STATIC_FILES,
                                  allowed=broker.config.auth.allowed_origins)
    if not extra:
        return reply
    status_line_end = reply.index(b"\r\n") + 2
    lines = "".join(f"{name}: {value}\r\n" for name, value in extra).encode("latin-1")
    return reply[:status_line_end] + lines + reply[status_line_end:]


def _accepts(allowed: str, method: str) -> bool:
    """Whether a route for ``allowed`` serves ``method`` (HEAD is served wherever GET is)."""
    return method == allowed or (method == "HEAD" and allowed == "GET")


def route(broker: Broker, call: Call) -> bytes:
    """The complete response to one API request (the preflight and the async routes aside)."""
    head = call.head
    path = head.path
    if head.method == "OPTIONS":
        return _preflight(broker, head)
    if path == "/index.html" and not broker.config.demo_enabled:
        return _index(broker, call)  # 404, saying why
    if path in ASYNC_ROUTES:
        allowed = ASYNC_ROUTES[path][0]
        raise ApiError(405, f"{path} accepts {allowed}, not {head.method}", (("Allow", allowed),))
    if path in STATIC_FILES:
        if head.method not in ("GET", "HEAD"):
            raise ApiError(405, f"{path} accepts GET, not {head.method}", (("Allow", "GET"),))
        body, content_type = STATIC_FILES[path]
        reply = response(200, body, content_type, headers=(("Cache-Control", "no-cache"),))
        return reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" if head.method == "HEAD" else reply
    if path not in ROUTES:
        raise ApiError(404, f"no such path {path[:200]!r}")
    allowed, handler = ROUTES[path]
    if not _accepts(allowed, head.method):
        raise ApiError(405, f"{path} accepts {allowed}, not {head.method}", (("Allow", allowed),))
    reply = handler(broker, call)
    if head.method == "HEAD":
        reply = reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return reply


# -- the connection loop -------------------------------------------------------------


#: Answers queued on one connection past which it is sent before the next request is read.
_MAX_QUEUED = 64 * 1024


class _Connection:
    """Reads requests from one socket and queues the responses, written before each blocking read.

    Answers to pipelined requests are joined into one write, but at most
    :data:`_MAX_QUEUED` bytes of them: past that they are sent before the next
    request is even parsed, so a client that pipelines requests and never reads
    holds at most one answer's worth of the broker's memory (and is cut by the
    request deadline while its answer does not drain).
    """

    def __init__(self, stream: trio.SocketStream, max_body: int, memory: MemoryBudget) -> None:
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.reader = RequestReader(max_head=_MAX_HEAD, max_body=max_body)
        self.out: list[bytes] = []
        self.queued = 0
        self.memory = memory
        self.charged = 0  # bytes of requests being read, as charged to the memory budget

    def charge(self) -> None:
        """Tell the memory budget how much of the client's requests this connection holds now."""
        held = self.reader.held
        self.memory.change(held - self.charged)
        self.charged = held

    def answer(self, reply: bytes) -> None:
        self.out.append(reply)
        self.queued += len(reply)
        self.memory.change(len(reply))

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            try:
                await self.stream.send_all(data)
            finally:
                self.memory.change(-self.queued)
                self.queued = 0

    async def next_request(self) -> Request | None:
        """The next request, or None when the client closed the connection between requests."""
        reader = self.reader
        while True:
            request = reader.next_request()
            if request is not None:
                self.charge()
                return request
            if reader.expects_continue:
                self.answer(CONTINUE)
                reader.continue_sent()
            await self.flush()
            data = await receive_some(self.fd)
            if not data:
                if reader.idle:
                    return None
                raise HttpError(400, "connection closed in the middle of a request")
            reader.feed(data)
            self.charge()


async def serve_http(broker: Broker, stream: trio.SocketStream, peer: str) -> Upgrade | None:
    """Answer HTTP requests on ``stream`` from address ``peer``; return the WebSocket upgrade
    request if one comes."""
    config = broker.config
    conn = _Connection(stream, config.max_body_size, broker.memory)
    try:
        try:
            upgrade = await _serve(broker, conn, peer)
        except HttpError as exc:
            conn.answer(error_response(exc.status, exc.message, close=True))
            upgrade = None
        # Whatever is still queued goes out before the connection is handed over or closed.
        with trio.move_on_after(config.shutdown_timeout):
            await conn.flush()
        return upgrade
    finally:
        # However it ended: what the reader held and the answers never sent leave the budget.
        broker.memory.change(-conn.charged - conn.queued)


#: Paths that need a credential (an API key or a user token) on a broker with ``[auth]``.
_GUARDED_PREFIXES = ("/api/", "/ai/")


def _grants(broker: Broker, head: RequestHead) -> Grants:
    """What the request's ``Authorization: Bearer`` credential grants; 401 without a good one."""
    if not broker.auth.required or not head.path.startswith(_GUARDED_PREFIXES) or head.method == "OPTIONS":
        return APP
    credential = bearer_credential(head.headers.get("authorization"))
    if credential is None:
        broker.auth_refused += 1
        raise ApiError(401, "this broker needs a credential: send Authorization: Bearer <API key or "
                            "user token>", (("WWW-Authenticate", 'Bearer realm="tokenfan"'),))
    try:
        return broker.auth.bearer(credential)
    except AuthError as exc:
        broker.auth_refused += 1
        # Header values are latin-1 at most: keep the description to printable ASCII.
        description = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in exc.reason)[:200]
        raise ApiError(401, f"bad credential: {exc.reason}", (
            ("WWW-Authenticate", f'Bearer realm="tokenfan", error="invalid_token", '
                                 f'error_description="{description}"'),)) from None


async def _serve(broker: Broker, conn: _Connection, peer: str) -> Upgrade | None:
    timeout = broker.config.handshake_timeout
    # One cancel scope for the connection, its deadline moved at the start of each
    # request: a whole request, head and body, must arrive within the handshake
    # timeout (and its answer must drain by then too), and an idle keep-alive
    # connection is closed after it. (A scope per request cost a quarter of the CPU
    # of a pipelined emit; moving the deadline costs little.)
    with trio.CancelScope() as deadline:
        while True:
            deadline.deadline = trio.current_time() + timeout
            request = await conn.next_request()
            if request is None:
                return None
            head = request.head
            client = client_address(peer, head.headers.get("x-forwarded-for"), broker.trusted_proxies)
            host = head.headers.get("host")
            problem = broker.hosts.problem(host, http10=head.http10)
            if problem is not None:
                raise HttpError(400 if host is None else 421, problem)
            if head.is_websocket_upgrade:
                origin = head.headers.get("origin")
                allowed = broker.config.auth.allowed_origins
                if origin is not None and not (cors.origin_allowed(origin, allowed)
                                               or cors.same_origin(origin, head.headers.get("host"))):
                    # Browsers send Origin and nothing else stops a page on any site from
                    # opening a WebSocket here; other clients send none.
                    listed = ", ".join(allowed)[:200] if allowed else "loopback origins"
                    raise HttpError(403, f"WebSocket connections from origin {origin[:100]!r} are not "
                                         f"allowed (allowed_origins: {listed}, and the broker's own)")
                if head.path != "/ws":
                    raise HttpError(404, f"WebSocket endpoint is /ws, not {head.path[:200]!r}")
                if request.body:
                    raise HttpError(400, "a WebSocket upgrade request must not have a body")
                await conn.flush()
                return Upgrade(head, conn.reader.buffered, client)
            try:
                call = Call(head=head, body=request.body, client=client, grants=_grants(broker, head))
                waits = ENGINE_ROUTES if broker.redis is not None else {}
                if head.path not in waits:
                    waits = ASYNC_ROUTES
                if head.path in waits and _accepts(waits[head.path][0], head.method):
                    await conn.flush()  # earlier pipelined answers first
                    deadline.deadline = math.inf  # the handler bounds itself (e.g. ai_time_limit)
                    try:
                        reply = await waits[head.path][1](broker, call)
                    finally:
                        deadline.deadline = trio.current_time() + timeout
                    if head.method == "HEAD":
                        reply = reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                else:
                    reply = route(broker, call)
            except ApiError as exc:
                reply = error_response(exc.status, exc.message, headers=exc.headers)
            conn.answer(_with_cors(broker, head, reply))
            if not head.keep_alive:
                return None
            if conn.queued > _MAX_QUEUED:
                await conn.flush()
    # Only the deadline gets here.
    if not conn.reader.idle:
        conn.answer(error_response(408, "request took too long to arrive", close=True))
    return None
