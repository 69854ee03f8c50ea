"""The HTTP publisher against a real broker: under asyncio, under Trio, and blocking.

The broker runs its own Trio loop in a background thread (:class:`BrokerThread`),
so the publisher under test owns the main thread's event loop: asyncio tests
are plain functions that call ``asyncio.run``, Trio ones call ``trio.run``
(or are pytest-trio tests). The broker counts the TCP connections it accepts,
which is how connection reuse is proven.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import trio

from broker import Broker, Config
from broker.client import connect
from broker.publisher import (
    AnswerFailed,
    AsyncPublisher,
    BadResponse,
    BrokerUnreachable,
    Emit,
    EmitsFailed,
    InvalidEvent,
    Published,
    Publisher,
    PublisherClosed,
    Rejected,
    TooManyPending,
)

T = TypeVar("T")


class CountingBroker(Broker):
    """A broker that counts the TCP connections it accepts."""

    accepted = 0

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        await super()._handle_stream(stream)


class BrokerThread:
    """A :class:`CountingBroker` on a free port, on its own Trio loop in a daemon thread."""

    def __init__(self, **overrides: Any) -> None:
        started = threading.Event()
        self.broker = CountingBroker(Config(port=0, **{"ai_demo_tokens_per_second": 2000, **overrides}))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.broker.serve)
                self.token = trio.lowlevel.current_trio_token()
                started.set()

        self.thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self.thread.start()
        assert started.wait(10), "the broker did not start"
        self.url = f"http://127.0.0.1:{self.broker.port}"

    def stop(self) -> None:
        trio.from_thread.run_sync(self.broker.shutdown, trio_token=self.token)
        self.thread.join(15)

    def tcp_connections(self) -> int:
        return trio.from_thread.run_sync(lambda: self.broker.statistics().tcp_connections,
                                         trio_token=self.token)

    def wait_until_no_connections(self) -> None:
        deadline = time.monotonic() + 5
        while self.tcp_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.tcp_connections() == 0


@pytest.fixture
def live() -> Iterator[BrokerThread]:
    broker = BrokerThread()
    yield broker
    broker.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_asyncio(scenario: Callable[..., Awaitable[T]], *args: Any) -> T:
    async def main() -> T:
        assert asyncio.get_running_loop() and not trio.lowlevel.in_trio_task()
        return await scenario(*args)

    return asyncio.run(main())


def run_trio(scenario: Callable[..., Awaitable[T]], *args: Any) -> T:
    async def main() -> T:
        assert trio.lowlevel.in_trio_task()
        return await scenario(*args)

    return trio.run(main)


Run = Callable[..., Any]
async_runs = pytest.mark.parametrize("run", [run_asyncio, run_trio], ids=["asyncio", "trio"])


# -- every method, three ways --------------------------------------------------------------


async def every_method_async(url: str) -> None:
    async with AsyncPublisher(url) as publisher:
        first = await publisher.emit("ai-chat/m", "ai:token", {"token": "Hi"})
        assert first.channel == "ai-chat/m" and first.offset == 1 and first.epoch
        assert await publisher.emit("ai-chat/m", "note", b"\x00\x01", persist=False) == Published(
            channel="ai-chat/m", offset=2, epoch=first.epoch)
        batch = await publisher.emit_batch([("ai-chat/m", "ai:token", {"token": "!"}),
                                            Emit("ai-chat/other", "ai:done", {}, persist=True)])
        assert [(p.channel, p.offset) for p in batch] == [("ai-chat/m", 3), ("ai-chat/other", 1)]
        assert await publisher.emit_batch([]) == []

        page = await publisher.history("ai-chat/m")
        assert (page.channel, page.epoch, page.top, page.recovered, page.more) == (
            "ai-chat/m", first.epoch, 3, True, False)
        assert [(e.offset, e.event, e.data) for e in page.publications] == [
            (1, "ai:token", {"token": "Hi"}), (3, "ai:token", {"token": "!"})]  # 2 was not persisted
        page = await publisher.history("ai-chat/m", since=0, limit=1)
        assert page.more and page.next == 2 and len(page.publications) == 1  # 2 is not kept
        assert not (await publisher.history("ai-chat/m", since=1, epoch="not-it")).recovered

        done = await publisher.chat("s-wait", "Who is late?")
        assert done.channel == "ai-chat/s-wait" and done.reason == "stop" and done.finished
        assert done.tokens is not None and done.tokens > 10
        started = await publisher.chat("s-run", "Who is late?", wait=False, provider="demo")
        assert started.channel == "ai-chat/s-run" and not started.finished and started.tokens is None
        assert await publisher.cancel("s-run") is True
        assert await publisher.cancel("s-run") is False
        kept = await publisher.history("ai-chat/s-run")
        assert kept.publications[-1].event == "ai:done"
        assert kept.publications[-1].data["reason"] == "cancelled"


@async_runs
def test_every_method_async(live: BrokerThread, run: Run) -> None:
    run(every_method_async, live.url)


def test_every_method_sync(live: BrokerThread) -> None:
    with Publisher(live.url) as publisher:
        first = publisher.emit("ai-chat/m", "ai:token", {"token": "Hi"})
        assert first == Published(channel="ai-chat/m", offset=1, epoch=first.epoch)
        assert publisher.emit("ai-chat/m", "note", b"\x00", persist=False).offset == 2
        batch = publisher.emit_batch([("ai-chat/m", "ai:token", {"token": "!"}), Emit("ai-chat/o", "x")])
        assert [(p.channel, p.offset) for p in batch] == [("ai-chat/m", 3), ("ai-chat/o", 1)]
        page = publisher.history("ai-chat/m", since=1)
        assert [(e.offset, e.data) for e in page.publications] == [(3, {"token": "!"})]
        assert page.top == 3 and page.epoch == first.epoch
        done = publisher.chat("s-wait", "Who is late?", model="tokenfan-demo")
        assert done.reason == "stop" and done.tokens
        assert publisher.chat("s-run", "Hello", wait=False).reason is None
        assert publisher.cancel("s-run") is True
        assert publisher.cancel("s-run") is False


async def test_in_a_trio_test() -> None:
    """pytest-trio's own loop: a chat waiting in one task, cancelled through the publisher from another."""
    slow = await trio.to_thread.run_sync(lambda: BrokerThread(ai_demo_tokens_per_second=50))
    try:
        async with connect(f"ws://127.0.0.1:{slow.broker.port}/ws") as watcher, \
                AsyncPublisher(slow.url) as publisher, trio.open_nursery() as nursery:
            subscription = await watcher.subscribe("ai-chat/s-long")
            answers = []

            async def ask() -> None:
                answers.append(await publisher.chat("s-long", "Tell me everything"))

            nursery.start_soon(ask)
            with trio.fail_after(5):
                async for event in subscription:
                    if event.event == "ai:token":
                        break
            assert await publisher.cancel("s-long") is True
        [answer] = answers
        assert answer.reason == "cancelled" and answer.channel == "ai-chat/s-long"
        # The watcher's WebSocket, the waiting chat's connection, and one more for the rest.
        assert slow.broker.accepted == 3
    finally:
        await trio.to_thread.run_sync(slow.stop)


