"""Channel streams and their history: the engine interface and the in-memory engine.

Theory of operation
-------------------
An *engine* is the authority on every channel's stream. It gives each
publication its offset within the channel's epoch, encodes it once to the
WebSocket frame every subscriber is sent, keeps the publications that should
be kept, and answers "what came after this position". The hub fans frames out
and asks the engine nothing else, so a different engine (Redis, for several
brokers) replaces :class:`MemoryEngine` without touching the hub.

The methods are synchronous and never wait. That is what makes recovery free
of races: the hub reads a subscriber's missed publications and adds it to the
live stream in one synchronous step, so no publication can fall between the
two. (An engine that must wait on the network needs asynchronous twins of
:meth:`Engine.publish` and :meth:`Engine.since`, plus a buffer for what is
published while it waits; that is for the scale-out work, not this module.)

History is bounded three ways: by count and by age per channel
(``history_size``, ``history_ttl`` of its channel options) and by bytes across
the broker (``history_max_bytes``); past the byte cap the channels published
to least recently lose their oldest publications first. A stream is forgotten,
and its memory released, when it holds no history and no subscriber; the next
publication on that channel starts a new epoch.
"""

from __future__ import annotations

import secrets
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from broker.config import ChannelOptions
from protocol import encode_event, ws_frame

#: Bytes a kept publication costs beyond its frame (object header, list slot, timestamp).
RECORD_OVERHEAD = 64


