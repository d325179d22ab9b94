"""The DAM between two balancing units over loopback: announcements absorbed
per second, propagation latency, queries per second, resync of a restarted
unit, and memory per atom.

Two real units, each a child process running a :class:`DamService` (AMP over
TCP, authenticated handshake) with replication 1, pinned to different CPUs:
``a`` takes the announcements (``DAM.add``, as the unit an agent reports
to), ``b`` holds the replicas.  This process only drives them through a line
protocol on their stdin/stdout and measures; times are CLOCK_MONOTONIC, which
both children share with it.

Phases:

flat      ``--atoms`` announcements on ``a`` as fast as it takes them (1000
          per reactor turn).  Rate at ``a`` (adds/s) and rate absorbed by
          ``b`` (from the first add until ``b`` holds them all), CPU seconds
          of each unit, and ``b``'s RSS growth per atom.
paced     ``--paced-rate`` announcements per second for ``--paced-seconds``
          on ``a``; every 100th key is a probe whose add time on ``a`` and
          first sight on ``b`` (polled every millisecond) give the
          propagation latency: p50, p99, max (target < 100 ms).
query     ``b`` holds ``--queries`` atoms that ``a`` does not (loaded into
          ``b`` directly); ``a`` looks each up with ``DAM.query``,
          ``--query-window`` (100) in flight: queries/s and round-trip
          latency.
resync    ``a`` is killed and started again empty; time until its
          DamService is ready (resynced from ``b``) and atoms it then holds.
memory    tracemalloc in this process: 100k atoms with 32-character keys in a
          DAM, as added and as received (target < 300 bytes each).

Prints the figures and PASS/FAIL against 20,000 announcements/s absorbed,
100 ms propagation, 300 bytes per atom.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

SECRET = b"farm secret for bench/dam.py\n"
HOSTS = [f"app/10.0.{i // 250}.{i % 250}:8080" for i in range(50)]
PROBE_EVERY = 100
#: Targets of the DAM issue.
ABSORB_PER_S = 20_000
PROPAGATION_S = 0.100
BYTES_PER_ATOM = 300


def key(prefix: str, i: int) -> str:
    """A 32-character session key."""
    return f"{prefix}{i:0{32 - len(prefix)}d}"


# --- the unit (child process) -------------------------------------------------------


def unit_main(args: argparse.Namespace) -> None:
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio, task
    from twisted.protocols.basic import LineReceiver

    from nlbproxy.session.dam import DAM, AddAtoms, Atom
    from nlbproxy.session.peering import DamService

    reactor: Any = _reactor
    dam = DAM(args.name, reactor, lambda peer, call: None, args.replication)
    svc = DamService(dam, args.name, "tcp:0:interface=127.0.0.1", args.peer, SECRET, reactor)
    started = time.monotonic()

    def cpu() -> float:
        t = os.times()
        return t.user + t.system

    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    class Control(LineReceiver):
        delimiter = b"\n"

        def reply(self, **fields: Any) -> None:
            self.sendLine(json.dumps(fields).encode())

        def connectionMade(self) -> None:
            svc.listening.addCallback(lambda port: self.reply(port=port.getHost().port))
            svc.whenReady().addCallback(lambda _: self.reply(
                ready=time.monotonic() - started, atoms=len(dam), peers=sorted(svc.peers)))

        def lineReceived(self, line: bytes) -> None:
            command, *rest = line.decode().split()
            getattr(self, "do_" + command)(*rest)

        def do_stats(self) -> None:
            self.reply(atoms=len(dam), rss_kb=rss_kb(), cpu=cpu(), peers=sorted(svc.peers),
                       dam=dict(dam.stats), service=dict(svc.stats))

        def do_add(self, prefix: str, n_text: str, rate_text: str) -> None:
            n, rate = int(n_text), float(rate_text)
            chunk = 1000 if rate == 0 else max(1, int(rate * 0.005))
            probes: dict[int, float] = {}
            t0, cpu0 = time.monotonic(), cpu()
            done = 0

            def step() -> None:
                nonlocal done
                end = min(n, done + chunk)
                for i in range(done, end):
                    dam.add(key(prefix, i), HOSTS[i % 50])
                    if i % PROBE_EVERY == 0:
                        probes[i] = time.monotonic()
                done = end
                if done < n:
                    delay = 0.0 if rate == 0 else max(0.0, t0 + done / rate - time.monotonic())
                    reactor.callLater(delay, step)
                else:
                    self.reply(t0=t0, t1=time.monotonic(), cpu=cpu() - cpu0, probes=probes)

            step()

        def do_watch(self, prefix: str, n_text: str) -> None:
            n = int(n_text)
            base, cpu0, rss0 = len(dam), cpu(), rss_kb()
            probes = {i: key(prefix, i) for i in range(0, n, PROBE_EVERY)}
            seen: dict[int, float] = {}

            def poll() -> None:
                now = time.monotonic()
                for i, k in list(probes.items()):
                    if dam.get(k) is not None:
                        seen[i] = now
                        del probes[i]
                if not probes and len(dam) >= base + n:
                    loop.stop()
                    self.reply(done=now, cpu=cpu() - cpu0, rss_kb=rss_kb() - rss0, probes=seen)

            loop = task.LoopingCall(poll)
            loop.clock = reactor
            loop.start(0.001)

        def do_preload(self, prefix: str, n_text: str) -> None:
            atoms = tuple(Atom(key(prefix, i), HOSTS[i % 50], "http-cookie", "loader", 10**15 + i)
                          for i in range(int(n_text)))
            for start in range(0, len(atoms), 2048):
                dam.receive("loader", AddAtoms(atoms[start : start + 2048]))
            self.reply(atoms=len(dam))

        def do_query(self, prefix: str, n_text: str, window_text: str) -> None:
            n, window = int(n_text), int(window_text)
            latencies: list[float] = []
            found = 0
            issued = 0
            t0, cpu0 = time.monotonic(), cpu()

            def issue() -> None:
                nonlocal issued
                while issued < n and issued - len(latencies) < window:
                    sent = time.monotonic()
                    dam.query(key(prefix, issued), lambda atom, sent=sent: answered(atom, sent))
                    issued += 1

            def answered(atom: Any, sent: float) -> None:
                nonlocal found
                latencies.append(time.monotonic() - sent)
                found += atom is not None
                if len(latencies) == n:
                    self.reply(t0=t0, t1=time.monotonic(), cpu=cpu() - cpu0, found=found,
                               latencies=sorted(latencies))
                elif issued < n and issued - len(latencies) < window // 2:
                    reactor.callLater(0, issue)

            issue()

    stdio.StandardIO(Control())
    svc.startService()
    reactor.run()


# --- the driver (this process) ---------------------------------------------------------


class Unit:
    """A unit child process and its control lines."""

    def __init__(self, name: str, peers: list[str], cpu: int | None, replication: str) -> None:
        argv = [sys.executable, __file__, "--role", "unit", "--name", name, "--replication", replication]
        for peer in peers:
            argv += ["--peer", peer]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.name = name
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True, cwd=REPO_DIR)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)

    def _read_errors(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.errors.append(line.rstrip())

    def expect(self, field: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next reply holding ``field`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.popen.poll() is not None and self.lines.empty():
                tail = "\n".join(self.errors[-20:])
                raise RuntimeError(f"unit {self.name}: no {field!r} reply (exit {self.popen.poll()})\n{tail}")
            try:
                reply = json.loads(self.lines.get(timeout=min(left, 0.5)))
            except queue.Empty:
                continue
            if field in reply:
                return reply

    def send(self, *words: object) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(" ".join(map(str, words)) + "\n")
        self.popen.stdin.flush()

    def call(self, field: str, *words: object, timeout: float = 120.0) -> dict[str, Any]:
        self.send(*words)
        return self.expect(field, timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def memory_per_atom(n: int = 100_000) -> dict[str, float]:
    from twisted.internet.task import Clock

    from nlbproxy.session.dam import DAM, AddAtoms, Atom, decode_atoms, encode_atoms

    out = {}
    for path in ("added", "received"):
        clock = Clock()
        clock.advance(time.time())
        dam = DAM("unit-a", clock, lambda peer, call: None, 1)
        blob = b""
        if path == "received":
            blob = encode_atoms(Atom(key("r", i), HOSTS[i % 50], "http-cookie", "unit-b", 10**15 + i)
                                for i in range(n))
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        if path == "added":
            for i in range(n):
                dam.add(key("m", i), HOSTS[i % 50])
        else:
            dam.receive("unit-b", AddAtoms(decode_atoms(blob)))
            blob = b""
        gc.collect()
        out[path] = (tracemalloc.get_traced_memory()[0] - base) / n
        tracemalloc.stop()
        del dam
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="driver", choices=["driver", "unit"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--peer", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--replication", default="1", help="copies beyond the origin's, or 'full' (default 1)")
    parser.add_argument("--atoms", type=int, default=200_000, help="announcements in the flat-out phase")
    parser.add_argument("--paced-rate", type=float, default=20_000, help="announcements/s in the paced phase")
    parser.add_argument("--paced-seconds", type=float, default=3.0)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--query-window", type=int, default=100, help="queries in flight")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    if args.role == "unit":
        args.replication = None if args.replication == "full" else int(args.replication)
        unit_main(args)
        return 0

    cpus = sorted(os.sched_getaffinity(0))
    cpu_a, cpu_b = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    one, five, _ = os.getloadavg()
    print(f"load average before the run: {one:.2f} (1 min), {five:.2f} (5 min); "
          f"unit a on CPU {cpu_a}, unit b on CPU {cpu_b}; replication {args.replication}")
    figures: dict[str, Any] = {}
    units: list[Unit] = []
    try:
        b = Unit("b", [], cpu_b, args.replication)
        units.append(b)
        port_b = b.expect("port")["port"]
        a = Unit("a", [f"127.0.0.1:{port_b}"], cpu_a, args.replication)
        units.append(a)
        a.expect("port")
        ready = a.expect("ready")
        assert ready["peers"] == ["b"], ready

        # flat out
        b.send("watch", "f", args.atoms)
        added = a.call("t1", "add", "f", args.atoms, 0)
        seen = b.expect("done")
        rate_a = args.atoms / (added["t1"] - added["t0"])
        rate_b = args.atoms / (seen["done"] - added["t0"])
        figures["flat"] = {
            "atoms": args.atoms, "adds_per_s_on_a": rate_a, "absorbed_per_s_on_b": rate_b,
            "cpu_s_a": added["cpu"], "cpu_s_b": seen["cpu"], "rss_bytes_per_atom_b": seen["rss_kb"] * 1024 / args.atoms,
        }

        # paced
        n = int(args.paced_rate * args.paced_seconds)
        b.send("watch", "p", n)
        added = a.call("t1", "add", "p", n, args.paced_rate)
        seen = b.expect("done")
        lat = sorted(seen["probes"][i] - added["probes"][i] for i in added["probes"])
        figures["paced"] = {
            "rate": args.paced_rate, "atoms": n, "achieved_per_s": n / (added["t1"] - added["t0"]),
            "latency_ms": {"p50": 1000 * percentile(lat, 50), "p99": 1000 * percentile(lat, 99),
                           "max": 1000 * lat[-1]},
            "cpu_share_a": added["cpu"] / (added["t1"] - added["t0"]),
            "cpu_share_b": seen["cpu"] / (seen["done"] - added["t0"]),
        }

        # queries
        b.call("atoms", "preload", "q", args.queries)
        asked = a.call("t1", "query", "q", args.queries, args.query_window)
        figures["query"] = {
            "queries": args.queries, "found": asked["found"],
            "per_s": args.queries / (asked["t1"] - asked["t0"]),
            "latency_ms": {"p50": 1000 * percentile(asked["latencies"], 50),
                           "p99": 1000 * percentile(asked["latencies"], 99)},
        }

        # resync of a restarted unit
        a.kill()
        units.remove(a)
        holding = b.call("atoms", "stats")["atoms"]
        a = Unit("a", [f"127.0.0.1:{port_b}"], cpu_a, args.replication)
        units.append(a)
        ready = a.expect("ready")
        figures["resync"] = {"seconds_to_ready": ready["ready"], "atoms_after": ready["atoms"],
                             "atoms_on_b": holding}
        stats_a, stats_b = a.call("atoms", "stats"), b.call("atoms", "stats")
        figures["counters"] = {"a": stats_a["dam"] | stats_a["service"], "b": stats_b["dam"] | stats_b["service"]}
    finally:
        for unit in units:
            unit.kill()

    figures["memory"] = memory_per_atom()

    f, p, q, r, m = (figures[k] for k in ("flat", "paced", "query", "resync", "memory"))
    absorbed = min(f["adds_per_s_on_a"], f["absorbed_per_s_on_b"])
    worst_memory = max(m["added"], m["received"])
    checks = [
        (f"announcements absorbed, replication {args.replication}: {absorbed:,.0f}/s "
         f"(a adds {f['adds_per_s_on_a']:,.0f}/s, b holds them at {f['absorbed_per_s_on_b']:,.0f}/s)",
         absorbed >= ABSORB_PER_S, f">= {ABSORB_PER_S:,}/s"),
        (f"propagation a -> b at {p['rate']:,.0f}/s: p50 {p['latency_ms']['p50']:.1f} ms, "
         f"p99 {p['latency_ms']['p99']:.1f} ms, max {p['latency_ms']['max']:.1f} ms",
         p["latency_ms"]["max"] < PROPAGATION_S * 1000, f"< {PROPAGATION_S * 1000:.0f} ms"),
        (f"memory per atom (tracemalloc, 32-char keys): {m['added']:.0f} B added, {m['received']:.0f} B received",
         worst_memory < BYTES_PER_ATOM, f"< {BYTES_PER_ATOM} B"),
        (f"queries a -> b: {q['per_s']:,.0f}/s, {q['found']}/{q['queries']} found, "
         f"p50 {q['latency_ms']['p50']:.2f} ms, p99 {q['latency_ms']['p99']:.2f} ms",
         q["found"] == q["queries"], "all found"),
        (f"restarted unit ready (resynced) in {r['seconds_to_ready']:.2f} s holding {r['atoms_after']:,} atoms "
         f"(b holds {r['atoms_on_b']:,})", r["atoms_after"] == r["atoms_on_b"], "resynced before ready"),
    ]
    print(f"flat-out: {f['atoms']:,} atoms; CPU a {f['cpu_s_a']:.2f} s, b {f['cpu_s_b']:.2f} s; "
          f"b RSS growth {f['rss_bytes_per_atom_b']:.0f} B/atom (allocator and batch buffers included)")
    print(f"paced: {p['achieved_per_s']:,.0f}/s achieved; CPU busy a {100 * p['cpu_share_a']:.0f} %, "
          f"b {100 * p['cpu_share_b']:.0f} %")
    for text, ok, target in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}  [target {target}]")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