# -- errors ----------------------------------------------------------------------------------


async def rejections_async(url: str) -> list[Rejected]:
    errors: list[Rejected] = []
    async with AsyncPublisher(url) as publisher:
        for call in (lambda: publisher.emit("bad channel", "ai:token", {}),
                     lambda: publisher.emit_batch([("ok", "e", 1), ("ok", "bad event!", 2)]),
                     lambda: publisher.emit("ok", "e", {}, persist=True),  # "ok" keeps no history
                     lambda: publisher.chat("bad session", "hi"),
                     lambda: publisher.history("bad channel")):
            with pytest.raises(Rejected) as caught:
                await call()
            errors.append(caught.value)
        assert (await publisher.history("ok")).top == 0  # the bad batch published nothing
    return errors


def check_rejections(errors: list[Rejected]) -> None:
    assert [e.status for e in errors] == [400] * 5
    bad_channel, bad_batch, persist, bad_session, bad_history = (e.message for e in errors)
    assert bad_channel.startswith("body: channel name 'bad channel' has characters outside")
    assert bad_batch.startswith("events[1]: event name 'bad event!'")
    assert persist.startswith("body: persist: channel ok keeps no history")
    assert bad_session.startswith("sessionId makes a bad channel name")
    assert bad_history.startswith("channel name 'bad channel'")
    for error in errors:  # the broker's text, not its JSON
        assert '"ok"' not in error.message and "{" not in error.message
        assert str(error) == f"the broker refused (400): {error.message}"


