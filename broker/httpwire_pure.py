"""The pure-Python HTTP/1.1 request reader the broker used before llhttp: kept as a reference.

:mod:`broker.httpwire` reads requests with llhttp (through ``httptools``).
This reader, written for the emit path when h11 proved too slow, follows the
same interface and refuses the same hostile inputs (the corpus in
``tests/abuse/test_http_smuggling.py`` runs through both, and a property test
checks that they read every valid request alike); ``python -m
bench.httpreader`` measures the two. Nothing in the broker imports it.

Strictly RFC 9112: request line ``METHOD SP target SP HTTP/1.1`` (or
``HTTP/1.0``); header lines ``name: value`` with token names, no obsolete line
folding; bodies by ``Content-Length`` (ASCII digits) or ``Transfer-Encoding:
chunked`` (hex digits, nothing else), never both; keep-alive, pipelining and
``Expect: 100-continue``.
"""

from __future__ import annotations

import re

from broker.httpwire import HttpError, Request, RequestHead

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.([01])")
_HEADER_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Content-Length = 1*DIGIT (ASCII only: str.isdigit() also takes "²" and "٣"); 18 digits is
# past any body we accept and short enough that int() never meets Python's digit limit.
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-size = 1*HEXDIG; chunk-ext = *( BWS ";" ... ).
# Exactly that: no sign, no "0x", no "_", no leading space, which int(x, 16) would all take
# and a proxy in front may read differently (request smuggling).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?")
_MAX_HEADERS = 100


class RequestReader:
    """Feed bytes from a client; take whole requests out.

    ``next_request()`` returns a :class:`Request`, or None until one is
    complete. ``expects_continue`` says when a client waits for ``100
    Continue`` before sending its body.
    """

    def __init__(self, *, max_head: int = 16 * 1024, max_body: int = 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._max_head = max_head
        self._max_body = max_body
        self._head: RequestHead | None = None
        self._length: int | None = None  # Content-Length of the current body, or None for chunked
        self._chunks: bytearray | None = None  # decoded chunked body so far
        self.expects_continue = False
        self._continue_sent = False

    @property
    def buffered(self) -> bytes:
        """Bytes received after the last request returned (e.g. WebSocket data after an upgrade)."""
        return bytes(self._buffer)

    @property
    def held(self) -> int:
        """Bytes this reader holds now: received and not yet taken out, a decoded chunked body included."""
        return len(self._buffer) + (len(self._chunks) if self._chunks is not None else 0)

    @property
    def idle(self) -> bool:
        """True between requests with nothing buffered."""
        return self._head is None and not self._buffer

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def continue_sent(self) -> None:
        """Record that ``100 Continue`` was sent, so it is not sent twice."""
        self._continue_sent = True
        self.expects_continue = False

    def next_request(self) -> Request | None:
        """The next complete request, or None if more bytes are needed.

        Raises:
            HttpError: the bytes are not an acceptable HTTP/1.1 request.
        """
        if self._head is None:
            head = self._parse_head()
            if head is None:
                return None
            self._head = head
            self._start_body(head)
        body = self._read_body()
        if body is None:
            return None
        request = Request(self._head, body)
        self._head = None
        self._length = None
        self._chunks = None
        self.expects_continue = False
        self._continue_sent = False
        return request

    # -- head -------------------------------------------------------------------

    def _parse_head(self) -> RequestHead | None:
        buffer = self._buffer
        # Tolerate empty lines before a request (RFC 9112 §2.2).
        while buffer.startswith(b"\r\n"):
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self._max_head:
                raise HttpError(431, f"request head is over the {self._max_head}-byte limit")
            if buffer and not buffer[:1].isalpha() and buffer != b"\r":
                raise HttpError(400, "bad HTTP request: does not start with a method")
            return None
        if end > self._max_head:
            raise HttpError(431, f"request head is over the {self._max_head}-byte limit")
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[:end + 4]
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise HttpError(400, f"bad HTTP request line {lines[0][:100]!r}")
        if len(lines) - 1 > _MAX_HEADERS:
            raise HttpError(431, f"more than {_MAX_HEADERS} headers")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                raise HttpError(400, f"bad HTTP header line {line[:100]!r}")
            value = value.strip(b" \t")
            if _HEADER_VALUE_BAD.search(value):
                raise HttpError(400, f"bad characters in header {name.decode('latin-1')}")
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            if key in headers:
                if key in ("content-length", "host"):
                    raise HttpError(400, f"conflicting {key} headers")
                headers[key] = f"{headers[key]}, {text}"
            else:
                headers[key] = text
        method, target, minor = match.groups()
        return RequestHead(method.decode("ascii"), target.decode("ascii"), minor == b"0", headers)

    # -- body -------------------------------------------------------------------

    def _start_body(self, head: RequestHead) -> None:
        encoding = head.headers.get("transfer-encoding")
        length = head.headers.get("content-length")
        if encoding is not None:
            if length is not None:
                raise HttpError(400, "a request may not have both Content-Length and Transfer-Encoding")
            if encoding.strip().lower() != "chunked":
                raise HttpError(501, f"unsupported Transfer-Encoding {encoding[:50]!r}")
            if head.http10:
                raise HttpError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
            self._chunks = bytearray()
        elif length is not None:
            if _CONTENT_LENGTH.fullmatch(length) is None:
                raise HttpError(400, f"bad Content-Length {length[:30]!r}: expected 1 to 18 ASCII digits")
            self._length = int(length)
            if self._length > self._max_body:
                raise HttpError(413, f"body of {self._length} bytes is over the {self._max_body}-byte limit")
        else:
            self._length = 0
        if "100-continue" in head.headers.get("expect", "").lower() and not self._continue_sent:
            self.expects_continue = True

    def _read_body(self) -> bytes | None:
        buffer = self._buffer
        if self._chunks is None:
            length = self._length or 0
            if len(buffer) < length:
                return None
            body = bytes(buffer[:length])
            del buffer[:length]
            return body
        chunks = self._chunks
        while True:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 1024:
                    raise HttpError(400, "bad chunked body: chunk size line too long")
                return None
            size_line = _CHUNK_SIZE.fullmatch(buffer, 0, end)
            if size_line is None:
                raise HttpError(400, f"bad chunked body: chunk size line {bytes(buffer[:min(end, 20)])!r} "
                                     "is not hex digits (and an optional ;extension)")
            size = int(size_line.group(1), 16)
            if size == 0:
                # Last chunk, then optional trailers, then an empty line.
                trailer_end = buffer.find(b"\r\n\r\n", end)
                if trailer_end < 0 and buffer[end:end + 4] != b"\r\n\r\n":
                    if len(buffer) > self._max_head:
                        raise HttpError(431, "chunked trailers are too large")
                    return None
                stop = end + 4 if buffer[end:end + 4] == b"\r\n\r\n" else trailer_end + 4
                del buffer[:stop]
                return bytes(chunks)
            if len(chunks) + size > self._max_body:
                raise HttpError(413, f"body is over the {self._max_body}-byte limit")
            if len(buffer) < end + 2 + size + 2:
                return None
            if buffer[end + 2 + size:end + 4 + size] != b"\r\n":
                raise HttpError(400, "bad chunked body: chunk not followed by CRLF")
            chunks += buffer[end + 2:end + 2 + size]
            del buffer[:end + 4 + size]
