"""TLS through each proxy, side by side: handshakes per second (full and resumed)
and requests per second over keep-alive TLS against plain HTTP.

Targets: nlbproxy, haproxy, nginx, each terminating TLS with the same
certificate (ECDSA P-256, made at run time) and also listening in plain HTTP,
in front of the same nginx backend (a 100-byte answer).  The proxy is pinned
to one CPU, the clients and the backend to the other.

Handshakes: ``--clients`` parallel client processes (this script with
``--handshakes``; pyOpenSSL, or Python's ssl with ``--client ssl``) for
``--duration`` seconds each: connect, handshake, (TLS 1.3: read the tickets
that follow it), close_notify, close; ``new`` makes every connection a full
handshake, ``reuse`` resumes the last session each time.  Both clients offer
the same ciphers and groups; Python's ssl spends three times the CPU on a
resumption (it copies the session, certificate included, into every
connection), so that four of its clients on one CPU leave a proxy idle
between resumptions and its per-CPU-second figure then counts sleeping and
waking too.  Figures are given per second and per CPU-second of the proxy:
one client CPU may not saturate a proxy, and other load on the machine
moves per-second figures far more.
Requests: wrk keep-alive GETs over https and over http.

Where the cost goes: ``tcp`` connections (connect, half-close, read the
close; no TLS) on the plain port give each proxy's fixed cost of a
connection; and OpenSSL's own server-side cost of each handshake kind is
timed in one process pinned to the proxy's CPU (nlbproxy's
``TLSServer`` contexts, memory BIOs, no sockets), which bounds the
resumed/full ratio any proxy on this OpenSSL can reach.

Checks printed: nlbproxy resumed/full handshakes >= 3 (TLS 1.2 and 1.3) and
nlbproxy TLS/plain keep-alive req/s >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import time
from pathlib import Path

import _harness as H

sys.path.insert(0, str(H.REPO_DIR))
from tests.certs import CA  # the tests' certificate maker, from the repository

TARGETS = ["nlbproxy", "haproxy", "nginx"]
WARMUP_S = 2.0
#: (what, minimum)
CHECKS = [("resumed/full TLS 1.2", 3.0), ("resumed/full TLS 1.3", 3.0), ("TLS/plain req/s", 0.8)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    ap.add_argument("--clients", type=int, default=4, help="parallel handshake client processes")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every target N times, in alternating order, and report medians")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="pyopenssl",
                    help="the handshake clients' TLS library (ssl: Python's, 3 x the CPU per resumption)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--key", choices=["rsa2048", "ecdsa"], default="rsa2048",
                    help="the certificate's key (RSA 2048 is what most sites serve)")
    ap.add_argument("--only", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    if set(args.only) - set(TARGETS):
        ap.error(f"unknown targets: {', '.join(sorted(set(args.only) - set(TARGETS)))}")
    return args


# --- the proxies, each with a plain and a TLS port --------------------------------------
def start_nlbproxy(procs: H.Procs, pem: Path, backend: int, cpu: int) -> tuple[int, int]:
    plain, tls = H.free_port(), H.free_port()
    conf = procs.workdir / "nlbproxy.toml"
    listener = "keepalive_timeout = 300\nmax_connections = 20000\nmax_body_bytes = 0\npool = \"app\"\n"
    conf.write_text(f"""
[unit]
name = "bench"
admin = "tcp:{H.free_port()}:interface=127.0.0.1"

[[listener]]
name = "plain"
endpoint = "tcp:{plain}:interface=127.0.0.1"
{listener}
[[listener]]
name = "tls"
endpoint = "tcp:{tls}:interface=127.0.0.1"
certificates = ["{pem}"]
{listener}
[pool.app]
hosts = ["127.0.0.1:{backend}"]
""")
    proc = procs.start("nlbproxy", H.twistd_argv("nlbproxy", "--config", str(conf)), cpu=cpu)
    H.wait_port(plain, proc)
    H.wait_port(tls, proc)
    return plain, tls


def start_haproxy(procs: H.Procs, pem: Path, backend: int, cpu: int) -> tuple[int, int]:
    plain, tls = H.free_port(), H.free_port()
    conf = procs.workdir / "haproxy-tls.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn {H.NOFILE_HARD // 2 - 100}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers ECDHE+AESGCM:ECDHE+CHACHA20
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s
frontend fe
    bind 127.0.0.1:{plain}
    bind 127.0.0.1:{tls} ssl crt {pem} alpn http/1.1
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
""")
    proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)], cpu=cpu)
    H.wait_port(plain, proc)
    H.wait_port(tls, proc)
    return plain, tls