@async_runs
def test_rejected_carries_the_brokers_message_async(live: BrokerThread, run: Run) -> None:
    check_rejections(run(rejections_async, live.url))


def test_rejected_carries_the_brokers_message_sync(live: BrokerThread) -> None:
    errors: list[Rejected] = []
    with Publisher(live.url) as publisher:
        for call in (lambda: publisher.emit("bad channel", "ai:token", {}),
                     lambda: publisher.emit_batch([("ok", "e", 1), ("ok", "bad event!", 2)]),
                     lambda: publisher.emit("ok", "e", {}, persist=True),
                     lambda: publisher.chat("bad session", "hi"),
                     lambda: publisher.history("bad channel")):
            with pytest.raises(Rejected) as caught:
                call()
            errors.append(caught.value)
    check_rejections(errors)


async def unreachable_async(url: str) -> None:
    async with AsyncPublisher(url, timeout=5) as publisher:
        for call in (lambda: publisher.emit("ai-chat/x", "e", 1), lambda: publisher.history("ai-chat/x"),
                     lambda: publisher.chat("s", "hi"), lambda: publisher.cancel("s")):
            with pytest.raises(BrokerUnreachable, match=r"cannot reach the broker at http://127\.0\.0\.1"):
                await call()
        publisher.emit_nowait("ai-chat/x", "e", 1)
        with pytest.raises(EmitsFailed) as caught:
            await publisher.flush()
        assert caught.value.count == 1 and isinstance(caught.value.first, BrokerUnreachable)


@async_runs
def test_nothing_listening_is_unreachable_async(run: Run) -> None:
    run(unreachable_async, f"http://127.0.0.1:{free_port()}")


def test_nothing_listening_is_unreachable_sync() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Publisher(url) as publisher, pytest.raises(BrokerUnreachable) as caught:
        publisher.emit("ai-chat/x", "e", 1)
    assert caught.value.url == url and "refused" in caught.value.reason.lower()


def test_a_failed_answer_says_why() -> None:
    broker = BrokerThread(openai_base_url=f"http://127.0.0.1:{free_port()}/v1", openai_api_key="k")
    try:
        with Publisher(broker.url) as publisher, pytest.raises(AnswerFailed) as caught:
            publisher.chat("s-fail", "hi", provider="openai")
        failed = caught.value
        assert isinstance(failed, Rejected) and failed.status == 502
        assert (failed.code, failed.channel, failed.tokens) == ("upstream_unreachable", "ai-chat/s-fail", 0)

        async def failed_async() -> None:
            async with AsyncPublisher(broker.url) as publisher:
                with pytest.raises(AnswerFailed, match="upstream_unreachable"):
                    await publisher.chat("s-fail-2", "hi", provider="openai")

        run_asyncio(failed_async)
    finally:
        broker.stop()


def test_invalid_data_is_refused_before_sending(live: BrokerThread) -> None:
    async def scenario() -> None:
        async with AsyncPublisher(live.url) as publisher:
            with pytest.raises(InvalidEvent, match="cannot be encoded"):
                await publisher.emit("ai-chat/x", "e", {1, 2})
            with pytest.raises(InvalidEvent):
                publisher.emit_nowait("ai-chat/x", "e", object())
            assert publisher.statistics().requests == 0

    run_asyncio(scenario)
    with Publisher(live.url) as publisher, pytest.raises(ValueError):  # InvalidEvent is a ValueError
        publisher.emit_batch([("ai-chat/x", "e", 2**70)])


