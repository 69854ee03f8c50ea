"""Error and close codes: the one table shared by ``err`` and ``bye`` frames.

Every code lies in the WebSocket application range 4000-4999, so a ``bye``
frame's code is also the close code of the WebSocket close frame that follows
it. Codes below 4100 answer a single command (``err``) or, when the frame
could not be attributed to a command, end the connection (``bye``); codes from
4100 name why the server closes a connection.

``docs/protocol.md`` holds the same table; ``tests/protocol/test_codes.py``
checks that the two agree.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """Numeric error and close codes of the tokenfan protocol."""

    #: The bytes are not msgpack, or a frame is not a map with the required keys.
    BAD_FRAME = 4000
    #: The frame's ``t`` names no frame type this peer accepts.
    UNKNOWN_TYPE = 4001
    #: A field has the wrong type or an out-of-range value (e.g. a bad channel name).
    INVALID_FIELD = 4002
    #: A frame or message is larger than the peer's limit.
    FRAME_TOO_LARGE = 4003
    #: The command is not permitted (e.g. client publish on a channel that forbids it).
    NOT_ALLOWED = 4004
    #: The channel does not exist.
    UNKNOWN_CHANNEL = 4005
    #: ``sub`` for a channel this connection already subscribes to.
    ALREADY_SUBSCRIBED = 4006
    #: ``unsub`` for a channel this connection does not subscribe to.
    NOT_SUBSCRIBED = 4007
    #: The connection holds as many subscriptions as the server allows.
    TOO_MANY_SUBSCRIPTIONS = 4008
    #: Authentication failed or is required.
    UNAUTHORIZED = 4009
    #: The server failed to handle a valid command.
    INTERNAL_ERROR = 4010
    #: The client sends this command faster than the server allows; retry it later.
    RATE_LIMITED = 4011
    #: The server is short of a resource (e.g. near its memory limit) and refuses this command; retry later.
    OVERLOADED = 4012

    #: The server is shutting down; reconnect (to another instance) and recover.
    SHUTTING_DOWN = 4100
    #: The client read too slowly and its send buffer filled; reconnect and recover.
    SLOW_CONSUMER = 4101
    #: Nothing was heard from the client within the idle timeout.
    IDLE_TIMEOUT = 4102
    #: The server holds as many connections as it allows; retry later.
    TOO_MANY_CONNECTIONS = 4103
    #: The connection's token expired before a fresh one came (``hello {token}``); reconnect with a new one.
    TOKEN_EXPIRED = 4104
    #: A subscribed channel's stream began again in a new epoch (the engine lost it: Redis restarted
    #: without persistence); reconnect and subscribe again (recovery answers ``recovered: false``).
    STREAM_RESTARTED = 4105

    @property
    def reconnect(self) -> bool:
        """Whether a client that was closed with this code should reconnect."""
        return self in _RECONNECT


_RECONNECT = frozenset(
    {Code.SHUTTING_DOWN, Code.SLOW_CONSUMER, Code.IDLE_TIMEOUT, Code.TOO_MANY_CONNECTIONS,
     Code.INTERNAL_ERROR, Code.TOKEN_EXPIRED, Code.STREAM_RESTARTED}
)