def new_epoch() -> str:
    """A short random string naming one incarnation of a channel's stream."""
    return secrets.token_urlsafe(6)


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """A publication as the engine recorded it."""

    offset: int
    epoch: str
    frame: bytes  #: the complete WebSocket frame of its ``ev``, the same bytes for every subscriber


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """The answer to :meth:`Engine.since`: kept publications after a position.

    ``frames`` hold the persisted publications with offsets in ``after + 1 …
    last``, in order (publications emitted with ``persist=False`` are not
    kept, so their offsets are skipped). ``recovered`` is True when nothing
    after the asked position is missing: the epoch matched and no publication
    after it had been trimmed. ``more`` is True when ``limit`` or ``max_bytes``
    cut the answer short; ``last`` is then the offset to ask after next.
    """

    epoch: str
    top: int
    after: int
    last: int
    recovered: bool
    more: bool
    frames: list[bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineStatistics:
    streams: int  #: channels whose position the engine keeps
    kept: int  #: publications in history, all channels
    bytes: int  #: bytes of history, all channels (frames plus :data:`RECORD_OVERHEAD` each)
    trimmed_for_bytes: int  #: publications dropped because of ``history_max_bytes``


class Engine(Protocol):
    """What the hub needs from a stream store. Every method returns without waiting."""

    def publish(self, channel: str, event: str, data: Any, *, persist: bool, now: float) -> Stored:
        """Give the publication the channel's next offset, encode it, keep it if ``persist``.

        Raises:
            protocol.LocalProtocolError: ``data`` cannot be encoded.
        """
        ...

    def since(self, channel: str, *, after: int, epoch: str | None, limit: int, max_bytes: int,
              newest: bool = False) -> Replay:
        """Kept publications of ``channel`` after offset ``after``.

        With ``epoch``, the position must be in that epoch and nothing after it
        may be trimmed, or the answer is ``recovered=False`` with no frames.
        Without it, the answer is whatever history holds after ``after`` in the
        current epoch (``recovered`` says whether that is everything). At most
        ``limit`` frames and ``max_bytes`` bytes: the oldest ones, or with
        ``newest`` the newest (then ``after`` moves up and ``recovered`` is False).
        """
        ...

    def position(self, channel: str) -> tuple[str, int]:
        """``channel``'s epoch and top offset (``("", 0)`` for a stream the engine does not keep)."""
        ...

    def hold(self, channel: str) -> None:
        """Keep ``channel``'s stream (its epoch and offsets) while it has a subscriber."""
        ...

    def release(self, channel: str) -> None:
        """Undo one :meth:`hold`."""
        ...

    def expire(self, now: float) -> None:
        """Drop publications older than their channel's ``history_ttl``; forget empty streams."""
        ...

    def statistics(self) -> EngineStatistics: ...


class _Stream:
    """One channel's position and kept publications (``frames[head:]``, oldest first)."""

    __slots__ = ("bytes", "epoch", "frames", "head", "holds", "size", "times", "top", "ttl")

    def __init__(self, options: ChannelOptions) -> None:
        self.epoch = new_epoch()
        self.top = 0
        self.size = options.history_size
        self.ttl = options.history_ttl
        self.frames: list[bytes | None] = []  # None: a publication emitted with persist=False
        self.times = array("d")
        self.head = 0  # frames[:head] are trimmed; compacted away when they are half the list
        self.bytes = 0
        self.holds = 0

    @property
    def kept(self) -> int:
        return len(self.frames) - self.head

    @property
    def first(self) -> int:
        """Offset of the oldest kept publication (``top + 1`` if none)."""
        return self.top - self.kept + 1

    def trim(self, count: int) -> int:
        """Drop the ``count`` oldest kept publications; return the bytes freed."""
        freed = 0
        frames = self.frames
        for index in range(self.head, self.head + count):
            frame = frames[index]
            freed += RECORD_OVERHEAD + (len(frame) if frame is not None else 0)
            frames[index] = None
        self.head += count
        if self.head * 2 >= len(frames):
            del frames[:self.head]
            del self.times[:self.head]
            self.head = 0
        self.bytes -= freed
        return freed

    def expired(self, now: float) -> int:
        """How many of the oldest publications are older than the stream's TTL at ``now``."""
        cutoff = now - self.ttl
        times, index, end = self.times, self.head, len(self.times)
        while index < end and times[index] < cutoff:
            index += 1
        return index - self.head


class MemoryEngine:
    """The embedded engine: streams and history in this process's memory."""

    def __init__(self, options: Callable[[str], ChannelOptions], *, max_bytes: int) -> None:
        """
        Args:
            options: the channel options of a channel name.
            max_bytes: cap on the history of all channels together.
        """
        self._options = options
        self._max_bytes = max_bytes
        # Least recently published first: the first to lose history past max_bytes.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._bytes = 0
        self._trimmed_for_bytes = 0

    def publish(self, channel: str, event: str, data: Any, *, persist: bool, now: float) -> Stored:
        stream = self._streams.get(channel)
        keep = persist and (stream.size if stream else self._options(channel).history_size) > 0
        if stream is None:
            if not keep:
                # Nobody listens and nothing is kept: no stream to remember. Still
                # encode, so what could never be sent is refused the same way.
                frame = ws_frame(encode_event(channel, event, data, 1))
                return Stored(offset=1, epoch=new_epoch(), frame=frame)
            stream = self._streams[channel] = _Stream(self._options(channel))
        else:
            self._streams.move_to_end(channel)
        offset = stream.top + 1
        frame = ws_frame(encode_event(channel, event, data, offset))
        stream.top = offset
        if stream.size > 0:
            # Non-persisted publications keep a placeholder so offsets map to positions.
            stream.frames.append(frame if keep else None)
            stream.times.append(now)
            cost = RECORD_OVERHEAD + (len(frame) if keep else 0)
            stream.bytes += cost
            self._bytes += cost
            over = max(stream.kept - stream.size, stream.expired(now))
            if over > 0:
                self._bytes -= stream.trim(over)
            if self._bytes > self._max_bytes:
                self._trim_to_cap()
        return Stored(offset=offset, epoch=stream.epoch, frame=frame)

    def since(self, channel: str, *, after: int, epoch: str | None, limit: int, max_bytes: int,
              newest: bool = False) -> Replay:
        stream = self._streams.get(channel)
        if stream is None:
            return Replay(epoch="", top=0, after=0, last=0, recovered=epoch is None and after == 0,
                          more=False, frames=[])
        top, first = stream.top, stream.first
        if epoch is not None and (epoch != stream.epoch or after > top or after < first - 1):
            return Replay(epoch=stream.epoch, top=top, after=top, last=top, recovered=False, more=False,
                          frames=[])
        start = min(max(after, first - 1), top)
        recovered = first - 1 <= after <= top
        window = stream.frames[stream.head + (start - first + 1):]
        order = reversed(window) if newest else iter(window)
        frames: list[bytes] = []
        size = count = 0
        more = False
        for frame in order:
            if frame is not None:
                if len(frames) >= limit or size + len(frame) > max_bytes:
                    more = True
                    break
                frames.append(frame)
                size += len(frame)
            count += 1
        if newest:
            frames.reverse()
            if more:
                return Replay(epoch=stream.epoch, top=top, after=top - count, last=top, recovered=False,
                              more=False, frames=frames)
            return Replay(epoch=stream.epoch, top=top, after=start, last=top, recovered=recovered,
                          more=False, frames=frames)
        return Replay(epoch=stream.epoch, top=top, after=start, last=start + count, recovered=recovered,
                      more=more, frames=frames)

    def position(self, channel: str) -> tuple[str, int]:
        stream = self._streams.get(channel)
        return ("", 0) if stream is None else (stream.epoch, stream.top)

    def hold(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(self._options(channel))
            self._streams.move_to_end(channel, last=False)  # no publication yet: first to trim
        stream.holds += 1

    def release(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is None:
            return
        stream.holds -= 1
        if stream.holds <= 0 and stream.kept == 0:
            del self._streams[channel]

    def expire(self, now: float) -> None:
        for name, stream in list(self._streams.items()):
            count = stream.expired(now)
            if count:
                self._bytes -= stream.trim(count)
            if stream.kept == 0 and stream.holds <= 0:
                del self._streams[name]

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(streams=len(self._streams),
                                kept=sum(s.kept for s in self._streams.values()),
                                bytes=self._bytes, trimmed_for_bytes=self._trimmed_for_bytes)

    def _trim_to_cap(self) -> None:
        """Trim the least recently published streams' oldest publications until under the cap."""
        for name, stream in list(self._streams.items()):
            excess, count, frames = self._bytes - self._max_bytes, 0, stream.frames
            while count < stream.kept and excess > 0:
                frame = frames[stream.head + count]
                excess -= RECORD_OVERHEAD + (len(frame) if frame is not None else 0)
                count += 1
            if count:
                self._bytes -= stream.trim(count)
                self._trimmed_for_bytes += count
            if stream.kept == 0 and stream.holds <= 0:
                del self._streams[name]
            if self._bytes <= self._max_bytes:
                return
