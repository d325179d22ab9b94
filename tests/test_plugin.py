"""Routing plugins: discovery, options checked at start, the plugin's route.

Sans-I/O; runs under trial and pytest.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nlbproxy import limits, plugin
from nlbproxy.config import ConfigError, RouteConfig, parse_config
from nlbproxy.plugin import IRequestClassifier, IRoutingPlugin, OptionError, Options, RoutingPlugin
from nlbproxy.routing import Decision, PluginRule, Refusal, RequestView, RouteTable
from nlbproxy.testing import request
from tests.fakes import Harness, pool, route

A = "10.0.0.1:8080"
B = "10.0.0.2:8080"


def unit(*routes: dict[str, Any]) -> dict[str, Any]:
    return {
        "listener": [{"name": "web", "endpoint": "tcp:0", "pool": "app", "route": list(routes)}],
        "pool": {"app": {"hosts": [A]}, "gold": {"hosts": [B]}},
    }


def config_error(data: dict[str, Any]) -> ConfigError:
    try:
        parse_config(data, "unit.toml")
    except ConfigError as exc:
        return exc
    raise AssertionError("the config was accepted")


@implementer(IRequestClassifier)
class Scripted:
    """A classifier answering what the test says, recording what it saw."""

    def __init__(self, answer: Any, body_prefix: int = 0) -> None:
        self.answer = answer
        self.body_prefix = body_prefix
        self.seen: list[RequestView] = []

    def classify(self, request: RequestView) -> Any:
        self.seen.append(request)
        return self.answer(request) if callable(self.answer) else self.answer


def plugin_route(classifier: Any, **keys: Any) -> RouteConfig:
    return RouteConfig(plugin="scripted", classifier=classifier, **keys)


class DiscoveryTests(SynchronousTestCase):
    def test_the_shipped_plugins_are_found(self) -> None:
        found = plugin.routing_plugins()
        self.assertTrue({"tenant", "soap-operation"} <= set(found), found)
        for name, each in found.items():
            self.assertTrue(verifyObject(IRoutingPlugin, each))
            self.assertEqual(each.name, name)

    def _package(self, files: dict[str, str]) -> ModuleType:
        """A fresh plugin package in a temporary directory."""
        root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, root)
        package = root / "extra_routing_plugins"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        for name, text in files.items():
            (package / name).write_text(textwrap.dedent(text))
        sys.path.insert(0, str(root))
        self.addCleanup(sys.path.remove, str(root))
        self.addCleanup(sys.modules.pop, "extra_routing_plugins", None)
        import extra_routing_plugins  # type: ignore[import-not-found]

        return extra_routing_plugins

    def test_an_unknown_name_lists_the_known_ones(self) -> None:
        with self.assertRaises(plugin.UnknownPlugin) as caught:
            plugin.find("nope")
        self.assertIn("no routing plugin named 'nope' (found: ", str(caught.exception))
        self.assertIn("tenant", str(caught.exception))

    def test_two_plugins_of_one_name_are_an_error(self) -> None:
        body = """
            from nlbproxy.plugin import RoutingPlugin
            twin = RoutingPlugin("twin", lambda options: None)
        """
        package = self._package({"one.py": body, "two.py": body})
        with self.assertRaises(plugin.PluginError) as caught:
            plugin.routing_plugins(package)
        self.assertIn("two routing plugins are named 'twin'", str(caught.exception))

    def test_a_classifier_asking_too_much_body_is_refused(self) -> None:
        greedy = RoutingPlugin("greedy", lambda options: Scripted(None, limits.MAX_PENDING_BODY + 1))
        with self.assertRaises(plugin.PluginError) as caught:
            plugin.configure(greedy, {}, {"app"})
        self.assertIn("asks for 65537 body bytes", str(caught.exception))
        broken = RoutingPlugin("broken", lambda options: object())  # type: ignore[arg-type,return-value]
        self.assertRaises(plugin.PluginError, plugin.configure, broken, {}, {"app"})

    def test_a_plugins_value_error_is_an_option_error(self) -> None:
        def factory(options: Options) -> Any:
            raise ValueError("the moon is wrong")

        with self.assertRaises(OptionError) as caught:
            plugin.configure(RoutingPlugin("moody", factory), {}, {"app"})
        self.assertEqual((caught.exception.key, caught.exception.reason), ((), "the moon is wrong"))


class OptionsTests(SynchronousTestCase):
    def read(self, options: dict[str, Any]) -> Options:
        return Options(options, frozenset({"app", "gold"}))

    def test_readers(self) -> None:
        options = self.read({"s": "x", "n": 3, "p": "gold", "t": {"a": "app"}})
        self.assertEqual(options.string("s"), "x")
        self.assertEqual(options.integer("n", 1, 5), 3)
        self.assertEqual(options.pool("p"), "gold")
        self.assertEqual(options.pool_table("t"), {"a": "app"})
        self.assertEqual(options.pool("absent", None), None)
        self.assertEqual(options.pool_table("none"), {})
        options.done()

    def test_errors_name_the_key(self) -> None:
        cases: list[tuple[dict[str, Any], Any, tuple[str, ...], str]] = [
            ({}, lambda o: o.string("s"), ("s",), "missing required option"),
            ({"s": 1}, lambda o: o.string("s"), ("s",), "expected a non-empty string, got 1"),
            ({"n": 9}, lambda o: o.integer("n", 1, 5), ("n",), "expected an integer from 1 to 5, got 9"),
            ({"n": True}, lambda o: o.integer("n", 0, 5), ("n",), "expected an integer from 0 to 5, got True"),
            ({"p": "lead"}, lambda o: o.pool("p"), ("p",), "unknown pool 'lead'"),
            ({"t": {"a.b": "lead"}}, lambda o: o.pool_table("t"), ("t", "a.b"), "unknown pool 'lead'"),
            ({"t": {"a": 1}}, lambda o: o.pool_table("t"), ("t", "a"), "expected a pool name, got 1"),
            ({"t": "x"}, lambda o: o.pool_table("t"), ("t",), "expected a table of names to pools, got 'x'"),
            ({"typo": 1}, lambda o: o.done(), ("typo",), "unknown option"),
        ]
        for options, reading, key, reason in cases:
            with self.assertRaises(OptionError) as caught:
                reading(self.read(options))
            self.assertEqual((caught.exception.key, caught.exception.reason), (key, reason), options)


class ConfigTests(SynchronousTestCase):
    """``plugin`` and ``options`` in ``[[listener.route]]``."""

    def test_a_plugin_route_needs_no_pool(self) -> None:
        config = parse_config(unit({"plugin": "tenant", "options": {"header": "X-Tenant", "default": "app"}}))
        (rule,) = config.listeners[0].routes
        self.assertEqual((rule.pool, rule.plugin, dict(rule.options)), (None, "tenant", {"header": "X-Tenant", "default": "app"}))
        self.assertTrue(verifyObject(IRequestClassifier, rule.classifier))
        table = RouteTable(config.listeners[0].routes, "app")
        self.assertIsInstance(table.rules[0], PluginRule)
        self.assertEqual(table.decide(request(headers={"X-Tenant": "acme"})), Decision("app", b"acme"))

    def test_errors_name_file_and_key(self) -> None:
        cases = [
            ({"plugin": "nope"}, "listener[0].route[0].plugin", "no routing plugin named 'nope'"),
            ({"plugin": "tenant"}, "listener[0].route[0].options.header", "missing required option"),
            ({"plugin": "tenant", "options": {"header": "X-T", "pools": {"acme.eu": "lead"}}},
             'listener[0].route[0].options.pools."acme.eu"', "unknown pool 'lead'"),
            ({"plugin": "tenant", "options": {"header": "X-T", "default": "app", "hedaer": "X"}},
             "listener[0].route[0].options.hedaer", "unknown option"),
            ({"plugin": "tenant", "options": "header=X"}, "listener[0].route[0].options", "expected a table"),
            ({"plugin": "ten ant"}, "listener[0].route[0].plugin", "expected a name"),
            ({"pool": "app", "path_prefix": "/x", "options": {}}, "listener[0].route[0].options",
             "options are for a plugin: set plugin too"),
            ({"plugin": "tenant", "pool": "lead", "options": {"header": "X", "default": "app"}},
             "listener[0].route[0].pool", "unknown pool 'lead'"),
            ({"path_prefix": "/x"}, "listener[0].route[0].pool", "missing required key"),
        ]
        for route_table, key, reason in cases:
            error = config_error(unit({"path_prefix": "/first", "pool": "app"}, route_table))
            self.assertEqual(error.path, "unit.toml")
            self.assertEqual(error.key, key.replace("route[0]", "route[1]"), route_table)
            self.assertIn(reason, error.reason)


class PluginRuleTests(SynchronousTestCase):
    def table(self, *routes: RouteConfig) -> RouteTable:
        return RouteTable(routes, "app")

    def test_the_other_keys_gate_the_classifier(self) -> None:
        classifier = Scripted(Decision("gold"))
        table = self.table(plugin_route(classifier, path_prefix="/api/", method=(b"POST",)))
        self.assertEqual(table.decide(request("GET", "/api/x")), Decision("app"))
        self.assertEqual(table.decide(request("POST", "/api/x")), Decision("gold"))
        self.assertEqual([v.method for v in classifier.seen], [b"POST"])

    def test_a_decline_is_the_routes_pool_else_the_next_routes(self) -> None:
        declines = Scripted(None)
        self.assertEqual(self.table(plugin_route(declines, pool="gold")).decide(request()), Decision("gold"))
        table = self.table(plugin_route(declines), route("gold", path_prefix="/g"))
        self.assertEqual(table.decide(request(target="/g")), Decision("gold"))
        self.assertEqual(table.decide(request(target="/")), Decision("app"))

    def test_a_later_answer(self) -> None:
        answer: Deferred[Decision | None] = Deferred()
        table = self.table(plugin_route(Scripted(lambda v: answer), pool="app"), route("gold", path_prefix="/"))
        result = table.decide(request())
        assert isinstance(result, Deferred)
        self.assertNoResult(result)
        answer.callback(None)
        self.assertEqual(self.successResultOf(result), Decision("app"))
        table = self.table(plugin_route(Scripted(lambda v: succeed(None))), route("gold", path_prefix="/"))
        self.assertEqual(self.successResultOf(table.decide(request())), Decision("gold"))  # type: ignore[arg-type]

    def test_answers_that_are_not_decisions_fail(self) -> None:
        table = self.table(plugin_route(Scripted("gold")))
        self.assertRaises(TypeError, table.decide, request())
        table = self.table(plugin_route(Scripted(lambda v: succeed("gold"))))
        self.failureResultOf(table.decide(request()), TypeError)  # type: ignore[arg-type]
        table = self.table(plugin_route(Scripted(lambda v: fail(RuntimeError("bug")))))
        self.failureResultOf(table.decide(request()), RuntimeError)  # type: ignore[arg-type]

    def test_refusals_pass_through(self) -> None:
        def refuse(view: RequestView) -> None:
            raise Refusal(403, b"no\n")

        self.assertRaises(Refusal, self.table(plugin_route(Scripted(refuse))).decide, request())

    def test_the_table_holds_the_body_a_plugin_wants(self) -> None:
        table = self.table(route("gold", path_prefix="/g"), plugin_route(Scripted(None, body_prefix=100)))
        self.assertEqual(table.body_prefix, 100)


class RouterTests(SynchronousTestCase):
    """A plugin's route in the router core (fakes, no sockets)."""

    def test_a_plugin_routes_by_the_body_prefix_and_the_body_is_relayed_whole(self) -> None:
        classifier = Scripted(lambda v: Decision("gold") if v.body.startswith(b"gold") else None, body_prefix=4)
        h = Harness(pools=[pool("app", A), pool("gold", B)], routes=[plugin_route(classifier)])
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\ngo")
        self.assertEqual(h.attempts(), [])
        c.send(b"ld-12345")
        b = h.next_backend()
        self.assertEqual(b.key, B)
        self.assertTrue(b.received().endswith(b"\r\n\r\ngold-12345"))
        self.assertEqual((classifier.seen[0].body, classifier.seen[0].body_complete), (b"gold", False))

    def test_a_plugin_answering_a_non_decision_is_a_counted_502(self) -> None:
        h = Harness(pools=[pool("app", A)], routes=[plugin_route(Scripted("app"))])
        c = h.client()
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"502 Bad Gateway", c.received())
        self.assertEqual(h.listener.stats.routing_failures, 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
