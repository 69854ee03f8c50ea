"""The Lua script that publishes on Redis, and the layout of the keys and messages it writes.

Keys (the channel in a hash tag, so one channel's keys stay on one Redis Cluster slot):

- ``{prefix}:{<channel>}:meta``: a hash, ``e`` the stream's epoch and ``t`` its top offset;
- ``{prefix}:{<channel>}:stream``: a Redis stream holding the channel's last ``history_size``
  publications (or a few more), one entry per *batch* (the publications one node sent in one
  script call): entry id ``<last offset>-0``, fields ``o`` (its first offset), ``t`` (Redis's
  clock, ms) and ``b`` (the batch's body, below; a publication not kept has an empty frame);
- ``{prefix}:{<channel>}``: the pub/sub channel every batch is published on, as
  ``first offset (8 bytes) + epoch length (1) + epoch + body``.

A *body* is the number of publications (4 bytes), one flag byte per publication (``1`` kept
in history, ``0`` not), then each frame as a 4-byte length and the frame's bytes (all
integers big-endian). A node publishes everything it has
queued in one script call: per channel, one ``XADD`` and one ``PUBLISH`` for all of its
publications, and one ``EVALSHA`` for all channels. (Keys of several channels in one call
are fine on one Redis; on Redis Cluster the calls would be split by hash slot.)

The publisher encodes each frame once with offset ``2**64 - 1`` as its last field (so the
offset is its last eight bytes, msgpack's ``uint64``); the script writes the real offset
there, and every node fans out those very bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

#: The offset the publisher encodes, for the script to overwrite (msgpack ``uint64``).
OFFSET_PLACEHOLDER = 2**64 - 1
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")

# KEYS: meta, stream and pub/sub channel of each channel published on, in turn.
# ARGV: an epoch for a new stream, then for each channel: history_size, history_ttl (ms; 0:
#       none), meta_ttl (s; 0: none), the flags ("1"/"0" per publication), then its frames
#       (each's last 8 bytes its offset).
# Returns {epoch, top offset} for each channel, one after the other.
PUBLISH = r"""
local pack = struct.pack
local now = redis.call("TIME")
local ms = string.format("%d", tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
local result = {}
local a = 2
for k = 1, #KEYS, 3 do
  local meta, stream, channel = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local size, ttl, meta_ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local flags = ARGV[a + 3]
  local n = #flags
  local epoch = redis.call("HGET", meta, "e")
  if not epoch then
    epoch = ARGV[1]
    redis.call("DEL", stream)
    redis.call("HSET", meta, "e", epoch)
  end
  local top = redis.call("HINCRBY", meta, "t", n)
  if meta_ttl > 0 then redis.call("EXPIRE", meta, meta_ttl) else redis.call("PERSIST", meta) end
  local first = top - n + 1
  local live, kept = {pack(">I4", n), flags}, {pack(">I4", n), flags}
  for i = 1, n do
    local frame = string.sub(ARGV[a + 3 + i], 1, -9) .. pack(">I8", first + i - 1)
    local length = pack(">I4", #frame)
    live[#live + 1] = length
    live[#live + 1] = frame
    if string.byte(flags, i) == 49 then
      kept[#kept + 1] = length
      kept[#kept + 1] = frame
    else
      kept[#kept + 1] = "\0\0\0\0"
    end
  end
  a = a + 4 + n
  if size > 0 then
    local minid = string.format("%d-0", math.max(1, top - size + 1))
    local id, body = string.format("%d-0", top), table.concat(kept)
    local added = redis.pcall("XADD", stream, "MINID", minid, id, "o", string.format("%d", first), "t", ms,
                              "b", body)
    if type(added) == "table" and added.err then
      -- A stream left from an epoch whose meta hash was lost (evicted, deleted): it is not this
      -- epoch's history. Start it again rather than fail every channel of this call.
      redis.call("DEL", stream)
      redis.call("XADD", stream, "MINID", minid, id, "o", string.format("%d", first), "t", ms, "b", body)
    end
    if ttl > 0 then redis.call("PEXPIRE", stream, ttl) else redis.call("PERSIST", stream) end
  end
  redis.call("PUBLISH", channel, pack(">I8", first) .. string.char(#epoch) .. epoch .. table.concat(live))
  result[#result + 1] = epoch
  result[#result + 1] = top
end
return result
"""
# KEYS: meta, stream. ARGV: an epoch for a new stream, how long (s) that epoch is kept while
# nothing is published in it.
# Gives a channel nobody published on its epoch (a stream left without its meta hash is not
# this epoch's: it goes), kept only briefly: names nobody publishes on must not pile up in
# Redis (the first publication keeps it as long as the channel's history). Returns
# {epoch, top offset or nil}.
FOLLOW = r"""
if not redis.call("HGET", KEYS[1], "e") then
  redis.call("DEL", KEYS[2])
  redis.call("HSET", KEYS[1], "e", ARGV[1])
  redis.call("EXPIRE", KEYS[1], ARGV[2])
end
return redis.call("HMGET", KEYS[1], "e", "t")
"""

PUBLISH_SHA = hashlib.sha1(PUBLISH.encode()).hexdigest()
FOLLOW_SHA = hashlib.sha1(FOLLOW.encode()).hexdigest()


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

    def control(self) -> bytes:
        """The pub/sub channel of commands to every node (a stop for an answer, say)."""
        return f"{self.prefix}:control".encode()

    def channel_of(self, pubsub: bytes) -> str:
        """The channel a pub/sub channel name is for (see :meth:`pubsub`)."""
        return pubsub[self._pubsub_start:-1].decode()


def split_body(body: bytes, first: int) -> Iterator[tuple[int, bool, bytes]]:
    """``(offset, kept, frame)`` of each publication in a batch body (see the module notes).

    Raises:
        ValueError: the body is not one the script wrote.
    """
    if len(body) < 4:
        raise ValueError("a batch body shorter than its count")
    (count,) = _U32.unpack_from(body)
    flags, position = body[4:4 + count], 4 + count
    for i in range(count):
        if position + 4 > len(body):
            raise ValueError("a batch body cut short")
        (length,) = _U32.unpack_from(body, position)
        position += 4
        frame = body[position:position + length]
        if len(frame) != length:
            raise ValueError("a batch body cut short")
        position += length
        yield first + i, flags[i] == 0x31, frame
    if position != len(body):
        raise ValueError("a batch body with bytes after its frames")


def parse_message(message: bytes) -> tuple[int, str, bytes]:
    """``(first offset, epoch, body)`` of a published batch.

    Raises:
        ValueError: the message is not one the script wrote.
    """
    if len(message) < 9:
        raise ValueError("a message shorter than its header")
    (first,) = _U64.unpack_from(message)
    end = 9 + message[8]
    return first, message[9:end].decode("ascii"), message[end:]
