# -*- test-case-name: tests.test_workers_aggregate -*-
"""The admin documents of a whole unit, from its workers' documents.

Sans-I/O: the supervisor fetches each worker's ``/api/v1/state`` and
``/metrics`` and these functions fold them into one.  What a worker counts on
its own (requests, connections, latency samples) is summed; what reflects the
farm every worker shares (health, directive, load, capacity, weight) is taken
from the first worker, since the workers follow the same health messages and
the same operator directives.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: Host fields that are per-worker counters.
_HOST_SUMS = ("active_requests", "requests")
#: Sessions live in the shared DAM: each worker counts the atoms it holds,
#: so the largest count is the closest to the unit's.
_HOST_MAX = ("sessions",)
_LISTENER_SUMS = ("connections", "open_connections", "requests", "routing_failures")
#: Gauges that describe the shared farm, not a worker's own resources.
SHARED_GAUGES = frozenset({
    "nlbproxy_host_up", "nlbproxy_host_load", "nlbproxy_host_directive", "nlbproxy_health_agents",
})


def merge_states(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``GET /api/v1/state`` document for the unit (at least one worker's)."""
    if not documents:
        raise ValueError("no worker answered")
    merged = copy.deepcopy(documents[0])
    for document in documents[1:]:
        for name, pool in document.get("pools", {}).items():
            into = merged.setdefault("pools", {}).setdefault(name, copy.deepcopy(pool))
            if into is pool:
                continue
            for key, host in pool.get("hosts", {}).items():
                target = into.setdefault("hosts", {}).get(key)
                if target is None:
                    into["hosts"][key] = copy.deepcopy(host)
                    continue
                _merge_host(target, host)
        for name, listener in document.get("listeners", {}).items():
            target = merged.setdefault("listeners", {}).get(name)
            if target is None:
                merged["listeners"][name] = copy.deepcopy(listener)
                continue
            for field in _LISTENER_SUMS:
                target[field] = target.get(field, 0) + listener.get(field, 0)
            rejected = target.setdefault("rejected", {})
            for code, count in listener.get("rejected", {}).items():
                rejected[code] = rejected.get(code, 0) + count
    return merged


def _merge_host(target: dict[str, Any], host: dict[str, Any]) -> None:
    for field in _HOST_SUMS:
        target[field] = target.get(field, 0) + host.get(field, 0)
    for field in _HOST_MAX:
        target[field] = max(target.get(field, 0), host.get(field, 0))
    connections = target.setdefault("connections", {})
    for field, count in host.get("connections", {}).items():
        connections[field] = connections.get(field, 0) + count
    latency, other = target.get("latency"), host.get("latency")
    if isinstance(latency, dict) and isinstance(other, dict):
        latency["count"] = latency.get("count", 0) + other.get("count", 0)
        # Percentiles do not add up; the larger is an upper bound of the
        # unit's (the exact figure is in the merged histogram of /metrics).
        for field, value in other.items():
            if field != "count" and value is not None:
                mine = latency.get(field)
                latency[field] = value if mine is None else max(mine, value)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")


class _Family:
    __slots__ = ("name", "help", "type", "samples")

    def __init__(self, name: str) -> None:
        self.name = name
        self.help = ""
        self.type = "untyped"
        self.samples: dict[str, float] = {}


def merge_metrics(texts: Iterable[str], leave_out: frozenset[str] = frozenset()) -> str:
    """One Prometheus text page for the unit from its workers' pages.

    Counters and histograms (buckets, sums and counts) are summed sample by
    sample; gauges are summed too, except :data:`SHARED_GAUGES`, which come
    from the first worker that has them.  Families named in ``leave_out``
    are dropped (the caller has the unit's own figures for them).
    """
    families: dict[str, _Family] = {}
    for text in texts:
        current: _Family | None = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                _, word, name, *rest = line.split(" ", 3)
                current = families.setdefault(name, _Family(name))
                if word == "HELP":
                    current.help = rest[0] if rest else ""
                else:
                    current.type = rest[0] if rest else "untyped"
                continue
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue
            name, labels, value = match.group(1), match.group(2) or "", match.group(3)
            if current is None or not name.startswith(current.name):
                current = families.setdefault(name, _Family(name))
            key = name + labels
            number = float(value)
            if key not in current.samples:
                current.samples[key] = number
            elif not (current.type == "gauge" and current.name in SHARED_GAUGES):
                current.samples[key] += number
    out: list[str] = []
    for family in families.values():
        if family.name in leave_out:
            continue
        if family.help:
            out.append(f"# HELP {family.name} {family.help}")
        out.append(f"# TYPE {family.name} {family.type}")
        out.extend(f"{key} {_number(value)}" for key, value in family.samples.items())
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
