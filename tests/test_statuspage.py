"""The status page as the admin resource serves it, and the latency percentiles
the page shows, against fakes.

The page's behaviour in a browser is tested in ``test_statuspage_browser``;
here: that it is served where and how it should be (without the token, with
a policy that lets exactly its own style and script run), that it is one
self-contained document holding no farm data, and the percentiles of the
state document.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import statuspage
from nlbproxy.metrics import LATENCY_BUCKETS
from tests.test_admin import TOKEN, Fixture, call

PAGE_PATHS = ("/", "/status")


class Parts(HTMLParser):
    """The inline <style> and <script> texts, and every attribute that could
    load something (src, href, action, srcset, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: dict[str, list[str]] = {"style": [], "script": []}
        self.loads: list[tuple[str, str, str | None]] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.inline:
            self._open = tag
            self.inline[tag].append("")
        for name, value in attrs:
            if name in ("src", "href", "action", "srcset", "data", "poster", "formaction") or name.startswith("on"):
                self.loads.append((tag, name, value))
        if tag in ("link", "iframe", "object", "embed", "img", "base"):
            self.loads.append((tag, "", None))

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.inline[self._open][-1] += data


def sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def policy(header: bytes) -> dict[str, list[str]]:
    directives = (d.split() for d in header.decode().split(";"))
    return {d[0]: d[1:] for d in directives if d}


class ServingTests(SynchronousTestCase):
    def test_served_at_root_and_status(self) -> None:
        f = Fixture()
        for path in PAGE_PATHS:
            code, request, body = call(f.resource, b"GET", path)
            self.assertEqual(code, 200, path)
            self.assertEqual(body, statuspage.PAGE)
            headers = request.responseHeaders
            self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"text/html; charset=utf-8"])
            self.assertEqual(headers.getRawHeaders(b"X-Frame-Options"), [b"DENY"])
            self.assertEqual(headers.getRawHeaders(b"X-Content-Type-Options"), [b"nosniff"])
            self.assertEqual(headers.getRawHeaders(b"Cache-Control"), [b"no-store"])
            self.assertEqual(len(headers.getRawHeaders(b"Content-Security-Policy") or []), 1)

    def test_head(self) -> None:
        code, request, body = call(Fixture().resource, b"HEAD", "/status")
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Content-Length"),
                         [b"%d" % len(statuspage.PAGE)])

    def test_served_without_the_token(self) -> None:
        f = Fixture(token=TOKEN)
        for path in PAGE_PATHS:
            code, _, body = call(f.resource, b"GET", path)
            self.assertEqual((code, body), (200, statuspage.PAGE), path)

    def test_only_the_page_is_open(self) -> None:
        # Everything else still wants the token first, whatever its path or method.
        f = Fixture(token=TOKEN)
        for method, path in ((b"GET", "/api/v1/state"), (b"POST", "/"), (b"PUT", "/status"),
                             (b"GET", "/status/"), (b"GET", "/statusx")):
            code, _, body = call(f.resource, method, path)
            self.assertEqual(code, 401, (method, path))
            self.assertEqual(json.loads(body), {"error": "missing or wrong bearer token"})

    def test_wrong_method(self) -> None:
        code, request, _ = call(Fixture().resource, b"POST", "/")
        self.assertEqual(code, 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Allow"), [b"GET, HEAD"])


class PageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.parts = Parts()
        self.parts.feed(statuspage.PAGE.decode("utf-8"))
        self.parts.close()
        self.text = statuspage.PAGE.decode("utf-8")

    def test_policy_allows_exactly_the_inline_style_and_script(self) -> None:
        # A browser runs an inline block only if its hash is listed: the page
        # would silently do nothing if these drifted apart.
        csp = policy(dict(statuspage.HEADERS)[b"Content-Security-Policy"])
        [script] = self.parts.inline["script"]
        [style] = self.parts.inline["style"]
        self.assertEqual(csp["script-src"], [sha256(script)])
        self.assertEqual(csp["style-src"], [sha256(style)])
        self.assertEqual(csp["default-src"], ["'none'"])
        self.assertEqual(csp["connect-src"], ["'self'"])
        self.assertEqual(csp["frame-ancestors"], ["'none'"])
        self.assertNotIn("'unsafe-inline'", str(csp))
        self.assertNotIn("'unsafe-eval'", str(csp))

    def test_self_contained(self) -> None:
        self.assertEqual(self.parts.loads, [])
        self.assertIsNone(re.search(r"\b(?:https?|wss?|ftp)://", self.text))
        self.assertNotIn("@import", self.text)
        self.assertNotIn("url(", self.text)

    def test_data_only_through_text(self) -> None:
        [script] = self.parts.inline["script"]
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "new Function", "setTimeout(\""):
            self.assertNotIn(sink, script)
        self.assertIn("textContent", script)

    def test_holds_no_farm_data(self) -> None:
        # The page is a constant built without any farm: the same bytes for
        # every unit, so serving it without the token gives nothing away.
        f = Fixture(token=TOKEN)
        _, _, body = call(f.resource, b"GET", "/")
        self.assertEqual(body, statuspage.PAGE)
        for host in f.farm.pools["web"].hosts:
            self.assertNotIn(host.key.encode(), body)
        self.assertNotIn(b"unit-a", body)
        self.assertNotIn(TOKEN.encode(), body)

    def test_polls_the_state_and_puts_directives(self) -> None:
        [script] = self.parts.inline["script"]
        self.assertIn('"/api/v1/state"', script)
        self.assertIn("/directive`", script)
        self.assertIn(f"const POLL_MS = {int(statuspage.POLL_SECONDS * 1000)};", script)
        self.assertTrue(1 <= statuspage.POLL_SECONDS <= 2)


class PercentileTests(SynchronousTestCase):
    def latency(self, fixture: Fixture, host: str = "10.0.0.1:80") -> dict[str, object]:
        code, _, body = call(fixture.resource, b"GET", "/api/v1/state")
        self.assertEqual(code, 200)
        result: dict[str, object] = json.loads(body)["pools"]["web"]["hosts"][host]["latency"]
        return result

    def test_none_before_the_first_response(self) -> None:
        self.assertEqual(self.latency(Fixture()), {"count": 0, "p50": None, "p90": None, "p99": None})

    def test_bucket_bounds(self) -> None:
        f = Fixture()
        stats = f.host("10.0.0.1:80").stats
        for _ in range(50):
            stats.latency.observe(0.0003)   # <= 0.5 ms
        for _ in range(45):
            stats.latency.observe(0.02)     # <= 25 ms
        for _ in range(4):
            stats.latency.observe(0.3)      # <= 0.5 s
        stats.latency.observe(3.0)          # <= 5 s
        self.assertEqual(self.latency(f), {"count": 100, "p50": 0.0005, "p90": 0.025, "p99": 0.5})
        self.assertEqual(self.latency(f, "10.0.0.2:80")["count"], 0)

    def test_above_the_largest_bucket_is_null(self) -> None:
        # JSON has no infinity; the page shows "> 10 s" for null with a count.
        f = Fixture()
        stats = f.host("10.0.0.1:80").stats
        stats.latency.observe(0.001)
        for _ in range(9):
            stats.latency.observe(LATENCY_BUCKETS[-1] * 2)
        code, _, body = call(f.resource, b"GET", "/api/v1/state")
        self.assertNotIn(b"Infinity", body)
        self.assertEqual(self.latency(f), {"count": 10, "p50": None, "p90": None, "p99": None})
