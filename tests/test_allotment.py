"""Allotments: token and percentage shares from spare capacity, smooth
weighted round robin, eligibility, exclusion, and no herding."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.classifier import ACTIVE, DRAINING, INACTIVE, Farm, Host, Pool
from nlbproxy.health.allotment import (
    DURATION,
    KINDS,
    MAX_AGE,
    TOKENS,
    Allotment,
    PercentageAllotment,
    RoundRobin,
    TokenAllotment,
    eligible,
    make_allotment,
    smooth_weighted_round_robin,
)
from tests.fakes import SECRET, pool

DRAWS = 10_000


def assert_near(actual: float, expected: float, tolerance: float) -> None:
    """trial's assertAlmostEqual ignores ``delta``."""
    assert abs(actual - expected) <= tolerance, f"{actual!r} is not within {tolerance} of {expected!r}"


def make_pool(clock: Clock, n: int, weights: Sequence[int] = ()) -> Pool:
    entries = [(f"10.0.0.{i + 1}:80", weights[i] if weights else 1) for i in range(n)]
    return Farm([pool("web", *entries)], clock, SECRET).pools["web"]


def shares(allotment: Allotment, hosts: Sequence[Host], n: int = DRAWS, **kw: object) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        host = allotment.draw(hosts, **kw)  # type: ignore[arg-type]
        counts[host.key if host is not None else "-"] += 1
    return counts


class TokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = make_pool(self.clock, 3)
        self.a, self.b, self.c = self.pool.hosts
        for host in self.pool.hosts:
            host.capacity = 50

    def test_loaded_host_gets_little_and_its_share_back(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        self.a.load, self.b.load, self.c.load = 90, 10, 10
        counts = shares(allotment, self.pool.hosts)
        # Spare 10:90:90 -> 5 of 99 tokens, about 5%; the target is < 15%.
        self.assertLess(counts[self.a.key] / DRAWS, 0.15)
        assert_near(counts[self.a.key] / DRAWS, 5 / 99, 0.01)
        assert_near(counts[self.b.key] / counts[self.c.key], 1, 0.05)
        # Its load falls: the next refill (at once, the signature changed)
        # gives it a third again.
        self.a.load = 10
        counts = shares(allotment, self.pool.hosts)
        for host in self.pool.hosts:
            assert_near(counts[host.key] / DRAWS, 1 / 3, 0.02)

    def test_with_a_version_that_is_not_bumped_share_returns_within_max_age(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        self.a.load, self.b.load, self.c.load = 90, 10, 10
        # Use up part of a deal, then change loads without a new version.
        for _ in range(10):
            allotment.draw(self.pool.hosts, (), version=7)
        self.a.load = 10
        early = shares(allotment, self.pool.hosts, 50, version=7)
        self.assertLessEqual(early[self.a.key], 5)  # still the old deal
        self.clock.advance(MAX_AGE)
        counts = shares(allotment, self.pool.hosts, 99, version=7)
        self.assertEqual(counts[self.a.key], 33)  # one whole fresh deal of 99
        # A bumped version refills at once.
        self.a.load = 90
        counts = shares(allotment, self.pool.hosts, 99, version=8)
        self.assertEqual(counts[self.a.key], 5)

    def test_deal_follows_spare_capacity(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        self.a.capacity, self.b.capacity, self.c.capacity = 60, 30, 10
        counts = shares(allotment, self.pool.hosts, TOKENS)
        self.assertEqual([counts[h.key] for h in self.pool.hosts], [60, 30, 10])

    def test_full_hosts_get_nothing_unless_all_are_full(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        self.a.load, self.b.load, self.c.load = 100, 99, 100
        counts = shares(allotment, self.pool.hosts, 300)
        self.assertEqual(counts, Counter({self.b.key: 300}))
        self.b.load = 100
        counts = shares(allotment, self.pool.hosts, 99)
        self.assertEqual(sorted(counts.values()), [33, 33, 33])
        self.a.capacity = 0  # no capacity: no spare either
        self.a.load = self.b.load = self.c.load = 0
        self.assertEqual(allotment.shares(self.pool.hosts, 0), {self.b: 50, self.c: 50})

    def test_any_spare_gets_a_token(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        self.a.load, self.a.capacity = 99, 1
        self.assertEqual(allotment.shares(self.pool.hosts, 0)[self.a], 1)

    def test_ineligible_hosts_are_never_drawn(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        self.pool.set_directive(self.a, DRAINING)
        self.pool.set_directive(self.b, INACTIVE)
        self.assertEqual(shares(allotment, self.pool.hosts, 200), Counter({self.c.key: 200}))
        self.pool.mark_failed(self.c, "refused")
        self.assertEqual(shares(allotment, self.pool.hosts, 10), Counter({"-": 10}))

    def test_host_failing_mid_deal_is_skipped_even_without_a_new_version(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        allotment.draw(self.pool.hosts, (), version=1)
        self.a.agent_up = False  # nobody bumped the version
        counts = shares(allotment, self.pool.hosts, 500, version=1)
        self.assertNotIn(self.a.key, counts)
        self.assertNotIn("-", counts)

    def test_exclude(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        counts = shares(allotment, self.pool.hosts, 300, exclude={self.a})
        self.assertEqual(set(counts), {self.b.key, self.c.key})
        self.assertIsNone(allotment.draw(self.pool.hosts, set(self.pool.hosts)))

    def test_tokens_of_excluded_hosts_wait_for_later_draws(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        counts = shares(allotment, self.pool.hosts, 66, exclude={self.a})
        self.assertEqual(counts, Counter({self.b.key: 33, self.c.key: 33}))
        self.assertEqual(shares(allotment, self.pool.hosts, 33), Counter({self.a.key: 33}))
        self.assertEqual(allotment.refills, 1)

    def test_exclude_falls_back_to_a_full_host_rather_than_none(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        self.b.load = self.c.load = 100
        counts = shares(allotment, self.pool.hosts, 100, exclude={self.a})
        self.assertEqual(set(counts), {self.b.key, self.c.key})

    def test_units_with_other_seeds_draw_in_other_orders(self) -> None:
        def order(seed: int) -> list[str]:
            allotment = TokenAllotment(random.Random(seed), self.clock)
            return [h.key for h in (allotment.draw(self.pool.hosts) for _ in range(99)) if h is not None]

        self.assertNotEqual(order(1), order(2))
        self.assertEqual(order(3), order(3))
        # Each unit still gives every host its share of a deal.
        self.assertEqual(Counter(order(1)), Counter(order(2)))

    def test_invalidate_refills(self) -> None:
        allotment = TokenAllotment(random.Random(1), self.clock)
        allotment.draw(self.pool.hosts, (), version=1)
        allotment.draw(self.pool.hosts, (), version=1)
        self.assertEqual(allotment.refills, 1)
        allotment.invalidate()
        allotment.draw(self.pool.hosts, (), version=1)
        self.assertEqual(allotment.refills, 2)

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, TokenAllotment, random.Random(), self.clock, 0)
        self.assertRaises(ValueError, TokenAllotment, random.Random(), self.clock, 10, 0)


class PercentageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = make_pool(self.clock, 3)
        self.a, self.b, self.c = self.pool.hosts
        for host in self.pool.hosts:
            host.capacity = 50

    def test_shares_from_spare_capacity_held_for_duration(self) -> None:
        allotment = PercentageAllotment(random.Random(1), self.clock)
        self.a.load, self.b.load, self.c.load = 90, 10, 10
        counts = shares(allotment, self.pool.hosts)
        assert_near(counts[self.a.key] / DRAWS, 10 / 190, 0.01)
        self.assertAlmostEqual(allotment.percentages()[self.a], 100 * 10 / 190)
        self.assertAlmostEqual(sum(allotment.percentages().values()), 100)
        self.a.load = 10
        self.clock.advance(DURATION / 2)
        counts = shares(allotment, self.pool.hosts, 2000)
        self.assertLess(counts[self.a.key] / 2000, 0.15)  # held
        self.clock.advance(DURATION / 2)
        counts = shares(allotment, self.pool.hosts)
        assert_near(counts[self.a.key] / DRAWS, 1 / 3, 0.02)

    def test_eligibility_changes_apply_at_once(self) -> None:
        allotment = PercentageAllotment(random.Random(1), self.clock)
        shares(allotment, self.pool.hosts, 10)
        self.pool.set_directive(self.a, DRAINING)
        counts = shares(allotment, self.pool.hosts, 1000)
        self.assertNotIn(self.a.key, counts)
        assert_near(counts[self.b.key] / 1000, 0.5, 0.06)
        self.pool.set_directive(self.a, ACTIVE)
        assert_near(shares(allotment, self.pool.hosts)[self.a.key] / DRAWS, 1 / 3, 0.02)

    def test_exclude_and_none(self) -> None:
        allotment = PercentageAllotment(random.Random(1), self.clock)
        counts = shares(allotment, self.pool.hosts, 300, exclude={self.b})
        self.assertEqual(set(counts), {self.a.key, self.c.key})
        self.pool.mark_failed(self.a, "reset")
        self.assertIsNone(allotment.draw(self.pool.hosts, {self.b, self.c}))

    def test_all_full_share_evenly(self) -> None:
        allotment = PercentageAllotment(random.Random(1), self.clock)
        for host in self.pool.hosts:
            host.load = 100
        counts = shares(allotment, self.pool.hosts, 3000)
        for host in self.pool.hosts:
            assert_near(counts[host.key] / 3000, 1 / 3, 0.04)

    def test_bad_duration(self) -> None:
        self.assertRaises(ValueError, PercentageAllotment, random.Random(), self.clock, 0)


class RoundRobinTests(SynchronousTestCase):
    def test_smooth_weighted_round_robin_like_nginx(self) -> None:
        clock = Clock()
        p = make_pool(clock, 3, (5, 1, 1))
        rr = RoundRobin(clock)
        keys = [h.key for h in (rr.draw(p.hosts) for _ in range(14)) if h is not None]
        a, b, c = (h.key for h in p.hosts)
        self.assertEqual(keys, [a, a, b, a, c, a, a] * 2)

    def test_same_as_the_pool_did(self) -> None:
        clock = Clock()
        p = make_pool(clock, 3, (3, 2, 1))
        q = make_pool(clock, 3, (3, 2, 1))
        p.set_directive(p.hosts[1], DRAINING)
        q.set_directive(q.hosts[1], DRAINING)
        ours = [smooth_weighted_round_robin(p.hosts, (), 0) for _ in range(12)]
        theirs = [q.choose() for _ in range(12)]
        self.assertEqual([h.key if h else "-" for h in ours], [h.key if h else "-" for h in theirs])
        self.assertIsNone(RoundRobin(clock).draw(p.hosts, set(p.hosts)))


class FactoryTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        clock = Clock()
        rng = random.Random(0)
        self.assertIsInstance(make_allotment("tokens", rng, clock), TokenAllotment)
        self.assertIsInstance(make_allotment("percentage", rng, clock), PercentageAllotment)
        self.assertIsInstance(make_allotment("round_robin", rng, clock), RoundRobin)
        self.assertEqual(KINDS, ("tokens", "percentage", "round_robin"))
        self.assertRaises(ValueError, make_allotment, "random", rng, clock)


_HOST_STATE = st.tuples(
    st.sampled_from([ACTIVE, ACTIVE, DRAINING, INACTIVE]),
    st.booleans(),  # up
    st.integers(0, 100),  # load
    st.integers(0, 99),  # capacity
    st.booleans(),  # excluded
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(KINDS), st.lists(_HOST_STATE, min_size=1, max_size=6), st.integers(0, 2**32))
    def test_draws_only_eligible_unexcluded_hosts_and_none_only_if_there_is_none(
        self, kind: str, states: list[tuple[str, bool, int, int, bool]], seed: int
    ) -> None:
        clock = Clock()
        p = make_pool(clock, len(states))
        exclude = set()
        for host, (directive, up, load, capacity, excluded) in zip(p.hosts, states, strict=True):
            p.set_directive(host, directive)
            host.agent_up = up
            host.load, host.capacity = load, capacity
            if excluded:
                exclude.add(host)
        allotment = make_allotment(kind, random.Random(seed), clock)
        possible = [h for h in p.hosts if eligible(h, 0) and h not in exclude]
        for _ in range(20):
            drawn = allotment.draw(p.hosts, exclude)
            if possible:
                self.assertIn(drawn, possible)
            else:
                self.assertIsNone(drawn)
