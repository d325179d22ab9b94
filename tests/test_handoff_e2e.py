"""Live connection handoff end to end in network namespaces (tests/handoff_farm.py).

A real unit hands client connections to two hosts whose agents restore them
and bridge them to an unmodified nginx (with a PROXY header, so nginx logs
the client's address) or pass them to a Twisted application that adopts
them; curl and raw sockets in the client namespace check pipelining, a large
download and upload with checksums, and the fallback to proxying when a
host's agent is gone.  Needs root (namespaces, TCP_REPAIR, nftables).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest

from tests.handoff_farm import CLIENT_IP, VIP, HandoffFarm
from tests.handoff_util import pattern
from tests.netns import Topology, require_netns, require_tools

MiB = 1024 * 1024
DOWNLOAD = 96 * MiB
UPLOAD = 48 * MiB


@pytest.fixture(scope="module", params=["forwarder", "kernel"])
def farm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandoffFarm]:
    """The farm with the unit's AF_PACKET forwarder, and again with the
    kernel-routed stand-in (which isolates the migration from the forwarder)."""
    require_netns()
    with Topology() as topo:
        yield HandoffFarm(topo, tmp_path_factory.mktemp("handoff"), files={"big": pattern(DOWNLOAD, seed=7)},
                          plumbing=request.param)


def curl(farm: HandoffFarm, *args: str, timeout: float = 120.0) -> str:
    done = farm.client.run(["curl", "-sS", "--fail", "--max-time", str(int(timeout)), *args], timeout=timeout + 10)
    return done.stdout


def test_download_with_checksum_through_nginx(farm: HandoffFarm) -> None:
    before = farm.unit_stats()["handed_off"]
    expected = hashlib.sha256(pattern(DOWNLOAD, seed=7)).hexdigest()
    piped = farm.client.run(["sh", "-c", f"curl -sS --fail --max-time 120 http://{VIP}/big | sha256sum"], timeout=150)
    assert piped.stdout.split()[0] == expected
    out = farm.client.python(
        "import hashlib,urllib.request\n"
        f"data=urllib.request.urlopen('http://{VIP}/big', timeout=120).read()\n"
        "print(len(data), hashlib.sha256(data).hexdigest())\n", timeout=150).stdout.split()
    assert out == [str(DOWNLOAD), expected]
    stats = farm.unit_stats()
    assert stats["handed_off"] >= before + 2
    assert stats["failed"] == {}
    # nginx saw the client itself (PROXY header), not the agent or the unit.
    lines = farm.access_log("h1") + farm.access_log("h2")
    assert any(line.startswith(f"127.0.0.1 {CLIENT_IP} \"GET /big") for line in lines), lines


def test_pipelined_requests_on_one_handed_off_connection(farm: HandoffFarm) -> None:
    code = (
        "import socket\n"
        f"s=socket.create_connection(({VIP!r},80),timeout=30)\n"
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
    before = farm.unit_stats()["handed_off"]
    assert farm.client.python(code, timeout=60).stdout.split() == ["4", "4"]
    assert farm.unit_stats()["handed_off"] == before + 1  # one connection, four requests


def test_wrk_load_on_handed_off_connections(farm: HandoffFarm) -> None:
    # wrk opens 8 keep-alive connections and loads each with request after
    # request: every connection is handed off, every request answered by nginx.
    require_tools("wrk")
    before = farm.unit_stats()
    done = farm.client.run(["wrk", "-t1", "-c8", "-d2s", "--timeout", "5s", f"http://{VIP}/hello"], timeout=60)
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
        f"s=socket.create_connection(({VIP!r},80),timeout=60)\n"
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
    assert curl(farm, f"http://{VIP}/adopt/one", f"http://{VIP}/adopt/two") == "adopted /adopt/oneadopted /adopt/two"


def test_failed_injection_resets_the_client_and_is_counted(farm: HandoffFarm) -> None:
    # Without the VIP on h2 the agent cannot bind the restored connection.
    h2 = farm.hosts["h2"]
    h2.run(["ip", "addr", "del", f"{VIP}/32", "dev", "lo"])
    try:
        before = farm.unit_stats()
        done = farm.client.run(["curl", "-sS", "--max-time", "20", f"http://{VIP}/adopt/x"], check=False, timeout=30)
        assert done.returncode == 56 and "reset" in done.stderr.lower(), done  # 56: receive failure
        after = farm.unit_stats()
        assert after["failed"].get("refused", 0) == before["failed"].get("refused", 0) + 1
        assert after["log"][-2:] == ["fence", "unfence"]
    finally:
        h2.run(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"])
    assert curl(farm, f"http://{VIP}/adopt/again") == "adopted /adopt/again"


def test_zz_agent_gone_falls_back_to_proxying(farm: HandoffFarm) -> None:
    # Last in the module: it stops h2's agent.
    farm.stop_agent("h2")
    before = farm.unit_stats()
    assert curl(farm, f"http://{VIP}/adopt/three") == "direct /adopt/three"
    after = farm.unit_stats()
    assert after["fell_back"].get("agent_unavailable", 0) == before["fell_back"].get("agent_unavailable", 0) + 1
    assert after["failed"] == before["failed"]


def test_plain_proxy_listener_still_proxies(farm: HandoffFarm) -> None:
    assert curl(farm, f"http://{farm.unit.ip}:8000/hello").startswith("hello from h")
