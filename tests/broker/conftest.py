"""Fixtures that run a real broker in the test's nursery, on a free loopback port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from broker import Broker, Config

StartBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
def start_broker(nursery: trio.Nursery) -> StartBroker:
    """Start a broker with ``Config(port=0, **overrides)``; it stops when the test ends."""

    async def start(**overrides: Any) -> Broker:
        broker = Broker(Config(port=0, **overrides))
        await nursery.start(broker.serve)
        return broker

    return start


@pytest.fixture
async def broker(start_broker: StartBroker) -> Broker:
    return await start_broker()


def ws_url(broker: Broker) -> str:
    return f"ws://127.0.0.1:{broker.port}/ws"
