"""A tunnelled handoff with a real ``twistd nlbproxy`` unit and ``twistd nlbagent``
agent, the host on another segment behind a router.  Needs root.

    client 10.0.0.5 --+                    VIP 10.0.0.100 on the units' and the host's lo
    u1     10.0.0.2 --+-- lan              the client routes the VIP via u1 (then u2, then u1)
    u2     10.0.0.4 --+
    router 10.0.0.1 --+   10.1.0.1 -- back -- host 10.1.0.3 (nginx behind its agent)

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
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.handoff_farm import NGINX, Held, Output, env
from tests.handoff_util import pattern
from tests.netns import Node, Topology, require_netns, require_tools, wait_for

MiB = 1024 * 1024
VIP = "10.0.0.100"
UNITS = {"u1": "10.0.0.2", "u2": "10.0.0.4"}
DAM_PORT = 9800
SECRET = b"tunnelled handoff secret\n"
HANDOFF_PORT = 9904
HEALTH_PORT = 9903
DOWNLOAD = 16 * MiB


class TunnelFarm:
    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "secret.key").write_bytes(SECRET)
        topo.add_segment("back")
        self.client = topo.add_node("client", "10.0.0.5")
        self.units = {name: topo.add_node(name, ip) for name, ip in UNITS.items()}
        self.router = topo.add_node("router", "10.0.0.1")
        topo.attach(self.router, "back", "10.1.0.1")
        self.host = topo.add_node("host", "10.1.0.3", segment="back")
        self.router.sysctl("net.ipv4.ip_forward", 1)
        self.router.relax_rp_filter()
        for unit in self.units.values():
            unit.run(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"])
            unit.relax_rp_filter()
            unit.add_route("10.1.0.0/24", self.router.ip)
        self.client.add_route(f"{VIP}/32", UNITS["u1"])
        self.host.add_vip(VIP)
        self.host.add_route("default", "10.1.0.1")
        self.out: dict[str, Output] = {}
        self.admin: dict[str, str] = {}
        self._nginx()
        self._agent()
        for name in self.units:
            self.start_unit(name)
        for name in self.units:
            self.out[name].wait_for("farm known", timeout=30)

    def start(self, name: str, node: Node, argv: list[str]) -> Output:
        proc = node.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                          cwd=str(Path(__file__).resolve().parent.parent))
        self.out[name] = Output(proc)
        return self.out[name]

    def _nginx(self) -> None:
        directory = self.tmp / "nginx"
        (directory / "www").mkdir(parents=True)
        (directory / "www" / "big").write_bytes(pattern(DOWNLOAD, seed=5))
        (directory / "www" / "hello").write_bytes(b"hello from h1\n")
        conf = directory / "nginx.conf"
        conf.write_text(NGINX.format(dir=directory, ip=self.host.ip))
        self.host.popen(["nginx", "-e", str(directory / "error.log"), "-c", str(conf)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.host.python("import socket,time\nend=time.monotonic()+20\nwhile True:\n"
                         "    try: socket.create_connection(('127.0.0.1',8082),timeout=1).close(); break\n"
                         "    except OSError:\n"
                         "        assert time.monotonic()<end\n        time.sleep(0.02)\n", timeout=30)

    def _agent(self) -> None:
        units = ", ".join(f'"{ip}:{HEALTH_PORT}"' for ip in UNITS.values())
        config = self.tmp / "agent.toml"
        config.write_text(
            f'[agent]\nname = "h1"\nunits = [{units}]\napi = "tcp:0:interface=127.0.0.1"\n'
            f'secret_file = "{self.tmp / "secret.key"}"\nhandoff = "tcp:{HANDOFF_PORT}:interface={self.host.ip}"\n'
            f'tunnel_interface = "{self.host.ifname}"\n\n'
            f'[[app]]\nname = "h1"\nendpoint = "{self.host.ip}:8080"\ndeliver = "bridge"\n'
            f'bridge_to = "127.0.0.1:8082"\nproxy_protocol = true\n'
        )
        out = self.start("agent", self.host, ["twistd", "-n", "--pidfile=", "nlbagent", "--config", str(config)])
        out.wait_for("tunnel end on ")
        out.wait_for("handoffs on ")
        self.admin["agent"] = out.wait_for(r"api on (http://\S+)").group(1).rstrip("/")

    def start_unit(self, name: str) -> None:
        ip = UNITS[name]
        peers = ", ".join(f'"{other}:{DAM_PORT}"' for n, other in UNITS.items() if n != name)
        config = self.tmp / f"{name}.toml"
        config.write_text(
            f'[unit]\nname = "{name}"\nadmin = "tcp:0:interface=127.0.0.1"\n'
            f'secret_file = "{self.tmp / "secret.key"}"\nhealth = "{ip}:{HEALTH_PORT}"\n'
            f'dam = "tcp:{DAM_PORT}:interface={ip}"\npeers = [{peers}]\n'
            f'handoff_port = {HANDOFF_PORT}\nforwarder_in = "eth0"\n'
            f'tunnel_networks = ["10.1.0.0/24"]\ntunnel_source = "{ip}"\n'
            f'tunnel_gateway = "{self.router.ip}"\n\n'
            f'[[listener]]\nname = "vip"\nendpoint = "tcp:80:interface={VIP}"\npool = "h1"\nhandoff = true\n\n'
            f'[pool.h1]\nhosts = ["{self.host.ip}:8080"]\n'
        )
        out = self.start(name, self.units[name],
                         ["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(config)])
        self.admin[name] = out.wait_for(r"admin API on (http://\S+)").group(1).rstrip("/")

    def get(self, name: str, path: str) -> Any:
        node = self.units.get(name, self.host)
        return json.loads(node.run(["curl", "-sS", "--fail", "--max-time", "10", self.admin[name] + path]).stdout)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelFarm]:
    require_netns()
    require_tools("nginx", "nft", "curl")
    with Topology() as topo:
        yield TunnelFarm(topo, tmp_path_factory.mktemp("tunnel-handoff"))


def test_curl_download_through_a_tunnelled_handoff(farm: TunnelFarm) -> None:
    expected = hashlib.sha256(pattern(DOWNLOAD, seed=5)).hexdigest()
    piped = farm.client.run(["sh", "-c", f"curl -sS --fail --max-time 120 http://{VIP}/big | sha256sum"],
                            timeout=150)
    assert piped.stdout.split()[0] == expected
    handoff = farm.get("u1", "/api/v1/state")["handoff"]
    assert handoff["handed_off"] >= 1 and handoff["failed"] == {} and handoff["fell_back"] == {}, handoff
    forwarder = handoff["forwarder"]
    # The client's ACKs went through the forwarder, tunnelled.
    assert forwarder["metrics"]["packets"] > 100, forwarder
    assert forwarder["metrics"]["drops"] == {}, forwarder
    agent = farm.get("agent", "/v1/handoff")
    assert agent["stats"]["restored"] >= 1 and agent["stats"]["bridged"] >= 1, agent
    assert agent["tunnel"]["port"]["injected"] > 100, agent
    # curl closed: the agent reported the end, the unit deleted the route and
    # released the flow id, and the agent removed the mapping.
    wait_for(lambda: farm.get("u1", "/api/v1/state")["handoff"]["live"] == 0, what="the route deleted")
    wait_for(lambda: farm.get("agent", "/v1/handoff")["tunnel"]["mappings"] == 0,
             what="the mapping removed")


def live(farm: TunnelFarm, unit: str) -> int:
    return int(farm.get(unit, "/api/v1/state")["handoff"]["live"])


def test_zz_tunnelled_connection_survives_its_unit_and_goes_back(farm: TunnelFarm) -> None:
    # Last: it kills u1 (and starts it again).
    held = Held(farm.client, VIP, "/hello", "/big", "/hello")
    assert held.answer()[:2] == ["got", str(len(b"hello from h1\n"))]
    wait_for(lambda: live(farm, "u1") == 1, what="u1 routing the tunnelled connection")
    assert live(farm, "u2") == 0
    # u1 fails; u2 sees its DAM peer leave and re-plumbs the route, flow id and
    # tunnel source (u1's address, the one the host's mapping names) included.
    os.killpg(farm.out["u1"].proc.pid, signal.SIGKILL)
    farm.out["u1"].proc.wait(10)
    wait_for(lambda: live(farm, "u2") == 1, timeout=15, what="u2 taking the route over")
    farm.client.add_route(f"{VIP}/32", UNITS["u2"])  # as a VRRP failover moves the VIP
    held.ask_next()
    line = held.answer(timeout=120)
    assert line[:3] == ["got", str(DOWNLOAD), hashlib.sha256(pattern(DOWNLOAD, seed=5)).hexdigest()], line
    forwarder = farm.get("u2", "/api/v1/state")["handoff"]["forwarder"]
    assert forwarder["plumbing"].get("taken_over", 0) >= 1, forwarder
    # The client's ACKs of 16 MiB went through u2, tunnelled (how many depends on GRO: 88 to 300 seen).
    assert forwarder["metrics"]["packets"] > 20 and forwarder["metrics"]["drops"] == {}, forwarder
    # u1 comes back (a preempting VRRP master takes the VIP back): it takes
    # its route back from the DAM, and the connection goes on through it.
    farm.start_unit("u1")
    farm.out["u1"].wait_for("farm known", timeout=30)
    wait_for(lambda: live(farm, "u1") == 1, timeout=15, what="u1 taking its route back")
    farm.client.add_route(f"{VIP}/32", UNITS["u1"])
    held.ask_next()
    assert held.answer()[:2] == ["got", str(len(b"hello from h1\n"))]
    forwarder = farm.get("u1", "/api/v1/state")["handoff"]["forwarder"]
    assert forwarder["plumbing"].get("taken_back", 0) == 1, forwarder
    assert forwarder["metrics"]["packets"] >= 1 and forwarder["metrics"]["drops"] == {}, forwarder
