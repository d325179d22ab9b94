# -*- test-case-name: tests.test_routing -*-
"""Listener rules: which pool serves a request.

Sans-I/O.  A listener's ``[[listener.route]]`` tables are compiled once into
:class:`Rule` objects; each request is matched against them in order and the
first match names the pool, else the listener's default pool does.  All match
keys of one rule must hold (logical AND).

What routing sees of a request is a :class:`RequestView`.  Rules that need
to look into the request body (SOAP operations, plugins) say how many bytes
of it they want (:attr:`Rule.body_prefix`); the router then holds at most
that much of the body before calling :meth:`RouteTable.decide` and streams
it on unchanged afterwards.  A decision is a :class:`Decision` (a pool, and
optionally an affinity key hashed over the pool's hosts), or a
:class:`Refusal`: an answer the unit gives itself (a SOAP fault, say).

On a listener with ``protocol = "soap"`` a :class:`SoapCheck` comes before
the configured rules: it reads every POST's SOAP call from the headers and
the body prefix (:func:`nlbproxy.routers.soap.read_request`) into
``view.soap``, where the ``soap_action`` and ``soap_operation`` keys of the
rules after it look, and refuses a malformed or hostile envelope with a SOAP
Fault of the request's version.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Union

from twisted.internet.defer import Deferred

from nlbproxy.config import HeaderMatch, ListenerConfig, RouteConfig
from nlbproxy.routers.soap import SnifferLimits, SoapCall, SoapError, read_request

Headers = Sequence[tuple[bytes, bytes]]


def host_of(headers: Headers) -> bytes:
    """The request's host name: lower case, port and trailing dot removed."""
    for name, value in headers:
        if name == b"host":
            host = value.strip().lower()
            if host.startswith(b"["):
                end = host.find(b"]")
                return host[: end + 1] if end > 0 else host
            colon = host.rfind(b":")
            if colon >= 0:
                host = host[:colon]
            return host.rstrip(b".")
    return b""


def cookies_of(headers: Headers) -> dict[bytes, bytes]:
    """Cookies of a request (RFC 6265 ``Cookie`` headers); the first of a name wins."""
    jar: dict[bytes, bytes] = {}
    for name, value in headers:
        if name == b"cookie":
            for pair in value.split(b";"):
                key, sep, val = pair.partition(b"=")
                if sep:
                    jar.setdefault(key.strip(), val.strip().strip(b'"'))
    return jar


def header_values(headers: Headers, wanted: bytes) -> list[bytes]:
    return [value.strip() for name, value in headers if name == wanted]


class RequestView:
    """What routing sees of one request.

    ``headers`` are (lower-case name, value) pairs; ``body`` is the prefix of
    the request body read before deciding (empty when no rule wants one) and
    ``body_complete`` says whether it is the whole body.  ``soap`` is the
    request's SOAP call, once a :class:`SoapCheck` has read it.
    """

    __slots__ = ("method", "target", "path", "headers", "client_ip", "scheme", "body", "body_complete", "soap")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        client_ip: str = "",
        scheme: bytes = b"http",
        body: bytes = b"",
        body_complete: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.path = path_of(target)
        self.headers = headers
        self.client_ip = client_ip
        self.scheme = scheme
        self.body = body
        self.body_complete = body_complete
        self.soap: SoapCall | None = None


class Decision:
    """Where a request goes: a pool and, optionally, an affinity key.

    Requests with the same ``affinity_key`` go to the same host of the pool
    while it is up and active (a consistent hash over the hosts, see
    :meth:`nlbproxy.classifier.Pool.host_for_key`).
    """

    __slots__ = ("pool", "affinity_key")

    def __init__(self, pool: str, affinity_key: bytes | None = None) -> None:
        self.pool = pool
        self.affinity_key = affinity_key

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Decision) and self.pool == other.pool and self.affinity_key == other.affinity_key
        )

    def __hash__(self) -> int:
        return hash((self.pool, self.affinity_key))

    def __repr__(self) -> str:
        return f"Decision({self.pool!r}, {self.affinity_key!r})"


