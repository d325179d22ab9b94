"""Routing plugins in a real ``twistd nlbproxy`` on loopback, driven with curl.

The unit finds the shipped plugins in the repository's ``plugins/`` and a
test-only plugin module dropped into another ``plugins/`` directory put on
its PYTHONPATH, the way an operator adds one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from tests.realnet import Farm, unit_config

# A plugin module as an operator would drop it in: one plugin raising for
# every request, one never answering.
BROKEN_PLUGINS = '''
from twisted.internet.defer import Deferred
from zope.interface import implementer

from nlbproxy.plugin import IRequestClassifier, RoutingPlugin


@implementer(IRequestClassifier)
class Raising:
    body_prefix = 0

    def classify(self, request):
        raise RuntimeError("this plugin is broken")


@implementer(IRequestClassifier)
class Silent:
    body_prefix = 0

    def classify(self, request):
        return Deferred()


explode = RoutingPlugin("test-explode", lambda options: Raising())
silent = RoutingPlugin("test-silent", lambda options: Silent())
'''


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


def state(admin: str) -> dict:
    with urllib.request.urlopen(admin + "/api/v1/state", timeout=10) as response:
        return json.loads(response.read())


def drop_in_plugins(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``plugins/`` directory (no __init__.py) with BROKEN_PLUGINS, on the
    PYTHONPATH of the processes the test starts."""
    site = tmp / "site"
    (site / "plugins").mkdir(parents=True)
    (site / "plugins" / "broken_routing.py").write_text(textwrap.dedent(BROKEN_PLUGINS))
    paths = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    return site


def test_each_tenant_sticks_to_one_host_and_tenants_spread(farm: Farm) -> None:
    backends = [farm.backend(f"b{i}")[1] for i in range(3)]
    routes = textwrap.dedent("""
        [[listener.route]]
        path_prefix = "/t/"
        plugin = "tenant"
        options = { header = "X-Tenant", default = "app" }
    """)
    unit = farm.unit(unit_config(backends, routes=routes, pools='balance = "round_robin"'))
    seen: dict[str, set[str]] = defaultdict(set)
    for i in range(24):
        # Three requests of one tenant on one keep-alive connection.
        result = curl("-H", f"X-Tenant: tenant-{i}", *[unit.url() + f"t/{n}" for n in range(3)])
        assert result.returncode == 0, result.stderr
        names = re.findall(r"^(b\d) GET /t/\d$", result.stdout, re.M)
        assert len(names) == 3, result.stdout
        seen[f"tenant-{i}"].update(names)
    assert all(len(hosts) == 1 for hosts in seen.values()), seen
    spread = {host for hosts in seen.values() for host in hosts}
    assert len(spread) >= 2, seen
    # Without the header a request is balanced as usual (the default pool, no key).
    result = curl(*[unit.url() + f"t/{n}" for n in range(3)])
    assert len(set(re.findall(r"^(b\d) GET", result.stdout, re.M))) == 3, result.stdout
    # A tenant whose host is drained moves, and only that tenant.
    first = next(iter(seen["tenant-0"]))
    host_key = backends[int(first[1])]
    request = urllib.request.Request(
        f"{unit.admin}/api/v1/pools/app/hosts/{host_key}/directive", data=b"draining", method="PUT"
    )
    urllib.request.urlopen(request, timeout=10).close()
    for i in range(24):
        out = curl("-H", f"X-Tenant: tenant-{i}", unit.url() + "t/x").stdout
        now = re.findall(r"^(b\d) GET", out, re.M)
        if seen[f"tenant-{i}"] == {first}:
            assert now and now[0] != first, out
        else:
            assert now == list(seen[f"tenant-{i}"]), (i, out)