def start_nginx(procs: H.Procs, pem: Path, backend: int, cpu: int) -> tuple[int, int]:
    plain, tls = H.free_port(), H.free_port()
    upstream = (f"upstream be {{ server 127.0.0.1:{backend}; keepalive 64;"
                " keepalive_requests 10000000; keepalive_timeout 300s; }")
    server = (f"listen 127.0.0.1:{tls} ssl;\n"
              f"        ssl_certificate {pem}; ssl_certificate_key {pem};\n"
              "        ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;\n"
              "        ssl_session_cache shared:SSL:10m; ssl_session_tickets on;\n"
              "        location / { proxy_pass http://be; proxy_http_version 1.1;"
              ' proxy_set_header Connection ""; }')
    conf = H.nginx_conf(procs.workdir, f"proxy-nginx-{tls}", plain, server, upstream)  # one per round
    proc = procs.start("nginx", H.nginx_argv(conf), cpu=cpu)
    H.wait_port(plain, proc)
    H.wait_port(tls, proc)
    return plain, tls


STARTERS = {"nlbproxy": start_nlbproxy, "haproxy": start_haproxy, "nginx": start_nginx}


# --- measurements -----------------------------------------------------------------------
def _handshake(raw: socket.socket, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, tls: ssl.SSLObject) -> None:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(data)
    raw.sendall(outgoing.read())


def _read_tickets(raw: socket.socket, incoming: ssl.MemoryBIO, tls: ssl.SSLObject) -> None:
    # TLS 1.3: the server's tickets follow its handshake flight at once.
    incoming.write(raw.recv(65536))
    try:
        tls.read(1)
    except ssl.SSLWantReadError:
        pass


def tcp_client(port: int, duration: float) -> None:
    """One client process: plain TCP connections in a loop (connect,
    half-close, read the proxy's close); prints JSON counts."""
    done = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):
                pass
        done += 1
    print(json.dumps({"connections": done, "reused": 0}), flush=True)


