"""Malformed frames, oversized messages, unknown types and HTTP garbage get the documented answers,
and the broker keeps serving everyone else."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import trio
import trio.testing
import trio_websocket

import protocol as p
from broker import Broker
from broker.client import connect, open_websocket
from tests.broker.conftest import StartBroker, ws_url


async def next_frames(ws: trio_websocket.WebSocketConnection) -> list[p.Frame]:
    with trio.fail_after(5):
        message = await ws.get_message()
    assert isinstance(message, bytes)
    return p.decode_message(message, peer=p.Peer.SERVER, limits=p.SERVER_LIMITS)


async def expect_bye(ws: trio_websocket.WebSocketConnection, code: p.Code) -> p.Bye:
    [bye] = await next_frames(ws)
    assert isinstance(bye, p.Bye)
    assert bye.code == code
    assert bye.reconnect == code.reconnect
    with trio.fail_after(5):
        try:
            await ws.get_message()
            raise AssertionError("connection stayed open after bye")
        except trio_websocket.ConnectionClosed as closed:
            assert closed.reason.code == code
    return bye


async def still_serving(broker: Broker) -> None:
    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("health-check")
        broker.emit_nowait("health-check", "e", "fine")
        with trio.fail_after(5):
            assert (await sub.__anext__()).data == "fine"


async def test_garbage_msgpack_gets_bye_bad_frame(broker: Broker) -> None:
    async with open_websocket(ws_url(broker)) as ws:
        await ws.send_message(b"\xc1\xc1\xc1")
        bye = await expect_bye(ws, p.Code.BAD_FRAME)
        assert "invalid msgpack" in bye.msg
    await still_serving(broker)


async def test_frame_without_id_gets_bye(broker: Broker) -> None:
    async with open_websocket(ws_url(broker)) as ws:
        await ws.send_message(msgpack.packb({"t": "sub", "ch": "x"}))
        bye = await expect_bye(ws, p.Code.BAD_FRAME)
        assert "missing key id" in bye.msg


async def test_unknown_type_and_bad_fields_get_err_and_the_connection_lives(broker: Broker) -> None:
    async with open_websocket(ws_url(broker)) as ws:
        message = (msgpack.packb({"t": "teleport", "id": 7})
                   + msgpack.packb({"t": "sub", "id": 8, "ch": "no spaces"})
                   + p.encode(p.Ping(id=9)))
        await ws.send_message(message)
        frames = await next_frames(ws)
        frames += [] if len(frames) == 3 else await next_frames(ws)
        frames += [] if len(frames) == 3 else await next_frames(ws)
        assert frames[0] == p.Err(id=7, code=p.Code.UNKNOWN_TYPE, msg="unknown frame type 'teleport'")
        assert isinstance(frames[1], p.Err)
        assert frames[1].code == p.Code.INVALID_FIELD and "characters outside" in frames[1].msg
        assert frames[2] == p.Ok(id=9)


async def test_oversized_message_gets_bye_frame_too_large(start_broker: StartBroker) -> None:
    broker = await start_broker(max_frame_size=1024)
    async with open_websocket(ws_url(broker)) as ws:
        await ws.send_message(p.encode(p.Pub(id=1, ch="c", ev="e", d="x" * 5000)))
        await expect_bye(ws, p.Code.FRAME_TOO_LARGE)
    await still_serving(broker)


async def test_text_message_gets_bye(broker: Broker) -> None:
    async with open_websocket(ws_url(broker)) as ws:
        await ws.send_message('{"t":"ping","id":1}')
        bye = await expect_bye(ws, p.Code.BAD_FRAME)
        assert "text messages" in bye.msg


async def test_message_ending_inside_a_frame_gets_bye(broker: Broker) -> None:
    async with open_websocket(ws_url(broker)) as ws:
        await ws.send_message(p.encode(p.Ping(id=1))[:-1])
        await expect_bye(ws, p.Code.BAD_FRAME)


async def test_subscription_limits_and_duplicates(start_broker: StartBroker) -> None:
    broker = await start_broker(max_subscriptions=2)
    async with open_websocket(ws_url(broker)) as ws:
        await ws.send_message(p.encode_batch([
            p.Sub(id=1, ch="a"), p.Sub(id=2, ch="a"), p.Sub(id=3, ch="b"), p.Sub(id=4, ch="c"),
            p.Unsub(id=5, ch="zzz")]))
        frames: list[p.Frame] = []
        while len(frames) < 5:
            frames += await next_frames(ws)
        codes = [f.code if isinstance(f, p.Err) else "ok" for f in frames]
        assert codes == ["ok", p.Code.ALREADY_SUBSCRIBED, "ok", p.Code.TOO_MANY_SUBSCRIPTIONS,
                         p.Code.NOT_SUBSCRIBED]


async def test_connection_limit_says_why(start_broker: StartBroker) -> None:
    broker = await start_broker(max_connections=1)
    async with connect(ws_url(broker)) as first:
        async with open_websocket(ws_url(broker)) as ws:
            await expect_bye(ws, p.Code.TOO_MANY_CONNECTIONS)
        await first.ping()


# -- HTTP ---------------------------------------------------------------------------


async def http(broker: Broker, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes or one whole response arrives."""
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port or 0)
    async with stream:
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data or not _complete(data):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def http_json(broker: Broker, raw: bytes) -> tuple[int, Any]:
    status, headers, body = await http(broker, raw)
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


