"""One WebSocket client of the broker: handshake, reader, heartbeat and command handling.

Theory of operation
-------------------
After :mod:`broker.http` sees an upgrade request, :class:`WsConnection`
checks it and answers 101 itself, then runs two things in one nursery:
the reader (socket → wsproto → :class:`protocol.Decoder` → commands) and, in
the connection's own task, the outbox writer. Every byte sent goes through the
:class:`Outbox`. The broker's one heartbeat task calls :meth:`heartbeat` on
every connection (WebSocket pings, idle timeout).

The connection ends when the writer returns: the outbox was closed and
drained (a ``bye`` was sent), it overflowed (slow consumer), or the socket
died. The reader and the heartbeat end a connection by closing the outbox with
a ``bye`` and a close frame; the writer's deadline (``shutdown_timeout``)
bounds how long a peer that does not read can keep us waiting.
"""

from __future__ import annotations

import base64
import binascii
import math
import socket
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import msgpack
import trio
import wsproto
import wsproto.connection
import wsproto.events as wse
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError
from wsproto.utilities import generate_accept_token

import protocol as p
from broker.auth import APP, AuthError, Grants
from broker.errors import EngineUnavailable
from broker.http import error_response
from broker.hub import MAX_REPLAY
from broker.limits import limit_key
from broker.memory import MemoryBudget
from broker.outbox import Outbox, OutboxState, OutboxStatistics
from broker.sockio import receive_some

if TYPE_CHECKING:
    from broker.http import Upgrade
    from broker.httpwire import RequestHead
    from broker.server import Broker


SERVER_NAME = "tokenfan/0.1.0"
#: History read for one recovery, in units of ``outbox_limit``, before coalescing makes it fit.
REPLAY_READ_FACTOR = 16
#: The kernel receive buffer of a WebSocket connection (SO_RCVBUF; the kernel doubles it).
WS_RECEIVE_BUFFER = 64 * 1024
#: A client may send this many seconds' worth of ``client_input_rate`` at once.
INPUT_BURST_SECONDS = 4
#: Least time between two tokens on one connection (the first, or refreshes).
REFRESH_INTERVAL = 1.0
#: History read (and coalesced) in one step of a recovery, before other clients get a turn.
REPLAY_PAGE_BYTES = 256 * 1024
#: A replay smaller than this is queued as compact without coalescing: too few frames to gain.
COMPACT_BELOW = 4096


class _ReplayPages:
    """The pages of a recovery read so far: each coalesced page with the offset it starts after.

    The pages are held across awaits, so their bytes are charged to the memory budget
    (when one is given) until :meth:`release`.
    """

    __slots__ = ("compact", "memory", "pieces", "read", "size")

    def __init__(self, memory: MemoryBudget | None = None) -> None:
        self.memory = memory
        self.compact = True  # every page was coalesced
        self.pieces: deque[tuple[int, bytes]] = deque()
        self.size = 0  # bytes of the coalesced pages
        self.read = 0  # bytes of history read for them

    def release(self) -> None:
        """Give back the pages' charge (the replay, if sent, is charged to the send buffer)."""
        if self.memory is not None:
            self.memory.change(-self.size)
            self.memory = None

    @property
    def start(self) -> int:
        return self.pieces[0][0]

    def add(self, after: int, data: bytes, *, compact: bool = True) -> None:
        self.pieces.append((after, data))
        self.compact = self.compact and compact
        self._resize(len(data))

    def drop_oldest(self, room: int) -> bool:
        """Drop the oldest pages until the rest fit in ``room``; True if any were dropped."""
        dropped = False
        while self.pieces and self.size > room:
            self._resize(-len(self.pieces.popleft()[1]))
            dropped = True
        return dropped

    def _resize(self, delta: int) -> None:
        self.size += delta
        if self.memory is not None:
            self.memory.change(delta)

    def joined(self) -> bytes:
        return b"".join(data for _, data in self.pieces)


def bye_frames(code: p.Code, msg: str) -> bytes:
    """The ``bye`` frame and the WebSocket close frame that follows it, as one write."""
    bye = p.encode(p.Bye(code=code, msg=msg, reconnect=code.reconnect))
    return p.ws_frame(bye) + p.ws_close_frame(code, msg)


def _query_token(target: str) -> str | None:
    """The ``token`` query parameter of an upgrade's target (``/ws?token=…``), or None."""
    _, _, query = target.partition("?")
    if not query:
        return None
    try:
        values = urllib.parse.parse_qs(query, max_num_fields=20, errors="strict").get("token")
    except (ValueError, UnicodeDecodeError):
        return None
    return values[0] if values else None


