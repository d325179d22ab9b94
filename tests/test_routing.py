"""Listener rules: which pool serves a request."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.config import HeaderMatch, RouteConfig
from twisted.internet.defer import Deferred, succeed

from nlbproxy.routing import (
    Decision,
    Refusal,
    RequestView,
    RouteTable,
    Rule,
    cookies_of,
    header_values,
    host_of,
    path_of,
)


def h(**headers: bytes) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value) for name, value in headers.items()]


def matches(route: RouteConfig, target: bytes = b"/", method: bytes = b"GET", headers=()) -> bool:
    return Rule(route).matches(method, path_of(target), list(headers))


def pool_for(table: RouteTable, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> str:
    decision = table.decide(RequestView(method, target, headers))
    assert isinstance(decision, Decision)
    return decision.pool


class _Asking(Rule):
    """A rule that answers through a Deferred, like a plugin."""

    def __init__(self, answer: Deferred[Decision | None]) -> None:
        super().__init__(RouteConfig(pool="unused"))
        self.answer = answer
        self.asked = 0

    def decide(self, view: RequestView) -> Deferred[Decision | None]:  # type: ignore[override]
        self.asked += 1
        return self.answer


class HostOfTests(SynchronousTestCase):
    def test_host_of(self) -> None:
        self.assertEqual(host_of(h(host=b"Example.COM")), b"example.com")
        self.assertEqual(host_of(h(host=b"example.com:8080")), b"example.com")
        self.assertEqual(host_of(h(host=b"example.com.")), b"example.com")
        self.assertEqual(host_of(h(host=b" example.com ")), b"example.com")
        self.assertEqual(host_of(h(host=b"[2001:DB8::1]:443")), b"[2001:db8::1]")
        self.assertEqual(host_of(h(host=b"[2001:db8::1]")), b"[2001:db8::1]")
        self.assertEqual(host_of(h(host=b"192.0.2.1:80")), b"192.0.2.1")
        self.assertEqual(host_of(h(accept=b"*/*")), b"")
        self.assertEqual(host_of([(b"host", b"first"), (b"host", b"second")]), b"first")


class PathOfTests(SynchronousTestCase):
    def test_origin_form(self) -> None:
        self.assertEqual(path_of(b"/a/b"), b"/a/b")
        self.assertEqual(path_of(b"/a/b?x=1&y=/c"), b"/a/b")
        self.assertEqual(path_of(b"/?"), b"/")

    def test_absolute_form(self) -> None:
        self.assertEqual(path_of(b"http://example.com/a/b?x=1"), b"/a/b")
        self.assertEqual(path_of(b"https://example.com:8443/"), b"/")
        self.assertEqual(path_of(b"http://example.com"), b"/")
        self.assertEqual(path_of(b"http://example.com?q=/x"), b"/")

    def test_asterisk_form(self) -> None:
        self.assertEqual(path_of(b"*"), b"*")


class CookiesOfTests(SynchronousTestCase):
    def test_cookies(self) -> None:
        headers = [
            (b"cookie", b"a=1; b=\"two\"; flag; c = 3 "),
            (b"x-cookie", b"z=9"),
            (b"cookie", b"a=ignored;d=4=4"),
        ]
        self.assertEqual(cookies_of(headers), {b"a": b"1", b"b": b"two", b"c": b"3", b"d": b"4=4"})
        self.assertEqual(cookies_of([]), {})
        self.assertEqual(cookies_of([(b"cookie", b"")]), {})

    @settings(derandomize=True, max_examples=300)
    @given(st.lists(st.tuples(st.sampled_from([b"cookie", b"host", b"x"]), st.binary(max_size=200)), max_size=5))
    def test_never_raises(self, headers: list[tuple[bytes, bytes]]) -> None:
        jar = cookies_of(headers)
        for key, value in jar.items():
            self.assertIsInstance(key, bytes)
            self.assertIsInstance(value, bytes)
            self.assertNotIn(b";", key + value)


class RuleTests(SynchronousTestCase):
    def test_host_exact(self) -> None:
        route = RouteConfig(pool="p", host="api.example.com")
        self.assertTrue(matches(route, headers=h(host=b"API.example.com:443")))
        self.assertTrue(matches(route, headers=h(host=b"api.example.com.")))
        self.assertFalse(matches(route, headers=h(host=b"www.example.com")))
        self.assertFalse(matches(route, headers=h(host=b"x.api.example.com")))
        self.assertFalse(matches(route))

    def test_host_wildcard(self) -> None:
        route = RouteConfig(pool="p", host="*.example.com")
        self.assertTrue(matches(route, headers=h(host=b"a.example.com")))
        self.assertTrue(matches(route, headers=h(host=b"a.b.example.com:80")))
        self.assertFalse(matches(route, headers=h(host=b"example.com")))
        self.assertFalse(matches(route, headers=h(host=b"badexample.com")))

    def test_path_prefix(self) -> None:
        route = RouteConfig(pool="p", path_prefix="/api/")
        self.assertTrue(matches(route, b"/api/users?id=1"))
        self.assertTrue(matches(route, b"http://example.com/api/x"))
        self.assertFalse(matches(route, b"/api"))
        self.assertFalse(matches(route, b"/v1/api/"))
        self.assertFalse(matches(route, b"/?next=/api/"))

    def test_path_regex(self) -> None:
        route = RouteConfig(pool="p", path_regex=r"\.(png|jpe?g)$")
        self.assertTrue(matches(route, b"/img/a.png"))
        self.assertTrue(matches(route, b"/img/a.jpeg?size=2"))
        self.assertFalse(matches(route, b"/img/a.png.html"))
        self.assertFalse(matches(route, b"/page?f=a.png"))

    def test_method(self) -> None:
        route = RouteConfig(pool="p", method=(b"POST", b"PUT"))
        self.assertTrue(matches(route, method=b"POST"))
        self.assertTrue(matches(route, method=b"PUT"))
        self.assertFalse(matches(route, method=b"GET"))

    def test_header_presence_and_value(self) -> None:
        present = RouteConfig(pool="p", header=(HeaderMatch(b"x-canary"),))
        self.assertTrue(matches(present, headers=h(x_canary=b"")))
        self.assertFalse(matches(present, headers=h(x_other=b"1")))
        valued = RouteConfig(pool="p", header=(HeaderMatch(b"x-tenant", b"acme"),))
        self.assertTrue(matches(valued, headers=h(x_tenant=b" acme ")))
        self.assertTrue(matches(valued, headers=[(b"x-tenant", b"other"), (b"x-tenant", b"acme")]))
        self.assertFalse(matches(valued, headers=h(x_tenant=b"Acme")))
        self.assertFalse(matches(valued))

    def test_cookie_presence_and_value(self) -> None:
        present = RouteConfig(pool="p", cookie=(HeaderMatch(b"beta"),))
        self.assertTrue(matches(present, headers=h(cookie=b"a=1; beta=")))
        self.assertFalse(matches(present, headers=h(cookie=b"a=1; Beta=1")))
        valued = RouteConfig(pool="p", cookie=(HeaderMatch(b"ab", b"b"),))
        self.assertTrue(matches(valued, headers=h(cookie=b"ab=b")))
        self.assertFalse(matches(valued, headers=h(cookie=b"ab=a")))
        self.assertFalse(matches(valued))

    def test_all_keys_must_hold(self) -> None:
        route = RouteConfig(
            pool="p", host="example.com", path_prefix="/api/", method=(b"POST",),
            header=(HeaderMatch(b"x-v", b"2"),), cookie=(HeaderMatch(b"beta"),),
        )
        full = h(host=b"example.com", x_v=b"2", cookie=b"beta=1")
        self.assertTrue(matches(route, b"/api/x", b"POST", full))
        self.assertFalse(matches(route, b"/api/x", b"GET", full))
        self.assertFalse(matches(route, b"/web/x", b"POST", full))
        self.assertFalse(matches(route, b"/api/x", b"POST", h(host=b"other.com", x_v=b"2", cookie=b"beta=1")))
        self.assertFalse(matches(route, b"/api/x", b"POST", h(host=b"example.com", x_v=b"1", cookie=b"beta=1")))
        self.assertFalse(matches(route, b"/api/x", b"POST", h(host=b"example.com", x_v=b"2")))


class RouteTableTests(SynchronousTestCase):
    def test_first_match_wins_else_default(self) -> None:
        table = RouteTable(
            [
                RouteConfig(pool="admin", path_prefix="/api/admin/"),
                RouteConfig(pool="api", path_prefix="/api/"),
                RouteConfig(pool="never", path_prefix="/api/admin/"),
                RouteConfig(pool="eu", host="*.eu.example.com"),
            ],
            "web",
        )
        self.assertEqual(pool_for(table, b"GET", b"/api/admin/users", []), "admin")
        self.assertEqual(pool_for(table, b"GET", b"/api/users", []), "api")
        self.assertEqual(pool_for(table, b"GET", b"/api/users", h(host=b"www.eu.example.com")), "api")
        self.assertEqual(pool_for(table, b"GET", b"/", h(host=b"www.eu.example.com")), "eu")
        self.assertEqual(pool_for(table, b"GET", b"/", h(host=b"www.example.com")), "web")
        self.assertEqual(pool_for(table, b"GET", b"http://x/api/y", []), "api")
        # A path-like query of an absolute-form target without a path is no path.
        self.assertEqual(pool_for(table, b"GET", b"http://x?/api/y", []), "web")

    def test_no_rules(self) -> None:
        self.assertEqual(pool_for(RouteTable([], "web"), b"GET", b"/anything", []), "web")

    def test_header_values(self) -> None:
        self.assertEqual(header_values([(b"a", b" 1 "), (b"b", b"2"), (b"a", b"3")], b"a"), [b"1", b"3"])


class DecideTests(SynchronousTestCase):
    def test_view_has_the_path_without_query(self) -> None:
        view = RequestView(b"GET", b"http://x/a/b?c=/d", [])
        self.assertEqual(view.path, b"/a/b")

    def test_no_rules_is_the_shared_default_decision(self) -> None:
        table = RouteTable([], "web")
        self.assertIs(table.decide(RequestView(b"GET", b"/", [])), table.default)
        self.assertEqual(table.body_prefix, 0)

    def test_a_later_answer_is_waited_for(self) -> None:
        answer: Deferred[Decision | None] = Deferred()
        table = RouteTable([RouteConfig(pool="api", path_prefix="/api/")], "web")
        table.rules = (_Asking(answer), *table.rules)
        result = table.decide(RequestView(b"GET", b"/api/x", []))
        assert isinstance(result, Deferred)
        got: list[Decision] = []
        result.addCallback(got.append)
        self.assertEqual(got, [])
        answer.callback(Decision("tenant-a", b"acme"))
        self.assertEqual(got, [Decision("tenant-a", b"acme")])

    def test_a_later_decline_asks_the_next_rules(self) -> None:
        table = RouteTable([RouteConfig(pool="api", path_prefix="/api/")], "web")
        table.rules = (_Asking(succeed(None)), *table.rules)
        self.assertEqual(self.successResultOf(table.decide(RequestView(b"GET", b"/api/x", []))), Decision("api"))
        table.rules = (_Asking(succeed(None)), _Asking(succeed(None)))
        self.assertEqual(self.successResultOf(table.decide(RequestView(b"GET", b"/x", []))), Decision("web"))

    def test_a_refusal_travels_as_a_failure(self) -> None:
        table = RouteTable([], "web")
        answer: Deferred[Decision | None] = Deferred()
        table.rules = (_Asking(answer),)
        result = table.decide(RequestView(b"POST", b"/", []))
        assert isinstance(result, Deferred)
        answer.errback(Refusal(400, b"no"))
        self.assertEqual(self.failureResultOf(result, Refusal).value.status, 400)
