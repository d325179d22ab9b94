# -*- test-case-name: tests.test_admin -*-
"""The admin API of a balancing unit: state, directives and Prometheus metrics.

This is a contract that operators' tooling (``nlbctl``, dashboards, outside
tests) relies on; extend it, do not change it:

``GET /api/v1/state``
    JSON ``{"unit": NAME, "pools": {POOL: {"affinity": ..., "hosts": {KEY:
    HOST_STATE}}}, "listeners": {NAME: {...}}}`` where ``KEY`` is the host's
    ``"ip:port"`` (``"[v6]:port"``) and ``HOST_STATE`` is what
    :func:`host_state` returns.  A unit with ``handoff = true`` listeners
    adds ``"handoff": {...}`` (counters, the forwarder's metrics and route
    inventory) and, per host, ``handed_off``: the live handed-off
    connections to the host's address.
``PUT /api/v1/pools/POOL/hosts/HOST/directive``
    Body ``draining``, ``active`` or ``inactive`` (surrounding whitespace is
    ignored; a JSON string such as ``"draining"`` is accepted too).  Answers
    200 with the host's new ``HOST_STATE`` plus ``pool`` and ``host``.  Path
    segments may be percent-encoded, which an IPv6 key such as ``[::1]:80``
    needs in most clients.
``POST /api/v1/pools/POOL/cache/purge``
    JSON body ``{"prefix": "/path"}``: drops the pool's cached responses
    whose path starts with the prefix (on every host name); answers 200 with
    ``{"pool": POOL, "prefix": ..., "purged": N}``, 404 for a pool without
    a cache, 400 for a body that is not such an object.
``GET /api/v1/certificates``
    JSON ``{"listeners": {NAME: {"certificates": [{"file", "names",
    "not_after", "sha256"}], "handshakes": {"full", "resumed", "failed"}}}}``
    for the listeners that terminate TLS.
``POST /api/v1/certificates/reload``
    Re-reads every listener's certificate files and serves new connections
    with them; open connections keep theirs.  All listeners or none: a file
    that cannot be used answers 400 with its name and the reason, and the
    certificates in use stay.  Answers 200 with the document of ``GET``.
``POST /api/v1/reload``
    Re-reads the unit's config file and applies it (:mod:`nlbproxy.reload`):
    200 with ``{"reloaded": true, "plan": PLAN}`` (what changed), or 409 with
    ``{"error": REASONS, "reasons": [...]}`` when the file is invalid or
    changes what needs a restart; the old config then keeps serving.
``POST /api/v1/upgrade``
    Starts the new program on the unit's listening sockets
    (:meth:`nlbproxy.unit.Unit.upgrade`): 202 with ``{"upgrading": true,
    "pid": PID}``; this process drains once the new one serves.  409 with the
    reasons when it cannot.
``GET /metrics``
    Prometheus text format 0.0.4, rendered on demand by :func:`render_metrics`.
``GET /`` and ``GET /status``
    The status page (:mod:`nlbproxy.statuspage`): HTML that holds no farm
    data and reads everything it shows from ``/api/v1/state``.

Every error is JSON ``{"error": "..."}``: 401 (with ``WWW-Authenticate:
Bearer``) when a token is configured and the request does not carry it, 404
for unknown paths, pools and hosts, 405 (with ``Allow``) for a known path and
the wrong method, 400 for a bad directive, 413 for a body over
:data:`nlbproxy.limits.MAX_ADMIN_BODY` and 500 (logged with its traceback)
for a bug of ours.  The token guards every path,
``/metrics`` included, and is checked before the path so that an
unauthenticated client learns nothing about the pools; the one exception is
``GET`` of the status page itself, which is the same bytes on every unit.

Everything here runs in the reactor thread, like the router that mutates the
same :class:`~nlbproxy.classifier.Farm`, so reading and changing it needs no
locking.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.web.server import Request, Site

from nlbproxy.cache import ResponseCache
from nlbproxy.classifier import DIRECTIVES, Farm, Host, Pool
from nlbproxy.config import format_host_port, parse_host_port
from nlbproxy.health.cache import ConsolidatedCache
from nlbproxy.health.udp import HealthSocket
from nlbproxy.session.tracker import SessionTracker
from nlbproxy import statuspage
from nlbproxy.tls import CertificateError, TLSServer
from nlbproxy.limits import MAX_ADMIN_BODY
from nlbproxy.metrics import ListenerStats, PrometheusWriter, status_classes
from nlbproxy.reload import Plan, ReloadRefused
from nlbproxy.webapi import Answer, BoundedRequest, JsonApiResource, Refusal, json_answer, one_of, read_body

log = Logger()

#: Most sessions one ``GET .../sessions`` page lists.
MAX_SESSIONS_PAGE = 1000
#: The latency percentiles of each host in the state document.
LATENCY_QUANTILES = (0.5, 0.9, 0.99)
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ReactorTime(Protocol):
    """The part of ``IReactorTime`` the admin API uses: the reactor or a ``task.Clock``."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> object: ...


