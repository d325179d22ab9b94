"""The handoff packet path in network namespaces: upload throughput and the unit's CPU per GB.

Side by side in one run, in namespaces this script creates (and always deletes):

* ``direct``     client -> host (the client routes the VIP straight to the host)
* ``forwarder``  client -> unit (AF_PACKET forwarder, MAC rewrite) -> host
* ``fastpath``   client -> unit (committed flows offloaded to an nftables netdev map) -> host
* ``tunnel``     client -> unit (forwarder + zero-overhead tunnel) -> router -> host (decapsulator)

The host owns the VIP on ``lo`` and answers directly; each target gets a
download (the forwarder carries the client's ACKs) and an upload (it carries
the data).  Also the cost of fencing one flow with
libnftables in-process against forking ``nft``.  Needs root.

    python bench/forwarder.py [--size MiB] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netns import Node, Topology, Worker

VIP = "10.0.0.100"

SINK = """
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.0.0.100", 80)); srv.listen(16)
chunk = bytes(1 << 20)
def serve():
    while True:
        conn, _ = srv.accept()
        request = conn.recv(100)
        if request.startswith(b"d"):
            for _ in range(int(request[1:])):
                conn.sendall(chunk)
            conn.close()
            continue
        total = len(request) - 1
        while data := conn.recv(1 << 20):
            total += len(data)
        conn.sendall(str(total).encode())
        conn.close()
threading.Thread(target=serve, daemon=True).start()
"""

SOURCE = """
import socket, time
chunk = bytes(1 << 20)
def download(mib, bind_port=0):
    c = socket.socket()
    c.bind(("10.0.0.5", bind_port))
    c.connect(("10.0.0.100", 80))
    started = time.perf_counter()
    c.sendall(b"d%d" % mib)
    total = 0
    buf = bytearray(1 << 20)
    while n := c.recv_into(buf):
        total += n
    elapsed = time.perf_counter() - started
    c.close()
    return [total, elapsed]
def upload(mib, bind_port=0):
    c = socket.socket()
    c.bind(("10.0.0.5", bind_port))
    c.connect(("10.0.0.100", 80))
    started = time.perf_counter()
    c.sendall(b"u")
    for _ in range(mib):
        c.sendall(chunk)
    c.shutdown(socket.SHUT_WR)
    got = c.recv(100)
    elapsed = time.perf_counter() - started
    c.close()
    return [int(got), elapsed]
def free_port():
    s = socket.socket(); s.bind(("10.0.0.5", 0)); p = s.getsockname()[1]; s.close(); return p
"""

UNIT = """
import os, threading
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread as call
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import Forwarder, PacketPort, interface_mac
from nlbproxy.handoff.routes import FlowKey, RouteTable, Via
table = RouteTable(reactor)
fwd = Forwarder(table, {"eth0": interface_mac("eth0")})
fence = Fence(open_backend(), "nlbbench"); fence.setup()
port = PacketPort(reactor, fwd, "eth0")
threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
call(reactor, port.start)
def plumb(client_port, host_ip, mac, flow_id=None):
    key = FlowKey("10.0.0.5", client_port, "10.0.0.100", 80)
    def go():
        source = "10.0.0.2" if flow_id is not None else None
        table.fence(key, Via(host_ip, mac, "eth0", flow_id, source)); fence.add(key); port.commit(key)
    call(reactor, go)
def cpu():
    t = os.times(); return t.user + t.system
"""

FAST_UNIT = """
import os, threading
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread as call
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import Forwarder, KernelPath, PacketPort, interface_mac
from nlbproxy.handoff.routes import FlowKey, RouteTable, Via
threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
fence = Fence(open_backend(), "nlbbenchfast"); fence.setup()
mac = ":".join(f"{b:02x}" for b in interface_mac("eth0"))
fast_table = RouteTable(reactor)
fast_fwd = Forwarder(fast_table, {"eth0": interface_mac("eth0")})
kernel = KernelPath(open_backend(), "eth0", "eth0", mac)
kernel.setup()
fast_port = PacketPort(reactor, fast_fwd, "eth0", kernel=kernel)
call(reactor, fast_port.start)
def plumb_fast(client_port, host_ip, host_mac):
    key = FlowKey("10.0.0.5", client_port, "10.0.0.100", 80)
    def go():
        fast_table.fence(key, Via(host_ip, host_mac, "eth0")); fast_port.refilter(); fence.add(key)
        fast_port.commit(key)
    call(reactor, go)
def fast_seen():
    return fast_fwd.stats["rx_frames"]
def cpu():
    t = os.times(); return t.user + t.system
"""

DECAP = """
import threading, os
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread as call
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import DecapsulatorPort
from nlbproxy.handoff.routes import FlowKey
from nlbproxy.handoff.tunnel import Decapsulator, Mapping
decap = Decapsulator()
fence = Fence(open_backend(), "nlbhost"); fence.setup()
port = DecapsulatorPort(reactor, decap, "eth0", "nlbtun0")
threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
call(reactor, port.start)
def expect(flow_id, client_port):
    call(reactor, decap.add, Mapping(flow_id, "10.0.0.2", FlowKey("10.0.0.5", client_port, "10.0.0.100", 80)))
    fence.add_tunnel("10.0.0.2", flow_id)
def cpu():
    t = os.times(); return t.user + t.system
"""

FENCE_COST = """
import time, statistics
from nlbproxy.handoff.fence import Fence, LibNftables, NftCommand
from nlbproxy.handoff.routes import FlowKey
def cost(kind, n):
    f = Fence(LibNftables() if kind == "lib" else NftCommand(), "nlbcost"); f.setup()
    add = []
    for i in range(n):
        k = FlowKey("10.0.0.5", 1000 + i, "10.0.0.100", 80)
        t = time.perf_counter(); f.add(k); add.append(time.perf_counter() - t)
    f.teardown()
    return statistics.median(add) * 1e3
