"""Errors the broker's in-process API raises, apart from the modules that raise them."""

from __future__ import annotations


class EmitError(ValueError):
    """An in-process emit was given an invalid channel, event or data; the message says which."""


class EngineUnavailable(RuntimeError):
    """The engine cannot reach Redis now; the operation may or may not have happened. Retry later."""
