"""Channels, their subscribers, and the encode-once fan-out.

Theory of operation
-------------------
:meth:`Hub.publish` is synchronous: the engine (:mod:`broker.history`) gives
the publication the channel's next offset, encodes it once to complete
WebSocket frame bytes and keeps it in history if it should; the hub appends
those bytes to the channel's *log* (the frames some subscriber has not been
sent yet). Each subscriber has a position in that log. Sending to a
subscriber writes everything from its position to the head, joined into one
write, and moves it to the head.

With ``batching=False`` every publication is sent to every subscriber at
once, inside :meth:`Hub.publish`. With ``batching=True`` (the default) the
flusher task walks the subscribers of each channel with news, and yields to
the publishers (and everyone else) once its turn has taken
:data:`TURN_SECONDS`, looking at the clock every :data:`CHECK_EVERY` offers. A
turn is measured in time, not offers: an offer to a subscriber whose send
buffer is already queued costs a fraction of one that writes to its socket,
and a walk past many of those should not yield (and wait for every other task)
as often as one that writes to all. A token published while
a walk is under way therefore reaches the rest of that walk at once, and the
subscribers already passed on the next walk: nobody waits more than about one
walk, and when tokens come faster than a walk takes, each subscriber gets
several in one write. Subscribers at the same position get the very same
joined ``bytes`` object.

Fan-out calls :meth:`Outbox.offer` and never awaits per subscriber or starts
a task. A slow subscriber's outbox deals with its backlog on its own; the walk
does not notice.

A new subscriber starts at the head of the log. :meth:`Hub.subscribe` reads
what it asked to recover from the engine and adds it to the live stream in the
same synchronous step, so every publication reaches it exactly once: those up
to the engine's top offset in the replay, later ones live.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import trio

from broker.history import Engine, LocalEngine
from broker.outbox import Outbox
from protocol import Position

#: A channel's log is sent to everyone at once when it holds this many bytes.
MAX_PENDING_BYTES = 256 * 1024
#: How long the flusher walks before it lets others run (publishers, readers, replays).
TURN_SECONDS = 0.001
#: Offers between two looks at the clock (an offer that writes takes about 10 µs here).
CHECK_EVERY = 16


class Turn:
    """The flusher's current turn: when it began, and offers since the clock was last read."""

    __slots__ = ("offers", "seconds", "started")

    def __init__(self, seconds: float = TURN_SECONDS) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()
        self.offers = 0

    async def offered(self) -> None:
        """Count one offer; yield to others (and start a new turn) once the turn is used up."""
        self.offers += 1
        if self.offers >= CHECK_EVERY:
            self.offers = 0
            if time.perf_counter() - self.started >= self.seconds:
                await trio.lowlevel.checkpoint()
                self.started = time.perf_counter()

    def restart(self) -> None:
        self.started = time.perf_counter()
        self.offers = 0
#: Most publications one recovery replays (its bytes are bounded by the caller).
MAX_REPLAY = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    """Where an emitted event landed: its offset within the channel's epoch."""

    channel: str
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed:
    """What a new subscriber is told (``ok``) and sent first (``replay``).

    Every publication after offset ``after`` of ``epoch`` reaches it exactly
    once: those up to the top offset in ``replay`` (frames joined into one
    bytes object), the rest live.
    """

    epoch: str
    after: int
    recovered: bool
    replay: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class HubStatistics:
    """A snapshot of the hub."""

    channels: int
    subscriptions: int
    publications: int
    pending_channels: int
    recoveries: int  #: ``sub`` with ``since`` that got everything it asked for
    recovery_misses: int  #: ``sub`` with ``since`` answered ``recovered: false``


def _join(frames: list[bytes]) -> bytes:
    return b"".join(frames)


