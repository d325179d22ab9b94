"""Live connection handoff: latency, download throughput and the unit's CPU per GB.

Builds the farm of tests/handoff_farm.py in network namespaces (client, unit,
two hosts with Debian's nginx and an agent each; the VIP's follow-on packets
go from the unit to the host through the unit's AF_PACKET forwarder, or with
``--plumbing kernel`` through the unit's kernel, see tests/handoff_plumbing.py;
``--plumbing twistd`` runs a real ``twistd nlbproxy`` whose ``forwarder_in``
sets up the forwarder itself, ``twistd-fast`` with ``forwarder_fast_path``)
and measures, side by side in one run:

  latency      median handoff critical path (request head complete -> route
               committed) over --connections sequential connections, from the
               unit's own clock; and the client's median time for one small
               GET on a new connection, through handoff and direct
  download     --size bytes with curl from the client namespace, --rounds
               times each in alternating order (medians reported), to:
                 direct    a host's nginx itself (h1)
                 handoff   the VIP (handed off to h1, bridged by its agent
                           to nginx's Unix socket)
                 handoff-tcp  the same to h2, whose agent bridges to
                           nginx over loopback TCP (the hosts are alike)
                 haproxy   HAProxy in the unit namespace (nbthread 1)
                 nlbproxy  the unit's own proxying listener
               throughput, the unit process's CPU seconds per GB (HAProxy's
               for haproxy), and the whole machine's CPU seconds per GB
  upload       --upload-size bytes through handoff to a bridged server that
               hashes it (tests.backend /sha256), checked against the sha256

The handoff download is also checked by sha256 in a second run.  The unit's
process CPU includes its forwarder's (the client's ACKs); with ``--plumbing
kernel`` the forwarding is softirq time, charged to no process, and only the
machine-wide figure shows it.
Needs root.  ``--json FILE`` writes the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.handoff_farm import VIP, HandoffFarm, env, wait_port  # noqa: E402
from tests.netns import Topology  # noqa: E402

GB = 1_000_000_000
HAPROXY = """\
global
    nbthread 1
    maxconn 2000
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend f
    bind {unit}:8100
    default_backend b
backend b
    server h1 {h1}:8080
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def zeros_digest(size: int) -> str:
    digest = hashlib.sha256()
    block = bytes(1 << 20)
    left = size
    while left:
        n = min(left, len(block))
        digest.update(block[:n])
        left -= n
    return digest.hexdigest()


def download(farm: HandoffFarm, url: str, pid: int) -> dict[str, float]:
    cpu0, machine0 = cpu_seconds(pid), machine_cpu_seconds()
    done = farm.client.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                           timeout=600)
    cpu1, machine1 = cpu_seconds(pid), machine_cpu_seconds()
    size, seconds = done.stdout.split()
    gb = int(size) / GB
    return {"bytes": int(size), "seconds": float(seconds), "gbit_s": int(size) * 8 / float(seconds) / 1e9,
            "proxy_cpu_s_per_gb": (cpu1 - cpu0) / gb, "machine_cpu_s_per_gb": (machine1 - machine0) / gb}


