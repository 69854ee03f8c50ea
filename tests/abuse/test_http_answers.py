"""Finding 7: every request, however malformed, gets a well-formed answer naming the problem.

No traceback either: one broker process serves the whole module; the fixture fails the test if
anything it logged holds a traceback.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.abuse.conftest import ServedBroker, StartHostile

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [A-Za-z ]+\r\n")


@pytest.fixture
def served(hostile_broker: StartHostile) -> Iterator[ServedBroker]:
    yield hostile_broker(handshake_timeout="2s")


def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, and read until the broker closes (or the deadline)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before reading everything: the answer is still there
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return bytes(received)


def answers(raw: bytes, *, to_head: bool = False) -> list[tuple[int, dict[str, object] | None]]:
    """The statuses (and JSON bodies) of the responses in ``raw``; fails on anything malformed.

    ``to_head``: the requests were HEAD, so a 2xx answer has a Content-Length and no body.
    """
    found = []
    rest = raw
    while rest:
        match = _STATUS.match(rest)
        assert match, f"not an HTTP response: {rest[:200]!r}"
        head, _, rest = rest.partition(b"\r\n\r\n")
        length_match = re.search(rb"\r\nContent-Length: (\d+)", head)
        assert length_match, head
        status = int(match.group(1))
        length = 0 if to_head and status < 300 else int(length_match.group(1))
        body, rest = rest[:length], rest[length:]
        assert len(body) == length, "truncated body"
        parsed = json.loads(body) if b"application/json" in head and body else None
        if status >= 400:
            assert parsed is not None and parsed["ok"] is False and parsed["error"], (status, body)
        found.append((status, parsed))
    return found


def one_answer(port: int, data: bytes) -> tuple[int, str]:
    replies = answers(exchange(port, data))
    assert replies, "no answer"
    status, body = replies[-1]
    return status, str(body["error"]) if body and "error" in body else ""


def request(method: str, target: str, body: bytes = b"", content_type: str = "application/json",
            extra: str = "") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize("data, status, problem", [
    (b"POST /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \xb2\r\n\r\n{}", 400, "Content-Length"),
    (request("GET", "/api/history?channel=a&since=%C2%B2"), 400, "since must be an integer"),
    (request("GET", "/api/history?channel=a&limit=%D9%A3"), 400, "limit must be an integer"),
    (request("GET", "/api/history?channel=a&since=" + "9" * 5000), 400, "since must be an integer"),
    (request("POST", "/api/emit", b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply"),
    (request("POST", "/api/emit", b'{"channel": "a", "event": "e", "data": ' + b"7" * 5000 + b"}"), 400,
     "not valid JSON"),
    (request("POST", "/api/emit", b'{"channel": "a", "event": "e", "data": NaN}'), 400, "NaN"),
    (request("POST", "/api/emit", b'{"channel": "a", "event": "e", "data": [-Infinity]}'), 400, "Infinity"),
    (request("POST", "/api/emit", b'{"channel": "a", "event": "e", "data": "\xff"}'), 400, "UTF-8"),
])
def test_hostile_requests_get_an_answer_naming_the_problem(
        served: ServedBroker, data: bytes, status: int, problem: str) -> None:
    got_status, error = one_answer(served.port, data)
    assert got_status == status and problem in error, (got_status, error)


_METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS", "DELETE", "G\x00T", ""])
_PATHS = st.sampled_from(["/api/emit", "/api/emit/batch", "/api/history", "/ai/chat", "/ai/cancel",
                          "/healthz", "/", "/ws", "/tokenfan.js", "/nowhere", "*", ""])
_QUERY = st.text(st.characters(codec="utf-8"), max_size=30).map(
    lambda text: "?" + text.replace(" ", "%20").replace("\r", "").replace("\n", ""))
_HEADER_VALUE = st.one_of(st.text(max_size=40), st.sampled_from(
    ["application/json", "application/msgpack", "chunked", "100-continue", "-1", "0x10", "close"]))
_HEADERS = st.lists(st.tuples(st.sampled_from(["Content-Type", "Transfer-Encoding", "Expect", "Connection",
                                                "Origin", "Upgrade", "X-Any", "Bad Name"]), _HEADER_VALUE),
                    max_size=4)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)
_BODY = st.one_of(st.binary(max_size=200), _JSON.map(lambda value: json.dumps(value).encode()),
                  st.fixed_dictionaries({"channel": st.text(max_size=12), "event": st.text(max_size=12),
                                         "data": _JSON}).map(lambda value: json.dumps(value).encode()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=_METHODS, path=_PATHS, query=_QUERY, headers=_HEADERS, body=_BODY,
       garbage=st.one_of(st.none(), st.binary(min_size=1, max_size=300)))
def test_any_request_gets_well_formed_answers(served: ServedBroker, method: str, path: str, query: str,
                                              headers: list[tuple[str, str]], body: bytes,
                                              garbage: bytes | None) -> None:
    if garbage is not None:
        data = garbage
    else:
        lines = [f"{method} {path}{query} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers]
        data = "\r\n".join(lines).encode("utf-8", "surrogatepass") + b"\r\n\r\n" + body
    raw = exchange(served.port, data)
    # A WebSocket handshake that succeeded answers 101 and speaks WebSocket after it.
    if raw.startswith(b"HTTP/1.1 101 "):
        return
    for status, _ in answers(raw, to_head=garbage is None and method == "HEAD"):
        assert 200 <= status < 500 or status == 501, status


def test_cross_site_requests_and_rebound_names_are_refused(served: ServedBroker) -> None:
    """Finding 11: a JSON route needs its Content-Type; every request must name a host the broker serves."""
    emit = b'{"channel": "news", "event": "x", "data": {}}'
    no_type = (b"POST /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
               b"Connection: close\r\n\r\n" % len(emit)) + emit
    assert one_answer(served.port, no_type) == (415, "Content-Type is required: send application/json "
                                                     "(or application/msgpack)")
    text_plain = request("POST", "/api/emit", emit, content_type="text/plain")
    assert one_answer(served.port, text_plain)[0] == 415
    for host in (b"attacker.example:8765", b"localhost.attacker.example"):
        for head in (b"GET /healthz HTTP/1.1\r\n",
                     b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"):
            status, error = one_answer(served.port, head + b"Host: " + host + b"\r\n\r\n")
            assert status == 421 and "allowed_hosts" in error, (host, error)
    assert one_answer(served.port, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 400  # HTTP/1.1 needs a Host
    loopback = b"GET /healthz HTTP/1.1\r\nHost: localhost:1\r\nConnection: close\r\n\r\n"
    assert one_answer(served.port, loopback)[0] == 200


def test_allowed_hosts_names_the_hosts_served(hostile_broker: StartHostile) -> None:
    served = hostile_broker(allowed_hosts="chat.example.com,*.corp.example")
    ask = b"GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
    assert one_answer(served.port, ask % b"chat.example.com")[0] == 200
    assert one_answer(served.port, ask % b"eu.corp.example:443")[0] == 200
    assert one_answer(served.port, ask % b"127.0.0.1")[0] == 421


def test_websockets_from_foreign_origins_are_refused(served: ServedBroker) -> None:
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    status, error = one_answer(served.port, upgrade + b"Origin: https://evil.example\r\n\r\n")
    assert status == 403 and "evil.example" in error
    assert exchange(served.port, upgrade + b"Origin: http://localhost:3000\r\n\r\n").startswith(
        b"HTTP/1.1 101 ")
    assert exchange(served.port, upgrade + b"\r\n").startswith(b"HTTP/1.1 101 ")  # no Origin: not a browser


def test_a_page_the_broker_served_itself_may_open_a_websocket(hostile_broker: StartHostile) -> None:
    served = hostile_broker(host="0.0.0.0", allow_insecure="true")  # reached by its LAN address, say
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: 192.168.1.5:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" % served.port)
    same = upgrade + b"Origin: http://192.168.1.5:%d\r\n\r\n" % served.port
    assert exchange(served.port, same).startswith(b"HTTP/1.1 101 ")
    assert one_answer(served.port, upgrade + b"Origin: http://192.168.1.6:80\r\n\r\n")[0] == 403
