"""Fixtures for the clients' authentication tests: a real broker with ``[auth]``, and tokens it accepts.

The brokers are the in-process ones of tests/broker (``start_broker``, on a free loopback port);
tokens are minted with the broker's own :class:`~broker.auth.Authenticator`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from broker import Broker
from broker.auth import Authenticator
from broker.config import AuthConfig
from tests.broker.conftest import StartBroker, start_broker

__all__ = ["API_KEY", "AUTH", "SECRET", "StartAuth", "auth_broker", "mint", "start_broker"]

SECRET = "clients-auth-secret-" * 3  # 60 bytes: HS256 wants at least 32
API_KEY = "clients-auth-app-key-0123456789"
AUTH = AuthConfig(jwt_secret=(SECRET,), api_keys=(API_KEY,))


def mint(*, user: str = "alice", ttl: float = 600, channels: tuple[str, ...] = ("ai-chat/*",),
         publish: tuple[str, ...] = (), ai: tuple[str, ...] = (), secret: str = SECRET) -> str:
    """A user token signed with ``secret`` (the brokers' own by default)."""
    token, _exp = Authenticator(AuthConfig(jwt_secret=(secret,))).mint(
        user=user, ttl=ttl, channels=channels, publish=publish, ai=ai)
    return token


StartAuth = Callable[..., Awaitable[Broker]]


@pytest.fixture
def auth_broker(start_broker: StartBroker) -> StartAuth:
    """Start a broker with ``[auth]`` (jwt_secret SECRET, api_keys API_KEY) and ``overrides``."""

    async def start(**overrides: Any) -> Broker:
        return await start_broker(auth=AUTH, **overrides)

    return start
