# -*- test-case-name: tests.test_classifier -*-
"""The classifier: picks the host of a pool for each request.

Sans-I/O: hosts, directives and passive health are plain objects driven by an
injected clock (anything with ``seconds()``).  Selection draws from the
pool's allotment (:mod:`nlbproxy.health.allotment`: tokens or percentages
by spare capacity, or smooth weighted round robin) over the hosts that may
take new clients; affinity comes first and may also reach a draining host.

Directive semantics follow HAProxy:

========== ====================== ===================================
directive  new clients            requests bound by affinity
========== ====================== ===================================
active     yes                    yes
draining   no                     yes (until the host is down)
inactive   no                     no (the session moves)
========== ====================== ===================================

A host is *down* while a passive failure (connect refused or timed out, reset
before any response byte) is younger than the pool's ``fail_timeout``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import random
from collections import OrderedDict
from collections.abc import Container, Iterable
from typing import Protocol

from nlbproxy.config import HostConfig, PoolConfig
from nlbproxy.health.allotment import make_allotment
from nlbproxy.metrics import HostStats

ACTIVE = "active"
DRAINING = "draining"
INACTIVE = "inactive"
DIRECTIVES = (ACTIVE, DRAINING, INACTIVE)

#: client_ip affinity entries kept per pool; the least recently used go first.
MAX_CLIENT_IP_ENTRIES = 100_000


class Clock(Protocol):
    def seconds(self) -> float: ...


class Host:
    """One backend of one pool, with the state selection needs.

    Health has three sources, all of which must agree that the host is up:
    passive failures seen by the router (``down_until``), the host agent's
    row (``agent_up``) and the unit's own probe (``probe_up``).  The
    directive has three sources too, in this precedence: the operator
    (``nlbctl`` / admin API), the host agent (its confirmed current
    directive), the config (active).  ``directive`` and ``directive_reason``
    hold the result, recomputed by :meth:`refresh_directive` whenever a
    source changes, so the per-request path reads a plain attribute.
    """

    __slots__ = (
        "active_requests", "affinity_token", "agent", "agent_directive", "agent_reason", "agent_up",
        "capacity", "current_weight", "directive", "directive_reason", "down_reason", "down_until",
        "host", "key", "load", "operator_directive", "operator_reason", "pool", "port", "probe_reason", "probe_up",
        "stats", "weight",
    )

    def __init__(self, pool: str, config: HostConfig, affinity_token: str) -> None:
        self.pool = pool
        self.key = config.key
        self.host = config.host
        self.port = config.port
        self.weight = config.weight
        self.down_until = 0.0
        self.down_reason = ""
        #: Node id of the agent that reports this endpoint, None without one.
        self.agent: int | None = None
        self.agent_up = True
        self.agent_reason = ""
        self.agent_directive: str | None = None
        self.probe_up = True
        self.probe_reason = ""
        #: Reported load, 0-100 (0 without an agent).
        self.load = 0
        #: Relative capacity: the agent's (0-99) or, without one, the weight.
        self.capacity = config.weight
        self.operator_directive: str | None = None
        self.operator_reason = "operator"
        self.directive = ACTIVE
        self.directive_reason = "config"
        self.current_weight = 0
        self.active_requests = 0
        self.stats = HostStats()
        self.affinity_token = affinity_token

    def is_up(self, now: float) -> bool:
        return self.agent_up and self.probe_up and now >= self.down_until

    def health(self, now: float) -> str:
        return "up" if self.is_up(now) else "down"

    def health_reason(self, now: float) -> str:
        """Why the host is down ("" while it is up)."""
        if not self.agent_up:
            return f"agent: {self.agent_reason}"
        if not self.probe_up:
            return f"probe: {self.probe_reason}"
        if now < self.down_until:
            return f"passive: {self.down_reason}"
        return ""

    def refresh_directive(self) -> None:
        if self.operator_directive is not None:
            self.directive, self.directive_reason = self.operator_directive, self.operator_reason
        elif self.agent_directive is not None:
            self.directive = self.agent_directive
            self.directive_reason = f"agent: {self.agent_reason}" if self.agent_reason else "agent"
        else:
            self.directive, self.directive_reason = ACTIVE, "config"

    def __repr__(self) -> str:
        return f"<Host {self.pool}/{self.key} {self.directive}>"


class Pool:
    """The hosts of one application, and how to choose among them."""

    def __init__(self, config: PoolConfig, clock: Clock, secret: bytes, rng: random.Random) -> None:
        self.config = config
        self.allotment = make_allotment(config.balance, rng, clock)
        self.name = config.name
        self.clock = clock
        self._secret = secret
        self._rng = rng
        self.hosts: list[Host] = []
        self.by_key: dict[str, Host] = {}
        self.by_token: dict[str, Host] = {}
        self._client_ips: OrderedDict[str, tuple[Host, float]] = OrderedDict()
        #: Bumped whenever membership, health, load or a directive changes,
        #: so an allotment knows its draw list is stale.
        self.version = 0
        for host_config in config.hosts:
            self.add_host(host_config)

    def changed(self) -> None:
        self.version += 1

    # -- membership ---------------------------------------------------------
    def add_host(self, host_config: HostConfig) -> Host:
        token = hmac.new(
            self._secret, f"{self.name}\0{host_config.key}".encode(), hashlib.sha256
        ).hexdigest()[:20]
        host = Host(self.name, host_config, token)
        self.hosts.append(host)
        self.by_key[host.key] = host
        self.by_token[token] = host
        self.changed()
        return host

    def remove_host(self, key: str) -> Host | None:
        """Takes host ``key`` out: it gets no new request (affinity included);
        requests in flight hold it and finish."""
        host = self.by_key.pop(key, None)
        if host is None:
            return None
        self.hosts.remove(host)
        if self.by_token.get(host.affinity_token) is host:
            del self.by_token[host.affinity_token]
        self.changed()
        return host

    def reconfigure(self, config: PoolConfig) -> tuple[list[Host], list[Host]]:
        """Applies a reloaded config, keeping every host's state; returns the
        hosts added and removed.

        Hosts that the old file listed and the new one does not leave, unless
        an agent announces them (those stay, as they would had the file never
        named them); hosts the new file adds join; weights follow the file.
        """
        old = self.config
        self.config = config
        if config.balance != old.balance:
            self.allotment = make_allotment(config.balance, self._rng, self.clock)
        old_keys = {h.key for h in old.hosts}
        new_hosts = {h.key: h for h in config.hosts}
        removed = []
        for key in old_keys - new_hosts.keys():
            host = self.by_key.get(key)
            if host is not None and host.agent is None:
                removed.append(self.remove_host(key))
        added = []
        for key, host_config in new_hosts.items():
            host = self.by_key.get(key)
            if host is None:
                added.append(self.add_host(host_config))
            elif host.weight != host_config.weight:
                host.weight = host_config.weight
                if host.agent is None:
                    host.capacity = host_config.weight
        self.changed()
        return added, [h for h in removed if h is not None]

    # -- selection -----------------------------------------------------------
    def choose(self, exclude: Container[Host] = ()) -> Host | None:
        """A host for a new client, from the pool's allotment (``balance``)."""
        return self.allotment.draw(self.hosts, exclude, self.version)

    def bound_host(self, host: Host | None) -> Host | None:
        """``host`` if a request bound to it by affinity may still go there."""
        if host is None or host.directive == INACTIVE:
            return None
        if self.by_key.get(host.key) is not host:  # removed by a reload
            return None
        if not host.is_up(self.clock.seconds()):
            return None
        return host

    def host_for_token(self, token: str) -> Host | None:
        return self.bound_host(self.by_token.get(token))

    def host_for_key(self, key: bytes, exclude: Container[Host] = ()) -> Host | None:
        """The host an affinity key hashes to (weighted rendezvous hashing).

        Among the hosts that are up and active, each key goes to the host
        with the highest ``-weight / ln(h)`` for ``h`` a hash of key and host
        in (0, 1): a host that leaves moves only its own keys, one that comes
        back takes back only its own, and capacities (weights) are honoured.  A draining
        host takes no keys: a hash is not a binding, and new keys keep coming.
        """
        now = self.clock.seconds()
        best: Host | None = None
        best_score = -math.inf
        for host in self.hosts:
            if host.directive != ACTIVE or host in exclude or not host.is_up(now):
                continue
            digest = hashlib.blake2b(key, digest_size=8, key=host.key.encode()[:64]).digest()
            unit = (int.from_bytes(digest, "big") + 1) / 18446744073709551617.0  # in (0, 1)
            score = -max(host.capacity, 1) / math.log(unit)
            if score > best_score:
                best, best_score = host, score
        return best

    def host_for_client_ip(self, address: str) -> Host | None:
        entry = self._client_ips.get(address)
        if entry is None:
            return None
        host, seen = entry
        if self.clock.seconds() - seen > self.config.client_ip_timeout:
            del self._client_ips[address]
            return None
        return self.bound_host(host)

    def remember_client_ip(self, address: str, host: Host) -> None:
        entries = self._client_ips
        entries[address] = (host, self.clock.seconds())
        entries.move_to_end(address)
        if len(entries) > MAX_CLIENT_IP_ENTRIES:
            entries.popitem(last=False)

    # -- passive health ------------------------------------------------------
    def mark_failed(self, host: Host, reason: str) -> None:
        host.down_until = self.clock.seconds() + self.config.fail_timeout
        host.down_reason = reason
        self.changed()

    def set_directive(self, host: Host, directive: str | None, reason: str = "operator") -> None:
        """The operator's directive for ``host``; None hands it back to the agent/config."""
        if directive is not None and directive not in DIRECTIVES:
            raise ValueError(f"unknown directive {directive!r}")
        host.operator_directive = directive
        host.operator_reason = reason
        host.refresh_directive()
        self.changed()


class Farm:
    """All pools of a unit, by name."""

    def __init__(
        self,
        pools: Iterable[PoolConfig],
        clock: Clock,
        secret: bytes | None,
        rng: random.Random | None = None,
    ) -> None:
        # Without a farm-wide secret the affinity cookie is only honoured by
        # this process; a random key is still unforgeable.
        self.secret = secret if secret is not None else os.urandom(32)
        self.clock = clock
        # Each unit draws in its own random order, so that many units do not
        # herd onto the same host.
        self.rng = rng if rng is not None else random.Random(os.urandom(16))
        self.pools: dict[str, Pool] = {p.name: Pool(p, clock, self.secret, self.rng) for p in pools}

    def add_pool(self, config: PoolConfig) -> Pool:
        pool = self.pools[config.name] = Pool(config, self.clock, self.secret, self.rng)
        return pool

    def remove_pool(self, name: str) -> Pool:
        """Takes pool ``name`` out; requests in flight hold it and finish."""
        return self.pools.pop(name)

    def host(self, pool: str, key: str) -> Host:
        """The host ``key`` of ``pool``; raises KeyError naming what is missing."""
        try:
            return self.pools[pool].by_key[key]
        except KeyError:
            raise KeyError(f"no host {key} in pool {pool}") from None
