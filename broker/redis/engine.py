"""The Redis engine: channel streams in Redis, shared by every broker node that uses it.

Theory of operation
-------------------
*Publishing.* :meth:`RedisEngine.publish` encodes the frame once (its offset a
placeholder, see :mod:`broker.redis.scripts`) and queues it. The publisher task
sends everything queued in one pipelined write of ``EVALSHA`` calls, one per
publication, on one connection: Redis runs them in the order they were queued,
so emits from one caller stay in order, and a burst of tokens costs one round
trip. Each script call gives the publication the channel's next offset (the
meta hash is the authority, so every node agrees), keeps it in the channel's
stream when it should be kept, and publishes the finished frame.

*Receiving.* A node subscribes (one pub/sub connection for the node, not one
per client) to the channels it has subscribers on. Each channel it follows has
a :class:`Mirror`: its epoch, the top offset this node has delivered, and the
recent kept frames (a few hundred KiB at most), so the hub can join a new
subscriber to the live stream synchronously, as on the memory engine. Every
message goes through the mirror before the hub sees it: offsets at or below
the top are duplicates and are dropped; an offset past ``top + 1`` means
messages were lost (the pub/sub connection was cut), so later ones wait while
the missing range is read from the stream; an epoch that differs means the
stream was started again (Redis lost it), which the mirror takes as the new
truth.

*Following a channel.* :meth:`RedisEngine.lease` makes sure the node follows a
channel before a subscriber reads history: it subscribes, waits for Redis's
confirmation (from then on every publication reaches the node), then reads the
meta hash; publications up to that top come from the stream, later ones from
pub/sub. A channel is followed while it has leases or hub holds; when the last
goes, it is unsubscribed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from broker.config import ChannelOptions
from broker.errors import EngineUnavailable
from broker.groups import first_leaf
from broker.history import EngineStatistics, Replay, Stored
from broker.redis.resp import (
    PubSub,
    RedisAddress,
    RedisConnection,
    RedisError,
    RedisUnavailable,
    open_connection,
    open_pubsub,
)
from broker.redis.scripts import OFFSET_PLACEHOLDER, PUBLISH, PUBLISH_SHA, Keys, parse_message
from protocol import LocalProtocolError, encode_event, ws_frame

log = logging.getLogger("tokenfan.redis")

#: Most publications sent in one pipelined write.
MAX_BATCH = 512
#: Most bytes of publications waiting to be sent (emits past it wait; emit_nowait raises).
MAX_QUEUED_BYTES = 16 * 1024 * 1024
#: Recent kept frames a mirror holds, in bytes (always at least the newest one).
MIRROR_BYTES = 256 * 1024
#: How long a stream's meta hash outlives its last publication, at least (seconds).
META_TTL = 24 * 3600
#: Wait before connecting again after Redis was lost: doubles from the first to the last.
RECONNECT_BACKOFF = (0.05, 2.0)
#: Least time between two warnings that Redis is away.
WARN_EVERY = 30.0
#: How long a command may take before Redis counts as unavailable.
COMMAND_TIMEOUT = 5.0


@dataclass(slots=True)
class _Queued:
    keys: tuple[bytes, bytes, bytes]
    args: tuple[bytes, bytes, int, int, int]
    done: trio.Event | None
    result: tuple[str, int] | BaseException | None = None


class Mirror:
    """What this node knows of a channel it follows. See the module docstring."""

    __slots__ = (
        "epoch",
        "follows",
        "gap_filling",
        "holds",
        "pending",
        "ready",
        "recent",
        "recent_bytes",
        "recent_from",
        "top",
    )

    def __init__(self) -> None:
        self.epoch = ""
        self.top = 0
        self.holds = 0  # leases and hub holds
        self.ready = trio.Event()  # set once subscribed and the top is known
        self.follows = False
        self.recent: deque[tuple[int, bytes]] = deque()  # (offset, frame) of kept publications
        self.recent_bytes = 0
        self.recent_from = 0  # every kept publication after this offset is in ``recent``
        self.pending: list[tuple[bool, int, bytes]] = []  # (kept, offset, frame) waiting for a gap fill
        self.gap_filling = False

    def keep(self, offset: int, frame: bytes) -> None:
        self.recent.append((offset, frame))
        self.recent_bytes += len(frame)
        while self.recent_bytes > MIRROR_BYTES and len(self.recent) > 1:
            dropped, old = self.recent.popleft()
            self.recent_bytes -= len(old)
            self.recent_from = dropped

    def restart(self, epoch: str, top: int) -> None:
        self.epoch, self.top, self.recent_from = epoch, top, top
        self.recent.clear()
        self.recent_bytes = 0
        self.pending.clear()


class RedisEngine:
    """Channel streams on Redis. Run :meth:`run` in a nursery before anything else."""

    def __init__(self, url: str, options: Callable[[str], ChannelOptions], *,
                 deliver: Callable[[str, bytes], None] | None = None, prefix: str = "tokenfan") -> None:
        """
        Args:
            url: ``redis://`` or ``rediss://`` URL (see :class:`RedisAddress`).
            options: the options of a channel (history size and TTL).
            deliver: called with (channel, frame) for each publication to fan out here, in order.
            prefix: the first part of every key.
        """
        self.address = RedisAddress.parse(url)
        self.keys = Keys(prefix)
        self._options = options
        self.deliver: Callable[[str, bytes], None] = deliver or (lambda channel, frame: None)
        #: Called with a followed channel whose stream began again in a new epoch (before its
        #: first publication in the new epoch is delivered).
        self.restarted: Callable[[str], None] = lambda channel: None
        self._mirrors: dict[str, Mirror] = {}
        self._queue: list[_Queued] = []
        self._queued_bytes = 0
        self._queue_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()
        self._follow_requests: trio.MemorySendChannel[str] | None = None
        self._connection: RedisConnection | None = None
        self._pubsub: PubSub | None = None
        self._connected_once = False
        self._warned = -math.inf
        self._nursery: trio.Nursery | None = None
        self.published = 0
        self.received = 0
        self.gaps_filled = 0
        self.round_trips = 0
        self.errors = 0

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, publish and follow channels until cancelled, connecting again when Redis is lost.

        ``task_status.started()`` is called once connected the first time. While Redis is
        away, publishing and following raise :class:`EngineUnavailable` at once.

        Raises:
            EngineUnavailable: Redis cannot be reached at start.
        """
        started: list[bool] = []
        delay = RECONNECT_BACKOFF[0]
        while True:
            lost: BaseException | None = None
            try:
                await self._session(started, task_status)
            except* (RedisUnavailable, RedisError, trio.TooSlowError) as group:
                lost = first_leaf(group)
            finally:
                self._connection = self._pubsub = self._nursery = None
                self._fail_queued(EngineUnavailable(f"Redis at {self.address} is unavailable"))
                for mirror in self._mirrors.values():
                    mirror.follows = False
            if not started:
                raise EngineUnavailable(str(lost))
            self.errors += 1
            now = trio.current_time()
            if now - self._warned >= WARN_EVERY:
                log.warning("lost Redis at %s (%s); connecting again, every %.2f-%.0f s",
                            self.address, lost, *RECONNECT_BACKOFF)
                self._warned = now
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_BACKOFF[1])
            if self._connected_once:
                delay = RECONNECT_BACKOFF[0]

    async def _session(self, started: list[bool], task_status: trio.TaskStatus[None]) -> None:
        """One pair of connections, from connecting to losing either (which raises)."""
        self._connected_once = False
        async with open_connection(self.address) as connection, \
                open_pubsub(self.address, self._on_message) as pubsub, \
                trio.open_nursery() as nursery:
            await connection.execute("SCRIPT", "LOAD", PUBLISH)
            self._connection, self._pubsub, self._nursery = connection, pubsub, nursery
            await self._follow_again()
            self._connected_once = True
            if not started:
                started.append(True)
                task_status.started()
            nursery.start_soon(self._publisher, connection)
            await self._watch(connection, pubsub)

    @staticmethod
    async def _watch(connection: RedisConnection, pubsub: PubSub) -> None:
        """Raise :class:`RedisUnavailable` when either connection is lost."""
        async with trio.open_nursery() as nursery:
            async def until(lost: trio.Event) -> None:
                await lost.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, connection.lost)
            nursery.start_soon(until, pubsub.lost)
        raise RedisUnavailable("a connection to Redis was lost")

    async def _follow_again(self) -> None:
        """After connecting: follow every channel that has holders, filling what was missed."""
        for channel, mirror in list(self._mirrors.items()):
            if mirror.holds > 0:
                await self._follow(channel, mirror)

    # -- publishing ------------------------------------------------------------------

    def _encode(self, channel: str, event: str, data: Any, *, persist: bool,
                done: trio.Event | None) -> _Queued:
        frame = ws_frame(encode_event(channel, event, data, OFFSET_PLACEHOLDER))
        options = self._options(channel)
        ttl_ms = max(1, math.ceil(options.history_ttl * 1000))
        meta_ttl = max(META_TTL, math.ceil(options.history_ttl))
        keys = (self.keys.meta(channel), self.keys.stream(channel), self.keys.pubsub(channel))
        args = (frame, b"1" if persist else b"0", options.history_size, ttl_ms, meta_ttl)
        return _Queued(keys=keys, args=args, done=done)

    async def publish(self, channel: str, event: str, data: Any, *, persist: bool) -> Stored:
        """Publish through Redis; return the offset and epoch Redis gave it.

        Raises:
            protocol.LocalProtocolError: ``data`` cannot be encoded.
            EngineUnavailable: Redis is unavailable (the publication may not have happened).
        """
        item = self._encode(channel, event, data, persist=persist, done=trio.Event())
        while self._queued_bytes > MAX_QUEUED_BYTES:
            await self._room_lot.park()
        self._enqueue(item)
        assert item.done is not None
        await item.done.wait()
        result = item.result
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        epoch, offset = result
        return Stored(offset=offset, epoch=epoch, frame=b"")

    async def publish_many(self, publications: list[tuple[str, str, Any, bool]]) -> list[Stored]:
        """Publish ``(channel, event, data, persist)`` in order, queued together (one round trip).

        All are encoded before any is queued, so data that cannot be encoded publishes none.
        Redis has no rollback: if it is lost halfway, some may have been published.

        Raises:
            protocol.LocalProtocolError: some ``data`` cannot be encoded.
            EngineUnavailable: Redis is unavailable.
        """
        items = [self._encode(channel, event, data, persist=persist, done=trio.Event())
                 for channel, event, data, persist in publications]
        while self._queued_bytes > MAX_QUEUED_BYTES:
            await self._room_lot.park()
        for item in items:
            self._enqueue(item)
        stored = []
        for item in items:
            assert item.done is not None
            await item.done.wait()
            if isinstance(item.result, BaseException):
                raise item.result
            assert item.result is not None
            stored.append(Stored(offset=item.result[1], epoch=item.result[0], frame=b""))
        return stored

    def publish_nowait(self, channel: str, event: str, data: Any, *, persist: bool) -> None:
        """Queue a publication without waiting for its offset (in order with every other).

        Raises:
            protocol.LocalProtocolError: ``data`` cannot be encoded.
            EngineUnavailable: too much is queued already (Redis is slow or away).
        """
        item = self._encode(channel, event, data, persist=persist, done=None)
        if self._queued_bytes > MAX_QUEUED_BYTES:
            raise EngineUnavailable(f"more than {MAX_QUEUED_BYTES} bytes wait to be published on Redis")
        self._enqueue(item)

    def _enqueue(self, item: _Queued) -> None:
        if self._nursery is None:
            raise EngineUnavailable(f"Redis at {self.address} is unavailable")
        self._queue.append(item)
        self._queued_bytes += len(item.args[0])
        if len(self._queue) == 1:
            self._queue_lot.unpark_all()

    def _fail_queued(self, error: BaseException) -> None:
        queue, self._queue = self._queue, []
        self._queued_bytes = 0
        self._room_lot.unpark_all()
        for item in queue:
            item.result = error
            if item.done is not None:
                item.done.set()
            else:
                log.warning("a publication on %s was lost: %s", item.keys[2].decode(errors="replace"), error)

    async def _publisher(self, connection: RedisConnection) -> None:
        while True:
            while not self._queue:
                await self._queue_lot.park()
            batch = self._queue[:MAX_BATCH]
            del self._queue[:MAX_BATCH]
            self._queued_bytes -= sum(len(item.args[0]) for item in batch)
            self._room_lot.unpark_all()
            commands = [("EVALSHA", PUBLISH_SHA, 3, *item.keys, *item.args, new_epoch()) for item in batch]
            try:
                with trio.fail_after(COMMAND_TIMEOUT):
                    replies = await connection.pipeline(commands)
            except BaseException:
                # Lost with the connection (or cancelled): these may or may not have been published.
                for item in batch:
                    item.result = EngineUnavailable(f"Redis at {self.address} was lost while publishing")
                    if item.done is not None:
                        item.done.set()
                raise
            self.round_trips += 1
            for item, reply in zip(batch, replies, strict=True):
                if isinstance(reply, RedisError):
                    item.result = EngineUnavailable(f"Redis refused a publication: {reply}")
                    self.errors += 1
                else:
                    item.result = (reply[0].decode(), int(reply[1]))
                    self.published += 1
                if item.done is not None:
                    item.done.set()
                elif isinstance(item.result, BaseException):
                    log.warning("a publication was lost: %s", item.result)

    # -- following channels ------------------------------------------------------------

    async def lease(self, channel: str) -> None:
        """Follow ``channel`` (if this node does not yet) and hold it until :meth:`unlease`.

        Returns once the node receives every publication on it and knows its top.

        Raises:
            EngineUnavailable: Redis is unavailable (the lease is not held).
        """
        mirror = self._mirrors.get(channel)
        if mirror is None:
            mirror = self._mirrors[channel] = Mirror()
        mirror.holds += 1
        try:
            if not mirror.follows:
                if self._nursery is None:
                    raise EngineUnavailable(f"Redis at {self.address} is unavailable")
                await self._follow(channel, mirror)
            with trio.fail_after(COMMAND_TIMEOUT):
                await mirror.ready.wait()
        except BaseException as exc:
            self.unlease(channel)
            if isinstance(exc, (RedisUnavailable, trio.TooSlowError)):
                raise EngineUnavailable(f"Redis at {self.address} is unavailable: {exc}") from None
            raise

    def unlease(self, channel: str) -> None:
        """Undo one :meth:`lease`; the node stops following the channel with its last holder."""
        mirror = self._mirrors.get(channel)
        if mirror is None:
            return
        mirror.holds -= 1
        if mirror.holds <= 0:
            del self._mirrors[channel]
            pubsub, nursery = self._pubsub, self._nursery
            if mirror.follows and pubsub is not None and nursery is not None:
                nursery.start_soon(self._unfollow, channel)

    async def _unfollow(self, channel: str) -> None:
        if channel in self._mirrors or self._pubsub is None:
            return  # followed again meanwhile
        with contextlib.suppress(RedisUnavailable):  # if the connection is gone, so are its subscriptions
            await self._pubsub.unsubscribe(self.keys.pubsub(channel))

    async def _follow(self, channel: str, mirror: Mirror) -> None:
        """Subscribe, then read the top: every later publication reaches the mirror."""
        pubsub, connection = self._pubsub, self._connection
        if pubsub is None or connection is None:
            raise RedisUnavailable(f"Redis at {self.address} is unavailable")
        if mirror.follows:
            return
        mirror.follows = True  # messages from now on are held until the top is known
        was_ready = mirror.ready.is_set()
        meta = self.keys.meta(channel)
        with trio.fail_after(COMMAND_TIMEOUT):
            await pubsub.subscribe(self.keys.pubsub(channel))
            # A channel nobody published on yet gets its epoch now, as the memory engine's does
            # when it is first subscribed to: every node's subscribers are told the same one.
            _created, _ttl, (epoch, top) = await connection.pipeline([
                ["HSETNX", meta, "e", new_epoch()],
                ["EXPIRE", meta, max(META_TTL, math.ceil(self._options(channel).history_ttl))],
                ["HMGET", meta, "e", "t"]])
        epoch_text, top_number = (epoch or b"").decode(), int(top or 0)
        if not was_ready:
            mirror.restart(epoch_text, top_number)
            pending, mirror.pending = mirror.pending, []
            mirror.ready.set()
            for kept, offset, frame in pending:
                self._accept(channel, mirror, kept, offset, epoch_text, frame)
        elif epoch_text != mirror.epoch:
            mirror.restart(epoch_text, top_number)  # Redis lost the stream while we were away
            self.restarted(channel)
        elif top_number > mirror.top:
            self._fill_gap(channel, mirror, top_number + 1)

    # -- receiving ---------------------------------------------------------------------

    def _on_message(self, pubsub_channel: bytes, message: bytes) -> None:
        self.received += 1
        try:
            channel = self.keys.channel_of(pubsub_channel)
            kept, offset, epoch, frame = parse_message(message)
        except (ValueError, UnicodeDecodeError):
            log.warning("a message on %r is not one tokenfan publishes: ignored", pubsub_channel[:200])
            return
        mirror = self._mirrors.get(channel)
        if mirror is None:
            return  # no longer followed
        if not mirror.ready.is_set():
            mirror.pending.append((kept, offset, frame))
            return
        self._accept(channel, mirror, kept, offset, epoch, frame)

    def _accept(self, channel: str, mirror: Mirror, kept: bool, offset: int, epoch: str,
                frame: bytes) -> None:
        if epoch != mirror.epoch:
            if mirror.epoch:
                self.restarted(channel)
            if offset != 1 and mirror.epoch:
                # A new stream that began while we were not looking: read it from the start.
                mirror.restart(epoch, 0)
                mirror.pending.append((kept, offset, frame))
                self._fill_gap(channel, mirror, offset)
                return
            mirror.restart(epoch, offset - 1)
        if mirror.gap_filling:
            mirror.pending.append((kept, offset, frame))
            return
        if offset <= mirror.top:
            return  # a duplicate of what a gap fill delivered
        if offset > mirror.top + 1:
            mirror.pending.append((kept, offset, frame))
            self._fill_gap(channel, mirror, offset)
            return
        self._deliver(channel, mirror, kept, offset, frame)

    def _deliver(self, channel: str, mirror: Mirror, kept: bool, offset: int, frame: bytes) -> None:
        mirror.top = offset
        if kept:
            mirror.keep(offset, frame)
        self.deliver(channel, frame)

    def _fill_gap(self, channel: str, mirror: Mirror, before: int) -> None:
        """Read the kept publications in ``(top, before)`` from the stream, then the pending ones."""
        if mirror.gap_filling or self._nursery is None:
            return
        mirror.gap_filling = True
        self._nursery.start_soon(self._fill, channel, mirror, before)

    async def _fill(self, channel: str, mirror: Mirror, before: int) -> None:
        try:
            entries = await self._xrange(channel, mirror.top, before - 1, count=None)
        except (RedisUnavailable, trio.TooSlowError):
            mirror.gap_filling = False
            return  # connecting again re-follows and fills
        mirror.gap_filling = False
        if self._mirrors.get(channel) is not mirror:
            return
        self.gaps_filled += 1
        for offset, frame, _time in entries:
            if offset > mirror.top and frame:  # an empty frame: one that was not kept (and is lost)
                self._deliver(channel, mirror, True, offset, frame)
        mirror.top = max(mirror.top, before - 1)
        pending, mirror.pending = mirror.pending, []
        for kept, offset, frame in sorted(pending, key=lambda item: item[1]):
            self._accept(channel, mirror, kept, offset, mirror.epoch, frame)

    # -- reading history -------------------------------------------------------------

    async def _xrange(self, channel: str, after: int, last: int,
                      count: int | None) -> list[tuple[int, bytes, int]]:
        """Stream entries with offsets in ``(after, last]``: (offset, frame, time in ms)."""
        connection = self._connection
        if connection is None:
            raise RedisUnavailable(f"Redis at {self.address} is unavailable")
        if last <= after:
            return []
        args: list[bytes | str | int] = ["XRANGE", self.keys.stream(channel), f"{after + 1}-0", f"{last}-0"]
        if count is not None:
            args += ["COUNT", count]
        with trio.fail_after(COMMAND_TIMEOUT):
            reply = await connection.execute(*args)
        return [_entry(entry) for entry in reply]

    async def read(self, channel: str, *, after: int, epoch: str | None, limit: int, max_bytes: int,
                   newest: bool = False) -> Replay:
        """Like :meth:`broker.history.Engine.since`, read from Redis (the stream and its meta).

        Raises:
            EngineUnavailable: Redis is unavailable.
        """
        connection = self._connection
        if connection is None:
            raise EngineUnavailable(f"Redis at {self.address} is unavailable")
        try:
            return await self._read(connection, channel, after=after, epoch=epoch, limit=limit,
                                    max_bytes=max_bytes, newest=newest)
        except (RedisUnavailable, RedisError, trio.TooSlowError) as exc:
            raise EngineUnavailable(f"reading history from Redis failed: {exc}") from None

    async def _read(self, connection: RedisConnection, channel: str, *, after: int, epoch: str | None,
                    limit: int, max_bytes: int, newest: bool) -> Replay:
        stream_key = self.keys.stream(channel)
        with trio.fail_after(COMMAND_TIMEOUT):
            meta, first, clock = await connection.pipeline([
                ["HMGET", self.keys.meta(channel), "e", "t"],
                ["XRANGE", stream_key, "-", "+", "COUNT", 1],
                ["TIME"]])
        for reply in (meta, first, clock):
            if isinstance(reply, RedisError):
                raise reply
        current, top = (meta[0] or b"").decode(), int(meta[1] or 0)
        if not current:
            return Replay(epoch="", top=0, after=0, last=0, recovered=epoch is None and after == 0,
                          more=False, frames=[])
        if epoch is not None and (epoch != current or after > top):
            return Replay(epoch=current, top=top, after=top, last=top, recovered=False, more=False, frames=[])
        # Every publication is in the stream (one not kept as an empty placeholder), so the
        # oldest entry says what was trimmed. Entries past the TTL count as trimmed too: Redis
        # drops a stream only once it is idle that long.
        oldest = _entry_offset(first[0][0]) if first else top + 1
        start = min(max(after, oldest - 1), top)
        cutoff = int(clock[0]) * 1000 + int(clock[1]) // 1000 - self._options(channel).history_ttl * 1000
        recovered = oldest - 1 <= after <= top
        want = max(1, min(limit, 1000))
        args: list[bytes | str | int] = (
            ["XREVRANGE", stream_key, f"{top}-0", f"({start}-0"] if newest
            else ["XRANGE", stream_key, f"({start}-0", f"{top}-0"])
        with trio.fail_after(COMMAND_TIMEOUT):
            reply = await connection.execute(*args, "COUNT", want)
        entries = [_entry(entry) for entry in reply]
        frames: list[bytes] = []
        size = 0
        if newest:
            taken = start
            for offset, frame, time_ms in entries:  # newest first
                full = bool(frames) and (len(frames) >= limit or size + len(frame) > max_bytes)
                if time_ms < cutoff or (frame and full):
                    break
                if frame:
                    frames.append(frame)
                    size += len(frame)
                taken = offset - 1
            frames.reverse()
            if taken > start or (len(entries) == want and entries[-1][0] > start + 1):
                return Replay(epoch=current, top=top, after=max(taken, start), last=top, recovered=False,
                              more=False, frames=frames)
            return Replay(epoch=current, top=top, after=start, last=top, recovered=recovered, more=False,
                          frames=frames)
        covered, more = start, False
        for offset, frame, time_ms in entries:  # oldest first
            if time_ms < cutoff:
                recovered = False  # expired: as good as trimmed
                covered = offset
                continue
            if frame:
                if frames and (len(frames) >= limit or size + len(frame) > max_bytes):
                    more = True
                    break
                frames.append(frame)
                size += len(frame)
            covered = offset
        if not more and len(entries) == want and covered < top:
            more = True
        return Replay(epoch=current, top=top, after=start, last=covered if more else top,
                      recovered=recovered, more=more, frames=frames)

    # -- the hub's synchronous view (of followed channels) -----------------------------------

    def since(self, channel: str, *, after: int, epoch: str | None, limit: int, max_bytes: int,
              newest: bool = False) -> Replay:
        """From the mirror: what the node received after ``after`` (the end of a recovery)."""
        mirror = self._mirrors.get(channel)
        if mirror is None or not mirror.ready.is_set():
            return Replay(epoch="", top=0, after=0, last=0, recovered=False, more=False, frames=[])
        top = mirror.top
        if (epoch is not None and epoch != mirror.epoch) or after < mirror.recent_from or after > top:
            return Replay(epoch=mirror.epoch, top=top, after=top, last=top, recovered=False, more=False,
                          frames=[])
        frames = [frame for offset, frame in mirror.recent if offset > after]
        return Replay(epoch=mirror.epoch, top=top, after=after, last=top, recovered=True, more=False,
                      frames=frames)

    def position(self, channel: str) -> tuple[str, int]:
        mirror = self._mirrors.get(channel)
        return ("", 0) if mirror is None else (mirror.epoch, mirror.top)

    def hold(self, channel: str) -> None:
        mirror = self._mirrors.get(channel)
        if mirror is None:
            mirror = self._mirrors[channel] = Mirror()
        mirror.holds += 1

    def release(self, channel: str) -> None:
        self.unlease(channel)

    def expire(self, now: float, *, budget: int) -> bool:
        return False  # Redis expires streams itself; reads skip entries past their TTL

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(streams=len(self._mirrors), histories=0, kept=0, bytes=0, trimmed_for_bytes=0)

    @property
    def connected(self) -> bool:
        return self._nursery is not None


def new_epoch() -> bytes:
    return secrets.token_urlsafe(6).encode()


def _entry_offset(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def _entry(entry: list[Any]) -> tuple[int, bytes, int]:
    """(offset, frame, time in ms) of a stream entry (fields ``f`` and ``t``)."""
    entry_id, fields = entry
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    return _entry_offset(entry_id), values[b"f"], int(values[b"t"])


__all__ = ["EngineUnavailable", "LocalProtocolError", "Mirror", "RedisEngine"]
