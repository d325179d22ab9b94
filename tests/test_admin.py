"""The admin API: the resource against fakes, the real Site over an in-memory
transport, and one exchange over loopback with Twisted's HTTP client.

The ``SynchronousTestCase`` classes run under trial and pytest alike; the last
test needs the real reactor and runs under pytest-twisted only.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, cast

import h11
import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from nlbproxy.admin import (
    AdminRequest,
    AdminResource,
    find_host,
    make_admin_site,
    parse_directive,
)
from nlbproxy.classifier import Farm, Host
from nlbproxy.config import HostConfig, PoolConfig
from nlbproxy.limits import MAX_ADMIN_BODY
from nlbproxy.metrics import ListenerStats
from nlbproxy.health.messages import SessionKind
from nlbproxy.session.dam import DAM
from nlbproxy.session.tracker import SessionTracker
from tests.test_metrics import parse_exposition

TOKEN = "s3cret-token"
V6 = "[2001:db8::1]:8080"


class FakeUpstreams:
    """``(open, idle)`` per host key; (0, 0) for the others."""

    def __init__(self, counts: dict[str, tuple[int, int]] | None = None) -> None:
        self.by_key = counts or {}

    def counts(self, host: Host) -> tuple[int, int]:
        return self.by_key.get(host.key, (0, 0))


def make_farm(clock: Clock) -> Farm:
    web = PoolConfig(
        name="web",
        hosts=(HostConfig("10.0.0.1", 80), HostConfig("10.0.0.2", 80, weight=3),
               HostConfig("2001:db8::1", 8080)),
        affinity="cookie",
        fail_timeout=10.0,
    )
    api = PoolConfig(name="api", hosts=(HostConfig("10.0.1.1", 9000),))
    return Farm([web, api], clock, b"k" * 32)


class Fixture:
    def __init__(self, token: str | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.farm = make_farm(self.clock)
        self.listeners = {"public": ListenerStats(), "soap": ListenerStats()}
        self.upstreams = FakeUpstreams({"10.0.0.1:80": (5, 2)})
        self.resource = AdminResource(
            self.farm, self.listeners, self.upstreams, "unit-a", token, self.clock)

    def host(self, key: str, pool: str = "web") -> Host:
        return self.farm.host(pool, key)


def call(
    resource: AdminResource,
    method: bytes,
    path: str,
    body: bytes = b"",
    headers: dict[bytes, bytes] | None = None,
) -> tuple[int, DummyRequest, bytes]:
    """Render ``method path`` as Site would after splitting and decoding the path."""
    # Any: DummyRequest stands in for server.Request without subclassing it.
    request: Any = DummyRequest([segment.encode() for segment in path.lstrip("/").split("/")])
    request.method = method
    request.content = BytesIO(body)
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    result = resource.render(request)
    assert result is not NOT_DONE_YET
    return request.responseCode or 200, request, result


def call_json(resource: AdminResource, method: bytes, path: str, body: bytes = b"",
              headers: dict[bytes, bytes] | None = None) -> tuple[int, Any]:
    code, request, result = call(resource, method, path, body, headers)
    assert request.responseHeaders.getRawHeaders(b"Content-Type") == [b"application/json"]
    return code, json.loads(result)


class StateTests(SynchronousTestCase):
    def test_document(self) -> None:
        f = Fixture()
        host = f.host("10.0.0.1:80")
        host.active_requests = 2
        host.stats.responses[2] = 7
        host.stats.responses[5] = 1
        f.listeners["public"].connections = 11
        f.listeners["public"].open_connections = 3
        f.listeners["public"].requests = 40
        f.listeners["public"].reject(431)
        code, doc = call_json(f.resource, b"GET", "/api/v1/state")
        self.assertEqual(code, 200)
        self.assertEqual(doc["unit"], "unit-a")
        self.assertEqual(list(doc["pools"]), ["web", "api"])
        web = doc["pools"]["web"]
        self.assertEqual(web["affinity"], "cookie")
        self.assertEqual(list(web["hosts"]), ["10.0.0.1:80", "10.0.0.2:80", V6])
        self.assertEqual(web["hosts"]["10.0.0.1:80"], {
            "health": "up",
            "health_reason": "",
            "directive": "active",
            "directive_reason": "config",
            "weight": 1,
            "load": 0,
            "capacity": 1,
            "agent": False,
            "active_requests": 2,
            "requests": 8,
            "connections": {"open": 5, "idle": 2},
            "sessions": 0,
            "latency": {"count": 0, "p50": None, "p90": None, "p99": None},
        })
        self.assertEqual(web["hosts"]["10.0.0.2:80"]["weight"], 3)
        self.assertEqual(doc["pools"]["api"]["affinity"], "none")
        self.assertEqual(doc["listeners"]["public"], {
            "connections": 11, "open_connections": 3, "requests": 40,
            "rejected": {"431": 1},
            "routing_failures": 0,
        })
        self.assertEqual(doc["listeners"]["soap"]["connections"], 0)

    def test_health_follows_the_clock(self) -> None:
        f = Fixture()
        f.farm.pools["web"].mark_failed(f.host("10.0.0.2:80"), "connect refused")

        def health() -> dict[str, Any]:
            return call_json(f.resource, b"GET", "/api/v1/state")[1]["pools"]["web"]["hosts"][
                "10.0.0.2:80"]

        self.assertEqual((health()["health"], health()["health_reason"]),
                         ("down", "passive: connect refused"))
        f.clock.advance(9.5)
        self.assertEqual(health()["health"], "down")
        f.clock.advance(0.5)
        # The reason of an old failure is not shown next to "up".
        self.assertEqual((health()["health"], health()["health_reason"]), ("up", ""))

    def test_no_cache(self) -> None:
        _, request, _ = call(Fixture().resource, b"GET", "/api/v1/state")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Cache-Control"), [b"no-store"])


class DirectiveTests(SynchronousTestCase):
    path = "/api/v1/pools/web/hosts/10.0.0.1:80/directive"

    def test_drain(self) -> None:
        f = Fixture()
        code, doc = call_json(f.resource, b"PUT", self.path, b"draining")
        self.assertEqual(code, 200)
        self.assertEqual(doc["pool"], "web")
        self.assertEqual(doc["host"], "10.0.0.1:80")
        self.assertEqual(doc["directive"], "draining")
        self.assertEqual(doc["directive_reason"], "operator")
        self.assertEqual(doc["connections"], {"open": 5, "idle": 2})
        host = f.host("10.0.0.1:80")
        self.assertEqual((host.directive, host.directive_reason), ("draining", "operator"))
        # The change is what the state document shows next.
        state = call_json(f.resource, b"GET", "/api/v1/state")[1]
        self.assertEqual(state["pools"]["web"]["hosts"]["10.0.0.1:80"]["directive"], "draining")

    def test_body_forms(self) -> None:
        f = Fixture()
        for body, expected in ((b"  inactive\r\n", "inactive"), (b'"draining"', "draining"),
                               (b' "active" \n', "active")):
            code, doc = call_json(f.resource, b"PUT", self.path, body)
            self.assertEqual((code, doc["directive"]), (200, expected), body)

    def test_bad_bodies(self) -> None:
        f = Fixture()
        for body in (b"", b"drain", b"DRAINING", b'"bogus"', b'"draining', b"5",
                     b"\xff\xfe", b'{"directive": "draining"}'):
            code, doc = call_json(f.resource, b"PUT", self.path, body)
            self.assertEqual(code, 400, body)
            self.assertIsInstance(doc["error"], str)
        self.assertEqual(f.host("10.0.0.1:80").directive, "active")

    def test_error_names_the_choices(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_directive(b"stop")
        self.assertEqual(str(caught.exception),
                         "unknown directive 'stop'; use one of active, draining, inactive")

    def test_unknown_pool_and_host(self) -> None:
        f = Fixture()
        code, doc = call_json(f.resource, b"PUT", "/api/v1/pools/nope/hosts/10.0.0.1:80/directive",
                              b"draining")
        self.assertEqual((code, doc), (404, {"error": "no pool nope"}))
        code, doc = call_json(f.resource, b"PUT", "/api/v1/pools/api/hosts/10.0.0.1:80/directive",
                              b"draining")
        self.assertEqual((code, doc), (404, {"error": "no host 10.0.0.1:80 in pool api"}))

    def test_too_large(self) -> None:
        f = Fixture()
        code, doc = call_json(f.resource, b"PUT", self.path, b" " * (MAX_ADMIN_BODY + 1))
        self.assertEqual(code, 413)
        self.assertIn("error", doc)
        # A body of exactly the limit is still read.
        code, _ = call_json(f.resource, b"PUT", self.path,
                            b"draining".ljust(MAX_ADMIN_BODY, b" "))
        self.assertEqual(code, 200)

    def test_ipv6_host_spellings(self) -> None:
        f = Fixture()
        pool = f.farm.pools["web"]
        self.assertIs(find_host(pool, V6), f.host(V6))
        self.assertIs(find_host(pool, "[2001:0db8:0:0::1]:8080"), f.host(V6))
        self.assertIsNone(find_host(pool, "2001:db8::1:8080"))
        self.assertIsNone(find_host(pool, "[2001:db8::1]:80"))
        self.assertIsNone(find_host(pool, "garbage"))
        code, doc = call_json(f.resource, b"PUT",
                              "/api/v1/pools/web/hosts/[2001:db8:0::1]:8080/directive",
                              b"inactive")
        self.assertEqual((code, doc["host"], doc["directive"]), (200, V6, "inactive"))


class RoutingTests(SynchronousTestCase):
    def test_unknown_paths(self) -> None:
        f = Fixture()
        for path in ("/index.html", "/status/", "/api", "/api/v1/state/", "/api/v2/state", "/metrics/x",
                     "/api/v1/pools/web/hosts/10.0.0.1:80"):
            code, doc = call_json(f.resource, b"GET", path)
            self.assertEqual(code, 404, path)
            self.assertEqual(doc, {"error": "no such path"})

    def test_wrong_method(self) -> None:
        f = Fixture()
        code, request, body = call(f.resource, b"POST", "/api/v1/state")
        self.assertEqual(code, 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Allow"), [b"GET, HEAD"])
        self.assertIn("error", json.loads(body))
        code, request, _ = call(f.resource, b"GET", "/api/v1/pools/web/hosts/h/directive")
        self.assertEqual(code, 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Allow"), [b"PUT"])
        code, request, _ = call(f.resource, b"DELETE", "/metrics")
        self.assertEqual(code, 405)


class TokenTests(SynchronousTestCase):
    def test_required(self) -> None:
        f = Fixture(token=TOKEN)
        for headers in ({}, {b"Authorization": b"Bearer wrong"},
                        {b"Authorization": b"Basic " + TOKEN.encode()},
                        {b"Authorization": b"Bearer"}):
            for method, path in ((b"GET", "/api/v1/state"), (b"GET", "/metrics"),
                                 (b"GET", "/no/such/path"),
                                 (b"PUT", "/api/v1/pools/web/hosts/10.0.0.1:80/directive")):
                code, request, body = call(f.resource, method, path, b"draining", headers)
                self.assertEqual(code, 401, (headers, path))
                self.assertEqual(request.responseHeaders.getRawHeaders(b"WWW-Authenticate"),
                                 [b"Bearer"])
                self.assertEqual(json.loads(body), {"error": "missing or wrong bearer token"})
        self.assertEqual(f.host("10.0.0.1:80").directive, "active")

    def test_accepted(self) -> None:
        f = Fixture(token=TOKEN)
        for value in (b"Bearer " + TOKEN.encode(), b"bearer " + TOKEN.encode()):
            code, _, _ = call(f.resource, b"GET", "/api/v1/state",
                              headers={b"Authorization": value})
            self.assertEqual(code, 200)

    def test_empty_token_refused(self) -> None:
        clock = Clock()
        with self.assertRaises(ValueError):
            AdminResource(make_farm(clock), {}, FakeUpstreams(), "u", "", clock)


class MetricsTests(SynchronousTestCase):
    def test_exposition(self) -> None:
        f = Fixture()
        host = f.host("10.0.0.1:80")
        stats = host.stats
        stats.responses[2] = 10
        stats.responses[4] = 2
        stats.latency.observe(0.003)
        stats.latency.observe(0.3)
        stats.errors["connect_refused"] = 1
        stats.bytes_in, stats.bytes_out, stats.retries = 1500, 300, 4
        host.active_requests = 3
        f.farm.pools["web"].mark_failed(f.host("10.0.0.2:80"), "reset")
        f.farm.pools["web"].set_directive(f.host(V6), "draining", reason="operator")
        f.listeners["public"].connections = 9
        f.listeners["public"].open_connections = 1
        f.listeners["public"].requests = 12
        f.listeners["public"].reject(503)

        code, request, body = call(f.resource, b"GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Content-Type"),
                         [b"text/plain; version=0.0.4; charset=utf-8"])
        families = parse_exposition(body.decode())

        def value(name: str, **labels: str) -> float:
            matches = [v for _n, lbl, v in families[name]["samples"] if lbl == labels]
            self.assertEqual(len(matches), 1, (name, labels))
            return matches[0]

        def family(name: str) -> str:
            return families[name]["type"]

        h1 = {"pool": "web", "host": "10.0.0.1:80"}
        self.assertEqual(family("nlbproxy_requests_total"), "counter")
        self.assertEqual(value("nlbproxy_requests_total", **h1, code="2xx"), 10)
        self.assertEqual(value("nlbproxy_requests_total", **h1, code="4xx"), 2)
        self.assertEqual(value("nlbproxy_requests_total", **h1, code="5xx"), 0)
        self.assertEqual(family("nlbproxy_request_duration_seconds"), "histogram")
        self.assertEqual(value("nlbproxy_request_duration_seconds", **h1, le="+Inf"), 2)
        self.assertEqual(value("nlbproxy_request_duration_seconds", **h1, le="0.005"), 1)
        self.assertEqual(value("nlbproxy_upstream_errors_total", **h1, kind="connect_refused"), 1)
        self.assertEqual(value("nlbproxy_upstream_errors_total", **h1, kind="reset"), 0)
        self.assertEqual(family("nlbproxy_upstream_connections"), "gauge")
        self.assertEqual(value("nlbproxy_upstream_connections", **h1, state="open"), 5)
        self.assertEqual(value("nlbproxy_upstream_connections", **h1, state="idle"), 2)
        self.assertEqual(value("nlbproxy_host_up", **h1), 1)
        self.assertEqual(value("nlbproxy_host_up", pool="web", host="10.0.0.2:80"), 0)
        self.assertEqual(value("nlbproxy_host_directive", pool="web", host=V6,
                               directive="draining"), 1)
        self.assertEqual(value("nlbproxy_host_directive", pool="web", host=V6,
                               directive="active"), 0)
        self.assertEqual(value("nlbproxy_host_active_requests", **h1), 3)
        self.assertEqual(value("nlbproxy_bytes_total", **h1, direction="in"), 1500)
        self.assertEqual(value("nlbproxy_bytes_total", **h1, direction="out"), 300)
        self.assertEqual(value("nlbproxy_retries_total", **h1), 4)
        self.assertEqual(value("nlbproxy_host_up", pool="api", host="10.0.1.1:9000"), 1)
        self.assertEqual(value("nlbproxy_listener_connections_total", listener="public"), 9)
        self.assertEqual(value("nlbproxy_listener_open_connections", listener="public"), 1)
        self.assertEqual(value("nlbproxy_listener_requests_total", listener="public"), 12)
        self.assertEqual(value("nlbproxy_listener_rejected_total", listener="public",
                               code="503"), 1)
        self.assertEqual(value("nlbproxy_listener_requests_total", listener="soap"), 0)

    def test_health_uses_the_clock(self) -> None:
        f = Fixture()
        f.farm.pools["web"].mark_failed(f.host("10.0.0.2:80"), "reset")
        f.clock.advance(10)
        body = call(f.resource, b"GET", "/metrics")[2].decode()
        self.assertIn('nlbproxy_host_up{pool="web",host="10.0.0.2:80"} 1\n', body)


def exchange(site: Any, data: bytes) -> list[tuple[h11.Response, bytes]]:
    """Feed raw request bytes to a real Site over a StringTransport; parse what it wrote."""
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    client = h11.Connection(h11.CLIENT)
    client.receive_data(transport.value())
    answers: list[tuple[h11.Response, bytes]] = []
    while True:
        if client.our_state is h11.IDLE and client.their_state is h11.IDLE:
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
        event = client.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
        if isinstance(event, h11.Response):
            answers.append((event, b""))
        elif isinstance(event, h11.Data):
            response, body = answers[-1]
            answers[-1] = (response, body + event.data)
        elif isinstance(event, h11.EndOfMessage):
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                break
            client.start_next_cycle()
    protocol.connectionLost(None)
    return answers


def header(response: h11.Response, name: bytes) -> bytes | None:
    values = [v for n, v in response.headers if n == name.lower()]
    return values[-1] if values else None


class SiteTests(SynchronousTestCase):
    """The real Site: percent-decoding, HEAD, the capped body, keep-alive."""

    def setUp(self) -> None:
        self.f = Fixture(token=TOKEN)
        self.site = make_admin_site(self.f.farm, self.f.listeners, self.f.upstreams,
                                    "unit-a", TOKEN, self.f.clock)
        self.auth = f"Authorization: Bearer {TOKEN}\r\n".encode()

    def test_percent_encoded_ipv6_put_then_state(self) -> None:
        body = b"draining"
        data = (b"PUT /api/v1/pools/web/hosts/%5B2001%3Adb8%3A%3A1%5D%3A8080/directive HTTP/1.1\r\n"
                b"Host: admin\r\n" + self.auth +
                b"Content-Length: %d\r\n\r\n" % len(body) + body +
                b"GET /api/v1/state HTTP/1.1\r\nHost: admin\r\n" + self.auth + b"\r\n")
        [(put, put_body), (get, get_body)] = exchange(self.site, data)
        self.assertEqual(put.status_code, 200)
        self.assertEqual(json.loads(put_body)["host"], V6)
        self.assertEqual(get.status_code, 200)
        state = json.loads(get_body)
        self.assertEqual(state["pools"]["web"]["hosts"][V6]["directive"], "draining")

    def test_head(self) -> None:
        get = exchange(self.site, b"GET /api/v1/state HTTP/1.1\r\nHost: a\r\n" + self.auth
                       + b"\r\n")[0]
        head = exchange(self.site, b"HEAD /api/v1/state HTTP/1.1\r\nHost: a\r\n" + self.auth
                        + b"\r\n")
        # h11 cannot know the answer is to HEAD; it reads the declared body as
        # missing, so only the status and headers are compared.
        self.assertEqual(head[0][0].status_code, 200)
        self.assertEqual(header(head[0][0], b"Content-Length"), b"%d" % len(get[1]))

    def test_unauthorized_over_the_wire(self) -> None:
        [(response, body)] = exchange(self.site, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(response.status_code, 401)
        self.assertEqual(header(response, b"WWW-Authenticate"), b"Bearer")
        self.assertEqual(json.loads(body), {"error": "missing or wrong bearer token"})

    def test_large_body_is_413_and_not_stored(self) -> None:
        size = MAX_ADMIN_BODY * 4
        data = (b"PUT /api/v1/pools/web/hosts/10.0.0.1:80/directive HTTP/1.1\r\n"
                b"Host: a\r\n" + self.auth + b"Content-Length: %d\r\n\r\n" % size
                + b"x" * size)
        [(response, body)] = exchange(self.site, data)
        self.assertEqual(response.status_code, 413)
        self.assertIn("error", json.loads(body))

    def test_internal_error_is_json(self) -> None:
        def broken(host: Host) -> tuple[int, int]:
            raise RuntimeError("bug")

        self.f.upstreams.counts = broken  # type: ignore[method-assign]
        [(response, body)] = exchange(self.site, b"GET /api/v1/state HTTP/1.1\r\nHost: a\r\n"
                                      + self.auth + b"\r\n")
        self.assertEqual(response.status_code, 500)
        self.assertEqual(header(response, b"Content-Type"), b"application/json")
        self.assertEqual(json.loads(body), {"error": "internal error"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_request_keeps_at_most_the_limit(self) -> None:
        request = AdminRequest(DummyChannel())
        request.gotLength(10 * MAX_ADMIN_BODY)
        for _ in range(20):
            request.handleContentChunk(b"y" * (MAX_ADMIN_BODY // 2))
        self.assertEqual(cast(BytesIO, request.content).tell(), MAX_ADMIN_BODY + 1)


# Twisted's own Agent response transport lacks abortConnection.
@pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_loopback_with_agent():
    """GET the state and PUT a directive through Twisted's HTTP client."""
    from twisted.internet import reactor
    from twisted.web.client import Agent, FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    farm = make_farm(reactor)
    site = make_admin_site(farm, {"public": ListenerStats()}, FakeUpstreams(), "unit-a",
                           TOKEN, reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}".encode()
        agent = Agent(reactor)
        auth = Headers({b"Authorization": [b"Bearer " + TOKEN.encode()]})

        response = yield agent.request(b"GET", base + b"/api/v1/state", auth)
        state = json.loads((yield readBody(response)))
        assert response.code == 200
        assert state["pools"]["web"]["hosts"][V6]["health"] == "up"
        assert state["pools"]["web"]["hosts"][V6]["directive"] == "active"

        response = yield agent.request(
            b"PUT", base + b"/api/v1/pools/web/hosts/%5B2001%3Adb8%3A%3A1%5D%3A8080/directive",
            auth, FileBodyProducer(BytesIO(b"draining\n")))
        answer = json.loads((yield readBody(response)))
        assert response.code == 200
        assert answer["directive"] == "draining"
        assert farm.host("web", V6).directive == "draining"

        response = yield agent.request(b"GET", base + b"/api/v1/state")
        assert response.code == 401
        yield readBody(response)
    finally:
        yield port.stopListening()


class SessionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture()

        def never(peer: str, call: object) -> None:
            raise AssertionError("a standalone DAM sent a call")

        self.sessions = SessionTracker(DAM("unit-a", self.f.clock, never, 1), self.f.clock)
        for key in ("s3", "s1", "s2"):
            self.sessions.session_up("web", key, SessionKind.HTTP_COOKIE, "10.0.0.2:80", 7)
        self.resource = AdminResource(
            self.f.farm, self.f.listeners, self.f.upstreams, "unit-a", None, self.f.clock,
            sessions=self.sessions)

    def test_state_counts_sessions_per_host(self) -> None:
        _, doc = call_json(self.resource, b"GET", "/api/v1/state")
        hosts = doc["pools"]["web"]["hosts"]
        self.assertEqual((hosts["10.0.0.2:80"]["sessions"], hosts["10.0.0.1:80"]["sessions"]), (3, 0))

    def page(self, **args: str) -> tuple[int, Any]:
        """``GET /api/v1/pools/web/sessions?ARGS``."""
        request: Any = DummyRequest([b"api", b"v1", b"pools", b"web", b"sessions"])
        request.args = {k.encode(): [v.encode()] for k, v in args.items()}
        body = self.resource.render(request)
        return request.responseCode or 200, json.loads(body)

    def test_pages(self) -> None:
        code, page = self.page(limit="2")
        self.assertEqual(code, 200)
        self.assertEqual([s["key"] for s in page["sessions"]], ["s1", "s2"])
        self.assertEqual((page["next"], page["sessions"][0]["host"]), ("s2", "10.0.0.2:80"))
        _, page = self.page(after="s2", limit="2")
        self.assertEqual(([s["key"] for s in page["sessions"]], page["next"]), (["s3"], None))

    def test_bad_limit_and_unknown_names(self) -> None:
        for limit in ("0", "1001", "x"):
            self.assertEqual(self.page(limit=limit)[0], 400, limit)
        self.assertEqual(call_json(self.resource, b"GET", "/api/v1/pools/nope/sessions")[0], 404)
        self.assertEqual(call_json(self.resource, b"DELETE", "/api/v1/pools/web/sessions/nope")[0], 404)

    def test_drop(self) -> None:
        code, doc = call_json(self.resource, b"DELETE", "/api/v1/pools/web/sessions/s1")
        self.assertEqual((code, doc["dropped"]), (200, True))
        self.assertEqual([a.key for a in self.sessions.listing("web")], ["web/s2", "web/s3"])

    def test_without_a_tracker(self) -> None:
        self.assertEqual(call_json(self.f.resource, b"GET", "/api/v1/pools/web/sessions")[0], 404)