def client_latency(farm: HandoffFarm, url_host: str, port: int, n: int) -> float:
    code = (
        "import socket,time,statistics\n"
        "times=[]\n"
        f"for _ in range({n}):\n"
        "    t=time.perf_counter()\n"
        f"    s=socket.create_connection(({url_host!r},{port}),timeout=10)\n"
        "    s.sendall(b'GET /hello HTTP/1.1\\r\\nHost: v\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "    while s.recv(65536): pass\n"
        "    s.close()\n"
        "    times.append(time.perf_counter()-t)\n"
        "print(statistics.median(times))\n"
    )
    return float(farm.client.python(code, timeout=120 + n).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=GB, help="download size in bytes (default 1 GB)")
    parser.add_argument("--upload-size", type=int, default=200_000_000, help="upload size (default 200 MB)")
    parser.add_argument("--connections", type=int, default=300, help="connections for the latency figures")
    parser.add_argument("--rounds", type=int, default=5, help="downloads per target, alternating order (default 5)")
    parser.add_argument("--plumbing", choices=["forwarder", "kernel", "twistd", "twistd-fast"], default="forwarder",
                        help="the unit's AF_PACKET forwarder (default), the kernel-routed stand-in, or a real "
                             "twistd nlbproxy with forwarder_in (twistd-fast: and forwarder_fast_path)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs and logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, TCP_REPAIR, nftables)")
    one, five, _ = os.getloadavg()
    print(f"load average before the run: {one:.2f} (1 min), {five:.2f} (5 min)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    results: dict[str, Any] = {}
    with Topology() as topo:
        farm = HandoffFarm(topo, tmp, plumbing=args.plumbing)
        for name in farm.hosts:
            with open(farm.nginx[name] / "www" / "big", "wb") as big:
                big.truncate(args.size)  # sparse: nginx sends zeros, the disk holds nothing
        (tmp / "haproxy.cfg").write_text(HAPROXY.format(unit=farm.unit.ip, h1=farm.hosts["h1"].ip))
        haproxy = farm.unit.popen(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(farm.unit, farm.unit.ip, 8100)
        unit_pid = farm.unit_out.proc.pid

        # Latency: warm the unit's channels to both agents first.
        client_latency(farm, VIP, 80, 10)
        skip = len(farm.unit_stats()["recent"])
        handoff_client = client_latency(farm, VIP, 80, args.connections)
        recent = farm.unit_stats()["recent"][skip:]
        direct_client = client_latency(farm, farm.hosts["h1"].ip, 8080, args.connections)
        # twistd: the admin API's median of the unit's recent handoffs (the
        # 10 warm-up connections included).
        median = statistics.median(recent) if recent else farm.unit_stats().get("latency_median")
        results["latency"] = {
            "handoff_median_ms": median * 1e3 if median is not None else None,
            "handoff_p90_ms": statistics.quantiles(recent, n=10)[-1] * 1e3 if len(recent) > 10 else None,
            "client_get_new_connection_ms": {"handoff": handoff_client * 1e3, "direct": direct_client * 1e3},
        }
        p90 = results["latency"]["handoff_p90_ms"]
        print(f"\nhandoff latency (unit clock, {len(recent) or args.connections + 10} connections): "
              f"median {results['latency']['handoff_median_ms']:.3f} ms, "
              f"p90 {'-' if p90 is None else f'{p90:.3f}'} ms (target: median < 1 ms)")
        print(f"client: new connection + small GET, median: handoff {handoff_client * 1e3:.2f} ms, "
              f"direct {direct_client * 1e3:.2f} ms")

        targets = {
            "direct": (f"http://{farm.hosts['h1'].ip}:8080/big", unit_pid),
            "handoff": (f"http://{VIP}/h1/big", unit_pid),
            "handoff-tcp": (f"http://{VIP}/h2/big", unit_pid),
            "haproxy": (f"http://{farm.unit.ip}:8100/big", haproxy.pid),
            "nlbproxy": (f"http://{farm.unit.ip}:8000/big", unit_pid),
        }
        # Rounds in alternating order: a single download's speed swings up to
        # 3 x between runs on a shared machine; each figure is the median.
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        order = list(targets)
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                url, pid = targets[name]
                rounds[name].append(download(farm, url, pid))
            line = "  ".join(f"{name} {rounds[name][-1]['gbit_s']:.2f}" for name in order)
            print(f"round {round_ + 1}: Gbit/s {line}; handoff/haproxy "
                  f"{rounds['handoff'][-1]['gbit_s'] / rounds['haproxy'][-1]['gbit_s']:.2f}")
        downloads = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                     for name, runs in rounds.items()}
        results["download"] = downloads
        results["download_rounds"] = rounds
        print(f"\ndownload of {args.size / GB:.2f} GB with curl (one connection each; median of "
              f"{args.rounds} rounds):")
        print(f"{'target':10} {'Gbit/s':>8} {'x direct':>9} {'x haproxy':>10} {'proxy CPU s/GB':>15} "
              f"{'machine CPU s/GB':>17}")
        for name, d in downloads.items():
            print(f"{name:11} {d['gbit_s']:8.2f} {d['gbit_s'] / downloads['direct']['gbit_s']:9.2f} "
                  f"{d['gbit_s'] / downloads['haproxy']['gbit_s']:10.2f} "
                  f"{d['proxy_cpu_s_per_gb']:15.3f} {d['machine_cpu_s_per_gb']:17.3f}")
        h, hp = downloads["handoff"], downloads["haproxy"]
        # /proc counts CPU in clock ticks: a unit that used less than one
        # tick per download is bounded by one tick, not divided by zero.
        tick_per_gb = 1 / os.sysconf("SC_CLK_TCK") / (args.size / GB)
        unit_cpu = max(h["proxy_cpu_s_per_gb"], tick_per_gb)
        bound = ">= " if h["proxy_cpu_s_per_gb"] < tick_per_gb else ""
        print(f"targets: handoff >= 0.9 x direct ({h['gbit_s'] / downloads['direct']['gbit_s']:.2f}), "
              f">= 3 x haproxy ({h['gbit_s'] / hp['gbit_s']:.2f}); unit CPU/GB >= 10 x lower than "
              f"haproxy's ({bound}{hp['proxy_cpu_s_per_gb'] / unit_cpu:.1f} x; 'direct' row: the unit's idle CPU)")

        # Checksums on the handed-off connection: the download again, and an upload.
        got = farm.client.run(["sh", "-c", f"curl -sS --fail http://{VIP}/big | sha256sum"], timeout=600)
        download_ok = got.stdout.split()[0] == zeros_digest(args.size)
        upload = (
            "import hashlib,socket,sys\n"
            f"n={args.upload_size}\n"
            "block=bytes(range(256))*4096\n"
            "s=socket.create_connection(('" + VIP + "',80),timeout=120)\n"
            "s.sendall(b'POST /sha256 HTTP/1.1\\r\\nHost: v\\r\\nContent-Length: %d\\r\\n\\r\\n' % n)\n"
            "h=hashlib.sha256(); left=n\n"
            "while left:\n"
            "    chunk=block[:left]; s.sendall(chunk); h.update(chunk); left-=len(chunk)\n"
            "data=b''\n"
            "while b'\\r\\n\\r\\n' not in data or not data.endswith(b'\\n') or data.endswith(b'\\r\\n\\r\\n'):\n"
            "    data+=s.recv(4096)\n"
            "print(data.rsplit(b'\\r\\n\\r\\n',1)[1].decode().split()[1]==h.hexdigest())\n"
        )
        started = time.perf_counter()
        up = farm.client.run(["env", f"PYTHONPATH={env()['PYTHONPATH']}", "python3", "-c", upload], timeout=600)
        up_seconds = time.perf_counter() - started
        upload_ok = up.stdout.strip() == "True"
        results["checksums"] = {"download_ok": download_ok, "upload_ok": upload_ok,
                                "upload_gbit_s": args.upload_size * 8 / up_seconds / 1e9}
        stats = farm.unit_stats()
        results["unit"] = {k: stats[k] for k in ("handed_off", "fell_back", "failed", "ended")}
        print(f"\nchecksums on handed-off connections: download {args.size / GB:.2f} GB "
              f"{'ok' if download_ok else 'WRONG'}, upload {args.upload_size / GB:.2f} GB "
              f"{'ok' if upload_ok else 'WRONG'} ({results['checksums']['upload_gbit_s']:.2f} Gbit/s "
              f"into a Python stdlib server)")
        print(f"unit: {results['unit']}")
        haproxy.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    else:
        print(f"kept {tmp}")


if __name__ == "__main__":
    main()
