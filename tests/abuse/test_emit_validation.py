"""Findings 6 and 10: a batch is all or nothing, and no number JSON cannot carry gets into a stream."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
import trio

import protocol as p
from broker import Broker
from broker.client import CommandError, connect
from tests.abuse.test_http_answers import answers, exchange, request
from tests.broker.conftest import StartBroker, http_json


def _strict_json(text: bytes) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


async def _ask(broker: Broker, data: bytes) -> tuple[int, dict[str, object] | None]:
    [reply] = answers(await trio.to_thread.run_sync(exchange, broker.port, data))
    return reply


@pytest.mark.parametrize("bad, problem", [
    (b"18446744073709551616", "outside msgpack's range"),  # 2**64
    (b"-9223372036854775809", "outside msgpack's range"),  # -2**63 - 1
    (b'"\\ud800"', "lone surrogate"),
    (b'{"\\udfff": 1}', "lone surrogate"),
])
async def test_a_batch_with_a_bad_event_publishes_nothing(
        start_broker: StartBroker, bad: bytes, problem: str) -> None:
    broker = await start_broker()
    good = b'{"channel": "ai-chat/b", "event": "ai:token", "data": {"token": "x"}}'
    last = b'{"channel": "ai-chat/b", "event": "ai:token", "data": ' + bad + b"}"
    body = b'{"events": [' + good + b", " + good + b", " + last + b"]}"
    status, reply = await _ask(broker, request("POST", "/api/emit/batch", body))
    assert status == 400 and reply is not None
    assert "events[2]" in str(reply["error"]) and problem in str(reply["error"]), reply
    assert broker.engine.position("ai-chat/b") == ("", 0)  # nothing was published
    # The broker is fine, and the same batch without the bad event goes through whole.
    status, reply = await _ask(broker, request("POST", "/api/emit/batch", b'{"events": [' + good + b"]}"))
    assert status == 200


async def test_non_finite_numbers_are_refused_on_every_way_in(start_broker: StartBroker) -> None:
    broker = await start_broker()
    for number in (math.nan, math.inf, -math.inf):
        body = msgpack.packb({"channel": "ai-chat/n", "event": "ai:token", "data": {"v": number}})
        emit = request("POST", "/api/emit", body, content_type="application/msgpack")
        status, reply = await _ask(broker, emit)
        assert status == 400 and reply is not None and "NaN and infinities" in str(reply["error"]), reply
        with pytest.raises(ValueError, match="NaN and infinities"):
            broker.emit_nowait("ai-chat/n", "ai:token", {"v": number})
    async with connect(f"ws://127.0.0.1:{broker.port}/ws", reconnect=False) as client:
        with pytest.raises(CommandError) as refused:
            await client.publish("ai-chat/n", "ai:cancel", {"v": math.nan})
        assert refused.value.code == p.Code.INVALID_FIELD
    broker.emit_nowait("ai-chat/n", "ai:token", {"v": 1.5})
    status, body = await trio.to_thread.run_sync(
        http_json, f"http://127.0.0.1:{broker.port}/api/history?channel=ai-chat/n")
    assert status == 200 and [pub["data"] for pub in body["publications"]] == [{"v": 1.5}]
    raw = await trio.to_thread.run_sync(
        exchange, broker.port, request("GET", "/api/history?channel=ai-chat/n"))
    _strict_json(raw.partition(b"\r\n\r\n")[2])  # valid JSON to the letter
