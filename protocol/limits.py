"""Limits the decoder enforces, and the rules for channel and event names."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Characters allowed in channel and event names (``ai-chat/3f2a…``, ``ai:token``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/\-]+")

#: Largest command id: 2**53 - 1, so that JavaScript numbers represent every id exactly.
MAX_ID = 2**53 - 1
#: Offsets are unsigned 64-bit integers.
MAX_OFFSET = 2**64 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on what a :class:`~protocol.codec.Decoder` accepts.

    Attributes:
        max_frame_size: largest encoded frame, in bytes.
        max_channel_len: longest channel name, in characters.
        max_event_len: longest event name, in characters.
        max_text_len: longest other text field (epoch, client, msg, user), in characters.
        max_token_len: longest ``token`` (a JWT: RS256 signatures and grant lists make them long).
        max_nesting: deepest nesting of arrays and maps inside ``d``.
    """

    max_frame_size: int = 64 * 1024
    max_channel_len: int = 255
    max_event_len: int = 128
    max_text_len: int = 1024
    max_token_len: int = 8192
    max_nesting: int = 32

    def __post_init__(self) -> None:
        for name in ("max_frame_size", "max_channel_len", "max_event_len", "max_text_len",
                     "max_token_len", "max_nesting"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


#: Limits a server applies to what clients send.
CLIENT_LIMITS = Limits()
#: Limits a client applies to what servers send (replays may batch many events).
SERVER_LIMITS = Limits(max_frame_size=16 * 1024 * 1024)


def name_problem(kind: str, value: object, max_len: int) -> str | None:
    """Say what is wrong with a channel or event name, or return None if it is valid."""
    if not isinstance(value, str):
        return f"{kind} must be a string, got {type(value).__name__}"
    if not value:
        return f"{kind} must not be empty"
    if len(value) > max_len:
        return f"{kind} is {len(value)} characters long; the limit is {max_len}"
    if NAME_PATTERN.fullmatch(value) is None:
        return (f"{kind} {value[:64]!r} has characters outside "
                "A-Z a-z 0-9 and _ . : / -")
    return None


def channel_problem(value: object, limits: Limits = CLIENT_LIMITS) -> str | None:
    """Say what is wrong with a channel name, or return None if it is valid."""
    return name_problem("channel name", value, limits.max_channel_len)


def event_problem(value: object, limits: Limits = CLIENT_LIMITS) -> str | None:
    """Say what is wrong with an event name, or return None if it is valid."""
    return name_problem("event name", value, limits.max_event_len)