"""


def build(topo: Topology) -> dict[str, Node]:
    topo.add_segment("back")
    client = topo.add_node("client", "10.0.0.5")
    unit = topo.add_node("unit", "10.0.0.2")
    host = topo.add_node("host", "10.0.0.3")
    router = topo.add_node("router", "10.0.0.1")
    topo.attach(router, "back", "10.1.0.1")
    far = topo.add_node("far", "10.1.0.3", segment="back")
    router.sysctl("net.ipv4.ip_forward", 1)
    router.relax_rp_filter()
    unit.run(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"])
    unit.add_route("10.1.0.0/24", router.ip)
    host.add_vip(VIP)
    far.add_vip(VIP)
    far.add_route("default", "10.1.0.1")
    return {"client": client, "unit": unit, "host": host, "router": router, "far": far}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="MiB uploaded per run (default 1024)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per target, in alternation")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    one, five, _ = os.getloadavg()
    print(f"load average before the run: {one:.2f} (1 min), {five:.2f} (5 min)")
    targets = ("direct", "forwarder", "fastpath", "tunnel")
    results: dict[tuple[str, str], list[dict[str, float]]] = {
        (way, t): [] for way in ("download", "upload") for t in targets}
    with Topology() as topo:
        n = build(topo)
        client, unit, host, far, router = n["client"], n["unit"], n["host"], n["far"], n["router"]
        sinks = [host.worker(), far.worker()]
        for s in sinks:
            s.exec(SINK)
        c: Worker = client.worker()
        c.exec(SOURCE)
        u = unit.worker()
        u.exec(UNIT)
        f = unit.worker()
        f.exec(FAST_UNIT)
        d = far.worker()
        d.exec(DECAP)
        flow_id = 0x00010001
        for _ in range(args.rounds):
            for way, target in results:
                port = c.eval("free_port()")
                if target == "direct":
                    client.add_route(f"{VIP}/32", host.ip)
                elif target == "forwarder":
                    client.add_route(f"{VIP}/32", unit.ip)
                    u.exec(f"plumb({port}, {host.ip!r}, {host.mac!r})")
                elif target == "fastpath":
                    client.add_route(f"{VIP}/32", unit.ip)
                    f.exec(f"plumb_fast({port}, {host.ip!r}, {host.mac!r})")
                    # The plain forwarder's unfiltered socket would copy every frame meanwhile.
                    u.exec("call(reactor, port.stop)")
                else:
                    client.add_route(f"{VIP}/32", unit.ip)
                    flow_id += 1
                    d.exec(f"expect({flow_id}, {port})")
                    u.exec(f"plumb({port}, {far.ip!r}, {router.mac!r}, {flow_id})")
                w = f if target == "fastpath" else u
                unit_cpu, decap_cpu = w.eval("cpu()"), d.eval("cpu()")
                got, elapsed = c.eval(f"{way}({args.size}, {port})")
                assert got == args.size << 20, (way, target, got)
                unit_cpu, decap_cpu = w.eval("cpu()") - unit_cpu, d.eval("cpu()") - decap_cpu
                if target == "fastpath":
                    u.exec("call(reactor, port.start)")
                gb = got / 1e9
                results[way, target].append({"mb_s": got / elapsed / 1e6, "unit_cpu_s_per_gb": unit_cpu / gb,
                                        "decap_cpu_s_per_gb": decap_cpu / gb})
        cost = unit.worker()
        cost.exec(FENCE_COST)
        fence_lib, fence_nft = cost.eval("cost('lib', 200)"), cost.eval("cost('nft', 30)")
        u.exec("call(reactor, port.poll_kernel_drops)")
        metrics = u.eval("fwd.metrics()")
        fast_seen = f.eval("fast_seen()")
        drops = metrics["drops"]

    print(f"\n{args.size} MiB per transfer, median of {args.rounds} round(s); the forwarder carries the"
          " client's half (the data of an upload, the ACKs of a download)")
    print(f"{'transfer':<10} {'target':<10} {'MB/s':>8} {'vs direct':>10} {'unit CPU s/GB':>14} {'decap CPU s/GB':>15}")
    summary: dict[str, object] = {}
    for (way, target), runs in results.items():
        direct = statistics.median(r["mb_s"] for r in results[way, "direct"])
        mb_s = statistics.median(r["mb_s"] for r in runs)
        unit_cpu = statistics.median(r["unit_cpu_s_per_gb"] for r in runs)
        decap_cpu = statistics.median(r["decap_cpu_s_per_gb"] for r in runs)
        print(f"{way:<10} {target:<10} {mb_s:>8.0f} {mb_s / direct:>10.2f} {unit_cpu:>14.3f} {decap_cpu:>15.3f}")
        summary[f"{way}_{target}"] = {"mb_s": mb_s, "vs_direct": mb_s / direct, "unit_cpu_s_per_gb": unit_cpu,
                                      "decap_cpu_s_per_gb": decap_cpu}
    print(f"\nfence one flow: libnftables {fence_lib:.3f} ms, nft command {fence_nft:.2f} ms "
          f"({fence_nft / fence_lib:.0f}x)")
    print(f"forwarder drops: {drops or 'none'}; frames forwarded: {metrics['packets']}, "
          f"{metrics['bytes'] / max(metrics['packets'], 1):.0f} bytes each on average (GSO frames pass whole)")
    print(f"fast path: frames Python saw in all its transfers: {fast_seen} (the socket filter keeps "
          "fenced flows and FIN/SYN/RST only)")
    summary.update({"fence_lib_ms": fence_lib, "fence_nft_ms": fence_nft, "drops": drops})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
