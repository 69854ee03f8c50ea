"""Limits per connection and per client address, over real sockets; a token is no licence to exhaust."""

from __future__ import annotations

import functools

import trio
import wsproto.events as wse

import protocol as p
from broker.limits import limit_key
from tests.auth.conftest import OpenWs, StartAuth, call, reply, token
from tests.broker.conftest import StartBroker
from tests.broker.rawclient import RawClient


async def test_frames_past_the_rate_get_rate_limited_then_bye(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker(client_frame_rate=5, client_frame_burst=10)
    client = await open_ws(broker)
    await reply(client, p.Hello(id=1, token=token(channels=["*"])))  # an authenticated user, all the same
    await client.send(wse.Message(data=p.encode_batch([p.Ping(id=i) for i in range(2, 40)])))
    await client.read_until_closed()
    oks = [f for f in client.frames if isinstance(f, p.Ok) and f.id != 1]
    limited = [f for f in client.frames if isinstance(f, p.Err) and f.code == p.Code.RATE_LIMITED]
    byes = [f for f in client.frames if isinstance(f, p.Bye)]
    assert 9 <= len(oks) <= 11, oks  # the burst (the hello aside), then nothing: little time has passed
    assert len(limited) + len(oks) == 20 and "client_frame_rate" in limited[0].msg  # then the bye
    assert byes and byes[0].code == p.Code.RATE_LIMITED and not byes[0].reconnect


async def test_frames_at_the_rate_are_all_served(auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker(client_frame_rate=50, client_frame_burst=5)
    client = await open_ws(broker)
    await reply(client, p.Hello(id=1, token=token()))
    for index in range(2, 30):
        assert isinstance(await reply(client, p.Ping(id=index)), p.Ok)
        await trio.sleep(0.025)


async def _upgrade(port: int, forwarded_for: str | None = None) -> tuple[RawClient, int | None]:
    """Upgrade a new connection; the client and the HTTP status of a refusal (None: accepted)."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    client = RawClient(sock)
    headers = [(b"X-Forwarded-For", forwarded_for.encode())] if forwarded_for else []
    await client.send(wse.Request(host="127.0.0.1", target="/ws", extra_headers=headers))
    with trio.fail_after(5):
        while True:
            for event in await client.receive():
                if isinstance(event, wse.AcceptConnection):
                    return client, None
                if isinstance(event, wse.RejectConnection):
                    return client, event.status_code


async def test_connections_per_address_are_capped(start_broker: StartBroker) -> None:
    broker = await start_broker(max_connections_per_ip=3)
    opened = [await _upgrade(broker.port) for _ in range(3)]
    assert all(status is None for _, status in opened)
    extra, _ = await _upgrade(broker.port)
    await extra.read_until_closed()
    assert extra.close_code == p.Code.TOO_MANY_CONNECTIONS
    assert "max_connections_per_ip" in next(f.msg for f in extra.frames if isinstance(f, p.Bye))
    opened[0][0].sock.close()  # one leaves: one more may come
    for _ in range(500):
        if len(broker.connections) <= 2:
            break
        await trio.sleep(0.01)
    again, _ = await _upgrade(broker.port)
    assert isinstance(await _ping(again), p.Ok)
    for client in [again, extra] + [c for c, _ in opened[1:]]:
        client.sock.close()


async def _ping(client: RawClient) -> p.Frame:
    await client.command(p.Ping(id=99))
    with trio.fail_after(5):
        while not client.frames:
            await client.receive()
    return client.frames[-1]


async def test_upgrades_past_the_rate_get_429_with_retry_after(start_broker: StartBroker) -> None:
    broker = await start_broker(upgrade_rate_per_ip=1)  # bursts of 5
    results = [await _upgrade(broker.port) for _ in range(6)]
    assert [status for _, status in results] == [None] * 5 + [429]
    raw = results[-1][0]
    for client, _ in results:
        client.sock.close()
    assert raw.close_code is None


async def test_a_trusted_proxy_names_the_client_and_others_cannot(start_broker: StartBroker) -> None:
    broker = await start_broker(max_connections_per_ip=1, trusted_proxies=("127.0.0.1",))
    first, _ = await _upgrade(broker.port, "10.1.2.3")
    second, _ = await _upgrade(broker.port, "10.9.9.9, 10.1.2.3")  # the proxy appended 10.1.2.3
    await second.read_until_closed()
    assert second.close_code == p.Code.TOO_MANY_CONNECTIONS
    other, _ = await _upgrade(broker.port, "10.4.5.6")
    assert isinstance(await _ping(other), p.Ok)
    for client in (first, second, other):
        client.sock.close()


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(start_broker: StartBroker) -> None:
    broker = await start_broker(max_connections_per_ip=1)
    first, _ = await _upgrade(broker.port, "10.1.2.3")
    spoofed, _ = await _upgrade(broker.port, "10.4.5.6")  # a client cannot pick its own address
    await spoofed.read_until_closed()
    assert spoofed.close_code == p.Code.TOO_MANY_CONNECTIONS
    first.sock.close()
    spoofed.sock.close()


async def test_ai_requests_on_an_open_broker_are_limited_per_address(start_broker: StartBroker) -> None:
    broker = await start_broker(ai_request_rate=0.1, ai_request_burst=2)
    url = f"http://127.0.0.1:{broker.port}/ai/cancel"
    statuses = [(await trio.to_thread.run_sync(functools.partial(call, url, {"sessionId": "x"})))[0]
                for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_an_ipv6_client_is_counted_by_its_slash_64() -> None:
    """One subscriber routinely holds a whole /64: counted per address, it would have 2^64 buckets."""
    assert limit_key("2001:db8::1") == limit_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert limit_key("2001:db8:0:1::1") != limit_key("2001:db8::1")
    assert limit_key("::ffff:10.1.2.3") == limit_key("10.1.2.3") == "10.1.2.3"


async def test_closed_unauthenticated_connections_leave_no_deadlines(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    for _ in range(150):  # each connects (a handshake deadline is set) and leaves at once
        client, _ = await _upgrade(broker.port)
        client.sock.close()
    for _ in range(500):
        if not broker.connections:
            break
        await trio.sleep(0.01)
    assert not broker.connections
    assert len(broker.expiry) <= 64 + 2  # stale entries dropped: closed connections are not kept alive
