"""The response cache (``nlbproxy.cache``): RFC 9111 rules, bounds and purges,
with a fake clock; then its use by the router, scripted against the fakes of
:mod:`tests.fakes`."""

from __future__ import annotations

from email.utils import formatdate
from io import StringIO
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import limits
from nlbproxy.cache import Hit, ResponseCache, http_date, parse_cache_control, pool_caches
from nlbproxy.config import CacheConfig, ConfigError, DenyConfig, RateLimitConfig, RouteConfig, parse_config
from nlbproxy.ctl import main as nlbctl
from nlbproxy.filtering import RequestFilter
from nlbproxy.routing import Decision, MaybeDecision, RequestView, Rule
from tests.fakes import Client, Harness, parse_message, pool, route
from tests.test_admin import Fixture, call, call_json
from tests.test_metrics import parse_exposition

Field = tuple[bytes, bytes, bytes]


def fields(*pairs: tuple[bytes, bytes]) -> list[Field]:
    return [(name, name.lower(), value) for name, value in pairs]


def make_cache(max_bytes: int = 1 << 20, max_object_bytes: int = 1 << 16, default_ttl: float = 0.0,
               ) -> tuple[ResponseCache, Clock]:
    clock = Clock()
    clock.advance(1_000_000)
    return ResponseCache("app", CacheConfig(max_bytes, max_object_bytes, default_ttl), clock), clock


def store(cache: ResponseCache, target: bytes, response: list[Field], body: bytes = b"body",
          request: list[Field] | None = None, status: int = 200) -> bool:
    """One GET of ``target`` that missed and whose response came whole; True if kept."""
    req = cache.request(b"GET", target, request or fields((b"Host", b"a")), False)
    assert req is not None
    filling = req.admit(status, b"OK", response, cache.clock.seconds())
    if filling is None:
        return False
    filling.add(body)
    return filling.finish()


def get(cache: ResponseCache, target: bytes, request: list[Field] | None = None, method: bytes = b"GET",
        ) -> Hit | None:
    req = cache.request(method, target, request or fields((b"Host", b"a")), False)
    return None if req is None else req.get()


MAX_AGE_60 = fields((b"Cache-Control", b"max-age=60"))


