"""Finding 8: the HTTP reader accepts exactly what RFC 9112 allows; the hostile corpus, through both readers.

The broker reads requests with :mod:`broker.httpwire` (llhttp); the pure-Python
reader it used before, :mod:`broker.httpwire_pure`, is kept as a reference.
Every hostile input here goes through both, fed whole and byte by byte, and
must be refused with an :class:`HttpError` whose status is 4xx (or 501 for a
transfer coding the broker does not implement, as RFC 9112 §6.1 says) and
whose message names the problem; no other exception may escape. Each input is
followed by a second, smuggled request (``POST /api/emit`` to channel
``smuggled``), which must never come out of a reader. A few inputs are read
differently by the two readers, on purpose: :data:`DIFFERENCES` says how.
At the end, the classic attacks go to a real broker running either reader,
and nothing reaches channel ``smuggled``.
"""

from __future__ import annotations

import json
import re

import pytest
import trio

import broker.http
from broker import Broker
from broker.httpwire import HttpError, Request
from broker.httpwire import RequestReader as LlhttpReader
from broker.httpwire_pure import RequestReader as PureReader
from tests.broker.conftest import StartBroker

READERS = {"llhttp": LlhttpReader, "pure": PureReader}
Reader = type[LlhttpReader] | type[PureReader]

