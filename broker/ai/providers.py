"""What a token source looks like to the broker.

A :class:`Provider` turns a conversation into an async iterator of text
pieces, under Trio. The caller owns cancellation: it iterates inside its own
cancel scope and cancelling that scope stops the provider (and, for a
networked provider, its upstream request). A provider reports failures as
:class:`ProviderError`, whose ``code`` names the kind of failure for the
``ai:error`` event and whose ``status`` is the HTTP status the app is answered
with.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: str


class ProviderError(Exception):
    """A token source failed.

    Attributes:
        code: a short name for ``ai:error`` (e.g. ``"upstream_unreachable"``, ``"upstream_timeout"``).
        message: what went wrong, for people.
        status: the HTTP status for the app's request (502 by default, 504 for timeouts).
    """

    def __init__(self, code: str, message: str, *, status: int = 502) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class Provider(Protocol):
    """A source of answer tokens."""

    #: The model used when a request names none.
    default_model: str

    def stream(self, messages: Sequence[ChatMessage], *, model: str,
               max_tokens: int) -> AsyncGenerator[str, None]:
        """Yield the answer to ``messages`` piece by piece, at most ``max_tokens`` pieces.

        An async generator, so the caller can close it (``contextlib.aclosing``) when it stops early.

        Raises:
            ProviderError: the source failed; pieces already yielded stand.
        """
        ...
