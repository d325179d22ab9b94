"""Handoff with real ``twistd nlbproxy`` units and ``twistd nlbagent`` agents in namespaces.

The units run exactly as an operator starts them: ``[unit] forwarder_in``
makes ``twistd nlbproxy`` set up its own fence and AF_PACKET forwarder, its
routes go to the DAM it shares with its peer, and the admin API reports the
handoffs.  Checked end to end: a curl download with its checksum through a
handed-off connection; a host that dies ends its handed-off connections with
a RST instead of a hang; and a handed-off connection survives the failure of
the unit that handed it off once the client's traffic moves to the other
unit, which rebuilt the route from the DAM.  Needs root.

    client 10.0.0.2 --+
    u1     10.0.0.1 --+-- bridge     VIP 10.0.0.100 on u1's, u2's and the hosts' lo
    u2     10.0.0.3 --+              the client routes the VIP via u1 (then u2)
    h1     10.0.0.11 -+              nginx behind each host's agent (bridge, PROXY header)
    h2     10.0.0.12 -+

and again over IPv6 (fd4e:4c42::/64, the same last bytes, VIP fd4e:4c42::100):
the units' DAM, health, handoff channels and listeners, the hosts' agents and
nginx, and the client all speak IPv6.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nlbproxy.config import format_host_port
from nlbproxy.limits import END_LINGER
from tests.handoff_farm import Held, Output, cidr, closed_cleanly, server_endpoint, spawn, start_nginx, url
from tests.handoff_util import pattern
from tests.netns import Node, Topology, require_netns, require_tools, wait_for

MiB = 1024 * 1024
VIP = "10.0.0.100"
CLIENT_IP = "10.0.0.2"
UNITS = {"u1": "10.0.0.1", "u2": "10.0.0.3"}
HOSTS = {"h1": "10.0.0.11", "h2": "10.0.0.12"}
SECRET = b"twistd handoff farm secret\n"
HANDOFF_PORT = 9904
HEALTH_PORT = 9903
DAM_PORT = 9800
DOWNLOAD = 48 * MiB


@dataclass(frozen=True)
class Plan:
    """The farm's addresses in the family its traffic uses."""

    vip: str
    client: str
    units: dict[str, str]
    hosts: dict[str, str]


V4 = Plan(VIP, CLIENT_IP, UNITS, HOSTS)
V6 = Plan("fd4e:4c42::100", "fd4e:4c42::2", {"u1": "fd4e:4c42::1", "u2": "fd4e:4c42::3"},
          {"h1": "fd4e:4c42::11", "h2": "fd4e:4c42::12"})


