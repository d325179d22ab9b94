"""Requests/second and latency of small keep-alive GETs through each proxy, side by side.

Targets: direct (wrk straight to the backend), relay (bench/h11_relay.py),
revproxy (twisted.web ReverseProxyResource), haproxy, nginx, nlbproxy.  The
backend is an nginx answering a 100-byte body; the proxy under test is pinned
to one CPU, wrk and the backend to the other.  Every target runs for the
whole benchmark; each measurement is a 2 s wrk warm-up then a measured wrk
run; with --rounds N the targets are measured in alternation N times and the
median of each is reported.

Checks printed: nlbproxy/relay >= 1.0 and nlbproxy/revproxy >= 2.5 (req/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import _harness as H

TARGETS = ["direct", "relay", "revproxy", "haproxy", "nginx", "nlbproxy"]
LABELS = {"direct": "direct", "relay": "h11 relay", "revproxy": "ReverseProxyResource",
          "haproxy": "haproxy", "nginx": "nginx", "nlbproxy": "nlbproxy"}
#: (denominator target, minimum nlbproxy/denominator req/s ratio)
CHECKS = [("relay", 1.0), ("revproxy", 2.5)]
WARMUP_S = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--threads", type=int, default=1, help="wrk -t")
    ap.add_argument("--rounds", type=int, default=1, help="alternate rounds; median per target")
    ap.add_argument("--only", default=",".join(TARGETS),
                    help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = set(args.only) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def start_all(procs: H.Procs, names: list[str], proxy_cpu: int,
              load_cpu: int) -> dict[str, tuple[int, int | None]]:
    """Start the backend and every target; returns target name -> (port, proxy pid)."""
    backend = H.start_backend_nginx(procs, load_cpu)
    ports: dict[str, tuple[int, int | None]] = {}
    for name in names:
        if name == "direct":
            ports[name] = backend, None
        elif name == "nlbproxy" and not H.nlbproxy_available():
            print("nlbproxy: SKIPPED (twistd --help does not list the nlbproxy plugin; "
                  "pip install -e . --config-settings editable_mode=compat)", file=sys.stderr)
        else:
            try:
                port = H.start_target(procs, name, backend, proxy_cpu)
                ports[name] = port, H.find_target_proc(procs, name).pid
            except RuntimeError as e:
                print(f"{name}: SKIPPED (did not start)\n{e}", file=sys.stderr)
    return ports


def measure(port: int, pid: int | None, args: argparse.Namespace,
            load_cpu: int) -> H.WrkResult:
    """Warm-up run, then the measured run; notes how much CPU the proxy used in it."""
    url = f"http://127.0.0.1:{port}/"
    H.wrk(url, WARMUP_S, args.connections, load_cpu, args.threads)
    cpu0, t0 = (H.cpu_seconds(pid) if pid else 0.0), time.monotonic()
    res = H.wrk(url, args.duration, args.connections, load_cpu, args.threads)
    if pid:
        res.proxy_cpu = (H.cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    return res


def summarize(runs: dict[str, list[H.WrkResult]]) -> dict[str, dict[str, float | None]]:
    def med(xs: list[float | None]) -> float | None:
        known = [x for x in xs if x is not None]
        return H.median(known) if known else None
    return {name: {"rps": H.median([r.rps for r in rs]),
                   "p50_ms": H.median([r.p50_ms for r in rs]),
                   "p99_ms": H.median([r.p99_ms for r in rs]),
                   "errors": sum(r.errors for r in rs),
                   "proxy_cpu": med([r.proxy_cpu for r in rs]),
                   "rps_per_cpu": med([r.rps_per_cpu for r in rs])}
            for name, rs in runs.items()}


def ratios(summary: dict[str, dict[str, float | None]], key: str = "rps") -> dict[str, float]:
    """nlbproxy's figure over each other target's (key: rps or rps_per_cpu)."""
    nlb = summary.get("nlbproxy", {}).get(key)
    if not nlb:
        return {}
    return {other: nlb / s[key] for other, s in summary.items()  # type: ignore[operator]
            if other != "nlbproxy" and s[key]}


def checks(ratio: dict[str, float]) -> list[tuple[str, float | None, float, str]]:
    out: list[tuple[str, float | None, float, str]] = []
    for other, minimum in CHECKS:
        r = ratio.get(other)
        verdict = "SKIP" if r is None else ("PASS" if r >= minimum else "FAIL")
        out.append((f"nlbproxy/{LABELS[other]}", r, minimum, verdict))
    return out


def print_report(summary: dict[str, dict[str, float | None]], ratio: dict[str, float],
                 cpu_ratio: dict[str, float], args: argparse.Namespace) -> None:
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
          f"{args.rounds} round(s), median per target")
    print(f"{'target':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'proxy CPU':>11}{'req/CPU-s':>11}")
    for name, s in summary.items():
        cpu = "-" if s["proxy_cpu"] is None else f"{s['proxy_cpu']:.0%}"
        per_cpu = "-" if s["rps_per_cpu"] is None else f"{s['rps_per_cpu']:.0f}"
        print(f"{LABELS[name]:<22}{s['rps']:>10.0f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}"
              f"{s['errors']:>8.0f}{cpu:>11}{per_cpu:>11}")
    if ratio:
        print(f"\n{'ratios':<32}{'req/s':>7}{'req/CPU-s':>11}")
        for other, r in ratio.items():
            per_cpu = f"{cpu_ratio[other]:.2f}" if other in cpu_ratio else "-"
            print(f"  nlbproxy/{LABELS[other]:<21}{r:>7.2f}{per_cpu:>11}")
    print()
    for label, value, minimum, verdict in checks(ratio):
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"{verdict} {label} = {shown} (target >= {minimum})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    proxy_cpu, load_cpu = H.pick_cpus()
    print(H.load_note(), flush=True)
    H.raise_nofile()
    runs: dict[str, list[H.WrkResult]] = {}
    with H.workdir(args.keep) as wd, H.Procs(wd) as procs:
        ports = start_all(procs, args.only, proxy_cpu, load_cpu)
        for rnd in range(args.rounds):
            for name, (port, pid) in ports.items():
                res = measure(port, pid, args, load_cpu)
                runs.setdefault(name, []).append(res)
                print(f"round {rnd + 1}: {LABELS[name]:<22}{res.rps:>10.0f} req/s "
                      f"p50 {res.p50_ms:.2f} ms p99 {res.p99_ms:.2f} ms"
                      + ("" if res.proxy_cpu is None else f" proxy CPU {res.proxy_cpu:.0%}")
                      + (f" ERRORS {res.errors}" if res.errors else ""), flush=True)
    summary = summarize(runs)
    ratio, cpu_ratio = ratios(summary), ratios(summary, "rps_per_cpu")
    print_report(summary, ratio, cpu_ratio, args)
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "rps", "wrk": {"threads": args.threads,
                                        "connections": args.connections,
                                        "duration_s": args.duration},
            "rounds": args.rounds, "cpus": {"proxy": proxy_cpu, "load": load_cpu},
            "runs": {n: [dataclasses.asdict(r) for r in rs] for n, rs in runs.items()},
            "median": summary, "ratios": ratio, "ratios_per_proxy_cpu": cpu_ratio,
            "checks": [{"ratio": lb, "value": r, "min": m, "verdict": v}
                       for lb, r, m, v in checks(ratio)]}, indent=2))


if __name__ == "__main__":
    main()