async def test_emit_over_http(broker: Broker) -> None:
    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("ai-chat/h")
        status, reply = await http_json(broker, post(
            "/api/emit", json.dumps({"channel": "ai-chat/h", "event": "ai:token",
                                     "data": {"token": "hé"}}).encode()))
        assert status == 200
        assert reply == {"ok": True, "offset": 1, "epoch": sub.epoch}
        status, reply = await http_json(broker, post(
            "/api/emit", msgpack.packb({"channel": "ai-chat/h", "event": "bin", "data": b"\x00\x01"}),
            "application/msgpack"))
        assert (status, reply["offset"]) == (200, 2)
        status, reply = await http_json(broker, post("/api/emit/batch", json.dumps({"events": [
            {"channel": "ai-chat/h", "event": "ai:token", "data": {"token": "a"}},
            {"channel": "other", "event": "x"},
            {"channel": "ai-chat/h", "event": "ai:done", "data": {}}]}).encode()))
        assert status == 200
        assert [r["offset"] for r in reply["results"]] == [3, 1, 4]
        with trio.fail_after(5):
            got = [await sub.__anext__() for _ in range(4)]
        assert [(e.event, e.data) for e in got] == [
            ("ai:token", {"token": "hé"}), ("bin", b"\x00\x01"), ("ai:token", {"token": "a"}),
            ("ai:done", {})]


