"""A Python client for the tokenfan protocol, on trio-websocket.

::

    async with connect("ws://127.0.0.1:8765/ws") as client:
        sub = await client.subscribe("ai-chat/42")
        async for event in sub:
            print(event.event, event.data)

or, like the browser API::

    chat = client.channel("ai-chat/42")
    chat.on("ai:token", lambda e: print(e.data["token"], end="")).on("ai:done", done)
    await chat.subscribe()

Authentication: on a broker with ``[auth]`` and a JWT key, pass
``token_provider``, an async function returning a user token (a JWT your
app's server mints, see ``docs/security.md``), or None for none::

    async def fresh_token() -> str:
        return await my_app.mint_token_for("alice")

    async with connect("wss://broker.example/ws", token_provider=fresh_token) as client:
        ...

It is called before every connection (the first and each reconnect), and its
token sent in ``hello`` as the connection's first frame; the client is
``open`` (and ``await``-ing commands go out) once the broker accepted it
(:attr:`Client.user`, :attr:`Client.exp`). Before the token expires (when
80% of its remaining lifetime has passed, at the latest a minute before
``exp``), the client calls it again and sends the fresh token in a new
``hello``, so the connection and its subscriptions live on. A refresh that
fails (the provider raised) is logged and tried again while the token lasts;
past ``exp`` the broker says ``bye`` TOKEN_EXPIRED (4104, ``reconnect:
true``) and the client reconnects with a new token and recovers. A token the
broker refuses, ``bye`` UNAUTHORIZED (4009, ``reconnect: false``), stops the
client: on the first connection :func:`connect` raises :class:`ServerClosed`
with that code; later the client goes to ``closed`` with
:attr:`Client.closed` saying why, and never reconnects. A plain ``str`` may be
given instead of a function: it is sent on every connection and never
refreshed. The provider is called before the WebSocket opens, so it may take
its time (an HTTP request to your app); one that raises fails that
connection attempt (raised from :func:`connect` the first time, retried with
backoff after).

Reconnection: when the connection drops, or the server says ``bye`` with
``reconnect: true`` (shutting down, slow consumer, idle), the client
reconnects with jittered exponential backoff and subscribes again to every
channel with ``since`` set to the last offset and epoch it saw, so the app
sees every publication exactly once. When the server cannot recover a
channel (its history no longer reaches back), the subscription's
:attr:`Subscription.recovered` is False, its ``on_subscribed`` callbacks are
told, and its iterator raises :class:`StreamLost` once before going on with
live events. ``connect(..., reconnect=False)`` turns all this off.

Errors: a command the server refuses raises :class:`CommandError` (``code``,
``msg``); a command whose connection ends before its reply raises
:class:`ServerClosed` (``code``, ``msg``, ``reconnect``), and so do iterators
once the client stops for good (``bye`` with ``reconnect: false``, or
reconnection turned off).

Backpressure: one task reads the socket and hands events to each
subscription's bounded queue; a subscription whose queue is full makes that
task wait, so a consumer that stops reading slows the whole connection until
the broker cuts it off as a slow consumer (and the client then reconnects
and recovers).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Self

import trio
import trio_websocket
import wsproto.utilities

import protocol as p
from broker.groups import first_leaf

Handler = Callable[["Event"], None]
State = Literal["connecting", "open", "reconnecting", "closed"]
#: Where user tokens come from: an async function returning one (or None for none), or a fixed token.
TokenProvider = Callable[[], Awaitable[str | None]] | str

log = logging.getLogger("tokenfan.client")

#: What the client calls itself in ``hello``.
CLIENT_NAME = "tokenfan-python/0.1.0"
#: Refresh the token once this share of its remaining lifetime has passed…
REFRESH_AT = 0.8
#: …but no earlier than this many seconds before it expires.
REFRESH_MARGIN = 60.0
#: The shortest wait before a refresh (a token that looks expired on this clock is not asked for in a loop).
MIN_REFRESH = 1.0


class ClientError(Exception):
    """Root of the client's errors."""


