"""The Lua script that publishes on Redis, and the layout of the keys and messages it writes.

Keys (the channel in a hash tag, so one channel's keys stay on one Redis Cluster slot):

- ``{prefix}:{<channel>}:meta``: a hash, ``e`` the stream's epoch and ``t`` its top offset;
- ``{prefix}:{<channel>}:stream``: a Redis stream of the channel's last ``history_size``
  publications, entry id ``<offset>-0``, fields ``f`` (the complete WebSocket frame, or
  empty for one emitted with ``persist=False``) and ``t`` (Redis's clock, ms);
- ``{prefix}:{<channel>}``: the pub/sub channel every publication is published on.

A published message is :data:`MESSAGE_HEADER` (flags, offset), the epoch's length (one
byte) and the epoch, then the frame. The publisher encodes the frame once with offset
``2**64 - 1`` as its last field (so the offset is its last eight bytes, msgpack's
``uint64``); the script writes the real offset there. Every node fans out those very bytes.
"""

from __future__ import annotations

import hashlib
import struct

#: Flags (1 byte: bit 0, kept in history) and offset (8 bytes, big-endian) of a message.
MESSAGE_HEADER = struct.Struct(">BQ")
#: The offset the publisher encodes, for the script to overwrite (msgpack ``uint64``).
OFFSET_PLACEHOLDER = 2**64 - 1
KEPT = 1

# KEYS: meta, stream, pub/sub channel.
# ARGV: frame (its last 8 bytes the offset), kept ("1"/"0"), history_size, history_ttl (ms),
#       meta_ttl (s), an epoch for a new stream.
# Returns {epoch, offset}.
PUBLISH = r"""
local meta, stream, channel = KEYS[1], KEYS[2], KEYS[3]
local frame, kept = ARGV[1], ARGV[2] == "1"
local size, ttl, meta_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local epoch = redis.call("HGET", meta, "e")
if not epoch then
  epoch = ARGV[6]
  redis.call("DEL", stream)
  redis.call("HSET", meta, "e", epoch)
end
local top = redis.call("HINCRBY", meta, "t", 1)
redis.call("EXPIRE", meta, meta_ttl)
local bytes, n = {}, top
for i = 8, 1, -1 do
  bytes[i] = string.char(n % 256)
  n = math.floor(n / 256)
end
local offset = table.concat(bytes)
frame = string.sub(frame, 1, -9) .. offset
if size > 0 then
  -- A publication not kept leaves an empty placeholder, so the oldest entry tells what was trimmed.
  local now = redis.call("TIME")
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call("XADD", stream, "MAXLEN", size, string.format("%d-0", top), "f", kept and frame or "", "t", ms)
  redis.call("PEXPIRE", stream, ttl)
end
local flags = kept and "\1" or "\0"
redis.call("PUBLISH", channel, flags .. offset .. string.char(#epoch) .. epoch .. frame)
return {epoch, top}
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH.encode()).hexdigest()


class Keys:
    """Key names for channels under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._pubsub_start = len(prefix) + 2  # "{prefix}:{"

    def meta(self, channel: str) -> bytes:
        return f"{self.prefix}:{{{channel}}}:meta".encode()

    def stream(self, channel: str) -> bytes:
        return f"{self.prefix}:{{{channel}}}:stream".encode()

    def pubsub(self, channel: str) -> bytes:
        return f"{self.prefix}:{{{channel}}}".encode()

    def channel_of(self, pubsub: bytes) -> str:
        """The channel a pub/sub channel name is for (see :meth:`pubsub`)."""
        return pubsub[self._pubsub_start:-1].decode()


def parse_message(message: bytes) -> tuple[bool, int, str, bytes]:
    """``(kept, offset, epoch, frame)`` of a published message.

    Raises:
        ValueError: the message is not one the script wrote.
    """
    if len(message) < MESSAGE_HEADER.size + 1:
        raise ValueError("a message shorter than its header")
    flags, offset = MESSAGE_HEADER.unpack_from(message)
    start = MESSAGE_HEADER.size + 1
    end = start + message[MESSAGE_HEADER.size]
    epoch = message[start:end].decode("ascii")
    return bool(flags & KEPT), offset, epoch, message[end:]
