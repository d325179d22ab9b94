"""nlbproxy.testing: the request builder, decide, FakeFarm and the assertions.

FakeFarm's host choice is checked against the router core itself
(tests.fakes.Harness), so the two cannot drift apart unnoticed.  Runs under
trial and pytest.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nlbproxy.classifier import DRAINING, INACTIVE
from nlbproxy.config import RouteConfig
from nlbproxy.plugin import IRequestClassifier
from nlbproxy.routing import Decision, Refusal, RequestView
from nlbproxy.testing import (
    FakeFarm, RoutingAssertions, assert_declines, assert_refuses, assert_routes, configure, decide, request,
    routed_view,
)
from tests.fakes import Harness, pool

HOSTS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


@implementer(IRequestClassifier)
class Answers:
    def __init__(self, answer: Any, body_prefix: int = 0) -> None:
        self.answer = answer
        self.body_prefix = body_prefix
        self.seen: list[RequestView] = []

    def classify(self, request: RequestView) -> Any:
        self.seen.append(request)
        return self.answer(request) if callable(self.answer) else self.answer


class RequestTests(SynchronousTestCase):
    def test_builder(self) -> None:
        view = request("POST", "/a?b=1", {"X-Tenant": "acme"}, client="198.51.100.7", body=b"hello")
        self.assertEqual((view.method, view.target, view.path), (b"POST", b"/a?b=1", b"/a"))
        self.assertEqual(
            view.headers, [(b"host", b"example.com"), (b"x-tenant", b"acme"), (b"content-length", b"5")]
        )
        self.assertEqual((view.client_ip, view.scheme, view.body, view.body_complete), ("198.51.100.7", b"http", b"hello", True))
        view = request(headers=[(b"Host", b"shop.example:8080"), ("A", "1"), ("a", "2")], scheme="https")
        self.assertEqual(view.headers, [(b"host", b"shop.example:8080"), (b"a", b"1"), (b"a", b"2")])
        self.assertEqual(view.scheme, b"https")
        self.assertEqual(request(host=None).headers, [])

    def test_the_body_as_the_router_hands_it_over(self) -> None:
        view = request("POST", body=b"0123456789")

        def cut(prefix: int) -> tuple[bytes, bool]:
            routed = routed_view(view, prefix)
            return routed.body, routed.body_complete

        self.assertEqual(cut(0), (b"", False))  # decided before any body byte was read
        self.assertEqual(cut(4), (b"0123", False))
        self.assertEqual(cut(10), (b"0123456789", False))  # the prefix filled up: decided before the end
        self.assertEqual(cut(11), (b"0123456789", True))
        self.assertEqual((routed_view(request(), 8).body, routed_view(request(), 8).body_complete), (b"", True))

    def test_matches_what_the_router_hands_over(self) -> None:
        for prefix in (0, 4, 10, 11):
            classifier = Answers(Decision("web"), prefix)
            h = Harness(pools=[pool("web", HOSTS[0])], routes=[RouteConfig(plugin="p", classifier=classifier)])
            h.client().send(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\n0123456789")
            decide(classifier, request("POST", body=b"0123456789"))
            router, ours = classifier.seen
            self.assertEqual((router.body, router.body_complete), (ours.body, ours.body_complete), prefix)
            self.assertEqual(router.headers, ours.headers)


    @settings(derandomize=True, max_examples=60, deadline=None)
    @given(st.integers(0, 40), st.integers(0, 50), st.integers(1, 40))
    def test_any_body_and_prefix_match_the_router(self, size: int, prefix: int, split: int) -> None:
        """Whatever the body's length, the prefix wanted and how the body
        arrives, the router and routed_view hand the classifier the same."""
        body = bytes(range(65, 65 + size)) if size <= 26 else b"x" * size
        classifier = Answers(Decision("web"), prefix)
        h = Harness(pools=[pool("web", HOSTS[0])], routes=[RouteConfig(plugin="p", classifier=classifier)])
        c = h.client()
        wire = b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n\r\n" % size + body
        cut = len(wire) - size + min(split, size)
        c.send(wire[:cut])
        if cut < len(wire):
            c.send(wire[cut:])
        decide(classifier, request("POST", body=body))
        router, ours = classifier.seen
        self.assertEqual((router.body, router.body_complete), (ours.body, ours.body_complete))


class DecideTests(SynchronousTestCase):
    def test_answers(self) -> None:
        self.assertEqual(decide(Answers(Decision("a")), request()), Decision("a"))
        self.assertIsNone(decide(Answers(None), request()))
        self.assertEqual(decide(Answers(lambda v: succeed(Decision("a", b"k"))), request()), Decision("a", b"k"))

    def test_a_deferred_that_has_not_fired(self) -> None:
        answer: Deferred[Decision] = Deferred()
        classifier = Answers(lambda v: answer)
        with self.assertRaises(AssertionError) as caught:
            decide(classifier, request())
        self.assertIn("has not fired", str(caught.exception))
        answer.callback(Decision("a"))
        self.assertEqual(decide(classifier, request()), Decision("a"))

    def test_failures_are_raised(self) -> None:
        self.assertRaises(ZeroDivisionError, decide, Answers(lambda v: fail(ZeroDivisionError())), request())
        self.assertRaises(Refusal, decide, Answers(lambda v: fail(Refusal(403, b""))), request())
        with self.assertRaises(AssertionError) as caught:
            decide(Answers("a"), request())
        self.assertIn("not a Decision or None", str(caught.exception))


class FakeFarmTests(SynchronousTestCase):
    def test_health_directives_and_load(self) -> None:
        farm = FakeFarm({"app": HOSTS})
        farm.down("app", HOSTS[0])
        farm.set_directive("app", HOSTS[1], INACTIVE)
        self.assertEqual({farm.host_for(Decision("app")).key for _ in range(6)}, {HOSTS[2]})  # type: ignore[union-attr]
        farm.down("app", HOSTS[2])
        self.assertIsNone(farm.host_for(Decision("app")))
        farm.up("app", HOSTS[0])
        self.assertEqual(farm.host_for(Decision("app")).key, HOSTS[0])  # type: ignore[union-attr]
        farm.set_load("app", HOSTS[0], 90, capacity=5)
        self.assertEqual((farm.host("app", HOSTS[0]).load, farm.host("app", HOSTS[0]).capacity), (90, 5))
        self.assertRaises(KeyError, farm.host, "app", "10.9.9.9:80")

    def test_weights_spread_round_robin(self) -> None:
        farm = FakeFarm({"app": {HOSTS[0]: 3, HOSTS[1]: 1}})
        keys = [farm.host_for(Decision("app")).key for _ in range(8)]  # type: ignore[union-attr]
        self.assertEqual((keys.count(HOSTS[0]), keys.count(HOSTS[1])), (6, 2))

    def test_an_unknown_pool(self) -> None:
        with self.assertRaises(AssertionError) as caught:
            FakeFarm({"app": HOSTS}).host_for(Decision("nope"))
        self.assertIn("pool 'nope', which the farm lacks", str(caught.exception))

    def test_sessions_come_first_and_move_when_their_host_cannot_take_them(self) -> None:
        farm = FakeFarm({"app": HOSTS}, affinity={"app": "session"})
        farm.bind_session("app", "s1", HOSTS[2])
        with_session = request(headers={"Cookie": "SESSIONID=s1"})
        keyed = Decision("app", b"tenant-1")
        self.assertEqual(farm.host_for(keyed, with_session).key, HOSTS[2])  # type: ignore[union-attr]
        farm.set_directive("app", HOSTS[2], DRAINING)  # draining still serves its sessions
        self.assertEqual(farm.host_for(keyed, with_session).key, HOSTS[2])  # type: ignore[union-attr]
        farm.set_directive("app", HOSTS[2], INACTIVE)
        moved = farm.host_for(keyed, with_session)
        assert moved is not None
        self.assertEqual(moved, farm.host_for(keyed))  # the key decides now
        self.assertEqual(farm.sessions[("app", "s1")], moved.key)
        # A cookie value no unit knows binds nothing.
        farm.host_for(Decision("app"), request(headers={"Cookie": "SESSIONID=made-up"}))
        self.assertNotIn(("app", "made-up"), farm.sessions)

    def test_affinity_cookie_and_client_address(self) -> None:
        farm = FakeFarm({"c": HOSTS, "ip": HOSTS}, affinity={"c": "cookie", "ip": "client_ip"})
        token = farm.host("c", HOSTS[1]).affinity_token
        view = request(headers={"Cookie": f"NLBAFF={token}"})
        self.assertEqual({farm.host_for(Decision("c"), view).key for _ in range(4)}, {HOSTS[1]})  # type: ignore[union-attr]
        first = farm.host_for(Decision("ip"), request(client="198.51.100.1"))
        self.assertEqual({farm.host_for(Decision("ip"), request(client="198.51.100.1")) for _ in range(4)}, {first})

    def test_the_same_host_as_the_router(self) -> None:
        """For affinity keys, through health and directive changes, FakeFarm
        and the router core pick the same host."""
        pools = {"app": HOSTS + ["10.0.0.4:80"]}
        classifier = configure("tenant", {"header": "X-Tenant", "default": "app"}, {"app"})
        h = Harness(pools=[pool("app", *pools["app"])], routes=[RouteConfig(plugin="tenant", classifier=classifier)])
        farm = FakeFarm(pools)
        c = h.client()

        def both(tenant: str) -> tuple[str, str]:
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Tenant: " + tenant.encode() + b"\r\n\r\n")
            backend = h.next_backend()
            backend.received()
            backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            c.received()
            ours = farm.route(classifier, request(headers={"X-Tenant": tenant}))[1]
            assert ours is not None
            return backend.key, ours.key

        for step in range(3):
            for i in range(12):
                router, ours = both(f"t{i}")
                self.assertEqual(router, ours, (step, i))
            if step == 0:
                h.pool("app").set_directive(h.host(HOSTS[0], "app"), INACTIVE)
                farm.set_directive("app", HOSTS[0], INACTIVE)
            else:
                h.pool("app").mark_failed(h.host(HOSTS[1], "app"), "test")
                farm.down("app", HOSTS[1])


class AssertionTests(RoutingAssertions, SynchronousTestCase):
    def setUp(self) -> None:
        self.farm = FakeFarm({"app": HOSTS})
        self.keyed = Answers(Decision("app", b"k"))

    def fails(self, call: Any, *args: Any, **kw: Any) -> str:
        with self.assertRaises(AssertionError) as caught:
            call(*args, **kw)
        return str(caught.exception)

    def test_plain_functions(self) -> None:
        host = self.farm.host_for(Decision("app", b"k"))
        assert host is not None
        self.assertEqual(assert_routes(self.keyed, request(), "app", host.key, affinity_key="k", farm=self.farm), Decision("app", b"k"))
        self.assertEqual(self.fails(assert_routes, self.keyed, request(), "web"), "routed to pool 'app', not 'web'")
        self.assertEqual(self.fails(assert_routes, self.keyed, request(), affinity_key=None), "affinity key b'k', not None")
        other = next(key for key in HOSTS if key != host.key)
        self.assertEqual(
            self.fails(assert_routes, self.keyed, request(), host=other, farm=self.farm),
            f"routed to host {host.key!r} of 'app', not {other!r}",
        )
        self.assertRaises(TypeError, assert_routes, self.keyed, request(), host=other)
        self.assertIn("declined", self.fails(assert_routes, Answers(None), request()))
        self.assertIn("refused the request: 403", self.fails(assert_routes, Answers(lambda v: fail(Refusal(403, b""))), request()))
        assert_declines(Answers(None), request())
        self.assertIn("expected a decline", self.fails(assert_declines, self.keyed, request()))
        self.assertEqual(assert_refuses(Answers(lambda v: fail(Refusal(403, b"no"))), request(), 403).body, b"no")
        self.assertIn("refused with 403, not 400", self.fails(assert_refuses, Answers(lambda v: fail(Refusal(403, b""))), request(), 400))
        self.assertIn("expected a refusal", self.fails(assert_refuses, self.keyed, request()))
        for key in HOSTS:
            self.farm.down("app", key)
        self.assertIn("no host of pool 'app'", self.fails(assert_routes, self.keyed, request(), host=HOSTS[0], farm=self.farm))

    def test_methods_fail_the_test(self) -> None:
        self.assertEqual(self.assertRoutes(self.keyed, request(), "app"), Decision("app", b"k"))
        self.assertDeclines(Answers(None), request())
        for call in (
            lambda: self.assertRoutes(self.keyed, request(), "web"),
            lambda: self.assertDeclines(self.keyed, request()),
            lambda: self.assertRefuses(self.keyed, request()),
        ):
            self.assertRaises(self.failureException, call)
