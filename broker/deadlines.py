"""One task for every connection's deadline (a token's ``exp``, an authentication not yet made).

A task per connection would cost every idle connection a task's memory; this is
one heap and one task. :meth:`Deadlines.set` moves a connection's deadline (a
refreshed token) by pushing a new entry; the old one stays in the heap and is
skipped when it comes up, because it no longer matches the connection's
current deadline. So that a client that refreshes often cannot grow the heap,
it is rebuilt from the live entries whenever stale ones outnumber them: O(1)
amortized per :meth:`set`, and at most about twice as many entries as
connections with a deadline.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import trio


class HasDeadline(Protocol):
    """What :class:`Deadlines` calls: a connection (``deadline`` is kept by it, ``math.inf``: none)."""

    deadline: float

    def deadline_passed(self, now: float) -> None: ...


class Deadlines:
    """Calls ``deadline_passed`` on each registered object when its deadline comes (Trio clock)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, HasDeadline]] = []
        self._order = itertools.count()  # ties broken by insertion, never by comparing objects
        self._live = 0
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def set(self, target: HasDeadline, when: float) -> None:
        """Give ``target`` the deadline ``when`` (``math.inf``: none), replacing any earlier one."""
        if target.deadline != math.inf:
            self._live -= 1
        target.deadline = when
        if when != math.inf:
            self._live += 1
            earliest = self._heap[0][0] if self._heap else math.inf
            heapq.heappush(self._heap, (when, next(self._order), target))
            if when < earliest:
                self._changed.set()  # the task sleeps until the old earliest: wake it
        if len(self._heap) > 2 * self._live + 64:
            # Stale entries keep closed connections alive too: drop them.
            self._heap = [entry for entry in self._heap if entry[2].deadline == entry[0]]
            heapq.heapify(self._heap)

    def clear(self, target: HasDeadline) -> None:
        """``target`` needs no deadline any more (it is closing)."""
        self.set(target, math.inf)

    async def run(self) -> None:
        """Call ``deadline_passed`` on every target whose deadline has come, until cancelled."""
        while True:
            now = trio.current_time()
            heap = self._heap
            while heap and heap[0][0] <= now:
                when, _, target = heapq.heappop(heap)
                if target.deadline == when:
                    target.deadline = math.inf
                    self._live -= 1
                    target.deadline_passed(now)
            self._changed = trio.Event()
            with trio.move_on_at(heap[0][0] if heap else math.inf):
                await self._changed.wait()
