# -*- test-case-name: tests.test_reload -*-
"""What a configuration reload changes: two ``UnitConfig`` in, a plan out.

Sans-I/O: :func:`plan_reload` compares the running config with the new one
and says, per listener, pool, host and ``[unit]`` key, what the unit must do
(:meth:`nlbproxy.unit.Unit.reload` does it) -- or, when the new config
changes something that only a restart can change, refuses the whole reload
with a reason per key, so that the old config keeps serving untouched.

What a running unit can change, and why the rest cannot:

- listeners: added (bound), removed (stop accepting, their connections end
  gracefully as on stop), changed in place (routes, filters, limits and the
  protocol apply to the next request; connection-level limits such as
  header sizes and timeouts to the next connection).  A new ``endpoint``
  is a remove plus an add: the new address is bound before the old one
  closes, so the new one must not be the very address the old one holds.
  ``handoff`` is refused when it changes on a listener (its factory wraps
  the listening socket) and when a reload brings the unit's first handoff
  listener (the forwarder's plumbing is set up at start).
- pools: added, removed (requests in flight finish), changed in place, so
  that host state -- health, directives, sessions, statistics -- is kept.
  Hosts are added and removed (a removed host gets no new request, those in
  flight finish); hosts that agents announced stay whatever the file says.
- ``[unit]``: ``grace_period``, ``access_log``, ``log_format`` and the
  admin token apply at once; every other key is refused -- see
  :data:`RESTART_KEYS` for each one's reason.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from nlbproxy.config import HostConfig, ListenerConfig, PoolConfig, UnitConfig

#: ``[unit]`` keys a running unit applies, and nothing else.
RUNTIME_UNIT_KEYS = ("grace_period", "access_log", "log_format", "admin_token_file", "admin_token")

#: ``[unit]`` keys only a restart changes, with the reason an operator reads.
RESTART_KEYS = {
    "name": "the unit's name is its identity to agents and other units (health node id, DAM origin)",
    "admin": "the admin API is bound at start, and is the channel reloads come through",
    "workers": "the number of worker processes is fixed at start",
    "secret_file": "agents and units authenticate with the secret, and affinity cookies are signed with it",
    "health": "the health socket is bound at start and agents send to its address",
    "dam": "the DAM endpoint is bound at start and the other units connect to it",
    "peers": "the DAM's peering with the other units is set up at start",
    "replication": "session atoms are placed on peers by the replication set at start",
    "handoff_port": "the handoff unit is set up at start",
}

# Keys of UnitConfig that are not ``[unit]`` settings, or that stand for
# another key (the secret's bytes come from ``secret_file``).
_NOT_UNIT_KEYS = ("listeners", "pools", "path")
_ALIASES = {"secret": "secret_file"}


class ReloadRefused(Exception):
    """A reload the unit will not do; the old config keeps serving.

    ``reasons`` has one line per problem, each naming the key.
    """

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True, slots=True)
class ListenerChange:
    """A listener that stays, with the keys whose values change."""

    old: ListenerConfig
    new: ListenerConfig
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PoolChange:
    """A pool that stays: changed keys (``hosts`` aside) and host membership."""

    old: PoolConfig
    new: PoolConfig
    keys: tuple[str, ...]
    hosts_added: tuple[HostConfig, ...]
    hosts_removed: tuple[HostConfig, ...]
    #: Hosts in both whose weight changes.
    hosts_changed: tuple[HostConfig, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reload does; empty when the files are equivalent."""

    listeners_added: tuple[ListenerConfig, ...] = ()
    listeners_removed: tuple[ListenerConfig, ...] = ()
    #: Listeners whose endpoint changes: removed, and added under the same name.
    listeners_replaced: tuple[ListenerChange, ...] = ()
    listeners_changed: tuple[ListenerChange, ...] = ()
    pools_added: tuple[PoolConfig, ...] = ()
    pools_removed: tuple[PoolConfig, ...] = ()
    pools_changed: tuple[PoolChange, ...] = ()
    unit_keys: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def document(self) -> dict[str, Any]:
        """The plan as JSON for the admin API and the log."""
        return {
            "listeners": {
                "added": [lc.name for lc in self.listeners_added],
                "removed": [lc.name for lc in self.listeners_removed],
                "replaced": {c.new.name: {"from": c.old.endpoint, "to": c.new.endpoint}
                             for c in self.listeners_replaced},
                "changed": {c.new.name: list(c.keys) for c in self.listeners_changed},
            },
            "pools": {
                "added": [pc.name for pc in self.pools_added],
                "removed": [pc.name for pc in self.pools_removed],
                "changed": {
                    c.new.name: {
                        "keys": list(c.keys),
                        "hosts_added": [h.key for h in c.hosts_added],
                        "hosts_removed": [h.key for h in c.hosts_removed],
                        "hosts_changed": [h.key for h in c.hosts_changed],
                    }
                    for c in self.pools_changed
                },
            },
            "unit": list(self.unit_keys),
        }

    def summary(self) -> str:
        """One line for the log."""
        if self.empty:
            return "nothing changes"
        parts = []
        for label, items in (
            ("listeners added", [lc.name for lc in self.listeners_added]),
            ("listeners removed", [lc.name for lc in self.listeners_removed]),
            ("listeners moved", [c.new.name for c in self.listeners_replaced]),
            ("listeners changed", [c.new.name for c in self.listeners_changed]),
            ("pools added", [pc.name for pc in self.pools_added]),
            ("pools removed", [pc.name for pc in self.pools_removed]),
            ("pools changed", [c.new.name for c in self.pools_changed]),
            ("unit keys", list(self.unit_keys)),
        ):
            if items:
                parts.append(f"{label}: {', '.join(items)}")
        return "; ".join(parts)


