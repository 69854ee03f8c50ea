"""The publisher's errors: one root, :class:`PublishError`, and a class per way a call can fail.

::

    PublishError
    ├── BrokerUnreachable      no HTTP answer came: refused, reset, DNS, TLS, a dropped connection
    │   └── BrokerTimedOut     ... or not within the publisher's ``timeout``
    ├── Rejected               the broker answered with an error status: ``status``, ``message``
    │   └── AnswerFailed       POST /ai/chat: the answer started, then failed (502, 504): ``code``
    ├── BadResponse            an answer that is not the broker's API (a proxy's page? a wrong URL?)
    ├── InvalidEvent           (also a ValueError) the event's data cannot be encoded to send
    ├── TooManyPending         emit_nowait: ``max_pending`` emits are already waiting to be sent
    ├── EmitsFailed            flush() or exit: emits made with emit_nowait failed: ``count``, ``first``
    └── PublisherClosed        the publisher is not open (outside ``async with``, or closed)

An emit that fails with :class:`BrokerUnreachable` after its request was sent
may or may not have been published: the publisher never retries an emit
(publishing is not idempotent). A :class:`Rejected` emit was not published.
"""

from __future__ import annotations


class PublishError(Exception):
    """Root of the publisher's errors."""


class BrokerUnreachable(PublishError):
    """No HTTP answer came from the broker at ``url``; the underlying error is the ``__cause__``."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the broker at {url}: {reason}")
        self.url = url
        self.reason = reason


class BrokerTimedOut(BrokerUnreachable):
    """The broker did not connect, accept the request or answer within the publisher's ``timeout``."""


class Rejected(PublishError):
    """The broker answered with an error status; ``message`` is its ``error`` text.

    400 names the bad field or event, 404/405 a wrong path or method, 409 a
    session already answering, 413 a body or batch over the broker's limits,
    429 too many answers at once, 503 a broker that is not serving.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the broker refused ({status}): {message}")
        self.status = status
        self.message = message


class AnswerFailed(Rejected):
    """``POST /ai/chat`` with ``wait``: the answer streamed, then ended in ``ai:error``.

    ``code`` is the ``ai:error`` code (``upstream_unreachable``, ``timeout``,
    … see docs/ai-streaming.md); ``tokens`` were already sent to the channel.
    """

    def __init__(self, status: int, message: str, *, code: str, channel: str, tokens: int) -> None:
        PublishError.__init__(self, f"the answer on {channel} failed ({status} {code}) after {tokens} "
                                    f"tokens: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.channel = channel
        self.tokens = tokens


class BadResponse(PublishError):
    """The answer is not what the broker's API sends: is the URL a tokenfan broker's?"""


class InvalidEvent(PublishError, ValueError):
    """The event cannot be encoded for sending (data of a type msgpack cannot write); nothing was sent."""


class TooManyPending(PublishError):
    """``emit_nowait`` found ``max_pending`` emits already waiting; ``await emit(...)`` waits for room."""

    def __init__(self, max_pending: int) -> None:
        super().__init__(f"{max_pending} emits are already waiting to be sent (max_pending); "
                         "await emit(...) instead to wait for room")
        self.max_pending = max_pending


class EmitsFailed(PublishError):
    """Emits made with ``emit_nowait`` failed; ``first`` is the first failure, ``count`` how many."""

    def __init__(self, count: int, first: Exception) -> None:
        super().__init__(f"{count} emit(s) made with emit_nowait failed; the first: {first}")
        self.count = count
        self.first = first


class PublisherClosed(PublishError):
    """The publisher is not open: use it inside ``async with`` (or ``with``), before it closes."""
