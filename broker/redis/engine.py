"""The Redis engine: channel streams in Redis, shared by every broker node that uses it.

Theory of operation
-------------------
*Publishing.* :meth:`RedisEngine.publish` encodes the frame once (its offset a
placeholder, see :mod:`broker.redis.scripts`) and queues it. The publisher task
sends everything queued (up to :data:`MAX_BATCH` publications) in one script
call on one connection, grouped by channel in the order they were queued, so
emits from one caller stay in order, and a burst of tokens on many channels
costs one round trip and one ``EVALSHA``. The script gives each channel's
publications its next offsets (the meta hash is the authority, so every node
agrees), keeps them in the channel's stream as one entry, and publishes them
as one message.

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
    Pending,
    PubSub,
    RedisAddress,
    RedisConnection,
    RedisError,
    RedisUnavailable,
    open_connection,
    open_pubsub,
)
from broker.redis.scripts import (
    FOLLOW,
    FOLLOW_SHA,
    OFFSET_PLACEHOLDER,
    PUBLISH,
    PUBLISH_SHA,
    Keys,
    parse_message,
    split_body,
)
from protocol import LocalProtocolError, encode_event, ws_frame

log = logging.getLogger("tokenfan.redis")

#: Most publications sent in one pipelined write (and in one script call).
MAX_BATCH = 512
#: Least time between two flushes (seconds): a token waits at most this long for company.
FLUSH_TICK = 0.001
#: Flushes sent and not yet answered, at most: Redis works on one while the node builds the next.
IN_FLIGHT = 4
#: Most bytes of publications sent in one pipelined write (at least one publication).
MAX_FLUSH_BYTES = 1024 * 1024
#: Most bytes of publications waiting to be sent (emits past it wait; emit_nowait raises).
MAX_QUEUED_BYTES = 16 * 1024 * 1024
#: Recent kept frames a mirror holds, in bytes (always at least the newest one).
#: It only has to cover what arrives while a new subscriber's last page is read from Redis (a
#: round trip), so it is small: a channel with subscribers on many nodes costs this on each.
MIRROR_BYTES = 64 * 1024
#: How long the epoch of a channel nobody has published on is kept after its last subscriber
#: leaves (seconds; nodes renew it while they follow the channel): subscribing to names nobody
#: publishes on costs Redis a key each for about this long.
UNPUBLISHED_TTL = 60
#: How long a stream's meta hash outlives its last publication, at least (seconds).
META_TTL = 24 * 3600
#: Wait before connecting again after Redis was lost: doubles from the first to the last.
RECONNECT_BACKOFF = (0.05, 2.0)
#: How long a publication or a new subscription waits for a connection being opened again.
RECONNECT_WAIT = 1.0
#: Least time between two warnings that Redis is away.
WARN_EVERY = 30.0
#: Channels followed again in one batch after the pub/sub connection was reopened.
FOLLOW_BATCH = 512
#: Channels whose encoded keys and options are kept (the cache is emptied when it fills).
_PARTS_CACHE = 10_000
#: Stream entries (batches) read by one XRANGE.
_READ_ENTRIES = 64
#: How long a command may take before Redis counts as unavailable.
COMMAND_TIMEOUT = 5.0


#: A publication read from a stream: offset, kept in history, frame (empty if not kept), Redis ms.
Publication = tuple[int, bool, bytes, int]


@dataclass(slots=True)
class _Queued:
    """A publication waiting to be sent: its frame (offset a placeholder), and who waits for it."""

    channel: str
    frame: bytes
    kept: bool
    done: trio.Event | None
    result: tuple[str, int] | BaseException | None = None


class Mirror:
    """What this node knows of a channel it follows. See the module docstring."""

    __slots__ = (
        "epoch",
        "follows",
        "gap_filling",
        "holds",
        "incarnation",
        "moved",
        "pending",
        "ready",
        "recent",
        "recent_bytes",
        "recent_from",
        "top",
        "waiting",
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
        # (kept, offset, epoch, frame) waiting for the top to be known or for a gap fill
        self.pending: list[tuple[bool, int, str, bytes]] = []
        self.gap_filling = False
        self.incarnation = 0  # changes when the mirror restarts: a gap fill begun before gives up
        self.moved = trio.lowlevel.ParkingLot()  # woken when the top moves, if anyone waits
        self.waiting = 0

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
        self.gap_filling = False
        self.incarnation += 1
        self.moved_on()

    def moved_on(self) -> None:
        if self.waiting:
            self.moved.unpark_all()


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
        self._control = self.keys.control()
        self._options = options
        self.deliver: Callable[[str, bytes], None] = deliver or (lambda channel, frame: None)
        #: Called with a followed channel whose stream began again in a new epoch (before its
        #: first publication in the new epoch is delivered).
        self.restarted: Callable[[str], None] = lambda channel: None
        #: Called with each command another node (or this one) sent every node (:meth:`notify`).
        self.on_command: Callable[[bytes], None] = lambda command: None
        self._mirrors: dict[str, Mirror] = {}
        self._queue: list[_Queued] = []
        self._parts: dict[str, tuple[bytes, bytes]] = {}  # channel -> its encoded keys and options
        self._scripts_lost = False  # Redis answered NOSCRIPT: load them again before the next flush
        self._queued_bytes = 0
        self._queue_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()
        self._follow_requests: trio.MemorySendChannel[str] | None = None
        self._connection: RedisConnection | None = None
        self._pubsub: PubSub | None = None
        self._connected_once = False
        self._connected = trio.Event()  # set while the command connection is up
        self._following = trio.Event()  # set while the pub/sub connection is up and channels followed
        self._warned = -math.inf
        self._nursery: trio.Nursery | None = None
        self.published = 0
        self.received = 0
        self.gaps_filled = 0
        self.lost = 0  #: publications made without waiting (emit_nowait) that Redis never took
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
                self._connected, self._following = trio.Event(), trio.Event()
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
        """One command connection, from connecting to losing it (which raises).

        The pub/sub connection lives inside it: when only that one is lost (Redis cut it, say),
        it is opened again and the channels followed again, while publishing goes on.
        """
        self._connected_once = False
        async with open_connection(self.address) as connection, trio.open_nursery() as nursery:
            await self._load_scripts(connection)
            self._connection, self._nursery = connection, nursery
            self._connected.set()
            nursery.start_soon(self._publisher, connection)
            nursery.start_soon(self._keep_unpublished_epochs)
            delay = RECONNECT_BACKOFF[0]
            while True:
                try:
                    async with open_pubsub(self.address, self._on_message) as pubsub:
                        self._pubsub = pubsub
                        with trio.fail_after(COMMAND_TIMEOUT):
                            await pubsub.subscribe(self.keys.control())
                        await self._follow_again()
                        self._following.set()
                        self._connected_once = True
                        delay = RECONNECT_BACKOFF[0]
                        if not started:
                            started.append(True)
                            task_status.started()
                        await self._watch(connection, pubsub)
                except* (RedisUnavailable, trio.TooSlowError):
                    if connection.broken or not started:
                        raise  # the command connection too: the session is over
                finally:
                    self._pubsub = None
                    self._following = trio.Event()
                    for mirror in self._mirrors.values():
                        mirror.follows = False
                self.errors += 1
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF[1])

    async def _load_scripts(self, connection: RedisConnection) -> None:
        """Load the scripts (on connecting, and again if Redis forgot them: SCRIPT FLUSH)."""
        self._scripts_lost = False
        for reply in await connection.pipeline([["SCRIPT", "LOAD", PUBLISH], ["SCRIPT", "LOAD", FOLLOW]]):
            if isinstance(reply, RedisError):
                raise reply

    async def _keep_unpublished_epochs(self) -> None:
        """Keep the epochs of followed channels nobody has published on yet (they expire after
        :data:`UNPUBLISHED_TTL` otherwise), as the memory engine keeps a subscribed stream's."""
        while True:
            await trio.sleep(UNPUBLISHED_TTL / 3)
            waiting = [channel for channel, mirror in self._mirrors.items() if mirror.top == 0]
            for start in range(0, len(waiting), 1000):
                with contextlib.suppress(EngineUnavailable):
                    await self.pipeline([["EXPIRE", self.keys.meta(channel), UNPUBLISHED_TTL, "GT"]
                                         for channel in waiting[start:start + 1000]])

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
        """After connecting: follow every channel that has holders, filling what was missed, in
        batches of :data:`FOLLOW_BATCH` (one SUBSCRIBE and one pipelined write each)."""
        waiting = [(channel, mirror) for channel, mirror in self._mirrors.items()
                   if mirror.holds > 0 and not mirror.follows]
        for start in range(0, len(waiting), FOLLOW_BATCH):
            await self._follow_batch(waiting[start:start + FOLLOW_BATCH])

    # -- publishing ------------------------------------------------------------------

    def _encode(self, channel: str, event: str, data: Any, *, persist: bool,
                done: trio.Event | None) -> _Queued:
        frame = ws_frame(encode_event(channel, event, data, OFFSET_PLACEHOLDER))
        return _Queued(channel=channel, frame=frame, kept=persist, done=done)

    def _script_call(self, groups: dict[str, list[_Queued]]) -> bytes:
        """One ``EVALSHA`` publishing every group (a channel's publications, in order), as RESP.

        Built by hand, not with :func:`encode_command`: it runs for every flush, and each
        channel's keys and options are encoded once and kept (:meth:`_channel_parts`).
        """
        keys: list[bytes] = []
        args: list[bytes] = [_bulk(new_epoch())]
        count = 0
        for channel, items in groups.items():
            channel_keys, channel_args = self._channel_parts(channel)
            keys.append(channel_keys)
            args.append(channel_args)
            args.append(_bulk(bytes(0x31 if item.kept else 0x30 for item in items)))
            args.extend(b"$%d\r\n%b\r\n" % (len(item.frame), item.frame) for item in items)
            count += len(items)
        key_count = 3 * len(groups)
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (
            3 + key_count + 1 + 4 * len(groups) + count, PUBLISH_SHA.encode(), _bulk(b"%d" % key_count))
        return b"".join([head, *keys, *args])

    def _channel_parts(self, channel: str) -> tuple[bytes, bytes]:
        """A channel's three keys, and its size and TTL arguments, as RESP bulk strings (kept)."""
        parts = self._parts.get(channel)
        if parts is None:
            if len(self._parts) >= _PARTS_CACHE:
                self._parts.clear()
            options = self._options(channel)
            ttl_ms, meta_ttl = _ttls(options)
            names = self.keys
            parts = self._parts[channel] = (
                b"".join(_bulk(key) for key in (names.meta(channel), names.stream(channel),
                                                names.pubsub(channel))),
                b"".join(_bulk(b"%d" % value) for value in (options.history_size, ttl_ms, meta_ttl)))
        return parts

    async def publish(self, channel: str, event: str, data: Any, *, persist: bool) -> Stored:
        """Publish through Redis; return the offset and epoch Redis gave it.

        Raises:
            protocol.LocalProtocolError: ``data`` cannot be encoded.
            EngineUnavailable: Redis is unavailable (the publication may not have happened).
        """
        item = self._encode(channel, event, data, persist=persist, done=trio.Event())
        await self._wait_for_room()
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
        await self._wait_for_room()
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

    async def _wait_for_room(self) -> None:
        """Wait while too much is queued, and (briefly) for a connection being opened again."""
        while self._queued_bytes > MAX_QUEUED_BYTES:
            await self._room_lot.park()
        with trio.move_on_after(RECONNECT_WAIT):
            await self._connected.wait()

    def _enqueue(self, item: _Queued) -> None:
        if self._nursery is None:
            raise EngineUnavailable(f"Redis at {self.address} is unavailable")
        self._queue.append(item)
        self._queued_bytes += len(item.frame)
        if len(self._queue) == 1:
            self._queue_lot.unpark_all()

    def _fail_queued(self, error: Exception) -> None:
        queue, self._queue = self._queue, []
        self._queued_bytes = 0
        self._room_lot.unpark_all()
        for item in queue:
            item.result = error
            if item.done is not None:
                item.done.set()
        self._count_lost(queue, error)

    def _count_lost(self, items: list[_Queued], error: Exception) -> None:
        """Count (and log, in one line) the publications nobody waited for that were lost."""
        lost = [item for item in items if item.done is None and isinstance(item.result, BaseException)]
        if lost:
            self.lost += len(lost)
            log.warning("%d publication(s) made without waiting were lost (the first on %s): %s",
                        len(lost), lost[0].channel, error)

    async def _publisher(self, connection: RedisConnection) -> None:
        """Send what is queued: one script call per flush (channels grouped, in queue order), with
        up to :data:`IN_FLIGHT` flushes awaiting their replies while the next is sent."""
        in_flight = trio.Semaphore(IN_FLIGHT)
        last_flush = -math.inf
        async with trio.open_nursery() as nursery:
            while True:
                while not self._queue:
                    await self._queue_lot.park()
                # One flush a tick at most: what comes meanwhile joins the next one, so a steady
                # stream of tokens costs a write (and a script call) a tick, not one a token.
                wait = last_flush + FLUSH_TICK - trio.current_time()
                if wait > 0 and len(self._queue) < MAX_BATCH:
                    await trio.sleep(wait)
                await in_flight.acquire()
                if self._scripts_lost:
                    await self._load_scripts(connection)
                last_flush = trio.current_time()
                batch = self._take_batch()
                groups: dict[str, list[_Queued]] = {}
                for item in batch:
                    groups.setdefault(item.channel, []).append(item)
                try:
                    pending = await connection.send_encoded(self._script_call(groups), 1)
                except BaseException:
                    self._lost(batch)
                    raise
                nursery.start_soon(self._settle_flush, pending, groups, batch, in_flight)

    async def _settle_flush(self, pending: Pending, groups: dict[str, list[_Queued]], batch: list[_Queued],
                            in_flight: trio.Semaphore) -> None:
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                [reply] = await pending.replies()
        except BaseException:
            self._lost(batch)
            raise
        finally:
            in_flight.release()
        self.round_trips += 1
        if isinstance(reply, RedisError):
            for items in groups.values():
                self._settle(items, reply)
        else:
            for index, items in enumerate(groups.values()):
                self._settle(items, reply[2 * index:2 * index + 2])

    def _lost(self, batch: list[_Queued]) -> None:
        """Lost with the connection (or cancelled): these may or may not have been published."""
        error = EngineUnavailable(f"Redis at {self.address} was lost while publishing")
        unsettled = [item for item in batch if item.result is None]
        for item in unsettled:
            item.result = error
            if item.done is not None:
                item.done.set()
        self._count_lost(unsettled, error)

    def _take_batch(self) -> list[_Queued]:
        queue, size, count = self._queue, 0, 0
        while count < len(queue) and count < MAX_BATCH and (not count or size < MAX_FLUSH_BYTES):
            size += len(queue[count].frame)
            count += 1
        batch = queue[:count]
        del queue[:count]
        self._queued_bytes -= size
        self._room_lot.unpark_all()
        return batch

    def _settle(self, items: list[_Queued], reply: Any) -> None:
        """Tell each of ``items`` its offset (the script's reply: epoch and top), or the error."""
        if isinstance(reply, RedisError):
            self.errors += 1
            self._scripts_lost = self._scripts_lost or str(reply).startswith("NOSCRIPT")
            results: list[tuple[str, int] | BaseException] = [
                EngineUnavailable(f"Redis refused a publication: {reply}")] * len(items)
        else:
            epoch, top = reply[0].decode(), int(reply[1])
            first = top - len(items) + 1
            results = [(epoch, first + index) for index in range(len(items))]
            self.published += len(items)
        for item, result in zip(items, results, strict=True):
            item.result = result
            if item.done is not None:
                item.done.set()
        if isinstance(reply, RedisError):
            self._count_lost(items, reply)

    # -- other commands ---------------------------------------------------------------

    async def call(self, *args: bytes | str | int) -> Any:
        """One command on the node's command connection (for the AI path's keys).

        Raises:
            EngineUnavailable: Redis is unavailable, or refused the command.
        """
        [reply] = await self.pipeline([args])
        return reply

    async def pipeline(self, commands: list[Any]) -> list[Any]:
        """Commands in one write; their replies.

        Raises:
            EngineUnavailable: Redis is unavailable, or refused one of them.
        """
        connection = self._connection
        if connection is None:
            raise EngineUnavailable(f"Redis at {self.address} is unavailable")
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                replies = await connection.pipeline(commands)
        except (RedisUnavailable, trio.TooSlowError) as exc:
            raise EngineUnavailable(f"Redis at {self.address} is unavailable: {exc}") from None
        for reply in replies:
            if isinstance(reply, RedisError):
                raise EngineUnavailable(f"Redis refused a command: {reply}")
        return replies

    def notify(self, command: bytes) -> None:
        """Send ``command`` to every node's :attr:`on_command` (this one's too), without waiting.

        Best effort: while Redis is away it is dropped.
        """
        nursery = self._nursery
        if nursery is not None:
            nursery.start_soon(self._notify, command)

    async def _notify(self, command: bytes) -> None:
        with contextlib.suppress(EngineUnavailable):
            await self.call("PUBLISH", self._control, command)

    async def caught_up(self, channel: str, offset: int, *, seconds: float = RECONNECT_WAIT) -> None:
        """Wait (at most ``seconds``) until this node has delivered ``channel`` up to ``offset``:
        a recovery read from Redis up to there then joins the live stream without a hole."""
        mirror = self._mirrors.get(channel)
        if mirror is None:
            return
        mirror.waiting += 1
        try:
            with trio.move_on_after(seconds):
                while mirror.top < offset and self._mirrors.get(channel) is mirror:
                    await mirror.moved.park()
        finally:
            mirror.waiting -= 1

    def follows(self, channel: str) -> bool:
        """Whether this node follows ``channel`` now."""
        return channel in self._mirrors

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
                # A connection being opened again (after a cut) is waited for, briefly.
                with trio.move_on_after(RECONNECT_WAIT):
                    await self._following.wait()
                if not self._following.is_set():
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
        if not mirror.follows:
            await self._follow_batch([(channel, mirror)])

    async def _follow_batch(self, batch: list[tuple[str, Mirror]]) -> None:
        """Subscribe to the channels, then read their tops: every later publication reaches them."""
        pubsub, connection = self._pubsub, self._connection
        if pubsub is None or connection is None:
            raise RedisUnavailable(f"Redis at {self.address} is unavailable")
        readiness = [mirror.ready.is_set() for _channel, mirror in batch]
        for _channel, mirror in batch:
            mirror.follows = True  # messages from now on are held until the top is known
        keys = self.keys
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                await pubsub.subscribe(*(keys.pubsub(channel) for channel, _mirror in batch))
                # A channel nobody published on yet gets its epoch now, as the memory engine's
                # does when it is first subscribed to: every node's subscribers are told the same.
                replies = await connection.pipeline([
                    ["EVALSHA", FOLLOW_SHA, 2, keys.meta(channel), keys.stream(channel), new_epoch(),
                     UNPUBLISHED_TTL] for channel, _mirror in batch])
            for reply in replies:
                if isinstance(reply, RedisError):
                    raise reply
        except BaseException:
            for _channel, mirror in batch:
                mirror.follows = False
            raise
        for (channel, mirror), was_ready, (epoch, top) in zip(batch, readiness, replies, strict=True):
            self._followed(channel, mirror, was_ready, (epoch or b"").decode(), int(top or 0))

    def _followed(self, channel: str, mirror: Mirror, was_ready: bool, epoch: str, top: int) -> None:
        """The node follows ``channel`` now and knows its epoch and top: catch the mirror up."""
        if not was_ready:
            pending, mirror.pending = mirror.pending, []  # what came while the top was being read
            mirror.restart(epoch, top)
            mirror.ready.set()
            for kept, offset, message_epoch, frame in pending:
                self._accept(channel, mirror, kept, offset, message_epoch, frame)
        elif epoch != mirror.epoch:
            mirror.restart(epoch, top)  # Redis lost the stream while we were away
            self.restarted(channel)
        elif top > mirror.top:
            self._fill_gap(channel, mirror, top + 1)

    # -- receiving ---------------------------------------------------------------------

    def _on_message(self, pubsub_channel: bytes, message: bytes) -> None:
        self.received += 1
        if pubsub_channel == self._control:
            self.on_command(message)
            return
        try:
            channel = self.keys.channel_of(pubsub_channel)
            first, epoch, body = parse_message(message)
            publications = list(split_body(body, first))
        except (ValueError, UnicodeDecodeError):
            log.warning("a message on %r is not one tokenfan publishes: ignored", pubsub_channel[:200])
            return
        mirror = self._mirrors.get(channel)
        if mirror is None:
            return  # no longer followed
        for offset, kept, frame in publications:
            if not mirror.ready.is_set():
                mirror.pending.append((kept, offset, epoch, frame))
            else:
                self._accept(channel, mirror, kept, offset, epoch, frame)

    def _accept(self, channel: str, mirror: Mirror, kept: bool, offset: int, epoch: str,
                frame: bytes) -> None:
        if epoch != mirror.epoch:
            if mirror.epoch:
                self.restarted(channel)
            if offset != 1 and mirror.epoch:
                # A new stream that began while we were not looking: read it from the start.
                mirror.restart(epoch, 0)
                mirror.pending.append((kept, offset, epoch, frame))
                self._fill_gap(channel, mirror, offset)
                return
            mirror.restart(epoch, offset - 1)
        if mirror.gap_filling:
            mirror.pending.append((kept, offset, epoch, frame))
            return
        if offset <= mirror.top:
            return  # a duplicate of what a gap fill delivered
        if offset > mirror.top + 1:
            mirror.pending.append((kept, offset, epoch, frame))
            self._fill_gap(channel, mirror, offset)
            return
        self._deliver(channel, mirror, kept, offset, frame)

    def _deliver(self, channel: str, mirror: Mirror, kept: bool, offset: int, frame: bytes) -> None:
        mirror.top = offset
        if kept:
            mirror.keep(offset, frame)
        self.deliver(channel, frame)
        mirror.moved_on()

    def _fill_gap(self, channel: str, mirror: Mirror, before: int) -> None:
        """Read the kept publications in ``(top, before)`` from the stream, then the pending ones."""
        if mirror.gap_filling or self._nursery is None:
            return
        mirror.gap_filling = True
        self._nursery.start_soon(self._fill, channel, mirror, before)

    async def _fill(self, channel: str, mirror: Mirror, before: int) -> None:
        incarnation = mirror.incarnation
        try:
            connection = self._connection
            if connection is None:
                raise RedisUnavailable(f"Redis at {self.address} is unavailable")
            entries = await self._entries(connection, channel, after=mirror.top, last=before - 1)
        except (RedisUnavailable, RedisError, trio.TooSlowError):
            return  # connecting again re-follows and fills
        finally:
            if mirror.incarnation == incarnation:  # (a restart meanwhile has reset the flag)
                mirror.gap_filling = False
        if self._mirrors.get(channel) is not mirror or mirror.incarnation != incarnation:
            return  # no longer followed, or the stream began again meanwhile: its fill is its own
        self.gaps_filled += 1
        for offset, kept, frame, _time in entries:
            if mirror.top < offset < before and kept:  # one not kept is not in the stream (lost)
                self._deliver(channel, mirror, True, offset, frame)
        mirror.top = max(mirror.top, before - 1)
        mirror.moved_on()
        pending, mirror.pending = mirror.pending, []
        for kept, offset, epoch, frame in sorted(pending, key=lambda item: item[1]):
            self._accept(channel, mirror, kept, offset, epoch, frame)

    # -- reading history -------------------------------------------------------------

    @staticmethod
    async def _page(connection: RedisConnection, stream_key: bytes, cursor: str, end: str, *,
                    reverse: bool = False) -> tuple[list[Publication], str | None]:
        """One page of a stream (:data:`_READ_ENTRIES` entries, each a batch) from ``cursor`` to
        ``end``, newest first if ``reverse``: its publications in the order read, and the cursor of
        the next page (None when this one was the last)."""
        with trio.fail_after(COMMAND_TIMEOUT):
            reply = await connection.execute("XREVRANGE" if reverse else "XRANGE", stream_key, cursor, end,
                                              "COUNT", _READ_ENTRIES)
        publications: list[Publication] = []
        for entry in reply:
            batch = _batch(entry)
            publications.extend(reversed(batch) if reverse else batch)
        more = len(reply) == _READ_ENTRIES
        return publications, f"({_entry_offset(reply[-1][0])}-0" if more else None

    async def _entries(self, connection: RedisConnection, channel: str, *, after: int,
                       last: int) -> list[Publication]:
        """The publications in ``(after, last]`` still in the stream: (offset, kept, frame, ms)."""
        out: list[Publication] = []
        # An entry's id is its last offset: the first holding ``after + 1`` is the first after ``after``.
        cursor: str | None = f"({after}-0"
        while cursor is not None and after < last:
            # To the end ("+"): the entry holding ``last`` may also hold later ones, so its id is past it.
            page, cursor = await self._page(connection, self.keys.stream(channel), cursor, "+")
            out.extend(publication for publication in page if after < publication[0] <= last)
            if page and page[-1][0] >= last:
                break
        return out

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
        # Every publication is in the stream (one not kept with an empty frame), so the oldest
        # entry says what was trimmed. Entries past the TTL count as trimmed too: Redis drops a
        # stream only once it has been idle that long.
        oldest = _batch_first(first[0]) if first else top + 1
        start = min(max(after, oldest - 1), top)
        ttl_ms = _ttls(self._options(channel))[0]
        cutoff = int(clock[0]) * 1000 + int(clock[1]) // 1000 - ttl_ms if ttl_ms else 0
        recovered = oldest - 1 <= after <= top
        if newest:
            return await self._read_newest(connection, stream_key, current, top, start, recovered, cutoff,
                                           limit, max_bytes)
        frames: list[bytes] = []
        size, covered, more = 0, start, False
        cursor: str | None = f"({start}-0"
        while cursor is not None and covered < top and not more:
            page, cursor = await self._page(connection, stream_key, cursor, f"{top}-0")
            for offset, kept, frame, time_ms in page:
                if offset <= covered:
                    continue
                if time_ms < cutoff:
                    recovered = False  # expired: as good as trimmed
                elif kept:
                    if frames and (len(frames) >= limit or size + len(frame) > max_bytes):
                        more = True
                        break
                    frames.append(frame)
                    size += len(frame)
                covered = offset
        return Replay(epoch=current, top=top, after=start, last=covered if more else top,
                      recovered=recovered, more=more, frames=frames)

    async def _read_newest(self, connection: RedisConnection, stream_key: bytes, epoch: str, top: int,
                           start: int, recovered: bool, cutoff: int, limit: int, max_bytes: int) -> Replay:
        """The newest kept publications after ``start`` that fit (a catch-up)."""
        frames: list[bytes] = []
        size, taken, full = 0, top, False
        cursor: str | None = "+"
        while cursor is not None and taken > start and not full:
            page, cursor = await self._page(connection, stream_key, cursor, f"({start}-0", reverse=True)
            for offset, kept, frame, time_ms in page:  # newest first
                if offset <= start or offset > taken:
                    continue
                if time_ms < cutoff or (kept and frames and (
                        len(frames) >= limit or size + len(frame) > max_bytes)):
                    full = True
                    break
                if kept:
                    frames.append(frame)
                    size += len(frame)
                taken = offset - 1
        frames.reverse()
        if taken > start:  # some were left out: the answer is the newest, not everything
            return Replay(epoch=epoch, top=top, after=taken, last=top, recovered=False, more=False,
                          frames=frames)
        return Replay(epoch=epoch, top=top, after=start, last=top, recovered=recovered, more=False,
                      frames=frames)

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


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _ttls(options: ChannelOptions) -> tuple[int, int]:
    """A channel's stream TTL in ms and its meta hash's in s (0: none, for an infinite history_ttl)."""
    if not math.isfinite(options.history_ttl):
        return 0, 0
    return max(1, math.ceil(options.history_ttl * 1000)), max(META_TTL, math.ceil(options.history_ttl))


def _entry_offset(entry_id: bytes) -> int:
    """The last offset of a stream entry (its id is ``<offset>-0``)."""
    return int(entry_id.split(b"-", 1)[0])


def _fields(entry: list[Any]) -> dict[bytes, bytes]:
    fields = entry[1]
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _batch_first(entry: list[Any]) -> int:
    """The first offset of a stream entry's batch."""
    return int(_fields(entry)[b"o"])


def _batch(entry: list[Any]) -> list[Publication]:
    """(offset, kept, frame, time in ms) of each publication of a stream entry's batch."""
    fields = _fields(entry)
    time_ms = int(fields[b"t"])
    return [(offset, kept, frame, time_ms)
            for offset, kept, frame in split_body(fields[b"b"], int(fields[b"o"]))]


__all__ = ["EngineUnavailable", "LocalProtocolError", "Mirror", "RedisEngine"]