class HealthView(Protocol):
    """What the admin API reads of the unit's health service."""

    @property
    def cache(self) -> ConsolidatedCache | None: ...

    @property
    def socket(self) -> HealthSocket | None: ...


class HandoffView(Protocol):
    """What a unit with handoff listeners tells the admin API
    (:class:`nlbproxy.handoff.unitforwarder.HandoffReport`)."""

    def handed_off(self) -> Mapping[str, int]:
        """Live handed-off connections by host address."""
        ...

    def state(self) -> dict[str, Any]:
        """The ``handoff`` section of the state document."""
        ...

    def write_metrics(self, w: PrometheusWriter) -> None: ...
class UnitControl(Protocol):
    """What the admin API asks of the unit for reloads and upgrades.

    Both raise :class:`~nlbproxy.reload.ReloadRefused` when they will not.
    """

    def reload_file(self) -> Plan: ...

    def upgrade(self) -> int: ...


class UpstreamCounts(Protocol):
    """What the router's backend connection pool tells the admin API."""

    def counts(self, host: Host) -> tuple[int, int]:
        """``(open, idle)`` connections to ``host``.

        ``open`` counts every established connection, busy or idle; ``idle``
        is the part of them waiting in the keep-alive pool, so
        ``open - idle`` are carrying a request.
        """
        ...


# -- documents -------------------------------------------------------------------
def host_state(host: Host, upstreams: UpstreamCounts, now: float, sessions: int = 0) -> dict[str, Any]:
    """One host as the state document and the directive answer show it.

    ``load`` is the load the host's agent reported (0-100; 0 for a host
    without an agent); ``capacity`` its relative capacity.  ``requests``
    counts responses relayed from the host.  ``latency`` has the ``count``
    of timed responses and their percentiles ``p50``, ``p90`` and ``p99``
    in seconds, each the upper bound of a histogram bucket (None before the
    first response, and for a percentile above the largest bucket).
    """
    open_, idle = upstreams.counts(host)
    latency = host.stats.latency
    return {
        "health": host.health(now),
        "health_reason": host.health_reason(now),
        "directive": host.directive,
        "directive_reason": host.directive_reason,
        "weight": host.weight,
        "load": host.load,
        "capacity": host.capacity,
        "agent": host.agent is not None,
        "active_requests": host.active_requests,
        "requests": host.stats.requests,
        "connections": {"open": open_, "idle": idle},
        "sessions": sessions,
        "latency": {"count": latency.count, **{
            f"p{round(q * 100)}": _finite(latency.quantile(q)) for q in LATENCY_QUANTILES}},
    }


def _finite(value: float | None) -> float | None:
    # JSON has no infinity: a percentile in the +Inf bucket is unknown.
    return value if value is not None and math.isfinite(value) else None


def listener_state(stats: ListenerStats) -> dict[str, Any]:
    return {
        "connections": stats.connections,
        "open_connections": stats.open_connections,
        "requests": stats.requests,
        "rejected": {str(code): n for code, n in sorted(stats.rejected.items())},
        "routing_failures": stats.routing_failures,
    }