class ParsingTests(SynchronousTestCase):
    def test_cache_control(self) -> None:
        self.assertEqual(
            parse_cache_control(fields((b"Cache-Control", b'Max-Age=5, no-cache="set-cookie, x", public'),
                                       (b"Cache-Control", b"max-age=9, private"))),
            {b"max-age": b"5", b"no-cache": b"set-cookie, x", b"public": None, b"private": None},
        )

    def test_http_date(self) -> None:
        self.assertEqual(http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"), 784111777.0)
        self.assertIsNone(http_date(b"0"))
        self.assertIsNone(http_date(b"yesterday"))


class StoreTests(SynchronousTestCase):
    def test_max_age_hit_with_age_then_stale(self) -> None:
        cache, clock = make_cache()
        self.assertIsNone(get(cache, b"/x"))
        self.assertTrue(store(cache, b"/x", MAX_AGE_60 + fields((b"Content-Length", b"4"))))
        clock.advance(10)
        hit = get(cache, b"/x")
        assert hit is not None
        self.assertEqual((hit.status, hit.body), (200, b"body"))
        self.assertEqual(hit.headers, MAX_AGE_60 + fields((b"content-length", b"4"), (b"age", b"10")))
        clock.advance(50)
        self.assertIsNone(get(cache, b"/x"))
        self.assertEqual(len(cache), 0)  # a stale entry goes at once
        self.assertEqual((cache.stats.hits, cache.stats.misses, cache.stats.stores), (1, 2, 1))

    def test_head_is_served_from_get(self) -> None:
        cache, _ = make_cache()
        store(cache, b"/x", MAX_AGE_60)
        req = cache.request(b"HEAD", b"/x", fields((b"Host", b"a")), False)
        assert req is not None
        self.assertTrue(req.head)
        self.assertIsNotNone(req.get())
        # A HEAD response is not stored.
        self.assertIsNone(req.admit(200, b"OK", MAX_AGE_60, 0.0))

    def test_host_is_part_of_the_key(self) -> None:
        cache, _ = make_cache()
        store(cache, b"/x", MAX_AGE_60)
        self.assertIsNone(get(cache, b"/x", fields((b"Host", b"b"))))
        self.assertIsNotNone(get(cache, b"/x", fields((b"Host", b"A"))))
        self.assertIsNone(get(cache, b"/x?q"))

    def test_freshness_sources(self) -> None:
        cache, clock = make_cache()
        now = clock.seconds()
        date = formatdate(now, usegmt=True).encode()
        cases = {
            b"/smaxage": fields((b"Cache-Control", b"max-age=1, s-maxage=100")),
            b"/expires": fields((b"Date", date), (b"Expires", formatdate(now + 100, usegmt=True).encode())),
        }
        for target, headers in cases.items():
            self.assertTrue(store(cache, target, headers), target)
        clock.advance(50)
        for target in cases:
            self.assertIsNotNone(get(cache, target), target)

    def test_not_stored(self) -> None:
        cache, clock = make_cache()
        date = formatdate(clock.seconds(), usegmt=True).encode()
        cases = [
            fields(),  # no explicit freshness, no default_ttl
            fields((b"Cache-Control", b"no-store, max-age=60")),
            fields((b"Cache-Control", b"private, max-age=60")),
            fields((b"Cache-Control", b"no-cache, max-age=60")),
            fields((b"Cache-Control", b"max-age=0")),
            fields((b"Cache-Control", b"max-age=abc")),
            fields((b"Cache-Control", b"max-age=60"), (b"Set-Cookie", b"a=b")),
            fields((b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept, *")),
            fields((b"Date", date), (b"Expires", b"0")),
            fields((b"Date", date), (b"Expires", date)),
            fields((b"Cache-Control", b"max-age=60"), (b"Age", b"60")),
        ]
        for headers in cases:
            self.assertFalse(store(cache, b"/x", headers), headers)
        self.assertFalse(store(cache, b"/x", MAX_AGE_60, status=206))
        self.assertFalse(store(cache, b"/x", MAX_AGE_60, status=500))
        self.assertEqual(len(cache), 0)

    def test_statuses_with_explicit_freshness(self) -> None:
        cache, _ = make_cache()
        for status in (200, 203, 204, 300, 301, 308, 404, 410):
            self.assertTrue(store(cache, b"/%d" % status, MAX_AGE_60, status=status, body=b""), status)
        hit = get(cache, b"/204")
        assert hit is not None
        self.assertNotIn(b"content-length", [name for _, name, _ in hit.headers])

    def test_default_ttl_is_heuristic_freshness(self) -> None:
        cache, clock = make_cache(default_ttl=5)
        self.assertTrue(store(cache, b"/x", fields()))
        self.assertFalse(store(cache, b"/y", fields(), status=302))  # not heuristically cacheable
        clock.advance(4)
        self.assertIsNotNone(get(cache, b"/x"))
        clock.advance(1)
        self.assertIsNone(get(cache, b"/x"))

    def test_age_from_upstream_and_response_delay(self) -> None:
        cache, clock = make_cache()
        req = cache.request(b"GET", b"/x", fields((b"Host", b"a")), False)
        assert req is not None
        sent = clock.seconds()
        clock.advance(2)  # the host took 2 s
        filling = req.admit(200, b"OK", fields((b"Cache-Control", b"max-age=60"), (b"Age", b"10")), sent)
        assert filling is not None
        filling.finish()
        hit = get(cache, b"/x")
        assert hit is not None
        self.assertEqual(hit.headers[-1], (b"age", b"age", b"12"))
        clock.advance(48)
        self.assertIsNone(get(cache, b"/x"))


class RequestDirectiveTests(SynchronousTestCase):
    def test_request_no_store_no_cache_and_max_age(self) -> None:
        cache, clock = make_cache()
        store(cache, b"/x", MAX_AGE_60)
        self.assertIsNone(cache.request(b"GET", b"/x", fields((b"Cache-Control", b"no-store")), False))
        req = cache.request(b"GET", b"/x", fields((b"Host", b"a"), (b"Cache-Control", b"no-cache")), False)
        assert req is not None
        self.assertIsNone(req.get())
        self.assertTrue(req.store)
        self.assertIsNone(get(cache, b"/x", fields((b"Host", b"a"), (b"Pragma", b"no-cache"))))
        clock.advance(10)
        self.assertIsNone(get(cache, b"/x", fields((b"Host", b"a"), (b"Cache-Control", b"max-age=5"))))
        self.assertIsNotNone(get(cache, b"/x", fields((b"Host", b"a"), (b"Cache-Control", b"max-age=20"))))
        self.assertIsNone(get(cache, b"/x", fields((b"Host", b"a"), (b"Cache-Control", b"min-fresh=55"))))

    def test_conditional_and_range_requests_go_to_the_host(self) -> None:
        cache, _ = make_cache()
        store(cache, b"/x", MAX_AGE_60)
        self.assertIsNone(get(cache, b"/x", fields((b"Host", b"a"), (b"If-None-Match", b'"e"'))))
        req = cache.request(b"GET", b"/x", fields((b"Host", b"a"), (b"Range", b"bytes=0-1")), False)
        assert req is not None
        self.assertIsNone(req.get())
        self.assertFalse(req.store)

    def test_bodies_and_other_methods(self) -> None:
        cache, _ = make_cache()
        self.assertIsNone(cache.request(b"GET", b"/x", fields(), True))
        self.assertIsNone(cache.request(b"OPTIONS", b"/x", fields(), False))

    def test_authorization(self) -> None:
        cache, _ = make_cache()
        auth = fields((b"Host", b"a"), (b"Authorization", b"Basic eDp5"))
        self.assertFalse(store(cache, b"/private", MAX_AGE_60, request=auth))
        self.assertTrue(store(cache, b"/public", fields((b"Cache-Control", b"public, max-age=60")), request=auth))
        self.assertTrue(store(cache, b"/shared", fields((b"Cache-Control", b"s-maxage=60")), request=auth))
        self.assertIsNotNone(get(cache, b"/public", auth))
        # An entry stored from an anonymous request is not for authorized ones.
        store(cache, b"/anon", MAX_AGE_60)
        self.assertIsNone(get(cache, b"/anon", auth))
        self.assertIsNotNone(get(cache, b"/anon"))

    def test_unsafe_method_invalidates_on_success_only(self) -> None:
        cache, _ = make_cache()
        store(cache, b"/x", MAX_AGE_60)
        req = cache.request(b"POST", b"/x", fields((b"Host", b"a")), True)
        assert req is not None
        self.assertIsNone(req.get())
        self.assertIsNone(req.admit(500, b"", fields(), 0.0))
        self.assertEqual(len(cache), 1)
        self.assertIsNone(req.admit(200, b"", MAX_AGE_60, 0.0))
        self.assertEqual(len(cache), 0)
        self.assertEqual(cache.stats.purged, 1)


class VaryTests(SynchronousTestCase):
    def test_variants(self) -> None:
        cache, _ = make_cache()
        vary = MAX_AGE_60 + fields((b"Vary", b"Accept-Language"))
        en = fields((b"Host", b"a"), (b"Accept-Language", b"en"))
        fr = fields((b"Host", b"a"), (b"Accept-Language", b"fr"))
        store(cache, b"/x", vary, b"hello", request=en)
        self.assertIsNone(get(cache, b"/x", fr))
        self.assertIsNone(get(cache, b"/x"))  # no header is a value of its own
        store(cache, b"/x", vary, b"bonjour", request=fr)
        self.assertEqual(get(cache, b"/x", en).body, b"hello")  # type: ignore[union-attr]
        self.assertEqual(get(cache, b"/x", fr).body, b"bonjour")  # type: ignore[union-attr]
        # A new response for the same variant replaces the old one.
        store(cache, b"/x", vary, b"hi", request=en)
        self.assertEqual(get(cache, b"/x", en).body, b"hi")  # type: ignore[union-attr]
        self.assertEqual(len(cache), 2)

    def test_variants_per_url_are_bounded(self) -> None:
        cache, _ = make_cache()
        vary = MAX_AGE_60 + fields((b"Vary", b"X-V"))
        for i in range(limits.CACHE_MAX_VARIANTS + 5):
            store(cache, b"/x", vary, request=fields((b"Host", b"a"), (b"X-V", b"%d" % i)))
        self.assertEqual(len(cache), limits.CACHE_MAX_VARIANTS)
        self.assertIsNone(get(cache, b"/x", fields((b"Host", b"a"), (b"X-V", b"0"))))
        self.assertIsNotNone(get(cache, b"/x", fields((b"Host", b"a"), (b"X-V", b"20"))))


class BoundTests(SynchronousTestCase):
    def test_too_big_by_length_or_stream(self) -> None:
        cache, _ = make_cache(max_object_bytes=10)
        self.assertFalse(store(cache, b"/a", MAX_AGE_60 + fields((b"Content-Length", b"11")), b"x" * 11))
        req = cache.request(b"GET", b"/b", fields((b"Host", b"a")), False)
        assert req is not None
        filling = req.admit(200, b"OK", MAX_AGE_60, cache.clock.seconds())
        assert filling is not None
        self.assertTrue(filling.add(b"x" * 6))
        self.assertFalse(filling.add(b"x" * 6))
        self.assertEqual(filling.chunks, [])  # nothing held past the limit
        self.assertEqual(cache.stats.too_big, 2)

    def test_lru_by_bytes(self) -> None:
        entry = limits.CACHE_ENTRY_OVERHEAD + 1000 + len(b"a/0") + len(b"Cache-Controlmax-age=60") + 4
        cache, _ = make_cache(max_bytes=3 * entry, max_object_bytes=1000)
        for i in range(3):
            self.assertTrue(store(cache, b"/%d" % i, MAX_AGE_60, b"x" * 1000))
        self.assertEqual(cache.stats.bytes, 3 * entry)
        self.assertIsNotNone(get(cache, b"/0"))  # /1 is now the least recently used
        store(cache, b"/3", MAX_AGE_60, b"x" * 1000)
        self.assertIsNone(get(cache, b"/1"))
        self.assertIsNotNone(get(cache, b"/0"))
        self.assertEqual((len(cache), cache.stats.evictions), (3, 1))

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3000)), max_size=60))
    def test_never_over_max_bytes(self, ops: list[tuple[int, int]]) -> None:
        cache, _ = make_cache(max_bytes=8000, max_object_bytes=3000)
        for key, size in ops:
            store(cache, b"/%d" % key, MAX_AGE_60, b"x" * size)
            self.assertLessEqual(cache.stats.bytes, 8000)
            self.assertEqual(cache.stats.entries, len(cache))
        total = sum(e.size for e in cache._lru)
        self.assertEqual(total, cache.stats.bytes)