class Farm:
    def __init__(self, topo: Topology, tmp: Path, fast_path: bool = False, plan: Plan = V4) -> None:
        self.topo = topo
        self.fast_path = fast_path
        self.plan = p = plan
        self.tmp = tmp
        (tmp / "secret.key").write_bytes(SECRET)
        v6 = plan is not V4
        self.client = topo.add_node("client", CLIENT_IP, ip6=p.client if v6 else None)
        self.units = {name: topo.add_node(name, ip, ip6=p.units[name] if v6 else None) for name, ip in UNITS.items()}
        self.hosts = {name: topo.add_node(name, ip, ip6=p.hosts[name] if v6 else None) for name, ip in HOSTS.items()}
        for node in (self.client, *self.units.values(), *self.hosts.values()):
            node.run(["ip", "link", "set", "lo", "up"])
        self.client.add_route(cidr(p.vip), p.units["u1"])
        for unit in self.units.values():
            unit.run(["ip", "addr", "add", cidr(p.vip), "dev", "lo"])
            unit.relax_rp_filter()
        for host in self.hosts.values():
            host.add_vip(p.vip)
        self.out: dict[str, Output] = {}
        self.admin: dict[str, str] = {}
        for name, host in self.hosts.items():
            self._nginx(name, host)
            self._agent(name, host)
        for name in self.units:
            self._unit(name)
        for name in self.units:
            self.out[name].wait_for("farm known", timeout=30)

    def start(self, name: str, node: Node, argv: list[str]) -> Output:
        self.out[name] = spawn(node, argv)
        return self.out[name]

    def _nginx(self, name: str, host: Node) -> None:
        directory = self.tmp / f"nginx-{name}"
        (directory / "www" / name).mkdir(parents=True)
        (directory / "www" / "big").write_bytes(pattern(DOWNLOAD, seed=3))
        (directory / "www" / name / "hello").write_bytes(f"hello from {name}\n".encode())
        start_nginx(host, directory, self.plan.hosts[name])

    def _agent(self, name: str, host: Node) -> None:
        ip = self.plan.hosts[name]
        units = ", ".join(f'"{format_host_port(unit, HEALTH_PORT)}"' for unit in self.plan.units.values())
        config = self.tmp / f"agent-{name}.toml"
        config.write_text(
            f'[agent]\nname = "{name}"\nunits = [{units}]\napi = "tcp:0:interface=127.0.0.1"\n'
            f'secret_file = "{self.tmp / "secret.key"}"\nhandoff = {server_endpoint(HANDOFF_PORT, ip)}\n\n'
            f'[[app]]\nname = "{name}"\nendpoint = "{format_host_port(ip, 8080)}"\ndeliver = "bridge"\n'
            f'bridge_to = "127.0.0.1:8082"\nproxy_protocol = true\n'
        )
        out = self.start(f"agent-{name}", host, ["twistd", "-n", "--pidfile=", "nlbagent", "--config", str(config)])
        out.wait_for("handoffs on ")
        self.admin[f"agent-{name}"] = out.wait_for(r"api on (http://\S+)").group(1).rstrip("/")

    def _unit(self, name: str) -> None:
        p = self.plan
        ip = p.units[name]
        peers = ", ".join(f'"{format_host_port(other, DAM_PORT)}"' for n, other in p.units.items() if n != name)
        config = self.tmp / f"{name}.toml"
        config.write_text(
            f'[unit]\nname = "{name}"\nadmin = "tcp:0:interface=127.0.0.1"\n'
            f'secret_file = "{self.tmp / "secret.key"}"\nhealth = "{format_host_port(ip, HEALTH_PORT)}"\n'
            f'handoff_port = {HANDOFF_PORT}\ndam = {server_endpoint(DAM_PORT, ip)}\npeers = [{peers}]\n'
            f'forwarder_in = "eth0"\nforwarder_fast_path = {str(self.fast_path).lower()}\n\n'
            f'[[listener]]\nname = "vip"\nendpoint = {server_endpoint(80, p.vip)}\npool = "h1"\nhandoff = true\n'
            f'[[listener.route]]\npool = "h2"\npath_prefix = "/h2/"\n\n'
            f'[pool.h1]\nhosts = ["{self.host_key("h1")}"]\n'
            f'[pool.h2]\nhosts = ["{self.host_key("h2")}"]\n'
        )
        out = self.start(name, self.units[name], ["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(config)])
        self.admin[name] = out.wait_for(r"admin API on (http://\S+)").group(1).rstrip("/")

    def get(self, name: str, path: str) -> str:
        node = self.units.get(name) or self.hosts[name.removeprefix("agent-")]
        return node.run(["curl", "-sS", "--fail", "--max-time", "10", self.admin[name] + path]).stdout

    def state(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.get(name, "/api/v1/state")))

    def host_key(self, name: str) -> str:
        """The pool's name for host ``name`` (its port-8080 endpoint)."""
        return format_host_port(self.plan.hosts[name], 8080)


#: Farms by id: the kernel fast path or not, and the family of the traffic.
FARMS = {"forwarder": (False, V4), "fast_path": (True, V4), "ipv6": (False, V6), "ipv6_fast_path": (True, V6)}


@pytest.fixture(scope="module", params=list(FARMS))
def farm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """The units' AF_PACKET forwarder, and again with the kernel fast path;
    over IPv4, and again over IPv6."""
    require_netns()
    require_tools("nginx", "nft", "curl")
    fast_path, plan = FARMS[request.param]
    with Topology() as topo:
        yield Farm(topo, tmp_path_factory.mktemp("twistd-handoff"), fast_path=fast_path, plan=plan)


def forwarded(farm: Farm, forwarder: dict[str, Any]) -> int:
    """Client packets the unit carried: by Python, or by its kernel's fast path
    (whose frames Python does not count; routes offloaded instead)."""
    if farm.fast_path:
        return int(forwarder["inventory"]["stats"].get("offloaded", 0))
    return int(forwarder["metrics"]["packets"])


def test_curl_download_through_a_handed_off_connection(farm: Farm) -> None:
    expected = hashlib.sha256(pattern(DOWNLOAD, seed=3)).hexdigest()
    piped = farm.client.run(["sh", "-c", f"curl -gsS --fail --max-time 120 {url(farm.plan.vip, 80, '/big')}"
                                         " | sha256sum"], timeout=150)
    assert piped.stdout.split()[0] == expected
    state = farm.state("u1")
    handoff = state["handoff"]
    assert handoff["handed_off"] >= 1 and handoff["failed"] == {} and handoff["fell_back"] == {}, handoff
    forwarder = handoff["forwarder"]
    assert forwarder["running"] and forwarder["in"] == "eth0" and forwarder["fast_path"] == farm.fast_path
    # The client's ACKs of 48 MB went through the forwarder (or its fast path); GRO and load vary their count.
    assert forwarded(farm, forwarder) > (0 if farm.fast_path else 20), forwarder
    assert "handed_off" in state["pools"]["h1"]["hosts"][farm.host_key("h1")]
    metrics = farm.get("u1", "/metrics")
    total = next(line for line in metrics.splitlines() if line.startswith("nlbproxy_handoff_total "))
    assert float(total.split()[1]) >= 1
    assert "nlbproxy_forwarder_packets_total" in metrics
    agent = json.loads(farm.get("agent-h1", "/v1/handoff"))
    assert agent["stats"]["restored"] >= 1 and agent["stats"]["bridged"] >= 1, agent
    # curl closed; the agent reported the end and the unit deleted the route.
    wait_for(lambda: farm.state("u1")["handoff"]["live"] == 0, what="the route deleted after the end")
    wait_for(lambda: closed_cleanly(farm.hosts["h1"]), timeout=END_LINGER + 5, what="h1's socket closed")


def test_a_dead_host_resets_its_handed_off_connections(farm: Farm) -> None:
    key = farm.host_key("h2")
    held = Held(farm.client, farm.plan.vip, "/h2/hello", "/h2/hello")
    assert held.answer()[:2] == ["got", str(len("hello from h2\n"))]
    wait_for(lambda: farm.state("u1")["pools"]["h2"]["hosts"][key]["handed_off"] == 1,
             what="u1 counting the live handed-off connection to h2")
    # h2 dies: it drops off the network (its agent falls silent, its kernel
    # answers nothing), as a crashed or unplugged machine does.
    farm.hosts["h2"].run(["ip", "link", "set", "eth0", "down"])
    wait_for(lambda: farm.state("u1")["pools"]["h2"]["hosts"][key]["health"] == "down", timeout=15,
             what="health calling h2 down")
    wait_for(lambda: farm.state("u1")["pools"]["h2"]["hosts"][key]["handed_off"] == 0, timeout=5,
             what="h2's routes deleted")
    held.ask_next()
    # Without the fix the request would go to the dead host and time out (20 s).
    assert held.answer() == ["reset"]
    state = farm.state("u1")["handoff"]["forwarder"]
    assert state["inventory"]["stats"].get("deleted_host_down", 0) >= 1, state
    assert "host_down" in farm.get("u1", "/metrics")


def test_zz_connection_survives_the_unit_that_handed_it_off(farm: Farm) -> None:
    # Last: it kills u1.
    held = Held(farm.client, farm.plan.vip, "/h1/hello", "/big")
    assert held.answer()[:2] == ["got", str(len("hello from h1\n"))]
    wait_for(lambda: farm.state("u1")["handoff"]["live"] == 1, what="u1 routing the connection")
    assert farm.state("u2")["handoff"]["live"] == 0
    # u1 fails; u2 sees its DAM peer leave and re-plumbs its routes from the atoms.
    os.killpg(farm.out["u1"].proc.pid, signal.SIGKILL)
    farm.out["u1"].proc.wait(10)
    wait_for(lambda: farm.state("u2")["handoff"]["live"] == 1, timeout=15, what="u2 taking the route over")
    # The client's traffic moves to u2 (as a VRRP failover would move the VIP).
    farm.client.add_route(cidr(farm.plan.vip), farm.plan.units["u2"])
    held.ask_next()
    line = held.answer(timeout=120)
    assert line[:3] == ["got", str(DOWNLOAD), hashlib.sha256(pattern(DOWNLOAD, seed=3)).hexdigest()], line
    forwarder = farm.state("u2")["handoff"]["forwarder"]
    assert forwarder["plumbing"].get("taken_over", 0) >= 1, forwarder
    assert forwarded(farm, forwarder) > (0 if farm.fast_path else 20), forwarder
