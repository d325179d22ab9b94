"""The classifier: smooth weighted round robin, directives, passive health, affinity."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import classifier
from nlbproxy.classifier import ACTIVE, DRAINING, INACTIVE, Farm, Pool
from tests.fakes import SECRET, pool


def keys(pool: Pool, n: int, exclude: tuple = ()) -> list[str]:
    picks = [pool.choose(exclude) for _ in range(n)]
    return [h.key if h is not None else "-" for h in picks]


class ChooseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def make(self, *hosts: str | tuple[str, int], **options: object) -> Pool:
        return Farm([pool("web", *hosts, **options)], self.clock, SECRET).pools["web"]

    def test_smooth_weighted_round_robin_like_nginx(self) -> None:
        p = self.make(("10.0.0.1:80", 5), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1))
        a, b, c = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
        self.assertEqual(keys(p, 14), [a, a, b, a, c, a, a] * 2)

    def test_equal_weights_alternate(self) -> None:
        p = self.make("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
        self.assertEqual(keys(p, 6), ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"] * 2)

    def test_weights_give_shares(self) -> None:
        p = self.make(("10.0.0.1:80", 3), ("10.0.0.2:80", 2))
        picks = keys(p, 500)
        self.assertEqual(picks.count("10.0.0.1:80"), 300)
        self.assertEqual(picks.count("10.0.0.2:80"), 200)

    def test_exclude(self) -> None:
        p = self.make("10.0.0.1:80", "10.0.0.2:80")
        first = p.hosts[0]
        self.assertEqual(keys(p, 3, (first,)), ["10.0.0.2:80"] * 3)
        self.assertIsNone(p.choose(p.hosts))

    def test_draining_and_inactive_hosts_get_no_new_requests(self) -> None:
        p = self.make("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
        p.set_directive(p.hosts[0], DRAINING, "admin")
        p.set_directive(p.hosts[1], INACTIVE, "admin")
        self.assertEqual(keys(p, 3), ["10.0.0.3:80"] * 3)
        self.assertEqual(p.hosts[0].directive_reason, "admin")
        p.set_directive(p.hosts[2], DRAINING, "admin")
        self.assertIsNone(p.choose())
        p.set_directive(p.hosts[1], ACTIVE, "admin")
        self.assertEqual(keys(p, 2), ["10.0.0.2:80"] * 2)

    def test_unknown_directive(self) -> None:
        p = self.make("10.0.0.1:80")
        self.assertRaises(ValueError, p.set_directive, p.hosts[0], "paused", "admin")
        self.assertEqual(p.hosts[0].directive, ACTIVE)

    def test_failed_host_is_down_for_fail_timeout(self) -> None:
        p = self.make("10.0.0.1:80", "10.0.0.2:80", fail_timeout=10.0)
        a = p.hosts[0]
        self.clock.advance(100)
        p.mark_failed(a, "connect_refused: no")
        self.assertEqual(a.health(self.clock.seconds()), "down")
        self.assertFalse(a.is_up(self.clock.seconds()))
        self.assertEqual(a.down_reason, "connect_refused: no")
        self.assertEqual(keys(p, 2), ["10.0.0.2:80"] * 2)
        self.clock.advance(9.99)
        self.assertEqual(a.health(self.clock.seconds()), "down")
        self.clock.advance(0.01)
        self.assertEqual(a.health(self.clock.seconds()), "up")
        self.assertEqual(sorted(keys(p, 2)), ["10.0.0.1:80", "10.0.0.2:80"])


class AffinityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.farm = Farm([pool("web", "10.0.0.1:80", "10.0.0.2:80", client_ip_timeout=60.0)], self.clock, SECRET)
        self.pool = self.farm.pools["web"]
        self.a, self.b = self.pool.hosts

    def test_tokens(self) -> None:
        a, b = self.a, self.b
        self.assertEqual(len(a.affinity_token), 20)
        self.assertNotEqual(a.affinity_token, b.affinity_token)
        self.assertIs(self.pool.host_for_token(a.affinity_token), a)
        self.assertIsNone(self.pool.host_for_token("10.0.0.1:80"))
        self.assertIsNone(self.pool.host_for_token(""))
        # The same secret gives the same tokens on every unit of a farm.
        other = Farm([pool("web", "10.0.0.1:80", "10.0.0.2:80")], self.clock, SECRET).pools["web"]
        self.assertEqual(other.hosts[0].affinity_token, a.affinity_token)
        # Without a secret, a random one: tokens are not guessable.
        random = Farm([pool("web", "10.0.0.1:80")], self.clock, None).pools["web"]
        self.assertNotEqual(random.hosts[0].affinity_token, a.affinity_token)

    def test_bound_host_by_directive_and_health(self) -> None:
        p, a = self.pool, self.a
        self.assertIs(p.bound_host(a), a)
        p.set_directive(a, DRAINING, "admin")
        self.assertIs(p.bound_host(a), a)
        self.assertIs(p.host_for_token(a.affinity_token), a)
        p.set_directive(a, INACTIVE, "admin")
        self.assertIsNone(p.bound_host(a))
        p.set_directive(a, ACTIVE, "admin")
        p.mark_failed(a, "reset")
        self.assertIsNone(p.bound_host(a))
        self.assertIsNone(p.bound_host(None))

    def test_client_ip(self) -> None:
        p, a, b = self.pool, self.a, self.b
        self.assertIsNone(p.host_for_client_ip("198.51.100.1"))
        p.remember_client_ip("198.51.100.1", b)
        self.assertIs(p.host_for_client_ip("198.51.100.1"), b)
        p.set_directive(b, DRAINING, "admin")
        self.assertIs(p.host_for_client_ip("198.51.100.1"), b)
        p.set_directive(b, INACTIVE, "admin")
        self.assertIsNone(p.host_for_client_ip("198.51.100.1"))
        p.remember_client_ip("198.51.100.1", a)
        self.assertIs(p.host_for_client_ip("198.51.100.1"), a)

    def test_client_ip_expires(self) -> None:
        p = self.pool
        p.remember_client_ip("198.51.100.1", self.a)
        self.clock.advance(60)
        self.assertIs(p.host_for_client_ip("198.51.100.1"), self.a)
        self.clock.advance(0.5)
        self.assertIsNone(p.host_for_client_ip("198.51.100.1"))
        self.assertEqual(len(p._client_ips), 0)

    def test_client_ip_table_is_bounded(self) -> None:
        self.patch(classifier, "MAX_CLIENT_IP_ENTRIES", 3)
        p = self.pool
        for i in range(3):
            p.remember_client_ip(f"198.51.100.{i}", self.a)
        p.remember_client_ip("198.51.100.0", self.b)  # refreshed: now the newest
        p.remember_client_ip("198.51.100.9", self.b)
        self.assertEqual(list(p._client_ips), ["198.51.100.2", "198.51.100.0", "198.51.100.9"])
        self.assertIsNone(p.host_for_client_ip("198.51.100.1"))
        self.assertIs(p.host_for_client_ip("198.51.100.0"), self.b)


class KeyHashTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        hosts = [f"10.0.0.{i}:80" for i in range(1, 5)]
        self.pool = Farm([pool("web", *hosts)], self.clock, SECRET).pools["web"]

    def spread(self, keys: list[bytes]) -> dict[bytes, str]:
        found = {}
        for key in keys:
            host = self.pool.host_for_key(key)
            assert host is not None
            found[key] = host.key
        return found

    def test_same_key_same_host_on_every_unit(self) -> None:
        other = Farm([pool("web", *[h.key for h in reversed(self.pool.hosts)])], self.clock, b"x").pools["web"]
        for i in range(50):
            key = f"tenant-{i}".encode()
            self.assertEqual(self.pool.host_for_key(key).key, other.host_for_key(key).key)  # type: ignore[union-attr]

    def test_keys_spread_over_hosts(self) -> None:
        counts: dict[str, int] = {}
        for host in self.spread([f"t{i}".encode() for i in range(4000)]).values():
            counts[host] = counts.get(host, 0) + 1
        self.assertEqual(len(counts), 4)
        self.assertTrue(all(700 < n < 1300 for n in counts.values()), counts)

    def test_a_leaving_host_moves_only_its_keys(self) -> None:
        keys = [f"t{i}".encode() for i in range(1000)]
        before = self.spread(keys)
        gone = self.pool.hosts[0]
        self.pool.set_directive(gone, "draining")
        after = self.spread(keys)
        for key in keys:
            if before[key] != gone.key:
                self.assertEqual(after[key], before[key])
            else:
                self.assertNotEqual(after[key], gone.key)
        self.pool.set_directive(gone, None)
        self.assertEqual(self.spread(keys), before)

    def test_down_hosts_and_exclusions(self) -> None:
        for host in self.pool.hosts[1:]:
            self.pool.mark_failed(host, "reset")
        self.assertIs(self.pool.host_for_key(b"k"), self.pool.hosts[0])
        self.assertIsNone(self.pool.host_for_key(b"k", exclude={self.pool.hosts[0]}))


class FarmTests(SynchronousTestCase):
    def test_host_lookup(self) -> None:
        farm = Farm([pool("web", "10.0.0.1:80"), pool("api", "[2001:db8::1]:443")], Clock(), SECRET)
        self.assertEqual(farm.host("api", "[2001:db8::1]:443").host, "2001:db8::1")
        self.assertEqual(farm.host("api", "[2001:db8::1]:443").port, 443)
        self.assertEqual(repr(farm.host("web", "10.0.0.1:80")), "<Host web/10.0.0.1:80 active>")
        with self.assertRaises(KeyError) as caught:
            farm.host("web", "10.0.0.2:80")
        self.assertEqual(caught.exception.args, ("no host 10.0.0.2:80 in pool web",))
        with self.assertRaises(KeyError) as caught:
            farm.host("nope", "10.0.0.1:80")
        self.assertEqual(caught.exception.args, ("no host 10.0.0.1:80 in pool nope",))