def test_closed_publishers_say_so(live: BrokerThread) -> None:
    async def scenario() -> None:
        publisher = AsyncPublisher(live.url)
        with pytest.raises(PublisherClosed, match="async with"):
            await publisher.emit("ai-chat/x", "e")
        async with publisher:
            pass
        with pytest.raises(PublisherClosed):
            await publisher.history("ai-chat/x")
        with pytest.raises(PublisherClosed):
            publisher.emit_nowait("ai-chat/x", "e")

    run_asyncio(scenario)
    sync = Publisher(live.url)
    sync.close()
    with pytest.raises(PublisherClosed):
        sync.emit("ai-chat/x", "e")


@async_runs
def test_an_error_in_the_block_comes_out_as_it_was(live: BrokerThread, run: Run) -> None:
    """No ExceptionGroup from the publisher's task group around the caller's own exception."""

    async def scenario() -> None:
        async with AsyncPublisher(live.url):
            raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        run(scenario)


def test_the_trio_client_under_asyncio_names_the_publisher(live: BrokerThread) -> None:
    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{live.broker.port}/ws"):
            pass  # pragma: no cover

    with pytest.raises(RuntimeError, match=r"runs on Trio, but was called under asyncio.*AsyncPublisher"):
        asyncio.run(scenario())


# -- connections -----------------------------------------------------------------------------


async def many_calls_async(url: str) -> None:
    async with AsyncPublisher(url) as publisher:
        for i in range(30):
            await publisher.emit("ai-chat/reuse", "ai:token", {"token": str(i)})
        await publisher.emit_batch([("ai-chat/reuse", "e", i) for i in range(10)])
        await publisher.history("ai-chat/reuse")
        await publisher.cancel("nobody")
        assert publisher.statistics().requests == 33


@async_runs
def test_one_connection_for_many_calls_async(live: BrokerThread, run: Run) -> None:
    run(many_calls_async, live.url)
    assert live.broker.accepted == 1
    live.wait_until_no_connections()  # and it was closed with the publisher


def test_one_connection_for_many_calls_sync(live: BrokerThread) -> None:
    with Publisher(live.url) as publisher:
        for i in range(30):
            publisher.emit("ai-chat/reuse", "ai:token", {"token": str(i)})
        publisher.emit_batch([("ai-chat/reuse", "e", i) for i in range(10)])
        publisher.history("ai-chat/reuse")
        publisher.cancel("nobody")
        assert publisher.requests == 33
    assert live.broker.accepted == 1
    live.wait_until_no_connections()


# -- one-tick batching -----------------------------------------------------------------------


async def concurrent_emits(url: str) -> None:
    async with AsyncPublisher(url) as publisher:
        queued: list[int] = []
        results: dict[int, Published] = {}

        async def emit(i: int) -> None:
            queued.append(i)  # emit queues before its first checkpoint: this is the queue's order
            results[i] = await publisher.emit("ai-chat/tick", "ai:token", {"i": i})

        if not trio.lowlevel.in_trio_task():
            await asyncio.gather(*(emit(i) for i in range(100)))
        else:
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(emit, i)
        stats = publisher.statistics()
        assert stats.requests <= 3 and stats.batches >= 1, stats  # not 100 requests
        assert stats.published == 100 and stats.pending == 0
        # Each caller got its own offset, and offsets follow the order the emits were made in.
        assert [results[i].offset for i in queued] == list(range(1, 101))
        page = await publisher.history("ai-chat/tick")
        assert all(results[e.data["i"]].offset == e.offset for e in page.publications)
        assert len(page.publications) == 100


