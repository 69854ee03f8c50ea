"""Helpers for tests with several broker nodes on one Redis."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from broker import Broker
from broker.client import Event, Subscription

StartNode = Callable[..., Awaitable[Broker]]


def ws(node: Broker) -> str:
    return f"ws://127.0.0.1:{node.port}/ws"


def post(node: Broker | int, path: str, payload: object) -> tuple[int, dict[str, Any]]:
    """POST ``payload`` as JSON to a node (or a port); the status and the JSON answer. Blocking."""
    port = node if isinstance(node, int) else node.port
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


async def take(sub: Subscription, count: int, seconds: float = 10) -> list[Event]:
    events: list[Event] = []
    with trio.fail_after(seconds):
        async for event in sub:
            events.append(event)
            if len(events) == count:
                break
    return events


