"""The memory clients make the broker hold, against ``memory_limit``.

What a client can make the broker keep is counted here as it happens, never
by walking connections: the bytes waiting in send buffers (publications,
replays, replies: :class:`~broker.outbox.Outbox` reports every change), the
unfinished WebSocket messages being assembled, the HTTP requests being read,
and the AI conversations kept
for follow-ups. History has its own cap (``history_max_bytes``) beside this one.

The counted bytes are held to :data:`COUNTED_SHARE` of the limit: the rest is
headroom for what cannot be counted exactly (the allocator's free lists, each
connection's own objects, a message being decoded), so that ``memory_limit``
bounds what clients make the process grow by, not only what is counted.

Past that share two things happen:

- *Shedding*: the largest send buffers are cut first (``bye`` SLOW_CONSUMER,
  ``reconnect: true``; the client reconnects and recovers from history) until
  the total is back under :data:`RELIEVED` of the limit. Only buffers over
  :data:`LARGE` are candidates, and the outboxes keep that set up to date as
  they cross the mark, so shedding looks at the few big ones, not everyone.
- *Refusing*: while :attr:`MemoryBudget.over` holds, requests that would make
  the broker build something large (a history page, a replay, a new AI
  answer) are refused (``503``, or ``err`` OVERLOADED) instead of served.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

#: A send buffer this large is a candidate for shedding.
LARGE = 64 * 1024
#: Share of the limit the counted bytes are held to (the rest is headroom for the uncounted).
COUNTED_SHARE = 0.85
#: Shedding stops when the total is under this share of the limit.
RELIEVED = 0.7


def default_memory_limit() -> int:
    """Half of this machine's memory (or of the cgroup's limit, when there is a smaller one)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as cgroup:
            text = cgroup.read().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total // 2


class Sheddable(Protocol):
    """What the budget can cut: a send buffer (an :class:`~broker.outbox.Outbox`)."""

    @property
    def queued(self) -> int: ...

    def shed(self) -> bool:
        """Drop what is queued and close with a ``bye`` saying the broker is short of memory.

        False if it was closing already (then it is on its way out and frees itself).
        """
        ...


class MemoryBudget:
    """Running total of client-held bytes; sheds the largest send buffers past the limit.

    Not thread-safe: use it from the broker's Trio thread.
    """

    def __init__(self, limit: int, *, on_over: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self._threshold = int(limit * COUNTED_SHARE)
        self.used = 0
        self.queued = 0  #: the part of ``used`` waiting in send buffers
        self.shed_count = 0
        self._large: set[Sheddable] = set()
        self._on_over = on_over

    @property
    def over(self) -> bool:
        """Whether the counted bytes are past :data:`COUNTED_SHARE` of the limit."""
        return self.used > self._threshold

    def change(self, delta: int, *, queued: bool = False) -> None:
        """Count ``delta`` more bytes held (negative: released); ``queued``: in a send buffer."""
        self.used += delta
        if queued:
            self.queued += delta
        if delta > 0 and self.used > self._threshold and self._on_over is not None:
            self._on_over()

    def track(self, buffer: Sheddable, large: bool) -> None:
        """Called by a send buffer as it crosses :data:`LARGE` (up: ``large``, down: not)."""
        if large:
            self._large.add(buffer)
        else:
            self._large.discard(buffer)

    def shed(self) -> int:
        """Cut the largest send buffers until under :data:`RELIEVED` of the limit; return how many."""
        target = self.limit * RELIEVED
        cut = 0
        for buffer in sorted(self._large, key=lambda b: b.queued, reverse=True):
            if self.used <= target:
                break
            if buffer.shed():
                cut += 1
            self._large.discard(buffer)
        self.shed_count += cut
        return cut
