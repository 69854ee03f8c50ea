"""Frame types of the tokenfan protocol, as frozen, slotted, keyword-only dataclasses.

Each class mirrors one msgpack map on the wire: its ``TYPE`` is the map's
``"t"`` and each field is a key of the same name. Fields without a default are
required; optional fields that are ``None`` are left out of the encoding
(except ``d``, which is always present, ``nil`` included).

Client to server: :class:`Hello`, :class:`Sub`, :class:`Unsub`, :class:`Pub`,
:class:`Ping` (each carries an ``id`` its reply echoes). Server to client:
:class:`Ok`, :class:`Err`, :class:`Ev`, :class:`Gap`, :class:`Bye`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    """A point in a channel's stream: offset ``o`` within epoch ``ep``.

    In ``sub``'s ``since``, ``ep`` may be omitted (None): "the current epoch,
    whatever it is", which asks to catch up on what history holds after ``o``
    rather than to recover exactly.
    """

    o: int
    ep: str | None = None


# -- client to server ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Identifies the client; ``token`` authenticates it (the first frame, where the server
    requires one), or, sent again later, extends the connection with a fresh token."""

    TYPE: ClassVar[str] = "hello"
    id: int
    token: str | None = None
    client: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Sub:
    """Subscribe to ``ch``; with ``since``, recover every publication after that position."""

    TYPE: ClassVar[str] = "sub"
    id: int
    ch: str
    since: Position | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsub:
    """Stop receiving publications of ``ch``."""

    TYPE: ClassVar[str] = "unsub"
    id: int
    ch: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Pub:
    """A client publication of event ``ev`` with data ``d`` on ``ch``."""

    TYPE: ClassVar[str] = "pub"
    id: int
    ch: str
    ev: str
    d: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Application-level ping; answered with ``ok``."""

    TYPE: ClassVar[str] = "ping"
    id: int


# -- server to client ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok:
    """Success of command ``id``.

    For ``sub``: ``ch``, ``o`` (the channel's top offset), ``ep`` (its epoch)
    and ``recovered``. For ``pub``: ``o`` and ``ep`` of the publication. For
    ``hello``: ``server`` names the server software; on a broker that
    authenticates, ``user`` is the token's ``sub`` and ``exp`` when it
    expires (Unix seconds): send ``hello`` with a fresh token before then.
    """

    TYPE: ClassVar[str] = "ok"
    id: int
    ch: str | None = None
    o: int | None = None
    ep: str | None = None
    recovered: bool | None = None
    server: str | None = None
    user: str | None = None
    exp: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Err:
    """Command ``id`` failed with ``code`` (a :class:`~protocol.codes.Code`); the connection stays usable."""

    TYPE: ClassVar[str] = "err"
    id: int
    code: int
    msg: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ev:
    """Publication of event ``ev`` with data ``d`` on ``ch`` at offset ``o``.

    A publication merged from several (lossless coalescing) also carries
    ``o0``, the first offset it covers.
    """

    TYPE: ClassVar[str] = "ev"
    ch: str
    ev: str
    d: Any = None
    o: int
    o0: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Gap:
    """Publications ``o0`` … ``o`` of ``ch`` were dropped for this reader (``slow_policy = "drop"``).

    The client can fetch them from history (``GET /api/history``) if it needs them.
    """

    TYPE: ClassVar[str] = "gap"
    ch: str
    o0: int
    o: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    """Sent just before the server closes the connection: why, and whether to reconnect."""

    TYPE: ClassVar[str] = "bye"
    code: int
    msg: str
    reconnect: bool


ClientFrame = Hello | Sub | Unsub | Pub | Ping
ServerFrame = Ok | Err | Ev | Gap | Bye
Frame = ClientFrame | ServerFrame

CLIENT_FRAME_TYPES: dict[str, type[ClientFrame]] = {
    cls.TYPE: cls for cls in (Hello, Sub, Unsub, Pub, Ping)
}
SERVER_FRAME_TYPES: dict[str, type[ServerFrame]] = {
    cls.TYPE: cls for cls in (Ok, Err, Ev, Gap, Bye)
}
