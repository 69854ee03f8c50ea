"""HTTP/1.1 requests in, responses out: a strict sans-IO server side, parsed by llhttp.

Every token an app emits over HTTP is one request, so the reader is on the hot
path, and it is the part of a broker most often attacked. h11 spent about
150 µs of CPU per request/response here. The reader parses with llhttp
(Node.js's HTTP parser, in C, strict by default and fuzzed for years; uvicorn
uses it through ``httptools``): about 10 µs per emit request where the
pure-Python reader this broker used before spends about 15 µs, and 36 µs of
broker CPU per emit end to end against 45 µs (:mod:`broker.httpwire_pure`,
kept as a reference; ``python -m bench.httpreader`` measures both,
docs/benchmarks.md has the figures).

What is accepted (RFC 9112, to the letter):

- request line ``METHOD SP target SP HTTP/1.1`` (or ``HTTP/1.0``), methods
  llhttp knows; header lines ``name: value`` with token names and no control
  characters; CRLF only (no bare LF or CR), no obsolete line folding;
- bodies by ``Content-Length`` (ASCII digits) or ``Transfer-Encoding:
  chunked`` (exactly that coding, HTTP/1.1 only; hex chunk sizes, nothing
  else), never both: anything else is how requests get smuggled past a proxy
  that reads them differently; bounded by ``max_body``, heads by ``max_head``
  and 100 header lines;
- keep-alive (HTTP/1.1 default, ``Connection: close`` honoured, HTTP/1.0 only
  with ``Connection: keep-alive``) and pipelining;
- ``Expect: 100-continue`` (curl sends it for bodies over 1 KiB);
- ``Upgrade`` requests without a body; after a WebSocket one, the bytes that
  follow it are left in :attr:`RequestReader.buffered`.

Anything else gets an :class:`HttpError` naming the problem, with the status
to answer. After an error the reader is unusable: answer and close.

Theory of operation: llhttp parses, this module frames. ``httptools`` reports
what llhttp reads through callbacks but never where in the input a message
ended, so a pipelined stream fed whole would run on into the next request and
leave the reader unable to say how large a head is, which bytes follow a
WebSocket upgrade, or what the request line said beyond its method, target
and version (llhttp also takes ``RTSP/1.0`` and runs of spaces there). The
reader therefore feeds llhttp one message at a time, cut where a message can
end: a head at its first CRLF CRLF (llhttp takes CRLF line ends only, so it
agrees, and the head's bytes stay buffered until it is complete, so its size
and request line are checked exactly); a Content-Length body exactly that
many bytes; a chunked body up to each CRLF CRLF in turn (the last chunk, the
trailers and the empty line end with one), checking after each whether it
has ended. llhttp checks every byte (request line, header lines, framing
headers, chunk sizes and extensions, trailers) and decodes the chunks; a
whole head's lines are read here into a :class:`RequestHead` (cheaper than a
callback per header), by the rules llhttp lacks. Should llhttp ever find a
head or a request ending elsewhere than this reader does, the request is
refused, never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools

# Content-Length = 1*DIGIT (llhttp checks that); 18 digits is past any body we accept and
# short enough that int() never meets Python's digit limit.
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_EMPTY_LINES = re.compile(rb"(?:\r\n)+")
_END = b"\r\n\r\n"
_MAX_HEADERS = 100
_REQUEST_LINE_WORDS = ("method", "HTTP", "version", "url", "URL", "protocol")

# What the reader is waiting for.
_HEAD, _LENGTH_BODY, _CHUNKED_BODY, _UPGRADED = range(4)

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 202: "Accepted", 204: "No Content",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 415: "Unsupported Media Type", 421: "Misdirected Request",
    426: "Upgrade Required",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}


class HttpError(Exception):
    """The request cannot be served: answer ``status`` with ``message`` (and ``headers``), then close."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request line and headers (names lower-cased; repeated headers joined by ``, ``)."""

    method: str
    target: str
    http10: bool
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        return "keep-alive" in tokens if self.http10 else "close" not in tokens

    @property
    def is_websocket_upgrade(self) -> bool:
        # Upgrade is a list of protocols; "websocket" must be one of them, not a part of one.
        return "websocket" in {token.strip().lower() for token in self.headers.get("upgrade", "").split(",")}


@dataclass(frozen=True, slots=True)
class Request:
    head: RequestHead
    body: bytes


