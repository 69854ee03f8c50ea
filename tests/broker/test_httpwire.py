"""The sans-IO HTTP/1.1 request reader: whole, split anywhere, pipelined, chunked, and refused."""

from __future__ import annotations

import pytest

from broker.httpwire import HttpError, Request, RequestReader, response

EMIT = (b"POST /api/emit?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 11\r\n\r\n{\"a\": true}")
CHUNKED = (b"POST /api/emit HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4\r\n{\"a\"\r\n7;ext=1\r\n: true}\r\n0\r\nX-Trailer: 1\r\n\r\n")


def read_all(data: bytes, *, split: int | None = None, **limits: int) -> list[Request]:
    reader = RequestReader(**limits)
    requests: list[Request] = []
    pieces = [data] if split is None else [data[:split], data[split:]]
    for piece in pieces:
        reader.feed(piece)
        while (request := reader.next_request()) is not None:
            requests.append(request)
    assert reader.idle
    return requests


def test_simple_request() -> None:
    [request] = read_all(EMIT)
    head = request.head
    assert (head.method, head.target, head.path, head.http10) == ("POST", "/api/emit?x=1", "/api/emit", False)
    assert head.headers["content-type"] == "application/json"
    assert request.body == b'{"a": true}'
    assert head.keep_alive and not head.is_websocket_upgrade


def test_split_at_every_position_and_pipelined() -> None:
    data = EMIT + CHUNKED + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    for cut in range(len(data) + 1):
        requests = read_all(data, split=cut)
        assert [r.body for r in requests] == [b'{"a": true}', b'{"a": true}', b""], cut


def test_byte_by_byte() -> None:
    reader = RequestReader()
    bodies = []
    for byte in CHUNKED:
        reader.feed(bytes([byte]))
        if (request := reader.next_request()) is not None:
            bodies.append(request.body)
    assert bodies == [b'{"a": true}']


def test_keep_alive_rules() -> None:
    def head(lines: bytes) -> bool:
        [request] = read_all(lines + b"\r\n\r\n")
        return request.head.keep_alive

    assert head(b"GET / HTTP/1.1\r\nHost: a")
    assert not head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close")
    assert not head(b"GET / HTTP/1.0")
    assert head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive")


def test_expect_continue() -> None:
    reader = RequestReader()
    reader.feed(b"POST /api/emit HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert reader.next_request() is None
    assert reader.expects_continue
    reader.continue_sent()
    assert not reader.expects_continue
    reader.feed(b"{}")
    request = reader.next_request()
    assert request is not None and request.body == b"{}"


def test_upgrade_leaves_the_following_bytes_buffered() -> None:
    reader = RequestReader()
    reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n\x82\x81")
    request = reader.next_request()
    assert request is not None and request.head.is_websocket_upgrade
    assert reader.buffered == b"\x82\x81"
    assert request.head.headers["upgrade"] == "WebSocket"


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad HTTP request line"),
        (b"\x16\x03\x01\x02\x00", 400, "does not start with a method"),
        (b"GET / HTTP/2.0\r\n\r\n", 400, "bad HTTP request line"),
        (b"GET /a b HTTP/1.1\r\n\r\n", 400, "bad HTTP request line"),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400, "bad HTTP header line"),
        (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400, "bad HTTP header line"),
        (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400, "bad characters"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "conflicting"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "bad Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "both"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "unsupported Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd", 400, "not followed by CRLF"),
        (b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n", 413, "over the 1000-byte limit"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n", 413, "over the 1000-byte limit"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n", 431, "request head is over"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 3000, 431, "request head is over"),
    ],
)
def test_bad_requests_are_named(data: bytes, status: int, fragment: str) -> None:
    reader = RequestReader(max_head=2048, max_body=1000)
    reader.feed(data)
    with pytest.raises(HttpError) as info:
        reader.next_request()
    assert info.value.status == status
    assert fragment in info.value.message


def test_response_bytes() -> None:
    data = response(404, b'{"ok":false}', headers=(("Allow", "GET"),), close=True)
    assert data == (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
                    b"Allow: GET\r\nConnection: close\r\n\r\n{\"ok\":false}")
    assert response(200, b"abc", head_only=True).endswith(b"Content-Length: 3\r\n\r\n")


@pytest.mark.parametrize("size", [b"-2", b"0x2e", b"+2e", b"0_2e", b" 2e", b"2e ", b"", b"g", b"\xb2",
                                  b"1" * 17])
def test_chunk_sizes_are_exactly_hex_digits(size: bytes) -> None:
    data = (b"POST /api/emit HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size + b"\r\n" + b"x" * 46 + b"\r\n0\r\n\r\n")
    with pytest.raises(HttpError) as caught:
        read_all(data)
    assert caught.value.status == 400 and "chunk size" in caught.value.message


def test_a_chunk_extension_after_whitespace_is_allowed() -> None:
    data = (b"POST /api/emit HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2E ;name=value\r\n" + b"x" * 46 + b"\r\n0\r\n\r\n")
    [request] = read_all(data)
    assert request.body == b"x" * 46


@pytest.mark.parametrize("length", [b"\xb2", b"\xd9\xa3", b"+5", b"-1", b"5 5", b"0x5", b"9" * 5000, b""])
def test_content_length_is_ascii_digits(length: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        read_all(b"POST /api/emit HTTP/1.1\r\nHost: a\r\nContent-Length: " + length + b"\r\n\r\nhello")
    assert caught.value.status == 400 and "Content-Length" in caught.value.message