class PurgeTests(SynchronousTestCase):
    def test_purge_by_prefix_on_every_host(self) -> None:
        cache, _ = make_cache()
        for host in (b"a", b"b"):
            for target in (b"/static/a.css", b"/static/b.js?v=1", b"/index.html"):
                store(cache, target, MAX_AGE_60, request=fields((b"Host", host)))
        self.assertEqual(cache.purge(b"/static/"), 4)
        self.assertEqual(len(cache), 2)
        self.assertEqual(cache.purge(b"/"), 2)
        self.assertEqual(cache.stats.bytes, 0)

    def test_purge_during_a_fill_keeps_nothing(self) -> None:
        cache, _ = make_cache()
        req = cache.request(b"GET", b"/x", fields((b"Host", b"a")), False)
        assert req is not None
        filling = req.admit(200, b"OK", MAX_AGE_60, cache.clock.seconds())
        assert filling is not None
        filling.add(b"old")
        cache.purge(b"/x")
        self.assertFalse(filling.finish())
        self.assertIsNone(get(cache, b"/x"))


class ConfigTests(SynchronousTestCase):
    def parse(self, cache: object) -> object:
        return parse_config({
            "listener": [{"name": "web", "endpoint": "tcp:0", "pool": "app"}],
            "pool": {"app": {"hosts": ["127.0.0.1:1"], "cache": cache}},
        }, "unit.toml")

    def test_defaults_and_keys(self) -> None:
        config = self.parse({})
        self.assertEqual(config.pools["app"].cache, CacheConfig())  # type: ignore[attr-defined]
        config = self.parse({"max_bytes": 1000, "max_object_bytes": 100, "default_ttl": 2})
        self.assertEqual(config.pools["app"].cache, CacheConfig(1000, 100, 2.0))  # type: ignore[attr-defined]
        self.assertEqual(list(pool_caches(config.pools.values(), Clock())), ["app"])  # type: ignore[attr-defined]

    def test_errors(self) -> None:
        for cache, message in (
            ({"max_bytes": 10, "max_object_bytes": 11}, "pool.app.cache.max_object_bytes: must not exceed max_bytes"),
            ({"max_bytes": 0}, "pool.app.cache.max_bytes: must be >= 1"),
            ({"ttl": 1}, "pool.app.cache.ttl: unknown key"),
            ({"default_ttl": -1}, "pool.app.cache.default_ttl: must be finite and >= 0"),
        ):
            with self.assertRaises(ConfigError) as caught:
                self.parse(cache)
            self.assertIn(message, str(caught.exception))


