"""Chat sessions and their generations: one answer at a time per session, streamed to its channel.

Theory of operation
-------------------
``POST /ai/chat`` asks :meth:`AiService.start` for a generation. The service
checks the limits (one generation per session: 409; ``ai_max_generations`` at
once: 429) and starts it in the broker's nursery, not in the HTTP
connection's task, so the answer keeps streaming to the watchers if the
poster goes away. The generation emits ``ai:start``, one ``ai:token`` per
piece, then exactly one terminal event: ``ai:done {"reason", "tokens"}`` or
``ai:error {"code", "message"}``.

Each generation runs the provider inside its own cancel scope, with the
deadline ``ai_time_limit``. Cancelling (``POST /ai/cancel``, or a watcher
publishing ``ai:cancel`` on the channel) cancels that scope, which stops the
provider and its upstream request; the channel gets ``ai:done {"reason":
"cancelled"}`` at once.

Each session keeps its conversation (user and assistant turns) so follow-ups
have context: at most ``MAX_TURNS`` turns and ``MAX_CONVERSATION_BYTES`` of
text (oldest turns dropped first), forgotten after ``SESSION_TTL`` unused.

On the Redis engine (:attr:`AiService.shared`) the session's claim and its
conversation live in Redis, so one answer runs per session across all nodes,
a follow-up has its context on any node, a stop reaches the node running the
answer, and watchers hear ``generator_lost`` if that node dies: see
:mod:`broker.ai.shared`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from broker.ai.demo import DemoProvider
from broker.ai.openai import OpenAIProvider
from broker.ai.providers import ChatMessage, Provider, ProviderError
from broker.ai.shared import CLAIM_TTL, SharedAnswers
from broker.errors import EngineUnavailable
from broker.groups import first_leaf
from protocol import channel_problem

if TYPE_CHECKING:
    from broker.server import Broker

CHANNEL_PREFIX = "ai-chat/"
MAX_MESSAGE_CHARS = 32 * 1024
MAX_TURNS = 20
MAX_CONVERSATION_BYTES = 64 * 1024
SESSION_TTL = 3600.0
MAX_SESSIONS = 10_000
#: How long an ended answer may take to save its conversation and release its claim in Redis.
SHARED_CLEANUP_SECONDS = 5.0


class ChatRejected(Exception):
    """A chat request was refused before anything streamed: ``status`` and a message naming why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    message: str
    session_id: str
    model: str | None = None
    provider: str | None = None
    wait: bool = True

    @property
    def channel(self) -> str:
        return CHANNEL_PREFIX + self.session_id


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatResult:
    """How a generation ended."""

    channel: str
    tokens: int
    reason: str  #: "stop", "length", "cancelled", or "error"
    error: ProviderError | None = None


@dataclass(slots=True, kw_only=True)
class Generation:
    """A running answer. ``done`` is set, and ``result`` filled, when it has ended."""

    channel: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    result: ChatResult | None = None
    cancel_requested: bool = False
    shutting_down: bool = False
    claim: str | None = None  #: the session's claim in Redis (the Redis engine), while it runs
    claim_lost: bool = False


@dataclass(slots=True)
class _Session:
    turns: list[ChatMessage] = field(default_factory=list)
    last_used: float = 0.0
    generation: Generation | None = None
    size: int = 0  #: bytes its turns hold, as charged to the broker's memory budget


#: What a remembered turn costs beyond its text's string (the message object, list slot).
TURN_OVERHEAD = 80


