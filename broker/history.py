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

Cost at any number of channels
------------------------------
A client can make a stream per channel name it emits to, so nothing here
walks all streams: every operation costs the same at ten channels or two
million (amortized over the publications it trims, each trimmed once).

- *Which stream loses history past the cap*: the streams that hold history
  are kept on a doubly linked list in the order they were last published to
  (a publish moves its stream to the newest end in O(1)); the cap trims from
  the oldest end. A stream held only by subscribers is not on it.
- *When history expires*: a timing wheel. Each stream with history sits in
  exactly one bucket, a list keyed by a time at or before its oldest kept
  publication's deadline (a stream leaves it in O(1): the bucket's last
  stream takes its place); a heap holds the bucket keys (a few thousand at
  most: key steps are ``history_ttl / 4096``, 0.25 s at least). The sweep
  pops due buckets, trims what has expired and files the stream again under
  its new oldest publication's deadline. :meth:`MemoryEngine.expire` looks at
  ``budget`` streams per call and says whether more are due, so the caller can
  yield between batches however many streams expire in the same second.
- *Totals*: publications and bytes kept are running sums.
- *Frames*: a stream keeps its frames back to back in one buffer, so a
  publication costs no Python object of its own and a stream one, which is
  all CPython's garbage collector has to visit. (Its full collections still
  visit every stream, once per 25% growth of long-lived objects: constant per
  publication, but a pause that grows with the streams, 0.35 s at a million.)

Accounting
----------
``history_max_bytes`` bounds the memory history takes, not only its frames: a
stream with history is charged :data:`STREAM_COST` plus the size of its
channel name, and each kept publication :data:`SLOT_COST` plus 9/8 of its
frame's length (nothing, if not persisted). The constants come from measuring
resident memory (see their comments and ``python -m bench run history-scale``).
A stream held by subscribers and holding no history is not charged: its cost
is bounded by the subscriptions that hold it (``max_subscriptions`` per
connection), and it is forgotten with the last of them.
"""

from __future__ import annotations

import heapq
import math
import secrets
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from broker.config import ChannelOptions
from protocol import encode_event, ws_frame

# What history costs in memory, measured on CPython 3.11 (64-bit, pymalloc) with
# tracemalloc, sys._debugmallocstats and resident memory: 100k-2M streams of one
# publication, 100-10,000 streams of up to 10,000, frames of 50 and 1,500 bytes,
# with and without the cap trimming. Resident memory came within 0.90-1.15x of
# the charge in every case; ``python -m bench run history-scale`` checks it again.

#: Bytes a stream holding history costs beyond its channel name's ``str`` and its
#: publications: the ``_Stream`` (128), its epoch string (64), two bytearrays
#: (64 + 64) and the rounding of their buffers (about 16), its expiry slot (an
#: int, 32, and a bucket entry, 8), its share of the streams dict (30-100: the
#: table is kept 1.5-3x the entries, and holds the forgotten ones' places until
#: it grows), and pymalloc's pools and arenas (5-15 %).
STREAM_COST = 490
#: Bytes a kept publication costs besides its frame: its record (16) and the
#: bytearrays' over-allocation. Frames themselves are charged 9/8 of their length
#: (a bytearray grows by an eighth; a trimmed start is reclaimed when it grows).
SLOT_COST = 16

#: Expiry buckets span ``history_ttl / EXPIRY_STEPS`` seconds (at least :data:`EXPIRY_MIN_STEP`),
#: so a TTL class never has more than about this many buckets.
EXPIRY_STEPS = 4096
#: Shortest span of an expiry bucket, in seconds (how late, at most, a publication expires).
EXPIRY_MIN_STEP = 0.25


def stream_charge(channel: str, kept: int, frame_bytes: int) -> int:
    """What history charges for ``channel`` holding ``kept`` publications of ``frame_bytes`` in all."""
    if not kept:
        return 0  # held by subscribers only: see "Accounting"
    return STREAM_COST + sys.getsizeof(channel) + kept * SLOT_COST + _frames_cost(frame_bytes)


def _frames_cost(size: int) -> int:
    """What ``size`` bytes of kept frames are charged: 9/8 of them."""
    return size + (size >> 3)


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
    streams: int  #: channels whose position the engine keeps (with history or subscribers)
    histories: int  #: channels holding history
    kept: int  #: publications in history, all channels
    bytes: int  #: memory history is charged for, all channels (see "Accounting" in the module notes)
    trimmed_for_bytes: int  #: publications dropped because of ``history_max_bytes``


class Engine(Protocol):
    """What the hub needs from a stream store to join subscribers. Every method returns without waiting.

    On the Redis engine these answer from what this node follows (its mirror of
    the channel); publishing and reading older history are asynchronous there
    (:class:`broker.redis.engine.RedisEngine`).
    """

    def since(self, channel: str, *, after: int, epoch: str | None, limit: int, max_bytes: int,
              newest: bool = False) -> Replay:
        """Kept publications of ``channel`` after offset ``after``.

        With ``epoch``, the position must be in that epoch and nothing after it
        may be trimmed, or the answer is ``recovered=False`` with no frames.
        Without it, the answer is whatever history holds after ``after`` in the
        current epoch (``recovered`` says whether that is everything). At most
        ``limit`` frames and ``max_bytes`` bytes (but always one frame, if there is one): the oldest, or with
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

    def expire(self, now: float, *, budget: int) -> bool:
        """Drop publications older than their channel's ``history_ttl``; forget empty streams.

        Looks at no more than ``budget`` streams; returns True if more are due
        at ``now`` (call again, after letting others run).
        """
        ...

    def statistics(self) -> EngineStatistics: ...


