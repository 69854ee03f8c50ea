"""A thin Redis client on Trio: RESP over a socket, parsed by hiredis, commands pipelined.

Theory of operation
-------------------
redis-py is asyncio-only and coredis, which runs on Trio through anyio,
publishes about 20 times slower than this machine's Redis can take (DESIGN.md
§5), so the broker speaks RESP itself. It writes commands (RESP arrays of bulk
strings, built here: there is nothing to parse in them) and leaves reading
replies to ``hiredis.Reader``, the C parser every Redis client for Python
uses. Nothing here parses RESP by hand.

:class:`RedisConnection` is one connection. A caller sends one or several
commands in one write (:meth:`RedisConnection.execute` and
:meth:`RedisConnection.pipeline`), under a lock so that writes never
interleave; the connection's reader task matches replies to callers in the
order the commands were written, which is the order Redis answers in. A caller
that is cancelled while it waits leaves its slot in that order, so the reply
meant for it is read and dropped, never handed to the next caller.

:class:`PubSub` is a connection in subscriber mode: its reader hands each
message to a callback, synchronously and in the order Redis sent them, and
its :meth:`PubSub.subscribe` returns once Redis has confirmed, so the caller
knows that every message published afterwards will reach it.

Whatever goes wrong with the socket or a reply ends the connection: every
waiting caller, and every later one, gets :class:`RedisUnavailable`. Whoever
owns the connection opens a new one (the engine does, with backoff).
"""

from __future__ import annotations

import math
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import trio

#: Default Redis port.
DEFAULT_PORT = 6379
#: How long connecting (and authenticating) may take.
CONNECT_TIMEOUT = 5.0
#: Longest a write may take (it cannot be cancelled: a command cut short would corrupt the stream).
WRITE_TIMEOUT = 5.0
#: Most bytes read from the socket at once.
_READ_SIZE = 256 * 1024

Arg = bytes | str | int | float
Reply = Any  # bytes, int, None, a list of replies, or a RedisError in a pipeline's answer