_SMUGGLED_BODY = b'{"channel": "smuggled", "event": "e", "data": 1}'
SMUGGLED = (b"POST /api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(_SMUGGLED_BODY)) + _SMUGGLED_BODY


def post(*headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /api/emit " + version + b"\r\nHost: 127.0.0.1\r\n" + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked", body=b"".join(chunks))


# (name, request, statuses either reader may answer, what the message must name)
CORPUS: list[tuple[str, bytes, set[int], str]] = [
    # -- the cases of tests/broker/test_httpwire.py --------------------------------------
    ("garbage", b"GARBAGE\r\n\r\n", {400}, r"request line"),
    ("tls-hello", b"\x16\x03\x01\x02\x00", {400},
     r"does not start with a method|invalid method|request line"),
    ("http/2.0", b"GET / HTTP/2.0\r\n\r\n", {400}, r"request line"),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n\r\n", {400}, r"request line"),
    ("header-without-colon", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", {400}, r"header line"),
    ("first-header-folded", b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", {400}, r"header line"),
    ("control-in-value", b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", {400}, r"bad characters|header value char"),
    ("content-length-twice", post(b"Content-Length: 1", b"Content-Length: 2"), {400},
     r"conflicting|Duplicate"),
    ("content-length-negative", post(b"Content-Length: -1"), {400}, r"Content-Length"),
    ("content-length-and-chunked", post(b"Content-Length: 3", b"Transfer-Encoding: chunked"), {400},
     r"both|can't be present"),
    ("gzip", post(b"Transfer-Encoding: gzip"), {501}, r"unsupported Transfer-Encoding"),
    ("chunk-size-zz", chunked(b"zz\r\n"), {400}, r"chunk size"),
    ("chunk-without-crlf", chunked(b"2\r\nabcd"), {400}, r"not followed by CRLF|after chunk data"),
    ("content-length-over-limit", post(b"Content-Length: 2000"), {413}, r"over the 1000-byte limit"),
    ("chunks-over-limit", chunked(b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n"), {413},
     r"over the 1000-byte limit"),
    ("head-over-limit", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", {431}, r"request head is over"),
    ("head-over-limit-unfinished", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000, {431}, r"request head is over"),
    *[(f"chunk-size={size.decode('latin-1')}", chunked(size + b"\r\n" + b"x" * 46 + b"\r\n0\r\n\r\n"),
       {400}, r"chunk size")
      for size in (b"-2", b"0x2e", b"+2e", b"0_2e", b" 2e", b"2e ", b"", b"g", b"\xb2", b"1" * 17)],
    *[(f"content-length={length[:20].decode('latin-1')}", post(b"Content-Length: " + length, body=b"hello"),
       {400}, r"Content-Length")
      for length in (b"\xb2", b"\xd9\xa3", b"+5", b"-1", b"5 5", b"0x5", b"9" * 5000, b"")],
    # -- the HTTP-level case of tests/abuse/test_http_answers.py -------------------------
    ("content-length-superscript-two", post(b"Content-Type: application/json", b"Content-Length: \xb2",
                                            body=b"{}"), {400}, r"Content-Length"),
    # -- request smuggling classics -----------------------------------------------------
    ("CL.TE", post(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), {400},
     r"both|can't be present"),
    ("TE.CL", post(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"), {400},
     r"both|can't be present"),
    ("TE-folded", post(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"), {400, 501},
     r"header line|Transfer-Encoding"),
    ("TE-value-folded", post(b"Transfer-Encoding: chunked", b"\tidentity", body=b"0\r\n\r\n"), {400},
     r"header line"),
    ("TE-line-folded-in", post(b"X: 1", b" Transfer-Encoding: chunked", body=b"0\r\n\r\n"), {400},
     r"header line"),
    ("TE-chunked-identity", post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
     {400, 501}, r"Transfer-Encoding"),
    ("TE-identity-chunked", post(b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n"), {501},
     r"unsupported Transfer-Encoding"),
    ("TE-twice", post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", body=b"0\r\n\r\n"),
     {400, 501}, r"Transfer-Encoding"),
    ("TE-xchunked", post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), {501},
     r"unsupported Transfer-Encoding"),
    ("TE-quoted", post(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n"), {501},
     r"unsupported Transfer-Encoding"),
    ("TE-with-parameter", post(b"Transfer-Encoding: chunked;q=1", body=b"0\r\n\r\n"), {501},
     r"unsupported Transfer-Encoding"),
    ("TE-vertical-tab", post(b"Transfer-Encoding: chunked\x0b", body=b"0\r\n\r\n"), {400, 501},
     r"bad characters|unsupported Transfer-Encoding|header value char"),
    ("TE-NUL", post(b"Transfer-Encoding: chunked\x00", body=b"0\r\n\r\n"), {400, 501},
     r"bad characters|unsupported Transfer-Encoding|header value char"),
    ("TE-space-before-colon", post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), {400},
     r"header line|header token"),
    ("TE-in-HTTP/1.0", post(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n", version=b"HTTP/1.0"), {400},
     r"HTTP/1\.0"),
    ("CL-twice-same", post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), {400},
     r"conflicting|Duplicate"),
    ("CL-list", post(b"Content-Length: 5, 5", body=b"hello"), {400}, r"Content-Length"),
    ("CL-plus-after-space", post(b"Content-Length:  +5", body=b"hello"), {400}, r"Content-Length"),
    ("CL-2^64", post(b"Content-Length: 18446744073709551616", body=b"hello"), {400}, r"Content-Length"),
    ("CL-space-before-colon", post(b"Content-Length : 5", body=b"hello"), {400}, r"header line|header token"),
    ("chunk-size-2^64", chunked(b"10000000000000000\r\nab\r\n0\r\n\r\n"), {400}, r"chunk size"),
    ("chunk-size-huge", chunked(b"ffffffffffffffff\r\n" + b"x" * 2000), {413}, r"over the 1000-byte limit"),
    ("chunk-ext-bare-LF", chunked(b"2;a\nb\r\nab\r\n0\r\n\r\n"), {400}, r"chunk"),
    ("chunk-data-bare-LF", chunked(b"2\r\nab\n0\r\n\r\n"), {400}, r"CRLF|chunk data"),
    ("chunk-size-line-endless", chunked(b"2;" + b"a" * 9000), {400, 431}, r"chunk"),
    ("bare-LF-request", b"GET / HTTP/1.1\nHost: 127.0.0.1\n\n", {400}, r"request line"),
    ("bare-LF-header", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\nX: 1\r\n\r\n", {400},
     r"bad characters|header value|CR after header"),
    ("bare-CR-header", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\rX: 1\r\n\r\n", {400},
     r"bad characters|header value|LF after header"),
    ("bare-LF-before-request", b"\nGET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400},
     r"does not start with a method|request line"),
    ("NUL-in-value", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: a\x00b\r\n\r\n", {400},
     r"bad characters|header value char"),
    ("NUL-in-name", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX\x00Y: a\r\n\r\n", {400}, r"header line"),
    ("NUL-in-target", b"GET /\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("NUL-in-method", b"G\x00T / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n", {400}, r"header line|header token"),
    ("empty-header-name", b"GET / HTTP/1.1\r\n: x\r\n\r\n", {400}, r"header line|header token"),
    ("non-ASCII-header-name", "GET / HTTP/1.1\r\nHé: x\r\n\r\n".encode(), {400}, r"header line|header token"),
    ("HTTP/0.9", b"GET /\r\n\r\n", {400}, r"request line"),
    ("HTTP/2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400}, r"request line"),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("lower-case-version", b"GET / http/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("RTSP", b"GET / RTSP/1.0\r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("two-spaces", b"GET  / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("tab-for-space", b"GET\t/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("space-after-version", b"GET / HTTP/1.1 \r\nHost: 127.0.0.1\r\n\r\n", {400}, r"request line"),
    ("non-ASCII-target", "GET /é HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(), {400}, r"request line"),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", {400},
     r"conflicting host"),
    ("101-headers", b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n", {431}, r"more than 100 headers"),
]

# Inputs the two readers read differently, on purpose: (name, request, llhttp, pure), where each
# outcome is an HttpError status or "accepted". None of them is a way to smuggle a request: where
# one reader accepts, RFC 9112 allows it, and both frame the request the same.
DIFFERENCES: list[tuple[str, bytes, int | str, int | str]] = [
    # RFC 9112 §7.1.1 allows BWS before a chunk extension; llhttp does not (no client sends it).
    ("chunk-ext-after-space", chunked(b"2 ;a=b\r\nab\r\n0\r\n\r\n"), 400, "accepted"),
    # chunk-size = 1*HEXDIG: leading zeros are allowed; the pure reader stops at 16 digits.
    ("chunk-size-leading-zeros", chunked(b"00000000000000002\r\nab\r\n0\r\n\r\n"), "accepted", 400),
    # llhttp checks chunk extensions and trailer lines; the pure reader skips them.
    ("chunk-ext-control", chunked(b"2;a=\x01\r\nab\r\n0\r\n\r\n"), 400, "accepted"),
    ("trailer-without-colon", chunked(b"0\r\nBad Trailer\r\n\r\n"), 400, "accepted"),
    ("trailer-content-length", chunked(b"0\r\nContent-Length: 5\r\n\r\n"), 400, "accepted"),
    # llhttp refuses bytes after a request that closes the connection; the broker never reads them.
    ("data-after-close", b"GET / HTTP/1.0\r\n\r\n" + SMUGGLED, 400, "accepted"),
    # llhttp knows its methods (400 otherwise); the pure reader takes any token (405/404 from the routes).
    ("unknown-method", b"FOO / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "accepted"),
    # An upgrade request's body would be taken for the new protocol's bytes by llhttp: refused
    # here; the pure reader reads it, and the broker refuses a WebSocket upgrade with a body.
    ("upgrade-with-body", b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nContent-Length: 5\r\n\r\nhello", 400, "accepted"),
]

# Edge cases RFC 9112 allows: both readers accept them, alike.
VALID: list[tuple[str, bytes]] = [
    ("content-length-with-spaces", post(b"Content-Length: \t 5 \t", body=b"hello")),
    ("content-length-leading-zeros", post(b"Content-Length: 005", body=b"hello")),
    ("chunked-capitals", post(b"Transfer-Encoding: Chunked", body=b"5\r\nhello\r\n0\r\n\r\n")),
    ("chunk-size-capitals", chunked(b"2E\r\n" + b"x" * 46 + b"\r\n0\r\n\r\n")),
    ("chunk-extensions", chunked(b"2;a=b;c=\"d e\"\r\nab\r\n0;last\r\n\r\n")),
    ("trailers", chunked(b"2\r\nab\r\n0\r\nX-Checksum: 1\r\nX-More: 2\r\n\r\n")),
    ("CRLF-CRLF-in-chunk-data", chunked(b"8\r\n\r\n\r\n\r\n\r\n\r\n0\r\n\r\n")),
    ("a-request-in-a-body", post(b"Content-Length: %d" % len(SMUGGLED), body=SMUGGLED)),
    ("empty-lines-first", b"\r\n\r\nGET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("obs-text-in-value", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: caf\xe9\r\n\r\n"),
    ("absolute-form", b"GET http://evil.example/api/emit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("HTTP/1.0", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
    *[(f"test_http_answers-{index}", post(b"Content-Type: application/json",
                                           b"Content-Length: %d" % len(body), body=body))
      for index, body in enumerate([
          b"[" * 100_000 + b"]" * 100_000,
          b'{"channel": "a", "event": "e", "data": ' + b"7" * 5000 + b"}",
          b'{"channel": "a", "event": "e", "data": NaN}',
          b'{"channel": "a", "event": "e", "data": [-Infinity]}',
          b'{"channel": "a", "event": "e", "data": "\xff"}'])],
]


def read(reader_class: Reader, data: bytes, *, byte_by_byte: bool = False,
         max_body: int = 1000) -> tuple[list[Request], HttpError | None]:
    """The requests read from ``data`` and the refusal that ended them, if any."""
    reader = reader_class(max_head=8192, max_body=max_body)
    requests: list[Request] = []
    # Long inputs go in 97-byte pieces (one byte at a time would take seconds and prove no more).
    step = 1 if len(data) <= 5000 else 97
    pieces = [data[i:i + step] for i in range(0, len(data), step)] if byte_by_byte else [data]
    try:
        for piece in pieces:
            reader.feed(piece)
            while (request := reader.next_request()) is not None:
                requests.append(request)
    except HttpError as error:
        return requests, error
    return requests, None


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("reader_name", READERS)
@pytest.mark.parametrize(("data", "statuses", "names"), [case[1:] for case in CORPUS],
                         ids=[case[0] for case in CORPUS])
def test_hostile_requests_are_refused_naming_the_problem(
        reader_name: str, byte_by_byte: bool, data: bytes, statuses: set[int], names: str) -> None:
    requests, error = read(READERS[reader_name], data + SMUGGLED, byte_by_byte=byte_by_byte)
    assert error is not None, f"accepted: {requests}"
    assert error.status in statuses and re.search(names, error.message, re.IGNORECASE), \
        (error.status, error.message)
    assert not any(b"smuggled" in request.body for request in requests)


@pytest.mark.parametrize(("data", "llhttp", "pure"), [case[1:] for case in DIFFERENCES],
                         ids=[case[0] for case in DIFFERENCES])
def test_where_the_readers_differ(data: bytes, llhttp: int | str, pure: int | str) -> None:
    for reader_name, expected in (("llhttp", llhttp), ("pure", pure)):
        requests, error = read(READERS[reader_name], data)
        outcome = "accepted" if error is None else error.status
        assert outcome == expected, (reader_name, error)
        assert requests or error is not None


@pytest.mark.parametrize(("data",), [case[1:] for case in VALID], ids=[case[0] for case in VALID])
def test_what_rfc_9112_allows_both_readers_read_alike(data: bytes) -> None:
    outcomes = []
    for reader_class in READERS.values():
        for byte_by_byte in (False, True) if len(data) < 1000 else (False,):
            requests, error = read(reader_class, data + SMUGGLED, byte_by_byte=byte_by_byte,
                                   max_body=1 << 20)
            assert error is None, error.message
            outcomes.append([(r.head, r.body) for r in requests])
    assert all(outcome == outcomes[0] for outcome in outcomes)
    *_, last = outcomes[0][-1]
    assert last == _SMUGGLED_BODY  # the request that follows is read as one, whole


# -- against a real broker ----------------------------------------------------------------

_CLASSICS = ["CL.TE", "TE.CL", "TE-folded", "TE-chunked-identity", "TE-identity-chunked", "TE-twice",
             "TE-space-before-colon", "TE-in-HTTP/1.0", "CL-twice-same", "CL-list", "chunk-size=0x2e",
             "chunk-size=-2", "chunk-size-2^64", "bare-LF-request", "bare-LF-header", "NUL-in-value",
             "HTTP/0.9", "HTTP/2-preface", "RTSP"]


async def _exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


@pytest.mark.parametrize("reader_name", READERS)
async def test_a_broker_answers_smuggling_with_one_refusal_and_closes(
        start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch, reader_name: str) -> None:
    monkeypatch.setattr(broker.http, "RequestReader", READERS[reader_name])
    served: Broker = await start_broker()
    cases = {case[0]: case for case in CORPUS}
    for name in _CLASSICS:
        _, data, statuses, names = cases[name]
        # The smuggled emit is whole in the same write: a reader that framed the first request
        # differently would answer it.
        received = await _exchange(served.port or 0, data + SMUGGLED)
        head, _, body = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        error = json.loads(body)["error"]
        assert status in statuses and re.search(names, error, re.IGNORECASE), (name, status, error)
        assert received.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in head, (name, received)
    assert served.hub.statistics().publications == 0
