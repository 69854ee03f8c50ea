"""CORS: the client's files go to any origin, the API to loopback origins, preflights are answered."""

from __future__ import annotations

import http.client
import json

import pytest
import trio

from broker import Broker, cors

APP = "http://localhost:3000"  # a developer's app beside `make run`
STRANGER = "https://evil.example"


def _ask(broker: Broker, method: str, path: str, headers: dict[str, str],
         body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


async def ask(broker: Broker, method: str, path: str, headers: dict[str, str],
              body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    return await trio.to_thread.run_sync(_ask, broker, method, path, headers, body)


@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost:3000", True), ("http://127.0.0.1:5173", True), ("https://localhost", True),
    ("http://[::1]:8000", True), ("http://localhost", True),
    ("https://evil.example", False), ("http://localhost:3000.evil.example", False),
    ("http://localhost.evil.example", False), ("http://user@localhost:3000", False),
    ("http://localhost:99999", False), ("http://localhost:x", False), ("null", False),
    ("file://", False), ("ftp://localhost", False), ("http://localhost/path", False), ("", False),
])
def test_origins_allowed_are_loopback_ones(origin: str, allowed: bool) -> None:
    assert cors.origin_allowed(origin) is allowed


async def test_the_client_files_go_to_any_origin(broker: Broker) -> None:
    for path in ("/tokenfan.js", "/vendor/msgpack/index.mjs"):
        status, headers, _ = await ask(broker, "GET", path, {"Origin": STRANGER})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*", path
    status, headers, body = await ask(broker, "OPTIONS", "/tokenfan.js",
                                      {"Origin": STRANGER, "Access-Control-Request-Method": "GET"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*" and body == b""


async def test_a_preflight_from_an_allowed_origin_is_answered(broker: Broker) -> None:
    for path in ("/ai/chat", "/ai/cancel", "/api/emit", "/api/emit/batch"):
        status, headers, _ = await ask(broker, "OPTIONS", path, {
            "Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type"})
        assert status == 204, path
        assert headers["Access-Control-Allow-Origin"] == APP
        assert headers["Vary"] == "Origin"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert "content-type" in headers["Access-Control-Allow-Headers"]
        assert int(headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize("path, headers, problem", [
    ("/ai/chat", {"Origin": STRANGER, "Access-Control-Request-Method": "POST"}, "may not use"),
    ("/api/emit", {"Origin": APP, "Access-Control-Request-Method": "DELETE"}, "accepts POST"),
    ("/api/emit", {"Origin": APP, "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "content-type, x-sneaky"}, "x-sneaky"),
    ("/api/emit", {"Origin": APP}, "Access-Control-Request-Method"),
    ("/nowhere", {"Origin": APP, "Access-Control-Request-Method": "POST"}, "no such path"),
])
async def test_a_preflight_that_asks_too_much_is_refused_by_name(
        broker: Broker, path: str, headers: dict[str, str], problem: str) -> None:
    status, reply_headers, body = await ask(broker, "OPTIONS", path, headers)
    assert status in (403, 404)
    assert problem in json.loads(body)["error"]
    assert "Access-Control-Allow-Methods" not in reply_headers


async def test_api_answers_name_allowed_origins_only(broker: Broker) -> None:
    emit = json.dumps({"channel": "news", "event": "x", "data": {}}).encode()
    json_type = {"Content-Type": "application/json"}
    status, headers, _ = await ask(broker, "POST", "/api/emit", {"Origin": APP, **json_type}, emit)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == APP
    # An error is readable by the page too, so it can show what went wrong.
    status, headers, body = await ask(broker, "POST", "/api/emit", {"Origin": APP, **json_type}, b"{")
    assert status == 400 and headers["Access-Control-Allow-Origin"] == APP
    assert "not valid JSON" in json.loads(body)["error"]
    status, headers, _ = await ask(broker, "POST", "/api/emit", {"Origin": STRANGER, **json_type}, emit)
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await ask(broker, "GET", "/healthz", {})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
