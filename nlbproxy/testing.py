# -*- test-case-name: tests.test_testing -*-
"""Testing routing plugins, in your own trial or pytest suites.

Nothing here needs a reactor or the network; every call is synchronous and
deterministic.

- :func:`request` builds the :class:`~nlbproxy.routing.RequestView` a
  router would hand a classifier (header names lower-cased, a ``Host``).
- :func:`configure` makes a classifier from a plugin (or its name) and
  options, checked as the config parser checks them.
- :func:`decide` runs a classifier on a request as the router does: the body
  cut to the classifier's ``body_prefix``, a Deferred waited for (it must
  have fired), the answer checked.
- :class:`FakeFarm` is a farm of pools and hosts (the real
  :class:`nlbproxy.classifier.Farm` on a fake clock) whose hosts tests take
  down, drain and load, with sessions bound to hosts; :meth:`FakeFarm.host_for`
  picks the host the router would pick for a decision: a request's known
  session first, then the decision's affinity key (consistent hash), then
  the pool's affinity cookie or client address, then its balancing.
- :func:`assert_routes`, :func:`assert_declines` and :func:`assert_refuses`
  are plain functions for pytest; :class:`RoutingAssertions` offers them as
  ``assertRoutes`` etc. to a ``twisted.trial.unittest.SynchronousTestCase``.

A plugin's test then reads::

    farm = FakeFarm({"app": ["10.0.0.1:80", "10.0.0.2:80"]})
    classifier = farm.configure("tenant", {"header": "X-Tenant", "default": "app"})
    decision = assert_routes(classifier, request(headers={"X-Tenant": "acme"}), pool="app", farm=farm)
    farm.down("app", farm.host_for(decision).key)
    assert_routes(classifier, request(headers={"X-Tenant": "acme"}), pool="app", farm=farm)
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from nlbproxy.classifier import Farm, Host
from nlbproxy.config import HostConfig, PoolConfig, parse_host_port
from nlbproxy.plugin import IRequestClassifier, IRoutingPlugin
from nlbproxy.plugin import configure as _configure
from nlbproxy.routing import Decision, Refusal, RequestView, cookies_of

__all__ = [
    "FakeFarm", "RoutingAssertions", "assert_declines", "assert_refuses", "assert_routes", "configure", "decide",
    "request", "routed_view",
]

_ANY: Any = object()
HeadersIn = Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]]


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def request(
    method: str | bytes = "GET",
    target: str | bytes = "/",
    headers: HeadersIn = (),
    *,
    client: str = "192.0.2.1",
    body: bytes = b"",
    host: str | None = "example.com",
    scheme: str = "http",
) -> RequestView:
    """A request as the router sees it, with its whole *body*.

    *headers* is a mapping or (name, value) pairs (repeat a name with pairs);
    names are lower-cased.  A ``Host`` header is added unless *headers* has
    one or *host* is None.  :func:`decide` cuts the body to what the
    classifier asked for.
    """
    items = headers.items() if isinstance(headers, Mapping) else headers
    pairs = [(_bytes(name).lower(), _bytes(value)) for name, value in items]
    names = {name for name, _ in pairs}
    if host is not None and b"host" not in names:
        pairs.insert(0, (b"host", host.encode("idna")))
    if body and not names & {b"content-length", b"transfer-encoding"}:
        pairs.append((b"content-length", b"%d" % len(body)))
    return RequestView(_bytes(method), _bytes(target), pairs, client, scheme.encode(), body, True)


def routed_view(view: RequestView, body_prefix: int) -> RequestView:
    """*view* (holding its whole body) as the router hands it to rules that
    want *body_prefix* body bytes.

    The router decides at once for a bodiless request or when no rule wants
    the body (then it has read none of it), else as soon as *body_prefix*
    bytes arrived (the body is not complete then, even if nothing follows)
    or at the end of a shorter body.
    """
    body = view.body
    if not body:
        return view
    if body_prefix == 0:
        body, complete = b"", False
    else:
        body, complete = body[:body_prefix], view.body_complete and len(body) < body_prefix
    routed = RequestView(view.method, view.target, view.headers, view.client_ip, view.scheme, body, complete)
    routed.soap = view.soap
    return routed


def configure(
    plugin: str | IRoutingPlugin, options: Mapping[str, Any] | None = None, pools: Iterable[str] = ("app",)
) -> IRequestClassifier:
    """The classifier *plugin* (a plugin or the name of one found in
    ``plugins/``) makes of *options* for a unit with *pools*; bad options
    raise :class:`nlbproxy.plugin.OptionError` as they fail a unit's start."""
    return _configure(plugin, dict(options or {}), frozenset(pools))


def classify(classifier: IRequestClassifier, view: RequestView) -> Any:
    """The classifier's raw answer for *view*, with the body cut to its prefix."""
    return classifier.classify(routed_view(view, classifier.body_prefix))


