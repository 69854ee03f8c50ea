"""Fixtures: a private redis-server per test (see :mod:`bench.redisproc`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from bench.redisproc import RedisServer
from broker import Broker, Config
from tests.broker.conftest import ONE_ADDRESS_MANY_CLIENTS
from tests.redis.nodes import StartNode


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def start_node(nursery: trio.Nursery, redis_server: RedisServer) -> StartNode:
    """Start a broker on the test's Redis (``Config(port=0, engine=..., **overrides)``)."""

    async def start(**overrides: Any) -> Broker:
        settings = {**ONE_ADDRESS_MANY_CLIENTS, "engine": redis_server.url, **overrides}
        node = Broker(Config(port=0, **settings))
        await nursery.start(node.serve)
        return node

    return start


@pytest.fixture
def start_broker(start_node: StartNode) -> StartNode:
    """The memory engine's suites' fixture, on Redis: each broker a node on the test's Redis."""
    return start_node


@pytest.fixture
async def broker(start_node: StartNode) -> Broker:
    return await start_node()