class Channel:
    """One channel with subscribers: its log of unsent frames and where each subscriber is in it."""

    __slots__ = ("log", "log_base", "log_bytes", "name", "subscribers")

    def __init__(self, name: str) -> None:
        self.name = name
        # outbox -> sequence number of the next log frame it needs (insertion-ordered)
        self.subscribers: dict[Outbox, int] = {}
        self.log: list[bytes] = []  # frames log_base, log_base + 1, ... not yet sent to everyone
        self.log_base = 0
        self.log_bytes = 0

    @property
    def head(self) -> int:
        """Sequence number the next appended frame gets."""
        return self.log_base + len(self.log)

    @property
    def behind(self) -> bool:
        """True if some subscriber has not been sent everything."""
        head = self.head
        return any(seq < head for seq in self.subscribers.values())

    def append(self, frame: bytes) -> None:
        self.log.append(frame)
        self.log_bytes += len(frame)

    def add(self, outbox: Outbox) -> None:
        self.subscribers[outbox] = self.head

    def _since(self, seq: int, cache: dict[int, bytes]) -> bytes:
        """Frames from ``seq`` to the head, joined; the same object for every caller at ``seq``."""
        data = cache.get(seq)
        if data is None:
            frames = self.log[seq - self.log_base:]
            data = cache[seq] = frames[0] if len(frames) == 1 else b"".join(frames)
        return data

    def send_all(self) -> None:
        """Send every subscriber everything it lacks, now. Never waits."""
        head = self.head
        cache: dict[int, bytes] = {}
        subscribers = self.subscribers
        for outbox, seq in subscribers.items():
            if seq < head:
                outbox.offer(self._since(seq, cache))
                subscribers[outbox] = head
        self._trim()

    async def walk(self, turn: Turn) -> None:
        """Send each subscriber what it lacks, yielding whenever the ``turn`` is used up."""
        subscribers = self.subscribers
        cache: dict[int, bytes] = {}
        cached_head = self.head
        for outbox in list(subscribers):
            seq = subscribers.get(outbox)
            head = self.head
            if seq is None or seq >= head:
                continue  # unsubscribed meanwhile, or already up to date
            if head != cached_head:
                cache.clear()
                cached_head = head
            outbox.offer(self._since(seq, cache))
            subscribers[outbox] = head
            # When this yields, publishers may add frames: the rest of this walk picks them up.
            await turn.offered()
        self._trim()

    def _trim(self) -> None:
        """Drop the log frames every subscriber has been sent."""
        low = min(self.subscribers.values(), default=self.head)
        drop = low - self.log_base
        if drop > 0:
            self.log_bytes -= sum(len(frame) for frame in self.log[:drop])
            del self.log[:drop]
            self.log_base = low


