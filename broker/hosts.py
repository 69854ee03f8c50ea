"""Which ``Host`` names the broker answers to: the defence against DNS rebinding.

A page on ``http://attacker.example`` can make its own name resolve to
127.0.0.1 after it loaded; the browser then treats the broker on the visitor's
machine as same-origin with the attacker's page, and only the ``Host`` header
(``attacker.example:8765``) tells the two apart. So every HTTP request and
WebSocket upgrade must name a host the broker serves.

``allowed_hosts`` lists those names (exact, ``*.example.com`` for any
subdomain, or ``*`` for any). Left empty, the broker picks: bound to a
loopback address, the loopback names (``localhost``, ``127.0.0.1``, ``[::1]``);
bound to anything else, any name (put the names here when the broker is
reachable from a browser).
"""

from __future__ import annotations

import re

from broker.config import Config, is_loopback

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_HOST_AND_PORT = re.compile(r"(.+?)(?::[0-9]{1,5})?")



class HostPolicy:
    """Answers "may a request naming this ``Host`` be served?" for one broker."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed
        self._any = "*" in allowed
        self._exact = frozenset(name for name in allowed if not name.startswith("*"))
        self._suffixes = tuple(name[1:] for name in allowed if name.startswith("*."))

    @classmethod
    def from_config(cls, config: Config) -> HostPolicy:
        if config.allowed_hosts:
            return cls(config.allowed_hosts)
        return cls(LOOPBACK_NAMES if is_loopback(config.host) else ("*",))

    def problem(self, host: str | None, *, http10: bool = False) -> str | None:
        """What is wrong with a request's ``Host`` header value, or None if it may be served."""
        if host is None:
            return None if http10 else "an HTTP/1.1 request needs a Host header"
        if self._any:
            return None
        # Drop the port: "[::1]:8765" -> "[::1]", "localhost:8765" -> "localhost".
        match = _HOST_AND_PORT.fullmatch(host.strip().lower())
        name = match.group(1) if match else ""
        if name in self._exact or any(name.endswith(suffix) for suffix in self._suffixes):
            return None
        return (f"this broker does not serve the host {host[:100]!r}; allowed: {', '.join(self.allowed)} "
                "(the allowed_hosts option)")
