"""Fixtures: a private redis-server per test (see :mod:`bench.redisproc`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.redisproc import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
