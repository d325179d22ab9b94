"""Shared plumbing for the benchmarks: processes, ports, pinning, configs, wrk, RSS.

Every process a benchmark starts goes through :class:`Procs`, a context
manager that kills them all (their whole process group) on the way out, so a
crash or Ctrl-C never leaves a proxy or a backend running.  Ports are picked
by binding port 0 and reading it back; readiness is a polled TCP connect with
a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PY = sys.executable

#: Response body served by the backend in the small-request benchmarks.
SMALL_BODY = b"x" * 99 + b"\n"


# --- CPUs, limits, ports ----------------------------------------------------


def pick_cpus() -> tuple[int, int]:
    """(CPU for the proxy under test, CPU for the load generator and backend)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print(f"warning: only CPU {cpus} available; nothing is isolated", file=sys.stderr)
        return cpus[0], cpus[0]
    return cpus[0], cpus[1]


def load_note() -> str:
    """One line on machine load: other work on these CPUs skews every figure."""
    one, five, _ = os.getloadavg()
    return f"load average before the run: {one:.2f} (1 min), {five:.2f} (5 min)"


def pin_self(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


#: The hard RLIMIT_NOFILE at start; only CAP_SYS_RESOURCE may go past it.
NOFILE_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile(n: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE to n (default: as far as allowed); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = n or hard
    if soft >= n:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        n = hard
    return n


def nofile_preexec(n: int | None) -> Callable[[], None]:
    """A Popen preexec_fn giving the child ``ulimit -n n`` (default: the hard limit)."""
    def preexec() -> None:
        raise_nofile(n)
    return preexec


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: Proc | None = None, host: str = "127.0.0.1",
              timeout: float = 20.0) -> None:
    """Poll a TCP connect until it succeeds; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before "
                               f"listening on {port}\n{proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                tail = proc.log_tail() if proc else ""
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s\n{tail}") from e
            time.sleep(0.02)


# --- processes ----------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  [{self.name}] {line}" for line in lines[-n:])


@dataclass
class Procs(contextlib.AbstractContextManager["Procs"]):
    """Starts processes in their own process groups and kills them all on exit."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], cpu: int | None = None,
              nofile: int | None = None, **kw: object) -> Proc:
        """Start argv pinned to cpu, with ``ulimit -n`` raised to nofile (default: hard
        limit), output to WORKDIR/NAME.log."""
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        log = self.workdir / f"{name}.log"
        fh = open(log, "wb")
        try:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=nofile_preexec(nofile), **kw)  # type: ignore[call-overload]
        finally:
            fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        if proc.popen.poll() is None:
            _signal_group(proc.popen, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold children (workers) even after the leader exited.
        _signal_group(proc.popen, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout)
        if proc in self.procs:
            self.procs.remove(proc)

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    # start_new_session made the child the leader of group == its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nlbbench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept work dir {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def run(argv: Sequence[str], cpu: int | None = None, timeout: float | None = None,
        **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a short-lived command (wrk, curl) to completion, pinned if asked."""
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)  # type: ignore[call-overload]


# --- memory -------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _descendants(pid: int) -> list[int]:
    out = [pid]
    for p in out:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    out.extend(int(c) for c in f.read().split())
    return out


def rss_kb(pid: int) -> int:
    """VmRSS of pid plus its descendants (in case the unit runs worker processes)."""
    return sum(_status_kb(p, "VmRSS") for p in _descendants(pid))


def hwm_kb(pid: int) -> int:
    """VmHWM (peak RSS) of pid plus its descendants."""
    return sum(_status_kb(p, "VmHWM") for p in _descendants(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by pid and its descendants."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat") as f:
                # Fields after the parenthesised command: utime and stime are 14 and 15.
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int) -> bool:
    """Reset the peak-RSS counters (Linux >= 4.0: write 5 to clear_refs)."""
    ok = True
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


# --- wrk ------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"bad wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int          # socket errors (connect/read/write/timeout) + non-2xx/3xx
    #: CPUs' worth of time the proxy used during the run (1.0 = one CPU busy), when known
    proxy_cpu: float | None = None

    @property
    def rps_per_cpu(self) -> float | None:
        """Requests per CPU-second of the proxy: less sensitive to other load."""
        return self.rps / self.proxy_cpu if self.proxy_cpu else None


def parse_wrk(out: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise ValueError(f"no Requests/sec in wrk output:\n{out}")
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    reqs = re.search(r"(\d+) requests in", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return WrkResult(float(rps.group(1)), _ms(pct["50"]), _ms(pct["99"]),
                     int(reqs.group(1)) if reqs else 0, errors)


def wrk(url: str, duration: float, connections: int, cpu: int | None,
        threads: int = 1) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    res = run(argv, cpu=cpu, timeout=duration + 60)
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {res.stderr or res.stdout}")
    return parse_wrk(res.stdout)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# --- configs of the processes under test -------------------------------------------


def nginx_conf(workdir: Path, name: str, port: int, server: str, http: str = "") -> Path:
    """A single-process nginx (no master) with logs and temp files in workdir;
    ``server`` goes inside the server{} block, ``http`` inside http{}."""
    d = workdir / name
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {NOFILE_HARD};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {NOFILE_HARD - 50}; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    {http}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        {server}
    }}
}}
""")
    return conf


