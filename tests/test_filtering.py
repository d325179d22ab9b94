"""Request filtering (``nlbproxy.filtering``): deny rules and the per-client rate limit.

The core is driven with a fake clock; the router's use of it is scripted
against the fakes of :mod:`tests.fakes` at the end.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.config import ConfigError, DenyConfig, HeaderMatch, RateLimitConfig, parse_config
from nlbproxy.filtering import RateLimiter, RequestFilter, client_key, normalize_path, parse_address
from nlbproxy.metrics import FilterStats
from tests.fakes import Harness, parse_message


def make_filter(*rules: DenyConfig, rate: RateLimitConfig | None = None, max_clients: int = 1000,
                clock: Clock | None = None) -> tuple[RequestFilter, Clock]:
    clock = clock or Clock()
    return RequestFilter(rules, rate, clock, FilterStats(), max_clients), clock


class NormalizePathTests(SynchronousTestCase):
    def test_plain_paths_unchanged(self) -> None:
        for path in (b"/", b"/a", b"/a/b/", b"/a.b/c..d"):
            self.assertEqual(normalize_path(path), path)

    def test_escapes_dots_and_slashes(self) -> None:
        self.assertEqual(normalize_path(b"/%61dmin"), b"/admin")
        self.assertEqual(normalize_path(b"/x/../admin"), b"/admin")
        self.assertEqual(normalize_path(b"/./admin/."), b"/admin/")
        self.assertEqual(normalize_path(b"//admin//x"), b"/admin/x")
        self.assertEqual(normalize_path(b"/../../admin"), b"/admin")
        self.assertEqual(normalize_path(b"/%2e%2e/admin"), b"/admin")
        self.assertEqual(normalize_path(b"/a/.."), b"/")

    @given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2F", "%41"]), max_size=8))
    def test_result_has_no_dot_segments(self, segments: list[str]) -> None:
        path = normalize_path(("/" + "/".join(segments)).encode())
        self.assertTrue(path.startswith(b"/"))
        self.assertNotIn(b"//", path)
        self.assertNotIn(b"/./", path + b"/")
        self.assertNotIn(b"/../", path + b"/")


class AddressTests(SynchronousTestCase):
    def test_ipv6_bucketed_by_64(self) -> None:
        a = client_key(parse_address("2001:db8:1:2::1"), "")
        b = client_key(parse_address("2001:db8:1:2:ffff::9"), "")
        c = client_key(parse_address("2001:db8:1:3::1"), "")
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_ipv4_mapped_is_ipv4(self) -> None:
        self.assertEqual(client_key(parse_address("::ffff:192.0.2.1"), ""),
                         client_key(parse_address("192.0.2.1"), ""))
        self.assertNotEqual(client_key(parse_address("192.0.2.1"), ""),
                            client_key(parse_address("192.0.2.2"), ""))

    def test_not_an_address(self) -> None:
        self.assertIsNone(parse_address("/tmp/sock"))
        self.assertEqual(client_key(None, "/tmp/sock"), "/tmp/sock")


class DenyTests(SynchronousTestCase):
    def test_network_v4_and_v6(self) -> None:
        f, _ = make_filter(DenyConfig("nets", network=("10.0.0.0/8", "2001:db8::/32")))
        self.assertEqual(f.check("10.1.2.3", b"GET", b"/", []).status, 403)  # type: ignore[union-attr]
        self.assertEqual(f.check("2001:db8::5", b"GET", b"/", []).status, 403)  # type: ignore[union-attr]
        self.assertEqual(f.check("::ffff:10.0.0.1", b"GET", b"/", []).status, 403)  # type: ignore[union-attr]
        self.assertIsNone(f.check("192.0.2.1", b"GET", b"/", []))
        self.assertIsNone(f.check("2001:db9::5", b"GET", b"/", []))
        self.assertEqual(f.stats.denied, {"nets": 3})

    def test_all_keys_must_hold(self) -> None:
        rule = DenyConfig("admin-writes", network=("192.0.2.0/24",), method=(b"POST", b"PUT"),
                          path_prefix="/admin")
        f, _ = make_filter(rule)
        self.assertIsNotNone(f.check("192.0.2.7", b"POST", b"/admin/x", []))
        self.assertIsNone(f.check("192.0.2.7", b"GET", b"/admin/x", []))
        self.assertIsNone(f.check("192.0.2.7", b"POST", b"/public", []))
        self.assertIsNone(f.check("198.51.100.1", b"POST", b"/admin/x", []))
        self.assertEqual(f.stats.denied, {"admin-writes": 1})

    def test_path_is_normalized(self) -> None:
        f, _ = make_filter(DenyConfig("admin", path_prefix="/admin"))
        for target in (b"/admin", b"/%61dmin/x", b"/x/../admin", b"//admin", b"http://h/admin?q", b"/./admin"):
            self.assertIsNotNone(f.check("192.0.2.1", b"GET", target, []), target)
        self.assertIsNone(f.check("192.0.2.1", b"GET", b"/?next=/admin", []))

    def test_regex_and_headers(self) -> None:
        f, _ = make_filter(
            DenyConfig("php", path_regex=r"\.php$"),
            DenyConfig("bot", header=(HeaderMatch(b"user-agent", b"badbot"),)),
            DenyConfig("debug", header=(HeaderMatch(b"x-debug"),)),
        )
        self.assertIsNotNone(f.check("192.0.2.1", b"GET", b"/x.php", []))
        self.assertIsNone(f.check("192.0.2.1", b"GET", b"/x.php5", []))
        self.assertIsNotNone(f.check("192.0.2.1", b"GET", b"/", [(b"user-agent", b"badbot")]))
        self.assertIsNone(f.check("192.0.2.1", b"GET", b"/", [(b"user-agent", b"curl")]))
        self.assertIsNotNone(f.check("192.0.2.1", b"GET", b"/", [(b"x-debug", b"")]))
        self.assertEqual(f.stats.denied, {"php": 1, "bot": 1, "debug": 1})

    def test_network_rule_never_matches_non_ip_clients(self) -> None:
        f, _ = make_filter(DenyConfig("all", network=("0.0.0.0/0", "::/0")))
        self.assertIsNone(f.check("", b"GET", b"/", []))
        self.assertIsNotNone(f.check("203.0.113.9", b"GET", b"/", []))

    def test_denied_requests_take_no_token(self) -> None:
        f, _ = make_filter(DenyConfig("x", path_prefix="/x"), rate=RateLimitConfig(1.0, 1))
        for _ in range(5):
            self.assertEqual(f.check("192.0.2.1", b"GET", b"/x", []).status, 403)  # type: ignore[union-attr]
        self.assertIsNone(f.check("192.0.2.1", b"GET", b"/", []))


class RateLimitTests(SynchronousTestCase):
    def test_burst_then_429_with_retry_after(self) -> None:
        f, clock = make_filter(rate=RateLimitConfig(2.0, 3))
        for _ in range(3):
            self.assertIsNone(f.check("192.0.2.1", b"GET", b"/", []))
        verdict = f.check("192.0.2.1", b"GET", b"/", [])
        assert verdict is not None
        self.assertEqual((verdict.status, verdict.headers), (429, ((b"retry-after", b"1"),)))
        self.assertIsNone(f.check("192.0.2.2", b"GET", b"/", []))  # another client
        clock.advance(0.5)
        self.assertIsNone(f.check("192.0.2.1", b"GET", b"/", []))
        self.assertIsNotNone(f.check("192.0.2.1", b"GET", b"/", []))
        self.assertEqual(f.stats.rate_limited, 2)

    def test_retry_after_rounds_up(self) -> None:
        f, _ = make_filter(rate=RateLimitConfig(0.1, 1))
        self.assertIsNone(f.check("192.0.2.1", b"GET", b"/", []))
        verdict = f.check("192.0.2.1", b"GET", b"/", [])
        assert verdict is not None
        self.assertEqual(verdict.headers, ((b"retry-after", b"10"),))

    def test_ipv6_neighbours_share_a_bucket(self) -> None:
        f, _ = make_filter(rate=RateLimitConfig(1.0, 2))
        self.assertIsNone(f.check("2001:db8::1", b"GET", b"/", []))
        self.assertIsNone(f.check("2001:db8::2", b"GET", b"/", []))
        self.assertIsNotNone(f.check("2001:db8::3", b"GET", b"/", []))
        self.assertIsNone(f.check("2001:db8:0:1::1", b"GET", b"/", []))

    def test_table_is_bounded_and_full_buckets_are_evicted(self) -> None:
        clock = Clock()
        stats = FilterStats()
        limiter = RateLimiter(RateLimitConfig(1.0, 1), clock, stats, max_clients=3)
        for key in range(3):
            self.assertEqual(limiter.take(key), 0.0)
        clock.advance(1.0)  # all three refilled: forgetting them forgets nothing
        for key in range(3, 10):
            self.assertEqual(limiter.take(key), 0.0)
            clock.advance(1.0)
        self.assertEqual(len(limiter), 3)
        self.assertEqual(stats.clients, 3)
        self.assertEqual(stats.overflow, 0)

    def test_spraying_addresses_gets_one_shared_bucket(self) -> None:
        clock = Clock()
        stats = FilterStats()
        limiter = RateLimiter(RateLimitConfig(1.0, 2), clock, stats, max_clients=100)
        # A limited client stays limited however many addresses a sprayer uses.
        limiter.take("victim-of-own-excess")
        limiter.take("victim-of-own-excess")
        self.assertGreater(limiter.take("victim-of-own-excess"), 0)
        allowed = sum(1 for key in range(10_000) if limiter.take(key) == 0.0)
        # 99 fresh buckets taken once each, then the overflow bucket's burst of 2.
        self.assertEqual(allowed, 99 + 2)
        self.assertEqual(len(limiter), 100)
        self.assertGreater(limiter.take("victim-of-own-excess"), 0)
        self.assertEqual(stats.overflow, 10_000 - 99)

    def test_clock_stepping_back_refills_nothing(self) -> None:
        clock = Clock()
        clock.advance(100)
        limiter = RateLimiter(RateLimitConfig(1.0, 1), clock, FilterStats())
        self.assertEqual(limiter.take(1), 0.0)
        clock.rightNow = 50.0
        self.assertGreater(limiter.take(1), 0.0)

    @settings(max_examples=200, deadline=None)
    @given(
        rate=st.floats(0.5, 50.0),
        burst=st.integers(1, 20),
        gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
    )
    def test_never_more_than_burst_plus_rate_times_time(self, rate: float, burst: int, gaps: list[float]) -> None:
        clock = Clock()
        limiter = RateLimiter(RateLimitConfig(rate, burst), clock, FilterStats())
        allowed = 0
        for gap in gaps:
            clock.advance(gap)
            if limiter.take(1) == 0.0:
                allowed += 1
        self.assertLessEqual(allowed, burst + rate * clock.seconds() + 1e-6)

    @settings(max_examples=200, deadline=None)
    @given(
        rate=st.floats(0.5, 50.0),
        burst=st.integers(1, 20),
        gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=100),
    )
    def test_waiting_the_answered_delay_is_enough(self, rate: float, burst: int, gaps: list[float]) -> None:
        clock = Clock()
        limiter = RateLimiter(RateLimitConfig(rate, burst), clock, FilterStats())
        for gap in gaps:
            clock.advance(gap)
            wait = limiter.take(1)
            if wait > 0.0:
                clock.advance(wait + 1e-9)
                self.assertEqual(limiter.take(1), 0.0)

    @settings(max_examples=100, deadline=None)
    @given(rate=st.floats(0.5, 50.0), burst=st.integers(1, 20), n=st.integers(1, 100))
    def test_a_client_within_the_rate_is_never_limited(self, rate: float, burst: int, n: int) -> None:
        clock = Clock()
        limiter = RateLimiter(RateLimitConfig(rate, burst), clock, FilterStats())
        for _ in range(n):
            self.assertEqual(limiter.take(1), 0.0)
            clock.advance(1.0 / rate)


class ConfigTests(SynchronousTestCase):
    def parse(self, listener: dict[str, object], pool: dict[str, object] | None = None) -> object:
        return parse_config({
            "listener": [{"name": "web", "endpoint": "tcp:0", "pool": "app", **listener}],
            "pool": {"app": {"hosts": ["127.0.0.1:1"], **(pool or {})}},
        }, "unit.toml")

    def error(self, listener: dict[str, object], pool: dict[str, object] | None = None) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.parse(listener, pool)
        return str(caught.exception)

    def test_deny_and_rate_limit(self) -> None:
        config = self.parse({
            "deny": [{"network": "10.0.0.0/8"}, {"name": "bots", "header": ["X-Bot", {"name": "UA", "value": "x"}]}],
            "rate_limit": {"requests_per_second": 10, "burst": 20},
        })
        listener = config.listeners[0]  # type: ignore[attr-defined]
        self.assertEqual(listener.deny, (
            DenyConfig("deny0", network=("10.0.0.0/8",)),
            DenyConfig("bots", header=(HeaderMatch(b"x-bot"), HeaderMatch(b"ua", b"x"))),
        ))
        self.assertEqual(listener.rate_limit, RateLimitConfig(10.0, 20))

    def test_burst_defaults_to_the_rate(self) -> None:
        config = self.parse({"rate_limit": {"requests_per_second": 2.5}})
        self.assertEqual(config.listeners[0].rate_limit, RateLimitConfig(2.5, 3))  # type: ignore[attr-defined]

    def test_errors(self) -> None:
        self.assertEqual(self.error({"deny": [{"network": "10.0.0.300/8"}]}).split(":")[:2],
                         ["unit.toml", " listener[0].deny[0].network"])
        self.assertIn("listener[0].deny[0]: a deny rule needs at least one", self.error({"deny": [{"name": "x"}]}))
        self.assertIn("listener[0].deny[0].colour: unknown key", self.error({"deny": [{"colour": "red"}]}))
        self.assertIn("listener[0].deny[0].path_regex: invalid regular expression",
                      self.error({"deny": [{"path_regex": "("}]}))
        self.assertIn("listener[0].deny[0].header[0].name: expected an HTTP token",
                      self.error({"deny": [{"header": "bad name"}]}))
        self.assertIn("listener[0].rate_limit.requests_per_second: missing required key",
                      self.error({"rate_limit": {"burst": 3}}))
        self.assertIn("listener[0].rate_limit.requests_per_second: must be finite and > 0",
                      self.error({"rate_limit": {"requests_per_second": 0}}))
        self.assertIn("listener[0].rate_limit.burst: must be between 1",
                      self.error({"rate_limit": {"requests_per_second": 1, "burst": 0}}))


class RouterTests(SynchronousTestCase):
    """The filter in the router: answers before any host is chosen."""

    def test_denied_request_gets_403_and_the_connection_stays(self) -> None:
        h = Harness(deny=(DenyConfig("admin", path_prefix="/admin"),))
        c = h.client()
        c.send(b"GET /admin/x HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _headers, body = parse_message(c.received())
        self.assertEqual((status, body), (403, b"request denied by the listener's rules\n"))
        self.assertEqual(h.attempts(), [])
        self.assertFalse(c.closed)
        c.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(h.attempts()), 1)
        self.assertEqual(h.listener.stats.filter.denied, {"admin": 1})
        self.assertEqual(h.listener.stats.rejected, {403: 1})

    def test_denied_network(self) -> None:
        h = Harness(deny=(DenyConfig("lan", network=("192.0.2.0/24",)),))
        c = h.client(ip="192.0.2.10")
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(parse_message(c.received())[0], 403)
        other = h.client(ip="198.51.100.1")
        other.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(h.attempts()), 1)

    def test_denied_request_with_body_closes(self) -> None:
        h = Harness(deny=(DenyConfig("posts", method=(b"POST",)),))
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
        status, headers, _ = parse_message(c.received())
        self.assertEqual((status, headers[b"connection"]), (403, [b"close"]))
        self.assertTrue(c.closed)

    def test_rate_limited_gets_429_with_retry_after(self) -> None:
        h = Harness(rate_limit=RateLimitConfig(1.0, 1))
        c = h.client()
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(parse_message(c.received())[0], 200)
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = parse_message(c.received())
        self.assertEqual((status, headers[b"retry-after"]), (429, [b"1"]))
        self.assertFalse(c.closed)
        self.assertEqual(h.listener.stats.filter.rate_limited, 1)
        h.advance(1.0)
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(b.received()[:6], b"GET / ")
