"""Exception-group helpers for the broker's boundaries."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def first_leaf(group: BaseExceptionGroup[E]) -> E:
    """The first exception in ``group``, however deeply nested.

    For reporting one failure in one line where a nursery wrapped it (a
    listener that cannot bind, an upstream that failed inside a nursery);
    never for deciding what to do when a group may hold several.
    """
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