class LocalEngine(Engine, Protocol):
    """An engine that publishes in this process, synchronously (the memory engine)."""

    def publish(self, channel: str, event: str, data: Any, *, persist: bool, now: float) -> Stored:
        """Give the publication the channel's next offset, encode it, keep it if ``persist``.

        Raises:
            protocol.LocalProtocolError: ``data`` cannot be encoded.
        """
        ...


#: Epochs of never-published streams remembered (each about 150 bytes), the oldest forgotten first.
UNPUBLISHED_EPOCHS = 10_000

#: A kept publication's record: where its frame ends, counting every frame byte the
#: stream has kept in this incarnation (a placeholder's ends where the one before it
#: does), and its time.
_RECORD = struct.Struct("=Qd")
_RECORD_SIZE = _RECORD.size  # 16


class _Stream:
    """One channel's position and kept publications, oldest first.

    The kept frames are ``data``, back to back, and ``meta`` holds a
    :data:`_RECORD` for each kept publication: two bytearrays, which trim
    their start in O(1). A frame costs no Python object of its own, and the
    garbage collector has this one object per stream to look at (a list or an
    ``array`` would add one each). ``newer`` and ``older`` link the streams
    holding history in publish order (None off that list); ``bucket`` is the
    expiry bucket the stream is filed in, at index ``slot``.
    """

    __slots__ = ("bucket", "data", "epoch", "holds", "meta", "name", "newer", "older", "options", "slot",
                 "top")

    def __init__(self, name: str, options: ChannelOptions) -> None:
        self.name = name
        self.epoch = new_epoch()
        self.top = 0
        self.options = options  # shared by every channel of its pattern
        self.data = bytearray()
        self.meta = bytearray()
        self.holds = 0
        self.newer: _Stream | None = None
        self.older: _Stream | None = None
        self.bucket: list[_Stream] | None = None
        self.slot = 0

    @property
    def kept(self) -> int:
        return len(self.meta) // _RECORD_SIZE

    @property
    def first(self) -> int:
        """Offset of the oldest kept publication (``top + 1`` if none)."""
        return self.top - self.kept + 1

    def cost(self) -> int:
        """What the stream is charged (see "Accounting" in the module notes)."""
        return stream_charge(self.name, self.kept, len(self.data))

    def _end(self, index: int) -> int:
        """Where the ``index``-th kept frame ends (-1: where the oldest starts), counted like records."""
        meta = self.meta
        if index < 0:
            return int(_RECORD.unpack_from(meta, len(meta) - _RECORD_SIZE)[0]) - len(self.data)
        return int(_RECORD.unpack_from(meta, index * _RECORD_SIZE)[0])

    def oldest_time(self) -> float:
        return float(_RECORD.unpack_from(self.meta, 0)[1])

    def append(self, frame: bytes | None, now: float) -> None:
        """Keep a publication (``None``: a placeholder, for one emitted with ``persist=False``)."""
        meta = self.meta
        end = _RECORD.unpack_from(meta, len(meta) - _RECORD_SIZE)[0] if meta else 0
        if frame is not None:
            self.data += frame
            end += len(frame)
        meta += _RECORD.pack(end, now)

    def trim(self, count: int) -> None:
        """Drop the ``count`` oldest kept publications."""
        del self.data[:self._end(count - 1) - self._end(-1)]
        del self.meta[:count * _RECORD_SIZE]

    def to_free(self, excess: int) -> int:
        """How many of the oldest publications to trim to free ``excess`` bytes (all, if not enough)."""
        cost, kept, size, name = self.cost(), self.kept, len(self.data), self.name
        if cost <= excess:
            return kept
        start = self._end(-1)
        count = 0
        while count < kept:
            count += 1
            if cost - stream_charge(name, kept - count, size - (self._end(count - 1) - start)) >= excess:
                break
        return count

    def expired(self, now: float) -> int:
        """How many of the oldest publications are older than the stream's TTL at ``now``."""
        cutoff = now - self.options.history_ttl
        meta, count, kept = self.meta, 0, self.kept
        while count < kept and _RECORD.unpack_from(meta, count * _RECORD_SIZE)[1] < cutoff:
            count += 1
        return count

    def frames(self, start: int, *, newest: bool, limit: int,
               max_bytes: int) -> tuple[list[bytes], int, bool]:
        """Kept frames from the ``start``-th kept publication on: the oldest (or ``newest``) that fit.

        Returns the frames in order, how many publications they cover
        (placeholders included) and whether some were left out. The first
        frame is returned even if it alone is over ``max_bytes``, so a reader
        that pages through always makes progress. The work is what is
        returned, wherever it starts.
        """
        frames: list[bytes] = []
        size = count = 0
        more = False
        if start >= self.kept:
            return frames, count, more
        base = self._end(-1)
        with memoryview(self.data) as data:
            if newest:
                indices = range(self.kept - 1, start - 1, -1)
                end = len(data) + base
            else:
                indices = range(start, self.kept)
                end = self._end(start - 1)
            for index in indices:
                if newest:
                    low, high = self._end(index - 1), end
                    end = low
                else:
                    low, high = end, self._end(index)
                    end = high
                length = high - low
                if length:
                    if len(frames) >= limit or (frames and size + length > max_bytes):
                        more = True
                        break
                    frames.append(data[low - base:high - base].tobytes())
                    size += length
                count += 1
        if newest:
            frames.reverse()
        return frames, count, more


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
        self._streams: dict[str, _Stream] = {}
        # The streams holding history, in a ring through this sentinel: its ``older``
        # is the most recently published one, its ``newer`` the least (the first to trim).
        self._lru = _Stream("", ChannelOptions())
        self._lru.newer = self._lru.older = self._lru
        # Expiry: bucket key (a time) -> the streams filed there; a heap of those keys.
        self._buckets: dict[float, list[_Stream]] = {}
        self._due: list[float] = []
        self._histories = 0
        self._kept = 0
        self._bytes = 0
        self._trimmed_for_bytes = 0
        # Epochs of streams forgotten before their first publication (every subscriber left
        # at once): nobody can have missed anything in them, so the channel's next stream takes
        # its epoch back, and a client that reconnects at offset 0 of it recovers exactly.
        self._unpublished: OrderedDict[str, str] = OrderedDict()

    def _new_stream(self, channel: str, options: ChannelOptions) -> _Stream:
        stream = self._streams[channel] = _Stream(channel, options)
        epoch = self._unpublished.pop(channel, None)
        if epoch is not None:
            stream.epoch = epoch
        return stream

    # -- the interface -------------------------------------------------------------

    def publish(self, channel: str, event: str, data: Any, *, persist: bool, now: float) -> Stored:
        stream = self._streams.get(channel)
        offset = 1 if stream is None else stream.top + 1
        # Encoded first: what cannot be encoded leaves no trace.
        frame = ws_frame(encode_event(channel, event, data, offset))
        if stream is None:
            options = self._options(channel)
            if not (persist and options.history_size > 0):
                # Nobody listens and nothing is kept: no stream to remember.
                return Stored(offset=1, epoch=new_epoch(), frame=frame)
            stream = self._new_stream(channel, options)
        stream.top = offset
        if stream.options.history_size > 0:
            # Non-persisted publications keep a placeholder so offsets map to positions.
            self._append(stream, frame if persist else None, now)
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
        frames, count, more = stream.frames(start - first + 1, newest=newest, limit=limit,
                                            max_bytes=max_bytes)
        if newest:
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
            stream = self._new_stream(channel, self._options(channel))
        stream.holds += 1

    def release(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is None:
            return
        stream.holds -= 1
        if stream.holds <= 0 and stream.newer is None:  # no subscriber, no history
            del self._streams[channel]
            if stream.top == 0:
                self._unpublished[channel] = stream.epoch
                if len(self._unpublished) > UNPUBLISHED_EPOCHS:
                    self._unpublished.popitem(last=False)

    def expire(self, now: float, *, budget: int = 1000) -> bool:
        """Trim what has expired at ``now`` in at most ``budget`` streams; True if more are due."""
        due, buckets = self._due, self._buckets
        while due and due[0] <= now:
            key = due[0]
            bucket = buckets[key]
            while bucket:
                if budget <= 0:
                    return True
                budget -= 1
                stream = bucket.pop()
                stream.bucket = None
                count = stream.expired(now)
                if count:
                    self._trim(stream, count)
                if stream.newer is not None:  # history remains: file it under its new deadline
                    self._schedule(stream, after=key)
            heapq.heappop(due)
            del buckets[key]
        if sys.getsizeof(self._streams) > 256 * len(self._streams) + 65536:
            # A dict keeps its table when entries leave: after a mass expiry (or
            # unsubscribe) copy it to one its size. O(streams left), and only
            # after several times that many were forgotten.
            self._streams = dict(self._streams)
        return False

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(streams=len(self._streams), histories=self._histories, kept=self._kept,
                                bytes=self._bytes, trimmed_for_bytes=self._trimmed_for_bytes)

    # -- keeping the bounds --------------------------------------------------------

    def _append(self, stream: _Stream, frame: bytes | None, now: float) -> None:
        """Keep a publication (``None``: a placeholder) and enforce every bound."""
        lru = self._lru
        size = len(stream.data)
        stream.append(frame, now)
        # The change in stream.cost(), without recounting it.
        self._bytes += SLOT_COST + _frames_cost(len(stream.data)) - _frames_cost(size)
        self._kept += 1
        if stream.newer is None:
            # Its first history: charged from now on, linked as the newest, filed for expiry.
            self._bytes += STREAM_COST + sys.getsizeof(stream.name)
            self._histories += 1
            self._link_newest(stream)
            self._schedule(stream, after=-math.inf)
        elif stream.newer is not lru:  # not already the most recently published
            self._unlink(stream)
            self._link_newest(stream)
        over = max(stream.kept - stream.options.history_size, stream.expired(now))
        if over > 0:
            self._trim(stream, over)
        if self._bytes > self._max_bytes:
            self._trim_to_cap()

    def _link_newest(self, stream: _Stream) -> None:
        lru = self._lru
        last = lru.older
        assert last is not None
        stream.older, stream.newer = last, lru
        last.newer = lru.older = stream

    @staticmethod
    def _unlink(stream: _Stream) -> None:
        newer, older = stream.newer, stream.older
        assert newer is not None and older is not None
        newer.older, older.newer = older, newer
        stream.newer = stream.older = None

    def _trim(self, stream: _Stream, count: int) -> None:
        """Drop ``stream``'s ``count`` oldest publications; forget what it held if that was all."""
        size = len(stream.data)
        stream.trim(count)
        self._bytes -= count * SLOT_COST + _frames_cost(size) - _frames_cost(len(stream.data))
        self._kept -= count
        if not stream.meta:
            # Off the publish-order list and out of its expiry bucket; no longer charged.
            self._bytes -= STREAM_COST + sys.getsizeof(stream.name)
            self._unlink(stream)
            self._unfile(stream)
            self._histories -= 1
            if stream.holds <= 0:
                del self._streams[stream.name]

    def _trim_to_cap(self) -> None:
        """Trim the least recently published streams' oldest publications until under the cap.

        Each step either empties the least recently published stream (which
        leaves the list) or brings the total under the cap, so the work is what
        is trimmed, never the number of streams.
        """
        lru = self._lru
        while self._bytes > self._max_bytes:
            stream = lru.newer
            if stream is None or stream is lru:
                return
            count = stream.to_free(self._bytes - self._max_bytes)
            self._trimmed_for_bytes += count
            self._trim(stream, count)

    def _schedule(self, stream: _Stream, *, after: float) -> None:
        """File ``stream`` for expiry at its oldest publication's deadline, in a bucket past ``after``."""
        ttl = stream.options.history_ttl
        deadline = stream.oldest_time() + ttl
        if not math.isfinite(deadline):
            return  # never expires
        step = max(EXPIRY_MIN_STEP, ttl / EXPIRY_STEPS)
        key = math.ceil(deadline / step) * step
        if key <= after:
            key = after + step
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = []
            heapq.heappush(self._due, key)
        stream.bucket, stream.slot = bucket, len(bucket)
        bucket.append(stream)

    @staticmethod
    def _unfile(stream: _Stream) -> None:
        """Take ``stream`` out of its expiry bucket (the bucket's last stream takes its place)."""
        bucket = stream.bucket
        if bucket is None:
            return
        last = bucket.pop()
        if last is not stream:
            bucket[stream.slot] = last
            last.slot = stream.slot
        stream.bucket = None