def nginx_argv(conf: Path) -> list[str]:
    return ["nginx", "-p", str(conf.parent), "-c", str(conf)]


def start_backend_nginx(procs: Procs, cpu: int | None) -> int:
    """nginx answering every request with SMALL_BODY over keep-alive; returns its port."""
    port = free_port()
    body = ('default_type text/plain;\n        location / { return 200 "'
            + SMALL_BODY.decode().rstrip("\n") + '\\n"; }')
    proc = procs.start("backend-nginx", nginx_argv(nginx_conf(procs.workdir, "backend", port,
                                                                body)),
                       cpu=cpu)
    wait_port(port, proc)
    return port


def nginx_proxy_conf(workdir: Path, port: int, backend_port: int) -> Path:
    """nginx as a reverse proxy with a keep-alive upstream."""
    upstream = (f"upstream be {{ server 127.0.0.1:{backend_port}; keepalive 64;"
                " keepalive_requests 10000000; keepalive_timeout 300s; }")
    # Stream request bodies of any size, as the other proxies do.
    location = ('client_max_body_size 0; proxy_request_buffering off;\n'
                '        location / { proxy_pass http://be; proxy_http_version 1.1;'
                ' proxy_set_header Connection ""; }')
    return nginx_conf(workdir, "proxy-nginx", port, location, upstream)


def haproxy_conf(workdir: Path, port: int, backend_port: int) -> Path:
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn {NOFILE_HARD // 2 - 100}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend_port}
""")
    return conf


def nlbproxy_conf(workdir: Path, port: int, backend_port: int,
                  keepalive_timeout: int = 300) -> Path:
    conf = workdir / "nlbproxy.toml"
    conf.write_text(f"""
[unit]
name = "bench"
admin = "tcp:{free_port()}:interface=127.0.0.1"

[[listener]]
name = "web"
endpoint = "tcp:{port}:interface=127.0.0.1"
pool = "app"
keepalive_timeout = {keepalive_timeout}
max_connections = 20000
max_body_bytes = 0

[pool.app]
hosts = ["127.0.0.1:{backend_port}"]
""")
    return conf


def twistd_bin() -> str:
    """The twistd of this interpreter (``python -m twisted`` is ``twist``, not twistd)."""
    beside = Path(PY).parent / "twistd"
    return str(beside) if beside.exists() else (shutil.which("twistd") or "twistd")


def twistd_argv(*args: str) -> list[str]:
    return [twistd_bin(), "-n", "--pidfile=", *args]


_nlbproxy_ok: bool | None = None


def nlbproxy_available() -> bool:
    """True when ``twistd --help`` lists the nlbproxy plugin."""
    global _nlbproxy_ok
    if _nlbproxy_ok is None:
        res = run([twistd_bin(), "--help"], timeout=60)
        _nlbproxy_ok = bool(re.search(r"^\s+nlbproxy\s", res.stdout, re.M))
    return _nlbproxy_ok


# --- the proxies under test, by name ------------------------------------------------


def start_target(procs: Procs, name: str, backend_port: int, cpu: int | None,
                 keepalive_timeout: int = 300) -> int:
    """Start proxy ``name`` in front of backend_port; returns the port it listens on.

    Names: relay (bench/h11_relay.py), revproxy (twisted.web ReverseProxyResource),
    haproxy, nginx, nlbproxy.
    """
    port = free_port()
    backend = f"127.0.0.1:{backend_port}"
    if name == "relay":
        argv = [PY, str(BENCH_DIR / "h11_relay.py"), "--port", str(port), "--backend", backend]
    elif name == "revproxy":
        argv = [PY, str(BENCH_DIR / "twisted_revproxy.py"), "--port", str(port),
                "--backend", backend]
    elif name == "haproxy":
        argv = ["haproxy", "-db", "-f", str(haproxy_conf(procs.workdir, port, backend_port))]
    elif name == "nginx":
        argv = nginx_argv(nginx_proxy_conf(procs.workdir, port, backend_port))
    elif name == "nlbproxy":
        conf = nlbproxy_conf(procs.workdir, port, backend_port, keepalive_timeout)
        argv = twistd_argv("nlbproxy", "--config", str(conf))
    else:
        raise ValueError(f"unknown target {name!r}")
    proc = procs.start(name, argv, cpu=cpu)
    wait_port(port, proc)
    return port


def find_target_proc(procs: Procs, name: str) -> Proc:
    return next(p for p in procs.procs if p.name == name)
