"""The namespace topology builder: nodes reach each other, teardown leaves nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.netns import PREFIX, Topology, list_namespaces, require_netns, sweep_stale


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_ping_between_nodes_and_clean_teardown() -> None:
    links_before = _root_links()
    with Topology() as topo:
        a = topo.add_node("a", "10.77.0.1")
        b = topo.add_node("b", "10.77.0.2")
        names = topo.namespaces()
        assert all(ns in list_namespaces() for ns in names)
        assert a.mac != b.mac and a.ifname == "eth0"
        b.serve_once(b.ip, 8080, b"hello from b")
        assert a.connect(b.ip, 8080) == b"hello from b"
        # The node can run a long-lived process; teardown must kill it.
        proc = b.popen(["sleep", "300"])
        assert proc.poll() is None
    assert proc.poll() is not None
    assert not set(names) & set(list_namespaces())
    assert _root_links() == links_before


def test_teardown_on_failure() -> None:
    topo = Topology()
    with pytest.raises(RuntimeError, match="boom"), topo:
        topo.add_node("a", "10.77.0.1")
        raise RuntimeError("boom")
    assert not set(topo.namespaces()) & set(list_namespaces())


def test_vip_on_lo_and_second_segment() -> None:
    with Topology() as topo:
        topo.add_segment("back")
        unit = topo.add_node("unit", "10.77.0.1")
        back = topo.attach(unit, "back", "10.78.0.1")
        host = topo.add_node("host", "10.78.0.2", segment="back")
        host.add_vip("10.77.0.100")
        assert back.name == "eth1" and unit.interface("back") is back
        assert "10.77.0.100/32" in host.run(["ip", "addr", "show", "dev", "lo"]).stdout
        assert host.run(["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"]).stdout.strip() == "1"
        assert host.run(["sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"]).stdout.strip() == "0"
        # The unit reaches the VIP through the host once routed there.
        unit.add_route("10.77.0.100/32", host.ip)
        host.serve_once("10.77.0.100", 80, b"vip")
        assert unit.connect("10.77.0.100", 80) == b"vip"


def test_ipv6_nodes_and_vip_are_usable_at_once() -> None:
    # No duplicate address detection: the addresses work as soon as attach returns.
    with Topology() as topo:
        a = topo.add_node("a", "10.77.0.1", ip6="fd77::1")
        b = topo.add_node("b", "10.77.0.2", ip6="fd77::2")
        assert (a.ip6, a.interfaces[0].ip6) == ("fd77::1", "fd77::1")
        assert "tentative" not in a.run(["ip", "-6", "addr", "show", "dev", "eth0"]).stdout
        b.serve_once("fd77::2", 8080, b"hello over ipv6")
        assert a.connect("fd77::2", 8080) == b"hello over ipv6"
        b.add_vip("fd77::100")
        assert "fd77::100/128" in b.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
        a.add_route("fd77::100/128", "fd77::2")
        b.serve_once("fd77::100", 80, b"vip6")
        assert a.connect("fd77::100", 80) == b"vip6"
        with pytest.raises(ValueError, match="fd00::/8"):
            topo.add_node("c", "10.77.0.3", ip6="2001:db8::3")


def test_sweep_removes_dead_runs_namespaces() -> None:
    # A namespace named as if by a process that no longer exists.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}x0stale"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in sweep_stale()
        assert stale not in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_require_netns_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import netns

    monkeypatch.setattr(netns, "_probe_result", ["not root"])
    monkeypatch.setenv("NLB_REQUIRE_ROOT", "1")
    with pytest.raises(pytest.fail.Exception, match="NLB_REQUIRE_ROOT"):
        require_netns()
    monkeypatch.setenv("NLB_REQUIRE_ROOT", "0")
    with pytest.raises(pytest.skip.Exception):
        require_netns()
    assert os.getpid() > 0
