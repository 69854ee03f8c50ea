"""The HTTP API with ``[auth]``: 401 without a credential, 403 outside its grants, keys for apps."""

from __future__ import annotations

import functools
import sys
from typing import Any

import pytest
import trio

from broker.auth import Authenticator
from broker.config import AuthConfig
from tests.auth.conftest import API_KEY, SECRET, StartAuth, call, token

#: Every guarded route, with a request body that would succeed for a caller allowed everything.
ROUTES: list[tuple[str, str, object | None]] = [
    ("POST", "/api/emit", {"channel": "ai-chat/s1", "event": "ai:cancel", "data": {}}),
    ("POST", "/api/emit/batch", {"events": [{"channel": "ai-chat/s1", "event": "ai:cancel", "data": {}}]}),
    ("GET", "/api/history?channel=ai-chat/s1", None),
    ("POST", "/ai/chat", {"message": "hi", "sessionId": "s1", "wait": False}),
    ("POST", "/ai/cancel", {"sessionId": "s1"}),
]


async def _call(url: str, payload: object | None = None, **options: Any) -> tuple[int, dict[str, str], Any]:
    return await trio.to_thread.run_sync(functools.partial(call, url, payload, **options))


@pytest.mark.parametrize(("method", "path", "payload"), ROUTES)
async def test_every_guarded_route_answers_401_without_a_good_credential(
        auth_broker: StartAuth, method: str, path: str, payload: object | None) -> None:
    broker = await auth_broker()
    url = f"http://127.0.0.1:{broker.port}{path}"
    for credential, reason in ((None, "needs a credential"), ("wrong-key-0123456789", "bad credential"),
                               (token(ttl=-60, ai=["*"], channels=["*"], publish=["*"]), "token expired")):
        status, headers, body = await _call(url, payload, credential=credential, method=method)
        assert status == 401, (credential, body)
        assert headers["www-authenticate"].startswith('Bearer realm="tokenfan"')
        assert reason in body["error"]
    assert broker.engine.position("ai-chat/s1")[1] == 0  # nothing was emitted
    status, _, body = await _call(url, payload, credential=API_KEY, method=method)
    assert status in (200, 202), body
    assert broker.health()["auth_refused"] == 3


@pytest.mark.parametrize(("method", "path", "payload"), ROUTES)
async def test_a_user_token_is_allowed_its_grants_and_refused_the_rest(
        auth_broker: StartAuth, method: str, path: str, payload: object | None) -> None:
    broker = await auth_broker()
    url = f"http://127.0.0.1:{broker.port}{path}"
    mine = token(channels=["ai-chat/s1"], publish=["ai-chat/s1"], ai=["s1"])
    status, _, body = await _call(url, payload, credential=mine, method=method)
    assert status in (200, 202), body
    theirs = token(channels=["ai-chat/s2"], publish=["ai-chat/s2"], ai=["s2"])
    status, _, body = await _call(url, payload, credential=theirs, method=method)
    assert status == 403, body
    assert "your token does not grant" in body["error"]


async def test_a_user_cannot_cancel_someone_elses_answer(auth_broker: StartAuth) -> None:
    broker = await auth_broker(ai_demo_tokens_per_second=20)
    base = f"http://127.0.0.1:{broker.port}"
    chat = {"message": "a long one", "sessionId": "bob-1", "wait": False}
    status, _, _ = await _call(f"{base}/ai/chat", chat, credential=token(sub="bob", ai=["bob-*"]))
    assert status == 202
    mallory = token(sub="mallory", ai=["mallory-*"], publish=["ai-chat/mallory-*"])
    status, _, body = await _call(f"{base}/ai/cancel", {"sessionId": "bob-1"}, credential=mallory)
    assert status == 403 and "bob-1" in body["error"]
    status, _, body = await _call(f"{base}/api/emit", {"channel": "ai-chat/bob-1", "event": "ai:cancel"},
                                  credential=mallory)
    assert status == 403
    assert broker.ai.cancel("bob-1")  # still running: nobody stopped it


