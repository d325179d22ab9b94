# -*- test-case-name: tests.test_routing -*-
"""Listener rules: which pool serves a request.

Sans-I/O.  A listener's ``[[listener.route]]`` tables are compiled once into
:class:`Rule` objects; each request is matched against them in order and the
first match names the pool, else the listener's default pool does.  All match
keys of one rule must hold (logical AND).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nlbproxy.config import HeaderMatch, RouteConfig

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


class Rule:
    """One compiled ``[[listener.route]]``."""

    __slots__ = ("pool", "_host", "_wildcard", "_prefix", "_regex", "_methods", "_headers", "_cookies")

    def __init__(self, route: RouteConfig) -> None:
        self.pool = route.pool
        host = route.host.encode("idna") if route.host else None
        self._wildcard = host is not None and host.startswith(b"*.")
        self._host = host[1:] if self._wildcard and host else host  # ".example.com"
        self._prefix = route.path_prefix.encode() if route.path_prefix else None
        self._regex = re.compile(route.path_regex.encode()) if route.path_regex else None
        self._methods = frozenset(route.method)
        self._headers: tuple[HeaderMatch, ...] = route.header
        self._cookies: tuple[HeaderMatch, ...] = route.cookie

    def matches(self, method: bytes, path: bytes, headers: Headers) -> bool:
        if self._methods and method not in self._methods:
            return False
        if self._prefix is not None and not path.startswith(self._prefix):
            return False
        if self._regex is not None and self._regex.search(path) is None:
            return False
        if self._host is not None:
            host = host_of(headers)
            if self._wildcard:
                if not host.endswith(self._host):
                    return False
            elif host != self._host:
                return False
        for match in self._headers:
            values = header_values(headers, match.name)
            if not values or (match.value is not None and match.value not in values):
                return False
        if self._cookies:
            jar = cookies_of(headers)
            for match in self._cookies:
                value = jar.get(match.name)
                if value is None or (match.value is not None and value != match.value):
                    return False
        return True


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


class RouteTable:
    """The ordered rules of one listener and its default pool."""

    __slots__ = ("rules", "default_pool")

    def __init__(self, routes: Sequence[RouteConfig], default_pool: str) -> None:
        self.rules = tuple(Rule(route) for route in routes)
        self.default_pool = default_pool

    def pool_for(self, method: bytes, target: bytes, headers: Headers) -> str:
        if self.rules:
            path = path_of(target)
            for rule in self.rules:
                if rule.matches(method, path, headers):
                    return rule.pool
        return self.default_pool
