"""Channels, their subscribers, and the encode-once fan-out.

Theory of operation
-------------------
:meth:`Hub.publish` is synchronous: it gives the publication the channel's
next offset, encodes it to complete WebSocket frame bytes once, and either
fans those bytes out at once (``batching=False``) or appends them to the
channel's pending list and wakes the flusher task (``batching=True``, the
default). The flusher takes every channel with pending publications and fans
out their bytes joined into one ``bytes`` object: when tokens arrive faster
than a fan-out round takes, each subscriber gets several tokens in one write,
and the joined bytes are still the same object for every subscriber.

Fan-out walks the channel's subscribers and calls :meth:`Outbox.offer` on
each; it never awaits and never starts a task. A slow subscriber's outbox
overflows on its own; the loop does not notice.

Ordering: a subscriber added by :meth:`Hub.subscribe` must see only
publications after the top offset it was told, so subscribe first flushes the
channel's pending bytes to the existing subscribers.

A channel exists while it has subscribers (and, from a later issue, history).
Publishing to a channel that does not exist reaches no one; the publication
still gets offset 1 of a fresh epoch, which is what a subscriber joining
later will not be able to recover.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from broker.outbox import Outbox
from protocol import encode_event, ws_frame

#: A channel's pending publications are fanned out at once when they reach this many bytes.
MAX_PENDING_BYTES = 256 * 1024


def new_epoch() -> str:
    """A short random string naming one incarnation of a channel's stream."""
    return secrets.token_urlsafe(6)


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    """Where an emitted event landed: its offset within the channel's epoch."""

    channel: str
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HubStatistics:
    """A snapshot of the hub."""

    channels: int
    subscriptions: int
    publications: int
    pending_channels: int


class Channel:
    """One channel: its stream position and its subscribers' outboxes."""

    __slots__ = ("epoch", "name", "pending", "pending_bytes", "subscribers", "top")

    def __init__(self, name: str) -> None:
        self.name = name
        self.epoch = new_epoch()
        self.top = 0  # offset of the latest publication
        self.subscribers: dict[Outbox, None] = {}  # an ordered set
        self.pending: list[bytes] = []  # frame bytes not yet fanned out
        self.pending_bytes = 0

    def fan_out(self, data: bytes) -> None:
        """Offer the same ``data`` to every subscriber. Never waits."""
        for outbox in self.subscribers:
            outbox.offer(data)

    def flush(self) -> None:
        """Fan out everything pending, joined into one write per subscriber."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        self.pending_bytes = 0
        self.fan_out(pending[0] if len(pending) == 1 else b"".join(pending))


class Hub:
    """All channels of one broker. Not thread-safe: use it from the broker's Trio thread."""

    def __init__(self, *, batching: bool = True) -> None:
        self._batching = batching
        self._channels: dict[str, Channel] = {}
        self._dirty: dict[Channel, None] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self._publications = 0
        self._subscriptions = 0
        #: Called with each channel name when its last subscriber leaves (for later engines).
        self.on_channel_closed: Callable[[str], None] | None = None

    def channel(self, name: str) -> Channel | None:
        """The live channel called ``name``, if it exists."""
        return self._channels.get(name)

    def publish(self, name: str, event: str, data: Any) -> Publication:
        """Publish ``event`` with ``data`` on channel ``name``; return its position.

        The caller has validated the names. Never waits.

        Raises:
            protocol.LocalProtocolError: ``data`` cannot be encoded as msgpack.
        """
        channel = self._channels.get(name)
        if channel is None:
            # No subscribers and no history: nobody can see this publication.
            encode_event(name, event, data, 1)  # still reject what could never be sent
            self._publications += 1
            return Publication(channel=name, offset=1, epoch=new_epoch())
        offset = channel.top + 1
        frame = ws_frame(encode_event(name, event, data, offset))
        channel.top = offset
        self._publications += 1
        if self._batching:
            channel.pending.append(frame)
            channel.pending_bytes += len(frame)
            if channel.pending_bytes >= MAX_PENDING_BYTES:
                # A publisher that never yields would otherwise pile up frames without bound.
                channel.flush()
            elif channel not in self._dirty:
                self._dirty[channel] = None
                if len(self._dirty) == 1:
                    self._lot.unpark_all()
        else:
            channel.fan_out(frame)
        return Publication(channel=name, offset=offset, epoch=channel.epoch)

    def subscribe(self, name: str, outbox: Outbox) -> Channel:
        """Add ``outbox`` to channel ``name`` (created if needed) and return the channel.

        Everything published before this call is fanned out to the existing
        subscribers first, so the new one sees only offsets above ``channel.top``.
        """
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(name)
        else:
            channel.flush()
        if outbox not in channel.subscribers:
            channel.subscribers[outbox] = None
            self._subscriptions += 1
        return channel

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
            if self.on_channel_closed is not None:
                self.on_channel_closed(name)

    def flush_all(self) -> None:
        """Fan out every pending publication now (e.g. before saying goodbye to everyone)."""
        dirty, self._dirty = self._dirty, {}
        for channel in dirty:
            channel.flush()

    async def run_flusher(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fan out pending publications whenever there are some. Runs until cancelled."""
        task_status.started()
        while True:
            while not self._dirty:
                await self._lot.park()
            self.flush_all()
            # Let the publishers run before the next round, so they can batch up.
            await trio.lowlevel.checkpoint()

    def statistics(self) -> HubStatistics:
        return HubStatistics(channels=len(self._channels), subscriptions=self._subscriptions,
                             publications=self._publications, pending_channels=len(self._dirty))
