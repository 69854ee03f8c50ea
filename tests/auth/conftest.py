"""Fixtures for the authentication tests: a broker with ``[auth]``, tokens, raw clients and HTTP calls.

Re-exports the in-process broker fixtures (``start_broker``, ``open_raw``) of tests/broker.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
import trio
import wsproto.events as wse

import protocol as p
from broker import Broker
from broker.config import AuthConfig
from tests.broker.conftest import StartBroker, start_broker
from tests.broker.rawclient import RawClient

__all__ = ["API_KEY", "SECRET", "auth_broker", "call", "open_ws", "reply", "start_broker", "token"]

SECRET = "s3cret-" * 6  # 42 bytes: HS256 wants at least 32
API_KEY = "app-key-0123456789abcdef"


def token(*, sub: str = "alice", ttl: float = 3600, key: Any = SECRET, algorithm: str = "HS256",
          **claims: Any) -> str:
    """A user token; ``claims`` add to or override ``sub``/``exp`` (``exp=None`` leaves it out)."""
    body: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


StartAuth = Callable[..., Awaitable[Broker]]


@pytest.fixture
def auth_broker(start_broker: StartBroker) -> StartAuth:
    """Start a broker with ``[auth]`` (``jwt_secret`` SECRET, ``api_keys`` API_KEY unless given)."""

    async def start(*, auth: AuthConfig | None = None, **overrides: Any) -> Broker:
        return await start_broker(auth=auth or AuthConfig(jwt_secret=(SECRET,), api_keys=(API_KEY,)),
                                  **overrides)

    return start


OpenWs = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def open_ws() -> AsyncIterator[OpenWs]:
    """``open_ws(broker, target="/ws", headers=None)``: a raw WebSocket client upgraded on ``target``
    (e.g. ``/ws?token=...``); every one is closed when the test ends."""
    opened: list[RawClient] = []

    async def open_one(broker: Broker, target: str = "/ws",
                       headers: list[tuple[bytes, bytes]] | None = None) -> RawClient:
        sock = trio.socket.socket()
        client = RawClient(sock)
        opened.append(client)
        await sock.connect(("127.0.0.1", broker.port))
        await client.send(wse.Request(host="127.0.0.1", target=target, extra_headers=headers or []))
        with trio.fail_after(5):
            while not any(isinstance(e, wse.AcceptConnection) for e in await client.receive()):
                pass
        return client

    yield open_one
    for client in opened:
        client.sock.close()


async def reply(client: RawClient, frame: p.ClientFrame) -> p.Frame:
    """Send ``frame``; return the first reply to it, or the ``bye`` that ended the connection."""
    seen = len(client.frames)
    await client.command(frame)
    with trio.fail_after(5):
        while True:
            for answer in client.frames[seen:]:
                if isinstance(answer, p.Bye) or getattr(answer, "id", None) == frame.id:
                    return answer
            seen = len(client.frames)
            if client.close_code is not None:
                raise AssertionError(f"closed ({client.close_code}) without an answer to {frame}")
            await client.receive()


def call(url: str, payload: object | None = None, *, credential: str | None = None,
         method: str | None = None, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One HTTP request (JSON body if ``payload``); the status, headers (lower-case) and JSON body.

    Blocking: call it with ``trio.to_thread.run_sync``.
    """
    data = None if payload is None else json.dumps(payload).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if credential is not None:
        all_headers["Authorization"] = f"Bearer {credential}"
    request = urllib.request.Request(url, data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return (response.status, {k.lower(): v for k, v in response.headers.items()},
                    json.loads(raw) if raw else {})
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(raw) if raw else {}