class Hub:
    """All channels of one broker. Not thread-safe: use it from the broker's Trio thread."""

    def __init__(self, engine: Engine, *, batching: bool = True, turn_seconds: float = TURN_SECONDS) -> None:
        self.engine = engine
        self._batching = batching
        self._turn_seconds = turn_seconds
        self._channels: dict[str, Channel] = {}
        self._dirty: dict[Channel, None] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self._publications = 0
        self._subscriptions = 0
        self._recoveries = 0
        self._recovery_misses = 0

    def channel(self, name: str) -> Channel | None:
        """The channel called ``name``, if it has subscribers."""
        return self._channels.get(name)

    def publish(self, name: str, event: str, data: Any, *, persist: bool) -> Publication:
        """Publish ``event`` with ``data`` on channel ``name``; return its position.

        The caller has validated the names. Never waits. The engine must be a
        :class:`LocalEngine` (on Redis, publications arrive through :meth:`deliver`).

        Raises:
            protocol.LocalProtocolError: ``data`` cannot be encoded as msgpack.
        """
        # Only a local engine publishes here; the Redis engine's publications come through deliver().
        stored = cast("LocalEngine", self.engine).publish(name, event, data, persist=persist,
                                                          now=trio.current_time())
        self._publications += 1
        channel = self._channels.get(name)
        if channel is not None:
            self._append(channel, stored.frame)
        return Publication(channel=name, offset=stored.offset, epoch=stored.epoch)

    def deliver(self, name: str, frame: bytes) -> None:
        """Fan out a publication some engine made elsewhere (Redis: any node), in the order given.

        Never waits. The frame is the complete WebSocket frame, offset included.
        """
        self._publications += 1
        channel = self._channels.get(name)
        if channel is not None:
            self._append(channel, frame)

    def _append(self, channel: Channel, frame: bytes) -> None:
        channel.append(frame)
        if not self._batching or channel.log_bytes >= MAX_PENDING_BYTES:
            # Unbatched, or a publisher that never yields: send now, so the log stays bounded.
            channel.send_all()
        elif channel not in self._dirty:
            self._dirty[channel] = None
            if len(self._dirty) == 1:
                self._lot.unpark_all()

    def subscribe(self, name: str, outbox: Outbox, *, since: Position | None = None,
                  max_replay_bytes: int = 1 << 20,
                  fit: Callable[[list[bytes]], bytes | None] = _join) -> Subscribed:
        """Add ``outbox`` to channel ``name`` (created if needed); say where its stream starts.

        Without ``since`` it starts after the channel's top offset. With
        ``since``, and ``since.ep`` given, it recovers every publication after
        ``since.o`` of that epoch, or nothing (``recovered=False``) if history
        cannot give all of them within ``max_replay_bytes``, or ``fit`` (which
        joins the replayed frames, compacting them if it can) says they do not
        fit. With ``since.ep`` omitted (catching up) it gets whatever history
        still holds after ``since.o`` of the current epoch, the newest that fit
        in ``max_replay_bytes``; ``recovered`` says whether that was everything.
        The caller sends the ``ok`` and then :attr:`Subscribed.replay` before
        yielding, so the subscriber joins the live stream right after the replay.
        """
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(name)
            self.engine.hold(name)
        if outbox not in channel.subscribers:
            channel.add(outbox)
            self._subscriptions += 1
        epoch, top = self.engine.position(name)
        if since is None:
            return Subscribed(epoch=epoch, after=top, recovered=False, replay=b"")
        catch_up = since.ep is None
        replay = self.engine.since(name, after=since.o, epoch=since.ep,
                                   limit=MAX_REPLAY, max_bytes=max_replay_bytes, newest=catch_up)
        joined = fit(replay.frames) if replay.frames else b""
        if joined is None or (not catch_up and (not replay.recovered or replay.more)):
            self._recovery_misses += 1
            return Subscribed(epoch=epoch, after=top, recovered=False, replay=b"")
        if replay.recovered:
            self._recoveries += 1
        else:
            self._recovery_misses += 1
        return Subscribed(epoch=epoch, after=replay.after, recovered=replay.recovered, replay=joined)

    def unsubscribe(self, name: str, outbox: Outbox) -> None:
        """Remove ``outbox`` from channel ``name``; drop the channel when it is left empty."""
        channel = self._channels.get(name)
        if channel is None or outbox not in channel.subscribers:
            return
        del channel.subscribers[outbox]
        self._subscriptions -= 1
        if not channel.subscribers:
            del self._channels[name]
            self._dirty.pop(channel, None)
            self.engine.release(name)

    def flush_all(self) -> None:
        """Send everything published to everyone now (e.g. before saying goodbye to everyone)."""
        dirty, self._dirty = self._dirty, {}
        for channel in dirty:
            channel.send_all()

    async def run_flusher(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Walk the channels with news, round robin, until cancelled."""
        task_status.started()
        turn = Turn(self._turn_seconds)
        while True:
            while not self._dirty:
                await self._lot.park()
                turn.restart()
            channel = next(iter(self._dirty))
            del self._dirty[channel]
            await channel.walk(turn)
            if channel.behind and self._channels.get(channel.name) is channel:
                self._dirty[channel] = None  # frames came during the walk: another walk
            if not self._dirty:
                # Let the publishers run before the next walk, so they can batch up.
                await trio.lowlevel.checkpoint()
                turn.restart()

    def statistics(self) -> HubStatistics:
        return HubStatistics(channels=len(self._channels), subscriptions=self._subscriptions,
                             publications=self._publications, pending_channels=len(self._dirty),
                             recoveries=self._recoveries, recovery_misses=self._recovery_misses)