class RedisError(Exception):
    """Redis answered a command with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


class RedisUnavailable(ConnectionError):
    """The connection to Redis failed or was lost; nothing more will be answered on it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisAddress:
    """Where Redis is and how to log in, read from a ``redis://`` or ``rediss://`` URL."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Read ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).

        Raises:
            ValueError: the URL is not one of those; the message says what is wrong
                (and never repeats the password).
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("a Redis engine URL starts with redis:// or rediss:// "
                             f"(got {parts.scheme + '://' if parts.scheme else 'no scheme'})")
        if not parts.hostname:
            raise ValueError("a Redis engine URL needs a host, as in redis://127.0.0.1:6379/0")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("the port of a Redis engine URL must be a number from 1 to 65535") from None
        path = parts.path.strip("/")
        if path and not (path.isascii() and path.isdigit()):
            raise ValueError(f"the database of a Redis engine URL is a number, as in /0 (got /{path})")
        if parts.query or parts.fragment:
            raise ValueError("a Redis engine URL takes no query or fragment")
        return cls(host=parts.hostname, port=port, db=int(path or 0),
                   username=urllib.parse.unquote(parts.username) if parts.username else None,
                   password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
                   tls=parts.scheme == "rediss")

    def __str__(self) -> str:
        """The URL without its credentials (for logs and errors)."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("Redis has no booleans: send 0 or 1")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            if not math.isfinite(arg):
                raise ValueError(f"cannot send {arg} to Redis")
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send a {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


class _Waiter:
    """One caller's place in the reply order: how many replies it wants, and those read so far."""

    __slots__ = ("done", "replies", "wanted")

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.replies: list[Reply] = []
        self.done = trio.Event()


async def _open_stream(address: RedisAddress) -> trio.abc.Stream:
    stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
    if address.tls:
        context = ssl.create_default_context()
        tls = trio.SSLStream(stream, context, server_hostname=address.host)
        await tls.do_handshake()
        stream = tls
    return stream


class Pending:
    """Replies on their way (see :meth:`RedisConnection.send`)."""

    def __init__(self, connection: RedisConnection, waiter: _Waiter) -> None:
        self._connection = connection
        self._waiter = waiter

    async def replies(self) -> list[Reply]:
        """The replies, in the order of the commands (a refused one's is a :class:`RedisError`).

        Raises:
            RedisUnavailable: the connection was lost before all came.
        """
        waiter = self._waiter
        await waiter.done.wait()
        broken = self._connection._broken
        if broken is not None and len(waiter.replies) < waiter.wanted:
            raise broken
        return waiter.replies


class RedisConnection:
    """One Redis connection for commands. Open it with :func:`open_connection`."""

    def __init__(self, stream: trio.abc.Stream, address: RedisAddress) -> None:
        self.address = address
        self._stream = stream
        self._reader = hiredis.Reader(replyError=RedisError)
        self._send_lock = trio.Lock()
        self._waiting: deque[_Waiter] = deque()
        self._broken: RedisUnavailable | None = None
        self.lost = trio.Event()  #: set when the connection ends, for whatever reason
        self.on_break: Callable[[], None] | None = None  #: called (synchronously) when it ends

    @property
    def broken(self) -> bool:
        return self._broken is not None

    async def execute(self, *args: Arg) -> Reply:
        """Send one command and return its reply.

        Raises:
            RedisError: Redis answered with an error.
            RedisUnavailable: the connection is lost.
        """
        [reply] = await self.pipeline([args])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def send(self, commands: Sequence[Sequence[Arg]]) -> Pending:
        """Send ``commands`` in one write and return at once; await the replies with
        :meth:`Pending.replies`. Writes keep their order, so several may be in flight.

        Raises:
            RedisUnavailable: the connection is lost.
        """
        return await self.send_encoded(b"".join(encode_command(command) for command in commands),
                                       len(commands))

    async def send_encoded(self, data: bytes, count: int) -> Pending:
        """Like :meth:`send`, for ``count`` commands already encoded (:func:`encode_command`)."""
        waiter = _Waiter(count)
        await self._send(data, waiter)
        return Pending(self, waiter)

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Send ``commands`` in one write; return their replies in order.

        A command Redis refused has a :class:`RedisError` as its reply (the
        others still ran: Redis has no rollback).

        Raises:
            RedisUnavailable: the connection is lost.
        """
        if not commands:
            return []
        data = b"".join(encode_command(command) for command in commands)
        waiter = _Waiter(len(commands))
        await self._send(data, waiter)
        await waiter.done.wait()
        if self._broken is not None and len(waiter.replies) < waiter.wanted:
            raise self._broken
        return waiter.replies

    async def _send(self, data: bytes, waiter: _Waiter | None,
                    before: Callable[[], None] | None = None) -> None:
        """Write ``data`` whole, in turn with other writers; ``waiter`` (if any) takes its place
        in the reply order, and ``before`` runs just before the write (both only if it happens).

        Waiting for the turn may be cancelled (nothing is written); the write itself is not (a
        command cut short would leave Redis a partial one): it is bounded by :data:`WRITE_TIMEOUT`.
        """
        if self._broken is not None:
            raise self._broken
        async with self._send_lock:
            if self._broken is not None:
                raise self._broken
            if waiter is not None:
                self._waiting.append(waiter)
            if before is not None:
                before()
            error: RedisUnavailable | None = None
            with trio.CancelScope(shield=True), trio.move_on_after(WRITE_TIMEOUT) as scope:
                try:
                    await self._stream.send_all(data)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    error = RedisUnavailable(f"writing to Redis at {self.address} failed: {exc!r}")
            if scope.cancelled_caught:
                error = RedisUnavailable(f"writing to Redis at {self.address} took over {WRITE_TIMEOUT} s")
            if error is not None:
                self._break(error)
                raise error

    async def run_reader(self, handle: Callable[[Reply], None] | None = None) -> None:
        """Read replies and hand each to ``handle`` (by default, to its caller) until the connection ends.

        ``handle`` raises :class:`RedisUnavailable` for a reply that cannot be right: that ends it.
        """
        handle = handle or self._hand_over
        try:
            while True:
                data = await self._stream.receive_some(_READ_SIZE)
                if not data:
                    raise RedisUnavailable(f"Redis at {self.address} closed the connection")
                self._reader.feed(cast(bytes, data))
                while (reply := self._reader.gets()) is not False:
                    handle(reply)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, hiredis.ProtocolError) as exc:
            self._break(RedisUnavailable(f"reading from Redis at {self.address} failed: {exc!r}"))
        except RedisUnavailable as exc:
            self._break(exc)
        finally:
            self._break(RedisUnavailable(f"the connection to Redis at {self.address} is closed"))

    def _hand_over(self, reply: Reply) -> None:
        """Give ``reply`` to the caller first in line."""
        if not self._waiting:
            raise RedisUnavailable(f"Redis at {self.address} sent a reply nobody asked for")
        waiter = self._waiting[0]
        waiter.replies.append(reply)
        if len(waiter.replies) == waiter.wanted:
            self._waiting.popleft()
            waiter.done.set()

    def _break(self, error: RedisUnavailable) -> None:
        if self._broken is None:
            self._broken = error
            self.lost.set()
        while self._waiting:
            self._waiting.popleft().done.set()
        if self.on_break is not None:
            self.on_break()

    async def aclose(self) -> None:
        self._break(RedisUnavailable(f"the connection to Redis at {self.address} is closed"))
        await self._stream.aclose()


async def _connect(address: RedisAddress, connect_timeout: float) -> RedisConnection:
    """Open the socket and log in (``AUTH``, ``SELECT``) before any reader task runs."""
    commands: list[list[Arg]] = []
    if address.password is not None:
        commands.append(["AUTH", address.username or "default", address.password])
    if address.db:
        commands.append(["SELECT", address.db])
    try:
        with trio.fail_after(connect_timeout):
            stream = await _open_stream(address)
            connection = RedisConnection(stream, address)
            try:
                if commands:
                    await stream.send_all(b"".join(encode_command(command) for command in commands))
                replies: list[Reply] = []
                while len(replies) < len(commands):
                    data = await stream.receive_some(_READ_SIZE)
                    if not data:
                        raise RedisUnavailable(f"Redis at {address} closed the connection while logging in")
                    connection._reader.feed(cast(bytes, data))
                    while (reply := connection._reader.gets()) is not False:
                        replies.append(reply)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
    except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError, hiredis.ProtocolError) as exc:
        raise RedisUnavailable(f"cannot connect to Redis at {address}: {exc!r}") from None
    for reply in replies:
        if isinstance(reply, RedisError):
            await connection.aclose()
            raise RedisUnavailable(f"Redis at {address} refused to log in: {reply}")
    return connection


@asynccontextmanager
async def open_connection(address: RedisAddress, *,
                          connect_timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[RedisConnection]:
    """Connect (and log in); yield the connection; close it on the way out.

    Raises:
        RedisUnavailable: connecting or logging in failed or took ``connect_timeout``.
    """
    connection = await _connect(address, connect_timeout)
    async with _reading(connection):
        yield connection


@asynccontextmanager
async def _reading(connection: RedisConnection,
                   handle: Callable[[Reply], None] | None = None) -> AsyncIterator[None]:
    """Run the connection's reader (see :meth:`RedisConnection.run_reader`); close it on the way out."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run_reader, handle)
            yield
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


class PubSub:
    """A connection in subscriber mode. Open it with :func:`open_pubsub`.

    ``on_message(channel, data)`` is called for every message, in order, from
    the reader task; it must not wait.
    """

    def __init__(self, connection: RedisConnection, on_message: Callable[[bytes, bytes], None]) -> None:
        self._connection = connection
        self._on_message = on_message
        self._confirm: dict[bytes, deque[trio.Event]] = {}

    @property
    def lost(self) -> trio.Event:
        """Set when the connection ends."""
        return self._connection.lost

    async def subscribe(self, *channels: bytes) -> None:
        """Subscribe; return once Redis has confirmed every channel.

        Raises:
            RedisUnavailable: the connection is lost.
        """
        await self._send_and_confirm(b"SUBSCRIBE", channels)

    async def unsubscribe(self, *channels: bytes) -> None:
        """Unsubscribe; return once Redis has confirmed every channel."""
        await self._send_and_confirm(b"UNSUBSCRIBE", channels)

    async def _send_and_confirm(self, command: bytes, channels: Sequence[bytes]) -> None:
        if not channels:
            return
        events: list[trio.Event] = []

        def expect() -> None:
            # In the write's turn, so confirmations are expected in the order commands are sent
            # (a caller cancelled while waiting for its turn leaves no stale expectation).
            for channel in channels:
                event = trio.Event()
                self._confirm.setdefault(channel, deque()).append(event)
                events.append(event)

        connection = self._connection
        # Replies come as pushes, routed by _on_push; a broken connection wakes every waiter.
        await connection._send(encode_command([command, *channels]), None, expect)
        for event in events:
            await event.wait()
            if connection._broken is not None:
                raise connection._broken

    def _confirmed(self, channel: bytes) -> None:
        waiting = self._confirm.get(channel)
        if waiting:
            waiting.popleft().set()
            if not waiting:
                del self._confirm[channel]

    def _on_push(self, reply: Reply) -> None:
        """A message or a confirmation, pushed by Redis to a subscriber."""
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0]
            if kind == b"message":
                self._on_message(reply[1], reply[2])
                return
            if kind in (b"subscribe", b"unsubscribe"):
                self._confirmed(reply[1])
                return
        raise RedisUnavailable(f"Redis at {self._connection.address} sent {reply!r:.200} to a subscriber")

    def _release_waiters(self) -> None:
        """The connection ended: nobody waits for a confirmation that will not come."""
        for waiting in self._confirm.values():
            for event in waiting:
                event.set()
        self._confirm.clear()


@asynccontextmanager
async def open_pubsub(address: RedisAddress, on_message: Callable[[bytes, bytes], None], *,
                      connect_timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[PubSub]:
    """Connect (and log in) a subscriber connection; yield it; close it on the way out.

    Raises:
        RedisUnavailable: connecting or logging in failed or took ``connect_timeout``.
    """
    connection = await _connect(address, connect_timeout)
    pubsub = PubSub(connection, on_message)
    connection.on_break = pubsub._release_waiters
    try:
        async with _reading(connection, pubsub._on_push):
            yield pubsub
    finally:
        pubsub._release_waiters()