def handshake_problem(head: RequestHead) -> str | None:
    """What is wrong with a WebSocket upgrade request (RFC 6455 §4.2.1), or None.

    Done here rather than with wsproto's handshake, which runs a second HTTP
    parser (h11) for every new connection.
    """
    headers = head.headers
    if head.method != "GET":
        return f"the method must be GET, not {head.method}"
    if head.http10:
        return "a WebSocket upgrade needs HTTP/1.1, not HTTP/1.0"
    if "upgrade" not in {t.strip().lower() for t in headers.get("connection", "").split(",")}:
        return "the Connection header must include 'upgrade'"
    if headers.get("sec-websocket-version", "").strip() != "13":
        return "Sec-WebSocket-Version must be 13"
    key = headers.get("sec-websocket-key", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (ValueError, binascii.Error):
        valid = False
    if not valid:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionStatistics:
    """A snapshot of one WebSocket connection."""

    subscriptions: int
    outbox: OutboxStatistics
    frames_received: int
    close_code: p.Code | None  #: why the server is closing it, once it is


class WsConnection:
    """A connected WebSocket client. Created and run by the broker.

    Memory per idle connection matters (tens of thousands of watchers), so the
    object keeps only what the connection needs after its handshake: two tasks
    (this one, which writes, and the reader), wsproto's frame parser, an
    outbox and a decoder that holds no buffer while idle. The broker's single
    heartbeat task pings every connection and enforces the idle timeout.
    """

    __slots__ = ("_authenticated_at", "_counted_address", "_frame_allowance", "_frame_checked",
                 "_frames_refused", "_input_allowance", "_input_checked", "_last_heard", "_message",
                 "_message_started",
                 "_pub_allowance", "_pub_checked", "_replay_allowance", "_replay_checked",
                 "_writer_scope", "broker", "client", "close_code", "deadline", "decoder", "fd",
                 "frames_received", "grants", "outbox", "stream", "subscriptions", "ws")

    def __init__(self, broker: Broker, stream: trio.SocketStream) -> None:
        self.broker = broker
        self.stream = stream
        self.fd = stream.socket.fileno()
        config = broker.config
        self.outbox = Outbox(
            self.fd, limit=config.outbox_limit,
            overflow_frames=bye_frames(p.Code.SLOW_CONSUMER, "send buffer full: reading too slowly"),
            on_overflow=self._on_overflow, backlog=broker.backlog, budget=broker.memory,
            shed_frames=bye_frames(p.Code.SLOW_CONSUMER, "the broker is short of memory and your send "
                                   "buffer was among the largest: reconnect and recover"),
        )
        self.subscriptions: set[str] = set()
        self.decoder = p.Decoder(peer=p.Peer.CLIENT,
                                 limits=p.Limits(max_frame_size=config.max_frame_size))
        self.ws: wsproto.connection.Connection | None = None  # set by the handshake
        self.frames_received = 0
        self._message = bytearray()
        self._message_started = 0.0  # when the first fragment of the unfinished message came
        self._last_heard = trio.current_time()
        self._writer_scope = trio.CancelScope()
        self.close_code: p.Code | None = None
        # Token bucket for client publications: client_publish_rate a second, bursts of as many.
        self._pub_allowance = config.client_publish_rate
        self._pub_checked = trio.current_time()
        # Token bucket for bytes read from the client: client_input_rate a second.
        self._input_allowance = float(INPUT_BURST_SECONDS * config.client_input_rate)
        self._input_checked = self._pub_checked
        # Token bucket for replays: replay_rate bytes a second, bursts of one full recovery.
        self._replay_allowance = float(REPLAY_READ_FACTOR * config.outbox_limit)
        self._replay_checked = self._pub_checked
        # Token bucket for frames of any kind: client_frame_rate a second, bursts of client_frame_burst.
        self._frame_allowance = float(config.client_frame_burst)
        self._frame_checked = self._pub_checked
        self._frames_refused = 0  # refused in a row: past client_frame_burst, the client is cut
        # What the client may do: everything on an open broker; None until it authenticates.
        # (With only api_keys configured, a WebSocket client needs one too: nothing is open.)
        self.grants: Grants | None = None if broker.auth.required else APP
        self.deadline = math.inf  # when the token expires (or the authentication is due); see Deadlines
        self.client = ""  # the client's address (X-Forwarded-For read when from a trusted proxy)
        self._counted_address: str | None = None
        self._authenticated_at = -math.inf  # when the last token was taken (refreshes are rate-limited)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(subscriptions=len(self.subscriptions),
                                    outbox=self.outbox.statistics(), frames_received=self.frames_received,
                                    close_code=self.close_code)

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        """Serve the client, after a successful :meth:`handshake`, until the connection ends."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                with self._writer_scope:
                    await self.outbox.run_writer()
                nursery.cancel_scope.cancel()
        finally:
            self.dispose()

    def dispose(self) -> None:
        """Let go of everything the connection holds: subscriptions, queued bytes, a partial message.

        Called when the connection ends, however it ends (the broker calls it too, for the
        handshake's paths); calling it again does nothing.
        """
        for channel in self.subscriptions:
            self.broker.hub.unsubscribe(channel, self.outbox)
        self.subscriptions.clear()
        self.broker.expiry.clear(self)
        if self._counted_address is not None:
            self.broker.connections_per_ip.leave(self._counted_address)
            self._counted_address = None
        self.outbox.abort()  # what a reader that never read left queued is released, not leaked
        self.broker.memory.change(-len(self._message))
        self._message.clear()

    def close(self, code: p.Code, msg: str) -> None:
        """Send ``bye`` and a close frame after what is queued, then end (within ``shutdown_timeout``)."""
        if self.outbox.state is not OutboxState.OPEN:
            return
        self.broker.expiry.clear(self)
        self.close_code = code
        self.outbox.close(bye_frames(code, msg))
        self._limit_linger()

    def heartbeat(self, now: float) -> None:
        """Called by the broker every ``ping_interval``: ping, or close a connection that holds on
        without taking part: silent, not reading what it is sent (whatever it sends meanwhile, pongs
        included), or leaving a message unfinished."""
        config = self.broker.config
        silent = now - self._last_heard
        stalled = self.outbox.stalled_for(now)
        if silent >= config.idle_timeout:
            self.close(p.Code.IDLE_TIMEOUT, f"nothing heard for {silent:.0f}s")
        elif stalled >= config.idle_timeout:
            self.close(p.Code.SLOW_CONSUMER, f"nothing sent to you could be delivered for {stalled:.0f}s")
        elif self._message and (unfinished := now - self._message_started) >= config.handshake_timeout:
            self.close(p.Code.BAD_FRAME, f"a message was left unfinished for {unfinished:.0f}s")
        elif self.ws is not None:
            self.outbox.offer(self.ws.send(wse.Ping(payload=b"tf")))

    def _limit_linger(self) -> None:
        """Give the writer at most ``shutdown_timeout`` more to flush the last bytes."""
        self._writer_scope.deadline = min(self._writer_scope.deadline,
                                          trio.current_time() + self.broker.config.shutdown_timeout)

    def _on_overflow(self) -> None:
        self.close_code = p.Code.SLOW_CONSUMER
        self.broker.count_slow_disconnect()
        self._limit_linger()

    def deadline_passed(self, now: float) -> None:
        """Called by the broker's :class:`~broker.deadlines.Deadlines` when :attr:`deadline` comes."""
        if self.grants is None:
            self._refuse("no token within handshake_timeout: send hello {token} as "
                                            "the first frame, or connect with ?token=")
        else:
            self.close(p.Code.TOKEN_EXPIRED, "your token expired: send hello {token} with a fresh one "
                                             "before exp; reconnect with a new token")

    def _refuse(self, msg: str) -> None:
        """End the connection with ``bye`` UNAUTHORIZED, counted in ``/healthz`` (never logged: a
        flood of bad tokens must not flood the log, and tokens are secrets)."""
        self.broker.auth_refused += 1
        self.close(p.Code.UNAUTHORIZED, msg)

    def _authenticate(self, token: str) -> str | None:
        """Verify ``token`` (a user token, or an app's API key) and take its grants (the first, or
        a refresh); None, or why it failed."""
        auth = self.broker.auth
        try:
            grants = auth.bearer(token, now=time.time())
        except AuthError as exc:
            return exc.reason
        if self.grants is not None and grants.user != self.grants.user:
            return (f"a fresh token must be for the same user: this connection is {self.grants.user!r}, "
                    f"the token is for {grants.user!r}")
        self.grants = grants
        self._authenticated_at = trio.current_time()
        # exp is wall-clock time; deadlines run on Trio's clock. An API key never expires.
        deadline = math.inf if grants.app else trio.current_time() + (grants.exp - time.time())
        self.broker.expiry.set(self, deadline)
        return None

    async def handshake(self, upgrade: Upgrade) -> bool:
        """Accept the WebSocket upgrade; False if it was refused (and answered) or the broker is full."""
        problem = handshake_problem(upgrade.head)
        if problem is not None:
            await self._reject(400, f"bad WebSocket handshake: {problem}")
            return False
        broker = self.broker
        # A WebSocket client sends commands, not bulk, and one that sends fast is read slowly
        # (client_input_rate): with the kernel's autotuned buffer (up to tcp_rmem's maximum,
        # 32 MiB here) each could park megabytes in the kernel, and enough of them push every
        # socket on the machine into TCP memory pressure. The kernel doubles the value given.
        self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WS_RECEIVE_BUFFER)
        self.client = upgrade.client
        counted_as = limit_key(self.client)
        wait = broker.upgrade_rate.take(counted_as, trio.current_time())
        if wait > 0:
            await self._reject(429, f"too many WebSocket connections from your address "
                                    f"(upgrade_rate_per_ip: {broker.config.upgrade_rate_per_ip:g} a second); "
                                    f"retry in {math.ceil(wait)} s",
                               headers=(("Retry-After", str(math.ceil(wait))),))
            return False
        websocket_key = upgrade.head.headers["sec-websocket-key"].encode("ascii")
        self.ws = wsproto.connection.Connection(wsproto.ConnectionType.SERVER)
        self.outbox.offer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                          + generate_accept_token(websocket_key) + b"\r\n\r\n")
        refusal = None
        if broker.at_connection_limit():
            refusal = "server is at its connection limit"
        elif not broker.connections_per_ip.enter(counted_as):
            refusal = (f"your address holds {broker.config.max_connections_per_ip} connections "
                       "(max_connections_per_ip)")
        else:
            self._counted_address = counted_as
        if refusal is not None:
            # Accept, then say why we close: clients see a documented code, not a reset.
            self.close(p.Code.TOO_MANY_CONNECTIONS, refusal)
            with self._writer_scope:
                await self.outbox.run_writer()
            return False
        if self.grants is None:
            token = _query_token(upgrade.head.target)
            if token is None:
                # The token comes in the first frame, within the handshake's time.
                broker.expiry.set(self, trio.current_time() + broker.config.handshake_timeout)
            elif (reason := self._authenticate(token)) is not None:
                self._refuse(f"bad token in ?token=: {reason}")
                return True  # the writer sends the bye
        if upgrade.trailing:
            await self._receive(upgrade.trailing)
        return True

    async def _reject(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        with trio.move_on_after(self.broker.config.shutdown_timeout):
            await self.stream.send_all(error_response(status, message, close=True, headers=headers))

    # -- reading --------------------------------------------------------------

    async def _reader(self) -> None:
        config = self.broker.config
        burst = INPUT_BURST_SECONDS * config.client_input_rate
        heavy = False  # past half its burst; light again only once the burst is whole again
        while self.outbox.state is OutboxState.OPEN:
            if heavy:
                # A heavy sender (past half its burst): its next read waits its turn at the rate
                # all heavy senders share, so many of them together cannot take the core from
                # the live streams. Light senders (commands, pings) never wait in this line.
                await trio.lowlevel.wait_readable(self.fd)
                async with self.broker.heavy_input.turn():
                    pass
            data = await receive_some(self.fd)
            if not data:
                self.outbox.abort()
                return
            self._last_heard = now = trio.current_time()
            await self._receive(data)
            # What a client sends costs the broker CPU to read and decode (refused or not): past
            # client_input_rate this connection is read no further for a while (TCP pushes back).
            rate = config.client_input_rate
            self._input_allowance = min(burst, self._input_allowance + (now - self._input_checked) * rate)
            self._input_checked = now
            # Heavy past half its burst, light again only once its burst has refilled whole: a
            # sender waiting in the shared line refills its own allowance meanwhile, and must not
            # slip out of the line before it has really stopped sending.
            heavy = (heavy and self._input_allowance < burst) or self._input_allowance - len(data) < burst / 2
            self._input_allowance -= len(data)
            if heavy:
                self.broker.heavy_input.spend(len(data))
            del data  # not held while this connection waits
            if self._input_allowance < 0:
                await trio.sleep(-self._input_allowance / rate)
        # Closing: keep reading (and discarding) so the peer's close frame is consumed.
        while await receive_some(self.fd):
            pass

    async def _receive(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        try:
            ws.receive_data(data)
            for event in ws.events():
                await self._on_ws_event(event)
                if self.outbox.state is not OutboxState.OPEN:
                    return
        except WsRemoteProtocolError as exc:
            self.close(p.Code.BAD_FRAME, f"WebSocket protocol error: {exc}")

    async def _on_ws_event(self, event: wse.Event) -> None:
        if isinstance(event, wse.BytesMessage):
            if not self._message and not event.message_finished:
                self._message_started = trio.current_time()
            self._message += event.data
            self.broker.memory.change(len(event.data))
            if len(self._message) > self.broker.config.max_frame_size:
                self.close(p.Code.FRAME_TOO_LARGE,
                           f"message larger than the {self.broker.config.max_frame_size}-byte limit")
                return
            if event.message_finished:
                message = bytes(self._message)
                self.broker.memory.change(-len(message))
                self._message.clear()
                await self._on_message(message)
        elif isinstance(event, wse.TextMessage):
            self.close(p.Code.BAD_FRAME, "text messages are not part of the protocol: send binary msgpack")
        elif isinstance(event, wse.Ping):
            assert self.ws is not None
            self.outbox.offer_urgent(self.ws.send(event.response()))
        elif isinstance(event, wse.CloseConnection):
            assert self.ws is not None
            self.close_code = None
            self.outbox.close(self.ws.send(event.response()))
            self._limit_linger()

    async def _on_message(self, message: bytes) -> None:
        # Decoded in full before anything awaits (a replay may wait its turn for seconds), so
        # the decoder and its buffer let go of the message at once: a message is at most
        # max_frame_size, and what it decodes to is held instead, only as long as it is handled.
        decoder = self.decoder
        decoder.feed(message)
        del message
        items: list[p.Frame | p.RemoteProtocolError] = []
        while True:
            try:
                frame = decoder.next_frame()
                if frame is None:
                    decoder.end_of_message()
                    break
            except p.RemoteProtocolError as exc:
                items.append(exc)
                if exc.id is None:
                    break  # the connection ends here: nothing after it is read
                continue
            items.append(frame)
        for item in items:
            if isinstance(item, p.RemoteProtocolError):
                if self.grants is None:  # nothing but a good hello is answered before authentication
                    self._refuse(f"authenticate first: send hello {{token}}; {item.msg}")
                    return
                if item.id is None:
                    self.close(item.code, item.msg)
                    return
                self.reply_urgent(p.Err(id=item.id, code=item.code, msg=item.msg))
                continue
            self.frames_received += 1
            if not self._admit(cast(p.ClientFrame, item)):  # a client decoder yields client frames
                if self.outbox.state is not OutboxState.OPEN:
                    return
                continue
            if isinstance(item, p.Sub):
                await self._subscribe(item)
            elif isinstance(item, p.Pub):
                await self._publish(item)
            else:
                self._handle(item)
            if self.outbox.state is not OutboxState.OPEN:
                return

    def _admit(self, frame: p.ClientFrame) -> bool:
        """Whether to handle ``frame``: the client authenticated (or does now) and is within its rate.

        Refusals are answered here: ``bye`` UNAUTHORIZED before authentication, ``err``
        RATE_LIMITED past ``client_frame_rate``, and ``bye`` once the client has gone on
        sending a whole burst's worth of refused frames.
        """
        if self.grants is None:
            if isinstance(frame, p.Hello) and frame.token is not None:
                return True  # handled (and verified) like a refresh
            self._refuse("authenticate first: send hello {token} as the first frame, "
                                            "or connect with ?token=")
            return False
        config = self.broker.config
        now = trio.current_time()
        rate = config.client_frame_rate
        self._frame_allowance = min(config.client_frame_burst,
                                    self._frame_allowance + (now - self._frame_checked) * rate)
        self._frame_checked = now
        if self._frame_allowance >= 1:
            self._frame_allowance -= 1
            self._frames_refused = 0
            return True
        self._frames_refused += 1
        if self._frames_refused > config.client_frame_burst:
            self.close(p.Code.RATE_LIMITED, f"more than {rate:g} frames a second (client_frame_rate), "
                                            "and more went on coming after they were refused")
        else:
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.RATE_LIMITED,
                                    msg=f"more than {rate:g} frames a second from this connection "
                                        "(client_frame_rate); retry later"))
        return False

    # -- commands ---------------------------------------------------------------

    def reply(self, frame: p.Frame) -> None:
        """Queue a reply behind everything sent before it."""
        self.outbox.offer(p.ws_frame(p.encode(frame)))

    def reply_urgent(self, frame: p.Frame) -> None:
        """Queue a reply that no queued publication needs to precede, ahead of a backlog."""
        self.outbox.offer_urgent(p.ws_frame(p.encode(frame)))

    def _fit_replay(self, frames: list[bytes], room: int, *, coalesce: bool) -> tuple[bytes | None, bool]:
        """The replayed frames joined (None if they do not fit in ``room`` bytes), and whether
        they are compact: coalesced, or too few to be worth it.

        They are coalesced when large, or when ``coalesce`` says they end a replay whose earlier
        pages were (so the whole replay can be queued as compact).
        """
        joined = b"".join(frames)
        shrunk = coalesce or len(joined) > room // 2
        if shrunk and joined:
            joined = b"".join(self.broker.backlog.shrink([joined], drop=False))
        return (joined if len(joined) <= room else None), shrunk or len(joined) < COMPACT_BELOW

    def _handle(self, frame: p.Frame) -> None:
        broker = self.broker
        if isinstance(frame, p.Unsub):
            # In order: no ev of the channel may follow this ok.
            if frame.ch not in self.subscriptions:
                self.reply(p.Err(id=frame.id, code=p.Code.NOT_SUBSCRIBED,
                                 msg=f"not subscribed to {frame.ch}"))
                return
            self.subscriptions.discard(frame.ch)
            broker.hub.unsubscribe(frame.ch, self.outbox)
            self.reply(p.Ok(id=frame.id))
        elif isinstance(frame, p.Ping):
            self.reply_urgent(p.Ok(id=frame.id))
        elif isinstance(frame, p.Hello):
            grants = self.grants
            if broker.auth.required and frame.token is not None:
                if grants is not None and trio.current_time() - self._authenticated_at < REFRESH_INTERVAL:
                    # Verifying a signature costs up to a few hundred microseconds (RSA, EC): a
                    # client may not make the broker do it at its frame rate.
                    self.reply_urgent(p.Err(id=frame.id, code=p.Code.RATE_LIMITED,
                                            msg=f"a fresh token at most every {REFRESH_INTERVAL:g} s"))
                    return
                reason = self._authenticate(frame.token)
                if reason is not None:
                    self._refuse(f"bad token: {reason}")
                    return
                grants = self.grants
                assert grants is not None
                revoked = sorted(ch for ch in self.subscriptions if not grants.may_subscribe(ch))
                if revoked:
                    # A narrower token revokes: the client reconnects with it, and re-subscribing
                    # to what it no longer grants is refused (NOT_ALLOWED).
                    self.close(p.Code.TOKEN_EXPIRED, "the fresh token no longer grants "
                                                     f"{', '.join(revoked)[:300]}: reconnect with it")
                    return
            if grants is None or grants.app:
                self.reply_urgent(p.Ok(id=frame.id, server=SERVER_NAME))
            else:
                self.reply_urgent(p.Ok(id=frame.id, server=SERVER_NAME, user=grants.user,
                                       exp=int(grants.exp)))
        else:  # pragma: no cover
            raise AssertionError(f"unhandled client frame {frame!r}")

    async def _publish(self, frame: p.Pub) -> None:
        """A client's ``pub``: checked, published, answered (on Redis, once Redis has its offset)."""
        problem = self._pub_problem(frame)
        if problem is not None:
            code, msg = problem
            self.reply_urgent(p.Err(id=frame.id, code=code, msg=msg))
            return
        try:
            pub = await self.broker.publish(frame.ch, frame.ev, frame.d)
        except EngineUnavailable as exc:
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.OVERLOADED,
                                    msg=f"the engine cannot publish now ({exc}); retry later"))
            return
        self.reply_urgent(p.Ok(id=frame.id, o=pub.offset, ep=pub.epoch))

    def _pub_problem(self, frame: p.Pub) -> tuple[p.Code, str] | None:
        """Why a client's ``pub`` may not be published (channel rule, size, rate), or None.

        A client's publications land in a channel's history and in every
        watcher's send buffer, so each is bounded in size and in rate per
        connection: one client cannot fill the history everyone shares.
        """
        config = self.broker.config
        if self.grants is not None and not self.grants.may_publish(frame.ch):
            return p.Code.NOT_ALLOWED, (f"your token does not grant publishing on {frame.ch} "
                                        "(its publish claim)")
        if not self.broker.channel_options(frame.ch).allows_client_event(frame.ev):
            return p.Code.NOT_ALLOWED, f"clients may not publish {frame.ev} on {frame.ch}"
        now = trio.current_time()
        rate = config.client_publish_rate
        self._pub_allowance = min(rate, self._pub_allowance + (now - self._pub_checked) * rate)
        self._pub_checked = now
        if self._pub_allowance < 1:
            return p.Code.RATE_LIMITED, (f"more than {rate:g} publications a second from this connection "
                                         "(client_publish_rate); retry later")
        self._pub_allowance -= 1
        size = len(msgpack.packb(frame.d))
        if size > config.max_client_data:
            return p.Code.FRAME_TOO_LARGE, (f"d of a client publication is {size} bytes; the limit is "
                                            f"{config.max_client_data} (max_client_data)")
        return None

    async def _subscribe(self, frame: p.Sub) -> None:
        """Join the channel, then send ``ok`` and any replay in one offer, before anything live.

        A recovery's replay is read page by page (:meth:`_read_replay`), each page charged to
        this connection; the last page is read in the same synchronous step as joining the live
        stream, so every publication still arrives exactly once.
        """
        limit = self.broker.config.max_subscriptions
        if self.grants is not None and not self.grants.may_subscribe(frame.ch):
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.NOT_ALLOWED,
                                    msg=f"your token does not grant {frame.ch} (its channels claim)"))
            return
        if frame.ch in self.subscriptions:
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.ALREADY_SUBSCRIBED,
                                    msg=f"already subscribed to {frame.ch}"))
            return
        if len(self.subscriptions) >= limit:
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.TOO_MANY_SUBSCRIPTIONS,
                                    msg=f"a connection may hold at most {limit} subscriptions"))
            return
        if frame.since is not None and self.broker.memory.over:
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.OVERLOADED,
                                    msg="the broker is near its memory_limit and builds no replay now; "
                                        "retry later"))
            return
        room = self.broker.config.outbox_limit // 2  # a replay that fills more would end in a reconnect
        broker = self.broker
        try:
            await broker.follow(frame.ch)  # on Redis: from here on, every publication reaches this node
        except EngineUnavailable as exc:
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.OVERLOADED,
                                    msg=f"cannot subscribe now ({exc}); retry later"))
            return
        since, earlier, complete = frame.since, _ReplayPages(), True
        try:
            if since is not None:
                since, earlier, complete = await self._read_replay(frame.ch, since)
                if since is not None and broker.redis is not None:
                    # History was read from Redis up to since.o; this node's live stream must have
                    # come that far too before the (synchronous) join adds what came after.
                    await broker.redis.caught_up(frame.ch, since.o)
            if self.outbox.state is OutboxState.OPEN:
                self._join(frame, since, earlier, complete, room)
        except EngineUnavailable as exc:
            self.reply_urgent(p.Err(id=frame.id, code=p.Code.OVERLOADED,
                                    msg=f"cannot read history now ({exc}); retry later"))
        finally:
            earlier.release()
            broker.unfollow(frame.ch)  # joined, the hub holds the channel now

    def _join(self, frame: p.Sub, since: p.Position | None, earlier: _ReplayPages, complete: bool,
              room: int) -> None:
        """Subscribe in one synchronous step: read the last page, join the stream, send ok + replay."""
        hub = self.broker.hub
        last: list[int] = [0]  # bytes of history the last step read
        compact = [True]  # whether the replay is as coalesced as the backlog would make it

        def fit(frames: list[bytes]) -> bytes | None:
            last[0] = sum(len(frame) for frame in frames)
            joined, compact[0] = self._fit_replay(frames, room, coalesce=bool(earlier.pieces))
            return joined

        # The last page (read again: no await since the loop looked at it) joins the live stream.
        joined = hub.subscribe(frame.ch, self.outbox, since=since, max_replay_bytes=REPLAY_PAGE_BYTES,
                               fit=fit)
        self.subscriptions.add(frame.ch)
        self._spend_replay(last[0])
        after, replay, recovered = joined.after, joined.replay, joined.recovered
        if frame.since is not None:
            recovered = recovered and complete
            if earlier.pieces and joined.recovered:
                if frame.since.ep is None:  # a catch-up keeps the newest that fit
                    dropped = earlier.drop_oldest(room - len(replay))
                    recovered = recovered and not dropped
                if earlier.size + len(replay) <= room:
                    after, replay = earlier.start, earlier.joined() + replay
                else:  # an exact recovery that does not fit: nothing, and say so
                    (_, after), replay, recovered = self.broker.engine.position(frame.ch), b"", False
        ok = p.ws_frame(p.encode(p.Ok(id=frame.id, ch=frame.ch, o=after, ep=joined.epoch,
                                      recovered=recovered)))
        # Pages were coalesced as they were read: a shrink need not decode them again.
        self.outbox.offer(ok + replay if replay else ok, compact=compact[0] and earlier.compact)

    async def _read_replay(self, channel: str,
                           since: p.Position) -> tuple[p.Position | None, _ReplayPages, bool]:
        """Read a recovery's history up to its last page, in steps of :data:`REPLAY_PAGE_BYTES`.

        Before each step this connection waits until its replay allowance (``replay_rate``)
        is not overdrawn, then for its turn at the broker's (``history_read_rate``, shared by
        every replay and history answer, first come first served); each step spends what it
        read from both: past its own rate this connection waits, and nobody else does. Each
        page but the last is coalesced and kept; the last is read again, in the same
        synchronous step, when the subscriber joins the live stream. (On Redis the last page
        is kept too, and joining adds what this node received after it: see
        :meth:`broker.server.Broker.follow`.)
        Returns the position to join from (the epoch pinned; None when an exact recovery cannot
        fit, so it joins without a replay), the pages read, and whether nothing was skipped.
        """
        broker, backlog = self.broker, self.broker.backlog
        # On the memory engine the last page is read again as the subscriber joins; on Redis it is
        # read here like the others, and joining adds what this node received after it.
        remote = broker.redis is not None
        room = self.broker.config.outbox_limit // 2
        read_limit = REPLAY_READ_FACTOR * self.broker.config.outbox_limit
        pages = _ReplayPages(self.broker.memory)
        after, epoch, complete = since.o, since.ep, True
        try:
            while True:
                await self._await_replay_allowance()
                if remote:  # a Redis read waits on the network: not while holding everyone's turn
                    async with self.broker.history_reads.turn():
                        pass
                    page = await broker.read_history(channel, after=after, epoch=epoch, limit=MAX_REPLAY,
                                                     max_bytes=REPLAY_PAGE_BYTES)
                async with self.broker.history_reads.turn():  # all clients' replays, in turns
                    if self.outbox.state is not OutboxState.OPEN:
                        break
                    if not remote:
                        page = await broker.read_history(channel, after=after, epoch=epoch,
                                                         limit=MAX_REPLAY, max_bytes=REPLAY_PAGE_BYTES)
                    refused = since.ep is not None and not page.recovered
                    last_page = not page.more
                    if refused or (last_page and not remote):
                        break  # the rest (or the refusal) comes with joining the stream: no await before
                    read = sum(len(frame) for frame in page.frames)
                    self._spend_replay(read)
                    if last_page and not pages.pieces and read <= room // 2:
                        # A replay of one page is coalesced only when large, as on the memory engine.
                        pages.add(page.after, b"".join(page.frames), compact=read < COMPACT_BELOW)
                    else:
                        pages.add(page.after, b"".join(backlog.shrink(list(page.frames), drop=False)))
                epoch = epoch or page.epoch  # a catch-up goes on in the epoch it started in
                complete = complete and page.recovered
                pages.read += read
                after = page.last
                del page  # its frames (copies out of history) are not held, uncounted, while we wait
                if pages.size > room or pages.read > read_limit or self.broker.memory.over:
                    if since.ep is not None or self.broker.memory.over:
                        # An exact recovery that cannot fit, or no memory to spare: no replay.
                        pages.release()
                        return None, _ReplayPages(), False
                    dropped = pages.drop_oldest(room)  # a catch-up keeps the newest pages that fit
                    complete = complete and not dropped
                if last_page:
                    break
        except BaseException:  # cancelled, say: the pages go, and so does their charge
            pages.release()
            raise
        if since.ep is None and epoch is None:
            return since, pages, complete
        return p.Position(o=after, ep=epoch or since.ep), pages, complete

    async def _await_replay_allowance(self) -> None:
        """Wait while this connection's replay allowance is overdrawn (else just let others run)."""
        config = self.broker.config
        now = trio.current_time()
        burst = REPLAY_READ_FACTOR * config.outbox_limit
        self._replay_allowance = min(burst, self._replay_allowance + (now - self._replay_checked)
                                     * config.replay_rate)
        self._replay_checked = now
        if self._replay_allowance < 0:
            await trio.sleep(-self._replay_allowance / config.replay_rate)
        else:
            await trio.lowlevel.checkpoint()

    def _spend_replay(self, size: int) -> None:
        """Charge ``size`` bytes of history read to this connection's and the broker's replay rates."""
        self._replay_allowance -= size
        self.broker.history_reads.spend(size)

    def __repr__(self) -> str:
        return f"<WsConnection subscriptions={len(self.subscriptions)} {self.outbox.state.value}>"
