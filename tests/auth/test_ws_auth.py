"""WebSocket authentication over real sockets: every refusal, every grant, refresh and expiry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import protocol as p
from broker.config import AuthConfig
from tests.auth.conftest import API_KEY, SECRET, OpenWs, StartAuth, reply, token


async def _bye(client: Any) -> p.Bye:
    await client.read_until_closed()
    byes = [frame for frame in client.frames if isinstance(frame, p.Bye)]
    assert byes, client.frames
    return byes[-1]


async def test_a_valid_token_in_hello_grants_its_channels(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker)
    ok = await reply(client, p.Hello(id=1, token=token(channels=["ai-chat/*"], ttl=600)))
    assert isinstance(ok, p.Ok) and ok.user == "alice" and ok.exp is not None
    assert abs(ok.exp - (time.time() + 600)) < 5
    sub = await reply(client, p.Sub(id=2, ch="ai-chat/x"))
    assert isinstance(sub, p.Ok) and sub.ch == "ai-chat/x"
    broker.emit_nowait("ai-chat/x", "ai:token", {"token": "hi"})
    with trio.fail_after(5):
        while not any(isinstance(f, p.Ev) for f in client.frames):
            await client.receive()


async def test_a_token_on_the_upgrade_url_authenticates(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker, f"/ws?token={token(channels=['news'])}")
    assert isinstance(await reply(client, p.Sub(id=1, ch="news")), p.Ok)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: token(ttl=-120), "token expired"),
        (lambda: token(key="another-secret-of-enough-length-000"), "bad signature"),
        (lambda: token(exp=None), "lacks the 'exp' claim"),
        (lambda: token(sub=None), "lacks the 'sub' claim"),
        (lambda: token(channels="x" * 300), "must be a list of at most 64 glob patterns"),
        (lambda: "not.a.jwt", "not a JWT"),
        (lambda: token(algorithm="none", key=None), "signed with 'none'"),
        (lambda: token(nbf=int(time.time()) + 3600), "not valid yet"),
        (lambda: token(exp=10**400), "'exp' must be a number"),
        (lambda: token(exp="99999999999"), "'exp' must be a number"),
        (lambda: token(channels=[f"ai-chat/{index}{'*a' * 120}" for index in range(10)]), "2048 in all"),
    ],
)
async def test_a_bad_token_is_refused_saying_why(
        auth_broker: StartAuth, open_ws: OpenWs, make: Any, reason: str) -> None:
    broker = await auth_broker()
    bad = make()
    client = await open_ws(broker)
    await client.command(p.Hello(id=1, token=bad))
    bye = await _bye(client)
    assert bye.code == p.Code.UNAUTHORIZED and not bye.reconnect
    assert reason in bye.msg, bye.msg
    assert client.close_code == p.Code.UNAUTHORIZED
    assert broker.health()["auth_refused"] == 1


async def test_the_audience_and_issuer_are_checked_when_configured(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker(auth=AuthConfig(jwt_secret=(SECRET,), jwt_audience="chat", jwt_issuer="app"))
    good = await open_ws(broker)
    assert isinstance(await reply(good, p.Hello(id=1, token=token(aud="chat", iss="app"))), p.Ok)
    wrong_audience = await open_ws(broker)
    await wrong_audience.command(p.Hello(id=1, token=token(aud="other-app", iss="app")))
    assert "another audience" in (await _bye(wrong_audience)).msg
    wrong_issuer = await open_ws(broker)
    await wrong_issuer.command(p.Hello(id=1, token=token(aud="chat", iss="mallory")))
    assert "another issuer" in (await _bye(wrong_issuer)).msg


async def test_nothing_but_an_authenticating_hello_is_accepted_first(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    for first in (p.Sub(id=1, ch="news"), p.Ping(id=1), p.Hello(id=1, client="no token")):
        client = await open_ws(broker)
        await client.command(first)
        bye = await _bye(client)
        assert bye.code == p.Code.UNAUTHORIZED and "authenticate first" in bye.msg
        assert broker.hub.channel("news") is None  # the subscription was not made


async def test_no_token_within_the_handshake_timeout_is_cut(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker(handshake_timeout=0.5)
    client = await open_ws(broker)
    started = trio.current_time()
    bye = await _bye(client)
    assert bye.code == p.Code.UNAUTHORIZED and "handshake_timeout" in bye.msg
    assert trio.current_time() - started < 3


async def test_subscribing_and_publishing_outside_the_grants_is_refused(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker)
    await reply(client, p.Hello(id=1, token=token(channels=["ai-chat/mine-*"], publish=["ai-chat/mine-1"])))
    refused = await reply(client, p.Sub(id=2, ch="ai-chat/theirs"))
    assert isinstance(refused, p.Err) and refused.code == p.Code.NOT_ALLOWED and "channels" in refused.msg
    assert broker.hub.channel("ai-chat/theirs") is None
    assert isinstance(await reply(client, p.Sub(id=3, ch="ai-chat/mine-1")), p.Ok)
    cancel_theirs = await reply(client, p.Pub(id=4, ch="ai-chat/theirs", ev="ai:cancel"))
    assert isinstance(cancel_theirs, p.Err) and cancel_theirs.code == p.Code.NOT_ALLOWED
    assert "publish" in cancel_theirs.msg
    assert isinstance(await reply(client, p.Pub(id=5, ch="ai-chat/mine-1", ev="ai:cancel")), p.Ok)
    # The publish grant does not widen the channel's client_events.
    other_event = await reply(client, p.Pub(id=6, ch="ai-chat/mine-1", ev="ai:token", d={"token": "x"}))
    assert isinstance(other_event, p.Err) and "clients may not publish ai:token" in other_event.msg


async def test_a_fresh_token_extends_the_connection_past_the_first_exp(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker)
    first = await reply(client, p.Hello(id=1, token=token(channels=["c"], ttl=4)))
    assert isinstance(first, p.Ok) and first.exp is not None
    assert isinstance(await reply(client, p.Sub(id=2, ch="c")), p.Ok)
    await trio.sleep(1.1)  # refreshes come at most once a second
    fresh = await reply(client, p.Hello(id=3, token=token(channels=["c"], ttl=60)))
    assert isinstance(fresh, p.Ok) and fresh.exp is not None
    assert fresh.exp > first.exp
    await trio.sleep(first.exp - time.time() + 1)  # past the first token's exp
    assert client.close_code is None
    assert isinstance(await reply(client, p.Ping(id=4)), p.Ok)


async def test_at_exp_without_a_fresh_token_the_connection_ends_token_expired(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker)
    expiring = token(channels=["c"], ttl=2)
    exp = jwt.decode(expiring, options={"verify_signature": False})["exp"]
    await reply(client, p.Hello(id=1, token=expiring))
    bye = await _bye(client)
    assert bye.code == p.Code.TOKEN_EXPIRED and bye.reconnect and "expired" in bye.msg
    assert exp - 0.5 < time.time() < exp + 2  # at exp, not before and not long after


async def test_a_fresh_token_for_another_user_is_refused(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker)
    await reply(client, p.Hello(id=1, token=token(sub="alice")))
    await trio.sleep(1.1)  # refreshes come at most once a second
    await client.command(p.Hello(id=2, token=token(sub="mallory")))
    bye = await _bye(client)
    assert bye.code == p.Code.UNAUTHORIZED and "same user" in bye.msg


async def test_refreshing_often_is_rate_limited_and_does_not_grow_the_deadlines(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker(client_frame_rate=10_000, client_frame_burst=10_000)
    client = await open_ws(broker)
    await reply(client, p.Hello(id=1, token=token(ttl=600)))
    answers = [await reply(client, p.Hello(id=i, token=token(ttl=600 + i))) for i in range(2, 200)]
    limited = [a for a in answers if isinstance(a, p.Err) and a.code == p.Code.RATE_LIMITED]
    assert len(limited) >= 190 and "at most every 1 s" in limited[0].msg  # no signature checked for those
    assert len(broker.expiry) <= 2 * len(broker.connections) + 64
    await trio.sleep(1.1)
    assert isinstance(await reply(client, p.Hello(id=300, token=token(ttl=900))), p.Ok)


def _write_pem(path: Path, private: Any) -> None:
    path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.mark.parametrize(
    ("make_key", "algorithm"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
)
async def test_public_key_tokens_verify_and_others_do_not(
        auth_broker: StartAuth, open_ws: OpenWs, tmp_path: Path, make_key: Any, algorithm: str) -> None:
    private, stranger = make_key(), make_key()
    pem = tmp_path / "tokens.pem"
    _write_pem(pem, private)
    broker = await auth_broker(auth=AuthConfig(jwt_public_key=str(pem)))
    good = await open_ws(broker)
    assert isinstance(await reply(good, p.Hello(id=1, token=token(key=private, algorithm=algorithm))), p.Ok)
    forged = await open_ws(broker)
    await forged.command(p.Hello(id=1, token=token(key=stranger, algorithm=algorithm)))
    assert "bad signature" in (await _bye(forged)).msg
    hmac = await open_ws(broker)  # HS256 with the public key as the secret: the classic confusion
    await hmac.command(p.Hello(id=1, token=token(key="x" * 40)))
    assert f"this broker accepts {algorithm}" in (await _bye(hmac)).msg


async def test_an_open_broker_needs_no_token_and_ignores_one(start_broker: Any, open_ws: OpenWs) -> None:
    broker = await start_broker()
    client = await open_ws(broker)
    assert isinstance(await reply(client, p.Sub(id=1, ch="anything")), p.Ok)
    ok = await reply(client, p.Hello(id=2, token="whatever"))
    assert isinstance(ok, p.Ok) and ok.user is None


async def test_a_malformed_first_frame_is_unauthorized_too(auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker)
    await client.command(p.Hello(id=1, token="x" * 9000))  # past max_token_len
    bye = await _bye(client)
    assert bye.code == p.Code.UNAUTHORIZED and "token is longer than 8192" in bye.msg


async def test_a_long_rs256_token_with_many_grants_fits(auth_broker: StartAuth, open_ws: OpenWs,
                                                        tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    pem = tmp_path / "tokens.pem"
    _write_pem(pem, private)
    broker = await auth_broker(auth=AuthConfig(jwt_public_key=str(pem)))
    grants = [f"ai-chat/team-{index}-*" for index in range(64)]
    long = token(key=private, algorithm="RS256", channels=grants, publish=grants, ai=grants)
    assert len(long) > 4000
    client = await open_ws(broker)
    assert isinstance(await reply(client, p.Hello(id=1, token=long)), p.Ok)
    assert isinstance(await reply(client, p.Sub(id=2, ch="ai-chat/team-63-x")), p.Ok)


async def test_an_apps_api_key_opens_a_websocket_that_never_expires(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker(handshake_timeout=0.5)
    client = await open_ws(broker, f"/ws?token={API_KEY}")
    assert isinstance(await reply(client, p.Sub(id=1, ch="anything/at-all")), p.Ok)
    await trio.sleep(1.1)  # refreshes come at most once a second
    ok = await reply(client, p.Hello(id=2, token=API_KEY))
    assert isinstance(ok, p.Ok) and ok.user is None and ok.exp is None
    await trio.sleep(1)  # past any deadline the handshake set
    assert isinstance(await reply(client, p.Ping(id=3)), p.Ok)


async def test_an_hour_long_token_expires_after_an_hour(auth_broker: StartAuth, open_ws: OpenWs,
                                                         autojump_clock: trio.testing.MockClock) -> None:
    """With the autojump clock, an hour of Trio time passes as soon as everyone waits."""
    broker = await auth_broker(idle_timeout=7200, ping_interval=3000)
    client = await open_ws(broker)
    await reply(client, p.Hello(id=1, token=token(ttl=3600)))
    started = trio.current_time()
    with trio.fail_after(4000):
        while client.close_code is None:
            await client.receive()
    assert client.close_code == p.Code.TOKEN_EXPIRED
    assert 3590 < trio.current_time() - started < 3610


async def test_a_token_just_past_its_exp_is_refused_not_expired_at_once(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    """Within the clock-skew leeway, but a connection would end as soon as it began."""
    broker = await auth_broker()
    client = await open_ws(broker)
    await client.command(p.Hello(id=1, token=token(ttl=-2)))
    bye = await _bye(client)
    assert bye.code == p.Code.UNAUTHORIZED and not bye.reconnect and "token expired" in bye.msg


async def test_a_narrower_fresh_token_revokes_what_it_no_longer_grants(
        auth_broker: StartAuth, open_ws: OpenWs) -> None:
    broker = await auth_broker()
    client = await open_ws(broker)
    await reply(client, p.Hello(id=1, token=token(channels=["ai-chat/*", "news"])))
    assert isinstance(await reply(client, p.Sub(id=2, ch="ai-chat/x")), p.Ok)
    assert isinstance(await reply(client, p.Sub(id=3, ch="news")), p.Ok)
    await trio.sleep(1.1)  # refreshes come at most once a second
    await client.command(p.Hello(id=4, token=token(channels=["news"])))
    bye = await _bye(client)
    assert bye.code == p.Code.TOKEN_EXPIRED and bye.reconnect and "no longer grants ai-chat/x" in bye.msg
    client.sock.close()
    for _ in range(500):  # the subscription goes with the connection
        if broker.hub.channel("ai-chat/x") is None:
            break
        await trio.sleep(0.01)
    assert broker.hub.channel("ai-chat/x") is None


async def test_with_only_api_keys_a_websocket_needs_one_too(auth_broker: StartAuth, open_ws: OpenWs) -> None:
    """Once, [auth] with api_keys alone left every WebSocket open (and passed the bind check)."""
    broker = await auth_broker(auth=AuthConfig(api_keys=(API_KEY,)))
    anonymous = await open_ws(broker)
    await anonymous.command(p.Sub(id=1, ch="ai-chat/alice-1"))
    assert (await _bye(anonymous)).code == p.Code.UNAUTHORIZED
    app = await open_ws(broker)
    assert isinstance(await reply(app, p.Hello(id=1, token=API_KEY)), p.Ok)
    assert isinstance(await reply(app, p.Sub(id=2, ch="ai-chat/alice-1")), p.Ok)