def decide(classifier: IRequestClassifier, view: RequestView) -> Decision | None:
    """The classifier's answer for *view*, as the router takes it.

    A Deferred answer must have fired (fire it, or advance the clock the
    classifier was given, before asking); its failure is raised here.
    Raises :class:`~nlbproxy.routing.Refusal` when the classifier refuses,
    AssertionError for an answer the router would count as a failure.
    """
    answer = classify(classifier, view)
    if isinstance(answer, Deferred):
        results: list[Any] = []

        def keep(result: Any) -> Any:
            results.append(result)
            # A failure is raised below: handled, it must not be logged as
            # unhandled when the Deferred is collected.
            return None if isinstance(result, Failure) else result

        answer.addBoth(keep)
        if not results:
            raise AssertionError("the classifier's Deferred has not fired: the router would time out (502)")
        answer = results[0]
        if isinstance(answer, Failure):
            answer.raiseException()
    if answer is not None and not isinstance(answer, Decision):
        raise AssertionError(f"the classifier answered {answer!r}, not a Decision or None (the router: 502)")
    return answer


# --- a farm to route into ----------------------------------------------------------


class FakeFarm:
    """Pools of hosts on a fake clock, as a unit holds them.

    *pools* maps each pool name to its hosts (``"ip:port"`` strings, a
    mapping of them to weights, or a whole :class:`~nlbproxy.config.PoolConfig`);
    *affinity* optionally gives pools an ``affinity`` ("none", "cookie",
    "client_ip", "session") and *balance* their balancing ("round_robin" by
    default here, so spreads are exact; units default to "tokens").
    """

    def __init__(
        self,
        pools: Mapping[str, Iterable[str] | Mapping[str, int] | PoolConfig],
        *,
        affinity: Mapping[str, str] | None = None,
        balance: str = "round_robin",
        seed: int = 0,
    ) -> None:
        configs = []
        for name, hosts in pools.items():
            if isinstance(hosts, PoolConfig):
                configs.append(hosts)
                continue
            weights = hosts if isinstance(hosts, Mapping) else dict.fromkeys(hosts, 1)
            host_configs = tuple(HostConfig(*parse_host_port(key), weight=weight) for key, weight in weights.items())
            configs.append(PoolConfig(name, host_configs, affinity=(affinity or {}).get(name, "none"), balance=balance))
        #: Drives passive health (``fail_timeout``) and client-address affinity.
        self.clock = Clock()
        self.farm = Farm(configs, self.clock, b"nlbproxy.testing", random.Random(seed))
        #: Sessions bound to hosts, as the DAM holds them: (pool, cookie value) -> host key.
        self.sessions: dict[tuple[str, str], str] = {}

    @property
    def pool_names(self) -> frozenset[str]:
        return frozenset(self.farm.pools)

    def configure(self, plugin: str | IRoutingPlugin, options: Mapping[str, Any] | None = None) -> IRequestClassifier:
        """:func:`configure` against this farm's pools."""
        return configure(plugin, options, self.pool_names)

    def host(self, pool: str, key: str) -> Host:
        return self.farm.host(pool, key)

    # -- changing hosts --------------------------------------------------------------
    def down(self, pool: str, key: str, reason: str = "down in the test") -> None:
        """Host *key* fails its health check until :meth:`up`."""
        host = self.host(pool, key)
        host.probe_up, host.probe_reason = False, reason
        self.farm.pools[pool].changed()

    def up(self, pool: str, key: str) -> None:
        host = self.host(pool, key)
        host.probe_up, host.probe_reason, host.down_until = True, "", 0.0
        self.farm.pools[pool].changed()

    def set_directive(self, pool: str, key: str, directive: str) -> None:
        """"active", "draining" or "inactive", as an operator sets it."""
        self.farm.pools[pool].set_directive(self.host(pool, key), directive)

    def set_load(self, pool: str, key: str, load: int, capacity: int | None = None) -> None:
        """The load (0-100) and capacity a host agent reports."""
        host = self.host(pool, key)
        host.load = load
        if capacity is not None:
            host.capacity = capacity
        self.farm.pools[pool].changed()

    def bind_session(self, pool: str, session: str, key: str) -> None:
        """Session *session* (the value of the pool's ``session_cookie``) is on host *key*."""
        self.host(pool, key)
        self.sessions[(pool, session)] = key

    # -- routing -----------------------------------------------------------------
    def host_for(self, decision: Decision, view: RequestView | None = None) -> Host | None:
        """The host the router picks for *decision* on *view*; None when no host
        may take it (the router answers 503).

        The order is the router's: a session the request's cookie names,
        the decision's affinity key, the pool's affinity, its balancing.
        """
        pool = self.farm.pools.get(decision.pool)
        if pool is None:
            raise AssertionError(f"the decision names pool {decision.pool!r}, which the farm lacks (the router: 502)")
        view = view if view is not None else request()
        config = pool.config
        session: str | None = None
        if config.affinity == "session":
            cookie = cookies_of(view.headers).get(config.session_cookie.encode())
            if cookie:
                session = cookie.decode("latin-1")
                known = self.sessions.get((pool.name, session))
                if known is not None:
                    bound = pool.bound_host(pool.by_key.get(known))
                    if bound is not None:
                        return bound
                else:
                    session = None  # an unknown cookie binds nothing
        host = None
        if decision.affinity_key is not None:
            host = pool.host_for_key(decision.affinity_key)
        if host is None:
            if config.affinity == "cookie":
                token = cookies_of(view.headers).get(config.affinity_cookie.encode())
                host = pool.host_for_token(token.decode("ascii", "replace")) if token else None
            elif config.affinity == "client_ip":
                host = pool.host_for_client_ip(view.client_ip)
            if host is None:
                host = pool.choose()
        if host is not None and config.affinity == "client_ip":
            pool.remember_client_ip(view.client_ip, host)
        if host is not None and session is not None:
            self.sessions[(pool.name, session)] = host.key  # its host could not take it: it moves
        return host

    def route(self, classifier: IRequestClassifier, view: RequestView) -> tuple[Decision | None, Host | None]:
        """The classifier's decision for *view* and the host it leads to."""
        decision = decide(classifier, view)
        return decision, (self.host_for(decision, view) if decision is not None else None)


