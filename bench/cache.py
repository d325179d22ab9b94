"""Requests/second of cache hits against pass-through, through the same nlbproxy unit.

One nlbproxy unit with ``cache`` on its pool, in front of an nginx backend
answering the 100-byte body at ``/cached`` with ``Cache-Control:
max-age=3600`` and at ``/pass`` with no freshness (never stored).  wrk
measures keep-alive GETs of each path in alternation; the proxy is pinned to
one CPU, wrk and the backend to the other.  Printed: req/s, latency and proxy
CPU per path, and the ratio hit/pass-through (a hit skips the host
connection, header rewriting and the backend itself).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _harness as H

WARMUP_S = 2.0
PATHS = {"hit": "/cached", "pass": "/pass"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--rounds", type=int, default=1, help="alternate rounds; median per path")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    return ap.parse_args(argv)


def start_backend(procs: H.Procs, cpu: int) -> int:
    port = H.free_port()
    body = H.SMALL_BODY.decode().rstrip("\n")
    server = (
        "default_type text/plain;\n"
        f'        location /cached {{ add_header Cache-Control "max-age=3600"; return 200 "{body}\\n"; }}\n'
        f'        location / {{ return 200 "{body}\\n"; }}'
    )
    proc = procs.start("backend-nginx", H.nginx_argv(H.nginx_conf(procs.workdir, "backend", port, server)), cpu=cpu)
    H.wait_port(port, proc)
    return port


def start_unit(procs: H.Procs, backend: int, cpu: int) -> tuple[int, int]:
    port = H.free_port()
    conf = H.nlbproxy_conf(procs.workdir, port, backend)
    conf.write_text(conf.read_text() + "cache = { max_bytes = 16777216, max_object_bytes = 65536 }\n")
    proc = procs.start("nlbproxy", H.twistd_argv("nlbproxy", "--config", str(conf)), cpu=cpu)
    H.wait_port(port, proc)
    return port, proc.pid


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    proxy_cpu, load_cpu = H.pick_cpus()
    print(H.load_note(), flush=True)
    H.raise_nofile()
    if not H.nlbproxy_available():
        raise SystemExit("twistd --help does not list nlbproxy: pip install -e . --config-settings editable_mode=compat")
    runs: dict[str, list[H.WrkResult]] = {name: [] for name in PATHS}
    with H.workdir(args.keep) as wd, H.Procs(wd) as procs:
        backend = start_backend(procs, load_cpu)
        port, pid = start_unit(procs, backend, proxy_cpu)
        for rnd in range(args.rounds):
            for name, path in PATHS.items():
                url = f"http://127.0.0.1:{port}{path}"
                H.wrk(url, WARMUP_S, args.connections, load_cpu)
                cpu0, t0 = H.cpu_seconds(pid), time.monotonic()
                res = H.wrk(url, args.duration, args.connections, load_cpu)
                res.proxy_cpu = (H.cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
                runs[name].append(res)
                print(f"round {rnd + 1}: {name:<5}{res.rps:>10.0f} req/s p50 {res.p50_ms:.2f} ms "
                      f"p99 {res.p99_ms:.2f} ms proxy CPU {res.proxy_cpu:.0%}"
                      + (f" ERRORS {res.errors}" if res.errors else ""), flush=True)
    summary = {
        name: {"rps": H.median([r.rps for r in rs]), "p50_ms": H.median([r.p50_ms for r in rs]),
               "p99_ms": H.median([r.p99_ms for r in rs]), "errors": sum(r.errors for r in rs),
               "rps_per_cpu": H.median([r.rps_per_cpu or 0.0 for r in rs])}
        for name, rs in runs.items()
    }
    ratio = summary["hit"]["rps"] / summary["pass"]["rps"]
    cpu_ratio = summary["hit"]["rps_per_cpu"] / summary["pass"]["rps_per_cpu"]
    print(f"\nwrk -c{args.connections} -d{args.duration:g}s, {args.rounds} round(s), median per path")
    print(f"{'path':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'req/CPU-s':>11}")
    for name, s in summary.items():
        print(f"{name + ' (' + PATHS[name] + ')':<22}{s['rps']:>10.0f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}"
              f"{s['errors']:>8.0f}{s['rps_per_cpu']:>11.0f}")
    print(f"\nratio hit/pass-through: {ratio:.2f} req/s, {cpu_ratio:.2f} req/CPU-s")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "cache", "median": summary, "ratio": ratio, "ratio_per_proxy_cpu": cpu_ratio,
        }, indent=2))


if __name__ == "__main__":
    main()
