"""Reload: the plan (sans-I/O), pools and listeners changed under requests in
flight (event scripts on fakes), and a unit reloading on a fake reactor."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.admin import AdminResource
from nlbproxy.classifier import DRAINING, Farm
from nlbproxy.config import UnitConfig, parse_config
from nlbproxy.reload import RESTART_KEYS, ReloadRefused, plan_reload
from nlbproxy.tap import _upgrade_blocker
from nlbproxy.unit import Unit
from tests.fakes import SECRET, Harness, pool, route
from tests.test_admin import FakeUpstreams, call_json, make_farm
from tests.test_router import get, ok, relayed_ok


def config(
    listeners: list[dict[str, Any]] | None = None,
    pools: dict[str, Any] | None = None,
    **unit: Any,
) -> UnitConfig:
    data: dict[str, Any] = {
        "unit": {"name": "u1", "admin": "tcp:0:interface=127.0.0.1", **unit},
        "listener": listeners if listeners is not None else [
            {"name": "web", "endpoint": "tcp:8080", "pool": "app",
             "route": [{"path_prefix": "/x/", "pool": "extra"}]},
        ],
        "pool": pools if pools is not None else {
            "app": {"hosts": ["10.0.0.1:80", "10.0.0.2:80"]},
            "extra": {"hosts": ["10.0.0.3:80"]},
        },
    }
    return parse_config(data, "/etc/nlb/unit.toml")


def plan(old: UnitConfig, new: UnitConfig, handoff: bool = False) -> Any:
    return plan_reload(old, new, handoff_available=handoff)


class PlanTests(SynchronousTestCase):
    def test_same_config_changes_nothing(self) -> None:
        p = plan(config(), config())
        self.assertTrue(p.empty)
        self.assertEqual(p.summary(), "nothing changes")

    def test_listeners_added_removed_changed(self) -> None:
        old = config(listeners=[
            {"name": "web", "endpoint": "tcp:8080", "pool": "app"},
            {"name": "old", "endpoint": "tcp:8081", "pool": "app"},
        ])
        new = config(listeners=[
            {"name": "web", "endpoint": "tcp:8080", "pool": "extra", "header_timeout": 3.0,
             "route": [{"path_prefix": "/a/", "pool": "app"}]},
            {"name": "new", "endpoint": "tcp:8082", "pool": "app"},
        ])
        p = plan(old, new)
        self.assertEqual([lc.name for lc in p.listeners_added], ["new"])
        self.assertEqual([lc.name for lc in p.listeners_removed], ["old"])
        self.assertEqual([(c.new.name, c.keys) for c in p.listeners_changed],
                         [("web", ("pool", "routes", "header_timeout"))])
        self.assertEqual(p.listeners_replaced, ())
        self.assertEqual(p.summary(), "listeners added: new; listeners removed: old; listeners changed: web")

    def test_new_endpoint_replaces_the_listener(self) -> None:
        new = config(listeners=[{"name": "web", "endpoint": "tcp:9090", "pool": "app",
                                 "route": [{"path_prefix": "/x/", "pool": "extra"}]}])
        p = plan(config(), new)
        self.assertEqual([(c.old.endpoint, c.new.endpoint) for c in p.listeners_replaced],
                         [("tcp:8080", "tcp:9090")])
        self.assertEqual(p.document()["listeners"]["replaced"], {"web": {"from": "tcp:8080", "to": "tcp:9090"}})

    def test_an_address_held_by_a_leaving_listener_is_refused(self) -> None:
        new = config(listeners=[{"name": "other", "endpoint": "tcp:8080", "pool": "app"}])
        with self.assertRaises(ReloadRefused) as caught:
            plan(config(), new)
        self.assertEqual(caught.exception.reasons, [
            "listener other.endpoint: tcp:8080 is still held by the listener that leaves it; "
            "move it in two reloads (remove, then add)"])

    def test_port_zero_is_never_held(self) -> None:
        old = config(listeners=[{"name": "a", "endpoint": "tcp:0:interface=127.0.0.1", "pool": "app"}])
        new = config(listeners=[{"name": "b", "endpoint": "tcp:0:interface=127.0.0.1", "pool": "app"}])
        p = plan(old, new)
        self.assertEqual(([lc.name for lc in p.listeners_added], [lc.name for lc in p.listeners_removed]),
                         (["b"], ["a"]))

    def test_handoff_changes_need_a_restart(self) -> None:
        secret = {"secret_file": __file__}
        old = config(**secret)
        flipped = config(listeners=[{"name": "web", "endpoint": "tcp:8080", "pool": "app", "handoff": True,
                                     "route": [{"path_prefix": "/x/", "pool": "extra"}]}], **secret)
        with self.assertRaises(ReloadRefused) as caught:
            plan(old, flipped, handoff=True)
        self.assertIn("listener web.handoff: needs a restart", str(caught.exception))
        added = config(listeners=[
            {"name": "web", "endpoint": "tcp:8080", "pool": "app", "route": [{"path_prefix": "/x/", "pool": "extra"}]},
            {"name": "h", "endpoint": "tcp:8443", "pool": "app", "handoff": True}], **secret)
        with self.assertRaises(ReloadRefused) as caught:
            plan(old, added, handoff=False)
        self.assertEqual(caught.exception.reasons,
                         ["listener h: handoff needs a restart (the unit started without handoff)"])
        self.assertEqual([lc.name for lc in plan(old, added, handoff=True).listeners_added], ["h"])

    def test_unit_keys_that_need_a_restart_are_all_named(self) -> None:
        new = config(name="u2", health="127.0.0.1:9902", secret_file=__file__)
        with self.assertRaises(ReloadRefused) as caught:
            plan(config(), new)
        self.assertEqual(caught.exception.reasons, [
            f"unit.name: needs a restart ({RESTART_KEYS['name']})",
            f"unit.secret_file: needs a restart ({RESTART_KEYS['secret_file']})",
            f"unit.health: needs a restart ({RESTART_KEYS['health']})",
        ])
        self.assertEqual(str(caught.exception), "; ".join(caught.exception.reasons))

    def test_unit_keys_applied_at_runtime(self) -> None:
        p = plan(config(), config(grace_period=3.0, access_log="-", log_format="json"))
        self.assertEqual(p.unit_keys, ("access_log", "log_format", "grace_period"))
        self.assertEqual(p.document()["unit"], ["access_log", "log_format", "grace_period"])

    def test_pools_added_removed_changed(self) -> None:
        new = config(
            listeners=[{"name": "web", "endpoint": "tcp:8080", "pool": "app",
                        "route": [{"path_prefix": "/x/", "pool": "other"}]}],
            pools={"app": {"hosts": ["10.0.0.2:80", "10.0.0.4:80"], "balance": "round_robin", "retries": 0},
                   "other": {"hosts": ["10.0.0.3:80"]}},
        )
        p = plan(config(), new)
        self.assertEqual(p.document()["pools"], {
            "added": ["other"], "removed": ["extra"],
            "changed": {"app": {"keys": ["retries", "balance"], "hosts_added": ["10.0.0.4:80"],
                                "hosts_removed": ["10.0.0.1:80"], "hosts_changed": []}},
        })
        self.assertEqual(p.document()["listeners"]["changed"], {"web": ["routes"]})
        json.dumps(p.document())  # the admin API answers it

    def test_weight_change(self) -> None:
        new = config(pools={"app": {"hosts": ["10.0.0.1:80", "10.0.0.2:80"]},
                            "extra": {"hosts": [{"address": "10.0.0.3:80", "weight": 3}]}})
        (change,) = plan(config(), new).pools_changed
        self.assertEqual(([h.key for h in change.hosts_changed], change.keys), (["10.0.0.3:80"], ()))


class PoolReconfigureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.farm = Farm([pool("app", "10.0.0.1:80", "10.0.0.2:80", affinity="cookie")], self.clock, SECRET)
        self.pool = self.farm.pools["app"]

    def test_kept_hosts_keep_their_state(self) -> None:
        kept = self.pool.by_key["10.0.0.2:80"]
        self.pool.set_directive(kept, DRAINING)
        stats = kept.stats
        added, removed = self.pool.reconfigure(pool("app", "10.0.0.2:80", "10.0.0.3:80", affinity="cookie"))
        self.assertIs(self.pool.by_key["10.0.0.2:80"], kept)
        self.assertEqual((kept.directive, kept.directive_reason), (DRAINING, "operator"))
        self.assertIs(kept.stats, stats)
        self.assertEqual([h.key for h in added], ["10.0.0.3:80"])
        self.assertEqual([h.key for h in removed], ["10.0.0.1:80"])
        self.assertEqual([h.key for h in self.pool.hosts], ["10.0.0.2:80", "10.0.0.3:80"])

    def test_a_removed_host_gets_no_new_request(self) -> None:
        gone = self.pool.by_key["10.0.0.1:80"]
        self.pool.remember_client_ip("192.0.2.1", gone)
        self.pool.reconfigure(pool("app", "10.0.0.2:80", affinity="cookie"))
        self.assertIsNone(self.pool.host_for_token(gone.affinity_token))
        self.assertIsNone(self.pool.host_for_client_ip("192.0.2.1"))
        self.assertIsNone(self.pool.bound_host(gone))
        self.assertEqual({self.pool.choose() for _ in range(4)}, {self.pool.by_key["10.0.0.2:80"]})

    def test_a_host_that_comes_back_keeps_its_affinity_token(self) -> None:
        token = self.pool.by_key["10.0.0.1:80"].affinity_token
        self.pool.reconfigure(pool("app", "10.0.0.2:80", affinity="cookie"))
        self.pool.reconfigure(pool("app", "10.0.0.1:80", "10.0.0.2:80", affinity="cookie"))
        self.assertIs(self.pool.host_for_token(token), self.pool.by_key["10.0.0.1:80"])

    def test_hosts_announced_by_agents_stay(self) -> None:
        self.pool.by_key["10.0.0.1:80"].agent = 42
        _, removed = self.pool.reconfigure(pool("app", "10.0.0.2:80"))
        self.assertEqual(removed, [])
        self.assertIn("10.0.0.1:80", self.pool.by_key)

    def test_weights_and_balance(self) -> None:
        before = self.pool.allotment
        self.pool.reconfigure(pool("app", ("10.0.0.1:80", 5), "10.0.0.2:80", balance="tokens"))
        host = self.pool.by_key["10.0.0.1:80"]
        self.assertEqual((host.weight, host.capacity), (5, 5))
        self.assertIsNot(self.pool.allotment, before)


class RouterTests(SynchronousTestCase):
    """Requests in flight across a reload, on the router's fakes."""

    def harness(self) -> Harness:
        return Harness(pools=[pool("app", "10.0.0.1:80"), pool("extra", "10.0.0.3:80")],
                       routes=[route("extra", path_prefix="/x/")])

    def test_in_flight_request_survives_a_route_and_pool_change(self) -> None:
        h = self.harness()
        c = h.client()
        c.send(get(b"/x/1"))
        b = h.accept()
        self.assertEqual(b.key, "10.0.0.3:80")
        b.received()
        # The reload: /x/ now goes to "app", pool "extra" is gone.
        h.listener.reconfigure(h.config.__class__(name="test", endpoint="tcp:0", pool="app"))
        gone = h.farm.remove_pool("extra")
        h.upstreams.retire(gone.hosts[0])
        b.send(ok(b"old"))
        self.assertEqual(c.received(), relayed_ok(b"old"))
        # The next request on the same keep-alive connection follows the new rules.
        c.send(get(b"/x/2"))
        b2 = h.accept()
        self.assertEqual(b2.key, "10.0.0.1:80")
        b2.received()
        b2.send(ok(b"new"))
        self.assertEqual(c.received(), relayed_ok(b"new"))
        # The retired host's connection closed once its exchange was done.
        self.assertTrue(b.closed)
        self.assertFalse(c.closed)

    def test_in_flight_request_survives_the_removal_of_its_host(self) -> None:
        h = self.harness()
        c = h.client()
        c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
        b = h.accept()
        app = h.pool("app")
        (gone,) = app.reconfigure(pool("app", "10.0.0.2:80"))[1]
        h.upstreams.retire(gone)
        c.send(b"def")
        self.assertTrue(b.received().endswith(b"\r\n\r\nabcdef"))
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())
        self.assertEqual(gone.active_requests, 0)
        c.send(get())
        self.assertEqual(h.accept().key, "10.0.0.2:80")

    def test_a_removed_listener_serves_its_last_request_with_a_removed_pool(self) -> None:
        h = self.harness()
        c = h.client()
        # The reload removes the listener and pool "extra" (as Unit._retire does it).
        h.listener.retired_pools = dict(h.farm.pools)
        h.listener.close_idle(linger=2.0)
        h.farm.remove_pool("extra")
        c.send(get(b"/x/last"))
        b = h.accept()
        self.assertEqual(b.key, "10.0.0.3:80")
        b.received()
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok(after=b"connection: close\r\n"))
        self.assertTrue(c.closed)

    def test_linger_keeps_an_idle_connection_for_one_more_request(self) -> None:
        h = self.harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(ok())
        c.received()
        silent = h.client()
        h.listener.close_idle(linger=2.0)
        h.flush()
        self.assertFalse(c.closed)
        self.assertFalse(silent.closed)
        c.send(get())
        b.received()
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok(after=b"connection: close\r\n"))
        self.assertTrue(c.closed)
        h.advance(2.0)
        self.assertTrue(silent.closed)
        self.assertEqual(h.listener.connections, set())