def state_document(
    farm: Farm,
    listeners: Mapping[str, ListenerStats],
    upstreams: UpstreamCounts,
    unit_name: str,
    now: float,
    sessions: SessionTracker | None = None,
    handoff: HandoffView | None = None,
) -> dict[str, Any]:
    """The body of ``GET /api/v1/state``; pools and hosts keep config order.

    With handoff listeners each host has ``handed_off`` (its address's live
    handed-off connections) and the document a ``handoff`` section."""
    counts = sessions.counts() if sessions is not None else {}
    handed_off = handoff.handed_off() if handoff is not None else None
    pools = {}
    for pool in farm.pools.values():
        hosts = {}
        for host in pool.hosts:
            hosts[host.key] = host_state(host, upstreams, now, counts.get((pool.name, host.key), 0))
            if handed_off is not None:
                hosts[host.key]["handed_off"] = handed_off.get(host.host, 0)
        pools[pool.name] = {"affinity": pool.config.affinity, "hosts": hosts}
    document = {
        "unit": unit_name,
        "pools": pools,
        "listeners": {name: listener_state(stats) for name, stats in listeners.items()},
    }
    if handoff is not None:
        document["handoff"] = handoff.state()
    return document


def health_document(health: HealthView | None) -> dict[str, Any]:
    """The body of ``GET /api/v1/health``: the agents the unit hears from."""
    if health is None or health.cache is None or health.socket is None:
        return {"enabled": False, "agents": {}}
    agents = {}
    for view in health.cache.hosts().values():
        agents[view.name or str(view.host_id)] = {
            "id": view.host_id,
            "address": f"{view.address}:{view.port}",
            "handoff": view.handoff,
            "epoch": view.epoch,
            "generation": view.generation,
            "in_sync": view.in_sync,
            "last_seen": round(view.last_seen, 3),
            "rows": [
                {
                    "app": row.key.app, "endpoint": row.key.endpoint, "health": row.health.name.lower(),
                    "load": row.load, "capacity": row.capacity, "target": row.target.word,
                    "current": row.current.word, "reason": row.reason,
                }
                for row in view.rows
            ],
        }
    socket = health.socket
    return {
        "enabled": True,
        "agents": agents,
        "datagrams": {"received": socket.received, "sent": socket.sent},
        "dropped": dict(socket.drops),
        "cache": dict(health.cache.stats),
    }


