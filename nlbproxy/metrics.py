# -*- test-case-name: tests.test_metrics -*-
"""Counters and latency histograms, and their Prometheus text exposition.

The hot path only increments integers held in slotted objects; rendering the
text format happens when ``GET /metrics`` asks, so a busy unit pays nothing
for metrics nobody reads.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

#: Upper bounds (seconds) of the latency histogram buckets; +Inf is implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

#: Kinds of backend failure counted per host.
ERROR_KINDS = ("connect_refused", "connect_timeout", "reset", "timeout", "bad_response")


class Histogram:
    """A cumulative-on-render latency histogram with fixed buckets."""

    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> Iterator[tuple[str, int]]:
        running = 0
        for bound, n in zip(LATENCY_BUCKETS, self.counts):
            running += n
            yield repr(bound), running
        yield "+Inf", self.count

    def quantile(self, q: float) -> float | None:
        """The bucket bound below which a fraction ``q`` of observations fall."""
        if not self.count:
            return None
        rank = q * self.count
        running = 0
        for bound, n in zip(LATENCY_BUCKETS, self.counts):
            running += n
            if running >= rank:
                return bound
        return float("inf")


class HostStats:
    """What the router counts for one host of one pool."""

    __slots__ = ("responses", "latency", "errors", "bytes_in", "bytes_out", "retries")

    def __init__(self) -> None:
        # index = status // 100 (1xx .. 5xx); index 0 unused.
        self.responses = [0] * 6
        self.latency = Histogram()
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.bytes_in = 0   # from the host
        self.bytes_out = 0  # to the host
        self.retries = 0

    @property
    def requests(self) -> int:
        return sum(self.responses)


class FilterStats:
    """Per listener: requests the filter refused (:mod:`nlbproxy.filtering`)."""

    __slots__ = ("denied", "rate_limited", "clients", "overflow")

    def __init__(self) -> None:
        #: deny rule name -> requests it answered 403.
        self.denied: dict[str, int] = {}
        #: Requests answered 429.
        self.rate_limited = 0
        #: Client addresses with a rate-limit bucket now.
        self.clients = 0
        #: Requests charged to the shared bucket because the table was full.
        self.overflow = 0


class CacheStats:
    """Per pool: what its response cache did (:mod:`nlbproxy.cache`)."""

    __slots__ = ("hits", "misses", "stores", "evictions", "purged", "bytes", "entries", "too_big", "busy")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.stores = 0
        #: Entries dropped to make room (least recently used first).
        self.evictions = 0
        #: Entries dropped by purges and invalidations (unsafe methods).
        self.purged = 0
        #: Bytes held now (bodies, headers and bookkeeping).
        self.bytes = 0
        self.entries = 0
        #: Cacheable responses streamed through unkept: over max_object_bytes.
        self.too_big = 0
        #: Cacheable responses streamed through unkept: the bodies being
        #: collected already held max_bytes.
        self.busy = 0


class ListenerStats:
    """Per listener: connections and requests refused before reaching a pool."""

    __slots__ = ("connections", "open_connections", "requests", "rejected", "routing_failures", "filter")

    def __init__(self) -> None:
        self.connections = 0
        self.open_connections = 0
        self.requests = 0
        #: Routing that failed (a plugin raised, timed out or named no pool).
        self.routing_failures = 0
        # status code -> count, for answers the unit made itself (4xx/5xx).
        self.rejected: dict[int, int] = {}
        self.filter = FilterStats()

    def reject(self, status: int) -> None:
        self.rejected[status] = self.rejected.get(status, 0) + 1


def _number(value: float) -> str:
    """Exact integers, shortest round-tripping floats (``:g`` would round counters)."""
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _labels(**labels: str) -> str:
    parts = []
    for name, value in labels.items():
        escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{name}="{escaped}"')
    return "{" + ",".join(parts) + "}"


class PrometheusWriter:
    """Collects samples grouped by metric family and renders text format 0.0.4."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, value: float, /, **labels: str) -> None:
        family = self._families.setdefault(name, (kind, help_text, []))
        family[2].append(f"{name}{_labels(**labels) if labels else ''} {_number(value)}")

    def add_histogram(self, name: str, help_text: str, hist: Histogram, /, **labels: str) -> None:
        family = self._families.setdefault(name, ("histogram", help_text, []))
        lines = family[2]
        for bound, count in hist.cumulative():
            lines.append(f"{name}_bucket{_labels(**labels, le=bound)} {count}")
        lines.append(f"{name}_sum{_labels(**labels)} {_number(hist.total)}")
        lines.append(f"{name}_count{_labels(**labels)} {hist.count}")

    def render(self) -> str:
        out: list[str] = []
        for name, (kind, help_text, lines) in self._families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)
        return "\n".join(out) + "\n"


def status_classes(responses: Iterable[int]) -> Iterator[tuple[str, int]]:
    for index, count in enumerate(responses):
        if index:
            yield f"{index}xx", count