@async_runs
def test_emits_in_one_tick_share_a_request(live: BrokerThread, run: Run) -> None:
    run(concurrent_emits, live.url)
    assert live.broker.accepted == 1


async def a_bad_emit_among_many(url: str) -> None:
    async with AsyncPublisher(url) as publisher:
        outcomes: dict[int, Published | Rejected] = {}

        async def emit(i: int) -> None:
            channel = "bad channel" if i == 5 else "ai-chat/mixed"
            try:
                outcomes[i] = await publisher.emit(channel, "ai:token", {"i": i})
            except Rejected as exc:
                outcomes[i] = exc

        async with trio.open_nursery() if trio.lowlevel.in_trio_task() else _Gather() as group:
            for i in range(10):
                group.start_soon(emit, i)
        bad = outcomes.pop(5)
        assert isinstance(bad, Rejected) and bad.status == 400 and "'bad channel'" in bad.message
        assert all(isinstance(o, Published) for o in outcomes.values())
        assert sorted(o.offset for o in outcomes.values() if isinstance(o, Published)) == list(range(1, 10))


class _Gather:
    """``start_soon`` for asyncio, shaped like a nursery (enough for these tests)."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _Gather:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*self.tasks)

    def start_soon(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        self.tasks.append(asyncio.ensure_future(fn(*args)))


@async_runs
def test_a_bad_emit_fails_only_its_caller(live: BrokerThread, run: Run) -> None:
    run(a_bad_emit_among_many, live.url)


async def fire_and_forget(url: str) -> None:
    async with AsyncPublisher(url, max_batch=50) as publisher:
        for i in range(300):
            publisher.emit_nowait(f"ai-chat/f{i % 3}", "ai:token", {"i": i})
        await publisher.emit_batch([("ai-chat/f0", "ai:done", {})])  # queued behind them, sent whole
        await publisher.flush()
        stats = publisher.statistics()
        assert (stats.requests, stats.batches, stats.published) == (7, 7, 301)  # 6 x 50, then the batch
        for c in range(3):
            page = await publisher.history(f"ai-chat/f{c}")
            assert [e.data["i"] for e in page.publications if e.event == "ai:token"] == list(range(c, 300, 3))
        assert page.publications[-1].event == "ai:token"
        assert (await publisher.history("ai-chat/f0")).publications[-1].event == "ai:done"


@async_runs
def test_emit_nowait_keeps_order_and_max_batch(live: BrokerThread, run: Run) -> None:
    run(fire_and_forget, live.url)


async def backpressure(url: str) -> None:
    async with AsyncPublisher(url, max_pending=4) as publisher:
        accepted = 0
        with pytest.raises(TooManyPending, match="4 emits are already waiting"):
            for i in range(10):
                publisher.emit_nowait("ai-chat/bp", "e", i)
                accepted += 1
        assert accepted in (4, 5)  # the queue, plus one the idle sender may take at once
        await publisher.flush()
        # emit() waits for room instead: 50 concurrent callers through a queue of 4
        results = await _all(*(publisher.emit("ai-chat/bp", "e", i) for i in range(50)))
        assert sorted(r.offset for r in results) == list(range(accepted + 1, accepted + 51))


async def _all(*calls: Awaitable[T]) -> list[T]:
    if not trio.lowlevel.in_trio_task():
        return list(await asyncio.gather(*calls))
    results: list[T] = []

    async def one(call: Awaitable[T]) -> None:
        results.append(await call)

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(one, call)
    return results


@async_runs
def test_pending_emits_are_bounded(live: BrokerThread, run: Run) -> None:
    run(backpressure, live.url)


@async_runs
def test_failed_fire_and_forget_emits_surface(live: BrokerThread, run: Run) -> None:
    async def at_flush() -> None:
        async with AsyncPublisher(live.url) as publisher:
            publisher.emit_nowait("ai-chat/ok", "e", 1)
            publisher.emit_nowait("bad channel", "e", 2)
            publisher.emit_nowait("bad channel", "e", 3)
            with pytest.raises(EmitsFailed) as caught:
                await publisher.flush()
            assert caught.value.count == 2 and isinstance(caught.value.first, Rejected)
            await publisher.flush()  # reported once
            assert (await publisher.history("ai-chat/ok")).top == 1

    async def at_exit() -> None:
        async with AsyncPublisher(live.url) as publisher:
            publisher.emit_nowait("bad channel", "e", 1)

    run(at_flush)
    with pytest.raises(EmitsFailed, match="1 emit"):
        run(at_exit)


# -- what goes over the wire -------------------------------------------------------------------


class CannedServer:
    """An HTTP server on a thread that answers every request with one canned response and keeps the heads."""

    def __init__(self, status: str, body: bytes, content_type: str = "application/json") -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.heads: list[str] = []
        self.reply = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.sock:
            conn, _ = self.sock.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                    while b"\r\n\r\n" in data:
                        head, rest = data.split(b"\r\n\r\n", 1)
                        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                       if line.lower().startswith(b"content-length:")), 0)
                        if len(rest) < length:
                            break
                        self.heads.append(head.decode())
                        data = rest[length:]
                        conn.sendall(self.reply)


def test_api_key_goes_as_a_bearer_token() -> None:
    server = CannedServer("200 OK", b'{"ok":true,"offset":7,"epoch":"ep"}')
    with Publisher(server.url, api_key="sk-123") as publisher:
        assert publisher.emit("ai-chat/x", "e", 1) == Published(channel="ai-chat/x", offset=7, epoch="ep")
    [head] = server.heads
    assert "authorization: bearer sk-123" in head.lower()
    assert "content-type: application/msgpack" in head.lower()

    async def scenario() -> None:
        server = CannedServer("200 OK", b'{"ok":true,"cancelled":false}')
        async with AsyncPublisher(server.url.replace("http", "ws") + "/ws", api_key="sk-456") as publisher:
            assert await publisher.cancel("s") is False
        assert "authorization: bearer sk-456" in server.heads[0].lower()
        assert server.heads[0].startswith("POST /ai/cancel ")

    run_trio(scenario)


def test_an_answer_that_is_not_the_brokers_api() -> None:
    page = CannedServer("200 OK", b"<html>Welcome to nginx!</html>", "text/html")
    with Publisher(page.url) as publisher, pytest.raises(BadResponse, match=r"nginx.*tokenfan broker"):
        publisher.emit("ai-chat/x", "e", 1)
    gateway = CannedServer("502 Bad Gateway", b"<html>502 Bad Gateway</html>", "text/html")
    with Publisher(gateway.url) as publisher, pytest.raises(Rejected) as caught:
        publisher.history("ai-chat/x")
    assert caught.value.status == 502 and "502 Bad Gateway" in caught.value.message


def test_urls() -> None:
    assert Publisher("ws://example.com:8765/ws").url == "http://example.com:8765"
    assert Publisher("https://example.com/tokenfan/").url == "https://example.com/tokenfan"
    with pytest.raises(ValueError, match="broker's URL"):
        Publisher("127.0.0.1:8765")


async def large_emits_in_one_tick(url: str) -> None:
    async with AsyncPublisher(url) as publisher:
        offsets: list[int] = []

        async def emit(i: int) -> None:
            published = await publisher.emit("ai-chat/large", "ai:token", {"i": i, "pad": "x" * 2000})
            offsets.append(published.offset)

        async with trio.open_nursery() if trio.lowlevel.in_trio_task() else _Gather() as group:
            for i in range(600):  # about 1.2 MB: more than one request's body may hold
                group.start_soon(emit, i)
        assert sorted(offsets) == list(range(1, 601))
        # Batches are capped in bytes, so none is refused as too large and sent again one by one.
        assert publisher.statistics().requests <= 8, publisher.statistics()


@async_runs
def test_batches_are_capped_in_bytes(live: BrokerThread, run: Run) -> None:
    run(large_emits_in_one_tick, live.url)
