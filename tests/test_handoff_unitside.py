"""The unit side's sans-I/O parts: the peeked request head and the host choice
(nlbproxy.handoff.unitside).  The I/O is tested end to end in
tests/test_handoff_e2e.py."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.classifier import Farm
from nlbproxy.config import RouteConfig
from nlbproxy.handoff.unitside import HandoffStats, Peeked, Unroutable, choose, peek_request
from nlbproxy.metrics import PrometheusWriter
from nlbproxy.routing import RouteTable
from tests.fakes import SECRET, pool

LIMIT = 16 * 1024


class PeekTests(SynchronousTestCase):
    def test_complete_head(self) -> None:
        peeked = peek_request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", LIMIT)
        assert peeked.request is not None
        self.assertEqual((peeked.request.method, peeked.request.target), (b"GET", b"/a"))

    def test_head_then_body_and_more_requests(self) -> None:
        data = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 40000
        peeked = peek_request(data, LIMIT)
        self.assertEqual(peeked.request.target if peeked.request else None, b"/up")

    def test_incomplete_needs_more(self) -> None:
        for data in (b"", b"GE", b"GET /a HTTP/1.1\r\nHost: x\r\n"):
            self.assertEqual(peek_request(data, LIMIT), Peeked())

    def test_invalid(self) -> None:
        for data in (b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\nbad header\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"a" * LIMIT):
            self.assertTrue(peek_request(data, LIMIT).invalid, data[:20])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=500))
    def test_property_any_bytes(self, data: bytes) -> None:
        peeked = peek_request(data, LIMIT)
        self.assertFalse(peeked.invalid and peeked.request is not None)


class ChooseTests(SynchronousTestCase):
    def listener(self, affinity: str = "none") -> SimpleNamespace:
        farm = Farm([pool("web", "10.0.0.11:80", "10.0.0.12:80", affinity=affinity), pool("api", "10.0.0.21:80")],
                    Clock(), SECRET)
        routes = RouteTable([RouteConfig("api", path_prefix="/api")], "web")
        return SimpleNamespace(routes=routes, farm=farm, scheme=b"http")

    def test_rules_that_need_more_than_the_head_leave_it_to_the_router(self) -> None:
        listener = self.listener()
        listener.routes.body_prefix = 64
        with self.assertRaises(Unroutable):
            choose(listener, self.request(b"/api"), "10.0.0.2")  # type: ignore[arg-type]

    def request(self, target: bytes) -> object:
        peeked = peek_request(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", LIMIT)
        return peeked.request

    def test_routes_pick_the_pool(self) -> None:
        listener = self.listener()
        host = choose(listener, self.request(b"/api/v1"), "10.0.0.2")  # type: ignore[arg-type]
        self.assertEqual(host.key if host else None, "10.0.0.21:80")
        web = {choose(listener, self.request(b"/"), "10.0.0.2").key for _ in range(4)}  # type: ignore[arg-type,union-attr]
        self.assertEqual(web, {"10.0.0.11:80", "10.0.0.12:80"})

    def test_client_ip_affinity_sticks(self) -> None:
        listener = self.listener("client_ip")
        first = choose(listener, self.request(b"/"), "10.0.0.2")  # type: ignore[arg-type]
        again = {choose(listener, self.request(b"/"), "10.0.0.2") for _ in range(5)}  # type: ignore[arg-type]
        self.assertEqual(again, {first})

    def test_no_host(self) -> None:
        listener = self.listener()
        for host in listener.farm.pools["api"].hosts:
            host.operator_directive = "inactive"
            host.refresh_directive()
        self.assertIsNone(choose(listener, self.request(b"/api"), "10.0.0.2"))  # type: ignore[arg-type]

    def test_undecidable_on_the_head_alone(self) -> None:
        """A rule that refuses the request or answers later: the connection is proxied."""
        from twisted.internet.defer import Deferred

        from nlbproxy.routing import Refusal

        later: Deferred[object] = Deferred()

        class Routes:
            body_prefix = 0
            rules = ()

            def __init__(self, answer: object) -> None:
                self.answer = answer

            def decide(self, view: object) -> object:
                if isinstance(self.answer, Exception):
                    raise self.answer
                return self.answer

        listener = self.listener()
        for answer in (Refusal(403, b"denied"), later, ValueError("plugin bug")):
            listener.routes = Routes(answer)
            self.assertRaises(Unroutable, choose, listener, self.request(b"/"), "10.0.0.2")  # type: ignore[arg-type]
        later.errback(ValueError("late failure"))  # swallowed, not an unhandled error


class MetricsTests(SynchronousTestCase):
    def test_counters_render(self) -> None:
        stats = HandoffStats()
        stats.handed_off = 3
        stats.fell_back["agent_unavailable"] += 2
        stats.failed["refused"] += 1
        stats.latency.observe(0.0007)
        w = PrometheusWriter()
        stats.write_metrics(w)
        text = w.render()
        for line in ("nlbproxy_handoff_total 3", 'nlbproxy_handoff_fallback_total{reason="agent_unavailable"} 2',
                     'nlbproxy_handoff_failed_total{reason="refused"} 1', "nlbproxy_handoff_duration_seconds_count{} 1"):
            self.assertIn(line, text)