class CommandError(ClientError):
    """The server answered a command with ``err``."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(f"{msg} (code {code})")
        self.code = code
        self.msg = msg


class ServerClosed(ClientError):
    """The connection ended: the server said ``bye``, or the socket closed."""

    def __init__(self, code: int, msg: str, reconnect: bool) -> None:
        super().__init__(f"connection closed: {msg} (code {code}, reconnect={reconnect})")
        self.code = code
        self.msg = msg
        self.reconnect = reconnect


class StreamLost(ClientError):
    """After a reconnect, the server could not replay what this subscription missed."""

    def __init__(self, channel: str) -> None:
        super().__init__(f"publications of {channel} were missed during a reconnect and could not be "
                         "recovered; reload the state from elsewhere")
        self.channel = channel


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One publication received on a subscribed channel."""

    channel: str
    event: str
    data: Any
    offset: int
    first_offset: int  #: equal to ``offset`` unless the server merged several publications


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed:
    """What the server said to a (re)subscription."""

    channel: str
    offset: int  #: publications after this offset follow
    epoch: str
    recovered: bool  #: everything asked for with ``since`` is in what follows
    resubscribed: bool  #: True after a reconnect, False for the first subscription


_LOST = object()  # queued for an iterator: StreamLost


def _require_trio(entry_point: str) -> None:
    """Raise a RuntimeError that says what to do when called outside Trio (under asyncio, say).

    Without it, Trio fails deep inside with ``AttributeError: 'RunContext'
    object has no attribute 'runner'``.
    """
    if trio.lowlevel.in_trio_task():
        return
    try:
        asyncio.get_running_loop()
        running = "under asyncio"
    except RuntimeError:
        running = "outside trio.run()"
    raise RuntimeError(
        f"broker.client.{entry_point} runs on Trio, but was called {running}. From asyncio "
        "(FastAPI, Starlette, aiohttp, Django), publish with broker.publisher.AsyncPublisher over HTTP "
        "(see docs/publishing.md); to watch channels, run this client in a thread with trio.run(), "
        "or use any WebSocket client that speaks docs/protocol.md.")


def _sub_frame(channel: str, since: p.Position | None, frame_id: int) -> p.Sub:
    return p.Sub(id=frame_id, ch=channel, since=since)


def _hello_frame(token: str, frame_id: int) -> p.Hello:
    return p.Hello(id=frame_id, token=token, client=CLIENT_NAME)


def _refresh_delay(remaining: float) -> float:
    """Seconds until a token with ``remaining`` seconds to live is refreshed: once REFRESH_AT of
    them have passed, at the latest REFRESH_MARGIN before it expires, and not before MIN_REFRESH."""
    return max(MIN_REFRESH, remaining - min(remaining * (1 - REFRESH_AT), REFRESH_MARGIN))


class Subscription:
    """A channel this client subscribes to (or is about to). Iterate it, or register handlers."""

    def __init__(self, client: Client, channel: str, buffer: int) -> None:
        self.client = client
        self.channel = channel
        self.offset: int | None = None  #: offset of the last publication seen
        self.epoch: str | None = None
        self.recovered = False
        self.active = False
        self.missed: list[tuple[int, int]] = []  #: offset ranges the server dropped (``gap`` frames)
        self._handlers: dict[str, list[Handler]] = {}
        self._on_subscribed: list[Callable[[Subscribed], None]] = []
        self._queue = buffer > 0
        self._send, self._receive = trio.open_memory_channel[Any](max(buffer, 0))

    def on(self, event: str, handler: Handler) -> Self:
        """Call ``handler(Event)`` for each ``event`` (``"*"`` for every event). Chainable.

        Handlers run in the client's reader task: keep them quick and non-blocking.
        A subscription with handlers when it subscribes does not fill its iterator queue.
        """
        self._handlers.setdefault(event, []).append(handler)
        return self

    def on_subscribed(self, callback: Callable[[Subscribed], None]) -> Self:
        """Call ``callback(Subscribed)`` each time the server confirms this subscription. Chainable."""
        self._on_subscribed.append(callback)
        return self

    async def subscribe(self, *, since: p.Position | None = None) -> Self:
        """Subscribe; with ``since``, ask to recover what was published after it.

        ``since=Position(o=0)`` (no epoch) asks for the stream so far: whatever
        the channel's history holds, then live publications.

        Raises:
            CommandError: the server refused (bad name, limit, already subscribed).
            ServerClosed: the connection ended before the server answered.
        """
        if self._handlers:
            self._queue = False
        self.client._subscriptions[self.channel] = self
        try:
            await self.client.request(functools.partial(_sub_frame, self.channel, since),
                                      on_reply=self._confirmed)
        except BaseException:
            if not self.active:
                self.client._subscriptions.pop(self.channel, None)
            raise
        return self

    async def unsubscribe(self) -> None:
        """Stop receiving; iteration ends once the events already queued are read."""
        self.active = False  # not resubscribed if the connection drops meanwhile
        try:
            with contextlib.suppress(ServerClosed):  # gone with the connection anyway
                await self.client.request(lambda i: p.Unsub(id=i, ch=self.channel))
        finally:
            # Events that came before the ok are still queued for the iterator.
            self.client._subscriptions.pop(self.channel, None)
            self._send.close()

    def _confirmed(self, ok: p.Ok, *, resubscribed: bool = False) -> None:
        """Apply the ``ok`` of a ``sub``, in the reader task, before any event that follows it."""
        self.active = True
        self.offset, self.epoch, self.recovered = ok.o, ok.ep, bool(ok.recovered)
        status = Subscribed(channel=self.channel, offset=ok.o or 0, epoch=ok.ep or "",
                            recovered=self.recovered, resubscribed=resubscribed)
        if resubscribed and not self.recovered and self._queue:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._send.send_nowait(_LOST)
        for callback in self._on_subscribed:
            callback(status)

    def _deliver_nowait(self, event: Event) -> bool:
        """Run handlers; return True if the event still has to be queued."""
        self.offset = event.offset
        for key in (event.event, "*"):
            for handler in self._handlers.get(key, ()):
                handler(event)
        return self._queue

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            if self.client.closed is not None:
                raise self.client.closed from None
            raise StopAsyncIteration from None
        if item is _LOST:
            raise StreamLost(self.channel)
        assert isinstance(item, Event)
        return item