def test_a_raising_or_silent_plugin_is_a_counted_502_and_the_unit_serves_on(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop_in_plugins(farm.tmp, monkeypatch)
    _, backend = farm.backend("b")
    routes = textwrap.dedent("""
        [[listener.route]]
        path_prefix = "/explode"
        plugin = "test-explode"

        [[listener.route]]
        path_prefix = "/hang"
        plugin = "test-silent"

        [[listener.route]]
        path_prefix = "/t/"
        plugin = "tenant"
        options = { header = "X-Tenant", default = "app" }
    """)
    unit = farm.unit(unit_config([backend], routes=routes))
    url = unit.url()
    for _ in range(2):
        result = curl("-w", "%{http_code}\n", url + "explode")
        assert result.stdout == "routing failed\n502\n", result
    result = curl("-w", "%{http_code}\n", url + "hang")
    assert result.stdout == "routing timed out\n502\n", result
    # The unit serves on, on the same connection too, shipped plugins included.
    result = curl("-w", "%{http_code}\n", url + "explode", url + "ok", "-H", "X-Tenant: a", url + "t/1")
    assert result.stdout == "routing failed\n502\nb GET /ok\n200\nb GET /t/1\n200\n", result
    assert state(unit.admin)["listeners"]["web"]["routing_failures"] == 4
    assert unit.process.popen.poll() is None
    assert "this plugin is broken" in unit.process.output()


def test_plugins_are_found_from_outside_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drop_in_plugins(tmp_path, monkeypatch)
    code = "from nlbproxy.plugin import routing_plugins; print(sorted(routing_plugins()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "['soap-operation', 'tenant', 'test-explode', 'test-silent']\n"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ('plugin = "nope"', "listener[0].route[0].plugin: no routing plugin named 'nope'"),
        ('plugin = "tenant"\noptions = { header = "X-Tenant", default = "lead" }',
         "listener[0].route[0].options.default: unknown pool 'lead'"),
    ],
)
def test_a_bad_plugin_route_fails_the_start(farm: Farm, route: str, message: str) -> None:
    path = farm.tmp / "unit.toml"
    path.write_text(unit_config(["127.0.0.1:9"], routes=f"[[listener.route]]\n{route}\n"))
    proc = subprocess.run(["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(path)],
                          cwd=farm.tmp, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"{path}: {message}" in proc.stdout + proc.stderr


def test_soap_calls_routed_by_operation_with_the_body_unchanged(farm: Farm) -> None:
    (_, app), (_, orders), (_, quotes) = farm.backend("app"), farm.backend("orders"), farm.backend("quotes")
    routes = textwrap.dedent("""
        [[listener.route]]
        path_prefix = "/shop"
        plugin = "soap-operation"
        options = { operations = { "{urn:example:shop}PlaceOrder" = "orders", GetQuote = "quotes" } }
    """)
    pools = f'[pool.orders]\nhosts = ["{orders}"]\n[pool.quotes]\nhosts = ["{quotes}"]\n'
    unit = farm.unit(unit_config([app], routes=routes, pools=pools))

    def call(operation: str, version: str = "1.1", filler: int = 0) -> tuple[str, bytes]:
        ns = "http://schemas.xmlsoap.org/soap/envelope/" if version == "1.1" else "http://www.w3.org/2003/05/soap-envelope"
        body = (
            f'<?xml version="1.0"?><e:Envelope xmlns:e="{ns}"><e:Body>'
            f'<m:{operation} xmlns:m="urn:example:shop"><m:note>{"x" * filler}</m:note></m:{operation}>'
            "</e:Body></e:Envelope>"
        ).encode()
        ctype = ["-H", "Content-Type: text/xml", "-H", 'SOAPAction: ""'] if version == "1.1" else [
            "-H", "Content-Type: application/soap+xml"]
        path = farm.tmp / "envelope.xml"
        path.write_bytes(body)
        result = curl(*ctype, "--data-binary", f"@{path}", unit.url() + "shop/sha256")
        return result.stdout, body

    def served() -> dict[str, int]:
        pools = state(unit.admin)["pools"]
        return {name: sum(h["requests"] for h in pools[name]["hosts"].values()) for name in ("app", "orders", "quotes")}

    for operation, version, filler, pool in [
        ("PlaceOrder", "1.1", 0, "orders"), ("GetQuote", "1.2", 0, "quotes"),
        ("PlaceOrder", "1.2", 1_000_000, "orders"),  # a body far past the prefix streams on unchanged
        ("Cancel", "1.1", 0, "app"),  # declined: the listener's pool
    ]:
        before = served()
        answer, body = call(operation, version, filler)
        assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}\n", answer
        after = served()
        assert {name: after[name] - before[name] for name in after} == {
            name: int(name == pool) for name in after
        }, (operation, before, after)
    # A malformed envelope: a SOAP fault from the unit, no host involved.
    before = served()
    path = farm.tmp / "bad.xml"
    path.write_bytes(b"<e:Envelope xmlns:e='http://schemas.xmlsoap.org/soap/envelope/'><e:Body><unclosed")
    result = curl("-w", "\n%{http_code}", "-H", "Content-Type: text/xml", "-H", 'SOAPAction: ""',
                  "--data-binary", f"@{path}", unit.url() + "shop/x")
    assert result.stdout.endswith("\n500") and "faultcode" in result.stdout, result.stdout
    assert served() == before
