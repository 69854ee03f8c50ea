"""The Python client (broker/client.py) with ``token_provider``, against a real broker with ``[auth]``.

Every test runs a real broker on a loopback port and the client over a real socket. Tokens live
2 to 3 seconds, so refreshes and expiry happen within each test.
"""

from __future__ import annotations

import time

import jwt
import pytest
import trio

import protocol as p
from broker import Broker
from broker.client import CommandError, ServerClosed, State, connect
from tests.broker.conftest import StartBroker, ws_url
from tests.clients_auth.conftest import SECRET, StartAuth, mint


class Tokens:
    """A token_provider that counts its calls; ``fail`` lists calls (1-based) that raise instead."""

    def __init__(self, *, ttl: float = 3, user: str = "alice", fail: tuple[int, ...] = (),
                 secret: str | None = None) -> None:
        self.ttl, self.user, self.fail, self.secret = ttl, user, fail, secret
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.calls in self.fail:
            raise RuntimeError(f"the app's token endpoint is down (call {self.calls})")
        if self.secret is not None:
            return mint(user=self.user, ttl=self.ttl, secret=self.secret)
        return mint(user=self.user, ttl=self.ttl)


async def emit_every(broker: Broker, channel: str, interval: float, count: int) -> None:
    for n in range(1, count + 1):
        broker.emit_nowait(channel, "tick", {"n": n})
        await trio.sleep(interval)


async def test_the_client_authenticates_and_refreshes_before_expiry(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    tokens = Tokens(ttl=3)
    seen: list[int] = []
    states: list[State] = []
    async with connect(ws_url(broker), token_provider=tokens,
                       on_state=lambda state, _why: states.append(state)) as client:
        assert client.state == "open" and client.user == "alice"
        first_exp = client.exp
        assert first_exp is not None and 1 < first_exp - time.time() <= 3
        sub = await client.subscribe("ai-chat/refresh")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(emit_every, broker, "ai-chat/refresh", 0.1, 10_000)
                async for event in sub:
                    seen.append(event.data["n"])
                    if time.time() > first_exp + 1.5:  # well past the first token's exp
                        break
                nursery.cancel_scope.cancel()
        assert client.exp is not None and client.exp > first_exp  # a fresh token extended it
        assert tokens.calls >= 2
        assert client.reconnects == 0 and states == ["open"]  # the same connection all along
    assert seen == list(range(1, len(seen) + 1))  # each publication once, in order, none missed


async def test_a_bad_token_is_refused_with_4009_and_no_reconnect(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    tokens = Tokens(secret="another-secret-that-the-broker-does-not-know")
    with pytest.raises(ServerClosed) as refused:
        async with connect(ws_url(broker), token_provider=tokens):
            pytest.fail("the broker accepted a token it cannot verify")
    assert refused.value.code == p.Code.UNAUTHORIZED and not refused.value.reconnect
    assert "bad signature" in refused.value.msg
    await trio.sleep(0.5)
    assert tokens.calls == 1  # asked once: no reconnect loop
    assert broker.statistics().connections == 0


async def test_a_refresh_the_broker_refuses_stops_the_client_for_good(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        return mint(user="alice" if calls == 1 else "mallory", ttl=2)  # a refresh for another user

    whys: list[ServerClosed | None] = []
    async with connect(ws_url(broker), token_provider=provider,
                       on_state=lambda _state, why: whys.append(why)) as client:
        sub = await client.subscribe("ai-chat/stopped")
        with trio.fail_after(5), pytest.raises(ServerClosed) as stopped:
            async for _event in sub:
                pass
        assert stopped.value.code == p.Code.UNAUTHORIZED
        assert "same user" in stopped.value.msg
        assert client.state == "closed" and client.closed is stopped.value
        await trio.sleep(1)
        assert calls == 2 and client.reconnects == 0
        with pytest.raises(ServerClosed):
            await client.ping()
    assert whys[-1] is not None and whys[-1].code == p.Code.UNAUTHORIZED


async def test_an_expired_token_reconnects_with_a_fresh_one_and_recovers(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    tokens = Tokens(ttl=2, fail=(2,))  # the refresh fails: the first token runs out
    whys: list[ServerClosed] = []

    def on_state(state: State, why: ServerClosed | None) -> None:
        if state == "reconnecting" and why is not None:
            whys.append(why)

    seen: list[int] = []
    async with connect(ws_url(broker), token_provider=tokens, on_state=on_state) as client:
        sub = await client.subscribe("ai-chat/expiry")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(emit_every, broker, "ai-chat/expiry", 0.05, 10_000)
                async for event in sub:
                    seen.append(event.data["n"])
                    if client.reconnects and len(seen) > 60:
                        break
                nursery.cancel_scope.cancel()
        assert [why.code for why in whys] == [p.Code.TOKEN_EXPIRED]
        assert client.reconnects == 1 and client.state == "open"
        assert tokens.calls >= 3  # the first, the failed refresh, the reconnect's
    assert sub.recovered  # the resubscription replayed what went by while reconnecting
    assert seen == list(range(1, len(seen) + 1))


async def test_a_token_already_past_its_exp_does_not_make_a_reconnect_loop(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    calls = 0

    async def stale() -> str:  # e.g. an app that caches tokens until their exp, a little too long
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        claims = {"sub": "alice", "exp": int(time.time()) - 2, "channels": ["ai-chat/*"]}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    with trio.move_on_after(1.5):
        try:
            async with connect(ws_url(broker), token_provider=stale, backoff=(0.1, 5.0)):
                await trio.sleep_forever()
        except ServerClosed as refused:  # refused outright (no leeway), or expired before the ok
            assert refused.code in (p.Code.UNAUTHORIZED, p.Code.TOKEN_EXPIRED)
    # Backing off 0.1, 0.2, 0.4, 0.8 s (each jittered down by up to half): a handful, not dozens.
    assert 1 <= calls <= 6, calls


async def test_a_fixed_token_works_and_an_open_broker_needs_none(auth_broker: StartAuth,
                                                                   start_broker: StartBroker) -> None:
    broker = await auth_broker()
    async with connect(ws_url(broker), token_provider=mint(ttl=60, channels=("news",))) as client:
        assert client.user == "alice" and client.exp is not None
        await client.subscribe("news")
        with pytest.raises(CommandError) as refused:
            await client.subscribe("ai-chat/not-granted")
        assert refused.value.code == p.Code.NOT_ALLOWED
    open_broker = await start_broker()
    async with connect(ws_url(open_broker), token_provider=None) as client:
        assert client.user is None and client.exp is None
        await client.subscribe("anything")