# -- the router ------------------------------------------------------------------
def _pool_caches(h: Harness) -> None:
    h.listener.caches = pool_caches([p.config for p in h.farm.pools.values()], h.reactor)


def request(target: bytes = b"/x", method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


def response(body: bytes = b"hello", extra: bytes = b"Cache-Control: max-age=60\r\n") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body


def miss(h: Harness, c: Client, req: bytes = request(), resp: bytes = response()) -> bytes:
    """``req`` goes to the host, which answers ``resp``; what the client got."""
    c.send(req)
    b = h.next_backend()
    b.received()
    b.send(resp)
    return c.received()


class RouterTests(SynchronousTestCase):
    def harness(self, **options: object) -> Harness:
        h = Harness(pools=[pool("web", "10.0.0.1:8080", cache=CacheConfig(**options))])  # type: ignore[arg-type]
        _pool_caches(h)
        return h

    def test_second_get_from_cache_without_a_host(self) -> None:
        h = self.harness()
        c = h.client()
        status, headers, body = parse_message(miss(h, c))
        self.assertEqual((status, body), (200, b"hello"))
        self.assertNotIn(b"age", headers)
        h.advance(7)
        c.send(request())
        self.assertEqual(h.attempts(), [])
        self.assertEqual([b.transport.value() for b in h.backends], [b""])
        status, headers, body = parse_message(c.received())
        self.assertEqual((status, body), (200, b"hello"))
        self.assertEqual(headers[b"age"], [b"7"])
        self.assertEqual(headers[b"content-length"], [b"5"])
        self.assertEqual(headers[b"via"], [b"1.1 unit1"])
        self.assertFalse(c.closed)
        # Keep-alive goes on: a third request on the same connection is a hit too.
        c.send(request())
        self.assertEqual(parse_message(c.received())[2], b"hello")
        self.assertEqual(h.access_log, [(b"GET", b"/x", 200)] * 3)
        self.assertEqual(h.host("10.0.0.1:8080").stats.requests, 1)
        stats = h.listener.caches["web"].stats
        self.assertEqual((stats.hits, stats.misses, stats.stores), (2, 1, 1))

    def test_head_hit_has_headers_and_no_body(self) -> None:
        h = self.harness()
        c = h.client()
        miss(h, c)
        c.send(request(method=b"HEAD") + request(b"/x"))  # pipelined: HEAD then GET
        data = c.received()
        head_end = data.index(b"\r\n\r\n") + 4
        status, headers, body = parse_message(data[:head_end], method=b"HEAD")
        self.assertEqual((status, headers[b"content-length"], body), (200, [b"5"], b""))
        self.assertEqual(parse_message(data[head_end:])[2], b"hello")
        self.assertEqual(h.attempts(), [])

    def test_chunked_response_is_stored_and_served_with_length(self) -> None:
        h = self.harness()
        c = h.client()
        miss(h, c, resp=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=9\r\n\r\n"
                             b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        c.send(request())
        status, headers, body = parse_message(c.received())
        self.assertEqual((body, headers[b"content-length"]), (b"abcde", [b"5"]))
        self.assertNotIn(b"transfer-encoding", headers)

    def test_too_big_streams_through_and_is_not_kept(self) -> None:
        h = self.harness(max_bytes=1000, max_object_bytes=10)
        c = h.client()
        c.send(request())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=9\r\n\r\n")
        b.send(b"8\r\n12345678\r\n")
        self.assertIn(b"12345678", c.received())  # streamed at once, not held
        b.send(b"8\r\n12345678\r\n0\r\n\r\n")
        c.received()
        self.assertEqual(len(h.listener.caches["web"]), 0)
        c.send(request())
        self.assertNotEqual(b.received(), b"")

    def test_vary_and_no_store(self) -> None:
        h = self.harness()
        c = h.client()
        vary = response(b"en", b"Cache-Control: max-age=60\r\nVary: Accept-Language\r\n")
        miss(h, c, request(extra=b"Accept-Language: en\r\n"), vary)
        c.send(request(extra=b"Accept-Language: fr\r\n"))
        b = h.backends[0]
        self.assertTrue(b.received().startswith(b"GET /x"))  # a miss: another variant
        b.send(response(b"fr", b"Cache-Control: max-age=60\r\nVary: Accept-Language\r\n"))
        c.received()
        c.send(request(extra=b"Accept-Language: en\r\n"))
        self.assertEqual(parse_message(c.received())[2], b"en")
        miss(h, c, request(b"/n"), response(b"n", b"Cache-Control: no-store\r\n"))
        c.send(request(b"/n"))
        self.assertTrue(b.received().startswith(b"GET /n"))

    def test_affinity_cookie_and_connection_close_are_not_stored(self) -> None:
        h = Harness(pools=[pool("web", "10.0.0.1:8080", cache=CacheConfig(), affinity="cookie")],
                    max_requests_per_connection=2)
        _pool_caches(h)
        c = h.client()
        _, headers, _ = parse_message(miss(h, c))
        self.assertIn(b"set-cookie", headers)
        c.send(request())  # the connection's last request, served from the cache
        _, headers, body = parse_message(c.received())
        self.assertEqual(body, b"hello")
        self.assertNotIn(b"set-cookie", headers)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(c.closed)
        other = h.client()
        other.send(request())
        self.assertNotIn(b"connection", parse_message(other.received())[1])

    def test_post_invalidates(self) -> None:
        h = self.harness()
        c = h.client()
        miss(h, c)
        miss(h, c, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nz", response(b"done", b""))
        self.assertEqual(len(h.listener.caches["web"]), 0)
        c.send(request())
        self.assertTrue(h.backends[0].received().startswith(b"GET /x"))

    def test_purge_sends_the_next_request_to_the_host(self) -> None:
        h = self.harness()
        c = h.client()
        miss(h, c)
        self.assertEqual(h.listener.caches["web"].purge(b"/"), 1)
        c.send(request())
        self.assertTrue(h.backends[0].received().startswith(b"GET /x"))

    def test_host_failing_mid_response_stores_nothing(self) -> None:
        h = self.harness()
        c = h.client()
        c.send(request())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nCache-Control: max-age=60\r\n\r\nhalf")
        b.reset()
        self.assertEqual(len(h.listener.caches["web"]), 0)
        self.assertTrue(c.closed)

    def test_pool_without_cache_is_untouched(self) -> None:
        h = Harness()
        c = h.client()
        miss(h, c)
        c.send(request())
        self.assertTrue(h.backends[0].received().startswith(b"GET /x"))


# -- the admin API -------------------------------------------------------------------
class AdminTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fixture = Fixture()
        self.cache = ResponseCache("web", CacheConfig(), self.fixture.clock)
        self.fixture.resource.caches = {"web": self.cache}

    def call(self, path: str, body: bytes, method: bytes = b"POST") -> tuple[int, object]:
        return call_json(self.fixture.resource, method, path, body)  # type: ignore[no-any-return]

    def test_purge(self) -> None:
        store(self.cache, b"/static/a", MAX_AGE_60)
        store(self.cache, b"/index", MAX_AGE_60)
        code, answer = self.call("/api/v1/pools/web/cache/purge", b'{"prefix": "/static/"}')
        self.assertEqual((code, answer), (200, {"pool": "web", "prefix": "/static/", "purged": 1}))
        self.assertEqual(len(self.cache), 1)

    def test_refusals(self) -> None:
        for path, body, code, error in (
            ("/api/v1/pools/api/cache/purge", b'{"prefix": "/"}', 404, "pool api has no cache"),
            ("/api/v1/pools/nope/cache/purge", b'{"prefix": "/"}', 404, "no pool nope"),
            ("/api/v1/pools/web/cache/purge", b"/static/", 400, 'body must be JSON like {"prefix": "/path"}'),
            ("/api/v1/pools/web/cache/purge", b'{"prefix": "static"}', 400, "the prefix an ASCII path"),
            ("/api/v1/pools/web/cache/purge", b'["/"]', 400, "body must be JSON"),
        ):
            got, answer = self.call(path, body)
            self.assertEqual(got, code, path)
            self.assertIn(error, answer["error"])  # type: ignore[index]
        got, _ = self.call("/api/v1/pools/web/cache/purge", b"", method=b"GET")
        self.assertEqual(got, 405)

    def test_metrics(self) -> None:
        store(self.cache, b"/a", MAX_AGE_60)
        get(self.cache, b"/a")
        get(self.cache, b"/b")
        for stats in self.fixture.listeners.values():
            f = RequestFilter([DenyConfig("lan", network=("10.0.0.0/8",))], RateLimitConfig(1, 1),
                              self.fixture.clock, stats.filter)
            f.check("10.0.0.1", b"GET", b"/", [])
            f.check("192.0.2.1", b"GET", b"/", [])
            f.check("192.0.2.1", b"GET", b"/", [])
        code, _request, body = call(self.fixture.resource, b"GET", "/metrics")
        families = parse_exposition(body.decode())
        self.assertEqual(families["nlbproxy_cache_lookups_total"]["samples"], [
            ("nlbproxy_cache_lookups_total", {"pool": "web", "result": "hit"}, 1.0),
            ("nlbproxy_cache_lookups_total", {"pool": "web", "result": "miss"}, 1.0),
        ])
        self.assertEqual(families["nlbproxy_cache_entries"]["samples"][0][2], 1.0)
        self.assertEqual(families["nlbproxy_filter_denied_total"]["samples"], [
            ("nlbproxy_filter_denied_total", {"listener": "public", "rule": "lan"}, 1.0),
            ("nlbproxy_filter_denied_total", {"listener": "soap", "rule": "lan"}, 1.0),
        ])
        self.assertEqual(families["nlbproxy_filter_rate_limited_total"]["samples"][0][2], 1.0)


class InFlightTests(SynchronousTestCase):
    def test_bodies_in_flight_are_bounded_by_max_bytes(self) -> None:
        cache, _ = make_cache(max_bytes=10_000, max_object_bytes=6_000)
        fillings = []
        for target in (b"/a", b"/b"):
            req = cache.request(b"GET", target, fields((b"Host", b"a")), False)
            assert req is not None
            filling = req.admit(200, b"OK", MAX_AGE_60, cache.clock.seconds())
            assert filling is not None
            fillings.append(filling)
        self.assertTrue(fillings[0].add(b"x" * 6_000))
        self.assertFalse(fillings[1].add(b"x" * 5_000))  # 11 000 in flight: over max_bytes
        self.assertEqual((cache.filling_bytes, cache.stats.busy), (6_000, 1))
        fillings[0].drop()
        self.assertEqual(cache.filling_bytes, 0)

    def test_finish_releases_the_budget(self) -> None:
        cache, _ = make_cache()
        self.assertTrue(store(cache, b"/a", MAX_AGE_60, b"x" * 100))
        self.assertEqual(cache.filling_bytes, 0)


class RouterFillingTests(SynchronousTestCase):
    def harness(self) -> Harness:
        h = Harness(pools=[pool("web", "10.0.0.1:8080", cache=CacheConfig())])
        _pool_caches(h)
        return h

    def test_client_gone_mid_response_releases_the_budget(self) -> None:
        h = self.harness()
        c = h.client()
        c.send(request())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nCache-Control: max-age=60\r\n\r\nhalf")
        cache = h.listener.caches["web"]
        self.assertEqual(cache.filling_bytes, 4)
        c.reset()
        self.assertEqual((cache.filling_bytes, len(cache)), (0, 0))

    def test_host_gone_mid_response_releases_the_budget(self) -> None:
        h = self.harness()
        c = h.client()
        c.send(request())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nCache-Control: max-age=60\r\n\r\nhalf")
        b.reset()
        self.assertEqual(h.listener.caches["web"].filling_bytes, 0)

    def test_trailers_are_not_stored(self) -> None:
        h = self.harness()
        c = h.client(port=50001)
        c.send(request(extra=b"TE: trailers\r\n"))
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=60\r\n\r\n"
               b"2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n")
        self.assertIn(b"X-Sum: 1", c.received())
        cache = h.listener.caches["web"]
        self.assertEqual((len(cache), cache.filling_bytes), (0, 0))


class HitBackpressureTests(SynchronousTestCase):
    def test_pipelined_hits_wait_for_a_client_that_does_not_read(self) -> None:
        h = Harness(pools=[pool("web", "10.0.0.1:8080", cache=CacheConfig())])
        _pool_caches(h)
        c = h.client()
        big = b"x" * 50_000
        miss(h, c, resp=response(big))
        c.fill_after(10_000)
        c.send(request() * 5)  # five pipelined requests, all hits
        self.assertEqual(h.attempts(), [])
        # One answer waits in the send buffer; the other requests wait in h11's.
        self.assertEqual(c.transport.value().count(b"HTTP/1.1 200"), 1)
        self.assertEqual(c.protocol.phase, 4)  # _RESPONSE: the client timeout runs
        reads = [c.received() for _ in range(5)]
        # Each read drains the buffer, which lets exactly the next answer in.
        self.assertEqual([r.count(b"HTTP/1.1 200") for r in reads], [1, 1, 1, 1, 1])
        self.assertEqual(b"".join(reads).count(big), 5)
        self.assertEqual(c.received(), b"")
        self.assertEqual(h.listener.caches["web"].stats.hits, 5)
        self.assertFalse(c.closed)

    def test_client_that_never_reads_a_hit_is_cut_after_client_timeout(self) -> None:
        h = Harness(pools=[pool("web", "10.0.0.1:8080", cache=CacheConfig())], client_timeout=5.0)
        _pool_caches(h)
        c = h.client()
        miss(h, c, resp=response(b"x" * 50_000))
        c.fill_after(10_000)
        c.send(request())
        h.advance(5.0)
        self.assertTrue(c.aborted)
        self.assertEqual(h.access_log[-1], (b"GET", b"/x", 200))


class RobustnessTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=80))
    def test_any_cache_control_or_date_parses(self, value: bytes) -> None:
        directives = parse_cache_control([(b"Cache-Control", b"cache-control", value)])
        self.assertTrue(all(key == key.lower() and key for key in directives))
        http_date(value)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from([b"cache-control", b"vary", b"expires", b"date", b"age"]),
                              st.binary(max_size=40)), max_size=6))
    def test_any_response_headers_are_admitted_or_refused(self, headers: list[tuple[bytes, bytes]]) -> None:
        cache, _ = make_cache()
        req = cache.request(b"GET", b"/x", fields((b"Host", b"a")), False)
        assert req is not None
        filling = req.admit(200, b"OK", [(n, n, v) for n, v in headers], cache.clock.seconds())
        if filling is not None:
            filling.add(b"body")
            filling.finish()
            hit = get(cache, b"/x")
            if hit is not None:
                self.assertEqual(hit.body, b"body")


