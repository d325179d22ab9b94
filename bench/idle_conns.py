"""Memory per idle keep-alive client connection held by the proxy.

For each target (default: nlbproxy and the bare h11 relay) this opens N client
connections; each sends one small GET, reads the whole response, then stays
idle.  The proxy's RSS (VmRSS of its process and any children) is read before
and after, and the growth divided by N is printed.  Target: nlbproxy < 30 KB
per connection.  The client is a selectors loop in this process (non-blocking
sockets, h11 for reading the responses), with a bounded number of handshakes in
flight so the listen backlog never overflows.

File descriptors: the hard RLIMIT_NOFILE of this machine may cap N; the relay
needs two descriptors per client connection (it keeps one backend connection
per client), so for it N is lowered to fit and the per-connection figure is
still comparable.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h11

import _harness as H

TARGETS = ["relay", "revproxy", "haproxy", "nginx", "nlbproxy"]
MAX_KB_PER_CONN = 30.0
#: descriptors the proxy holds per idle client connection
FDS_PER_CONN = {"relay": 2}
HANDSHAKES_IN_FLIGHT = 100
WARMUP_CONNS = 200


@dataclass
class Result:
    target: str
    connections: int
    rss_before_kb: int
    rss_after_kb: int
    kb_per_conn: float
    still_open: int
    open_seconds: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--connections", type=int, default=10_000,
                    help="idle connections to open")
    ap.add_argument("--only", default="relay,nlbproxy",
                    help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    if set(args.only) - set(TARGETS):
        ap.error(f"targets are {', '.join(TARGETS)}")
    return args


def capacity(target: str) -> int:
    """How many client connections the target (and this process) can hold under the
    hard RLIMIT_NOFILE; haproxy's own maxconn is set from the same limit."""
    if target == "haproxy":
        return H.NOFILE_HARD // 2 - 100
    return (H.NOFILE_HARD - 200) // FDS_PER_CONN.get(target, 1)


class _Client:
    __slots__ = ("sock", "h11")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)


def open_idle(port: int, n: int, timeout: float = 120.0) -> list[socket.socket]:
    """Open n connections, each with one complete GET exchange; returns the sockets."""
    request = h11.Connection(h11.CLIENT).send(
        h11.Request(method="GET", target="/", headers=[("host", "bench")]))
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    started = in_flight = 0
    deadline = time.monotonic() + timeout
    try:
        while len(done) < n:
            while started < n and in_flight < HANDSHAKES_IN_FLIGHT:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                sel.register(sock, selectors.EVENT_WRITE, _Client(sock))
                started += 1
                in_flight += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(done)} of {n} connections done in {timeout}s")
            for key, _events in sel.select(timeout=1.0):
                client: _Client = key.data
                if _step(sel, client, request):
                    sel.unregister(client.sock)
                    done.append(client.sock)
                    in_flight -= 1
    except BaseException:
        for sock in done:
            sock.close()
        raise
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return done


def _step(sel: selectors.BaseSelector, client: _Client, request: bytes) -> bool:
    """Advance one connection; True when its response is complete."""
    sock = client.sock
    if sel.get_key(sock).events == selectors.EVENT_WRITE:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise RuntimeError(f"connect failed: {err}")
        client.h11.send(h11.Request(method="GET", target="/", headers=[("host", "bench")]))
        sock.send(request)
        sel.modify(sock, selectors.EVENT_READ, client)
        return False
    data = sock.recv(65536)
    if not data:
        raise RuntimeError("proxy closed a connection before its response ended")
    client.h11.receive_data(data)
    while True:
        event = client.h11.next_event()
        if event is h11.NEED_DATA:
            return False
        if isinstance(event, h11.Response) and event.status_code != 200:
            raise RuntimeError(f"HTTP {event.status_code}")
        if isinstance(event, h11.EndOfMessage):
            return True


def count_open(socks: list[socket.socket]) -> int:
    """Connections the proxy has not closed (a closed one is readable, with EOF)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    readable = len(sel.select(timeout=0))
    sel.close()
    return len(socks) - readable


def settled_rss(pid: int, timeout: float = 5.0) -> int:
    """RSS once it stops moving (two equal-ish readings 0.25 s apart)."""
    deadline = time.monotonic() + timeout
    last = H.rss_kb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = H.rss_kb(pid)
        if abs(now - last) <= 64:
            return now
        last = now
    return last


def measure(target: str, port: int, pid: int, n: int) -> Result:
    for s in open_idle(port, WARMUP_CONNS):
        s.close()
    before = settled_rss(pid)
    t0 = time.monotonic()
    socks = open_idle(port, n)
    try:
        secs = time.monotonic() - t0
        after = settled_rss(pid)
        still = count_open(socks)
    finally:
        for s in socks:
            s.close()
    return Result(target, n, before, after, (after - before) / n, still, secs)


def print_report(results: list[Result]) -> None:
    print(f"\n{'target':<10}{'conns':>7}{'RSS before MB':>15}{'RSS after MB':>14}"
          f"{'KB/conn':>9}{'still open':>12}{'open s':>8}")
    for r in results:
        print(f"{r.target:<10}{r.connections:>7}{r.rss_before_kb / 1024:>15.1f}"
              f"{r.rss_after_kb / 1024:>14.1f}{r.kb_per_conn:>9.1f}{r.still_open:>12}"
              f"{r.open_seconds:>8.1f}")
    print("(KB = 1024 bytes, as in /proc/PID/status)\n")
    nlb = next((r for r in results if r.target == "nlbproxy"), None)
    relay = next((r for r in results if r.target == "relay"), None)
    if nlb is None:
        print(f"SKIP nlbproxy KB per idle connection (target < {MAX_KB_PER_CONN:.0f})")
        return
    ok = nlb.kb_per_conn < MAX_KB_PER_CONN and nlb.still_open == nlb.connections
    print(f"{'PASS' if ok else 'FAIL'} nlbproxy KB per idle connection = "
          f"{nlb.kb_per_conn:.1f} (target < {MAX_KB_PER_CONN:.0f})"
          + ("" if nlb.still_open == nlb.connections
             else f", but only {nlb.still_open} stayed open"))
    if relay is not None and relay.kb_per_conn > 0:
        print(f"     nlbproxy/relay KB per connection = {nlb.kb_per_conn / relay.kb_per_conn:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    proxy_cpu, load_cpu = H.pick_cpus()
    print(H.load_note(), flush=True)
    H.pin_self(load_cpu)
    H.raise_nofile()
    results: list[Result] = []
    with H.workdir(args.keep) as wd, H.Procs(wd) as procs:
        backend = H.start_backend_nginx(procs, load_cpu)
        for target in args.only:
            if target == "nlbproxy" and not H.nlbproxy_available():
                print("nlbproxy: SKIPPED (twistd --help does not list the nlbproxy plugin)",
                      file=sys.stderr)
                continue
            n = min(args.connections, capacity(target))
            if n < args.connections:
                print(f"{target}: {n} connections, not {args.connections} "
                      f"(hard RLIMIT_NOFILE {H.NOFILE_HARD})", file=sys.stderr)
            port = H.start_target(procs, target, backend, proxy_cpu)
            proc = H.find_target_proc(procs, target)
            r = measure(target, port, proc.pid, n)
            procs.stop(proc)
            print(f"{target:<10}{n:>6} idle connections: {r.kb_per_conn:.1f} KB each "
                  f"({r.still_open} still open)", flush=True)
            results.append(r)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "idle_conns",
                                         "max_kb_per_conn": MAX_KB_PER_CONN,
                                         "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
