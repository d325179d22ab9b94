"""The forwarder in namespaces: client -> unit (forwarder, fence) -> host (VIP on lo), replies direct.

The route is plumbed by hand before the client connects, so the whole TCP
connection (handshake included) runs over the forwarded path; the live
handoff itself (TCP_REPAIR) is tested elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from nlbproxy.limits import END_LINGER
from tests.handoff_farm import cidr
from tests.netns import Node, Topology, Worker, require_netns, require_tools, wait_for

VIP = "10.0.0.100"
SIZE = 24 * 1024 * 1024

UNIT = """
import threading
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread as call
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import Forwarder, PacketPort, interface_mac
from nlbproxy.handoff.routes import FlowKey, RouteTable, Via

table = RouteTable(reactor)
fwd = Forwarder(table, {"eth0": interface_mac("eth0")})
fence = Fence(open_backend(), "nlbfwd")
fence.setup()
deleted = []

def on_deleted(gone):
    for d in gone:
        fence.remove(d.route.key)
        deleted.append(d.reason)

port = PacketPort(reactor, fwd, "eth0", on_deleted=on_deleted)
threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
call(reactor, port.start)

def plumb(client_port, host_ip, host_mac):
    key = FlowKey("10.0.0.5", client_port, "10.0.0.100", 80)
    def go():
        table.fence(key, Via(host_ip, host_mac, "eth0"))
        fence.add(key)
    call(reactor, go)
    return key

def state(client_port):
    route = table.get(FlowKey("10.0.0.5", client_port, "10.0.0.100", 80))
    return None if route is None else [route.state.value, len(route.buffer)]
"""

HOST = """
import hashlib, socket, threading
srv = socket.socket()
srv.bind(("10.0.0.100", 80)); srv.listen(4)
result = {}

