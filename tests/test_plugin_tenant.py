"""The ``tenant`` routing plugin, tested with :mod:`nlbproxy.testing`.

The trial test case uses the ``RoutingAssertions`` mixin; the plain
functions at the end are the same kind of test in pytest's style.  Both run
under trial and pytest.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.classifier import DRAINING, INACTIVE
from nlbproxy.plugin import OptionError
from nlbproxy.routing import RequestView
from nlbproxy.testing import FakeFarm, RoutingAssertions, assert_declines, assert_routes, request

HOSTS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]


def farm() -> FakeFarm:
    return FakeFarm({"app": HOSTS, "gold": ["10.0.1.1:80", "10.0.1.2:80"]})


def tenant(name: str, **extra: str) -> RequestView:
    return request("GET", "/orders", {"X-Tenant": name, **extra})


class TenantTests(RoutingAssertions, SynchronousTestCase):
    def setUp(self) -> None:
        self.farm = farm()
        self.classifier = self.farm.configure(
            "tenant", {"header": "X-Tenant", "default": "app", "pools": {"acme": "gold"}}
        )

    def test_the_tenant_is_the_affinity_key(self) -> None:
        self.assertRoutes(self.classifier, tenant("globex"), pool="app", affinity_key="globex")

    def test_a_tenant_with_a_pool_of_its_own(self) -> None:
        self.assertRoutes(self.classifier, tenant("acme"), pool="gold", affinity_key="acme")

    def test_each_tenant_sticks_to_one_host_and_tenants_spread(self) -> None:
        hosts = {}
        for i in range(40):
            seen = {self.farm.route(self.classifier, tenant(f"t{i}"))[1] for _ in range(5)}
            self.assertEqual(len(seen), 1)
            hosts[f"t{i}"] = seen.pop()
        spread = Counter(host.key for host in hosts.values() if host is not None)
        self.assertEqual(set(spread), set(HOSTS))
        self.assertTrue(max(spread.values()) <= 20, spread)
        # The host of one tenant shows in assertRoutes too.
        self.assertRoutes(self.classifier, tenant("t7"), pool="app", host=hosts["t7"].key, farm=self.farm)

    def test_a_host_leaving_moves_only_its_own_tenants(self) -> None:
        before = {f"t{i}": self.farm.route(self.classifier, tenant(f"t{i}"))[1] for i in range(40)}
        gone = before["t0"]
        assert gone is not None
        self.farm.down("app", gone.key)
        after = {name: self.farm.route(self.classifier, tenant(name))[1] for name in before}
        for name, host in before.items():
            if host is gone:
                self.assertIsNot(after[name], gone)
            else:
                self.assertIs(after[name], host, name)
        self.farm.up("app", gone.key)
        self.assertEqual({name: self.farm.route(self.classifier, tenant(name))[1] for name in before}, before)

    @settings(derandomize=True, max_examples=50, deadline=None)
    @given(
        st.sets(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20), max_size=30),
        st.sampled_from(HOSTS),
    )
    def test_any_tenants_stick_and_only_a_leaving_hosts_tenants_move(self, tenants: set[str], leaving: str) -> None:
        farm = FakeFarm({"app": HOSTS})
        classifier = farm.configure("tenant", {"header": "X-Tenant", "default": "app"})

        def hosts() -> dict[str, str | None]:
            return {name: getattr(farm.route(classifier, tenant(name))[1], "key", None) for name in tenants}

        before = hosts()
        self.assertEqual(hosts(), before)
        farm.down("app", leaving)
        after = hosts()
        for name in tenants:
            if before[name] == leaving:
                self.assertNotIn(after[name], (leaving, None))
            else:
                self.assertEqual(after[name], before[name])

    def test_a_draining_or_inactive_host_takes_no_tenant(self) -> None:
        host = self.farm.route(self.classifier, tenant("t1"))[1]
        assert host is not None
        for directive in (DRAINING, INACTIVE):
            self.farm.set_directive("app", host.key, directive)
            self.assertIsNot(self.farm.route(self.classifier, tenant("t1"))[1], host)

    def test_without_the_header_the_default_pool_without_a_key(self) -> None:
        self.assertRoutes(self.classifier, request(), pool="app", affinity_key=None)
        self.assertRoutes(self.classifier, tenant(""), pool="app", affinity_key=None)

    def test_two_different_tenants_are_refused(self) -> None:
        two = request(headers=[("X-Tenant", "acme"), ("X-Tenant", "globex")])
        self.assertEqual(self.assertRefuses(self.classifier, two, 400).body, b"the request names more than one tenant\n")
        same = request(headers=[("X-Tenant", "acme"), ("x-tenant", "acme")])
        self.assertRoutes(self.classifier, same, pool="gold")

    def test_without_a_default_unknown_tenants_are_declined(self) -> None:
        classifier = self.farm.configure("tenant", {"header": "X-Tenant", "pools": {"acme": "gold"}})
        self.assertRoutes(classifier, tenant("acme"), pool="gold")
        self.assertDeclines(classifier, tenant("globex"))
        self.assertDeclines(classifier, request())

    def test_failures_are_reported_as_test_failures(self) -> None:
        with self.assertRaises(self.failureException) as caught:
            self.assertRoutes(self.classifier, tenant("acme"), pool="app")
        self.assertEqual(str(caught.exception), "routed to pool 'gold', not 'app'")
        with self.assertRaises(self.failureException):
            self.assertDeclines(self.classifier, tenant("acme"))

    def test_bad_options(self) -> None:
        cases = [
            ({}, ("header",), "missing required option"),
            ({"header": "X Tenant", "default": "app"}, ("header",), "'X Tenant' is not a header name"),
            ({"header": "X-Tenant"}, ("default",), "give default, pools or both: no tenant could be routed"),
            ({"header": "X-Tenant", "default": "lead"}, ("default",), "unknown pool 'lead'"),
            ({"header": "X-Tenant", "pools": {"acme": "lead"}}, ("pools", "acme"), "unknown pool 'lead'"),
            ({"header": "X-Tenant", "default": "app", "hash": "md5"}, ("hash",), "unknown option"),
        ]
        for options, key, reason in cases:
            with self.assertRaises(OptionError) as caught:
                self.farm.configure("tenant", options)
            self.assertEqual((caught.exception.key, caught.exception.reason), (key, reason))


# pytest style: plain functions and plain asserts (trial does not collect these).

def test_tenant_routes_with_plain_assertions() -> None:
    f = farm()
    classifier = f.configure("tenant", {"header": "X-Tenant", "default": "app"})
    decision = assert_routes(classifier, tenant("initech"), pool="app", affinity_key=b"initech")
    host = f.host_for(decision)
    assert host is not None and host.key in HOSTS
    assert_routes(classifier, tenant("initech"), host=host.key, farm=f)


def test_tenant_declines_without_default_or_pool() -> None:
    classifier = farm().configure("tenant", {"header": "X-Tenant", "pools": {"acme": "gold"}})
    assert_declines(classifier, tenant("umbrella"))
