"""The async publisher, on anyio: the same code runs under asyncio and under Trio.

Theory of operation
-------------------
Every emit goes through one bounded queue (an anyio memory object stream of
``max_pending`` entries) to one sender task, which the publisher's
``async with`` starts in its own task group. The sender takes the first
entry, yields once (``anyio.lowlevel.checkpoint()``) so that every task made runnable in
the same tick of the event loop gets to queue its emit too, then takes
whatever else is queued, up to ``max_batch`` events, and sends them as one
``POST /api/emit/batch`` (one event alone goes to ``/api/emit``). While that
request is in flight, new emits queue up and become the next batch: under
load the batches grow, with no timer and no added latency when idle.

Each entry carries its own result slot, so each caller gets its own
:class:`Published` or its own exception:

- The broker validates a batch in full before publishing any of it, so when
  it rejects a joined batch (400, 413) nothing was published; the sender
  then sends it again in halves, and only the bad one's caller gets
  :class:`Rejected`.
- When a batch gets no answer (:class:`BrokerUnreachable`) or a 5xx, every
  caller in it gets that error: nothing is retried, since the broker may
  have published them.

Order: one sender sends one request at a time, in queue order, and a caller
queues its emit before its first checkpoint, so emits are published in the
order they were made (``emit_batch`` entries are sent whole, in their
place). Backpressure: when ``max_pending`` entries wait, ``emit`` waits for
room and ``emit_nowait`` raises :class:`TooManyPending`.

``chat``, ``cancel`` and ``history`` are direct requests from the caller's
task, on the same connection pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.lowlevel
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

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
from broker.publisher.errors import EmitsFailed, PublisherClosed, Rejected, TooManyPending

T = TypeVar("T")

#: Statuses of a rejected batch that mean "one of its events is bad": resend it in halves.
_SPLIT_STATUSES = (400, 413)
#: Most bytes of events joined into one request: well under the broker's default body limit (1 MiB).
MAX_BATCH_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class PublisherStatistics:
    """A snapshot of an :class:`AsyncPublisher`."""

    pending: int  #: events queued or in flight
    requests: int  #: HTTP requests made, of every kind
    batches: int  #: of which ``POST /api/emit/batch``
    published: int  #: events the broker confirmed
    failed: int  #: events whose emit failed


class _Entry:
    """A queued emit (one event), ``emit_batch`` (``whole``: sent alone, all or nothing) or flush mark."""

    __slots__ = ("channels", "done", "error", "packed", "results", "whole")

    def __init__(self, channels: list[str], packed: list[bytes], *, whole: bool,
                 done: anyio.Event | None) -> None:
        self.channels = channels
        self.packed = packed
        self.whole = whole
        self.done = done  #: None: fire-and-forget (emit_nowait)
        self.results: list[Published] | None = None
        self.error: Exception | None = None


class AsyncPublisher:
    """Publish to a tokenfan broker over HTTP from asyncio or Trio code.

    ::

        async with AsyncPublisher("http://127.0.0.1:8765") as publisher:
            await publisher.emit("ai-chat/42", "ai:token", {"token": "Hi"})

    Use it from the event loop (one loop) it was opened in, from any number
    of tasks. Calls share one pool of keep-alive connections
    (``max_connections``). Emits made in the same tick are joined into one
    request (see the module docstring). ``timeout`` bounds the connect and
    each read and write of a request, in seconds (None: no limit); for an
    overall deadline use your framework's (``asyncio.timeout``,
    ``trio.fail_after``, ``anyio.fail_after``). Cancelling a caller of
    ``emit`` whose event is already queued does not unqueue it.

    Every method raises the errors of :mod:`broker.publisher.errors`.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float | None = 10.0,
                 max_connections: int = 10, max_batch: int = 1000, max_pending: int = 10_000) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be at least 1")
        self.url = base_url(url)
        self._options = client_options(self.url, api_key=api_key, timeout=timeout,
                                       max_connections=max_connections)
        self._timeout = timeout
        self._max_batch = max_batch  # keep it at most the broker's max_batch_events
        self._max_pending = max_pending
        self._http: httpx.AsyncClient | None = None
        self._send: MemoryObjectSendStream[_Entry] | None = None
        self._context: AbstractAsyncContextManager[Self] | None = None
        self._in_flight: list[_Entry] = []
        self._unreported: tuple[int, Exception] | None = None  # emit_nowait failures: count, first
        self._pending = self._requests = self._batches = self._published = self._failed = 0

    # -- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._context is not None:
            raise RuntimeError("an AsyncPublisher can be opened once; make another")
        self._context = self._open()
        return await self._context.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        """Send what is queued, then close; on an exception, drop the queue (its callers get PublisherClosed).

        Raises:
            EmitsFailed: after a clean exit, emits made with ``emit_nowait``
                failed and no ``flush`` reported them.
        """
        assert self._context is not None
        return await self._context.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Self]:
        send, receive = anyio.create_memory_object_stream[_Entry](self._max_pending)
        self._http = httpx.AsyncClient(**self._options)
        clean = False
        raised: BaseException | None = None  # by the caller's block
        unwrapped: BaseException | None = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._sender, receive)
                self._send = send
                try:
                    yield self
                    clean = True
                except BaseException as exc:
                    raised = exc
                    raise
                finally:
                    self._send = None
                    send.close()  # the sender sends what is queued, then ends
                    if not clean:
                        tasks.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The sender never raises, so a group holding only what the caller's
            # block raised is that exception, wrapped by the task group: let it
            # through as it was, as if the publisher had no task group.
            if raised is None or group.exceptions != (raised,):
                raise
            unwrapped = raised
        finally:
            receive.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._http.aclose()
        if unwrapped is not None:
            raise unwrapped
        if clean:
            self._raise_unreported()

    def _open_stream(self) -> MemoryObjectSendStream[_Entry]:
        if self._send is None:
            raise PublisherClosed("this AsyncPublisher is not open: use it inside "
                                  "`async with AsyncPublisher(url) as publisher:`")
        return self._send

    # -- emitting --------------------------------------------------------------------

    async def emit(self, channel: str, event: str, data: Any = None, *,
                   persist: bool | None = None) -> Published:
        """Publish ``event`` with ``data`` on ``channel``; emits made in the same tick share a request.

        ``persist`` overrides whether the channel keeps it in history.

        Raises:
            Rejected: 400 naming what is wrong (channel or event name, data, persist).
            InvalidEvent: ``data`` cannot be encoded; nothing was sent.
        """
        entry = _Entry([channel], [encode_event(channel, event, data, persist)], whole=False,
                       done=anyio.Event())
        await self._queue(entry)
        return (await self._outcome(entry))[0]

    def emit_nowait(self, channel: str, event: str, data: Any = None, *, persist: bool | None = None) -> None:
        """Queue an emit and return at once, without its result (fire and forget).

        It is sent in order with every other emit. If it fails, the next
        :meth:`flush` (or the end of ``async with``) raises :class:`EmitsFailed`.

        Raises:
            TooManyPending: ``max_pending`` emits are already waiting.
            InvalidEvent: ``data`` cannot be encoded.
        """
        entry = _Entry([channel], [encode_event(channel, event, data, persist)], whole=False, done=None)
        try:
            self._open_stream().send_nowait(entry)
        except anyio.WouldBlock:
            raise TooManyPending(self._max_pending) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise PublisherClosed("this AsyncPublisher is closing") from None
        self._pending += 1  # no checkpoint since it was queued: the sender has not run

    async def emit_batch(self, events: Iterable[Emit | tuple[str, str, Any]]) -> list[Published]:
        """Publish several events in one request (``POST /api/emit/batch``), in order, all or nothing.

        One bad event rejects the batch (Rejected 400 naming ``events[i]``) and
        none is published; more events than the broker's ``max_batch_events``
        (1000 by default) is Rejected 413.
        """
        items = [item if isinstance(item, Emit) else Emit(*item) for item in events]
        entry = _Entry([item.channel for item in items], encode_events(items), whole=True,
                       done=anyio.Event())
        await self._queue(entry)
        return await self._outcome(entry)

    async def flush(self) -> None:
        """Wait until every emit queued before this call was sent.

        Raises:
            EmitsFailed: emits made with ``emit_nowait`` failed since the last flush.
        """
        entry = _Entry([], [], whole=True, done=anyio.Event())
        await self._queue(entry)
        await self._outcome(entry)
        self._raise_unreported()

    def statistics(self) -> PublisherStatistics:
        return PublisherStatistics(pending=self._pending, requests=self._requests, batches=self._batches,
                                   published=self._published, failed=self._failed)

    async def _queue(self, entry: _Entry) -> None:
        send = self._open_stream()
        self._pending += len(entry.packed)  # before the sender can settle it
        queued = False
        try:
            try:
                send.send_nowait(entry)  # in call order, before any checkpoint
            except anyio.WouldBlock:
                await send.send(entry)  # backpressure: wait for room
            queued = True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise PublisherClosed("this AsyncPublisher is closing") from None
        finally:
            if not queued:  # cancelled while waiting for room, or closing
                self._pending -= len(entry.packed)

    async def _outcome(self, entry: _Entry) -> list[Published]:
        assert entry.done is not None
        await entry.done.wait()
        if entry.error is not None:
            raise entry.error
        assert entry.results is not None
        return entry.results

    def _settle(self, entry: _Entry, results: list[Published] | None, error: Exception | None) -> None:
        if entry.results is not None or entry.error is not None:
            return
        entry.results, entry.error = results, error
        count = len(entry.packed)
        self._pending -= count
        if error is None:
            self._published += count
        else:
            self._failed += count
            if entry.done is None:
                count, first = self._unreported or (0, error)
                self._unreported = (count + 1, first)
        if entry.done is not None:
            entry.done.set()

    def _raise_unreported(self) -> None:
        if self._unreported is not None:
            failure = EmitsFailed(*self._unreported)
            self._unreported = None
            raise failure from failure.first

    # -- the sender ------------------------------------------------------------------

    async def _sender(self, receive: MemoryObjectReceiveStream[_Entry]) -> None:
        """Send queued entries until the queue is closed and empty; see the module docstring."""
        carry: _Entry | None = None
        with receive:
            try:
                while True:
                    if carry is None:
                        try:
                            entry = await receive.receive()
                        except anyio.EndOfStream:
                            return
                        await anyio.lowlevel.checkpoint()  # the tasks woken in this tick queue theirs too
                    else:
                        entry, carry = carry, None
                    if entry.whole:
                        self._in_flight = [entry]
                        await self._send_whole(entry)
                    else:
                        chunk = [entry]
                        size = len(entry.packed[0])
                        while len(chunk) < self._max_batch:
                            try:
                                following = receive.receive_nowait()
                            except (anyio.WouldBlock, anyio.EndOfStream):
                                break
                            size += len(following.packed[0]) if following.packed else 0
                            if following.whole or size > MAX_BATCH_BYTES:
                                carry = following  # goes first in the next request
                                break
                            chunk.append(following)
                        self._in_flight = chunk
                        await self._send_chunk(chunk)
                    self._in_flight = []
            finally:
                # Cancelled (the publisher's block raised): nobody will send what is left.
                closed = PublisherClosed("the AsyncPublisher closed before this emit was sent")
                left = [*self._in_flight, *([carry] if carry is not None else [])]
                while True:
                    try:
                        left.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                for entry in left:
                    self._settle(entry, None, closed)

    async def _call(self, call: Call[T]) -> T:
        http = self._http
        if http is None or http.is_closed:
            raise PublisherClosed("this AsyncPublisher is closed")
        self._requests += 1
        with transport_errors(self.url):
            response = await http.request(call.method, call.path, content=call.body, params=call.params,
                                          headers=call.headers, timeout=request_timeout(call, self._timeout))
        return call.parse(response.status_code, response.content)

    async def _send_whole(self, entry: _Entry) -> None:
        if not entry.packed:  # a flush mark: everything before it was sent
            self._settle(entry, [], None)
            return
        try:
            self._batches += 1
            results = await self._call(batch_call(entry.packed))
        except Exception as exc:  # delivered to the caller, whatever it is
            self._settle(entry, None, exc)
        else:
            self._settle(entry, results, None)

    async def _send_one(self, entry: _Entry) -> None:
        try:
            result = await self._call(emit_call(entry.channels[0], entry.packed[0]))
        except Exception as exc:
            self._settle(entry, None, exc)
        else:
            self._settle(entry, [result], None)

    async def _send_chunk(self, chunk: list[_Entry]) -> None:
        if len(chunk) == 1:
            await self._send_one(chunk[0])
            return
        try:
            self._batches += 1
            results = await self._call(batch_call([entry.packed[0] for entry in chunk]))
        except Rejected as exc:
            if exc.status not in _SPLIT_STATUSES:
                for entry in chunk:
                    self._settle(entry, None, exc)
                return
            # Nothing of the batch was published: send it again in halves, so only the bad
            # emit fails, found in a few requests rather than one request per emit.
            middle = len(chunk) // 2
            await self._send_chunk(chunk[:middle])
            await self._send_chunk(chunk[middle:])
        except Exception as exc:
            for entry in chunk:
                self._settle(entry, None, exc)
        else:
            for entry, result in zip(chunk, results, strict=True):
                self._settle(entry, [result], None)

    # -- the AI path and history -------------------------------------------------------

    async def chat(self, session_id: str, message: str, *, wait: bool = True, provider: str | None = None,
                   model: str | None = None) -> ChatResult:
        """Ask the broker's AI path to answer ``message``, streaming to ``ai-chat/{session_id}``.

        With ``wait`` (the default) this returns when the answer ends; without,
        as soon as it starts streaming. Subscribe before calling so no token is missed.

        Raises:
            Rejected: 400 a bad field, 409 the session is already answering, 429 too many answers.
            AnswerFailed: (with ``wait``) the answer ended in ``ai:error``.
        """
        self._open_stream()
        return await self._call(chat_call(session_id, message, wait=wait, provider=provider, model=model))

    async def cancel(self, session_id: str) -> bool:
        """Stop the session's answer (``POST /ai/cancel``); True if one was running."""
        self._open_stream()
        return await self._call(cancel_call(session_id))

    async def history(self, channel: str, *, since: int | None = None, epoch: str | None = None,
                      limit: int | None = None) -> HistoryPage:
        """One page of the channel's kept publications after ``since`` (``GET /api/history``).

        It does not wait for queued emits: ``await flush()`` first to see them.
        """
        self._open_stream()
        return await self._call(history_call(channel, since=since, epoch=epoch, limit=limit))
