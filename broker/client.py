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

Errors: a command the server refuses raises :class:`CommandError` (``code``,
``msg``); when the server says ``bye`` or the connection drops, pending
commands and iterators raise :class:`ServerClosed` (``code``, ``msg``,
``reconnect``).

Backpressure: one task reads the socket and hands events to each
subscription's bounded queue; a subscription whose queue is full makes that
task wait, so a consumer that stops reading slows the whole connection until
the broker cuts it off as a slow consumer.
"""

from __future__ import annotations

import contextlib
import itertools
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self

import trio
import trio_websocket

import protocol as p

Handler = Callable[["Event"], None]


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One publication received on a subscribed channel."""

    channel: str
    event: str
    data: Any
    offset: int
    first_offset: int  #: equal to ``offset`` unless the server merged several publications


class Subscription:
    """A channel this client subscribes to (or is about to). Iterate it, or register handlers."""

    def __init__(self, client: Client, channel: str, buffer: int) -> None:
        self.client = client
        self.channel = channel
        self.offset: int | None = None  #: offset of the last publication seen
        self.epoch: str | None = None
        self.recovered = False
        self.active = False
        self._handlers: dict[str, list[Handler]] = {}
        self._queue = buffer > 0
        self._send, self._receive = trio.open_memory_channel[Event](max(buffer, 0))

    def on(self, event: str, handler: Handler) -> Self:
        """Call ``handler(Event)`` for each ``event`` (``"*"`` for every event). Chainable.

        Handlers run in the client's reader task: keep them quick and non-blocking.
        A subscription with handlers when it subscribes does not fill its iterator queue.
        """
        self._handlers.setdefault(event, []).append(handler)
        return self

    async def subscribe(self, *, since: p.Position | None = None) -> Self:
        """Subscribe; with ``since``, ask to recover what was published after it.

        Raises:
            CommandError: the server refused (bad name, limit, already subscribed).
        """
        if self._handlers:
            self._queue = False
        self.client._subscriptions[self.channel] = self
        try:
            ok = await self.client.request(lambda i: p.Sub(id=i, ch=self.channel, since=since))
        except BaseException:
            if not self.active:
                self.client._subscriptions.pop(self.channel, None)
            raise
        self.active = True
        self.offset, self.epoch, self.recovered = ok.o, ok.ep, bool(ok.recovered)
        return self

    async def unsubscribe(self) -> None:
        """Stop receiving; iteration ends once the events already queued are read."""
        await self.client.request(lambda i: p.Unsub(id=i, ch=self.channel))
        self.active = False
        self.client._subscriptions.pop(self.channel, None)
        self._send.close()

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
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.client.closed is not None:
                raise self.client.closed from None
            raise StopAsyncIteration from None


class Client:
    """A connection to a tokenfan broker. Use :func:`connect` to make one."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.closed: ServerClosed | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[p.Frame]]] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._decoder = p.Decoder(peer=p.Peer.SERVER, limits=p.SERVER_LIMITS)

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
        """Introduce this client; return the server's name."""
        ok = await self.request(lambda i: p.Hello(id=i, token=token, client=client))
        return ok.server

    async def request(self, build: Callable[[int], p.ClientFrame]) -> p.Ok:
        """Send the command ``build(id)`` and wait for its reply.

        Raises:
            CommandError: the reply was ``err``.
            ServerClosed: the connection ended first.
        """
        if self.closed is not None:
            raise self.closed
        frame_id = next(self._ids)
        done = trio.Event()
        slot: list[p.Frame] = []
        self._waiting[frame_id] = (done, slot)
        try:
            # If the send fails, the reader records why the connection closed and wakes us.
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await self.ws.send_message(p.encode(build(frame_id)))
            await done.wait()
        finally:
            self._waiting.pop(frame_id, None)
        if not slot:
            assert self.closed is not None
            raise self.closed
        reply = slot[0]
        if isinstance(reply, p.Err):
            raise CommandError(reply.code, reply.msg)
        assert isinstance(reply, p.Ok)
        return reply

    async def aclose(self) -> None:
        """Close the connection cleanly."""
        await self.ws.aclose()

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, str):
                    raise p.RemoteProtocolError("server sent a text message")
                self._decoder.feed(message)
                for frame in self._decoder:
                    await self._dispatch(frame)
                self._decoder.end_of_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            if self.closed is None:
                code = reason.code if reason is not None else 1006
                self.closed = ServerClosed(code, (reason.reason if reason else None) or "connection closed",
                                           code >= 4100 or code in (1001, 1006))
        except p.RemoteProtocolError as exc:
            self.closed = ServerClosed(exc.code, f"server broke the protocol: {exc.msg}", False)
            await self.ws.aclose(code=exc.code, reason=exc.msg[:100])
        finally:
            if self.closed is None:
                self.closed = ServerClosed(1006, "client closed", False)
            for done, _slot in self._waiting.values():
                done.set()
            for sub in self._subscriptions.values():
                sub._send.close()

    async def _dispatch(self, frame: p.Frame) -> None:
        if isinstance(frame, p.Ev):
            sub = self._subscriptions.get(frame.ch)
            if sub is None:
                return
            event = Event(channel=frame.ch, event=frame.ev, data=frame.d, offset=frame.o,
                          first_offset=frame.o if frame.o0 is None else frame.o0)
            if sub._deliver_nowait(event):
                with contextlib.suppress(trio.ClosedResourceError):  # unsubscribed meanwhile
                    await sub._send.send(event)
        elif isinstance(frame, (p.Ok, p.Err)):
            waiting = self._waiting.get(frame.id)
            if waiting is not None:
                waiting[1].append(frame)
                waiting[0].set()
        elif isinstance(frame, p.Bye):
            self.closed = ServerClosed(frame.code, frame.msg, frame.reconnect)


@asynccontextmanager
async def open_websocket(url: str, *, max_message_size: int = p.SERVER_LIMITS.max_frame_size,
                         connect_timeout: float = 10.0) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A raw trio-websocket connection to ``ws://host:port/path`` whose TCP stream we own.

    trio-websocket's client leaves its socket open when the server closes
    first; owning the stream lets us always close it.
    """
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
async def connect(url: str, *, max_message_size: int = p.SERVER_LIMITS.max_frame_size,
                  connect_timeout: float = 10.0) -> AsyncIterator[Client]:
    """Connect to a broker's WebSocket endpoint (``ws://host:port/ws``) and yield a :class:`Client`."""
    async with open_websocket(url, max_message_size=max_message_size,
                              connect_timeout=connect_timeout) as ws, trio.open_nursery() as nursery:
        client = Client(ws)
        nursery.start_soon(client._read)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
