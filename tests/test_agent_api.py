"""The host agent's local HTTP API (a contract): the resource against a real
table with a recording ``publish``, the real Site over an in-memory
transport, and one exchange over loopback with Twisted's HTTP client.

The ``SynchronousTestCase`` classes run under trial and pytest alike; the last
test needs the real reactor and runs under pytest-twisted only.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from nlbproxy.agent.api import (
    MAX_API_BODY,
    MAX_REQUEST_BODY,
    AgentApi,
    ApiRequest,
    make_api_site,
    parse_directive,
    parse_report,
)
from nlbproxy.health.messages import Directive, Health, RowChange, RowKey
from nlbproxy.health.table import AppSpec, HealthTable, Source
from tests.test_admin import exchange, header

WEB1 = RowKey("web", "10.0.0.7:8080")
WEB2 = RowKey("web", "10.0.0.7:8081")
API = RowKey("api", "[2001:db8::7]:9000")


class Fixture:
    def __init__(self) -> None:
        self.clock = Clock()
        self.table = HealthTable([AppSpec(WEB1, 40), AppSpec(WEB2, 60), AppSpec(API, 10, checked=True)], self.clock)
        self.published: list[RowChange] = []
        self.resource = AgentApi(self.table, self.published.extend, "host-7")

    def call(self, method: bytes, path: str, body: bytes = b"") -> tuple[int, Any]:
        request: Any = DummyRequest([segment.encode() for segment in path.lstrip("/").split("/")])
        request.method = method
        request.content = BytesIO(body)
        result = self.resource.render(request)
        assert result is not NOT_DONE_YET
        assert request.responseHeaders.getRawHeaders(b"Content-Type") == [b"application/json"]
        return request.responseCode or 200, json.loads(result)


class ReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture()

    def test_health_down_reaches_publish_for_every_endpoint(self) -> None:
        code, doc = self.f.call(b"PUT", "/v1/apps/web", b'{"health": "down", "reason": "oom"}')
        self.assertEqual(code, 200)
        self.assertEqual(doc["app"], "web")
        self.assertEqual([(r["endpoint"], r["health"], r["reason"]) for r in doc["rows"]],
                         [("10.0.0.7:8080", "down", "app down: oom"), ("10.0.0.7:8081", "down", "app down: oom")])
        (change,) = self.f.published
        self.assertEqual({op.key for op in change.ops}, {WEB1, WEB2})
        self.assertEqual(self.f.table.row(WEB1).health, Health.DOWN)

    def test_load_is_published_at_once(self) -> None:
        code, doc = self.f.call(b"PUT", "/v1/apps/web", b'{"load": 42.4}')
        self.assertEqual(code, 200)
        self.assertEqual(len(self.f.published), 1)
        self.assertEqual(doc["rows"][0]["sources"]["app"]["load"], 42)
        self.assertEqual(self.f.table.row(WEB1).load, 42)
        self.assertEqual(self.f.table.sample_load(None), [])
        self.assertEqual(self.f.table.row(WEB1).load, 42)

    def test_app_directive_and_its_withdrawal(self) -> None:
        code, doc = self.f.call(b"PUT", "/v1/apps/web", b'{"directive": "draining", "reason": "restart"}')
        self.assertEqual(code, 200)
        row = doc["rows"][0]
        self.assertEqual((row["target"], row["current"], row["directive_source"], row["directive_reason"]),
                         ("draining", "active", "app", "restart"))
        self.f.call(b"PUT", "/v1/apps/web", b'{"directive": null}')
        self.assertEqual(self.f.table.row(WEB1).target, Directive.ACTIVE)

    def test_bad_reports(self) -> None:
        for body in (b"", b"{", b"[]", b'{"health": "sick"}', b'{"load": 101}', b'{"load": -1}',
                     b'{"load": true}', b'{"load": "5"}', b"{}", b'{"reason": "x"}', b'{"helth": "up"}',
                     b'{"directive": "off"}', b'{"health": "up", "reason": 5}', b"\xff"):
            with self.subTest(body=body):
                code, doc = self.f.call(b"PUT", "/v1/apps/web", body)
                self.assertEqual(code, 400)
                self.assertIsInstance(doc["error"], str)
        self.assertEqual(self.f.published, [])

    def test_unknown_app_is_404_before_the_body_is_judged(self) -> None:
        code, doc = self.f.call(b"PUT", "/v1/apps/nope", b"junk")
        self.assertEqual((code, doc), (404, {"error": "no app nope"}))


class DirectiveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture()

    def test_bodies(self) -> None:
        for body, expected in ((b"draining\n", Directive.DRAINING), (b' "inactive" ', Directive.INACTIVE),
                               (b'{"directive": "active", "reason": "back"}', Directive.ACTIVE)):
            with self.subTest(body=body):
                code, doc = self.f.call(b"PUT", "/v1/apps/web/directive", body)
                self.assertEqual(code, 200)
                self.assertEqual(doc["rows"][1]["target"], expected.word)
                self.assertEqual(doc["rows"][1]["directive_source"], "operator")
        self.assertEqual(self.f.table.detail(WEB2).directive_reason, "back")

    def test_operator_wins_and_delete_hands_back(self) -> None:
        self.f.published.extend(self.f.table.set_directive("web", Source.APP, Directive.INACTIVE))
        self.f.call(b"PUT", "/v1/apps/web/directive", b"active")
        self.assertEqual(self.f.table.row(WEB1).target, Directive.ACTIVE)
        code, doc = self.f.call(b"DELETE", "/v1/apps/web/directive")
        self.assertEqual(code, 200)
        self.assertEqual((doc["rows"][0]["target"], doc["rows"][0]["directive_source"]), ("inactive", "app"))
        code, doc = self.f.call(b"PUT", "/v1/apps/web/directive", b'{"directive": null}')
        self.assertEqual(code, 200)

    def test_bad_directives(self) -> None:
        for body in (b"drain", b"", b'"act', b"[1]", b'{"reason": "x"}', b'{"directive": 1}',
                     b'{"directive": "active", "by": "me"}', b"\xff"):
            with self.subTest(body=body):
                code, _ = self.f.call(b"PUT", "/v1/apps/web/directive", body)
                self.assertEqual(code, 400)
        self.assertEqual(self.f.published, [])

    def test_parse_directive(self) -> None:
        self.assertEqual(parse_directive(b" draining "), (Directive.DRAINING, ""))
        self.assertEqual(parse_directive(b'{"directive": "inactive", "reason": " why "}'), (Directive.INACTIVE, "why"))

    def test_parse_report(self) -> None:
        report = parse_report(b'{"health": "up", "load": 7}')
        self.assertEqual((report.health, report.load, report.sets_directive), (Health.UP, 7, False))


class TableTests(SynchronousTestCase):
    def test_table_document(self) -> None:
        f = Fixture()
        f.call(b"PUT", "/v1/apps/api/directive", b'{"directive": "draining", "reason": "deploy"}')
        code, doc = f.call(b"GET", "/v1/table")
        self.assertEqual(code, 200)
        self.assertEqual((doc["agent"], doc["generation"], doc["checksum"]),
                         ("host-7", f.table.generation, f.table.checksum()))
        self.assertEqual([(r["app"], r["endpoint"]) for r in doc["rows"]],
                         [("web", "10.0.0.7:8080"), ("web", "10.0.0.7:8081"), ("api", "[2001:db8::7]:9000")])
        self.assertEqual(doc["rows"][2], {
            "app": "api", "endpoint": "[2001:db8::7]:9000", "health": "down", "health_reason": "check pending",
            "load": 0, "capacity": 10, "target": "draining", "current": "active",
            "reason": "check pending; draining by operator: deploy",
            "directive_source": "operator", "directive_reason": "deploy",
            "load_source": None, "smoothed_load": None,
            "sources": {
                "app": {"health": None, "reason": "", "load": None, "load_age": None},
                "check": {"up": None, "reason": ""},
                "directives": {"operator": {"directive": "draining", "reason": "deploy"}},
            },
        })
        code, doc = f.call(b"GET", "/v1/apps/web")
        self.assertEqual((code, len(doc["rows"])), (200, 2))

    def test_paths_and_methods(self) -> None:
        f = Fixture()
        self.assertEqual(f.call(b"GET", "/v1/nope")[0], 404)
        self.assertEqual(f.call(b"GET", "/v1/apps/web/directive/x")[0], 404)
        self.assertEqual(f.call(b"POST", "/v1/table")[0], 405)
        self.assertEqual(f.call(b"GET", "/v1/apps/web/directive")[0], 405)


class HandoffTests(SynchronousTestCase):
    def test_handoff_counters(self) -> None:
        from collections import Counter

        f = Fixture()
        self.assertEqual(f.call(b"GET", "/v1/handoff")[0], 404)  # the agent takes no handoffs

        class Receiver:
            bridges = {object(), object()}
            held = 1
            stats = Counter(restored=3, bridged=2, no_app=1)
            tunnel = None  # no tunnel_interface

        f.resource = AgentApi(f.table, f.published.extend, "host-7", handoff=Receiver())
        self.assertEqual(f.call(b"GET", "/v1/handoff"), (200, {
            "agent": "host-7", "bridges": 2, "held": 1, "stats": {"restored": 3, "bridged": 2, "no_app": 1},
            "tunnel": None}))
        self.assertEqual(f.call(b"POST", "/v1/handoff")[0], 405)


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture()
        self.site = make_api_site(self.f.table, self.f.published.extend, "host-7", self.f.clock)

    def test_put_over_http(self) -> None:
        body = b'{"health": "down"}'
        [(response, answer)] = exchange(
            self.site,
            b"PUT /v1/apps/web HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        self.assertEqual(response.status_code, 200)
        self.assertEqual(header(response, b"Content-Type"), b"application/json")
        self.assertEqual(json.loads(answer)["rows"][0]["health"], "down")

    def test_body_over_the_limit_is_413(self) -> None:
        body = b" " * (MAX_API_BODY + 1)
        [(response, answer)] = exchange(
            self.site, b"PUT /v1/apps/web HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(response.status_code, 413)
        self.assertIn("error", json.loads(answer))

    def test_allow_header_on_405(self) -> None:
        [(response, _)] = exchange(self.site, b"DELETE /v1/table HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual((response.status_code, header(response, b"Allow")), (405, b"GET, HEAD"))

    def test_our_bug_is_a_logged_json_500(self) -> None:
        def broken(changes: list[RowChange]) -> None:
            raise RuntimeError("bug")

        site = make_api_site(self.f.table, broken, "host-7", self.f.clock)
        [(response, answer)] = exchange(
            site, b"PUT /v1/apps/web HTTP/1.1\r\nHost: a\r\nContent-Length: 18\r\n\r\n{\"health\": \"down\"}"
        )
        self.assertEqual(response.status_code, 500)
        self.assertEqual(json.loads(answer), {"error": "internal error"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_request_keeps_at_most_the_limit(self) -> None:
        # One limit for every route, the largest (the session routes' bulk
        # lists): the path is not known while the body arrives.
        self.assertGreaterEqual(MAX_REQUEST_BODY, MAX_API_BODY)
        request = ApiRequest(DummyChannel())
        request.gotLength(10 * MAX_REQUEST_BODY)
        for _ in range(20):
            request.handleContentChunk(b"y" * (MAX_REQUEST_BODY // 8))
        self.assertEqual(cast(BytesIO, request.content).tell(), MAX_REQUEST_BODY + 1)


@pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_loopback_with_agent():
    """Report health and set a directive through Twisted's HTTP client."""
    from twisted.internet import reactor
    from twisted.web.client import Agent, FileBodyProducer, readBody

    table = HealthTable([AppSpec(WEB1), AppSpec(API)], reactor)
    published: list[RowChange] = []
    port: Any = reactor.listenTCP(0, make_api_site(table, published.extend, "host-7", reactor),  # type: ignore[arg-type]
                                  interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}".encode()
        agent = Agent(reactor)
        response = yield agent.request(b"PUT", base + b"/v1/apps/web", None,
                                       FileBodyProducer(BytesIO(b'{"health": "down", "load": 30}')))
        answer = json.loads((yield readBody(response)))
        assert response.code == 200
        assert answer["rows"][0]["health"] == "down"
        assert published and table.row(WEB1).health == Health.DOWN

        response = yield agent.request(b"PUT", base + b"/v1/apps/web/directive", None,
                                       FileBodyProducer(BytesIO(b"draining")))
        yield readBody(response)
        assert response.code == 200
        assert table.row(WEB1).target == Directive.DRAINING

        response = yield agent.request(b"GET", base + b"/v1/table")
        document = json.loads((yield readBody(response)))
        assert [row["target"] for row in document["rows"]] == ["draining", "active"]
    finally:
        yield port.stopListening()
