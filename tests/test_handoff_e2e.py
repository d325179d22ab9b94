"""Live connection handoff end to end in network namespaces (tests/handoff_farm.py).

A real unit hands client connections to two hosts whose agents restore them
and bridge them to an unmodified nginx (with a PROXY header, so nginx logs
the client's address) or pass them to a Twisted application that adopts
them; curl and raw sockets in the client namespace check pipelining, a large
download and upload with checksums, and the fallback to proxying when a
host's agent is gone.  Needs root (namespaces, TCP_REPAIR, nftables).

Every test runs four times (:data:`FARMS`): over IPv4 with the unit's
AF_PACKET forwarder and with the kernel-routed stand-in, and over IPv6 (an
IPv6 VIP, client and hosts: the IPv6 neighbour table, fence, frames,
restore and PROXY header) with the forwarder behind a dual-stack listener,
and with ``twistd nlbproxy`` and its kernel fast path.  nginx parses PROXY
v1 headers in two farms and v2 in the other two.  Two more farms put the
client behind a router with a narrow hop, for path MTU discovery.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from tests.handoff_farm import IPV4, IPV6, ROUTED_IPV4, ROUTED_IPV6, Addresses, HandoffFarm, url
from tests.handoff_util import pattern
from tests.netns import Topology, require_netns, require_tools

MiB = 1024 * 1024
DOWNLOAD = 96 * MiB
UPLOAD = 48 * MiB


class Setup(NamedTuple):
    plumbing: str
    addresses: Addresses
    #: The handoff listener is a dual-stack one (``tcp6`` on ``::``, the IPv4 VIP there too).
    dual_stack: bool = False
    #: The PROXY header nginx parses (the client's address in its log proves it right).
    proxy_protocol: str = "v1"
    #: The client sits behind a router with a hop this narrow (path MTU discovery).
    router_mtu: int | None = None


FARMS = {
    "forwarder": Setup("forwarder", IPV4),
    "kernel": Setup("kernel", IPV4, proxy_protocol="v2"),
    "ipv6": Setup("forwarder", IPV6, dual_stack=True),
    "ipv6-fast": Setup("twistd-fast", IPV6, proxy_protocol="v2"),
    # Only for the path MTU test.
    "routed": Setup("twistd", ROUTED_IPV4, router_mtu=1280),
    "ipv6-routed": Setup("twistd-fast", ROUTED_IPV6, router_mtu=1280),
}


@pytest.fixture(scope="module", params=[name for name, setup in FARMS.items() if setup.router_mtu is None])
def farm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandoffFarm]:
    """The farm with the unit's AF_PACKET forwarder, again with the
    kernel-routed stand-in (which isolates the migration from the
    forwarder), and over IPv6 with the forwarder and with the fast path
    (the routed farms serve only the test that asks for them)."""
    require_netns()
    require_tools("nginx", "nft", "curl")
    setup = FARMS[request.param]
    with Topology() as topo:
        yield HandoffFarm(topo, tmp_path_factory.mktemp("handoff"), files={"big": pattern(DOWNLOAD, seed=7)},
                          **setup._asdict())


def served_to(farm: HandoffFarm, client: str, path: str) -> list[str]:
    """nginx's access log lines of ``path`` for ``client``: the PROXY header
    told nginx the client's address, whether the agent bridged to its Unix
    socket (h1, where nginx logs the peer as ``unix:``) or over TCP (h2)."""
    want = f'{client} "GET {path} '
    return ([line for line in farm.access_log("h1") if line.startswith("unix: " + want)]
            + [line for line in farm.access_log("h2") if line.startswith("127.0.0.1 " + want)])


def curl(farm: HandoffFarm, *args: str, timeout: float = 120.0) -> str:
    # -g: the brackets of an IPv6 literal are not a glob.
    done = farm.client.run(["curl", "-gsS", "--fail", "--max-time", str(int(timeout)), *args], timeout=timeout + 10)
    return done.stdout


def test_download_with_checksum_through_nginx(farm: HandoffFarm) -> None:
    before = farm.unit_stats()
    expected = hashlib.sha256(pattern(DOWNLOAD, seed=7)).hexdigest()
    family = "-6" if farm.addresses.v6 else "-4"
    piped = farm.client.run(["sh", "-c", f"curl {family} -gsS --fail --max-time 120 {farm.url('/big')} | sha256sum"],
                            timeout=150)
    assert piped.stdout.split()[0] == expected
    out = farm.client.python(
        "import hashlib,urllib.request\n"
        f"data=urllib.request.urlopen({farm.url('/big')!r}, timeout=120).read()\n"
        "print(len(data), hashlib.sha256(data).hexdigest())\n", timeout=150).stdout.split()
    assert out == [str(DOWNLOAD), expected]
    stats = farm.unit_stats()
    # Both connections were handed off, none proxied instead.
    assert stats["handed_off"] >= before["handed_off"] + 2
    assert stats["fell_back"] == before["fell_back"]
    assert stats["failed"] == {}
    if farm.plumbing == "twistd-fast":
        # The client's ACKs (thousands) went by the unit kernel's fast path,
        # and its socket filter kept them from waking Python.
        forwarder = stats["forwarder"]
        assert forwarder["inventory"]["stats"]["offloaded"] >= 2, forwarder
        assert forwarder["metrics"]["rx_frames"] - before["forwarder"]["metrics"]["rx_frames"] < 200, forwarder
    # nginx saw the client itself (PROXY header), not the agent or the unit.
    assert served_to(farm, farm.addresses.client, "/big")


@pytest.mark.parametrize("farm", ["ipv6"], indirect=True)
def test_ipv4_client_of_a_dual_stack_listener(farm: HandoffFarm) -> None:
    """The listener sees the IPv4 client as ::ffff:10.0.0.2; the fence, the
    route and the restored socket must use its IPv4 address all the same
    (the hosts are known to the unit by their IPv6 addresses)."""
    assert farm.dual_stack
    before = farm.unit_stats()
    expected = hashlib.sha256(pattern(DOWNLOAD, seed=7)).hexdigest()
    piped = farm.client.run(["sh", "-c", f"curl -4 -sS --fail --max-time 120 {url(IPV4.vip, 80, '/big')}"
                                         " | sha256sum"], timeout=150)
    assert piped.stdout.split()[0] == expected
    after = farm.unit_stats()
    assert after["handed_off"] == before["handed_off"] + 1
    assert (after["fell_back"], after["failed"]) == (before["fell_back"], before["failed"])
    assert served_to(farm, IPV4.client, "/big")


@pytest.mark.parametrize("farm", ["routed", "ipv6-routed"], indirect=True)
def test_path_mtu_discovery_reaches_the_host(farm: HandoffFarm) -> None:
    """The client is behind a router whose hop towards it is narrower than
    the hosts' links: the hosts' full-size replies meet it, and the router's
    ICMP "too big" goes to their source, the VIP, so to the unit.  Its
    forwarder sends it on to the host, which lowers its path MTU; else the
    download stalls after the first window (IPv6 routers never fragment,
    and IPv4 replies carry DF)."""
    assert farm.router is not None
    before = farm.unit_stats()
    expected = hashlib.sha256(pattern(DOWNLOAD, seed=7)).hexdigest()
    piped = farm.client.run(["sh", "-c", f"curl -gsS --fail --max-time 120 {farm.url('/big')} | sha256sum"],
                            timeout=150)
    assert piped.stdout.split()[0] == expected
    after = farm.unit_stats()
    assert after["handed_off"] == before["handed_off"] + 1
    assert (after["fell_back"], after["failed"]) == (before["fell_back"], before["failed"])
    assert after["forwarder"]["metrics"]["too_big"] > before["forwarder"]["metrics"]["too_big"], after["forwarder"]


def test_pipelined_requests_on_one_handed_off_connection(farm: HandoffFarm) -> None:
    code = (
        "import socket\n"
        f"s=socket.create_connection(({farm.vip!r},80),timeout=30)\n"
        "s.sendall(b'GET /hello HTTP/1.1\\r\\nHost: v\\r\\n\\r\\n'*3)\n"
        "data=b''\n"
        "while data.count(b'hello from')<3:\n"
        "    chunk=s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data+=chunk\n"
        "s.sendall(b'GET /hello HTTP/1.1\\r\\nHost: v\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "while True:\n"
        "    chunk=s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data+=chunk\n"
        "print(data.count(b'HTTP/1.1 200 OK'), data.count(b'hello from h'))\n"
    )
    before = farm.unit_stats()
    assert farm.client.python(code, timeout=60).stdout.split() == ["4", "4"]
    after = farm.unit_stats()
    assert after["handed_off"] == before["handed_off"] + 1  # one connection, four requests
    assert after["fell_back"] == before["fell_back"]


def test_wrk_load_on_handed_off_connections(farm: HandoffFarm) -> None:
    # wrk opens 8 keep-alive connections and loads each with request after
    # request: every connection is handed off, every request answered by nginx.
    require_tools("wrk")
    before = farm.unit_stats()
    done = farm.client.run(["wrk", "-t1", "-c8", "-d2s", "--timeout", "5s", farm.url("/hello")], timeout=60)
    assert "Non-2xx" not in done.stdout and "Socket errors" not in done.stdout, done.stdout
    requests = int(re.search(r"(\d+) requests in", done.stdout).group(1))  # type: ignore[union-attr]
    assert requests > 100, done.stdout
    after = farm.unit_stats()
    assert after["handed_off"] - before["handed_off"] == 8, (before, after)
    # ("closed": a connection that ended before its first request, as wrk's own probe does.)
    fell_back = {k: v for k, v in after["fell_back"].items() if k != "closed"}
    assert (after["failed"], fell_back) == (before["failed"], before["fell_back"]), after
    # The requests went to the hosts' nginx, not through the unit.
    served = sum(line.count('"GET /hello') for line in farm.access_log("h1") + farm.access_log("h2"))
    assert served >= requests


def test_upload_with_checksum_to_a_bridged_server(farm: HandoffFarm) -> None:
    code = (
        "import hashlib,socket\n"
        "from tests.handoff_util import pattern, recv_exactly\n"
        f"body=pattern({UPLOAD}, seed=9)\n"
        f"s=socket.create_connection(({farm.vip!r},80),timeout=60)\n"
        "s.sendall(b'POST /sha256 HTTP/1.1\\r\\nHost: v\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(body))\n"
        "s.sendall(body)\n"
        "data=b''\n"
        "while b'\\r\\n\\r\\n' not in data: data+=s.recv(4096)\n"
        "head,rest=data.split(b'\\r\\n\\r\\n',1)\n"
        "n=int([l for l in head.split(b'\\r\\n') if l.lower().startswith(b'content-length')][0].split(b':')[1])\n"
        "rest+=recv_exactly(s,n-len(rest))\n"
        "print(rest.decode().strip(), hashlib.sha256(body).hexdigest())\n"
    )
    from tests.handoff_farm import env

    before = farm.unit_stats()
    done = farm.client.run(["env", f"PYTHONPATH={env()['PYTHONPATH']}", "python3", "-c", code], timeout=120)
    length, got, expected = done.stdout.split()
    assert (int(length), got) == (UPLOAD, expected)
    # The body streamed in while the connection moved (the head came alone):
    # handed off all the same, not proxied.
    after = farm.unit_stats()
    assert after["handed_off"] == before["handed_off"] + 1
    assert after["fell_back"] == before["fell_back"]


def test_twisted_application_adopts_the_connection(farm: HandoffFarm) -> None:
    assert curl(farm, farm.url("/adopt/one"), farm.url("/adopt/two")) == "adopted /adopt/oneadopted /adopt/two"


def test_failed_injection_resets_the_client_and_is_counted(farm: HandoffFarm) -> None:
    # Without the VIP on h2 the agent cannot bind the restored connection.
    h2 = farm.hosts["h2"]
    h2.run(["ip", "addr", "del", farm.addresses.vip_cidr, "dev", "lo"])
    try:
        before = farm.unit_stats()
        done = farm.client.run(["curl", "-gsS", "--max-time", "20", farm.url("/adopt/x")], check=False, timeout=30)
        assert done.returncode == 56 and "reset" in done.stderr.lower(), done  # 56: receive failure
        after = farm.unit_stats()
        assert after["failed"].get("refused", 0) == before["failed"].get("refused", 0) + 1
        if not farm.plumbing.startswith("twistd"):  # twistd keeps no log of the plumbing's calls
            assert after["log"][-2:] == ["fence", "unfence"]
    finally:
        h2.add_vip(farm.vip)
    assert curl(farm, farm.url("/adopt/again")) == "adopted /adopt/again"


def test_zz_agent_gone_falls_back_to_proxying(farm: HandoffFarm) -> None:
    # Last in the module: it stops h2's agent.
    farm.stop_agent("h2")
    before = farm.unit_stats()
    assert curl(farm, farm.url("/adopt/three")) == "direct /adopt/three"
    after = farm.unit_stats()
    assert after["fell_back"].get("agent_unavailable", 0) == before["fell_back"].get("agent_unavailable", 0) + 1
    assert after["failed"] == before["failed"]


def test_plain_proxy_listener_still_proxies(farm: HandoffFarm) -> None:
    assert curl(farm, farm.url("/hello", farm.addresses.unit, 8000)).startswith("hello from h")