async def test_a_user_token_cannot_emit_what_clients_may_not(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    url = f"http://127.0.0.1:{broker.port}/api/emit"
    status, _, body = await _call(url, {"channel": "ai-chat/s1", "event": "ai:token", "data": {"token": "x"}},
                                  credential=token(publish=["ai-chat/*"]))
    assert status == 403 and "client_events" in body["error"]


async def test_health_stays_open_and_the_demo_is_off_with_auth(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    base = f"http://127.0.0.1:{broker.port}"
    status, _, body = await _call(f"{base}/healthz")
    assert status == 200 and body["ok"]
    for path in ("/", "/index.html"):
        status, _, body = await _call(f"{base}{path}")
        assert status == 404 and "demo" in body["error"]
    status, _, body = await _call(f"{base}/demo/token", {"sessionId": "x"})
    assert status == 404


async def test_the_demo_mints_tokens_for_its_own_session_only(auth_broker: StartAuth) -> None:
    broker = await auth_broker(demo=True)
    base = f"http://127.0.0.1:{broker.port}"
    status, _, body = await _call(f"{base}/demo/token", {"sessionId": "demo-page-1"})
    assert status == 200, body
    grants = Authenticator(AuthConfig(jwt_secret=(SECRET,))).verify(body["token"])
    assert grants.may_subscribe("ai-chat/demo-page-1") and not grants.may_subscribe("ai-chat/demo-page-2")
    assert grants.may_use_ai("demo-page-1") and not grants.may_use_ai("demo-page-2")
    other = {"message": "hi", "sessionId": "demo-page-2", "wait": False}
    status, _, _ = await _call(f"{base}/ai/chat", other, credential=body["token"])
    assert status == 403


async def test_the_demo_mints_nothing_for_an_apps_sessions(auth_broker: StartAuth) -> None:
    """Once, anyone could get a demo token for the app's session alice-1, watch it and cancel it."""
    broker = await auth_broker(demo=True)
    base = f"http://127.0.0.1:{broker.port}"
    status, _, body = await _call(f"{base}/demo/token", {"sessionId": "alice-1"})
    assert status == 403 and "demo-*" in body["error"]


async def test_demo_tokens_share_their_address_s_ai_rate(auth_broker: StartAuth) -> None:
    """Each demo token has its own sub: keyed by user, every fresh token was a fresh bucket."""
    broker = await auth_broker(demo=True, ai_request_rate=0.1, ai_request_burst=4)
    base = f"http://127.0.0.1:{broker.port}"
    statuses = []
    for index in range(6):
        status, _, body = await _call(f"{base}/demo/token", {"sessionId": f"demo-{index}"})
        if status == 200:
            status, _, _ = await _call(f"{base}/ai/cancel", {"sessionId": f"demo-{index}"},
                                       credential=body["token"])
        statuses.append(status)
    assert statuses.count(429) >= 2, statuses


async def test_users_may_not_choose_the_model_or_provider(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    url = f"http://127.0.0.1:{broker.port}/ai/chat"
    user = token(ai=["s1"])
    for extra in ({"model": "o1-pro"}, {"provider": "openai"}):
        status, _, body = await _call(url, {"message": "hi", "sessionId": "s1", "wait": False, **extra},
                                      credential=user)
        assert status == 403 and "model or provider" in body["error"]
    status, _, _ = await _call(url, {"message": "hi", "sessionId": "s1", "wait": False, "model": "demo"},
                               credential=API_KEY)
    assert status == 202


async def test_a_users_http_emits_are_bounded_like_its_pubs(auth_broker: StartAuth) -> None:
    """Once, /api/emit with a user token took 900 KB with persist, 20,000 events in 0.8 s."""
    broker = await auth_broker(client_publish_rate=5)
    url = f"http://127.0.0.1:{broker.port}/api/emit"
    user = token(publish=["ai-chat/*"])
    big = {"channel": "ai-chat/u", "event": "ai:cancel", "data": {"junk": "j" * 10_000}}
    status, _, body = await _call(url, big, credential=user)
    assert status == 413 and "max_client_data" in body["error"]
    kept = {"channel": "ai-chat/u", "event": "ai:cancel", "data": {}, "persist": True}
    status, _, body = await _call(url, kept, credential=user)
    assert status == 403 and "persist" in body["error"]
    small = {"channel": "ai-chat/u", "event": "ai:cancel", "data": {}}
    statuses = [(await _call(url, small, credential=user))[0] for _ in range(8)]
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]


async def test_a_non_ascii_algorithm_gets_a_401_not_a_dropped_connection(auth_broker: StartAuth) -> None:
    broker = await auth_broker()
    forged = "eyJhbGciOiLigqwiLCJ0eXAiOiJKV1QifQ.eyJzdWIiOiJ4In0.c2ln"  # {"alg":"€"}
    status, headers, body = await _call(f"http://127.0.0.1:{broker.port}/api/emit",
                                        {"channel": "c", "event": "e"}, credential=forged)
    assert status == 401 and "signed with" in body["error"]
    assert headers["www-authenticate"].isascii()


async def test_an_open_broker_gives_the_demo_no_token(start_broker: Any) -> None:
    broker = await start_broker()
    status, _, body = await _call(f"http://127.0.0.1:{broker.port}/demo/token", {"sessionId": "x"})
    assert (status, body) == (200, {"ok": True, "token": None})


async def test_ai_requests_past_the_users_rate_get_429_with_retry_after(auth_broker: StartAuth) -> None:
    broker = await auth_broker(ai_request_rate=0.1, ai_request_burst=2)
    url = f"http://127.0.0.1:{broker.port}/ai/cancel"
    alice = token(sub="alice", ai=["*"])
    statuses = [(await _call(url, {"sessionId": "a"}, credential=alice))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, headers, body = await _call(url, {"sessionId": "a"}, credential=alice)
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 10 and "ai_request_rate" in body["error"]
    # Another user has a bucket of their own; the app's key is not limited.
    assert (await _call(url, {"sessionId": "b"}, credential=token(sub="bob", ai=["*"])))[0] == 200
    for _ in range(5):
        assert (await _call(url, {"sessionId": "c"}, credential=API_KEY))[0] == 200


async def test_cors_follows_allowed_origins(auth_broker: StartAuth) -> None:
    broker = await auth_broker(auth=AuthConfig(api_keys=(API_KEY,), allowed_origins=("https://app.example.com",)))
    url = f"http://127.0.0.1:{broker.port}/api/emit"
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}
    status, headers, _ = await _call(url, method="OPTIONS", headers=preflight)
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in headers["access-control-allow-headers"]
    status, _, body = await _call(url, method="OPTIONS", headers={**preflight, "Origin": "https://evil.example"})
    assert status == 403 and "allowed_origins" in body["error"]
    status, headers, _ = await _call(url, {"channel": "c", "event": "e"}, credential=API_KEY,
                                     headers={"Origin": "https://app.example.com"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example.com"


async def test_tokenfan_token_mints_what_the_broker_verifies(tmp_path: Any) -> None:
    command = [sys.executable, "-m", "broker.cli", "token", "--sub", "alice", "--channels", "ai-chat/*",
               "--ai", "*", "--ttl", "15m"]
    env = {"TOKENFAN_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    grants = Authenticator(AuthConfig(jwt_secret=(SECRET,))).verify(result.stdout.decode().strip())
    assert grants.user == "alice" and grants.may_subscribe("ai-chat/x") and grants.may_use_ai("anything")
    assert not grants.may_publish("ai-chat/x")
    without = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                     env={"PATH": "/usr/bin:/bin"})
    assert without.returncode == 2 and b"needs jwt_secret" in without.stderr


async def test_serving_on_every_interface_without_auth_is_refused() -> None:
    command = [sys.executable, "-m", "broker.cli", "serve", "--host", "0.0.0.0", "--port", "0"]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                    env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert b"allow_insecure" in result.stderr and b"--insecure" in result.stderr
    assert b"Traceback" not in result.stderr


async def test_websockets_open_only_from_allowed_origins(auth_broker: StartAuth, open_ws: Any) -> None:
    broker = await auth_broker(auth=AuthConfig(api_keys=(API_KEY,), allowed_origins=("https://app.example.com",)))
    allowed = await open_ws(broker, headers=[(b"Origin", b"https://app.example.com")])
    assert allowed.close_code is None
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n")
    for origin in (b"https://evil.example", b"http://localhost:3000"):  # the list replaces loopback
        stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
        async with stream:
            await stream.send_all(upgrade + b"Origin: " + origin + b"\r\n\r\n")
            answer = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(4096):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 403") and b"allowed_origins" in answer
