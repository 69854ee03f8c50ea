"""The sans-IO HTTP/1.1 request readers: whole, split anywhere, pipelined, chunked, and refused.

Every test runs through the broker's reader (:mod:`broker.httpwire`, llhttp) and
the pure-Python reference (:mod:`broker.httpwire_pure`). The hostile corpus is in
``tests/abuse/test_http_smuggling.py``.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.httpwire import HttpError, Request, RequestReader, response
from broker.httpwire_pure import RequestReader as PureRequestReader

READERS = {"llhttp": RequestReader, "pure": PureRequestReader}
Reader = type[RequestReader] | type[PureRequestReader]

EMIT = (b"POST /api/emit?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 11\r\n\r\n{\"a\": true}")
CHUNKED = (b"POST /api/emit HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4\r\n{\"a\"\r\n7;ext=1\r\n: true}\r\n0\r\nX-Trailer: 1\r\n\r\n")


@pytest.fixture(params=list(READERS))
def reader_class(request: pytest.FixtureRequest) -> Reader:
    return READERS[request.param]  # type: ignore[no-any-return]


def read_all(reader_class: Reader, data: bytes, *, split: int | None = None, **limits: int) -> list[Request]:
    reader = reader_class(**limits)
    requests: list[Request] = []
    pieces = [data] if split is None else [data[:split], data[split:]]
    for piece in pieces:
        reader.feed(piece)
        while (request := reader.next_request()) is not None:
            requests.append(request)
    assert reader.idle
    return requests


def test_simple_request(reader_class: Reader) -> None:
    [request] = read_all(reader_class, EMIT)
    head = request.head
    assert (head.method, head.target, head.path, head.http10) == ("POST", "/api/emit?x=1", "/api/emit", False)
    assert head.headers["content-type"] == "application/json"
    assert request.body == b'{"a": true}'
    assert head.keep_alive and not head.is_websocket_upgrade


def test_split_at_every_position_and_pipelined(reader_class: Reader) -> None:
    data = EMIT + CHUNKED + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    for cut in range(len(data) + 1):
        requests = read_all(reader_class, data, split=cut)
        assert [r.body for r in requests] == [b'{"a": true}', b'{"a": true}', b""], cut


def test_byte_by_byte(reader_class: Reader) -> None:
    reader = reader_class()
    bodies = []
    for byte in CHUNKED:
        reader.feed(bytes([byte]))
        if (request := reader.next_request()) is not None:
            bodies.append(request.body)
    assert bodies == [b'{"a": true}']


def test_crlf_crlf_inside_chunk_data_and_bodies(reader_class: Reader) -> None:
    tricky = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"8\r\n" + b"\r\n" * 4 + b"\r\n" + b"5\r\n0\r\n\r\n\r\n" + b"0\r\n\r\n")
    body = b"GET /x HTTP/1.1\r\n\r\n"
    data = tricky + b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body + EMIT
    for cut in range(len(data) + 1):
        requests = read_all(reader_class, data, split=cut)
        assert [r.body for r in requests] == [b"\r\n\r\n\r\n\r\n0\r\n\r\n", body, b'{"a": true}'], cut


def test_keep_alive_rules(reader_class: Reader) -> None:
    def head(lines: bytes) -> bool:
        [request] = read_all(reader_class, lines + b"\r\n\r\n")
        return request.head.keep_alive

    assert head(b"GET / HTTP/1.1\r\nHost: a")
    assert not head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close")
    assert not head(b"GET / HTTP/1.0")
    assert head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive")


@pytest.mark.parametrize("framing", [b"Content-Length: 2", b"Transfer-Encoding: chunked"])
def test_expect_continue(reader_class: Reader, framing: bytes) -> None:
    reader = reader_class()
    reader.feed(b"POST /api/emit HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n" + framing + b"\r\n\r\n")
    assert reader.next_request() is None
    assert reader.expects_continue
    reader.continue_sent()
    assert not reader.expects_continue
    reader.feed(b"{}" if b"Length" in framing else b"2\r\n{}\r\n0\r\n\r\n")
    request = reader.next_request()
    assert request is not None and request.body == b"{}"
    assert not reader.expects_continue and reader.idle


def test_upgrade_leaves_the_following_bytes_buffered(reader_class: Reader) -> None:
    reader = reader_class()
    reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n\x82\x81")
    request = reader.next_request()
    assert request is not None and request.head.is_websocket_upgrade
    assert reader.buffered == b"\x82\x81"
    assert request.head.headers["upgrade"] == "WebSocket"
    reader.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert reader.buffered == b"\x82\x81GET / HTTP/1.1\r\n\r\n"  # not HTTP any more


def test_an_upgrade_without_connection_upgrade_leaves_the_bytes_too(reader_class: Reader) -> None:
    # llhttp does not take it for an upgrade; the broker refuses the handshake, but the bytes are exact.
    reader = reader_class()
    reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
    request = reader.next_request()
    assert request is not None and request.head.is_websocket_upgrade
    assert reader.buffered == b"GET /x HTTP/1.1\r\n\r\n"


def test_other_upgrades_are_served_as_http(reader_class: Reader) -> None:
    # curl --http2 on http:// asks for h2c; CONNECT is an upgrade to llhttp: both are answered, and
    # the connection goes on.
    data = (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n" + EMIT)
    for cut in range(len(data) + 1):
        requests = read_all(reader_class, data, split=cut)
        assert [r.head.method for r in requests] == ["GET", "CONNECT", "POST"]
        assert requests[-1].body == b'{"a": true}'


def test_an_upgrade_with_a_body_is_refused() -> None:
    # llhttp leaves the body of an upgrade request unread (it would be taken for WebSocket frames).
    reader = RequestReader()
    reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Content-Length: 5\r\n\r\nhello")
    with pytest.raises(HttpError, match="must not have a body") as caught:
        reader.next_request()
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad HTTP request line"),
        (b"\x16\x03\x01\x02\x00", 400, "does not start with a method|Invalid method"),
        (b"GET / HTTP/2.0\r\n\r\n", 400, "bad HTTP request line"),
        (b"GET /a b HTTP/1.1\r\n\r\n", 400, "bad HTTP request line"),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400, "bad HTTP header line"),
        (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400, "bad HTTP header line"),
        (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400, "bad characters|header value char"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "conflicting"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "bad Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "both"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "unsupported Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd", 400,
         "not followed by CRLF|after chunk data"),
        (b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n", 413, "over the 1000-byte limit"),
        # llhttp does not say a chunk's size: the limit is met when the data comes.
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 1001, 413,
         "over the 1000-byte limit"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n", 431, "request head is over"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 3000, 431, "request head is over"),
        (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n", 431, "more than 100 headers"),
    ],
)
def test_bad_requests_are_named(reader_class: Reader, data: bytes, status: int, fragment: str) -> None:
    reader = reader_class(max_head=2048, max_body=1000)
    reader.feed(data)
    with pytest.raises(HttpError) as info:
        reader.next_request()
    assert info.value.status == status
    assert re.search(fragment, info.value.message, re.IGNORECASE), info.value.message
    if reader_class is RequestReader:
        with pytest.raises(HttpError):  # and for good
            reader.next_request()


def test_a_head_of_exactly_max_head_bytes_is_read(reader_class: Reader) -> None:
    line = b"GET / HTTP/1.1\r\nX: "
    head = line + b"a" * (2048 - len(line))
    assert len(read_all(reader_class, head + b"\r\n\r\n", max_head=2048)) == 1
    with pytest.raises(HttpError) as caught:
        read_all(reader_class, head + b"a\r\n\r\n", max_head=2048)
    assert caught.value.status == 431


@pytest.mark.parametrize("tail", [b"0\r\nX: " + b"a" * 3000, b"1;" + b"e" * 3000])
def test_trailers_and_chunk_size_lines_are_bounded_as_they_come(reader_class: Reader, tail: bytes) -> None:
    reader = reader_class(max_head=2048)
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(HttpError) as caught:
        for at in range(0, len(tail), 500):
            reader.feed(tail[at:at + 500])
            assert reader.next_request() is None
    assert caught.value.status in (400, 431) and "chunk" in caught.value.message


def test_response_bytes() -> None:
    data = response(404, b'{"ok":false}', headers=(("Allow", "GET"),), close=True)
    assert data == (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
                    b"Allow: GET\r\nConnection: close\r\n\r\n{\"ok\":false}")
    assert response(200, b"abc", head_only=True).endswith(b"Content-Length: 3\r\n\r\n")


@pytest.mark.parametrize("size", [b"-2", b"0x2e", b"+2e", b"0_2e", b" 2e", b"2e ", b"", b"g", b"\xb2",
                                  b"1" * 17])
def test_chunk_sizes_are_exactly_hex_digits(reader_class: Reader, size: bytes) -> None:
    data = (b"POST /api/emit HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size + b"\r\n" + b"x" * 46 + b"\r\n0\r\n\r\n")
    with pytest.raises(HttpError) as caught:
        read_all(reader_class, data)
    assert caught.value.status == 400 and "chunk size" in caught.value.message.lower()


def test_a_chunk_extension_after_whitespace() -> None:
    # RFC 9112 allows BWS before ";"; llhttp does not (no client sends it): refused, which is safe.
    data = (b"POST /api/emit HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2E ;name=value\r\n" + b"x" * 46 + b"\r\n0\r\n\r\n")
    [request] = read_all(PureRequestReader, data)
    assert request.body == b"x" * 46
    with pytest.raises(HttpError, match="chunk size"):
        read_all(RequestReader, data)


@pytest.mark.parametrize("length", [b"\xb2", b"\xd9\xa3", b"+5", b"-1", b"5 5", b"0x5", b"9" * 5000, b""])
def test_content_length_is_ascii_digits(reader_class: Reader, length: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        read_all(reader_class,
                 b"POST /api/emit HTTP/1.1\r\nHost: a\r\nContent-Length: " + length + b"\r\n\r\nhello")
    assert caught.value.status == 400 and "Content-Length" in caught.value.message


# -- properties -------------------------------------------------------------------------


def outcome(reader_class: Reader, pieces: list[bytes]) -> tuple[list[tuple[object, bytes]], int | None]:
    """What a reader makes of ``pieces``: the requests it returned, then its refusal's status, if any.

    Anything but :class:`HttpError` escaping fails the test.
    """
    reader = reader_class(max_head=1024, max_body=4096)
    requests = []
    try:
        for piece in pieces:
            reader.feed(piece)
            while (request := reader.next_request()) is not None:
                requests.append((request.head, request.body))
                if request.head.is_websocket_upgrade:
                    return requests, None  # what follows is not HTTP
    except HttpError as error:
        assert 400 <= error.status < 500 or error.status == 501, error.status
        assert error.message
        return requests, error.status
    return requests, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
                 min_size=1, max_size=12)
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20).map(str.strip)


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    """One request RFC 9112 allows (and llhttp knows the method of), of any framing."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]))
    target = "/" + draw(st.text("abcz09/?=&%-._~", max_size=20))
    names = draw(st.lists(_TOKEN.filter(lambda n: n.lower() not in (
        "content-length", "transfer-encoding", "host", "connection", "upgrade", "expect")), max_size=4))
    lines = [f"{method} {target} HTTP/1.1", "Host: a"] + [f"{n}: {draw(_VALUE)}" for n in names]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length" or (framing == "none" and body):
        lines.append(f"Content-Length: {len(body)}")
        tail = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        cuts = draw(st.lists(st.integers(1, max(len(body), 1)), max_size=4))
        parts = [part for part in split(body, cuts) if part]
        tail = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n"
        tail += b"".join(f"{n}: {draw(_VALUE)}\r\n".encode() for n in draw(st.lists(_TOKEN, max_size=2)))
        tail += b"\r\n"
    else:
        tail = b""
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + tail


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """Valid requests with a few bytes inserted, removed or replaced: near misses reach deep."""
    data = bytearray(b"".join(draw(st.lists(valid_requests(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([
            b"\r", b"\n", b" ", b"\t", b"\x00", b":", b";", b"0", b"f", b"-", b"\xff", b"\r\n", b"\r\n\r\n",
            b",chunked", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 1\r\n", b"0\r\n\r\n"]))
        match draw(st.sampled_from(["insert", "delete", "replace"])):
            case "insert":
                data[at:at] = junk
            case "delete":
                del data[at:at + len(junk)]
            case _:
                data[at:at + len(junk)] = junk
    return bytes(data)


_CUTS = st.lists(st.integers(0, 2000), max_size=8)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cuts=_CUTS)
def test_arbitrary_bytes_in_any_pieces_raise_nothing_but_http_error(data: bytes, cuts: list[int]) -> None:
    for reader_class in READERS.values():
        outcome(reader_class, split(data, cuts))


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(valid_requests(), min_size=1, max_size=4), cuts=_CUTS)
def test_valid_requests_are_read_alike_by_both_readers_in_any_pieces(requests: list[bytes],
                                                                    cuts: list[int]) -> None:
    data = b"".join(requests)
    whole = outcome(RequestReader, [data])
    assert whole[1] is None and len(whole[0]) == len(requests)
    assert outcome(RequestReader, split(data, cuts)) == whole
    assert outcome(PureRequestReader, split(data, cuts)) == whole


@settings(max_examples=500, deadline=None)
@given(data=mutated(), cuts=_CUTS)
def test_near_misses_are_framed_alike_or_refused(data: bytes, cuts: list[int]) -> None:
    """No bytes are read as different requests by the two readers, or by one reader split differently:
    that is what a request smuggler looks for. Where one refuses, the other may have read fewer."""
    llhttp = outcome(RequestReader, [data])
    assert outcome(RequestReader, split(data, cuts))[0] == llhttp[0]
    pure = outcome(PureRequestReader, split(data, cuts))
    common = min(len(llhttp[0]), len(pure[0]))
    assert llhttp[0][:common] == pure[0][:common]
    if llhttp[1] is None and pure[1] is None:
        assert llhttp[0] == pure[0]
