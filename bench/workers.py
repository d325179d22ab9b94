"""Requests/second of one unit with workers = 1 and workers = 2, side by side, and memory per worker.

Small keep-alive GETs with wrk through nlbproxy in front of an nginx backend
answering a 100-byte body.  Targets (each runs for the whole benchmark and is
measured in alternation, median per target with --rounds N):

  w1          workers = 1 (a plain unit), pinned to CPU 0
  w2-cpu0     workers = 2 (a supervisor and two workers), all pinned to CPU 0:
              the cost of two processes on the CPU one had
  w2          workers = 2 on both CPUs: what a second core buys when, as on a
              2-CPU machine, the load generator and backend share CPU 1 with it
  haproxy     HAProxy nbthread 1 on CPU 0, the yardstick of bench/rps.py

wrk and the backend are pinned to CPU 1.  Memory: RSS of the supervisor and of
each worker after the runs (and of the single-process unit for comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

import _harness as H

TARGETS = ["w1", "w2-cpu0", "w2", "haproxy"]
WARMUP_S = 2.0


def unit_conf(workdir: Path, name: str, port: int, backend_port: int, workers: int) -> Path:
    conf = workdir / f"{name}.toml"
    conf.write_text(f"""
[unit]
name = "bench-{name}"
admin = "tcp:{H.free_port()}:interface=127.0.0.1"
workers = {workers}

[[listener]]
name = "web"
endpoint = "tcp:{port}:interface=127.0.0.1"
pool = "app"
keepalive_timeout = 300
max_connections = 20000
max_body_bytes = 0

[pool.app]
hosts = ["127.0.0.1:{backend_port}"]
""")
    return conf


def wait_http(port: int, proc: H.Proc, timeout: float = 30.0) -> None:
    """Until a GET is answered: a unit with workers binds at once but serves later."""
    H.wait_port(port, proc)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                response.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} does not answer on {port}\n{proc.log_tail()}") from None
            time.sleep(0.05)


def start(procs: H.Procs, name: str, backend: int, cpus: tuple[int, int]) -> tuple[int, H.Proc]:
    proxy_cpu, _ = cpus
    if name == "haproxy":
        port = H.start_target(procs, "haproxy", backend, proxy_cpu)
        return port, H.find_target_proc(procs, "haproxy")
    port = H.free_port()
    workers = 1 if name == "w1" else 2
    conf = unit_conf(procs.workdir, name, port, backend, workers)
    argv = H.twistd_argv("nlbproxy", "--config", str(conf))
    if name == "w2":
        argv = ["taskset", "-c", f"{cpus[0]},{cpus[1]}", *argv]
        proc = procs.start(name, argv)
    else:
        proc = procs.start(name, argv, cpu=proxy_cpu)
    wait_http(port, proc)
    return port, proc


def measure(port: int, pid: int, args: argparse.Namespace, load_cpu: int) -> H.WrkResult:
    url = f"http://127.0.0.1:{port}/"
    H.wrk(url, WARMUP_S, args.connections, load_cpu)
    cpu0, t0 = H.cpu_seconds(pid), time.monotonic()
    res = H.wrk(url, args.duration, args.connections, load_cpu)
    res.proxy_cpu = (H.cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    return res


def memory(proc: H.Proc) -> dict[str, int]:
    """RSS in KiB of the process and of each child (the workers of a supervisor)."""
    pids = H._descendants(proc.pid)
    return {("main" if p == proc.pid else f"child {p}"): H._status_kb(p, "VmRSS") for p in pids}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--rounds", type=int, default=1, help="alternate rounds; median per target")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    if not H.nlbproxy_available():
        sys.exit("twistd --help does not list the nlbproxy plugin: install the package first")
    cpus = H.pick_cpus()
    print(H.load_note(), flush=True)
    H.raise_nofile()
    runs: dict[str, list[H.WrkResult]] = {}
    mem: dict[str, dict[str, int]] = {}
    with H.workdir(args.keep) as wd, H.Procs(wd) as procs:
        backend = H.start_backend_nginx(procs, cpus[1])
        targets = {name: start(procs, name, backend, cpus) for name in TARGETS}
        for rnd in range(args.rounds):
            for name, (port, proc) in targets.items():
                res = measure(port, proc.pid, args, cpus[1])
                runs.setdefault(name, []).append(res)
                print(f"round {rnd + 1}: {name:<9}{res.rps:>10.0f} req/s p50 {res.p50_ms:.2f} ms "
                      f"p99 {res.p99_ms:.2f} ms proxy CPU {res.proxy_cpu:.0%}"
                      + (f" ERRORS {res.errors}" if res.errors else ""), flush=True)
        for name, (_, proc) in targets.items():
            mem[name] = memory(proc)
    summary = {name: {"rps": H.median([r.rps for r in rs]), "p99_ms": H.median([r.p99_ms for r in rs]),
                      "proxy_cpu": H.median([r.proxy_cpu or 0.0 for r in rs]),
                      "errors": sum(r.errors for r in rs)}
               for name, rs in runs.items()}
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s, {args.rounds} round(s), median per target")
    print(f"{'target':<10}{'req/s':>10}{'p99 ms':>9}{'proxy CPU':>11}{'req/CPU-s':>11}"
          f"{'/ w1':>7}{'/ haproxy':>11}{'errors':>8}")
    for name, s in summary.items():
        per_cpu = s["rps"] / s["proxy_cpu"] if s["proxy_cpu"] else 0.0
        print(f"{name:<10}{s['rps']:>10.0f}{s['p99_ms']:>9.2f}{s['proxy_cpu']:>11.0%}{per_cpu:>11.0f}"
              f"{s['rps'] / summary['w1']['rps']:>7.2f}{s['rps'] / summary['haproxy']['rps']:>11.2f}"
              f"{s['errors']:>8.0f}")
    print("\nmemory (RSS after the runs)")
    for name in ("w1", "w2-cpu0", "w2"):
        parts = mem[name]
        children = [kb for key, kb in parts.items() if key != "main"]
        line = f"  {name:<9} main {parts.get('main', 0) / 1024:.1f} MiB"
        if children:
            line += (f", {len(children)} workers {', '.join(f'{kb / 1024:.1f}' for kb in children)} MiB"
                     f" (total {sum(parts.values()) / 1024:.1f} MiB)")
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "workers", "median": summary, "memory_kb": mem,
                                         "runs": {n: [r.__dict__ for r in rs] for n, rs in runs.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