class _Reactor(MemoryReactorClock):
    """A fake reactor where some ports are taken."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: set[int] = set()

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.taken:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


class UnitReloadTests(SynchronousTestCase):
    def unit(self, first: UnitConfig) -> tuple[Unit, _Reactor]:
        reactor = _Reactor()
        unit = Unit(first, reactor)
        unit.startService()
        self.addCleanup(unit.stopService)
        return unit, reactor

    def test_reload_binds_swaps_and_retires(self) -> None:
        unit, reactor = self.unit(config())
        old_port = unit.ports["web"]
        stats = unit.listeners["web"].stats
        new = config(
            listeners=[{"name": "web", "endpoint": "tcp:8080", "pool": "app",
                        "route": [{"path_prefix": "/x/", "pool": "other"}]},
                       {"name": "side", "endpoint": "tcp:8081", "pool": "other"}],
            pools={"app": {"hosts": ["10.0.0.2:80"]}, "other": {"hosts": ["10.0.0.3:80"]}},
            grace_period=1.0,
        )
        kept = unit.farm.pools["app"].by_key["10.0.0.2:80"]
        unit.reload(new)
        self.assertIs(unit.ports["web"], old_port)
        self.assertIs(unit.listeners["web"].stats, stats)
        self.assertEqual(unit.listeners["web"].config.routes[0].pool, "other")
        self.assertEqual(sorted(unit.farm.pools), ["app", "other"])
        self.assertIs(unit.farm.pools["app"].by_key["10.0.0.2:80"], kept)
        self.assertEqual(sorted(unit.listener_stats), ["side", "web"])
        self.assertEqual([p[0] for p in reactor.tcpServers], [8080, 0, 8081])
        self.assertIs(unit.config, new)
        # Moving "side" to another port: bound before the old one goes.
        moved = config(
            listeners=[{"name": "web", "endpoint": "tcp:8080", "pool": "app"},
                       {"name": "side", "endpoint": "tcp:8082", "pool": "other"}],
            pools={"app": {"hosts": ["10.0.0.2:80"]}, "other": {"hosts": ["10.0.0.3:80"]}},
            grace_period=1.0,
        )
        side_stats = unit.listeners["side"].stats
        old_side = unit.ports["side"]
        unit.reload(moved)
        self.assertIsNot(unit.ports["side"], old_side)
        self.assertIs(unit.listeners["side"].stats, side_stats)
        self.assertNotIn(old_side, unit.ports.values())
        self.assertEqual(unit.retiring, set())  # it had no connection to wait for

    def test_a_port_that_cannot_be_bound_refuses_and_changes_nothing(self) -> None:
        first = config()
        unit, reactor = self.unit(first)
        reactor.taken.add(8082)
        new = config(
            listeners=[{"name": "web", "endpoint": "tcp:8080", "pool": "app"},
                       {"name": "b", "endpoint": "tcp:8081", "pool": "new"},
                       {"name": "c", "endpoint": "tcp:8082", "pool": "app"}],
            pools={"app": {"hosts": ["10.0.0.9:80"]}, "new": {"hosts": ["10.0.0.4:80"]}},
        )
        with self.assertRaises(ReloadRefused) as caught:
            unit.reload(new)
        self.assertIn("cannot listen on tcp:8082", str(caught.exception))
        self.assertIs(unit.config, first)
        self.assertEqual(sorted(unit.farm.pools), ["app", "extra"])
        self.assertEqual(sorted(unit.listeners), ["web"])
        self.assertEqual(sorted(unit.farm.pools["app"].by_key), ["10.0.0.1:80", "10.0.0.2:80"])

    def test_probes_follow_hosts_and_checks(self) -> None:
        checked = {"hosts": ["10.0.0.1:80", "10.0.0.2:80"], "check": {"path": "/health", "interval": 1.0}}
        unit, _ = self.unit(config(pools={"app": checked, "extra": {"hosts": ["10.0.0.3:80"]}}))
        app = unit.farm.pools["app"]
        self.assertEqual(sorted(h.key for h in unit.health._probes), ["10.0.0.1:80", "10.0.0.2:80"])
        kept = app.by_key["10.0.0.2:80"]
        kept_probes = unit.health._probes[kept]
        unit.reload(config(pools={"app": {**checked, "hosts": ["10.0.0.2:80", "10.0.0.4:80"]},
                                  "extra": {"hosts": ["10.0.0.3:80"]}}))
        self.assertEqual(sorted(h.key for h in unit.health._probes), ["10.0.0.2:80", "10.0.0.4:80"])
        self.assertIs(unit.health._probes[kept], kept_probes)  # its rise/fall state goes on
        kept.probe_up, kept.probe_reason = False, "check: 503"
        unit.reload(config(pools={"app": {"hosts": ["10.0.0.2:80", "10.0.0.4:80"]},
                                  "extra": {"hosts": ["10.0.0.3:80"]}}))
        self.assertEqual(unit.health._probes, {})
        self.assertEqual((kept.probe_up, kept.probe_reason), (True, ""))

    def test_reload_file_refuses_an_invalid_file(self) -> None:
        unit, _ = self.unit(config())
        directory = tempfile.mkdtemp(prefix="nlb-reload-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "unit.toml")
        with open(path, "w") as f:
            f.write("[unit\n")
        unit.config_path = path
        with self.assertRaises(ReloadRefused) as caught:
            unit.reload_file()
        self.assertIn("invalid TOML", str(caught.exception))
        unit.config_path = None
        with self.assertRaises(ReloadRefused) as caught:
            unit.reload_file()
        self.assertEqual(caught.exception.reasons, ["this unit was not started from a config file"])


class _Control:
    """A unit as the admin API sees it, answering from a script."""

    def __init__(self, refusal: list[str] | None = None) -> None:
        self.refusal = refusal
        self.calls: list[str] = []

    def reload_file(self) -> Any:
        self.calls.append("reload")
        if self.refusal:
            raise ReloadRefused(self.refusal)
        return plan(config(), config(grace_period=2.0))

    def upgrade(self) -> int:
        self.calls.append("upgrade")
        if self.refusal:
            raise ReloadRefused(self.refusal)
        return 4242


class AdminTests(SynchronousTestCase):
    def resource(self, control: Any, token: str | None = None) -> Any:
        clock = MemoryReactorClock()
        return AdminResource(make_farm(clock), {}, FakeUpstreams(), "u1", token, clock, control=control)

    def test_reload_answers_the_plan(self) -> None:
        control = _Control()
        code, answer = call_json(self.resource(control), b"POST", "/api/v1/reload")
        self.assertEqual((code, answer["reloaded"], answer["plan"]["unit"]), (200, True, ["grace_period"]))
        self.assertEqual(answer["summary"], "unit keys: grace_period")
        code, answer = call_json(self.resource(control), b"POST", "/api/v1/upgrade")
        self.assertEqual((code, answer), (202, {"upgrading": True, "pid": 4242}))
        self.assertEqual(control.calls, ["reload", "upgrade"])

    def test_refusals_are_409_with_the_reasons(self) -> None:
        reasons = ["unit.name: needs a restart (...)", "unit.health: needs a restart (...)"]
        for path in ("/api/v1/reload", "/api/v1/upgrade"):
            code, answer = call_json(self.resource(_Control(reasons)), b"POST", path)
            self.assertEqual((code, answer), (409, {"error": "; ".join(reasons), "reasons": reasons}))

    def test_without_a_unit_and_with_the_wrong_method(self) -> None:
        code, answer = call_json(self.resource(None), b"POST", "/api/v1/reload")
        self.assertEqual((code, answer), (404, {"error": "this unit cannot reload or upgrade"}))
        code, _ = call_json(self.resource(_Control()), b"GET", "/api/v1/reload")
        self.assertEqual(code, 405)

    def test_the_token_guards_reload_and_a_reload_changes_it(self) -> None:
        control = _Control()
        resource = self.resource(control, token="old-token")
        code, _ = call_json(resource, b"POST", "/api/v1/reload")
        self.assertEqual((code, control.calls), (401, []))
        resource.set_token("new-token")
        code, _ = call_json(resource, b"POST", "/api/v1/reload", headers={b"Authorization": b"Bearer old-token"})
        self.assertEqual(code, 401)
        code, _ = call_json(resource, b"POST", "/api/v1/reload", headers={b"Authorization": b"Bearer new-token"})
        self.assertEqual(code, 200)


class UpgradeRefusalTests(SynchronousTestCase):
    def test_how_twistd_runs_decides(self) -> None:
        expected = {
            ("-n", "--pidfile="): None,
            ("-n",): "upgrade needs twistd --pidfile= (the new process would find the old one's pidfile)",
            ("--pidfile=",): "upgrade needs twistd -n (run in the foreground, e.g. under systemd)",
        }
        for args, blocker in expected.items():
            options = ServerOptions()
            options.parseOptions([*args, "nlbproxy", "--demo"])
            self.assertEqual(_upgrade_blocker(options.subOptions), blocker, args)

    def test_refusals_name_every_reason(self) -> None:
        reactor = _Reactor()
        unit = Unit(config(), reactor, upgrade_blocker="upgrade needs twistd -n (...)")
        with self.assertRaises(ReloadRefused) as caught:
            unit.upgrade()
        self.assertEqual(caught.exception.reasons, [
            "this unit was not started from a config file", "upgrade needs twistd -n (...)",
            "this unit does not serve yet"])
        self.assertIsNone(unit.upgrading)

    def test_a_process_that_handed_over_only_drains(self) -> None:
        unit = Unit(config(), _Reactor())
        unit.handed_over = True
        with self.assertRaises(ReloadRefused) as caught:
            unit.reload(config(grace_period=1.0))
        self.assertIn("reload the new process", str(caught.exception))
        with self.assertRaises(ReloadRefused) as caught:
            unit.upgrade()
        self.assertIn("handed its sockets to its upgrade already", str(caught.exception))


class TLSReloadTests(SynchronousTestCase):
    """A TLS listener's certificate files change with a reload; its session
    setup and TLS itself (on or off) need a restart."""

    def setUp(self) -> None:
        from tests.certs import CA, temp_dir

        directory = temp_dir(self)
        ca = CA(directory)
        self.first = str(ca.issue("first.pem", dns=["first.example"]))
        self.second = str(ca.issue("second.example.pem", dns=["second.example"]))

    def tls_config(self, *certificates: str, **listener: Any) -> UnitConfig:
        return config(listeners=[{"name": "web", "endpoint": "tcp:8443", "pool": "app",
                                  "certificates": list(certificates), **listener}])

    def test_new_certificate_files_serve_new_connections(self) -> None:
        reactor = _Reactor()
        unit = Unit(self.tls_config(self.first), reactor)
        unit.startService()
        self.addCleanup(unit.stopService)
        server = unit.tls["web"]
        plan = unit.reload(self.tls_config(self.second))
        self.assertEqual([(c.new.name, c.keys) for c in plan.listeners_changed], [("web", ("certificates",))])
        self.assertIs(unit.tls["web"], server)  # the bound socket's factory keeps serving
        self.assertEqual([c["names"] for c in server.describe()], [["second.example"]])
        self.assertEqual(server.paths, (self.second,))

    def test_a_certificate_file_gone_bad_refuses_the_reload(self) -> None:
        reactor = _Reactor()
        unit = Unit(self.tls_config(self.first), reactor)
        unit.startService()
        self.addCleanup(unit.stopService)
        new = self.tls_config(self.second)
        with open(self.second, "wb") as broken:
            broken.write(b"not a certificate")
        with self.assertRaises(ReloadRefused) as refused:
            unit.reload(new)
        self.assertIn("listener web.certificates", str(refused.exception))
        self.assertEqual([c["names"] for c in unit.tls["web"].describe()], [["first.example"]])
        self.assertIsNot(unit.config, new)

    def test_session_setup_and_tls_on_off_need_a_restart(self) -> None:
        with self.assertRaises(ReloadRefused) as refused:
            plan(self.tls_config(self.first), self.tls_config(self.first, session_tickets="off"))
        self.assertIn("web.session_tickets: needs a restart", str(refused.exception))
        with self.assertRaises(ReloadRefused) as refused:
            plan(self.tls_config(self.first), config(listeners=[
                {"name": "web", "endpoint": "tcp:8443", "pool": "app"}]))
        self.assertIn("turning TLS on or off needs a restart", str(refused.exception))
        # A new endpoint is a new listener: TLS may change with it.
        moved = config(listeners=[{"name": "web", "endpoint": "tcp:8444", "pool": "app"}])
        self.assertEqual(len(plan(self.tls_config(self.first), moved).listeners_replaced), 1)
