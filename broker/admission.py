"""Who may take a file descriptor: the process's descriptor limit and the HTTP-phase caps.

Every TCP connection costs a descriptor, and descriptors are the one resource
whose exhaustion stops the broker for everyone at once (``accept`` fails with
EMFILE). Two defences live here:

- :func:`raise_descriptor_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard
  one when the broker process starts (distributions start services at a soft
  1,024, far below what a broker for thousands of watchers needs).
- :class:`HttpPhaseGate` counts connections that have not yet become
  WebSockets (still sending or reading HTTP: the phase in which a client costs
  a descriptor without having proved anything), per client address and in
  total. Past either cap a new connection is answered ``503`` and closed at
  once, so a flood of half-open connections from one address cannot take the
  descriptors everyone else needs. WebSocket connections are capped apart, by
  ``max_connections``.
"""

from __future__ import annotations

import resource


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; return (soft before, soft after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard
    return soft, soft


class HttpPhaseGate:
    """Counts connections in their HTTP phase, per address and in total, against two caps."""

    def __init__(self, *, total: int, per_address: int) -> None:
        self.total_limit = total
        self.per_address_limit = per_address
        self.total = 0
        self._by_address: dict[str, int] = {}

    def enter(self, address: str) -> str | None:
        """Count a new connection from ``address``; or say why it may not start (and count nothing)."""
        if self.total >= self.total_limit:
            return (f"the broker holds {self.total} connections that have not finished their HTTP "
                    "request, the most it allows (max_http_connections); retry later")
        held = self._by_address.get(address, 0)
        if held >= self.per_address_limit:
            return (f"{held} connections from {address} have not finished their HTTP request, the most "
                    "one address may hold (max_http_connections_per_ip); retry later")
        self._by_address[address] = held + 1
        self.total += 1
        return None

    def leave(self, address: str) -> None:
        """A connection counted by :meth:`enter` became a WebSocket or closed."""
        held = self._by_address[address] - 1
        if held:
            self._by_address[address] = held
        else:
            del self._by_address[address]
        self.total -= 1
