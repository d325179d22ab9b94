"""Bulk transfers through the proxy: throughput and the proxy's peak memory growth.

For each target (direct = curl straight to the backend, relay =
bench/h11_relay.py, nlbproxy; also revproxy, haproxy, nginx with --only) this
runs with curl:
  download              GET /bytes/N        (content-length response)
  upload                POST /upload, content-length body from a generator on stdin
  upload-chunked        POST /upload, chunked body from the same generator
  download-slow-client  --slow-size bytes, curl reading at --slow-rate
  upload-slow-backend   --slow-size bytes, the backend reading at --slow-rate
The slow ones are what make a proxy hold data: there the receiver is slower
than the sender, so only back-pressure keeps the proxy's memory flat.  The
backend is bench/bulk_backend.py; uploads are checked against its byte count
and sha256.  For each proxied transfer the proxy's peak RSS growth is
VmHWM after the transfer minus VmRSS before it (the peak is reset before each
transfer through /proc/PID/clear_refs).  Target: nlbproxy growth < 50 MB.
The proxy is pinned to one CPU; curl, the generator and the backend to the other.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import _harness as H

TARGETS = ["direct", "relay", "revproxy", "haproxy", "nginx", "nlbproxy"]
DEFAULT_TARGETS = "direct,relay,nlbproxy"
KINDS = ["download", "upload", "upload-chunked", "download-slow-client",
         "upload-slow-backend"]
MAX_GROWTH_MB = 50.0
MB = 1_000_000
BLOCK = random.Random(7).randbytes(1 << 20)
# Writes N bytes of BLOCK, repeated, to stdout: the upload body.
GENERATOR = ("import sys,random\n"
             "b=random.Random(7).randbytes(1<<20);n=int(sys.argv[1]);w=sys.stdout.buffer.write\n"
             "while n>0:\n w(b[:n]);n-=len(b)\n")


@dataclass
class Transfer:
    target: str
    kind: str
    mb_per_s: float
    seconds: float
    rss_before_mb: float | None   # the proxy's RSS before the transfer; None for direct
    growth_mb: float | None       # peak RSS growth during it; None for direct
    ok: bool
    detail: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1_000_000_000, help="bytes per transfer")
    ap.add_argument("--only", default=DEFAULT_TARGETS,
                    help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--slow-size", type=int, default=200_000_000,
                    help="bytes per slow-receiver transfer")
    ap.add_argument("--slow-rate", type=float, default=50.0,
                    help="slow receiver's rate, MB/s (MB = 10^6 bytes)")
    ap.add_argument("--max-time", type=float, default=300.0,
                    help="curl --max-time per transfer, seconds (a stall fails, not hangs)")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    if set(args.only) - set(TARGETS):
        ap.error(f"targets are {', '.join(TARGETS)}")
    return args


@functools.cache
def expected_sha256(size: int) -> str:
    sha = hashlib.sha256()
    full, rest = divmod(size, len(BLOCK))
    for _ in range(full):
        sha.update(BLOCK)
    sha.update(BLOCK[:rest])
    return sha.hexdigest()


def curl_argv(max_time: float) -> list[str]:
    # --max-time turns a stalled transfer into a reported failure (exit 28).
    return ["curl", "-s", "--max-time", f"{max_time:g}"]


def curl_failure(res: subprocess.CompletedProcess[str]) -> str:
    return "" if res.returncode == 0 else f"curl exit {res.returncode}; "


def download(port: int, size: int, cpu: int, max_time: float,
             extra: Sequence[str] = ()) -> tuple[float, float, bool, str]:
    res = H.run([*curl_argv(max_time), *extra, "-o", "/dev/null", "-w",
                 "%{http_code} %{size_download} %{speed_download} %{time_total}",
                 f"http://127.0.0.1:{port}/bytes/{size}"], cpu=cpu)
    code, got, speed, total = res.stdout.split()
    ok = res.returncode == 0 and code == "200" and int(got) == size
    return float(speed) / MB, float(total), ok, f"{curl_failure(res)}HTTP {code}, {got} bytes"


def upload(port: int, size: int, cpu: int, chunked: bool, max_time: float,
           extra: Sequence[str] = ()) -> tuple[float, float, bool, str]:
    sha = expected_sha256(size)
    framing = [] if chunked else ["-H", "Transfer-Encoding:", "-H", f"Content-Length: {size}"]
    gen = subprocess.Popen(["taskset", "-c", str(cpu), H.PY, "-c", GENERATOR, str(size)],
                           stdout=subprocess.PIPE)
    try:
        res = H.run([*curl_argv(max_time), *extra, "-X", "POST", "-T", "-", "-H", "Expect:",
                     *framing, "-w", "\n%{http_code} %{speed_upload} %{time_total}",
                     f"http://127.0.0.1:{port}/upload"], cpu=cpu, stdin=gen.stdout)
    finally:
        assert gen.stdout is not None
        gen.stdout.close()
        gen.kill()
        gen.wait()
    body, _, status = res.stdout.rpartition("\n")
    code, speed, total = status.split()
    try:
        answer = json.loads(body)
        ok = res.returncode == 0 and code == "200" and answer == {"bytes": size, "sha256": sha}
    except ValueError:
        answer, ok = body[:200], False
    return (float(speed) / MB, float(total), ok,
            f"{curl_failure(res)}HTTP {code}, backend answered {answer!r}")


def transfer(kind: str, port: int, args: argparse.Namespace,
             cpu: int) -> tuple[float, float, bool, str]:
    rate = str(int(args.slow_rate * MB))
    if kind == "download":
        return download(port, args.size, cpu, args.max_time)
    if kind == "upload":
        return upload(port, args.size, cpu, False, args.max_time)
    if kind == "upload-chunked":
        return upload(port, args.size, cpu, True, args.max_time)
    if kind == "download-slow-client":
        return download(port, args.slow_size, cpu, args.max_time, ["--limit-rate", rate])
    if kind == "upload-slow-backend":
        return upload(port, args.slow_size, cpu, False, args.max_time,
                      ["-H", f"x-read-rate: {rate}"])
    raise ValueError(kind)


def run_transfer(target: str, kind: str, port: int, args: argparse.Namespace,
                 pid: int | None, load_cpu: int) -> Transfer:
    before = 0
    if pid is not None:
        H.reset_hwm(pid)
        before = H.rss_kb(pid)
    speed, secs, ok, detail = transfer(kind, port, args, load_cpu)
    if pid is None:
        return Transfer(target, kind, speed, secs, None, None, ok, detail)
    return Transfer(target, kind, speed, secs, before * 1024 / MB,
                    (H.hwm_kb(pid) - before) * 1024 / MB, ok, detail)


def start(procs: H.Procs, target: str, backend: int,
          proxy_cpu: int) -> tuple[int, H.Proc] | None:
    """Start a proxy; returns (port, process), or None when it cannot run."""
    if target == "nlbproxy" and not H.nlbproxy_available():
        print("nlbproxy: SKIPPED (twistd --help does not list the nlbproxy plugin)",
              file=sys.stderr)
        return None
    try:
        port = H.start_target(procs, target, backend, proxy_cpu)
    except RuntimeError as e:
        print(f"{target}: SKIPPED (did not start)\n{e}", file=sys.stderr)
        return None
    return port, H.find_target_proc(procs, target)


def warm_up(port: int, load_cpu: int) -> None:
    """Small transfers first, so imports and first-use allocations are not counted."""
    for result in (download(port, 10 * MB, load_cpu, 30),
                   upload(port, 10 * MB, load_cpu, False, 30),
                   upload(port, 10 * MB, load_cpu, True, 30)):
        if not result[2]:
            print(f"warm-up transfer failed: {result[3]}", file=sys.stderr)


def print_report(results: list[Transfer], args: argparse.Namespace) -> None:
    print(f"\n{args.size / MB:.0f} MB per transfer, {args.slow_size / MB:.0f} MB for the "
          f"slow ones at {args.slow_rate:g} MB/s (MB = 10^6 bytes)")
    print(f"{'target':<10}{'transfer':<22}{'MB/s':>9}{'seconds':>9}{'RSS before MB':>15}"
          f"{'peak growth MB':>16}  ok")
    direct = {r.kind: r.mb_per_s for r in results if r.target == "direct"}
    for r in results:
        growth = "-" if r.growth_mb is None else f"{r.growth_mb:.1f}"
        before = "-" if r.rss_before_mb is None else f"{r.rss_before_mb:.1f}"
        vs = (f"  ({r.mb_per_s / direct[r.kind]:.2f} x direct)"
              if r.target != "direct" and direct.get(r.kind) else "")
        print(f"{r.target:<10}{r.kind:<22}{r.mb_per_s:>9.0f}{r.seconds:>9.2f}{before:>15}{growth:>16}"
              f"  {'yes' if r.ok else 'NO: ' + r.detail}{vs}")
    print()
    nlb = [r for r in results if r.target == "nlbproxy"]
    for kind in KINDS:
        found = next((x for x in nlb if x.kind == kind), None)
        peak = None if found is None else found.growth_mb
        if found is None or peak is None:
            print(f"SKIP nlbproxy {kind:<21} peak RSS growth (target < {MAX_GROWTH_MB:.0f} MB)")
            continue
        verdict = "PASS" if found.ok and peak < MAX_GROWTH_MB else "FAIL"
        print(f"{verdict} nlbproxy {kind:<21} peak RSS growth = {peak:.1f} MB "
              f"(target < {MAX_GROWTH_MB:.0f} MB){'' if found.ok else ', transfer failed'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    proxy_cpu, load_cpu = H.pick_cpus()
    print(H.load_note(), flush=True)
    results: list[Transfer] = []
    with H.workdir(args.keep) as wd, H.Procs(wd) as procs:
        backend = H.free_port()
        H.wait_port(backend, procs.start("bulk-backend", [H.PY, str(H.BENCH_DIR /
                                         "bulk_backend.py"), "--port", str(backend)],
                                         cpu=load_cpu))
        for target in args.only:
            proc = None
            if target == "direct":
                port = backend
            else:
                started = start(procs, target, backend, proxy_cpu)
                if started is None:
                    continue
                port, proc = started
            warm_up(port, load_cpu)
            for kind in KINDS:
                r = run_transfer(target, kind, port, args, proc.pid if proc else None, load_cpu)
                print(f"{target:<10}{kind:<22}{r.mb_per_s:>8.0f} MB/s"
                      + ("" if r.growth_mb is None else f"  peak growth {r.growth_mb:.1f} MB")
                      + ("" if r.ok else f"  FAILED: {r.detail}"), flush=True)
                results.append(r)
            if proc is not None:
                procs.stop(proc)
    print_report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "bulk", "size_bytes": args.size,
                                         "slow_size_bytes": args.slow_size,
                                         "slow_rate_mb_s": args.slow_rate,
                                         "max_growth_mb": MAX_GROWTH_MB,
                                         "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