async def test_http_errors_name_the_problem(start_broker: StartBroker) -> None:
    broker = await start_broker(max_body_size=1024)
    cases: list[tuple[bytes, int, str]] = [
        (post("/api/emit", b"{nope"), 400, "not valid JSON"),
        (post("/api/emit", b'{"event": "e"}'), 400, "missing 'channel'"),
        (post("/api/emit", b'{"channel": "a b", "event": "e"}'), 400, "characters outside"),
        (post("/api/emit", b'{"channel": 5, "event": "e"}'), 400, "channel name must be a string"),
        (post("/api/emit", b"[1]"), 400, "must be an object"),
        (post("/api/emit", b"\xc1", "application/msgpack"), 400, "not valid msgpack"),
        (post("/api/emit", b"channel=x", "application/x-www-form-urlencoded"), 415,
         "unsupported Content-Type"),
        (post("/api/emit", b"x" * 2000), 413, "over the 1024-byte limit"),
        (post("/api/emit/batch", b'{"events": 3}'), 400, "list 'events'"),
        (b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "no such path '/nowhere'"),
        (b"GET /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "accepts POST, not GET"),
        (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 426, "WebSocket only"),
        (b"GET /other HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 404,
         "endpoint is /ws"),
    ]
    for raw, status, fragment in cases:
        got_status, reply = await http_json(broker, raw)
        assert (got_status, reply["ok"]) == (status, False), raw
        assert fragment in reply["error"], (raw, reply)
    assert broker.hub.statistics().publications == 0


async def test_bad_event_in_a_batch_emits_nothing(broker: Broker) -> None:
    async with connect(ws_url(broker)) as client:
        sub = await client.subscribe("c")
        status, reply = await http_json(broker, post("/api/emit/batch", json.dumps({"events": [
            {"channel": "c", "event": "ok"}, {"channel": "c", "event": "bad event"}]}).encode()))
        assert status == 400
        assert reply["error"].startswith("events[1]: event name")
        broker.emit_nowait("c", "after", None)
        with trio.fail_after(5):
            event = await sub.__anext__()
        assert (event.event, event.offset) == ("after", 1)


async def test_http_garbage_gets_400_and_the_broker_serves_on(broker: Broker) -> None:
    for garbage in (b"GARBAGE\r\n\r\n", b"\x00\xff\x16\x03\x01 hello\r\n\r\n",
                    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        status, _, _ = await http(broker, garbage)
        assert status == 400
    status, reply = await http_json(broker, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 200 and reply["ok"] is True
    await still_serving(broker)


async def test_healthz_counts(broker: Broker) -> None:
    async with connect(ws_url(broker)) as client:
        await client.subscribe("x")
        await client.subscribe("y")
        status, reply = await http_json(broker, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 200
    assert (reply["connections"], reply["channels"], reply["subscriptions"]) == (1, 2, 2)


async def test_pipelined_requests_are_answered_in_order(broker: Broker) -> None:
    one = post("/api/emit", b'{"channel": "p", "event": "e"}')
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port or 0)
    async with stream:
        await stream.send_all(one * 5)
        data = b""
        with trio.fail_after(5):
            while data.count(b'"ok":true') < 5:
                data += await stream.receive_some(65536)
    assert data.count(b"HTTP/1.1 200") == 5


async def test_chunked_emit_with_expect_continue(broker: Broker) -> None:
    body = json.dumps({"channel": "ai-chat/c", "event": "ai:token", "data": {"token": "x" * 2000}}).encode()
    parts = (body[:1000], body[1000:])
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port or 0)
    async with stream, connect(ws_url(broker)) as client:
        sub = await client.subscribe("ai-chat/c")
        await stream.send_all(b"POST /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                              b"Expect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            interim = await stream.receive_some(1000)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(chunked)
            reply = b""
            while b'"ok":true' not in reply:
                reply += await stream.receive_some(1000)
            event = await sub.__anext__()
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert event.data == {"token": "x" * 2000}


async def test_head_request_gets_headers_only(broker: Broker) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port or 0)
    async with stream:
        await stream.send_all(b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(1000):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"\r\n\r\n")


async def test_bad_websocket_handshakes_get_400(broker: Broker) -> None:
    base = "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    key = "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"
    cases = [
        (base + "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", "Sec-WebSocket-Key must be"),
        (base + "Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n" + key + "\r\n",
         "Sec-WebSocket-Version must be 13"),
        (base + "Connection: keep-alive\r\nSec-WebSocket-Version: 13\r\n" + key + "\r\n",
         "must include 'upgrade'"),
        (base.replace("HTTP/1.1", "HTTP/1.0") + "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
         + key + "\r\n", "needs HTTP/1.1"),
    ]
    for raw, fragment in cases:
        status, _, body = await http(broker, raw.encode())
        assert status == 400
        assert fragment in json.loads(body)["error"]
    await still_serving(broker)


async def test_an_upgrade_to_something_else_is_not_a_websocket(broker: Broker) -> None:
    raw = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: notwebsocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n")
    status, _, body = await http(broker, raw.encode())
    assert status == 426 and "WebSocket" in json.loads(body)["error"]
    await still_serving(broker)


async def test_slow_request_gets_408(start_broker: StartBroker,
                                     autojump_clock: trio.testing.MockClock) -> None:
    broker = await start_broker(handshake_timeout=10)
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port or 0)
    async with stream:
        await stream.send_all(b"POST /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n{")
        started = trio.current_time()
        data = b""
        while chunk := await stream.receive_some(1000):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408 Request Timeout")
    assert 10 <= trio.current_time() - started <= 11


async def test_idle_keep_alive_connection_is_closed_quietly(start_broker: StartBroker,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    broker = await start_broker(handshake_timeout=10)
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port or 0)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(1000):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert b"408" not in data