def render_metrics(
    farm: Farm,
    listeners: Mapping[str, ListenerStats],
    upstreams: UpstreamCounts,
    now: float,
    health: HealthView | None = None,
    caches: Mapping[str, ResponseCache] | None = None,
    tls: Mapping[str, TLSServer] | None = None,
    handoff: HandoffView | None = None,
) -> str:
    """The body of ``GET /metrics``."""
    w = PrometheusWriter()
    for name, server in (tls or {}).items():
        for kind in ("full", "resumed", "failed"):
            w.add("nlbproxy_tls_handshakes_total", "counter",
                  "TLS connections closed, by how their handshake went (failed: garbage, refused "
                  "versions or ciphers, clients gone).", getattr(server.stats, kind), listener=name, kind=kind)
    if handoff is not None:
        handoff.write_metrics(w)
        for address, count in sorted(handoff.handed_off().items()):
            w.add("nlbproxy_handoff_connections", "gauge",
                  "Live handed-off connections, by host address.", count, host=address)
    if health is not None and health.cache is not None and health.socket is not None:
        w.add("nlbproxy_health_agents", "gauge", "Host agents the unit hears from.", len(health.cache.hosts()))
        w.add("nlbproxy_health_datagrams_total", "counter", "Health datagrams received and accepted.",
              health.socket.received, direction="in")
        w.add("nlbproxy_health_datagrams_total", "counter", "Health datagrams received and accepted.",
              health.socket.sent, direction="out")
        for reason, count in sorted(health.socket.drops.items()):
            w.add("nlbproxy_health_dropped_total", "counter",
                  "Health datagrams dropped: malformed, unauthenticated, stale or replayed.", count, reason=reason)
    for pool in farm.pools.values():
        for host in pool.hosts:
            labels = {"pool": pool.name, "host": host.key}
            stats = host.stats
            for code, count in status_classes(stats.responses):
                w.add("nlbproxy_requests_total", "counter",
                      "Responses relayed from the host, by status class.",
                      count, **labels, code=code)
            w.add_histogram("nlbproxy_request_duration_seconds",
                            "Time from sending a request to the host to the end of its response.",
                            stats.latency, **labels)
            for kind, count in stats.errors.items():
                w.add("nlbproxy_upstream_errors_total", "counter",
                      "Failed exchanges with the host, by kind.", count, **labels, kind=kind)
            open_, idle = upstreams.counts(host)
            for state, count in (("open", open_), ("idle", idle)):
                w.add("nlbproxy_upstream_connections", "gauge",
                      "Connections to the host: open (all) and idle (the keep-alive part).",
                      count, **labels, state=state)
            w.add("nlbproxy_host_up", "gauge",
                  "1 if passive health counts the host as up, else 0.",
                  1 if host.is_up(now) else 0, **labels)
            for directive in DIRECTIVES:
                w.add("nlbproxy_host_directive", "gauge",
                      "1 for the host's current directive, 0 for the others.",
                      1 if host.directive == directive else 0, **labels, directive=directive)
            w.add("nlbproxy_host_load", "gauge",
                  "Load the host's agent reports, 0-100 (0 without an agent).", host.load, **labels)
            w.add("nlbproxy_host_active_requests", "gauge",
                  "Requests in flight to the host.", host.active_requests, **labels)
            for direction, count in (("in", stats.bytes_in), ("out", stats.bytes_out)):
                w.add("nlbproxy_bytes_total", "counter",
                      "Bytes received from (in) and sent to (out) the host.",
                      count, **labels, direction=direction)
            w.add("nlbproxy_retries_total", "counter",
                  "Requests retried on another host after this one failed.",
                  stats.retries, **labels)
    for name, lstats in listeners.items():
        w.add("nlbproxy_listener_connections_total", "counter",
              "Client connections accepted.", lstats.connections, listener=name)
        w.add("nlbproxy_listener_open_connections", "gauge",
              "Client connections open now.", lstats.open_connections, listener=name)
        w.add("nlbproxy_listener_requests_total", "counter",
              "Client requests received.", lstats.requests, listener=name)
        w.add("nlbproxy_listener_routing_failures_total", "counter",
              "Requests whose routing failed (a plugin raised, timed out or named no pool).",
              lstats.routing_failures, listener=name)
        for status, count in sorted(lstats.rejected.items()):
            w.add("nlbproxy_listener_rejected_total", "counter",
                  "Requests the unit answered itself with an error, by status code.",
                  count, listener=name, code=str(status))
        fstats = lstats.filter
        for rule, count in fstats.denied.items():
            w.add("nlbproxy_filter_denied_total", "counter",
                  "Requests answered 403 by a deny rule of the listener.", count, listener=name, rule=rule)
        w.add("nlbproxy_filter_rate_limited_total", "counter",
              "Requests answered 429 by the listener's per-client rate limit.", fstats.rate_limited, listener=name)
        w.add("nlbproxy_filter_rate_limit_clients", "gauge",
              "Client addresses (IPv6: /64s) holding a rate-limit bucket.", fstats.clients, listener=name)
        w.add("nlbproxy_filter_rate_limit_overflow_total", "counter",
              "Requests charged to the shared bucket because the bucket table was full.",
              fstats.overflow, listener=name)
    for pool_name, cache in (caches or {}).items():
        cstats = cache.stats
        for event, count in (("hit", cstats.hits), ("miss", cstats.misses)):
            w.add("nlbproxy_cache_lookups_total", "counter",
                  "Cache lookups of the pool, by result.", count, pool=pool_name, result=event)
        for help_name, help_text, count in (
            ("stores", "Responses stored.", cstats.stores),
            ("evictions", "Entries dropped to make room, least recently used first.", cstats.evictions),
            ("purged", "Entries dropped by purges and by unsafe requests to their URL.", cstats.purged),
            ("too_big", "Cacheable responses over max_object_bytes, streamed through unkept.", cstats.too_big),
            ("busy", "Cacheable responses streamed through unkept: bodies in flight held max_bytes.", cstats.busy),
        ):
            w.add(f"nlbproxy_cache_{help_name}_total", "counter", help_text, count, pool=pool_name)
        w.add("nlbproxy_cache_bytes", "gauge", "Bytes the pool's cache holds.", cstats.bytes, pool=pool_name)
        w.add("nlbproxy_cache_entries", "gauge", "Responses the pool's cache holds.", cstats.entries, pool=pool_name)
    return w.render()


