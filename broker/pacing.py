"""A rate that every client shares, taken in turns: the broker's history reads.

A replay or a ``GET /api/history`` page costs the broker CPU in proportion to
the history it reads. Each connection has its own rate (``replay_rate``), but
many connections together could still take the whole core; a
:class:`SharedRate` bounds them all together (``history_read_rate``).

Its contract is *spend after the fact, wait in line before*: a reader takes
:meth:`SharedRate.turn` (first come, first served), which lets it through once
what was spent before is paid back at ``rate`` (past a ``burst`` allowance);
the reader then does one bounded step and :meth:`SharedRate.spend` what the
step read. So one turn costs O(1) whatever the number of waiters, the long-run
rate holds, and a waiter only ever waits for bytes really read, never for a
guess. Waiting happens in the caller's task: the cost of an expensive request
is paid by whoever made it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class SharedRate:
    """``rate`` units a second, bursts of ``burst``, shared in FIFO turns. Use from one Trio thread."""

    __slots__ = ("_burst_seconds", "_due", "_lock", "rate")

    def __init__(self, rate: float, *, burst: float) -> None:
        if not rate > 0 or burst < 0:
            raise ValueError(f"rate must be positive and burst not negative, got {rate}, {burst}")
        self.rate = rate
        self._burst_seconds = burst / rate
        # When everything spent so far is paid back at ``rate`` (the theoretical arrival time).
        self._due = -math.inf
        self._lock = trio.Lock()

    def spend(self, amount: float) -> None:
        """Count ``amount`` units used now (e.g. the bytes one step read)."""
        now = trio.current_time()
        self._due = max(self._due, now) + amount / self.rate

    def wait_time(self) -> float:
        """Seconds until a turn would be given, if nobody else were waiting."""
        return max(0.0, self._due - self._burst_seconds - trio.current_time())

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait in line until the rate is not overdrawn; the body should then spend what it uses.

        Always a checkpoint. The body runs before anyone behind in line is let
        through, so it must not await (one synchronous, bounded step).
        """
        async with self._lock:
            delay = self.wait_time()
            if delay > 0:
                await trio.sleep(delay)
            yield