#: TLS keys of a listener that a reload does not change in place (the
#: certificate files do: new connections get the new ones).
_TLS_RESTART_KEYS = frozenset({"session_tickets", "tls_session_timeout", "ticket_key_period"})


def changed_keys(old: Any, new: Any, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The dataclass fields whose values differ (fields with ``compare=False`` aside)."""
    return tuple(
        f.name for f in fields(old)
        if f.compare and f.name not in skip and getattr(old, f.name) != getattr(new, f.name)
    )


def plan_reload(old: UnitConfig, new: UnitConfig, *, handoff_available: bool) -> Plan:
    """The plan that turns a unit running ``old`` into one running ``new``.

    ``handoff_available`` says whether the running unit set up handoff at
    start (it had a listener with ``handoff = true``).  Raises
    :class:`ReloadRefused` with every reason when a change needs a restart.
    """
    refused: list[str] = []
    for key in changed_keys(old, new, _NOT_UNIT_KEYS):
        key = _ALIASES.get(key, key)
        if key in RESTART_KEYS:
            reason = f"unit.{key}: needs a restart ({RESTART_KEYS[key]})"
            if reason not in refused:
                refused.append(reason)
    unit_keys = tuple(k for k in changed_keys(old, new, _NOT_UNIT_KEYS) if k in RUNTIME_UNIT_KEYS)

    old_listeners = {lc.name: lc for lc in old.listeners}
    new_listeners = {lc.name: lc for lc in new.listeners}
    added = tuple(lc for name, lc in new_listeners.items() if name not in old_listeners)
    removed = tuple(lc for name, lc in old_listeners.items() if name not in new_listeners)
    replaced: list[ListenerChange] = []
    changed: list[ListenerChange] = []
    for name, lc in new_listeners.items():
        previous = old_listeners.get(name)
        if previous is None:
            if lc.handoff and not handoff_available:
                refused.append(f"listener {name}: handoff needs a restart (the unit started without handoff)")
            continue
        keys = changed_keys(previous, lc)
        if not keys:
            continue
        if "handoff" in keys:
            refused.append(f"listener {name}.handoff: needs a restart (the listening socket's factory "
                           "is set when it is bound; or add the listener under a new name and endpoint)")
        elif bool(previous.certificates) != bool(lc.certificates) and "endpoint" not in keys:
            refused.append(f"listener {name}.certificates: turning TLS on or off needs a restart (or a new "
                           "endpoint: the listening socket's factory is set when it is bound)")
        elif set(keys) & _TLS_RESTART_KEYS and "endpoint" not in keys:
            key = sorted(set(keys) & _TLS_RESTART_KEYS)[0]
            refused.append(f"listener {name}.{key}: needs a restart (the TLS session setup is made at start; "
                           "new certificate files alone reload)")
        elif "endpoint" in keys:
            replaced.append(ListenerChange(previous, lc, keys))
        else:
            changed.append(ListenerChange(previous, lc, keys))
    moved_from = {c.old.endpoint for c in replaced} | {lc.endpoint for lc in removed}
    moved_from = {endpoint for endpoint in moved_from if not _ephemeral(endpoint)}
    for lc in added:
        if lc.endpoint in moved_from:
            refused.append(f"listener {lc.name}.endpoint: {lc.endpoint} is still held by the listener "
                           "that leaves it; move it in two reloads (remove, then add)")
    for change in replaced:
        if change.new.endpoint in moved_from:
            refused.append(f"listener {change.new.name}.endpoint: {change.new.endpoint} is still held by "
                           "the listener that leaves it; move it in two reloads (remove, then add)")
    if refused:
        raise ReloadRefused(refused)

    pools_added = tuple(pc for name, pc in new.pools.items() if name not in old.pools)
    pools_removed = tuple(pc for name, pc in old.pools.items() if name not in new.pools)
    pools_changed = []
    for name, pc in new.pools.items():
        previous_pool = old.pools.get(name)
        if previous_pool is not None and previous_pool != pc:
            pools_changed.append(_pool_change(previous_pool, pc))
    return Plan(
        listeners_added=added, listeners_removed=removed, listeners_replaced=tuple(replaced),
        listeners_changed=tuple(changed), pools_added=pools_added, pools_removed=pools_removed,
        pools_changed=tuple(pools_changed), unit_keys=unit_keys,
    )


def _pool_change(old: PoolConfig, new: PoolConfig) -> PoolChange:
    old_hosts = {h.key: h for h in old.hosts}
    new_hosts = {h.key: h for h in new.hosts}
    return PoolChange(
        old, new, changed_keys(old, new, ("hosts",)),
        hosts_added=tuple(h for key, h in new_hosts.items() if key not in old_hosts),
        hosts_removed=tuple(h for key, h in old_hosts.items() if key not in new_hosts),
        hosts_changed=tuple(h for key, h in new_hosts.items() if key in old_hosts and old_hosts[key] != h),
    )


def _ephemeral(endpoint: str) -> bool:
    """A TCP endpoint on port 0: every bind gets a new port, so none is held."""
    kind, _, rest = endpoint.partition(":")
    return kind in ("tcp", "tcp6") and rest.split(":", 1)[0] in ("0", "port=0")
