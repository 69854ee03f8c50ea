"""The per-connection send path: a byte-bounded, ordered outbox with a non-blocking fast path.

Theory of operation
-------------------
Every byte a connection sends (handshake reply aside) goes through its
:class:`Outbox`, so frames never interleave. :meth:`Outbox.offer` is
synchronous and never waits: when nothing is queued it writes the bytes
straight to the socket with one non-blocking ``os.write``; whatever the
kernel does not take (all of it, or the tail of a partial write) is queued,
and only then is the connection's writer task woken. The writer waits for the
socket to become writable and sends everything queued in one ``os.writev``,
which is how pending frames get joined under load.

The queue is bounded in bytes (``limit``). Items are the publication
``bytes`` objects shared by all subscribers, so a queued byte costs a
reference, not a copy. When the queue passes a quarter of the limit, the
outbox hands what no shrink has seen yet (never a half-written head) to its
:class:`Backlog`, which coalesces queued tokens losslessly; the next attempt
comes halfway between the new size and the limit. Each queued byte is thus
decoded for coalescing at most once, and a replay offered ``compact`` (built
from pages that were coalesced already) not at all. When an offer would pass the limit the
backlog also applies the channels' ``drop`` policy, and if the queue still does
not fit the outbox *overflows*: it drops its backlog (keeping the unsent tail
of a frame that is half on the wire, so the stream stays well-formed), queues
the ``bye`` and close frames it was given for this case, and wakes the
writer, which sends them and returns so the connection can end. The publisher
never waits for a slow reader, and the other subscribers never notice it.

Replies that no queued frame must precede (``ok`` to a ping, pongs, errors)
go in with :meth:`Outbox.offer_urgent`, ahead of the backlog.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from broker.backlog import Backlog
from broker.memory import LARGE, MemoryBudget
from protocol import split_ws_frames

# Kernel limit on iovecs per writev; Linux has 1024.
_IOV_MAX = 1024


class OutboxState(enum.Enum):
    OPEN = "open"  #: accepting offers
    CLOSING = "closing"  #: final frames queued; accepting nothing more
    DEAD = "dead"  #: the socket failed or was given up on; nothing more will be written


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxStatistics:
    """A snapshot of one outbox."""

    state: OutboxState
    bytes_queued: int
    items_queued: int
    #: Bytes of the objects the queue keeps alive (a view keeps its whole object): at most
    #: ``bytes_queued`` plus the sent part of one frame.
    bytes_held: int
    overflowed: bool


class Outbox:
    """Ordered, byte-bounded send queue of one socket. See the module docstring."""

    __slots__ = ("_backlog", "_budget", "_fd", "_fresh", "_head_is_tail", "_last_progress", "_limit",
                 "_lot", "_overflow_frames", "_queue", "_queued", "_shed_frames", "_shrink_at", "_state",
                 "on_overflow", "overflowed")

    def __init__(self, fd: int, *, limit: int, overflow_frames: bytes = b"",
                 on_overflow: Callable[[], None] | None = None, backlog: Backlog | None = None,
                 budget: MemoryBudget | None = None, shed_frames: bytes = b"") -> None:
        """
        Args:
            fd: the connected, non-blocking socket's file descriptor.
            limit: most bytes that may wait in the queue.
            overflow_frames: bytes to send when the queue overflows (``bye`` + close frame).
            on_overflow: called once, synchronously, when the queue overflows (or is shed).
            backlog: what shrinks the queue before it overflows (None: nothing does).
            budget: the broker's memory budget, told of every change in the bytes queued.
            shed_frames: bytes to send when the budget sheds this outbox.
        """
        self._budget = budget
        self._shed_frames = shed_frames
        self._fd = fd
        self._limit = limit
        self._backlog = backlog
        self._shrink_at = limit // 4 if backlog is not None else limit
        self._overflow_frames = overflow_frames
        # A list, not a deque: an empty deque costs 600 bytes more, on every idle connection.
        self._queue: list[bytes | memoryview] = []
        # Whether a half-written head (a memoryview) runs to the end of a bytes object of whole
        # frames (so it can be split after its partly sent frame).
        self._head_is_tail = True
        # Items before this index have been through the backlog (or were offered compact):
        # shrinking them again would cost a decode and gain nothing.
        self._fresh = 0
        self._queued = 0
        self._last_progress = 0.0  # when the queue last became non-empty or the kernel took some of it
        self._state = OutboxState.OPEN
        self._lot = trio.lowlevel.ParkingLot()
        self.overflowed = False
        self.on_overflow = on_overflow

    @property
    def state(self) -> OutboxState:
        return self._state

    @property
    def queued(self) -> int:
        """Bytes waiting to be sent."""
        return self._queued

    def shed(self) -> bool:
        """Drop the backlog and close with the shedding ``bye``: the broker is short of memory.

        False if the outbox was not open (it is closing or dead already).
        """
        if self._state is not OutboxState.OPEN:
            return False
        self._overflow(self._shed_frames)
        return True

    def stalled_for(self, now: float) -> float:
        """Seconds the queue has waited with the kernel taking none of it (0 when nothing is queued)."""
        return now - self._last_progress if self._queue else 0.0

    def statistics(self) -> OutboxStatistics:
        held = 0
        for item in self._queue:
            whole = item.obj if isinstance(item, memoryview) else item
            held += len(whole) if isinstance(whole, bytes) else len(item)
        return OutboxStatistics(state=self._state, bytes_queued=self._queued,
                                items_queued=len(self._queue), bytes_held=held, overflowed=self.overflowed)

    def offer(self, data: bytes, *, compact: bool = False) -> bool:
        """Send ``data`` after everything offered before it, without waiting.

        ``compact`` says ``data`` is already as small as the backlog would make
        it (a replay built from coalesced pages): a later shrink skips it, so a
        large replay is not decoded again the moment it is queued.

        Returns False if the bytes will not be sent: the outbox is closing or
        dead, or this offer made it overflow.
        """
        if self._state is not OutboxState.OPEN:
            return False
        if not self._queue:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                self._die()
                return False
            if written == len(data):
                return True
            rest: bytes | memoryview = memoryview(data)[written:] if written else data
            self._head_is_tail = True
        else:
            rest = data
        self._push(rest)
        if compact and self._fresh == len(self._queue) - 1:
            self._fresh += 1  # everything queued has been shrunk already
        if self._queued > self._shrink_at:
            return self._relieve()
        return True

    def offer_urgent(self, data: bytes) -> bool:
        """Like :meth:`offer`, but ahead of queued frames (after a half-written one).

        For frames no queued frame needs to precede: replies to ``ping``, pongs.
        """
        queue = self._queue
        if self._state is not OutboxState.OPEN or not queue:
            return self.offer(data)
        at = 1 if isinstance(queue[0], memoryview) else 0
        queue.insert(at, data)
        if at < self._fresh:
            self._fresh += 1  # a reply among shrunk items: nothing to coalesce in it either
        self._set_queued(self._queued + len(data))
        if self._queued > self._shrink_at:
            return self._relieve()
        return True

    def close(self, final: bytes = b"") -> None:
        """Queue ``final`` (e.g. ``bye`` and a close frame) after the backlog and accept nothing more.

        The writer returns once everything is sent; bound that with a deadline
        on the writer's cancel scope.
        """
        if self._state is not OutboxState.OPEN:
            return
        self._state = OutboxState.CLOSING
        if final:
            self._push(final)
        self._lot.unpark_all()

    def abort(self) -> None:
        """Give up: drop everything queued and make the writer return now."""
        self._die()

    async def run_writer(self) -> None:
        """Send what :meth:`offer` could not, until the outbox is closed and drained or dead."""
        while True:
            while not self._queue:
                if self._state is not OutboxState.OPEN:
                    return
                await self._lot.park()
            if self._state is OutboxState.DEAD:
                return
            await trio.lowlevel.wait_writable(self._fd)
            self._write_queued()

    # -- internals ------------------------------------------------------------

    def _push(self, data: bytes | memoryview) -> None:
        self._queue.append(data)
        self._set_queued(self._queued + len(data))
        if len(self._queue) == 1:
            self._last_progress = trio.current_time()
            self._lot.unpark_all()

    def _write_queued(self) -> None:
        queue = self._queue
        try:
            written = os.writev(self._fd, queue[:_IOV_MAX])
        except BlockingIOError:
            return
        except OSError:
            self._die()
            return
        self._set_queued(self._queued - written)
        if written:
            self._last_progress = trio.current_time()
        done = 0
        while written:
            head = queue[done]
            if written >= len(head):
                written -= len(head)
                done += 1
            else:
                if isinstance(head, bytes):
                    self._head_is_tail = True
                queue[done] = memoryview(head)[written:]
                written = 0
        del queue[:done]
        self._fresh = max(0, self._fresh - done)
        if not queue and self._backlog is not None:
            self._shrink_at = self._limit // 4

    def _relieve(self) -> bool:
        """The queue passed its shrink mark: coalesce, then drop, then overflow. False on overflow."""
        backlog = self._backlog
        if backlog is not None:
            queue = self._queue
            keep = self._split_head()  # the frame half on the wire stays whole
            for drop in (False, True):
                # Coalescing looks only at what no shrink has seen; dropping looks at everything.
                start = keep if drop else max(keep, self._fresh)
                if start < len(queue):
                    shrunk = backlog.shrink(queue[start:], drop=drop)
                    del queue[start:]
                    queue.extend(shrunk)
                    self._set_queued(sum(len(item) for item in queue))
                self._fresh = len(queue)
                if self._queued <= self._limit:
                    break
        if self._queued > self._limit:
            self._overflow()
            return False
        # Try again halfway to the limit: shrinking costs a decode of the whole queue.
        self._shrink_at = max(self._limit // 4, self._queued + (self._limit - self._queued) // 2)
        return True

    def _split_head(self) -> int:
        """Cut a half-written head item after its partly sent frame; return 1 if there is one, else 0.

        A half-written item is a view of the end of a bytes object of whole
        frames; the frames after the partly sent one can be shrunk like the rest.
        """
        queue = self._queue
        head = queue[0]
        if not isinstance(head, memoryview):
            return 0
        whole = head.obj
        if not isinstance(whole, bytes) or not self._head_is_tail:
            return 1
        frames = split_ws_frames(whole)
        if frames is None:
            return 1
        sent = len(whole) - len(head)
        boundary = next(end for _opcode, _start, _payload, end in frames if end > sent)
        # Copies, not views: a view would keep the whole object alive (sent part included) while
        # only its unsent length is charged; this way the bytes held are the bytes counted.
        if boundary < len(whole):
            queue.insert(1, whole[boundary:])
            if self._fresh >= 1:
                self._fresh += 1  # the head's frames were seen by a shrink: so were the rest of them
        queue[0] = memoryview(whole[sent:boundary])
        self._head_is_tail = False  # the head is now the rest of one frame: nothing to split
        return 1

    def _set_queued(self, queued: int) -> None:
        """Record the bytes queued, telling the memory budget of the change (and of crossing its mark)."""
        budget = self._budget
        if budget is not None:
            was_large = self._queued >= LARGE
            budget.change(queued - self._queued, queued=True)
            if (queued >= LARGE) != was_large:
                budget.track(self, queued >= LARGE)
        self._queued = queued

    def _overflow(self, final: bytes | None = None) -> None:
        # Keep the unsent tail of a frame already partly on the wire (a memoryview:
        # only partial writes make those), drop the rest, then say goodbye.
        head = self._queue[0] if self._queue else None
        if isinstance(head, memoryview):
            self._split_head()  # only the partly sent frame stays (copied out of its bytes)
            head = self._queue[0]
        self._queue.clear()
        self._fresh = 0
        self._set_queued(0)
        if isinstance(head, memoryview):
            self._queue.append(head)
            self._set_queued(len(head))
        self.overflowed = True
        self._state = OutboxState.CLOSING
        final = self._overflow_frames if final is None else final
        if final:
            self._push(final)
        self._lot.unpark_all()
        if self.on_overflow is not None:
            self.on_overflow()

    def _die(self) -> None:
        self._queue.clear()
        self._fresh = 0
        self._set_queued(0)
        self._state = OutboxState.DEAD
        self._lot.unpark_all()
