"""A tunnelled handoff with a real ``twistd nlbproxy`` unit and ``twistd nlbagent``
agent, the host on another segment behind a router, over IPv4 and over IPv6.
Needs root.

    client 10.0.0.5 --+                    VIP 10.0.0.100 on the units' and the host's lo
    u1     10.0.0.2 --+-- lan              the client routes the VIP via u1 (then u2, then u1)
    u2     10.0.0.4 --+
    router 10.0.0.1 --+   10.1.0.1 -- back -- host 10.1.0.3 (nginx behind its agent)

In the IPv6 farm every node also has the address of :data:`IPV6` (the last
group as the IPv4 address's last byte; lan fd4e:4c42::/64, back
fd4e:4c44::/64), and everything the handoff touches speaks IPv6: the VIP
fd4e:4c42::100, the DAM, health and handoff channels, the tunnel (its
networks and sources) and the client.  Two things real IPv6 networks do are
there too: the units reach the router by its link-local address (as routes
learnt from router advertisements do), which is their ``tunnel_gateway``;
and the host creates devices with IPv6 off (``default.disable_ipv6``), so
the agent must turn it on for its TUN device.

The units' ``tunnel_networks`` holds the back segment: u1 hands the client's
connection to the host's agent with the flow's mapping, and its forwarder
sends the client's packets to the router's MAC, addressed u1 -> host with a
flow id in the ports.  The agent's ``tunnel_interface`` end restores them;
the host's replies go straight to the client through the router.  When u1
fails, u2 carries the flow from the DAM, still from u1's tunnel source (the
address the host's mapping knows); when u1 comes back it takes the flow back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nlbproxy.config import format_host_port
from tests.handoff_farm import Held, Output, cidr, closed_cleanly, server_endpoint, spawn, start_nginx, url
from tests.handoff_util import pattern
from tests.netns import Node, Topology, require_netns, require_tools, wait_for

MiB = 1024 * 1024
DAM_PORT = 9800
SECRET = b"tunnelled handoff secret\n"
HANDOFF_PORT = 9904
HEALTH_PORT = 9903
DOWNLOAD = 16 * MiB
#: Fewer client packets than the download surely takes through the forwarder.
ACKS = 20


@dataclass(frozen=True)
class Plan:
    """The addresses the farm's traffic uses, all of one family: ``lan`` by
    node name (the router's leg there included), ``back`` the host's segment
    (a CIDR), ``router_back`` and ``host`` the addresses on it."""

    vip: str
    lan: dict[str, str]
    back: str
    router_back: str
    host: str

    @property
    def v6(self) -> bool:
        return ":" in self.vip


IPV4 = Plan("10.0.0.100", {"client": "10.0.0.5", "u1": "10.0.0.2", "u2": "10.0.0.4", "router": "10.0.0.1"},
            "10.1.0.0/24", "10.1.0.1", "10.1.0.3")
IPV6 = Plan("fd4e:4c42::100",
            {"client": "fd4e:4c42::5", "u1": "fd4e:4c42::2", "u2": "fd4e:4c42::4", "router": "fd4e:4c42::1"},
            "fd4e:4c44::/64", "fd4e:4c44::1", "fd4e:4c44::3")
UNITS = ("u1", "u2")


class TunnelFarm:
    def __init__(self, topo: Topology, tmp: Path, plan: Plan) -> None:
        self.tmp = tmp
        self.plan = p = plan
        (tmp / "secret.key").write_bytes(SECRET)
        topo.add_segment("back")

        def ip6(address: str) -> str | None:
            return address if p.v6 else None

        self.client = topo.add_node("client", IPV4.lan["client"], ip6=ip6(p.lan["client"]))
        self.units = {name: topo.add_node(name, IPV4.lan[name], ip6=ip6(p.lan[name])) for name in UNITS}
        self.router = topo.add_node("router", IPV4.lan["router"], ip6=ip6(p.lan["router"]))
        topo.attach(self.router, "back", IPV4.router_back, ip6=ip6(p.router_back))
        self.host = topo.add_node("host", IPV4.host, segment="back", ip6=ip6(p.host))
        self.router.sysctl("net.ipv6.conf.all.forwarding" if p.v6 else "net.ipv4.ip_forward", 1)
        self.router.relax_rp_filter()
        #: The units' tunnel_gateway.  An IPv6 router is often known by its
        #: link-local address only (routes learnt from its advertisements):
        #: the IPv6 units route the back segment, and tunnel, through that one.
        self.gateway = p.lan["router"]
        if p.v6:
            out = self.router.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]).stdout
            self.gateway = out.split()[3].split("/")[0]
        for unit in self.units.values():
            unit.run(["ip", "addr", "add", cidr(p.vip), "dev", "lo"])
            unit.relax_rp_filter()
            unit.run(["ip", "route", "replace", p.back, "via", self.gateway, "dev", unit.ifname])
        self.client.add_route(cidr(p.vip), p.lan["u1"])
        self.host.add_vip(p.vip)
        self.host.run(["ip", "-6" if p.v6 else "-4", "route", "replace", "default", "via", p.router_back])
        if p.v6:
            # As on hosts that enable IPv6 on chosen interfaces only: the
            # agent's TUN device is born with IPv6 off, and the agent turns it on.
            self.host.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
        self.out: dict[str, Output] = {}
        self.admin: dict[str, str] = {}
        self._nginx()
        self._agent()
        for name in self.units:
            self.start_unit(name)
        for name in self.units:
            self.out[name].wait_for("farm known", timeout=30)

    def start(self, name: str, node: Node, argv: list[str]) -> Output:
        self.out[name] = spawn(node, argv)
        return self.out[name]

    def _nginx(self) -> None:
        directory = self.tmp / "nginx"
        (directory / "www").mkdir(parents=True)
        (directory / "www" / "big").write_bytes(pattern(DOWNLOAD, seed=5))
        (directory / "www" / "hello").write_bytes(b"hello from h1\n")
        start_nginx(self.host, directory, self.plan.host)

    def _agent(self) -> None:
        p = self.plan
        units = ", ".join(f'"{format_host_port(p.lan[name], HEALTH_PORT)}"' for name in UNITS)
        config = self.tmp / "agent.toml"
        config.write_text(
            f'[agent]\nname = "h1"\nunits = [{units}]\napi = "tcp:0:interface=127.0.0.1"\n'
            f'secret_file = "{self.tmp / "secret.key"}"\nhandoff = {server_endpoint(HANDOFF_PORT, p.host)}\n'
            f'tunnel_interface = "{self.host.ifname}"\n\n'
            f'[[app]]\nname = "h1"\nendpoint = "{format_host_port(p.host, 8080)}"\ndeliver = "bridge"\n'
            f'bridge_to = "127.0.0.1:8082"\nproxy_protocol = true\n'
        )
        out = self.start("agent", self.host, ["twistd", "-n", "--pidfile=", "nlbagent", "--config", str(config)])
        out.wait_for("tunnel end on ")
        out.wait_for("handoffs on ")
        self.admin["agent"] = out.wait_for(r"api on (http://\S+)").group(1).rstrip("/")

    def start_unit(self, name: str) -> None:
        p = self.plan
        ip = p.lan[name]
        peers = ", ".join(f'"{format_host_port(p.lan[other], DAM_PORT)}"' for other in UNITS if other != name)
        config = self.tmp / f"{name}.toml"
        config.write_text(
            f'[unit]\nname = "{name}"\nadmin = "tcp:0:interface=127.0.0.1"\n'
            f'secret_file = "{self.tmp / "secret.key"}"\nhealth = "{format_host_port(ip, HEALTH_PORT)}"\n'
            f'dam = {server_endpoint(DAM_PORT, ip)}\npeers = [{peers}]\n'
            f'handoff_port = {HANDOFF_PORT}\nforwarder_in = "eth0"\n'
            f'tunnel_networks = ["{p.back}"]\ntunnel_source = "{ip}"\n'
            f'tunnel_gateway = "{self.gateway}"\n\n'
            f'[[listener]]\nname = "vip"\nendpoint = {server_endpoint(80, p.vip)}\npool = "h1"\nhandoff = true\n\n'
            f'[pool.h1]\nhosts = ["{format_host_port(p.host, 8080)}"]\n'
        )
        out = self.start(name, self.units[name],
                         ["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(config)])
        self.admin[name] = out.wait_for(r"admin API on (http://\S+)").group(1).rstrip("/")

    def get(self, name: str, path: str) -> Any:
        node = self.units.get(name, self.host)
        return json.loads(node.run(["curl", "-sS", "--fail", "--max-time", "10", self.admin[name] + path]).stdout)


@pytest.fixture(scope="module", params=["ipv4", "ipv6"])
def farm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelFarm]:
    require_netns()
    require_tools("nginx", "nft", "curl")
    plan = IPV6 if request.param == "ipv6" else IPV4
    with Topology() as topo:
        yield TunnelFarm(topo, tmp_path_factory.mktemp(f"tunnel-handoff-{request.param}"), plan)


def test_curl_download_through_a_tunnelled_handoff(farm: TunnelFarm) -> None:
    expected = hashlib.sha256(pattern(DOWNLOAD, seed=5)).hexdigest()
    piped = farm.client.run(["sh", "-c", f"curl -sS --fail --max-time 120 '{url(farm.plan.vip, 80, '/big')}' | sha256sum"],
                            timeout=150)
    assert piped.stdout.split()[0] == expected
    handoff = farm.get("u1", "/api/v1/state")["handoff"]
    assert handoff["handed_off"] >= 1 and handoff["failed"] == {} and handoff["fell_back"] == {}, handoff
    forwarder = handoff["forwarder"]
    # The client's ACKs went through the forwarder, tunnelled (how many
    # depends on GRO and the machine's load: 88 to 300 seen for 16 MiB).
    assert forwarder["metrics"]["packets"] > ACKS, forwarder
    assert forwarder["metrics"]["drops"] == {}, forwarder
    agent = farm.get("agent", "/v1/handoff")
    assert agent["stats"]["restored"] >= 1 and agent["stats"]["bridged"] >= 1, agent
    assert agent["tunnel"]["port"]["injected"] > ACKS, agent
    # The host's kernel dropped the tunnelled originals (the family's rule of
    # the agent's table counted them) instead of answering them.
    rules = farm.host.run(["nft", "list", "chain", "inet", "nlbagent_tunnel", "prerouting"]).stdout
    family = 6 if farm.plan.v6 else 4
    dropped = re.search(rf"@tunnel{family} counter packets (\d+)", rules)
    assert dropped is not None and int(dropped.group(1)) > ACKS, rules
    # curl closed: the agent reported the end, the unit deleted the route and
    # released the flow id, and the agent removed the mapping.
    wait_for(lambda: farm.get("u1", "/api/v1/state")["handoff"]["live"] == 0, what="the route deleted")
    wait_for(lambda: farm.get("agent", "/v1/handoff")["tunnel"]["mappings"] == 0,
             what="the mapping removed")
    # The client's last ACK came through the lingering route and mapping.
    assert closed_cleanly(farm.host)


def test_path_mtu_discovery_through_the_tunnel(farm: TunnelFarm) -> None:
    """The router's hop towards the client narrows to 1280 bytes: the host's
    full-size replies meet it, and the router's ICMP "too big" goes to their
    source, the VIP, so to u1.  The tunnel carries TCP only, so u1 sends the
    message on to the host's own address from its tunnel source; the host
    lowers its path MTU.  Without that the download stalls after the first
    window (IPv6 routers never fragment, and IPv4 replies carry DF)."""
    p = farm.plan
    family = "-6" if p.v6 else "-4"
    farm.router.run(["ip", family, "route", "replace", cidr(p.vip), "via", p.lan["u1"]])
    farm.router.run(["ip", "link", "set", "eth0", "mtu", "1280"])
    try:
        before = farm.get("u1", "/api/v1/state")["handoff"]
        piped = farm.client.run(["sh", "-c", f"curl -sS --fail --max-time 60 '{url(p.vip, 80, '/big')}' | sha256sum"],
                                timeout=90)
        assert piped.stdout.split()[0] == hashlib.sha256(pattern(DOWNLOAD, seed=5)).hexdigest()
        after = farm.get("u1", "/api/v1/state")["handoff"]
        assert after["handed_off"] == before["handed_off"] + 1 and after["fell_back"] == {}, after
        metrics = after["forwarder"]["metrics"]
        assert metrics["too_big"] > before["forwarder"]["metrics"]["too_big"] and metrics["drops"] == {}, metrics
    finally:
        farm.router.run(["ip", "link", "set", "eth0", "mtu", "1500"])
        farm.router.run(["ip", family, "route", "del", cidr(p.vip)])


def live(farm: TunnelFarm, unit: str) -> int:
    return int(farm.get(unit, "/api/v1/state")["handoff"]["live"])


def test_zz_tunnelled_connection_survives_its_unit_and_goes_back(farm: TunnelFarm) -> None:
    # Last: it kills u1 (and starts it again).
    held = Held(farm.client, farm.plan.vip, "/hello", "/big", "/hello")
    assert held.answer()[:2] == ["got", str(len(b"hello from h1\n"))]
    wait_for(lambda: live(farm, "u1") == 1, what="u1 routing the tunnelled connection")
    assert live(farm, "u2") == 0
    # u1 fails; u2 sees its DAM peer leave and re-plumbs the route, flow id and
    # tunnel source (u1's address, the one the host's mapping names) included.
    os.killpg(farm.out["u1"].proc.pid, signal.SIGKILL)
    farm.out["u1"].proc.wait(10)
    wait_for(lambda: live(farm, "u2") == 1, timeout=15, what="u2 taking the route over")
    farm.client.add_route(cidr(farm.plan.vip), farm.plan.lan["u2"])  # as a VRRP failover moves the VIP
    held.ask_next()
    line = held.answer(timeout=120)
    assert line[:3] == ["got", str(DOWNLOAD), hashlib.sha256(pattern(DOWNLOAD, seed=5)).hexdigest()], line
    forwarder = farm.get("u2", "/api/v1/state")["handoff"]["forwarder"]
    assert forwarder["plumbing"].get("taken_over", 0) >= 1, forwarder
    # The client's ACKs of 16 MiB went through u2, tunnelled.
    assert forwarder["metrics"]["packets"] > ACKS and forwarder["metrics"]["drops"] == {}, forwarder
    # u1 comes back (a preempting VRRP master takes the VIP back): it takes
    # its route back from the DAM, and the connection goes on through it.
    farm.start_unit("u1")
    farm.out["u1"].wait_for("farm known", timeout=30)
    wait_for(lambda: live(farm, "u1") == 1, timeout=15, what="u1 taking its route back")
    farm.client.add_route(cidr(farm.plan.vip), farm.plan.lan["u1"])
    held.ask_next()
    assert held.answer()[:2] == ["got", str(len(b"hello from h1\n"))]
    forwarder = farm.get("u1", "/api/v1/state")["handoff"]["forwarder"]
    assert forwarder["plumbing"].get("taken_back", 0) == 1, forwarder
    assert forwarder["metrics"]["packets"] >= 1 and forwarder["metrics"]["drops"] == {}, forwarder
