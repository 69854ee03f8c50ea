"""Limits per client address and per user: rates kept by key, connections counted by address.

Every structure here is O(1) per request and bounded in size whatever the
clients do: :class:`KeyedRate` forgets the least recently seen key past
``max_keys`` (a forgotten key starts again with a full bucket, which only
someone with more than ``max_keys`` addresses can use, and they are bounded by
the broker-wide limits), and :class:`AddressCount` holds only addresses that
have a connection open.

Behind a reverse proxy every connection comes from the proxy's address;
:func:`client_address` names the real client from ``X-Forwarded-For`` when
(and only when) the connection comes from one of ``trusted_proxies``.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence

#: Keys a :class:`KeyedRate` remembers at most.
MAX_KEYS = 65_536

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class KeyedRate:
    """A token bucket per key: ``rate`` a second, bursts of ``burst``."""

    __slots__ = ("_buckets", "_max_keys", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """Take one from ``key``'s bucket: 0.0 if allowed, else the seconds until one is there."""
        allowance, checked = self._buckets.pop(key, (self.burst, now))
        allowance = min(self.burst, allowance + (now - checked) * self.rate)
        wait = 0.0
        if allowance >= 1:
            allowance -= 1
        else:
            wait = (1 - allowance) / self.rate
        self._buckets[key] = (allowance, now)  # most recently seen last
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


class AddressCount:
    """Open connections per address, capped at ``limit`` each."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        """Count one more connection from ``address``; False (and nothing counted) at the limit."""
        count = self._counts.get(address, 0)
        if count >= self.limit:
            return False
        self._counts[address] = count + 1
        return True

    def leave(self, address: str) -> None:
        count = self._counts.get(address, 0) - 1
        if count > 0:
            self._counts[address] = count
        else:
            self._counts.pop(address, None)

    def __len__(self) -> int:
        return len(self._counts)


def limit_key(address: str) -> str:
    """The key per-address limits count ``address`` under: an IPv4 address itself, an IPv6
    address's /64 (one subscriber is routinely given a whole /64: each of its addresses is theirs)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_networks(networks: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(network, strict=False) for network in networks)


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(peer: str, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str:
    """The client's address: ``peer``, or when ``peer`` is a trusted proxy, the last address in
    ``X-Forwarded-For`` that is not one (each proxy appends the address it was reached from, so
    the addresses right of the first untrusted one are the proxies' own)."""
    if not forwarded_for or not proxies or not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",")[-32:]]
    for hop in reversed(hops):
        try:
            address = str(ipaddress.ip_address(hop.strip("[]")))
        except ValueError:
            return peer  # a hop we cannot read: trust nothing the header says
        if not _trusted(address, proxies):
            return address
    return peer
