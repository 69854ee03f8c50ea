"""Fixtures that run a real broker in the test's nursery, on a free loopback port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from broker import Broker, Config
from tests.broker.rawclient import RawClient

StartBroker = Callable[..., Awaitable[Broker]]
#: Per-address limits lifted: a test's many clients share one address.
ONE_ADDRESS_MANY_CLIENTS: dict[str, Any] = {"max_connections_per_ip": 1_000_000,
                                            "upgrade_rate_per_ip": 1_000_000.0}
OpenRaw = Callable[..., Awaitable[RawClient]]


@pytest.fixture
def start_broker(nursery: trio.Nursery) -> StartBroker:
    """Start a broker with ``Config(port=0, **overrides)``; it stops when the test ends.

    Every client of a test comes from 127.0.0.1: the per-address limits are lifted unless a
    test sets them.
    """

    async def start(**overrides: Any) -> Broker:
        settings = {**ONE_ADDRESS_MANY_CLIENTS, **overrides}
        broker = Broker(Config(port=0, **settings))
        await nursery.start(broker.serve)
        return broker

    return start


@pytest.fixture
async def broker(start_broker: StartBroker) -> Broker:
    return await start_broker()


def ws_url(broker: Broker) -> str:
    return f"ws://127.0.0.1:{broker.port}/ws"


@pytest.fixture
async def open_raw() -> AsyncIterator[OpenRaw]:
    """Open :class:`RawClient` connections (``open_raw(broker, rcvbuf=...)``), closed when the test ends."""
    opened: list[RawClient] = []

    async def open_one(broker: Broker, rcvbuf: int | None = None) -> RawClient:
        client = await RawClient.open(broker, rcvbuf)
        opened.append(client)
        return client

    yield open_one
    for client in opened:
        client.sock.close()


def http_json(url: str, payload: object | None = None) -> tuple[int, dict[str, Any]]:
    """GET ``url`` (or POST ``payload`` as JSON); return the status and the JSON body, errors included.

    Blocking: call it with ``trio.to_thread.run_sync``.
    """
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