def serve():
    conn, peer = srv.accept()
    result["peer"] = list(peer)
    digest = hashlib.sha256()
    total = 0
    while chunk := conn.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    result["received"] = total
    result["sha"] = digest.hexdigest()
    # The reply: the digest of the upload, then a download.
    conn.sendall(digest.digest() + bytes(range(256)) * (SIZE // 256))
    conn.close()

threading.Thread(target=serve, daemon=True).start()
"""

CLIENT = """
import hashlib, select, socket
c = socket.socket()
c.bind(("10.0.0.5", 0))
client_port = c.getsockname()[1]

def start():
    c.setblocking(False)
    return c.connect_ex(("10.0.0.100", 80))

def established():
    if not select.select([], [c], [], 10)[1]:
        return "timeout"
    return c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

def exchange():
    c.setblocking(True)
    c.settimeout(30)
    upload = bytes(range(251)) * (SIZE // 251)
    c.sendall(upload)
    c.shutdown(socket.SHUT_WR)
    data = bytearray()
    while chunk := c.recv(1 << 20):
        data += chunk
    c.close()
    expected = bytes(range(256)) * (SIZE // 256)
    return [data[:32] == hashlib.sha256(upload).digest(), bytes(data[32:]) == expected, len(data)]
"""


@pytest.fixture
def farm() -> Iterator[tuple[Topology, Node, Node, Node]]:
    require_netns()
    require_tools("nft")
    with Topology() as topo:
        client = topo.add_node("client", "10.0.0.5")
        unit = topo.add_node("unit", "10.0.0.2")
        host = topo.add_node("host", "10.0.0.3")
        # The unit owns the VIP (its listeners live there); the client reaches it through the unit.
        unit.run(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"])
        client.add_route(f"{VIP}/32", unit.ip)
        host.add_vip(VIP)
        yield topo, client, unit, host


def _dropped_from_vip(unit: Node) -> int:
    listing = unit.run(["nft", "list", "table", "inet", "dsrcount"]).stdout
    match = re.search(r"counter packets (\d+)", listing)
    assert match is not None, listing
    return int(match.group(1))


def test_forwarded_flow_buffered_until_commit_replies_direct(farm: tuple[Topology, Node, Node, Node]) -> None:
    _, client, unit, host = farm
    # Counts frames from the VIP that reach the unit's stack: with direct
    # server return there must be none.
    unit.run(["nft", "-f", "-"], input=(
        "table inet dsrcount {\n chain c {\n  type filter hook prerouting priority -400;\n"
        f"  ip saddr {VIP} counter\n }}\n}}\n"))
    u: Worker = unit.worker()
    u.exec(UNIT)
    h = host.worker()
    h.exec(f"SIZE = {SIZE}\n" + HOST)
    c = client.worker()
    c.exec(f"SIZE = {SIZE}\n" + CLIENT)
    port = c.eval("client_port")
    u.exec(f"key = plumb({port}, {host.ip!r}, {host.mac!r})")

    # Fenced, not committed: the SYN (and its retransmissions) wait in the buffer.
    assert c.eval("start()") in (115,)  # EINPROGRESS
    wait_for(lambda: (u.eval(f"state({port})") or [None, 0])[1] >= 1, what="the SYN buffered")
    assert u.eval(f"state({port})")[0] == "fenced"
    assert u.eval("call(reactor, port.commit, key)") >= 1
    assert c.eval("established()") == 0

    ok_upload, ok_download, length = c.eval("exchange()")
    assert ok_upload and ok_download and length == 32 + SIZE // 256 * 256
    wait_for(lambda: h.eval("result.get('received')"), what="the host's reading")
    assert h.eval("result") ["peer"] == ["10.0.0.5", port]
    assert h.eval("result")["received"] == SIZE // 251 * 251

    metrics = u.eval("fwd.metrics()")
    assert metrics["packets"] > 0 and metrics["bytes"] >= SIZE
    assert metrics["drops"] == {}, metrics
    assert _dropped_from_vip(unit) == 0
    # The client's FIN moved the route to closing; the agent's report ends it.
    wait_for(lambda: u.eval(f"state({port})")[0] == "closing", what="closing")
    u.exec("call(reactor, port.delete, key)")
    assert u.eval(f"state({port})") is None
    assert u.eval("deleted") == ["ended"]
    assert u.eval("len(fence)") == 0


def test_without_route_the_unit_answers_itself(farm: tuple[Topology, Node, Node, Node]) -> None:
    """Control: with no route the forwarder leaves the flow to the unit's kernel
    (no listener on the VIP there: refused), and counts it as passed."""
    _, client, unit, _ = farm
    u = unit.worker()
    u.exec(UNIT)
    c = client.worker()
    c.exec("import socket\n"
           "def refused():\n"
           "    try:\n"
           "        socket.create_connection(('10.0.0.100', 80), timeout=10)\n"
           "    except ConnectionRefusedError:\n"
           "        return True\n"
           "    return False\n")
    assert c.eval("refused()") is True
    assert u.eval("fwd.metrics()")["packets"] == 0
    assert u.eval("fwd.metrics()")["passed"] >= 1


TUNNEL_UNIT = UNIT.replace(
    "def plumb(client_port, host_ip, host_mac):",
    "def plumb(client_port, host_ip, host_mac, flow_id=None):",
).replace(
    'table.fence(key, Via(host_ip, host_mac, "eth0"))',
    'table.fence(key, Via(host_ip, host_mac, "eth0", flow_id, "10.0.0.2" if flow_id else None))',
)

DECAP = """
import threading
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread as call
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import DecapsulatorPort
from nlbproxy.handoff.routes import FlowKey
from nlbproxy.handoff.tunnel import Decapsulator, Mapping

decap = Decapsulator()
fence = Fence(open_backend(), "nlbhost")
fence.setup()
port = DecapsulatorPort(reactor, decap, "eth0", "nlbtun0")
threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
call(reactor, port.start)

def expect(flow_id, client_port):
    # The mapping sent ahead with the handoff.
    mapping = Mapping(flow_id, "10.0.0.2", FlowKey("10.0.0.5", client_port, "10.0.0.100", 80))
    call(reactor, decap.add, Mapping.decode(mapping.encode()))
    fence.add_tunnel("10.0.0.2", flow_id)
"""


#: The tunnel test's addresses by family: (lan: client, unit, router), back: (router, host), VIP.
TUNNEL_PLANS = {
    "ipv4": {"client": "10.0.0.5", "unit": "10.0.0.2", "router": "10.0.0.1", "router_back": "10.1.0.1",
             "host": "10.1.0.3", "back": "10.1.0.0/24", "vip": VIP},
    "ipv6": {"client": "fd4e:4c42::5", "unit": "fd4e:4c42::2", "router": "fd4e:4c42::1",
             "router_back": "fd4e:4c44::1", "host": "fd4e:4c44::3", "back": "fd4e:4c44::/64",
             "vip": "fd4e:4c42::100"},
}


def in_family(code: str, plan: dict[str, str]) -> str:
    """A snippet written for IPv4 with the plan's addresses (and sockets of its family)."""
    names = {"10.0.0.5": plan["client"], "10.0.0.2": plan["unit"], "10.0.0.100": plan["vip"]}
    code = re.sub(r"10\.0\.0\.(?:5|2|100)\b", lambda m: names[m.group(0)], code)
    if ":" in plan["vip"]:
        code = code.replace("socket.socket()", "socket.socket(socket.AF_INET6)")
    return code


@pytest.mark.parametrize("family", list(TUNNEL_PLANS))
def test_tunnel_to_a_host_on_another_segment(family: str) -> None:
    """client and unit on one segment, the host behind a router: the forwarder
    tunnels (flow id in the ports), the host decapsulates, replies are routed
    direct; a 24 MiB upload (large, partially checksummed frames through the
    tunnel) and a 24 MiB download, over IPv4 and over IPv6."""
    require_netns()
    require_tools("nft")
    plan = TUNNEL_PLANS[family]
    v6 = family == "ipv6"
    ip6 = {name: (plan[name] if v6 else None) for name in ("client", "unit", "router", "router_back", "host")}
    with Topology() as topo:
        topo.add_segment("back")
        client = topo.add_node("client", "10.0.0.5", ip6=ip6["client"])
        unit = topo.add_node("unit", "10.0.0.2", ip6=ip6["unit"])
        router = topo.add_node("router", "10.0.0.1", ip6=ip6["router"])
        topo.attach(router, "back", "10.1.0.1", ip6=ip6["router_back"])
        host = topo.add_node("host", "10.1.0.3", segment="back", ip6=ip6["host"])
        router.sysctl("net.ipv6.conf.all.forwarding" if v6 else "net.ipv4.ip_forward", 1)
        router.relax_rp_filter()
        unit.run(["ip", "addr", "add", cidr(plan["vip"]), "dev", "lo"])
        unit.add_route(plan["back"], plan["router"])
        client.add_route(cidr(plan["vip"]), plan["unit"])
        host.add_vip(plan["vip"])
        host.run(["ip", "-6" if v6 else "-4", "route", "replace", "default", "via", plan["router_back"]])

        d = host.worker()
        d.exec(in_family(DECAP, plan))
        h = host.worker()
        h.exec(f"SIZE = {SIZE}\n" + in_family(HOST, plan))
        u = unit.worker()
        u.exec(in_family(TUNNEL_UNIT, plan))
        c = client.worker()
        c.exec(f"SIZE = {SIZE}\n" + in_family(CLIENT, plan))
        port = c.eval("client_port")
        flow_id = 0x00020003
        d.exec(f"expect({flow_id}, {port})")
        # The frames go to the router's MAC; the IP header takes them to the host.
        u.exec(f"key = plumb({port}, {plan['host']!r}, {router.mac!r}, {flow_id})")
        u.exec("call(reactor, port.commit, key)")

        assert c.eval("start()") == 115
        assert c.eval("established()") == 0
        ok_upload, ok_download, _ = c.eval("exchange()")
        assert ok_upload and ok_download
        wait_for(lambda: h.eval("result.get('received')"), what="the host's reading")
        assert h.eval("result")["peer"][:2] == [plan["client"], port]
        assert u.eval("fwd.metrics()")["drops"] == {}
        assert u.eval("fwd.tunnel.stats['encoded']") > 0
        assert d.eval("dict(port.stats)").get("drop_inject_error", 0) == 0
        assert d.eval("decap.stats['decoded']") > 0


PLUMBED_UNIT = """
import socket, threading, types
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread as call
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import Forwarder, ForwarderPlumbing, PacketPort, interface_mac, neighbour_mac
from nlbproxy.handoff.routes import RouteTable

table = RouteTable(reactor)
fwd = Forwarder(table, {"eth0": interface_mac("eth0")})
fence = Fence(open_backend(), "nlbplumb")
fence.setup()
port = PacketPort(reactor, fwd, "eth0")
plumbing = ForwarderPlumbing(port, fence, "eth0")
threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
call(reactor, port.start)

def arp(ip):
    # The agent channel resolves the host's address in practice; here a datagram does.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"", (ip, 9))
    s.close()
    try:
        return neighbour_mac(ip)
    except LookupError:
        return None

def flow(client_port):
    return types.SimpleNamespace(client=("10.0.0.5", client_port), vip=("10.0.0.100", 80))
"""


def test_plumbing_resolves_the_host_and_lifts_the_fence(farm: tuple[Topology, Node, Node, Node]) -> None:
    """The unit side's calls (fence, commit, ended) on the real forwarder, with
    the host's MAC from the unit's neighbour table."""
    _, client, unit, host = farm
    u = unit.worker()
    u.exec(PLUMBED_UNIT)
    h = host.worker()
    h.exec("SIZE = 1 << 20\n" + HOST)
    c = client.worker()
    c.exec("SIZE = 1 << 20\n" + CLIENT)
    port = c.eval("client_port")
    assert wait_for(lambda: u.eval(f"arp({host.ip!r})"), what="ARP") == host.mac
    u.exec(f"call(reactor, plumbing.fence, flow({port}), {host.ip!r})")
    assert u.eval("len(fence)") == 1
    assert c.eval("start()") == 115
    u.exec(f"call(reactor, plumbing.commit, flow({port}))")
    assert c.eval("established()") == 0
    assert c.eval("exchange()")[:2] == [True, True]
    u.exec(f"call(reactor, plumbing.ended, flow({port}))")
    # The route lingers END_LINGER for the client's last ACK, then goes with its fence.
    wait_for(lambda: u.eval("[len(fence), len(table)]") == [0, 0], timeout=END_LINGER + 5, what="the route's end")


FAST_UNIT = PLUMBED_UNIT.replace(
    'port = PacketPort(reactor, fwd, "eth0")',
    'from nlbproxy.handoff.forwarder import KernelPath\n'
    'kernel = KernelPath(open_backend(), "eth0", "eth0", ":".join(f"{b:02x}" for b in interface_mac("eth0")))\n'
    'kernel.setup()\n'
    'port = PacketPort(reactor, fwd, "eth0", kernel=kernel)',
)


def test_kernel_fast_path(farm: tuple[Topology, Node, Node, Node]) -> None:
    """Committed flows forwarded by nftables in the kernel; the socket filter
    lets Python see only the fenced flow's frames and the FIN/SYN/RST ones."""
    _, client, unit, host = farm
    u = unit.worker()
    u.exec(FAST_UNIT)
    h = host.worker()
    h.exec(f"SIZE = {SIZE}\n" + HOST)
    c = client.worker()
    c.exec(f"SIZE = {SIZE}\n" + CLIENT)
    port = c.eval("client_port")
    wait_for(lambda: u.eval(f"arp({host.ip!r})"), what="ARP")
    u.exec(f"call(reactor, plumbing.fence, flow({port}), {host.ip!r})")
    assert c.eval("start()") == 115
    wait_for(lambda: u.eval("table.stats['buffered_packets']") >= 1, what="the SYN buffered")
    u.exec(f"call(reactor, plumbing.commit, flow({port}))")
    # The kernel takes the committed route on the reactor's next turn.
    wait_for(lambda: u.eval("[len(kernel), table.routes()[0].offloaded]") == [1, True], what="the route offloaded")
    assert c.eval("established()") == 0
    assert c.eval("exchange()")[:2] == [True, True]
    # Megabytes went through; Python saw a handful of frames (the SYNs, the FIN).
    seen = u.eval("fwd.stats['rx_frames']")
    assert seen < 20, seen
    wait_for(lambda: u.eval("table.routes()[0].state.value") == "closing", what="the FIN seen")
    u.exec(f"call(reactor, plumbing.ended, flow({port}))")
    wait_for(lambda: u.eval("[len(kernel), len(fence), len(table)]") == [0, 0, 0], timeout=END_LINGER + 5,
             what="the route's end")


ECHO = """
import socket, threading
srv = socket.socket()
srv.bind(("10.0.0.100", 80)); srv.listen(4)
def serve():
    conn, _ = srv.accept()
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()
threading.Thread(target=serve, daemon=True).start()
"""

# CLIENT's connection, talked over line by line instead of an exchange.
TALKER = CLIENT + """
def say(text):
    c.setblocking(True)
    c.settimeout(20)
    c.sendall(text.encode())
    return c.recv(100).decode()
"""


def test_another_unit_takes_over_from_the_durable_routes() -> None:
    """The unit that plumbed a connection fails; its route atoms (as the DAM
    holds them) let a second unit fence and forward the same connection when
    the client's traffic moves there."""
    require_netns()
    require_tools("nft")
    with Topology() as topo:
        client = topo.add_node("client", "10.0.0.5")
        unit1 = topo.add_node("unit1", "10.0.0.2")
        unit2 = topo.add_node("unit2", "10.0.0.4")
        host = topo.add_node("host", "10.0.0.3")
        for unit in (unit1, unit2):
            unit.run(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"])
        client.add_route(f"{VIP}/32", unit1.ip)
        host.add_vip(VIP)
        h = host.worker()
        h.exec(ECHO)
        u1, u2 = unit1.worker(), unit2.worker()
        u1.exec(PLUMBED_UNIT)
        u2.exec(PLUMBED_UNIT)
        c = client.worker()
        c.exec(TALKER)
        port = c.eval("client_port")
        for u in (u1, u2):
            assert wait_for(lambda u=u: u.eval(f"arp({host.ip!r})"), what="ARP") == host.mac
        u1.exec(f"call(reactor, plumbing.fence, flow({port}), {host.ip!r})")
        u1.exec(f"call(reactor, plumbing.commit, flow({port}))")
        assert c.eval("start()") == 115
        assert c.eval("established()") == 0
        assert c.eval("say('one')") == "one"

        # What the DAM holds for the route; then unit 1 is gone.
        u1.exec("from nlbproxy.handoff.routes import to_atom")
        atoms = u1.eval("[list(to_atom(r)[:2]) for r in table.routes()]")
        assert len(atoms) == 1 and atoms[0][0] == f"route 10.0.0.5:{port} {VIP}:80"
        u1.close()
        assert u2.eval(f"call(reactor, plumbing.replumb, {atoms!r})") == [1, 0]
        assert u2.eval("len(fence)") == 1
        client.add_route(f"{VIP}/32", unit2.ip)
        assert c.eval("say('two')") == "two"
        assert u2.eval("fwd.metrics()['packets']") >= 1
