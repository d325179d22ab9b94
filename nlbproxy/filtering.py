# -*- test-case-name: tests.test_filtering -*-
"""Request filtering: the seed's firewall function, per listener.

Sans-I/O.  A :class:`RequestFilter` is built from a listener's
``[[listener.deny]]`` tables and its ``rate_limit``; the router asks it about
each request (client address, method, target, headers) once the request's
headers are complete and before a pool is picked, and gets either nothing
(the request goes on) or a :class:`Verdict` to answer with.

Deny rules come first: all keys of a rule must hold, and the first matching
rule answers 403 and is counted under its name.  Paths are matched after
normalisation (percent-decoding, ``.`` and ``..`` segments, repeated
slashes), so ``/%61dmin`` or ``/x/../admin`` cannot slip past a rule on
``/admin`` into a backend that normalises them itself.

The rate limit is a token bucket per client address (IPv6 clients by their
/64: one host gets a whole /64 from its provider, so smaller buckets would
let it mint addresses at will).  The table of buckets is bounded
(:data:`~nlbproxy.limits.RATE_LIMIT_CLIENTS`) and kept in least-recently-used
order.  A bucket is evicted only once it has refilled: forgetting a full
bucket forgets nothing, since a new one starts full too.  When the oldest
bucket is still refilling, the table is churning faster than buckets refill,
which is what a client spraying source addresses looks like; new addresses
are then charged to one shared overflow bucket instead of getting a fresh
bucket each, so spraying buys no extra requests and evicts no client that
is being limited.  Denied requests take no token.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_to_bytes

from nlbproxy import limits
from nlbproxy.config import DenyConfig, ListenerConfig, RateLimitConfig
from nlbproxy.metrics import FilterStats
from nlbproxy.routing import RequestMatch, path_of

Headers = Sequence[tuple[bytes, bytes]]
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Clock(Protocol):
    def seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """The unit's own answer to a refused request."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


def normalize_path(path: bytes) -> bytes:
    """``path`` as a backend that decodes and resolves it would see it.

    Percent-escapes are decoded once, ``.`` and ``..`` segments resolved
    (RFC 3986 section 5.2.4) and runs of slashes merged.
    """
    if b"%" in path:
        path = unquote_to_bytes(path)
    if b"/." not in path and b"//" not in path:
        return path
    out: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if segment == b"..":
            if out:
                out.pop()
        elif segment not in (b".", b""):
            out.append(segment)
    trailing = path.endswith((b"/", b"/.", b"/.."))
    return b"/" + b"/".join(out) + (b"/" if trailing and out else b"")


def parse_address(client_ip: str) -> _Address | None:
    """The client's address (an IPv4-mapped IPv6 address as IPv4), None if not IP."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_key(address: _Address | None, client_ip: str) -> int | str:
    """Whose bucket a request takes: the IPv4 address, or the IPv6 /64."""
    if address is None:
        return client_ip
    if address.version == 4:
        return int(address)
    return (int(address) >> 64) | (1 << 64)  # above every IPv4 key


class DenyRule:
    """One compiled ``[[listener.deny]]``."""

    __slots__ = ("name", "_v4", "_v6", "_any_network", "_request")

    def __init__(self, config: DenyConfig) -> None:
        self.name = config.name
        networks = [ipaddress.ip_network(n) for n in config.network]
        self._v4 = tuple(n for n in networks if n.version == 4)
        self._v6 = tuple(n for n in networks if n.version == 6)
        self._any_network = bool(networks)
        self._request = RequestMatch(config.method, config.path_prefix, config.path_regex, config.header)

    def matches(self, address: _Address | None, method: bytes, path: bytes, headers: Headers) -> bool:
        if self._any_network:
            if address is None:
                return False
            networks = self._v4 if address.version == 4 else self._v6
            if not any(address in network for network in networks):
                return False
        return self._request.matches(method, path, headers)


class RateLimiter:
    """Token buckets per client key, in a bounded table (see the module docs)."""

    def __init__(
        self,
        config: RateLimitConfig,
        clock: Clock,
        stats: FilterStats,
        max_clients: int = limits.RATE_LIMIT_CLIENTS,
    ) -> None:
        self.rate = config.requests_per_second
        self.burst = float(config.burst)
        self.clock = clock
        self.stats = stats
        self.max_clients = max_clients
        # key -> [tokens, time of the last request]; the oldest first.
        self._table: OrderedDict[int | str, list[float]] = OrderedDict()
        self._overflow = [self.burst, clock.seconds()]

    def __len__(self) -> int:
        return len(self._table)

    def take(self, key: int | str) -> float:
        """Take a token for ``key``: 0.0 if the request may go, else the
        seconds until the bucket holds a token again."""
        now = self.clock.seconds()
        table = self._table
        bucket = table.get(key)
        if bucket is not None:
            table.move_to_end(key)
            return self._charge(bucket, now)
        if len(table) >= self.max_clients:
            oldest_key, oldest = next(iter(table.items()))
            if self._tokens(oldest, now) < self.burst:
                self.stats.overflow += 1
                return self._charge(self._overflow, now)
            del table[oldest_key]
        bucket = [self.burst, now]
        table[key] = bucket
        self.stats.clients = len(table)
        return self._charge(bucket, now)

    def _tokens(self, bucket: list[float], now: float) -> float:
        # A clock that steps back refills nothing rather than draining.
        return min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)

    def _charge(self, bucket: list[float], now: float) -> float:
        tokens = self._tokens(bucket, now)
        bucket[1] = max(bucket[1], now)
        # The slack forgives float rounding: a client exactly at the rate
        # must not be refused for 1e-17 of a token.
        if tokens >= 1.0 - 1e-9:
            bucket[0] = max(0.0, tokens - 1.0)
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate


class RequestFilter:
    """The deny rules and the rate limit of one listener."""

    def __init__(
        self,
        deny: Sequence[DenyConfig],
        rate_limit: RateLimitConfig | None,
        clock: Clock,
        stats: FilterStats,
        max_clients: int = limits.RATE_LIMIT_CLIENTS,
    ) -> None:
        self.rules = tuple(DenyRule(rule) for rule in deny)
        self.stats = stats
        for rule in self.rules:
            stats.denied.setdefault(rule.name, 0)
        self.limiter = RateLimiter(rate_limit, clock, stats, max_clients) if rate_limit else None

    @classmethod
    def for_listener(cls, config: ListenerConfig, clock: Clock, stats: FilterStats) -> RequestFilter | None:
        """The listener's filter, or None when it filters nothing."""
        if not config.deny and config.rate_limit is None:
            return None
        return cls(config.deny, config.rate_limit, clock, stats)

    def check(self, client_ip: str, method: bytes, target: bytes, headers: Headers) -> Verdict | None:
        """None if the request may go on, else the answer to give."""
        address = parse_address(client_ip)
        if self.rules:
            path = normalize_path(path_of(target))
            for rule in self.rules:
                if rule.matches(address, method, path, headers):
                    self.stats.denied[rule.name] += 1
                    return Verdict(403, b"request denied by the listener's rules\n")
        if self.limiter is not None:
            wait = self.limiter.take(client_key(address, client_ip))
            if wait > 0.0:
                self.stats.rate_limited += 1
                retry = str(max(1, math.ceil(wait))).encode()
                return Verdict(429, b"too many requests\n", ((b"retry-after", retry),))
        return None
