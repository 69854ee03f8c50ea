"""The RESP client against a real, private redis-server: replies, pipelines, errors, pub/sub, loss."""

from __future__ import annotations

import pytest
import trio

from bench.redisproc import RedisServer
from broker.redis.resp import (
    RedisAddress,
    RedisError,
    RedisUnavailable,
    encode_command,
    open_connection,
    open_pubsub,
)


def test_address_parsing() -> None:
    address = RedisAddress.parse("rediss://user:p%40ss@redis.example:6380/3")
    assert (address.host, address.port, address.db, address.username, address.password, address.tls) == (
        "redis.example", 6380, 3, "user", "p@ss", True)
    assert str(address) == "rediss://redis.example:6380/3"  # never the password
    assert RedisAddress.parse("redis://127.0.0.1") == RedisAddress(host="127.0.0.1")
    for url, says in [("http://x", "redis://"), ("redis://", "host"), ("redis://h:99999", "port"),
                      ("redis://h/x", "database"), ("redis://h/0?x=1", "query"), ("127.0.0.1:6379", "redis://")]:
        with pytest.raises(ValueError, match=says):
            RedisAddress.parse(url)
    with pytest.raises(ValueError) as caught:
        RedisAddress.parse("redis://:secret@h:x")
    assert "secret" not in str(caught.value)


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert encode_command(["SET", b"k\r\n", 12, 1.5]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n")
    with pytest.raises(TypeError):
        encode_command(["SET", True])
    with pytest.raises(ValueError):
        encode_command(["SET", float("nan")])


async def test_replies_and_errors_in_order(redis_server: RedisServer) -> None:
    async with open_connection(RedisAddress.parse(redis_server.url)) as redis:
        assert await redis.execute("SET", "k", b"\x00binary\xff") == b"OK"
        assert await redis.execute("GET", "k") == b"\x00binary\xff"
        assert await redis.execute("GET", "missing") is None
        with pytest.raises(RedisError, match="WRONGTYPE"):
            await redis.execute("LPUSH", "k", "x")
        replies = await redis.pipeline([["INCR", "n"], ["LPUSH", "k", "x"], ["INCR", "n"],
                                        ["MGET", "n", "k"]])
        assert replies[0] == 1 and isinstance(replies[1], RedisError) and replies[2] == 2
        assert replies[3] == [b"2", b"\x00binary\xff"]


async def test_many_callers_each_get_their_own_reply(redis_server: RedisServer) -> None:
    results: dict[int, object] = {}
    async with open_connection(RedisAddress.parse(redis_server.url)) as redis:
        async def call(index: int) -> None:
            results[index] = await redis.execute("ECHO", f"caller {index}")

        async with trio.open_nursery() as nursery:
            for index in range(200):
                nursery.start_soon(call, index)
    assert results == {index: f"caller {index}".encode() for index in range(200)}


async def test_a_cancelled_caller_does_not_take_the_next_reply(redis_server: RedisServer) -> None:
    async with open_connection(RedisAddress.parse(redis_server.url)) as redis:
        with trio.move_on_after(0.05):
            await redis.execute("BLPOP", "never", 1)  # blocks in Redis for a second; we give up first
        assert await redis.execute("ECHO", "mine") == b"mine"


async def test_password_and_database(redis_server: RedisServer) -> None:
    server = RedisServer(password="s3cret")
    server.start()
    try:
        async with open_connection(RedisAddress.parse(server.url.replace("/0", "/2"))) as redis:
            await redis.execute("SET", "k", "v")
            assert await redis.execute("CLIENT", "INFO") is not None
            assert b"db=2" in await redis.execute("CLIENT", "INFO")
        with pytest.raises(RedisUnavailable, match="refused to log in") as caught:
            async with open_connection(RedisAddress.parse(server.url.replace("s3cret", "wrong"))):
                pass
        assert "wrong" not in str(caught.value)
    finally:
        server.close()


async def test_unreachable_and_lost(redis_server: RedisServer) -> None:
    port = redis_server.port
    async with open_connection(RedisAddress.parse(redis_server.url)) as redis:
        redis_server.kill()
        with pytest.raises(RedisUnavailable):
            with trio.fail_after(5):
                await redis.execute("PING")
        with pytest.raises(RedisUnavailable):
            await redis.execute("PING")  # and every later call
    with pytest.raises(RedisUnavailable, match="cannot connect"):
        async with open_connection(RedisAddress(host="127.0.0.1", port=port)):
            pass


async def test_pubsub_delivers_in_order_after_the_confirmation(redis_server: RedisServer) -> None:
    address = RedisAddress.parse(redis_server.url)
    got: list[tuple[bytes, bytes]] = []
    all_in = trio.Event()

    def on_message(channel: bytes, data: bytes) -> None:
        got.append((channel, data))
        if len(got) == 501:
            all_in.set()

    async with open_pubsub(address, on_message) as pubsub, \
            open_connection(address) as redis:
        await pubsub.subscribe(b"a", b"b")
        assert await redis.pipeline([["PUBLISH", "a", str(i)] for i in range(500)]) == [1] * 500
        await redis.execute("PUBLISH", "b", b"\x00")
        with trio.fail_after(5):
            await all_in.wait()
        assert got == [(b"a", str(i).encode()) for i in range(500)] + [(b"b", b"\x00")]
        await pubsub.unsubscribe(b"a")
        assert await redis.execute("PUBLISH", "a", "late") == 0