class Refusal(Exception):
    """Routing answers the request itself: ``status``, extra headers, ``body``."""

    def __init__(self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = tuple(headers)


class RequestMatch:
    """The match keys rules of every kind share: method, path prefix, path
    regex and headers (all must hold; an absent key holds)."""

    __slots__ = ("_methods", "_prefix", "_regex", "_headers")

    def __init__(
        self,
        methods: Sequence[bytes] = (),
        path_prefix: str | None = None,
        path_regex: str | None = None,
        headers: Sequence[HeaderMatch] = (),
    ) -> None:
        self._methods = frozenset(methods)
        self._prefix = path_prefix.encode() if path_prefix else None
        self._regex = re.compile(path_regex.encode()) if path_regex else None
        self._headers = tuple(headers)

    def matches(self, method: bytes, path: bytes, headers: Headers) -> bool:
        if self._methods and method not in self._methods:
            return False
        if self._prefix is not None and not path.startswith(self._prefix):
            return False
        if self._regex is not None and self._regex.search(path) is None:
            return False
        for match in self._headers:
            values = header_values(headers, match.name)
            if not values or (match.value is not None and match.value not in values):
                return False
        return True


#: What a rule answers: a decision, no match (None), or either later.
MaybeDecision = Union[Decision, None, "Deferred[Decision | None]"]


class Rule:
    """One compiled ``[[listener.route]]``."""

    __slots__ = (
        "pool", "decision", "_host", "_wildcard", "_request", "_cookies",
        "_soap_action", "_soap_operation",
    )

    #: Request body bytes this rule needs before it can match (0: none).
    body_prefix = 0

    def __init__(self, route: RouteConfig) -> None:
        self.pool = route.pool
        # Only a plugin's route may have no pool (the config parser sees to it).
        self.decision = Decision(route.pool) if route.pool is not None else None
        host = route.host.encode("idna") if route.host else None
        self._wildcard = host is not None and host.startswith(b"*.")
        self._host = host[1:] if self._wildcard and host else host  # ".example.com"
        self._request = RequestMatch(route.method, route.path_prefix, route.path_regex, route.header)
        self._cookies: tuple[HeaderMatch, ...] = route.cookie
        self._soap_action = route.soap_action
        self._soap_operation = route.soap_operation

    def decide(self, view: RequestView) -> MaybeDecision:
        """This rule's decision for ``view``, or None if it does not match.

        Rules that ask something else (a plugin) may answer later, with a
        Deferred firing a Decision or None.
        """
        return self.decision if self.selects(view) else None

    def selects(self, view: RequestView) -> bool:
        """Whether every match key of the rule holds for ``view``."""
        if not self.matches(view.method, view.path, view.headers):
            return False
        soap_keys = self._soap_action is not None or self._soap_operation is not None
        return not soap_keys or self.soap_matches(view.soap)

    def soap_matches(self, call: SoapCall | None) -> bool:
        """The ``soap_*`` keys against a request's SOAP call (None: not SOAP)."""
        if call is None:
            return False
        if self._soap_action is not None and call.action != self._soap_action:
            return False
        wanted = self._soap_operation
        if wanted is not None:
            operation = call.operation if wanted.startswith("{") else call.operation_local
            if operation != wanted:
                return False
        return True

    def matches(self, method: bytes, path: bytes, headers: Headers) -> bool:
        if not self._request.matches(method, path, headers):
            return False
        if self._host is not None:
            host = host_of(headers)
            if self._wildcard:
                if not host.endswith(self._host):
                    return False
            elif host != self._host:
                return False
        if self._cookies:
            jar = cookies_of(headers)
            for match in self._cookies:
                value = jar.get(match.name)
                if value is None or (match.value is not None and value != match.value):
                    return False
        return True


class PluginRule(Rule):
    """A route with ``plugin = NAME``: its classifier decides the requests
    that match the route's other keys.

    A classifier's decline is the route's ``pool`` if it has one, else no
    match (the next rules are asked).  An answer that is not a Decision or
    None is a bug of the plugin's and raises, which the router answers 502.
    """

    __slots__ = ("plugin", "classifier", "body_prefix")

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.plugin = route.plugin
        self.classifier = route.classifier
        self.body_prefix = route.classifier.body_prefix

    def decide(self, view: RequestView) -> MaybeDecision:
        if not self.selects(view):
            return None
        answer = self.classifier.classify(view)
        if isinstance(answer, Deferred):
            return answer.addCallback(self._checked)
        return self._checked(answer)

    def _checked(self, answer: object) -> Decision | None:
        if answer is None:
            return self.decision
        if not isinstance(answer, Decision):
            raise TypeError(f"routing plugin {self.plugin!r} answered {answer!r}, not a Decision or None")
        return answer


def compile_rule(route: RouteConfig) -> Rule:
    return PluginRule(route) if route.plugin is not None else Rule(route)


def path_of(target: bytes) -> bytes:
    """The path of a request target (origin or absolute form), without the query."""
    if not target.startswith(b"/"):
        scheme_end = target.find(b"://")
        if scheme_end >= 0:
            slash = target.find(b"/", scheme_end + 3)
            query = target.find(b"?", scheme_end + 3)
            # The authority ends at the path or, without one, at the query:
            # "http://h?next=/admin" has the path "/", not "/admin".
            if slash < 0 or 0 <= query < slash:
                return b"/"
            target = target[slash:]
    query = target.find(b"?")
    return target if query < 0 else target[:query]


class SoapCheck:
    """The first rule of a SOAP listener: reads, and never matches."""

    __slots__ = ("bounds",)

    def __init__(self, bounds: SnifferLimits | None = None) -> None:
        self.bounds = bounds or SnifferLimits()

    @property
    def body_prefix(self) -> int:
        return self.bounds.max_prefix

    def decide(self, view: RequestView) -> None:
        # Only POST carries SOAP requests in the HTTP bindings (SOAP 1.2's
        # GET is the response-only message exchange pattern).
        if view.method != b"POST":
            return None
        try:
            view.soap = read_request(view.headers, view.body, view.body_complete, self.bounds)
        except SoapError as exc:
            fault = exc.fault()
            raise Refusal(fault.status, fault.body, fault.headers) from exc
        return None


class RouteTable:
    """The ordered rules of one listener and its default pool."""

    __slots__ = ("rules", "default_pool", "default", "body_prefix")

    def __init__(
        self, routes: Sequence[RouteConfig], default_pool: str, soap: SnifferLimits | None = None
    ) -> None:
        """*soap*: the listener speaks SOAP; read each POST's call within these bounds."""
        rules: tuple[Rule | SoapCheck, ...] = tuple(compile_rule(route) for route in routes)
        if soap is not None:
            rules = (SoapCheck(soap), *rules)
        self.rules = rules
        self.default_pool = default_pool
        self.default = Decision(default_pool)
        #: Request body bytes to hold before deciding: what the hungriest rule wants.
        self.body_prefix = max((rule.body_prefix for rule in self.rules), default=0)

    @classmethod
    def for_listener(cls, config: ListenerConfig) -> RouteTable:
        soap = None
        if config.protocol == "soap":
            soap = SnifferLimits(
                config.max_soap_prefix, config.max_soap_depth, config.max_soap_attributes,
                config.max_soap_name, config.max_soap_header_text,
            )
        return cls(config.routes, config.pool, soap)

    def decide(self, view: RequestView) -> Decision | Deferred[Decision]:
        """The first matching rule's decision, else the default pool's.

        Raises :class:`Refusal` (or fails with it) when a rule answers the
        request itself; a rule that answers later makes the result a
        Deferred, and the rules after it are asked only if it declines.
        """
        return self._decide_from(view, 0)

    def _decide_from(self, view: RequestView, start: int) -> Decision | Deferred[Decision]:
        rules = self.rules
        for index in range(start, len(rules)):
            decision = rules[index].decide(view)
            if decision is None:
                continue
            if isinstance(decision, Deferred):
                return decision.addCallback(self._after_deferred, view, index + 1)
            return decision
        return self.default

    def _after_deferred(
        self, decision: Decision | None, view: RequestView, next_rule: int
    ) -> Decision | Deferred[Decision]:
        return decision if decision is not None else self._decide_from(view, next_rule)
