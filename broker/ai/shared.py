"""AI answers across broker nodes on one Redis: one answer per session, conversations, lost answers.

Theory of operation
-------------------
On the memory engine a session's answer and its conversation live in the one
broker process. On the Redis engine any node may receive ``POST /ai/chat``, so
what makes "one answer per session" true lives in Redis (keys beside the
channel's, in its hash tag):

- ``{prefix}:{ai-chat/S}:answer``: the *claim* of the node answering session S,
  set with ``NX`` and a lifetime of :data:`CLAIM_TTL`, renewed every third of it
  while the answer streams and deleted when it ends (only by its owner: both
  are compare-and-set scripts). A second ``/ai/chat`` for S on any node finds
  the claim and gets 409.
- ``{prefix}:{ai-chat/S}:turns``: the conversation, JSON, expiring after
  ``SESSION_TTL`` unused: a follow-up answered on another node has the context.

A node learns that an answer it runs should stop from a command every node
hears (:meth:`broker.redis.engine.RedisEngine.notify`): the node where an
``ai:cancel`` is published (a watcher's ``pub``, ``POST /ai/cancel``) sends it.

If the node running an answer dies, its claim expires. Every node that follows
an ``ai-chat/*`` channel notes answers that started (``ai:start``) and have not
ended; :meth:`SharedAnswers.run_watchdog` looks every :data:`WATCH_EVERY` at the
claims of those, and for an answer whose claim is gone one node (the first to
set a marker with ``NX``) publishes ``ai:error {code: "generator_lost"}``: the
watchers learn within ``CLAIM_TTL + WATCH_EVERY`` that nothing more will come.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgpack
import trio

from broker.ai.providers import ChatMessage
from broker.errors import EngineUnavailable
from protocol import split_ws_frames

if TYPE_CHECKING:
    from broker.redis.engine import RedisEngine

log = logging.getLogger("tokenfan.ai")

#: How long a claim lasts without being renewed (seconds): a dead node's answer is lost after it.
CLAIM_TTL = 10.0
#: How often a node looks at the claims of the answers it watches.
WATCH_EVERY = 2.0
#: How long a conversation is kept unused (seconds), as on the memory engine.
TURNS_TTL = 3600

_RENEW = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""

#: The bytes of an ``ev`` field naming these events, as :func:`protocol.encode_event` writes them.
_START, _DONE, _ERROR = (b"\xa2ev" + msgpack.packb(name) for name in ("ai:start", "ai:done", "ai:error"))


def event_of(frame: bytes) -> str | None:
    """The ``ev`` of a publication's WebSocket frame (None if it is not one)."""
    frames = split_ws_frames(frame)
    if not frames:
        return None
    _opcode, _start, payload, end = frames[0]
    try:
        value = msgpack.unpackb(frame[payload:end], raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    event = value.get("ev") if isinstance(value, dict) else None
    return event if isinstance(event, str) else None


def frame_offset(frame: bytes) -> int:
    """A publication frame's offset: its last field, a msgpack ``uint64`` (see ``broker.redis``)."""
    return int.from_bytes(frame[-8:], "big")


class SharedAnswers:
    """The Redis side of a node's AI answers. See the module docstring."""

    def __init__(self, redis: RedisEngine,
                 publish_error: Callable[[str, dict[str, str]], Awaitable[object]]) -> None:
        """
        Args:
            redis: the node's engine.
            publish_error: publishes ``ai:error`` with the given data on a channel (any node's way).
        """
        self._redis = redis
        self._publish_error = publish_error
        self.node = secrets.token_urlsafe(6)
        self._open: dict[str, int] = {}  # followed ai-chat channel -> offset of its ai:start, while open
        self.lost_published = 0

    def _key(self, session_id: str, what: str) -> bytes:
        return f"{self._redis.keys.prefix}:{{ai-chat/{session_id}}}:{what}".encode()

    # -- claims ----------------------------------------------------------------------

    async def claim(self, session_id: str) -> str | None:
        """Claim the session's answer for this node; the claim's token, or None if another has it.

        Raises:
            EngineUnavailable: Redis is unavailable.
        """
        token = f"{self.node}:{secrets.token_urlsafe(6)}"
        reply = await self._redis.call("SET", self._key(session_id, "answer"), token, "NX",
                                       "PX", int(CLAIM_TTL * 1000))
        return token if reply == b"OK" else None

    async def renew(self, session_id: str, token: str) -> bool:
        """Renew the claim; False if it is not ours any more (it expired: the answer is lost)."""
        reply = await self._redis.call("EVAL", _RENEW, 1, self._key(session_id, "answer"), token,
                                       int(CLAIM_TTL * 1000))
        return bool(reply)

    async def release(self, session_id: str, token: str) -> None:
        await self._redis.call("EVAL", _RELEASE, 1, self._key(session_id, "answer"), token)

    async def answering(self, session_id: str) -> bool:
        """Whether some node answers the session now."""
        return bool(await self._redis.call("EXISTS", self._key(session_id, "answer")))

    # -- conversations -----------------------------------------------------------------

    async def load_turns(self, session_id: str) -> list[ChatMessage]:
        raw = await self._redis.call("GET", self._key(session_id, "turns"))
        if not raw:
            return []
        try:
            return [ChatMessage(role=turn["role"], content=turn["content"]) for turn in json.loads(raw)]
        except (ValueError, KeyError, TypeError):
            log.warning("the conversation of session %s in Redis is not readable: starting afresh",
                        session_id)
            return []

    async def save_turns(self, session_id: str, turns: list[ChatMessage]) -> None:
        data = json.dumps([{"role": turn.role, "content": turn.content} for turn in turns])
        await self._redis.call("SET", self._key(session_id, "turns"), data, "EX", TURNS_TTL)

    # -- watching answers other nodes run ------------------------------------------------

    def observe(self, channel: str, frame: bytes) -> None:
        """Note an answer's start or end on a followed ``ai-chat/*`` channel."""
        if _START in frame and event_of(frame) == "ai:start":
            self._open[channel] = frame_offset(frame)
        elif channel in self._open and any(marker in frame and event_of(frame) == name
                                           for marker, name in ((_DONE, "ai:done"), (_ERROR, "ai:error"))):
            del self._open[channel]

    async def run_watchdog(self) -> None:
        """Every :data:`WATCH_EVERY`: publish ``generator_lost`` for watched answers whose claim is gone."""
        while True:
            await trio.sleep(WATCH_EVERY)
            if not self._open:
                continue
            try:
                await self._check_claims()
            except EngineUnavailable:
                continue  # Redis is away: the claims cannot be read, nor the error published

    async def _check_claims(self) -> None:
        for channel in [channel for channel in self._open if not self._redis.follows(channel)]:
            del self._open[channel]  # no longer followed here: other nodes watch it if anyone does
        watched = list(self._open.items())
        sessions = [channel.removeprefix("ai-chat/") for channel, _start in watched]
        exists = await self._redis.pipeline([["EXISTS", self._key(session, "answer")]
                                             for session in sessions])
        for (channel, start), session, claimed in zip(watched, sessions, exists, strict=True):
            if claimed or self._open.get(channel) != start:
                continue
            self._open.pop(channel, None)
            # One node publishes the loss: the first to mark this answer (by its ai:start offset).
            marked = await self._redis.call("SET", self._key(session, f"lost:{start}"), 1, "NX", "EX", 3600)
            if marked == b"OK":
                self.lost_published += 1
                log.warning("the answer on %s (started at offset %d) lost its node: publishing ai:error",
                            channel, start)
                await self._publish_error(channel, {
                    "code": "generator_lost",
                    "message": "the broker node generating this answer stopped; ask again"})