# --- assertions ------------------------------------------------------------------


def assert_routes(
    classifier: IRequestClassifier,
    view: RequestView,
    pool: str | None = None,
    host: str | None = None,
    *,
    affinity_key: bytes | str | None = _ANY,
    farm: FakeFarm | None = None,
) -> Decision:
    """Assert that *classifier* routes *view* (to *pool*, with *affinity_key*,
    and to *host* "ip:port" of *farm*); returns the decision."""
    try:
        decision = decide(classifier, view)
    except Refusal as refusal:
        raise AssertionError(f"the classifier refused the request: {refusal.status} {refusal.body!r}") from None
    if decision is None:
        raise AssertionError(f"the classifier declined {view.method!r} {view.target!r}")
    if pool is not None and decision.pool != pool:
        raise AssertionError(f"routed to pool {decision.pool!r}, not {pool!r}")
    if affinity_key is not _ANY:
        wanted = affinity_key.encode() if isinstance(affinity_key, str) else affinity_key
        if decision.affinity_key != wanted:
            raise AssertionError(f"affinity key {decision.affinity_key!r}, not {wanted!r}")
    if host is not None:
        if farm is None:
            raise TypeError("assert_routes: asking for a host needs farm=")
        chosen = farm.host_for(decision, view)
        if chosen is None:
            raise AssertionError(f"no host of pool {decision.pool!r} may take the request, not {host!r}")
        if chosen.key != host:
            raise AssertionError(f"routed to host {chosen.key!r} of {decision.pool!r}, not {host!r}")
    return decision


def assert_declines(classifier: IRequestClassifier, view: RequestView) -> None:
    """Assert that *classifier* declines *view* (the next routes decide)."""
    decision = decide(classifier, view)
    if decision is not None:
        raise AssertionError(f"expected a decline, the classifier routed to {decision!r}")


def assert_refuses(classifier: IRequestClassifier, view: RequestView, status: int | None = None) -> Refusal:
    """Assert that *classifier* answers *view* itself (with *status*); returns the Refusal."""
    try:
        decision = decide(classifier, view)
    except Refusal as refusal:
        if status is not None and refusal.status != status:
            raise AssertionError(f"refused with {refusal.status}, not {status}: {refusal.body!r}") from None
        return refusal
    raise AssertionError(f"expected a refusal, the classifier answered {decision!r}")


class RoutingAssertions:
    """The assertions as methods of a trial ``SynchronousTestCase`` (mix it in
    first), reported as test failures."""

    failureException: type[BaseException]

    def assertRoutes(
        self,
        classifier: IRequestClassifier,
        view: RequestView,
        pool: str | None = None,
        host: str | None = None,
        *,
        affinity_key: bytes | str | None = _ANY,
        farm: FakeFarm | None = None,
    ) -> Decision:
        try:
            return assert_routes(classifier, view, pool, host, affinity_key=affinity_key, farm=farm)
        except AssertionError as exc:
            raise self.failureException(str(exc)) from None

    def assertDeclines(self, classifier: IRequestClassifier, view: RequestView) -> None:
        try:
            assert_declines(classifier, view)
        except AssertionError as exc:
            raise self.failureException(str(exc)) from None

    def assertRefuses(self, classifier: IRequestClassifier, view: RequestView, status: int | None = None) -> Refusal:
        try:
            return assert_refuses(classifier, view, status)
        except AssertionError as exc:
            raise self.failureException(str(exc)) from None