class CtlTests(SynchronousTestCase):
    def test_purge_needs_a_path_prefix(self) -> None:
        err = StringIO()
        with mock.patch("sys.stderr", err):
            code = nlbctl(["--admin", "http://127.0.0.1:9", "purge", "app", "static"])
        self.assertEqual(code, 2)
        self.assertIn("PREFIX must be a path starting with '/'", err.getvalue())


class LaterRule(Rule):
    """A rule answering through a Deferred, the way plugins may."""

    def __init__(self) -> None:
        super().__init__(RouteConfig(pool="unused"))
        self.answers: list[Deferred[Decision | None]] = []

    def decide(self, view: RequestView) -> MaybeDecision:
        answer: Deferred[Decision | None] = Deferred()
        self.answers.append(answer)
        return answer


class RoutedCacheTests(SynchronousTestCase):
    def test_only_the_routed_pool_caches(self) -> None:
        h = Harness(pools=[pool("web", "10.0.0.1:8080"), pool("static", "10.0.0.9:8080", cache=CacheConfig())],
                    routes=[route("static", path_prefix="/static/")])
        _pool_caches(h)
        c = h.client()
        for target in (b"/static/a", b"/page"):
            miss(h, c, request(target))
            c.send(request(target))
        self.assertEqual([b.key for b in h.backends], ["10.0.0.9:8080", "10.0.0.1:8080"])
        self.assertEqual(h.backends[0].transport.value(), b"")  # the second /static/a was a hit
        self.assertTrue(h.backends[1].received().startswith(b"GET /page"))
        self.assertEqual(list(h.listener.caches), ["static"])

    def test_a_hit_after_a_later_routing_decision(self) -> None:
        h = Harness(pools=[pool("web", "10.0.0.1:8080", cache=CacheConfig())])
        _pool_caches(h)
        rule = LaterRule()
        h.listener.routes.rules = (rule,)
        c = h.client()
        c.send(request())
        rule.answers[0].callback(Decision("web"))
        b = h.accept()
        b.received()
        b.send(response())
        self.assertEqual(parse_message(c.received())[2], b"hello")
        c.send(request())  # the request is complete before routing decides
        self.assertEqual(c.received(), b"")
        rule.answers[1].callback(Decision("web"))
        h.flush()
        status, headers, body = parse_message(c.received())
        self.assertEqual((status, body, headers[b"age"]), (200, b"hello", [b"0"]))
        self.assertEqual(h.attempts(), [])
        c.send(request())  # the connection goes on
        self.assertEqual(len(rule.answers), 3)