class RequestReader:
    """Feed bytes from a client; take whole requests out.

    ``next_request()`` returns a :class:`Request`, or None until one is
    complete. ``expects_continue`` says when a client waits for ``100
    Continue`` before sending its body.
    """

    def __init__(self, *, max_head: int = 16 * 1024, max_body: int = 1024 * 1024) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._buffer = bytearray()
        self._fed = 0  # bytes at the start of the buffer already given to llhttp
        self._max_head = max_head
        self._max_body = max_body
        self._state = _HEAD
        self._error: HttpError | None = None  # once refused, refused for good
        self._refused: HttpError | None = None  # raised in a callback, to re-raise past llhttp
        self._upgrade = False  # llhttp paused after an Upgrade request
        # The request being read.
        self._head: RequestHead | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._remaining = 0  # Content-Length bytes not yet fed
        self._stalled = 0  # chunked body bytes fed without any data coming out
        self._progress = False
        self._complete = False
        self._started = False  # llhttp has begun the request
        self._head_read = False  # llhttp has read its head
        self.expects_continue = False
        self._continue_sent = False

    @property
    def buffered(self) -> bytes:
        """Bytes received after the last request returned (e.g. WebSocket data after an upgrade)."""
        return bytes(self._buffer[self._fed:])

    @property
    def held(self) -> int:
        """Bytes this reader holds now: received and not yet taken out, the body being read included."""
        return len(self._buffer) + self._body_size

    @property
    def idle(self) -> bool:
        """True between requests with nothing buffered."""
        return self._state == _HEAD and not self._buffer

    def feed(self, data: bytes) -> None:
        if self._error is None:
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
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except HttpError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    # -- framing ----------------------------------------------------------------

    def _next(self) -> Request | None:
        while True:
            state = self._state
            if state == _HEAD:
                if not self._read_head():
                    return None
            elif state == _LENGTH_BODY:
                buffer = self._buffer
                count = min(self._remaining, len(buffer))
                if not count:
                    return None
                self._feed(0, count)
                del buffer[:count]
                self._remaining -= count
            elif state == _CHUNKED_BODY:
                if not self._read_chunks():
                    return None
            else:  # upgraded: the bytes that follow are not HTTP
                return None
            if self._complete:
                return self._finish()

    def _finish(self) -> Request:
        head = self._head
        assert head is not None
        body = self._body
        request = Request(head, body[0] if len(body) == 1 else b"".join(body))
        self._state = _UPGRADED if self._upgrade and head.is_websocket_upgrade else _HEAD
        self._upgrade = self._complete = self._started = self._head_read = False
        self._head = None
        self._body = []
        self._body_size = 0
        self.expects_continue = self._continue_sent = False
        return request

    def _read_head(self) -> bool:
        """Feed llhttp the head as far as it has come; True once it is complete (and its body, if here)."""
        buffer = self._buffer
        if not self._fed and buffer.startswith((b"\r", b"\n")):
            # Empty lines before a request are ignored (RFC 9112 §2.2); a bare CR or LF is not one.
            match = _EMPTY_LINES.match(buffer)
            if match is not None:
                del buffer[:match.end()]
            if buffer == b"\r" or not buffer:  # the rest of an empty line, or a request, to come
                return False
            if buffer.startswith((b"\r", b"\n")):
                raise HttpError(400, "bad HTTP request line: a bare CR or LF before it")
        fed = self._fed
        end = buffer.find(_END, fed - 3 if fed > 3 else 0)
        if end < 0:
            if len(buffer) > self._max_head:
                raise HttpError(431, f"request head is over the {self._max_head}-byte limit")
            if len(buffer) > fed:  # llhttp refuses garbage before the head is whole
                self._feed(fed, len(buffer))
                self._fed = len(buffer)
            return False
        if end > self._max_head:
            raise HttpError(431, f"request head is over the {self._max_head}-byte limit")
        head, length = self._parse_head(end)
        self._head = head
        stop = end + 4
        if length >= 0 and stop + length <= len(buffer):  # the body is here too: one call for both
            stop += length
            length = 0
        self._feed(fed, stop)
        if not self._head_read:
            # llhttp saw no head end where we did: cannot happen (it takes CRLF line ends only),
            # but if it did, the two would frame requests differently: never accept that.
            raise HttpError(400, "bad HTTP request: its head does not end where it should")
        del buffer[:stop]
        self._fed = 0
        if not self._complete:
            self._state = _CHUNKED_BODY if length < 0 else _LENGTH_BODY
            self._remaining = length
            self._stalled = 0
            if "100-continue" in head.headers.get("expect", "").lower() and not self._continue_sent:
                self.expects_continue = True
        return True

    def _parse_head(self, end: int) -> tuple[RequestHead, int]:
        """The head in ``buffer[:end]`` and its body's length (-1: chunked).

        Read by the rules llhttp does not check.

        llhttp checks the syntax of every line (as it is fed, right after);
        here the lines are read into a :class:`RequestHead`, refusing what llhttp
        would let through and RFC 9112 or this broker does not: ``RTSP/1.0``,
        ``HTTP/2.0``, ``HTTP/0.9`` (no version) and runs of spaces in the request
        line, two Host headers, codings other than chunked.
        """
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        if len(lines) > _MAX_HEADERS + 1:
            raise HttpError(431, f"more than {_MAX_HEADERS} headers")
        words = lines[0].split(" ")
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpError(400, f"bad HTTP request line {lines[0][:100]!r}: "
                                 "expected METHOD SP target SP HTTP/1.1")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.lower()
            value = value.strip(" \t")
            if key in headers:
                if key in ("content-length", "host"):
                    raise HttpError(400, f"conflicting {key} headers")
                headers[key] = f"{headers[key]}, {value}"
            else:
                headers[key] = value
        http10 = words[2] == "HTTP/1.0"
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if encoding is not None:
            if length is not None:
                raise HttpError(400, "a request may not have both Content-Length and Transfer-Encoding")
            if encoding.lower() != "chunked":
                raise HttpError(501, f"unsupported Transfer-Encoding {encoding[:50]!r}")
            if http10:
                # RFC 9112 §6.1: its framing is faulty (an HTTP/1.0 proxy would not decode it).
                raise HttpError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        elif length is not None:
            if _CONTENT_LENGTH.fullmatch(length) is None:
                raise HttpError(400, f"bad Content-Length {length[:30]!r}: expected 1 to 18 ASCII digits")
            size = int(length)
            if size > self._max_body:
                raise HttpError(413, f"body of {size} bytes is over the {self._max_body}-byte limit")
            return RequestHead(words[0], words[1], http10, headers), size
        return RequestHead(words[0], words[1], http10, headers), -1 if encoding is not None else 0

    def _read_chunks(self) -> bool:
        """Feed llhttp the chunked body up to the next place it can end; True if it may go on."""
        buffer = self._buffer
        fed = self._fed  # the last bytes fed (at most 3) stay, so a CRLF CRLF across reads is seen
        end = buffer.find(_END)
        stop = len(buffer) if end < 0 else end + 4
        if stop <= fed:
            return False
        self._progress = False
        self._feed(fed, stop)
        if self._complete:
            del buffer[:stop]
            self._fed = 0
            return True
        if self._progress:
            self._stalled = 0
        else:
            # Chunk-size lines, extensions and trailers only: bounded like a head.
            self._stalled += stop - fed
            if self._stalled > self._max_head:
                raise HttpError(431, f"chunk-size lines or trailers are over the {self._max_head}-byte limit")
        keep = min(stop, 3)
        del buffer[:stop - keep]
        self._fed = keep
        return end >= 0

    def _feed(self, start: int, stop: int) -> None:
        try:
            self._parser.feed_data(self._buffer[start:stop])
        except httptools.HttpParserUpgrade as exc:
            if exc.args[0] != stop - start:  # not where the head ended: never guess
                raise HttpError(400, "bad HTTP request: the upgrade does not start after its head") from None
            self._upgrade = True
        except httptools.HttpParserError as exc:
            if self._refused is not None:
                raise self._refused from None
            raise self._refusal(str(exc)) from None

    def _refusal(self, reason: str) -> HttpError:
        """An error from llhttp, said where it was found."""
        if self._state == _CHUNKED_BODY:
            where = "bad chunked body"
        elif self._state == _LENGTH_BODY:
            where = "bad HTTP request"
        elif b"\r\n" not in self._buffer or any(word in reason for word in _REQUEST_LINE_WORDS):
            where = "bad HTTP request line"
        else:
            where = "bad HTTP header line"
        return HttpError(400, f"{where}: {reason}")

    def _refuse(self, status: int, message: str) -> HttpError:
        """The error a callback raises: llhttp turns it into its own, :meth:`_feed` turns it back."""
        self._refused = error = HttpError(status, message)
        return error

    # -- llhttp's callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self._started or self._state != _HEAD:  # llhttp and this reader disagree on where a request ends
            raise self._refuse(400, "bad HTTP request: a request starts where the last one has not ended")
        self._started = True

    def on_headers_complete(self) -> None:
        head = self._head
        if head is None or self._head_read:  # llhttp ends a head before this reader sees its end
            raise self._refuse(400, "bad HTTP request: its head does not end where it should")
        self._head_read = True
        if self._parser.should_upgrade() and (head.headers.get("content-length", "0") != "0"
                                              or "transfer-encoding" in head.headers):
            # llhttp would leave the body unread, to be taken for the upgraded protocol's bytes.
            raise self._refuse(400, "a request to Upgrade must not have a body")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            raise self._refuse(413, f"body is over the {self._max_body}-byte limit")
        self._body.append(body)
        self._progress = True

    def on_message_complete(self) -> None:
        self._complete = True


def response(status: int, body: bytes, content_type: str = "application/json", *,
              headers: tuple[tuple[str, str], ...] = (), close: bool = False,
              head_only: bool = False) -> bytes:
    """The bytes of a complete response with a ``Content-Length`` body."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