class Client:
    """A connection to a tokenfan broker that reconnects. Use :func:`connect` to make one."""

    def __init__(self, url: str, *, reconnect: bool, backoff: tuple[float, float],
                 max_message_size: int, connect_timeout: float,
                 on_state: Callable[[State, ServerClosed | None], None] | None = None,
                 token_provider: TokenProvider | None = None) -> None:
        self.url = url
        self._on_state = on_state
        self._token_provider = token_provider
        self.state: State = "connecting"
        self.closed: ServerClosed | None = None  #: why the client stopped for good
        self.reconnects = 0  #: connections made after the first
        self.user: str | None = None  #: the token's ``sub``, once the broker accepted a token
        self.exp: int | None = None  #: when the connection's token expires (Unix seconds)
        self._reconnect = reconnect
        self._backoff = backoff
        self._max_message_size = max_message_size
        self._connect_timeout = connect_timeout
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._open = trio.Event()
        self._scope = trio.CancelScope()  # the current connection's reader, or the backoff wait
        self._finished = trio.Event()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[p.Frame], Callable[[p.Ok], None] | None]] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._bye: ServerClosed | None = None

    def channel(self, name: str, *, buffer: int = 1024) -> Subscription:
        """A subscription to ``name`` that is not yet active: add handlers, then ``await .subscribe()``."""
        return Subscription(self, name, buffer)

    async def subscribe(self, channel: str, *, since: p.Position | None = None,
                        buffer: int = 1024) -> Subscription:
        """Subscribe to ``channel`` and return the subscription, ready to iterate."""
        return await Subscription(self, channel, buffer).subscribe(since=since)

    async def publish(self, channel: str, event: str, data: Any = None) -> tuple[int, str]:
        """Publish from the client (the channel must allow it); return ``(offset, epoch)``."""
        ok = await self.request(lambda i: p.Pub(id=i, ch=channel, ev=event, d=data))
        return ok.o or 0, ok.ep or ""

    async def ping(self) -> None:
        """Round trip an application-level ping."""
        await self.request(lambda i: p.Ping(id=i))

    async def hello(self, *, token: str | None = None, client: str | None = None) -> str | None:
        """Introduce this client; return the server's name.

        With ``token``, on a broker that authenticates, this extends the connection to the new
        token's ``exp`` (it must be for the same ``sub``). ``token_provider`` does this by itself.
        """
        ok = await self.request(lambda i: p.Hello(id=i, token=token, client=client),
                                on_reply=self._authenticated if token is not None else None)
        return ok.server

    async def request(self, build: Callable[[int], p.ClientFrame],
                      on_reply: Callable[[p.Ok], None] | None = None) -> p.Ok:
        """Send the command ``build(id)`` (once connected) and wait for its reply.

        ``on_reply`` runs in the reader task as soon as the ``ok`` arrives,
        before any frame after it is handled.

        Raises:
            CommandError: the reply was ``err``.
            ServerClosed: the client has stopped, or the connection ended before the reply.
        """
        while self._ws is None or not self._open.is_set():
            if self.closed is not None:
                raise self.closed
            await self._open.wait()
        return await self._call(self._ws, build, on_reply)

    async def _call(self, ws: trio_websocket.WebSocketConnection, build: Callable[[int], p.ClientFrame],
                    on_reply: Callable[[p.Ok], None] | None = None) -> p.Ok:
        """Send ``build(id)`` on ``ws`` (open, or still authenticating) and wait for its reply."""
        frame_id = next(self._ids)
        done = trio.Event()
        slot: list[p.Frame] = []
        self._waiting[frame_id] = (done, slot, on_reply)
        try:
            # If the send fails, the reader notices the closed connection and wakes us.
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(p.encode(build(frame_id)))
            await done.wait()
        finally:
            self._waiting.pop(frame_id, None)
        if not slot:
            raise self.closed or self._bye or ServerClosed(1006, "connection lost before the reply", True)
        reply = slot[0]
        if isinstance(reply, p.Err):
            raise CommandError(reply.code, reply.msg)
        assert isinstance(reply, p.Ok)
        return reply

    async def aclose(self) -> None:
        """Close the connection cleanly and stop reconnecting."""
        self._reconnect = False
        self.closed = self.closed or ServerClosed(1000, "client closed", False)
        for sub in self._subscriptions.values():
            sub._send.close()  # a reader blocked on a full queue must not hold up the close
        # Stop reading (or waiting to reconnect); open_websocket then closes the
        # WebSocket politely while trio-websocket's own reader still runs.
        self._scope.cancel()
        await self._finished.wait()

    # -- the connection loop --------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, read, and reconnect with backoff until told to stop. The first failure raises."""
        try:
            await self._connect_and_read(task_status)
        finally:
            self._finished.set()

    async def _connect_and_read(self, task_status: trio.TaskStatus[None]) -> None:
        attempt = 0
        started = False
        while True:
            failure: BaseException | None = None
            ended: ServerClosed | None = None
            token: str | None = None
            try:
                with trio.CancelScope() as self._scope:  # aclose() may cancel a slow provider
                    token = await self._fresh_token()
            except Exception as exc:
                if not started:
                    raise
                ended = ServerClosed(1006, f"token_provider failed: {exc!r}", True)
            else:
                if self.closed is not None:  # aclose() came while asking for the token
                    self._stop(self.closed)
                    return
                try:
                    async with open_websocket(self.url, max_message_size=self._max_message_size,
                                              connect_timeout=self._connect_timeout) as ws:
                        self._bye = None
                        self.user = self.exp = None  # until this connection's hello is answered
                        async with trio.open_nursery() as nursery:
                            self._scope = nursery.cancel_scope
                            if self.closed is not None:
                                self._scope.cancel()  # aclose() came while connecting
                            self._ws = ws
                            nursery.start_soon(self._read_then_stop, ws, nursery.cancel_scope)
                            if token is not None and not await self._authenticate(ws, token):
                                nursery.cancel_scope.cancel()  # refused: the bye (in _bye) says why
                            else:
                                if self.exp is None or self.exp > time.time():
                                    attempt = 0  # (a token accepted already expired is no success)
                                self._set_state("open")
                                self._open.set()
                                if self.exp is not None and callable(self._token_provider):
                                    nursery.start_soon(self._keep_token_fresh, ws)
                                if started:
                                    self.reconnects += 1
                                    nursery.start_soon(self._resubscribe)
                                else:
                                    started = True
                                    task_status.started()
                except* (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError,
                         trio.TooSlowError, wsproto.utilities.LocalProtocolError) as group:
                    # (trio-websocket answers a ping that arrives while it closes with a pong that
                    # wsproto refuses; that ends the connection like any other loss.)
                    failure = first_leaf(group)
                finally:
                    self._ws = None
                    self._open = trio.Event()
                    for done, _slot, _hook in self._waiting.values():
                        done.set()
                if failure is not None and not started:
                    raise failure
                ended = (ServerClosed(1006, f"cannot connect: {failure}", True) if failure is not None
                         else self._bye or ServerClosed(1006, "connection lost", True))
                if not started:
                    # The broker turned the first connection away before it was open (the token).
                    self._stop(self.closed or ended)
                    raise ended
            if not (self._reconnect and ended.reconnect):
                self._stop(self.closed or ended)
                return
            self._set_state("reconnecting", ended)
            low, high = self._backoff
            with trio.CancelScope() as self._scope:
                await trio.sleep(min(high, low * 2 ** attempt) * random.uniform(0.5, 1.0))
            if not self._reconnect:  # aclose() during the wait
                self._stop(self.closed or ended)
                return
            attempt += 1

    def _set_state(self, state: State, why: ServerClosed | None = None) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state, why)

    def _stop(self, why: ServerClosed) -> None:
        self.closed = why
        self._set_state("closed", why)
        self._open.set()  # wake requests waiting for a connection: they raise `closed`
        for sub in self._subscriptions.values():
            sub._send.close()

    async def _fresh_token(self) -> str | None:
        """What ``token_provider`` gives for the next connection (None: connect without one)."""
        provider = self._token_provider
        if provider is None or isinstance(provider, str):
            return provider
        token = await provider()
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token_provider must return a str or None, not {type(token).__name__}")
        return token

    def _authenticated(self, ok: p.Ok) -> None:
        """The broker accepted a token (the ``ok`` of ``hello``): who, and until when."""
        if ok.exp is not None:
            self.user, self.exp = ok.user, ok.exp

    async def _authenticate(self, ws: trio_websocket.WebSocketConnection, token: str) -> bool:
        """Send ``hello {token}`` as the first frame and wait for the broker's answer.

        False when it refused: by ``bye`` UNAUTHORIZED, or by ``err`` (a hello it could not
        read, such as a token too long for it), which is recorded in ``_bye`` as final too.
        """
        try:
            await self._call(ws, functools.partial(_hello_frame, token), on_reply=self._authenticated)
        except CommandError as exc:
            self._bye = ServerClosed(exc.code, f"the broker refused the token: {exc.msg}", False)
            return False
        except ServerClosed:
            return False
        return True

    async def _keep_token_fresh(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Before the token expires, send a fresh one from ``token_provider`` (for this connection)."""
        retry_at: float | None = None
        while self.exp is not None:
            now = time.time()
            if retry_at is None:
                retry_at = now + _refresh_delay(self.exp - now)
            await trio.sleep(retry_at - now)
            try:
                token = await self._fresh_token()
                if token is None:
                    return  # none to give: the broker ends the connection at exp
                await self._call(ws, functools.partial(_hello_frame, token), on_reply=self._authenticated)
                retry_at = None
            except ServerClosed:
                return  # the connection is ending; the next one asks for a token anyway
            except Exception as exc:
                # Try again while the token lasts; past exp the broker says TOKEN_EXPIRED and we reconnect.
                left = self.exp - time.time()
                log.warning("refreshing the token failed (%r); %s", exc,
                            f"trying again (it expires in {left:.1f} s)" if left > 0
                            else "the broker will say TOKEN_EXPIRED and the client reconnect")
                if left <= 0:
                    return
                retry_at = time.time() + max(MIN_REFRESH, left / 4)

    async def _resubscribe(self) -> None:
        """After a reconnect: subscribe again to every channel, recovering from the last position."""
        for sub in list(self._subscriptions.values()):
            if not sub.active:
                continue
            since = p.Position(o=sub.offset, ep=sub.epoch) if sub.offset is not None else None
            with contextlib.suppress(ServerClosed):  # the next connection tries again
                await self.request(functools.partial(_sub_frame, sub.channel, since),
                                   on_reply=functools.partial(sub._confirmed, resubscribed=True))

    async def _read_then_stop(self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
        """Read one connection until it closes, then end everything else working on it."""
        await self._read(ws)
        scope.cancel()

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Read one connection until it closes; record a ``bye`` in ``_bye``."""
        decoder = p.Decoder(peer=p.Peer.SERVER, limits=p.SERVER_LIMITS)
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str):
                    raise p.RemoteProtocolError("server sent a text message")
                decoder.feed(message)
                for frame in decoder:
                    await self._dispatch(frame)
                decoder.end_of_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            if self._bye is None:
                code = reason.code if reason is not None else 1006
                self._bye = ServerClosed(code, (reason.reason if reason else None) or "connection closed",
                                         code >= 4100 or code in (1001, 1006))
        except p.RemoteProtocolError as exc:
            self._bye = ServerClosed(exc.code, f"server broke the protocol: {exc.msg}", False)
            await ws.aclose(code=exc.code, reason=exc.msg[:100])

    async def _dispatch(self, frame: p.Frame) -> None:
        if isinstance(frame, p.Ev):
            sub = self._subscriptions.get(frame.ch)
            if sub is None or (sub.offset is not None and frame.o <= sub.offset):
                return  # not subscribed (any more), or already seen
            event = Event(channel=frame.ch, event=frame.ev, data=frame.d, offset=frame.o,
                          first_offset=frame.o if frame.o0 is None else frame.o0)
            if sub._deliver_nowait(event):
                with contextlib.suppress(trio.ClosedResourceError):  # unsubscribed meanwhile
                    await sub._send.send(event)
        elif isinstance(frame, (p.Ok, p.Err)):
            waiting = self._waiting.get(frame.id)
            if waiting is not None:
                done, slot, hook = waiting
                slot.append(frame)
                if hook is not None and isinstance(frame, p.Ok):
                    hook(frame)
                done.set()
        elif isinstance(frame, p.Gap):
            sub = self._subscriptions.get(frame.ch)
            if sub is not None:
                sub.missed.append((frame.o0, frame.o))
                sub.offset = frame.o
        elif isinstance(frame, p.Bye):
            self._bye = ServerClosed(frame.code, frame.msg, frame.reconnect)