def parse_chat_request(payload: object) -> ChatRequest:
    """Validate a ``POST /ai/chat`` body.

    Raises:
        ChatRejected: 400, naming the field that is wrong.
    """
    if not isinstance(payload, dict):
        raise ChatRejected(400, 'body must be an object like {"message": "...", "sessionId": "..."}')
    message, session_id = payload.get("message"), payload.get("sessionId")
    if not isinstance(message, str) or not message.strip():
        raise ChatRejected(400, "message must be a non-empty string")
    if len(message) > MAX_MESSAGE_CHARS:
        raise ChatRejected(400, f"message is longer than {MAX_MESSAGE_CHARS} characters")
    if not isinstance(session_id, str) or not session_id:
        raise ChatRejected(400, "sessionId must be a non-empty string")
    problem = channel_problem(CHANNEL_PREFIX + session_id)
    if problem is not None:
        raise ChatRejected(400, f"sessionId makes a bad channel name: {problem}")
    for key in ("model", "provider"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise ChatRejected(400, f"{key} must be a string")
    wait = payload.get("wait", True)
    if not isinstance(wait, bool):
        raise ChatRejected(400, "wait must be true or false")
    return ChatRequest(message=message, session_id=session_id, model=payload.get("model"),
                       provider=payload.get("provider"), wait=wait)


class AiService:
    """The broker's chat sessions. Not thread-safe: use it from the broker's Trio thread."""

    def __init__(self, broker: Broker, providers: dict[str, Provider] | None = None) -> None:
        config = broker.config
        self._broker = broker
        self.providers: dict[str, Provider] = providers or {
            "demo": DemoProvider(tokens_per_second=config.ai_demo_tokens_per_second),
            "openai": OpenAIProvider(base_url=config.openai_base_url, api_key=config.openai_api_key,
                                     default_model=config.openai_model, timeout=config.ai_upstream_timeout),
        }
        self.default_provider = config.ai_provider
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        self._nursery: trio.Nursery | None = None
        #: Claims and conversations in Redis (the Redis engine); None on the memory engine.
        self.shared: SharedAnswers | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Run generations in ``nursery`` (the broker's)."""
        self._nursery = nursery
        if self.shared is not None:
            nursery.start_soon(self.shared.run_watchdog)

    @property
    def running(self) -> int:
        return self._running

    def conversation(self, session_id: str) -> list[ChatMessage]:
        session = self._sessions.get(session_id)
        return [] if session is None else list(session.turns)

    async def start(self, request: ChatRequest) -> Generation:
        """Start answering ``request`` on its channel; return the running generation.

        Raises:
            ChatRejected: 400 unknown provider, 409 the session is answering (on any node), 429 too
                many at once, 503 the broker is not serving (or cannot reach its Redis).
        """
        name = request.provider or self.default_provider
        provider = self.providers.get(name)
        if provider is None:
            raise ChatRejected(400, f"unknown provider {name!r}; known: {', '.join(sorted(self.providers))}")
        self._check_room(request)
        shared, claim = self.shared, None
        if shared is not None:
            try:
                claim = await shared.claim(request.session_id)
            except EngineUnavailable as exc:
                raise ChatRejected(503, f"the broker cannot reach its Redis now ({exc}); "
                                        "retry later") from None
            if claim is None:
                raise ChatRejected(409, f"session {request.session_id} is already answering (on another "
                                        "node); cancel it (POST /ai/cancel) or wait for ai:done")
            try:
                turns = await shared.load_turns(request.session_id)
                self._check_room(request)  # again: the checks above were before the awaits
            except BaseException as exc:
                with trio.move_on_after(SHARED_CLEANUP_SECONDS, shield=True), \
                        contextlib.suppress(EngineUnavailable):
                    await shared.release(request.session_id, claim)
                if isinstance(exc, EngineUnavailable):
                    raise ChatRejected(503, f"the broker cannot reach its Redis now ({exc}); "
                                            "retry later") from None
                raise
        session = self._sessions.get(request.session_id)
        if session is None:
            session = self._sessions[request.session_id] = _Session()
            while len(self._sessions) > MAX_SESSIONS:
                oldest = next(iter(self._sessions))
                if self._sessions[oldest].generation is not None:
                    break
                self._forget(oldest)
        self._sessions.move_to_end(request.session_id)
        session.last_used = trio.current_time()
        if shared is not None:
            self._set_turns(session, turns)
        generation = session.generation = Generation(channel=request.channel, claim=claim)
        generation.scope.deadline = trio.current_time() + self._broker.config.ai_time_limit
        self._running += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        assert self._nursery is not None  # _check_room said so, with no await since
        self._nursery.start_soon(self._generate, request, session, provider, generation)
        return generation

    def _check_room(self, request: ChatRequest) -> None:
        """Refuse a second answer for the session here, or one past ``ai_max_generations``."""
        session = self._sessions.get(request.session_id)
        if session is not None and session.generation is not None:
            raise ChatRejected(409, f"session {request.session_id} is already answering; "
                                    f"cancel it (POST /ai/cancel) or wait for ai:done")
        if self._running >= self._broker.config.ai_max_generations:
            raise ChatRejected(429, f"{self._running} answers are streaming, the most this broker runs "
                                    "at once (ai_max_generations); retry later")
        if self._nursery is None:
            raise ChatRejected(503, "the broker is not serving")

    def cancel(self, session_id: str) -> bool:
        """Stop the session's running answer (its channel gets ``ai:done`` cancelled). False if none."""
        session = self._sessions.get(session_id)
        if session is None or session.generation is None:
            return False
        session.generation.cancel_requested = True
        session.generation.scope.cancel()
        return True

    async def stop_all(self) -> None:
        """End every running answer with ``ai:error`` ``shutting_down`` and wait until they have.

        Called on shutdown before the watchers are told ``bye``, so they see
        how each answer ended. The caller bounds the wait.
        """
        for session in self._sessions.values():
            if session.generation is not None:
                session.generation.shutting_down = True
                session.generation.scope.cancel()
        await self._idle.wait()

    def expire(self, now: float) -> None:
        """Forget conversations unused for :data:`SESSION_TTL`."""
        while self._sessions:
            name, session = next(iter(self._sessions.items()))
            if session.generation is not None or now - session.last_used < SESSION_TTL:
                return
            self._forget(name)

    def _forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id)
        self._broker.memory.change(-session.size)

    async def _generate(self, request: ChatRequest, session: _Session, provider: Provider,
                        generation: Generation) -> None:
        shared, claim = self.shared, generation.claim
        try:
            if shared is None or claim is None:
                await self._answer(request, session, provider, generation)
            else:
                await self._answer_shared(request, session, provider, generation, shared, claim)
        finally:
            # Last: on Redis, whoever waits for the answer may ask the next question at once, on any
            # node, so the session's claim is released (and its conversation saved) before this.
            generation.done.set()

    async def _answer_shared(self, request: ChatRequest, session: _Session, provider: Provider,
                             generation: Generation, shared: SharedAnswers, claim: str) -> None:
        """:meth:`_answer` while holding the session's claim in Redis: kept alive meanwhile, then
        the conversation saved and the claim released."""
        session_id = request.session_id
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_claim, shared, session_id, claim, generation)
                await self._answer(request, session, provider, generation)
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(SHARED_CLEANUP_SECONDS, shield=True), \
                    contextlib.suppress(EngineUnavailable):
                if generation.result is not None and generation.result.error is None:
                    await shared.save_turns(session_id, session.turns)
                await shared.release(session_id, claim)

    async def _keep_claim(self, shared: SharedAnswers, session_id: str, claim: str,
                          generation: Generation) -> None:
        """Renew the session's claim while the answer runs; stop the answer if it is lost."""
        while True:
            await trio.sleep(CLAIM_TTL / 3)
            try:
                kept = await shared.renew(session_id, claim)
            except EngineUnavailable:
                continue  # Redis is away: the claim may outlive this, or expire (then others say so)
            if not kept:
                generation.claim_lost = True
                generation.scope.cancel()
                return

    async def _answer(self, request: ChatRequest, session: _Session, provider: Provider,
                      generation: Generation) -> None:
        broker, channel = self._broker, request.channel
        config = broker.config
        model = request.model or provider.default_model
        pieces: list[str] = []
        error: ProviderError | None = None
        reason = "stop"
        try:
            messages = [*session.turns, ChatMessage(role="user", content=request.message)]
            with generation.scope:
                try:
                    self._emit(channel, "ai:start", {"model": model, "prompt": request.message})
                    stream = provider.stream(messages, model=model, max_tokens=config.ai_max_tokens)
                    if config.ai_rollup > 0:
                        await self._stream_rolled_up(stream, channel, pieces, config.ai_rollup)
                    else:
                        async with contextlib.aclosing(stream):
                            async for piece in stream:
                                if _check_piece(piece):
                                    self._emit_token(channel, piece)
                                    pieces.append(piece)
                    if len(pieces) >= config.ai_max_tokens:
                        reason = "length"
                except* ProviderError as group:
                    error = first_leaf(group)
            if generation.scope.cancelled_caught:
                if generation.claim_lost:
                    error = ProviderError("generator_lost", "this answer's claim in Redis expired (another "
                                                            "node may have reported it lost); ask again",
                                          status=503)
                elif generation.shutting_down:
                    error = ProviderError("shutting_down", "the broker is shutting down; ask again",
                                          status=503)
                elif generation.cancel_requested:
                    reason = "cancelled"
                else:
                    error = ProviderError("timeout", f"the answer took longer than {config.ai_time_limit:g}s "
                                                     "(ai_time_limit)", status=504)
            if error is not None:
                await self._emit_final(channel, "ai:error", {"code": error.code, "message": error.message})
            else:
                await self._emit_final(channel, "ai:done", {"reason": reason, "tokens": len(pieces)})
            if error is None:
                self._remember(session, request.message, "".join(pieces))
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()
            session.generation = None
            session.last_used = trio.current_time()
            generation.result = ChatResult(channel=channel, tokens=len(pieces),
                                           reason="error" if error is not None else reason, error=error)

    async def _stream_rolled_up(self, stream: AsyncGenerator[str, None], channel: str, pieces: list[str],
                                window: float) -> None:
        """Emit the provider's pieces joined: a piece waits at most ``window`` seconds for company."""
        send, receive = trio.open_memory_channel[str](0)

        async def produce() -> None:
            async with send, contextlib.aclosing(stream):
                async for piece in stream:
                    if _check_piece(piece):
                        await send.send(piece)

        pending: list[str] = []
        flush_at = math.inf
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            while True:
                piece = None
                with trio.move_on_at(flush_at):
                    try:
                        piece = await receive.receive()
                    except trio.EndOfChannel:
                        break
                if piece is not None:
                    if not pending:
                        flush_at = trio.current_time() + window
                    pending.append(piece)
                    pieces.append(piece)
                elif pending:  # the window passed
                    self._emit_token(channel, "".join(pending))
                    pending.clear()
                    flush_at = math.inf
        if pending:
            self._emit_token(channel, "".join(pending))

    def _emit_token(self, channel: str, token: str) -> None:
        data: dict[str, Any] = {"token": token}
        if self._broker.config.ai_timestamps:
            data["ts"] = time.monotonic()  # CLOCK_MONOTONIC, as the bench's swarm reads it
        self._emit(channel, "ai:token", data)

    async def _emit_final(self, channel: str, event: str, data: dict[str, Any]) -> None:
        """Publish an answer's last event. On Redis, wait until it (and so every token before it)
        is published: the session's claim is released only then, or a watcher's node could see the
        claim gone before the end and report the answer lost."""
        if self.shared is None:
            with contextlib.suppress(ProviderError):
                self._emit(channel, event, data)
            return
        with trio.move_on_after(SHARED_CLEANUP_SECONDS, shield=True), \
                contextlib.suppress(EngineUnavailable):  # Redis is away: nobody can be told
            await self._broker.publish(channel, event, data, validate=False)

    def _emit(self, channel: str, event: str, data: dict[str, Any]) -> None:
        """Publish an answer's event without waiting, in order with its others (on either engine).

        Raises:
            ProviderError: the engine cannot take it (Redis away, too much waiting): the answer ends.
        """
        try:
            self._broker.emit_nowait(channel, event, data)
        except EngineUnavailable as exc:
            raise ProviderError("engine_unavailable", f"the broker cannot publish the answer: {exc}",
                                status=503) from None

    def _remember(self, session: _Session, question: str, answer: str) -> None:
        """Keep a turn of the conversation (the oldest go past the caps), charged to ``memory_limit``."""
        self._set_turns(session, [*session.turns, ChatMessage(role="user", content=question),
                                  ChatMessage(role="assistant", content=answer)])

    def _set_turns(self, session: _Session, turns: list[ChatMessage]) -> None:
        """Make ``turns`` the session's conversation, within the caps, charged to ``memory_limit``."""
        while turns and (len(turns) > MAX_TURNS
                         or sum(len(t.content) for t in turns) > MAX_CONVERSATION_BYTES):
            del turns[:2]
        session.turns = turns
        size = sum(sys.getsizeof(t.content) + TURN_OVERHEAD for t in turns)  # 1-4 bytes a character
        self._broker.memory.change(size - session.size)
        session.size = size


def _check_piece(piece: object) -> bool:
    """True for a piece worth emitting; a provider that yields something else is broken."""
    if not isinstance(piece, str):
        raise ProviderError("bad_token", f"the provider yielded {type(piece).__name__}, not text")
    return bool(piece)


def result_body(result: ChatResult) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body for a finished generation."""
    if result.error is not None:
        return result.error.status, {"ok": False, "channel": result.channel, "code": result.error.code,
                                     "error": result.error.message, "tokens": result.tokens}
    return 200, {"ok": True, "channel": result.channel, "tokens": result.tokens, "reason": result.reason}

