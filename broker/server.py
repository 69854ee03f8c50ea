"""The broker: one listening port, one nursery per connection, graceful shutdown.

Embedding::

    async with trio.open_nursery() as nursery:
        broker = await nursery.start(tokenfan_broker.serve, Config(port=0))
        offset = broker.emit("ai-chat/42", "ai:token", {"token": "Hello"})
        ...
        broker.shutdown()      # graceful: bye to every client, then serve() returns

Theory of operation
-------------------
:meth:`Broker.serve` opens the listeners and runs, in one nursery, the hub's
flusher, the accept loop (in a cancel scope of its own, so shutdown can stop
accepting without touching live connections) and every connection's task.
Each connection task speaks HTTP until it upgrades to WebSocket; whatever
goes wrong inside it is logged and ends that connection only.

Shutdown closes the listeners, ends every running AI answer with ``ai:error``
``shutting_down`` (so watchers see how it ended), sends every WebSocket client ``bye`` with
``SHUTTING_DOWN`` (``reconnect: true``), waits at most ``shutdown_timeout``
for the connections to drain, then cancels whatever is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio

import protocol as p
from broker.admission import HttpPhaseGate
from broker.ai.sessions import CHANNEL_PREFIX, AiService
from broker.ai.shared import SharedAnswers
from broker.auth import Authenticator
from broker.backlog import Backlog, BacklogStatistics
from broker.config import ChannelOptions, Config, ConfigError
from broker.deadlines import Deadlines
from broker.errors import EmitError, EngineUnavailable
from broker.history import Engine, EngineStatistics, MemoryEngine, Replay
from broker.hosts import HostPolicy
from broker.http import Upgrade, error_response, serve_http
from broker.hub import Hub, HubStatistics, Publication
from broker.limits import AddressCount, KeyedRate, parse_networks
from broker.memory import MemoryBudget, default_memory_limit
from broker.outbox import Outbox
from broker.pacing import SharedRate
from broker.redis.engine import RedisEngine
from broker.ws import WsConnection

log = logging.getLogger("tokenfan")
#: Connections the heartbeat pings before it lets others run (about 6 ms of work here).
HEARTBEATS_PER_TURN = 256

# Errors accept() may raise when the process runs out of descriptors or memory;
# the listener backs off and tries again instead of dying (as trio.serve_listeners does).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: How long the listener waits after accept failed for want of descriptors or memory.
ACCEPT_BACKOFF = 0.1
#: How often expired history is dropped.
HISTORY_SWEEP_INTERVAL = 1.0
#: Streams the sweep looks at between checkpoints (1-2 ms of work on this machine kind).
HISTORY_SWEEP_BATCH = 500
#: The command to every node (on Redis) that stops a session's answer wherever it runs.
CANCEL_COMMAND = b"cancel:"
#: Channel names whose options are remembered (the cache is emptied when it fills).
_OPTIONS_CACHE_SIZE = 10_000


@contextlib.contextmanager
def _encoding_errors() -> Iterator[None]:
    """Raise a value msgpack refuses (an int past 64 bits, say) as :class:`EmitError`."""
    try:
        yield
    except p.LocalProtocolError as exc:
        raise EmitError(f"data cannot be encoded as msgpack: {exc.__cause__ or exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerStatistics:
    """A snapshot of the broker."""

    connections: int  #: WebSocket clients
    tcp_connections: int  #: every open TCP connection, HTTP ones included
    hub: HubStatistics
    history: EngineStatistics
    backlog: BacklogStatistics
    bytes_queued: int
    slow_disconnects: int
    accepting: bool


class Broker:
    """A tokenfan broker. Create it, run :meth:`serve` in a nursery, then emit."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._options: dict[str, ChannelOptions] = {}
        #: The Redis engine, when ``engine`` names one (None: the memory engine, this process only).
        self.redis: RedisEngine | None = None
        self.engine: Engine
        if self.config.redis_url is None:
            self.engine = MemoryEngine(self.channel_options, max_bytes=self.config.history_max_bytes)
        else:
            self.engine = self.redis = RedisEngine(self.config.redis_url, self.channel_options,
                                                   prefix=self.config.redis_prefix)
        self.hub = Hub(self.engine, batching=self.config.batching)
        self.backlog = Backlog(self.channel_options)
        self.ai = AiService(self)
        if self.redis is not None:
            self.redis.deliver = self._delivered
            self.redis.restarted = self._stream_restarted
            self.redis.on_command = self._on_command
            self.ai.shared = SharedAnswers(self.redis, self._publish_lost)
        self.connections: set[WsConnection] = set()
        self._by_outbox: dict[Outbox, WsConnection] = {}  # the connection each subscriber outbox is of
        self.port: int | None = None
        self._tcp_connections = 0
        self._slow_disconnects = 0
        self.auth_refused = 0  #: WebSocket clients and HTTP requests refused for want of a good credential
        self._accepting = False
        self._shutdown = trio.Event()
        self._drained = trio.Event()  # set when shutting down and the last connection has ended
        self._data_limits = p.Limits(max_frame_size=self.config.max_body_size)
        self.hosts = HostPolicy.from_config(self.config)
        self.memory = MemoryBudget(self.config.memory_limit or default_memory_limit(),
                                   on_over=self._memory_over)
        self._memory_pressure = trio.Event()
        # Every replay page and history answer, all clients together; bursts of a second's worth.
        self.history_reads = SharedRate(self.config.history_read_rate, burst=self.config.history_read_rate)
        # What heavy senders (clients past half their client_input_rate burst) send, all together.
        self.heavy_input = SharedRate(self.config.heavy_input_rate, burst=self.config.heavy_input_rate)
        self._shed_logged = -math.inf
        self.http_gate = HttpPhaseGate(total=self.config.max_http_connections,
                                       per_address=self.config.max_http_connections_per_ip)
        self._accept_failures = 0
        self._accept_failure_logged = -math.inf
        config = self.config
        self.auth = Authenticator(config.auth)  # raises ConfigError for an unreadable key file
        self.trusted_proxies = parse_networks(config.trusted_proxies)
        self.connections_per_ip = AddressCount(config.max_connections_per_ip)
        # Upgrades per address: bursts of 5 seconds' worth.
        self.upgrade_rate = KeyedRate(config.upgrade_rate_per_ip, 5 * config.upgrade_rate_per_ip)
        # /ai/chat, /ai/cancel and demo tokens per user (token sub) or address.
        self.ai_rate = KeyedRate(config.ai_request_rate, config.ai_request_burst)
        # Publications through the HTTP API with a user token, per user: as a client's pub.
        self.user_publish_rate = KeyedRate(config.client_publish_rate, config.client_publish_rate)
        self.expiry = Deadlines()

    # -- emitting ------------------------------------------------------------------

    async def emit(self, channel: str, event: str, data: Any = None, *,
                   persist: bool | None = None) -> Publication:
        """Publish ``event`` with ``data`` on ``channel`` to every subscriber; return where it landed.

        The same on both engines: on the memory engine it returns at once (fan-out
        happens in the broker's flusher, or right here with ``batching = false``); on
        Redis once Redis has given the publication its offset. Emits of this broker
        (this method's and :meth:`emit_nowait`'s) are published in the order they are
        made. ``persist`` overrides whether the channel keeps this publication in its
        history (the default: if its ``history_size`` is above 0).

        Raises:
            EmitError: the channel or event name is invalid, ``data`` is not
                made of msgpack-encodable values (nil, bool, int, float, str,
                bytes, lists, and dicts with str keys), or ``persist=True`` on
                a channel that keeps no history.
            EngineUnavailable: the Redis engine cannot reach Redis (the emit may or
                may not have been published).
        """
        return await self.publish(channel, event, data, persist=persist)

    def emit_nowait(self, channel: str, event: str, data: Any = None, *, persist: bool | None = None) -> None:
        """Like :meth:`emit`, without waiting for the offset (for tokens, say): never waits.

        Raises:
            EmitError: as :meth:`emit`.
            EngineUnavailable: on Redis, too much is waiting to be sent already.
        """
        data, persist, is_cancel = self._prepare(channel, event, data, persist, validate=True)
        redis = self.redis
        with _encoding_errors():
            if redis is None:
                self.hub.publish(channel, event, data, persist=persist)
            else:
                redis.publish_nowait(channel, event, data, persist=persist)
        if is_cancel:
            self._cancel_answer(channel)

    def publish_here(self, channel: str, event: str, data: Any = None, *, persist: bool | None = None,
                     validate: bool = True) -> Publication:
        """Publish at once, in this process: the memory engine only (the HTTP API's fast path).

        Raises:
            EmitError: as :meth:`emit`.
            RuntimeError: the engine is Redis (use :meth:`publish`).
        """
        if self.redis is not None:
            raise RuntimeError("publish_here is for the memory engine; await publish() on Redis")
        data, persist, is_cancel = self._prepare(channel, event, data, persist, validate=validate)
        with _encoding_errors():
            publication = self.hub.publish(channel, event, data, persist=persist)
        if is_cancel:
            self._cancel_answer(channel)
        return publication

    async def publish(self, channel: str, event: str, data: Any = None, *, persist: bool | None = None,
                      validate: bool = True) -> Publication:
        """Like :meth:`emit`; ``validate=False`` when the caller has checked the names and data."""
        redis = self.redis
        if redis is None:
            return self.publish_here(channel, event, data, persist=persist, validate=validate)
        data, persist, is_cancel = self._prepare(channel, event, data, persist, validate=validate)
        with _encoding_errors():
            stored = await redis.publish(channel, event, data, persist=persist)
        publication = Publication(channel=channel, offset=stored.offset, epoch=stored.epoch)
        if is_cancel:
            # Any watcher (or the app) may stop the answer streaming on an AI chat channel.
            self._cancel_answer(channel)
        return publication

    async def publish_batch(self, events: list[tuple[str, str, Any, bool | None]]) -> list[Publication]:
        """Publish validated ``(channel, event, data, persist)`` in order, all queued at once."""
        prepared = [(channel, event, *self._prepare(channel, event, data, persist, validate=False))
                    for channel, event, data, persist in events]
        redis = self.redis
        if redis is None:
            publications = [self.hub.publish(channel, event, data, persist=persist)
                            for channel, event, data, persist, _cancel in prepared]
        else:
            stored = await redis.publish_many([(channel, event, data, persist)
                                               for channel, event, data, persist, _cancel in prepared])
            publications = [Publication(channel=channel, offset=item.offset, epoch=item.epoch)
                            for (channel, *_rest), item in zip(prepared, stored, strict=True)]
        for channel, _event, _data, _persist, is_cancel in prepared:
            if is_cancel:
                self._cancel_answer(channel)
        return publications

    def _prepare(self, channel: str, event: str, data: Any, persist: bool | None, *,
                 validate: bool) -> tuple[Any, bool, bool]:
        """Check an emit; return its data and persist as published, and whether it is an ``ai:cancel``."""
        if validate:
            problem = (p.channel_problem(channel) or p.event_problem(event)
                       or p.data_problem(data, self._data_limits, field="data")
                       or self.persist_problem(channel, persist))
            if problem is not None:
                raise EmitError(problem)
        is_cancel = event == "ai:cancel" and channel.startswith(CHANNEL_PREFIX)
        if is_cancel:
            # A command, not content: watchers see that a stop was asked, history keeps nothing.
            data, persist = {}, False
        if persist is None:
            persist = self.channel_options(channel).persist
        return data, persist, is_cancel

    def _delivered(self, channel: str, frame: bytes) -> None:
        """A publication from Redis (made on any node): fan it out here; on an AI chat channel,
        note answers starting and ending (a node that dies mid-answer is then noticed)."""
        self.hub.deliver(channel, frame)
        shared = self.ai.shared
        if shared is not None and channel.startswith(CHANNEL_PREFIX):
            shared.observe(channel, frame)

    def _cancel_answer(self, channel: str) -> None:
        """Stop the answer streaming on AI chat ``channel``, on whichever node runs it."""
        session = channel[len(CHANNEL_PREFIX):]
        self.ai.cancel(session)
        if self.redis is not None:
            self.redis.notify(CANCEL_COMMAND + session.encode())

    def _on_command(self, command: bytes) -> None:
        """A command to every node, from any node (see :meth:`RedisEngine.notify`)."""
        if command.startswith(CANCEL_COMMAND):
            self.ai.cancel(command[len(CANCEL_COMMAND):].decode(errors="replace"))

    async def _publish_lost(self, channel: str, data: dict[str, str]) -> None:
        await self.publish(channel, "ai:error", data, validate=False)

    def _stream_restarted(self, channel: str) -> None:
        """The engine lost ``channel``'s stream (Redis restarted without persistence): its
        subscribers' positions mean nothing now, so each is told to reconnect and subscribe again."""
        hub_channel = self.hub.channel(channel)
        if hub_channel is None:
            return
        log.warning("the stream of %s began again in a new epoch (Redis lost it): its %d subscriber(s) "
                    "reconnect", channel, len(hub_channel.subscribers))
        for outbox in list(hub_channel.subscribers):
            connection = self._by_outbox.get(outbox)
            if connection is not None:
                connection.close(p.Code.STREAM_RESTARTED,
                                 f"the stream of {channel} began again (the broker's Redis lost it): "
                                 "reconnect and subscribe again")

    # -- history, on either engine --------------------------------------------------

    async def read_history(self, channel: str, *, after: int, epoch: str | None, limit: int,
                           max_bytes: int, newest: bool = False) -> Replay:
        """Kept publications of ``channel`` after ``after`` (see :meth:`Engine.since`), from
        this process's memory or from Redis.

        Raises:
            EngineUnavailable: the Redis engine cannot reach Redis.
        """
        if self.redis is not None:
            return await self.redis.read(channel, after=after, epoch=epoch, limit=limit,
                                         max_bytes=max_bytes, newest=newest)
        return self.engine.since(channel, after=after, epoch=epoch, limit=limit, max_bytes=max_bytes,
                                 newest=newest)

    async def follow(self, channel: str) -> None:
        """Make sure this node receives every publication on ``channel`` until :meth:`unfollow`
        (a no-op on the memory engine). Call it before reading history for a subscriber.

        Raises:
            EngineUnavailable: the Redis engine cannot reach Redis.
        """
        if self.redis is not None:
            await self.redis.lease(channel)

    def unfollow(self, channel: str) -> None:
        """Undo one :meth:`follow`."""
        if self.redis is not None:
            self.redis.unlease(channel)

    def persist_problem(self, channel: str, persist: object) -> str | None:
        """What is wrong with an emit's ``persist`` value for ``channel``, or None."""
        if persist is None or persist is False:
            return None
        if persist is not True:
            return f"persist must be true or false, got {persist!r}"
        if not self.channel_options(channel).persist:
            return (f"persist: channel {channel} keeps no history; give its pattern a history_size "
                    "in the [channels] configuration")
        return None

    def channel_options(self, channel: str) -> ChannelOptions:
        """The options of ``channel`` (its first matching pattern in the configuration)."""
        options = self._options.get(channel)
        if options is None:
            if len(self._options) >= _OPTIONS_CACHE_SIZE:
                self._options.clear()
            options = self._options[channel] = self.config.channel_options(channel)
        return options

    # -- running -------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until :meth:`shutdown` completes or the caller cancels.

        ``task_status.started`` is called with the broker once it accepts connections;
        :attr:`port` is then the real port (useful with port 0).
        """
        config = self.config
        problem = config.insecure_bind_problem()
        if problem is not None:
            raise ConfigError(problem)
        unreachable: EngineUnavailable | None = None
        async with trio.open_nursery() as outer:  # the engine's connections outlive every connection
            if self.redis is not None:
                try:
                    await outer.start(self.redis.run)
                except EngineUnavailable as exc:
                    unreachable = exc
            if unreachable is None:
                await self._serve(listeners=await trio.open_tcp_listeners(config.port, host=config.host),
                                  task_status=task_status)
            outer.cancel_scope.cancel()
        if unreachable is not None:  # raised out here: not wrapped in the nursery's exception group
            raise ConfigError(f"engine: {unreachable}")

    async def _serve(self, *, listeners: list[trio.SocketListener],
                     task_status: trio.TaskStatus[Broker]) -> None:
        config = self.config
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.hub.run_flusher)
                self.ai.attach(nursery)
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._shed_memory)
                nursery.start_soon(self._sweep_history)
                nursery.start_soon(self.expiry.run)
                accept_scope = trio.CancelScope()
                nursery.start_soon(self._accept_loop, listeners, nursery, accept_scope)
                self._accepting = True
                task_status.started(self)
                await self._shutdown.wait()
                self._accepting = False
                accept_scope.cancel()
                with trio.move_on_after(config.shutdown_timeout):
                    await self.ai.stop_all()  # watchers see how each answer ended, then bye
                self.hub.flush_all()  # what was emitted before shutdown still goes out, before bye
                for connection in list(self.connections):
                    connection.close(p.Code.SHUTTING_DOWN, "server shutting down")
                with trio.move_on_after(config.shutdown_timeout):
                    if self.connections:
                        await self._drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._accepting = False
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _heartbeat(self) -> None:
        """Every ``ping_interval``: ping each WebSocket client, close the ones gone silent.

        One task for all connections rather than one per connection keeps idle
        connections cheap. It yields every :data:`HEARTBEATS_PER_TURN` connections: a
        step over 10,000 of them at once would hold up every stream for tens of ms.
        """
        while True:
            await trio.sleep(self.config.ping_interval)
            now = trio.current_time()
            for index, connection in enumerate(list(self.connections), start=1):
                connection.heartbeat(now)
                if index % HEARTBEATS_PER_TURN == 0:
                    await trio.lowlevel.checkpoint()

    async def _sweep_history(self) -> None:
        """Every :data:`HISTORY_SWEEP_INTERVAL`: drop expired history and chat sessions, freeing memory.

        However many streams expire in the same second, they are swept
        :data:`HISTORY_SWEEP_BATCH` at a time with a checkpoint between batches.
        """
        while True:
            await trio.sleep(HISTORY_SWEEP_INTERVAL)
            now = trio.current_time()
            while self.engine.expire(now, budget=HISTORY_SWEEP_BATCH):
                await trio.lowlevel.checkpoint()
            self.ai.expire(trio.current_time())

    def _memory_over(self) -> None:
        self._memory_pressure.set()

    async def _shed_memory(self) -> None:
        """When the memory budget goes over its limit: cut the largest send buffers (outside the
        offer that crossed it, which may be one of them)."""
        while True:
            await self._memory_pressure.wait()
            self._memory_pressure = trio.Event()
            if self.memory.over:
                used = self.memory.used
                cut = self.memory.shed()
                now = trio.current_time()
                if cut and now - self._shed_logged >= 10:  # at most once per 10 s
                    log.warning("memory_limit (%d bytes) passed at %d bytes held for clients: cut the %d "
                                "largest send buffer(s) (%d since start)", self.memory.limit, used, cut,
                                self.memory.shed_count)
                    self._shed_logged = now

    def shutdown(self) -> None:
        """Begin a graceful shutdown; :meth:`serve` returns when it is done."""
        self._shutdown.set()

    async def _accept_loop(self, listeners: list[trio.SocketListener], nursery: trio.Nursery,
                           scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept, listener, nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                self._note_accept_failure(exc)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            nursery.start_soon(self._handle_stream, stream)

    def _note_accept_failure(self, exc: OSError) -> None:
        """Log that ``accept`` failed for want of descriptors or memory: once per 10 s, with a count."""
        self._accept_failures += 1
        now = trio.current_time()
        if now - self._accept_failure_logged >= 10:
            log.error("accept failed (%s) %d time(s): out of file descriptors or memory; "
                      "retrying every %d ms",
                      errno.errorcode.get(exc.errno or 0, exc.errno), self._accept_failures,
                      ACCEPT_BACKOFF * 1000)
            self._accept_failure_logged = now
            self._accept_failures = 0

    async def _serve_http_phase(self, stream: trio.SocketStream) -> Upgrade | None:
        """The connection's HTTP phase, counted against the caps of :attr:`http_gate`."""
        try:
            address = str(stream.socket.getpeername()[0])
        except OSError:
            return None  # gone already
        problem = self.http_gate.enter(address)
        if problem is not None:
            with trio.move_on_after(1):
                await stream.send_all(error_response(503, problem, close=True))
            return None
        try:
            return await serve_http(self, stream, address)
        finally:
            self.http_gate.leave(address)

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        """One TCP connection, from its first HTTP byte to its close. Nothing escapes but Cancelled."""
        self._tcp_connections += 1
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upgrade = await self._serve_http_phase(stream)
            if upgrade is not None:
                connection = WsConnection(self, stream)
                self.connections.add(connection)
                self._by_outbox[connection.outbox] = connection
                try:
                    accepted = await connection.handshake(upgrade)
                    del upgrade  # the request head is not needed any more: idle connections stay small
                    if accepted:
                        await connection.run()
                finally:
                    connection.dispose()
                    self.connections.discard(connection)
                    self._by_outbox.pop(connection.outbox, None)
                    if not self.connections and self._shutdown.is_set():
                        self._drained.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the peer went away; nothing to report
        except Exception:
            log.exception("connection failed")
        finally:
            self._tcp_connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    # -- state ---------------------------------------------------------------------

    def at_connection_limit(self) -> bool:
        return len(self.connections) > self.config.max_connections

    def count_slow_disconnect(self) -> None:
        self._slow_disconnects += 1

    def statistics(self) -> BrokerStatistics:
        return BrokerStatistics(
            connections=len(self.connections), tcp_connections=self._tcp_connections,
            hub=self.hub.statistics(), history=self.engine.statistics(), backlog=self.backlog.statistics(),
            bytes_queued=self.memory.queued,
            slow_disconnects=self._slow_disconnects, accepting=self._accepting,
        )

    def health(self) -> dict[str, Any]:
        stats = self.statistics()
        return {"ok": True, "accepting": stats.accepting, "connections": stats.connections,
                "channels": stats.hub.channels, "subscriptions": stats.hub.subscriptions,
                "publications": stats.hub.publications, "bytes_queued": stats.bytes_queued,
                "history_publications": stats.history.kept, "history_bytes": stats.history.bytes,
                "recoveries": stats.hub.recoveries, "recovery_misses": stats.hub.recovery_misses,
                "coalesced": stats.backlog.coalesced, "dropped": stats.backlog.dropped,
                "slow_disconnects": stats.slow_disconnects, "memory_used": self.memory.used,
                "memory_limit": self.memory.limit, "memory_shed": self.memory.shed_count,
                "auth_refused": self.auth_refused, "engine": self._engine_health()}

    def _engine_health(self) -> dict[str, Any]:
        redis = self.redis
        if redis is None:
            return {"kind": "memory"}
        shared = self.ai.shared
        return {"kind": "redis", "url": str(redis.address), "connected": redis.connected,
                "following": redis.statistics().streams, "published": redis.published,
                "received": redis.received, "round_trips": redis.round_trips,
                "gaps_filled": redis.gaps_filled, "errors": redis.errors, "lost": redis.lost,
                "answers_lost": 0 if shared is None else shared.lost_published}


async def serve(config: Config | None = None, *,
                task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a :class:`Broker` with ``config``; ``await nursery.start(serve, config)`` returns it."""
    await Broker(config).serve(task_status=task_status)
