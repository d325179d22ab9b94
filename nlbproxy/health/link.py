# -*- test-case-name: tests.test_health_link -*-
"""Applies the consolidated health-and-load cache to the farm.

The cache (:mod:`nlbproxy.health.cache`) speaks in agents' rows; the
classifier speaks in pools and hosts.  :class:`FarmHealth` is the one place
that translates: a row names its pool (the application) and its endpoint
("ip:port" as units know the host); a host an agent announces joins that pool
even when the unit's config does not list it.  A host whose agent fell
silent or said goodbye stays in its pool, down, with the reason visible, and
comes back when its agent does.
"""

from __future__ import annotations

from twisted.logger import Logger

from nlbproxy.classifier import Farm, Host
from nlbproxy.config import HostConfig, parse_host_port
from nlbproxy.health.messages import Health, Row, RowKey

log = Logger()


class FarmHealth:
    """A :class:`~nlbproxy.health.cache.CacheListener` that updates a :class:`Farm`."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        #: agent node id -> the hosts its rows describe
        self._hosts_of: dict[int, dict[RowKey, Host]] = {}
        #: rows naming a pool this unit does not have, by app name
        self.unknown_apps: dict[str, int] = {}

    def _host(self, key: RowKey) -> Host | None:
        pool = self.farm.pools.get(key.app)
        if pool is None:
            if key.app not in self.unknown_apps:
                log.warn("an agent reports app {app!r}, which names no pool of this unit", app=key.app)
            self.unknown_apps[key.app] = self.unknown_apps.get(key.app, 0) + 1
            return None
        host = pool.by_key.get(key.endpoint)
        if host is None:
            try:
                address, port = parse_host_port(key.endpoint)
            except ValueError:
                log.warn("an agent reports a bad endpoint {endpoint!r}", endpoint=key.endpoint)
                return None
            host = pool.add_host(HostConfig(address, port))
            log.info("host {host} joins pool {pool} (announced by its agent)", host=host.key, pool=pool.name)
        return host

    def row_changed(self, host_id: int, address: str, row: Row) -> None:
        host = self._host(row.key)
        if host is None:
            return
        self._hosts_of.setdefault(host_id, {})[row.key] = host
        host.agent = host_id
        host.agent_up = row.health == Health.UP
        host.agent_reason = row.reason or ("reported up" if host.agent_up else "reported down")
        host.load = row.load
        host.capacity = row.capacity
        # Units act on the target as soon as the row change arrives (the seed:
        # the postulate round then checks every unit did); current only tells
        # that every unit confirmed it.
        host.agent_directive = row.target.word
        host.refresh_directive()
        self.farm.pools[row.key.app].changed()

    def row_removed(self, host_id: int, key: RowKey) -> None:
        host = self._hosts_of.get(host_id, {}).pop(key, None)
        if host is not None:
            self._forget(host, "its agent no longer reports it")

    def host_gone(self, host_id: int, reason: str) -> None:
        for host in self._hosts_of.pop(host_id, {}).values():
            self._forget(host, reason)

    def _forget(self, host: Host, reason: str) -> None:
        host.agent_up = False
        host.agent_reason = reason
        host.agent_directive = None
        host.refresh_directive()
        pool = self.farm.pools.get(host.pool)
        if pool is not None:  # else a reload removed the pool
            pool.changed()