def parse_directive(body: bytes) -> str:
    """The directive named by a PUT body; raises ValueError with the reason."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8") from None
    if text.startswith('"'):
        try:
            text = json.loads(text)
        except ValueError:
            raise ValueError("body is not a valid JSON string") from None
        if not isinstance(text, str):
            raise ValueError("body is not a valid JSON string")
        text = text.strip()
    return one_of(text, DIRECTIVES, "directive")


def parse_purge(body: bytes) -> str:
    """The path prefix of a purge body ``{"prefix": "/path"}``; raises Refusal(400)."""
    try:
        document = json.loads(body)
    except ValueError:
        raise Refusal(400, 'body must be JSON like {"prefix": "/path"}') from None
    prefix = document.get("prefix") if isinstance(document, dict) else None
    if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.isascii():
        raise Refusal(400, 'body must be JSON like {"prefix": "/path"}, the prefix an ASCII path')
    return prefix


def find_host(pool: Pool, key: str) -> Host | None:
    """The host of ``pool`` named ``key``, also when its address is spelt differently.

    ``[0:0::1]:80`` finds the host configured as ``[::1]:80``: the key is put in
    the canonical form the config gives host keys.
    """
    host = pool.by_key.get(key)
    if host is None:
        try:
            host = pool.by_key.get(format_host_port(*parse_host_port(key)))
        except ValueError:
            return None
    return host


# -- HTTP --------------------------------------------------------------------------
class AdminResource(JsonApiResource):
    """The whole admin API as one leaf resource dispatching on a route table.

    The bearer token, when configured, is checked in :meth:`authorize`,
    before the path.
    """

    def __init__(
        self,
        farm: Farm,
        listeners: Mapping[str, ListenerStats],
        upstreams: UpstreamCounts,
        unit_name: str,
        token: str | None,
        clock: ReactorTime,
        health: HealthView | None = None,
        sessions: SessionTracker | None = None,
        caches: Mapping[str, ResponseCache] | None = None,
        tls: Mapping[str, TLSServer] | None = None,
        handoff: HandoffView | None = None,
        control: UnitControl | None = None,
    ) -> None:
        super().__init__()
        self.control = control
        self.tls = tls if tls is not None else {}
        self.health = health
        self.handoff = handoff
        self.caches = caches or {}
        self.sessions = sessions
        if token is not None and not token:
            raise ValueError("the admin token is empty")
        self.farm = farm
        self.listeners = listeners
        self.upstreams = upstreams
        self.unit_name = unit_name
        self._token = token.encode() if token is not None else None
        self.clock = clock
        self.routes = [
            (("api", "v1", "state"), {b"GET": self.get_state}),
            (("api", "v1", "pools", None, "hosts", None, "directive"),
             {b"PUT": self.put_directive}),
            (("api", "v1", "health"), {b"GET": self.get_health}),
            (("api", "v1", "pools", None, "sessions"), {b"GET": self.get_sessions}),
            (("api", "v1", "pools", None, "sessions", None), {b"DELETE": self.delete_session}),
            (("api", "v1", "pools", None, "cache", "purge"), {b"POST": self.post_purge}),
            (("api", "v1", "certificates"), {b"GET": self.get_certificates}),
            (("api", "v1", "certificates", "reload"), {b"POST": self.reload_certificates}),
            (("api", "v1", "reload"), {b"POST": self.post_reload}),
            (("api", "v1", "upgrade"), {b"POST": self.post_upgrade}),
            (("metrics",), {b"GET": self.get_metrics}),
        ]
        self.routes += [(path, {b"GET": self.get_page}) for path in statuspage.PATHS]

    def set_token(self, token: str | None) -> None:
        """A reloaded admin token: the next request must carry it."""
        if token is not None and not token:
            raise ValueError("the admin token is empty")
        self._token = token.encode() if token is not None else None

    def authorize(self, request: Request) -> None:
        if self._token is None or self._is_page(request):
            return
        header = request.getHeader(b"Authorization") or b""
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self._token):
            request.setHeader(b"WWW-Authenticate", b"Bearer")
            raise Refusal(401, "missing or wrong bearer token")

    @staticmethod
    def _is_page(request: Request) -> bool:
        segments = tuple(s.decode("utf-8", "replace") for s in request.postpath or ())
        return request.method in (b"GET", b"HEAD") and segments in statuspage.PATHS

    # -- handlers ------------------------------------------------------------------
    def get_page(self, request: Request, params: list[str]) -> Answer:
        for name, value in statuspage.HEADERS:
            request.setHeader(name, value)
        return Answer(200, statuspage.PAGE, statuspage.CONTENT_TYPE)

    def get_state(self, request: Request, params: list[str]) -> Answer:
        return json_answer(200, state_document(
            self.farm, self.listeners, self.upstreams, self.unit_name, self.clock.seconds(), self.sessions,
            self.handoff))

    def _tracked_pool(self, name: str) -> tuple[Pool, SessionTracker]:
        pool = self.farm.pools.get(name)
        if pool is None:
            raise Refusal(404, f"no pool {name}")
        if self.sessions is None:
            raise Refusal(404, "this unit tracks no sessions")
        return pool, self.sessions

    def get_sessions(self, request: Request, params: list[str]) -> Answer:
        """``?after=KEY&limit=N``: one page of a pool's sessions, in key order."""
        pool, sessions = self._tracked_pool(params[0])
        args = request.args or {}
        after = (args.get(b"after") or [b""])[0].decode("utf-8", "replace")
        try:
            limit = int((args.get(b"limit") or [b"100"])[0])
        except ValueError:
            raise Refusal(400, "limit must be an integer") from None
        if not 1 <= limit <= MAX_SESSIONS_PAGE:
            raise Refusal(400, f"limit must be between 1 and {MAX_SESSIONS_PAGE}")
        atoms = sessions.listing(pool.name, after, limit + 1)
        prefix = len(pool.name) + 1
        page = [
            {"key": atom.key[prefix:], "host": atom.data, "kind": atom.kind, "origin": atom.origin,
             "added": round(atom.added, 3)}
            for atom in atoms[:limit]
        ]
        return json_answer(200, {"pool": pool.name, "sessions": page,
                                 "next": page[-1]["key"] if len(atoms) > limit else None})

    def delete_session(self, request: Request, params: list[str]) -> Answer:
        pool, sessions = self._tracked_pool(params[0])
        if not sessions.forget(pool.name, params[1]):
            raise Refusal(404, f"no session {params[1]} in pool {pool.name}")
        log.info("session {key} of {pool} dropped by the operator", key=params[1], pool=pool.name)
        return json_answer(200, {"pool": pool.name, "key": params[1], "dropped": True})

    def get_health(self, request: Request, params: list[str]) -> Answer:
        return json_answer(200, health_document(self.health))

    def get_metrics(self, request: Request, params: list[str]) -> Answer:
        text = render_metrics(self.farm, self.listeners, self.upstreams, self.clock.seconds(), self.health,
                              caches=self.caches, tls=self.tls, handoff=self.handoff)
        return Answer(200, text.encode(), PROMETHEUS_TYPE)

    def post_purge(self, request: Request, params: list[str]) -> Answer:
        """Out-of-band invalidation: drop a pool's cached responses under a path prefix."""
        pool_name = params[0]
        body = read_body(request, MAX_ADMIN_BODY)
        if pool_name not in self.farm.pools:
            raise Refusal(404, f"no pool {pool_name}")
        cache = self.caches.get(pool_name)
        if cache is None:
            raise Refusal(404, f"pool {pool_name} has no cache")
        prefix = parse_purge(body)
        purged = cache.purge(prefix.encode())
        client = request.getClientAddress()
        log.info("cache of {pool}: {n} responses under {prefix} purged by {client}",
                 pool=pool_name, n=purged, prefix=prefix, client=getattr(client, "host", client))
        return json_answer(200, {"pool": pool_name, "prefix": prefix, "purged": purged})

    def get_certificates(self, request: Request, params: list[str]) -> Answer:
        return json_answer(200, certificates_document(self.tls))

    def reload_certificates(self, request: Request, params: list[str]) -> Answer:
        read_body(request, MAX_ADMIN_BODY)
        try:
            loaded = {name: server.load() for name, server in self.tls.items()}
        except CertificateError as exc:
            log.warn("certificate reload refused: {why}", why=str(exc))
            raise Refusal(400, f"certificates not reloaded: {exc}") from None
        for name, contexts in loaded.items():
            self.tls[name].install(contexts)
        return json_answer(200, certificates_document(self.tls))

    def _control(self, request: Request, what: str) -> UnitControl:
        if self.control is None:
            raise Refusal(404, "this unit cannot reload or upgrade")
        client = request.getClientAddress()
        log.info("{what} asked by {client}", what=what, client=getattr(client, "host", client))
        return self.control

    def post_reload(self, request: Request, params: list[str]) -> Answer:
        control = self._control(request, "reload")
        try:
            plan = control.reload_file()
        except ReloadRefused as exc:
            return _refused(exc)
        return json_answer(200, {"reloaded": True, "plan": plan.document(), "summary": plan.summary()})

    def post_upgrade(self, request: Request, params: list[str]) -> Answer:
        control = self._control(request, "upgrade")
        try:
            pid = control.upgrade()
        except ReloadRefused as exc:
            return _refused(exc)
        return json_answer(202, {"upgrading": True, "pid": pid})

    def put_directive(self, request: Request, params: list[str]) -> Answer:
        pool_name, key = params
        body = read_body(request, MAX_ADMIN_BODY)
        pool = self.farm.pools.get(pool_name)
        if pool is None:
            raise Refusal(404, f"no pool {pool_name}")
        host = find_host(pool, key)
        if host is None:
            raise Refusal(404, f"no host {key} in pool {pool_name}")
        try:
            directive = parse_directive(body)
        except ValueError as e:
            raise Refusal(400, str(e)) from None
        previous = host.directive
        pool.set_directive(host, directive, reason="operator")
        client = request.getClientAddress()
        log.info(
            "directive of {pool}/{host} set to {directive} (was {previous}) by {client}",
            pool=pool.name, host=host.key, directive=directive, previous=previous,
            client=getattr(client, "host", client),
        )
        document = {"pool": pool.name, "host": host.key}
        document.update(host_state(host, self.upstreams, self.clock.seconds()))
        return json_answer(200, document)