def ssl_client(port: int, version: str, mode: str, duration: float) -> None:
    """One client process (Python's ssl): handshakes in a loop; prints JSON counts."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    session = None
    done = reused = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(incoming, outgoing, server_hostname="bench.test", session=session)

            _handshake(raw, incoming, outgoing, tls)
            if version == "TLSv1_3":
                _read_tickets(raw, incoming, tls)
            # close_notify without waiting for the server's, as browsers and
            # openssl s_time do.
            try:
                tls.unwrap()
            except ssl.SSLError:
                pass
            raw.sendall(outgoing.read())
            done += 1
            reused += tls.session_reused
            if mode == "reuse":
                session = tls.session
    print(json.dumps({"connections": done, "reused": reused}), flush=True)


#: What Python's ssl client offers (its default cipher string; OpenSSL 3.0's
#: default groups), so that both clients ask the servers for the same work:
#: pyOpenSSL's own OpenSSL would offer a post-quantum key share, which the
#: servers' OpenSSL 3.0 ignores but parses.
PY_SSL_CIPHERS = b"@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
PY_SSL_GROUPS = b"X25519:P-256:X448:P-521:P-384:ffdhe2048:ffdhe3072:ffdhe4096:ffdhe6144:ffdhe8192"


def pyopenssl_client(port: int, version: str, mode: str, duration: float) -> None:
    """One client process (pyOpenSSL): the same connections as
    :func:`ssl_client`, at a third of its CPU for a resumed one: Python's
    ssl copies a session (re-decoding the server's certificate) every time
    it is set on a connection, which made four clients too slow to keep a
    proxy busy with resumptions (see README)."""
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    wanted = SSL.TLS1_2_VERSION if version == "TLSv1_2" else SSL.TLS1_3_VERSION
    ctx.set_min_proto_version(wanted)
    ctx.set_max_proto_version(wanted)
    ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_cipher_list(PY_SSL_CIPHERS)
    if SSL._lib.SSL_CTX_set1_curves_list(ctx._context, PY_SSL_GROUPS) != 1:
        raise RuntimeError("OpenSSL refused the groups")
    session_reused = SSL._lib.SSL_session_reused
    session = None
    done = reused = 0
    end = time.monotonic() + duration
    address = ("127.0.0.1", port)
    while time.monotonic() < end:
        with socket.socket() as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.connect(address)
            tls = SSL.Connection(ctx, None)
            tls.set_tlsext_host_name(b"bench.test")
            tls.set_connect_state()
            if session is not None:
                tls.set_session(session)
            while True:
                try:
                    tls.do_handshake()
                    break
                except SSL.WantReadError:
                    raw.sendall(tls.bio_read(65536))
                    data = raw.recv(65536)
                    if not data:
                        raise ConnectionError("closed during the handshake") from None
                    tls.bio_write(data)
            try:
                raw.sendall(tls.bio_read(65536))  # TLS 1.2 full: our Finished
            except SSL.WantReadError:
                pass
            if version == "TLSv1_3":
                # The server's tickets follow its handshake flight at once.
                tls.bio_write(raw.recv(65536))
                try:
                    tls.recv(1)
                except SSL.WantReadError:
                    pass
            tls.shutdown()  # close_notify, not waiting for the server's
            raw.sendall(tls.bio_read(65536))
            done += 1
            reused += session_reused(tls._ssl)
            if mode == "reuse":
                session = tls.get_session()
    print(json.dumps({"connections": done, "reused": reused}), flush=True)


CLIENTS = {"pyopenssl": pyopenssl_client, "ssl": ssl_client}


def handshakes(port: int, mode: str, version: str, args: argparse.Namespace, cpu: int, procs: H.Procs,
               pid: int) -> dict:
    """``--clients`` client processes at once; connections per second (all of
    them), per proxy CPU-second, and the share that really resumed."""
    if mode == "tcp":
        argv = [H.PY, str(Path(__file__).resolve()), "--tcp", str(port), str(args.duration)]
    else:
        argv = [H.PY, str(Path(__file__).resolve()), "--handshakes", str(port), version, mode, str(args.duration),
                args.client]
    cpu0, start = H.cpu_seconds(pid), time.monotonic()
    running = [procs.start(f"handshakes-{i}", argv, cpu=cpu) for i in range(args.clients)]
    for proc in running:
        proc.popen.wait(args.duration + 60)
    elapsed = time.monotonic() - start
    proxy_cpu = H.cpu_seconds(pid) - cpu0
    counts = [json.loads(proc.log.read_text().strip().splitlines()[-1]) for proc in running]
    total = sum(c["connections"] for c in counts)
    reused = sum(c["reused"] for c in counts) / total if total else 0.0
    return {"per_s": total / elapsed, "per_cpu_s": total / proxy_cpu if proxy_cpu else 0.0,
            "proxy_cpu": proxy_cpu / elapsed, "connections": total, "reused_share": reused}


def openssl_costs(pem: str, rounds: int) -> None:
    """Server-side CPU of each handshake kind in OpenSSL alone, through
    nlbproxy's listener contexts and memory BIOs; prints JSON microseconds."""
    from nlbproxy.tls import TLSServer

    server = TLSServer("bench", (pem,))
    costs = {}
    for version in ("TLSv1_2", "TLSv1_3"):
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.minimum_version = client.maximum_version = getattr(ssl.TLSVersion, version)
        for mode in ("new", "reuse"):
            session = None
            spent = 0.0
            for i in range(rounds + 1):  # the first one makes the session to resume
                c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
                start = time.process_time()
                tls = server.new_connection(s_in, s_out)
                taken = time.process_time() - start
                peer = client.wrap_bio(c_in, c_out, server_hostname="bench.test", session=session)
                done = False
                while not done:
                    try:
                        peer.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        pass
                    s_in.write(c_out.read())
                    start = time.process_time()
                    try:
                        tls.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    taken += time.process_time() - start
                    c_in.write(s_out.read())
                try:
                    peer.read(1)  # TLS 1.3 tickets
                except ssl.SSLWantReadError:
                    pass
                if mode == "reuse":
                    if i and not tls.session_reused:
                        raise RuntimeError(f"{version} did not resume")
                    session = peer.session
                if i:
                    spent += taken
            costs[f"{mode} {version.lower().replace('v', '')}"] = spent / rounds * 1e6
    print(json.dumps(costs), flush=True)


def openssl(pem: Path, cpu: int, procs: H.Procs) -> dict:
    proc = procs.start("openssl-costs", [H.PY, str(Path(__file__).resolve()), "--openssl", str(pem), "2000"], cpu=cpu)
    proc.popen.wait(300)
    return json.loads(proc.log.read_text().strip().splitlines()[-1])


def rps(url: str, args: argparse.Namespace, cpu: int, pid: int) -> dict:
    H.wrk(url, WARMUP_S, args.connections, cpu)
    cpu0, start = H.cpu_seconds(pid), time.monotonic()
    res = H.wrk(url, args.duration, args.connections, cpu)
    proxy_cpu = H.cpu_seconds(pid) - cpu0
    return {"per_s": res.rps, "per_cpu_s": res.requests / proxy_cpu if proxy_cpu else 0.0,
            "proxy_cpu": proxy_cpu / (time.monotonic() - start), "errors": res.errors}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--handshakes"]:
        CLIENTS[argv[5]](int(argv[1]), argv[2], argv[3], float(argv[4]))
        return
    if argv[:1] == ["--tcp"]:
        tcp_client(int(argv[1]), float(argv[2]))
        return
    if argv[:1] == ["--openssl"]:
        openssl_costs(argv[1], int(argv[2]))
        return
    args = parse_args(argv)
    proxy_cpu, load_cpu = H.pick_cpus()
    print(H.load_note(), flush=True)
    H.raise_nofile()
    rounds: dict[str, list[dict]] = {}
    with H.workdir(args.keep) as wd, H.Procs(wd) as procs:
        pem = CA(wd / "pki").issue("bench.pem", dns=["bench.test"], rsa_bits=2048 if args.key == "rsa2048" else 0)
        costs = openssl(pem, proxy_cpu, procs)
        print("OpenSSL alone, server side: " + ", ".join(f"{k} {v:.0f} us" for k, v in costs.items()), flush=True)
        backend = H.start_backend_nginx(procs, load_cpu)
        targets = list(args.only)
        if "nlbproxy" in targets and not H.nlbproxy_available():
            print("nlbproxy: SKIPPED (twistd --help does not list the plugin)", file=sys.stderr)
            targets.remove("nlbproxy")
        for n in range(args.rounds):
            if args.rounds > 1:
                print(f"-- round {n + 1} of {args.rounds}", flush=True)
            # Alternate the order, so that no target always runs first.
            for name in targets if n % 2 == 0 else targets[::-1]:
                rounds.setdefault(name, []).append(measure(name, pem, backend, proxy_cpu, load_cpu, procs, args))
    results = {name: combine(rounds[name]) for name in targets}
    if args.rounds > 1:
        print("\nper round, resumed/full per proxy CPU-second (TLS 1.2, TLS 1.3):")
        for name in targets:
            print(f"{name:<10}" + "  ".join(f"{ratios(r, 'per_cpu_s')['resumed/full TLS 1.2']:.2f} "
                                           f"{ratios(r, 'per_cpu_s')['resumed/full TLS 1.3']:.2f}"
                                           for r in rounds[name]))
    report(results, costs, args, rounds)


def measure(name: str, pem: Path, backend: int, proxy_cpu: int, load_cpu: int, procs: H.Procs,
            args: argparse.Namespace) -> dict:
    """Every figure of one target, started afresh."""
    plain, tls = STARTERS[name](procs, pem, backend, proxy_cpu)
    pid = H.find_target_proc(procs, name).pid
    r: dict = {}
    for version in ("tls1_2", "tls1_3"):
        for mode in ("new", "reuse"):
            r[f"{mode} {version}"] = hs = handshakes(
                tls, mode, "TLSv1_2" if version == "tls1_2" else "TLSv1_3", args, load_cpu, procs, pid)
            print(f"{name:<9} {mode:<5} {version}: {hs['per_s']:8.0f} handshakes/s "
                  f"{hs['per_cpu_s']:8.0f} per proxy CPU-s (proxy CPU {hs['proxy_cpu']:.0%}, "
                  f"{hs['reused_share']:.0%} resumed)", flush=True)
    r["tcp"] = hs = handshakes(plain, "tcp", "", args, load_cpu, procs, pid)
    print(f"{name:<9} tcp connect/close: {hs['per_s']:8.0f} /s {hs['per_cpu_s']:8.0f} per proxy CPU-s "
          f"(proxy CPU {hs['proxy_cpu']:.0%})", flush=True)
    for kind, url in (("plain", f"http://127.0.0.1:{plain}/"), ("tls", f"https://127.0.0.1:{tls}/")):
        r[f"rps {kind}"] = res = rps(url, args, load_cpu, pid)
        print(f"{name:<9} keep-alive {kind:<5}: {res['per_s']:8.0f} req/s {res['per_cpu_s']:8.0f} per proxy "
              f"CPU-s (proxy CPU {res['proxy_cpu']:.0%})" + (f" ERRORS {res['errors']}" if res["errors"] else ""),
              flush=True)
    procs.stop(H.find_target_proc(procs, name))
    return r


def combine(rounds: list[dict]) -> dict:
    """The median of each figure over the rounds (errors: their sum)."""
    return {
        column: {key: (sum(r[column][key] for r in rounds) if key == "errors"
                       else H.median([r[column][key] for r in rounds]))
                 for key in rounds[0][column]}
        for column in rounds[0]
    }


def ratios(r: dict, key: str) -> dict[str, float]:
    def over(a: str, b: str) -> float:
        return r[a][key] / r[b][key] if r[b][key] else 0.0

    return {"resumed/full TLS 1.2": over("reuse tls1_2", "new tls1_2"),
            "resumed/full TLS 1.3": over("reuse tls1_3", "new tls1_3"),
            "TLS/plain req/s": over("rps tls", "rps plain")}


COLUMNS = ["new tls1_2", "reuse tls1_2", "new tls1_3", "reuse tls1_3", "rps plain", "rps tls"]


def report(results: dict[str, dict], costs: dict[str, float], args: argparse.Namespace,
           rounds: dict[str, list[dict]]) -> None:
    print(f"\n{args.key} certificate, {args.clients} handshake clients ({args.client}), wrk -c{args.connections}, "
          f"{args.duration:g}s per figure" + (f", median of {args.rounds} rounds" if args.rounds > 1 else ""))
    tables = {}
    for key, what in (("per_s", "per second"), ("per_cpu_s", "per proxy CPU-second")):
        print(f"\nhandshakes and requests {what}")
        print(f"{'target':<10}" + "".join(f"{c:>14}" for c in COLUMNS))
        for name, r in results.items():
            print(f"{name:<10}" + "".join(f"{r[c][key]:>14.0f}" for c in COLUMNS))
        tables[key] = table = {name: ratios(r, key) for name, r in results.items()}
        print(f"{'ratios':<24}" + "".join(f"{n:>10}" for n in results))
        for what_, _ in CHECKS:
            print(f"{what_:<24}" + "".join(f"{table[n][what_]:>10.2f}" for n in results))
    nlb = results.get("nlbproxy")
    if nlb:
        print()
        for name in results:
            if name != "nlbproxy":
                print(f"nlbproxy/{name}: TLS req/s {nlb['rps tls']['per_s'] / results[name]['rps tls']['per_s']:.2f}, "
                      f"full TLS 1.2 handshakes/CPU-s "
                      f"{nlb['new tls1_2']['per_cpu_s'] / results[name]['new tls1_2']['per_cpu_s']:.2f}")
    # Per connection: full = F + S_full and resumed = F + S_resumed, with S
    # OpenSSL's own cost and F all the rest (accept, events, close); the
    # ratio reaches 3 only while F <= (S_full - 3 S_resumed) / 2.
    print("\nper connection, microseconds of proxy CPU (OpenSSL alone: server side, in one process)")
    print(f"{'':<24}" + "".join(f"{n:>10}" for n in ["OpenSSL", *results]))
    for column in COLUMNS[:4]:
        print(f"{column:<24}{costs[column]:>10.0f}"
              + "".join(f"{1e6 / r[column]['per_cpu_s'] if r[column]['per_cpu_s'] else 0:>10.0f}"
                        for r in results.values()))
    print(f"{'tcp connect/close':<24}{'':>10}"
          + "".join(f"{1e6 / r['tcp']['per_cpu_s'] if r['tcp']['per_cpu_s'] else 0:>10.0f}"
                    for r in results.values()))
    for version in ("tls1_2", "tls1_3"):
        full, resumed = costs[f"new {version}"], costs[f"reuse {version}"]
        print(f"{version}: OpenSSL alone resumed/full {full / resumed:.2f}; 3 x needs the rest of a "
              f"connection <= {max(0.0, (full - 3 * resumed) / 2):.0f} us")
    # The checks are on the unit's capacity (per CPU-second): a single
    # client CPU cannot always saturate the proxy, and other load on the
    # machine moves the per-second figures far more.
    print()
    verdicts = []
    for what, minimum in CHECKS:
        value = tables["per_cpu_s"].get("nlbproxy", {}).get(what)
        verdict = "SKIP" if value is None else ("PASS" if value >= minimum else "FAIL")
        verdicts.append({"ratio": what, "per": "proxy CPU-second", "value": value, "min": minimum,
                         "verdict": verdict})
        print(f"{verdict} nlbproxy {what} per proxy CPU-second = {'n/a' if value is None else f'{value:.2f}'} "
              f"(target >= {minimum}; per second: {tables['per_s'].get('nlbproxy', {}).get(what, 0):.2f})")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "tls", "key": args.key, "client": args.client,
                                         "rounds": rounds, "results": results, "openssl_us": costs,
                                         "ratios": tables, "checks": verdicts}, indent=2))


if __name__ == "__main__":
    main()
