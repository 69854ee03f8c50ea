"""The protocol's exception tree.

::

    ProtocolError                 root: anything wrong with tokenfan frames
    ├── LocalProtocolError        our caller misused the API (a bug on this side)
    └── RemoteProtocolError       the peer sent something wrong; carries the answer

A :class:`RemoteProtocolError` carries the :class:`~protocol.codes.Code` and
message to send back. When the offending frame's command ``id`` could be read,
``id`` holds it and the error is *recoverable*: answer with an ``err`` frame
and keep the connection. Otherwise (``id is None``) the stream cannot be
trusted and the connection should end with a ``bye`` frame carrying ``code``.
"""

from __future__ import annotations

from protocol.codes import Code


class ProtocolError(Exception):
    """Root of every error raised by :mod:`protocol`."""


class LocalProtocolError(ProtocolError):
    """The caller asked :mod:`protocol` for something invalid (e.g. encoding a bad frame)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a frame that break the protocol.

    Attributes:
        code: what to answer with (an ``err`` code, or a ``bye``/close code).
        msg: a human-readable description that names the problem.
        id: the command id of the offending frame, when it could be read.
    """

    def __init__(self, msg: str, *, code: Code = Code.BAD_FRAME, id: int | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code
        self.id = id

    @property
    def recoverable(self) -> bool:
        """True when an ``err`` reply suffices and the connection may continue."""
        return self.id is not None

    def __repr__(self) -> str:
        return f"RemoteProtocolError({self.msg!r}, code={self.code.name}, id={self.id!r})"