class AdminRequest(BoundedRequest):
    """A request that keeps at most ``MAX_ADMIN_BODY + 1`` bytes of its body."""

    body_limit = MAX_ADMIN_BODY
    api_name = "admin API"
    logger = log


def _refused(exc: ReloadRefused) -> Answer:
    """A reload or upgrade the unit will not do: 409 with every reason."""
    return json_answer(409, {"error": str(exc), "reasons": exc.reasons})


def certificates_document(tls: Mapping[str, TLSServer]) -> dict[str, Any]:
    return {"listeners": {
        name: {"certificates": server.describe(), "handshakes": {
            "full": server.stats.full, "resumed": server.stats.resumed, "failed": server.stats.failed}}
        for name, server in tls.items()
    }}


def make_admin_site(
    farm: Farm,
    listeners: Mapping[str, ListenerStats],
    upstreams: UpstreamCounts,
    unit_name: str,
    token: str | None,
    clock: ReactorTime,
    health: HealthView | None = None,
    sessions: SessionTracker | None = None,
    caches: Mapping[str, ResponseCache] | None = None,
    tls: Mapping[str, TLSServer] | None = None,
    handoff: HandoffView | None = None,
    control: UnitControl | None = None,
) -> Site:
    """The admin API as a Site, for ``serverFromString(...).listen(site)``.

    ``clock`` is the reactor (or a ``task.Clock`` in tests): health is judged
    at ``clock.seconds()`` and idle admin connections time out on it.
    """
    resource = AdminResource(farm, listeners, upstreams, unit_name, token, clock, health, sessions,
                             caches=caches, tls=tls, handoff=handoff, control=control)
    site = Site(resource, requestFactory=AdminRequest, reactor=clock)
    site.displayTracebacks = False
    return site