@asynccontextmanager
async def open_websocket(url: str, *, max_message_size: int = p.SERVER_LIMITS.max_frame_size,
                         connect_timeout: float = 10.0) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A raw trio-websocket connection to ``ws://host:port/path`` whose TCP stream we own.

    trio-websocket's client leaves its socket open when the server closes
    first; owning the stream lets us always close it.
    """
    _require_trio("open_websocket")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"expected a ws:// URL such as ws://127.0.0.1:8765/ws, got {url!r}")
    port = parts.port or 80
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(parts.hostname, port)
        try:
            with trio.fail_after(connect_timeout):
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, f"{parts.hostname}:{port}", resource,
                    max_message_size=max_message_size)
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


@asynccontextmanager
async def connect(url: str, *, reconnect: bool = True, backoff: tuple[float, float] = (0.1, 5.0),
                  max_message_size: int = p.SERVER_LIMITS.max_frame_size,
                  connect_timeout: float = 10.0,
                  on_state: Callable[[State, ServerClosed | None], None] | None = None,
                  token_provider: TokenProvider | None = None,
                  ) -> AsyncIterator[Client]:
    """Connect to a broker's WebSocket endpoint (``ws://host:port/ws``) and yield a :class:`Client`.

    The first connection must succeed (its error is raised here). After that
    the client reconnects after a drop, waiting ``backoff[0]`` seconds, then
    twice as long each time up to ``backoff[1]``, each wait jittered down by
    up to half; ``reconnect=False`` stops at the first drop instead.
    ``on_state(state, why)`` is called when the state changes to ``open``,
    ``reconnecting`` (``why``: how the last connection ended) or ``closed``.

    ``token_provider`` (an async function returning a user token, or a
    token): on a broker that authenticates, called before every connection
    and again before the token expires; see "Authentication" in this module's
    docstring. Raises :class:`ServerClosed` (code 4009, UNAUTHORIZED) when the
    broker refuses the first connection's token.
    """
    _require_trio("connect")
    client = Client(url, reconnect=reconnect, backoff=backoff, max_message_size=max_message_size,
                    connect_timeout=connect_timeout, on_state=on_state, token_provider=token_provider)
    refused: Exception | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(client._run)
        except Exception as exc:
            refused = exc  # raised below as it is, not inside the nursery's ExceptionGroup
        else:
            try:
                yield client
            finally:
                # Close politely (the reader sees the close reply), then stop whatever is left.
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await client.aclose()
                nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused
