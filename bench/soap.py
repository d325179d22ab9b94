"""SOAP requests/second through a SOAP listener vs the same POSTs through an HTTP listener.

One nlbproxy unit, pinned to one CPU, has three listeners in front of one
nginx backend (which answers every request with a 100-byte body): ``http``
(protocol http: the body is only relayed), ``soap`` (protocol soap, no
routes: every envelope is read up to its operation) and ``soap-routes``
(protocol soap with four soap_action / soap_operation routes, the last one
matching).  wrk sends identical keep-alive POSTs of a SOAP 1.1 envelope
(``--size`` bytes, the operation near its start) to each, in alternation for
``--rounds`` rounds; the medians and the ratios soap/http are printed.  The
envelope reader alone (``read_request`` in this process) is timed too.

Check printed: soap/http >= 0.8 (req/s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _harness as H

from nlbproxy.routers.soap import read_request

LISTENERS = ["http", "soap", "soap-routes"]
CHECK = ("soap", 0.8)
WARMUP_S = 2.0
HEADERS = [(b"content-type", b"text/xml; charset=utf-8"), (b"soapaction", b'"urn:bench#add"')]


def envelope(size: int) -> bytes:
    head = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header>'
        '<a:Action xmlns:a="http://www.w3.org/2005/08/addressing">urn:bench#add</a:Action>'
        '<a:To xmlns:a="http://www.w3.org/2005/08/addressing">http://svc/bench</a:To>'
        '</s:Header><s:Body><m:add xmlns:m="urn:bench"><m:data>'
    )
    tail = "</m:data></m:add></s:Body></s:Envelope>\n"
    return (head + "x" * max(0, size - len(head) - len(tail)) + tail).encode()


def unit_conf(workdir: Path, ports: dict[str, int], backend_port: int) -> Path:
    routes = "".join(
        f'[[listener.route]]\n{key} = "{value}"\npool = "app"\n'
        for key, value in [("soap_action", "urn:other#a"), ("soap_operation", "{urn:other}b"),
                           ("soap_operation", "c"), ("soap_operation", "{urn:bench}add")]
    )
    text = f'[unit]\nname = "bench"\nadmin = "tcp:{H.free_port()}:interface=127.0.0.1"\n'
    for name, port in ports.items():
        protocol = "http" if name == "http" else "soap"
        text += (f'\n[[listener]]\nname = "{name}"\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
                 f'protocol = "{protocol}"\npool = "app"\nkeepalive_timeout = 300\n'
                 + (routes if name == "soap-routes" else ""))
    text += f'\n[pool.app]\nhosts = ["127.0.0.1:{backend_port}"]\n'
    conf = workdir / "unit.toml"
    conf.write_text(text)
    return conf


def wrk_post(port: int, script: Path, args: argparse.Namespace, cpu: int, duration: float) -> H.WrkResult:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency",
            "-s", str(script), f"http://127.0.0.1:{port}/"]
    res = H.run(argv, cpu=cpu, timeout=duration + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed: {res.stderr or res.stdout}")
    return H.parse_wrk(res.stdout)


def reader_rate(body: bytes, seconds: float = 1.0) -> float:
    """Envelopes per second that ``read_request`` reads in this process."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            read_request(HEADERS, body, True)
        n += 100
    return n / seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--threads", type=int, default=1, help="wrk -t")
    ap.add_argument("--rounds", type=int, default=1, help="alternate rounds; median per listener")
    ap.add_argument("--size", type=int, default=1024, help="envelope bytes")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    proxy_cpu, load_cpu = H.pick_cpus()
    print(H.load_note(), flush=True)
    H.raise_nofile()
    body = envelope(args.size)
    runs: dict[str, list[H.WrkResult]] = {}
    with H.workdir(args.keep) as wd, H.Procs(wd) as procs:
        (wd / "body.xml").write_bytes(body)
        script = wd / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f'local f = io.open("{wd / "body.xml"}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
            'wrk.headers["Content-Type"] = "text/xml; charset=utf-8"\n'
            'wrk.headers["SOAPAction"] = \'"urn:bench#add"\'\n'
        )
        backend = H.start_backend_nginx(procs, load_cpu)
        ports = {name: H.free_port() for name in LISTENERS}
        unit = procs.start("nlbproxy", H.twistd_argv("nlbproxy", "--config", str(unit_conf(wd, ports, backend))),
                           cpu=proxy_cpu)
        for port in ports.values():
            H.wait_port(port, unit)
        for rnd in range(args.rounds):
            for name, port in ports.items():
                wrk_post(port, script, args, load_cpu, WARMUP_S)
                cpu0, t0 = H.cpu_seconds(unit.pid), time.monotonic()
                res = wrk_post(port, script, args, load_cpu, args.duration)
                res.proxy_cpu = (H.cpu_seconds(unit.pid) - cpu0) / (time.monotonic() - t0)
                runs.setdefault(name, []).append(res)
                print(f"round {rnd + 1}: {name:<12}{res.rps:>10.0f} req/s p50 {res.p50_ms:.2f} ms "
                      f"p99 {res.p99_ms:.2f} ms proxy CPU {res.proxy_cpu:.0%}"
                      + (f" ERRORS {res.errors}" if res.errors else ""), flush=True)
    H.pin_self(load_cpu)
    rate = reader_rate(body)
    summary = {name: {"rps": H.median([r.rps for r in rs]), "p50_ms": H.median([r.p50_ms for r in rs]),
                      "p99_ms": H.median([r.p99_ms for r in rs]), "errors": sum(r.errors for r in rs),
                      "rps_per_cpu": H.median([r.rps_per_cpu or 0.0 for r in rs])}
               for name, rs in runs.items()}
    base = summary["http"]
    ratio = {name: s["rps"] / base["rps"] for name, s in summary.items() if name != "http"}
    cpu_ratio = {name: s["rps_per_cpu"] / base["rps_per_cpu"]
                 for name, s in summary.items() if name != "http" and base["rps_per_cpu"]}
    print(f"\n{len(body)}-byte SOAP 1.1 POSTs, wrk -t{args.threads} -c{args.connections} "
          f"-d{args.duration:g}s, {args.rounds} round(s), median per listener")
    print(f"{'listener':<14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'req/CPU-s':>11}")
    for name, s in summary.items():
        print(f"{name:<14}{s['rps']:>10.0f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['errors']:>8.0f}"
              f"{s['rps_per_cpu']:>11.0f}")
    print(f"\n{'ratios':<24}{'req/s':>7}{'req/CPU-s':>11}")
    for name, r in ratio.items():
        print(f"  {name + '/http':<22}{r:>7.2f}{cpu_ratio.get(name, 0.0):>11.2f}")
    print(f"\nenvelope reader alone: {rate:,.0f} envelopes/s on one CPU")
    name, minimum = CHECK
    verdict = "PASS" if ratio[name] >= minimum else "FAIL"
    print(f"{verdict} {name}/http = {ratio[name]:.2f} (target >= {minimum})")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "soap", "size": len(body), "median": summary,
                                         "ratios": ratio, "ratios_per_proxy_cpu": cpu_ratio,
                                         "reader_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()
