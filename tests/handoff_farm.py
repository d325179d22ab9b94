"""A handoff farm in network namespaces: a client, a unit and two hosts on one segment.

Used by tests/test_handoff_e2e.py and bench/handoff.py.  Everything lives in
namespaces the :class:`~tests.netns.Topology` creates (and deletes, killing
every process it started, even on failure)::

    client 10.0.0.2 --+
    unit   10.0.0.1 --+-- bridge      VIP 10.0.0.100 on the unit's and the hosts' lo
    h1     10.0.0.11 -+               the client routes the VIP via the unit
    h2     10.0.0.12 -+

- the unit (tests.handoff_unit: the real Unit with the real AF_PACKET
  forwarder, or with ``plumbing="kernel"`` the kernel-routed stand-in of
  tests/handoff_plumbing.py; with ``"twistd"`` / ``"twistd-fast"`` a real
  ``twistd nlbproxy`` with ``forwarder_in = "eth0"``, without / with the
  kernel fast path) listens on VIP:80 with ``handoff = true`` (routes: ``/adopt`` to
  pool apps, ``/sha256`` to pool up, ``/h1/`` and ``/h2/`` to that host
  alone, the rest to pool web) and on
  10.0.0.1:8000 as a plain proxying listener for pool web;
- each host runs a real, unmodified nginx (Debian's) on :8080 (plain), and
  on :8082 and a Unix socket (``proxy_protocol``) serving ``www/``, and an
  agent whose ``web`` app bridges handed-off connections with a PROXY
  header to the Unix socket (h1) or to :8082 (h2);
- h1 also runs tests.backend on :8081 (pool up, bridged, for uploads with
  checksums); h2 runs tests.handoff_app, a Twisted application that adopts
  handed-off connections (pool apps) and answers proxied ones on :9000.

With ``addresses=IPV6`` every node also gets an IPv6 address (fd4e:4c42::/64,
the last byte as above) and everything the handoff touches speaks IPv6: the
VIP fd4e:4c42::100, the client, the pools' hosts, the agents' handoff and
health endpoints, and the proxying listener.  The nodes keep their IPv4
addresses.  With ``dual_stack=True`` as well, the handoff listener is a
``tcp6`` one on ``::`` and the IPv4 VIP 10.0.0.100 is there too (on the
unit's and the hosts' lo, routed by the client): IPv4 clients reach the same
listener, which sees them with IPv4-mapped addresses.

With ``router_mtu=N`` the client sits on a segment of its own behind a
router whose interface towards the client has an MTU of N (its own link is
1500, so the client's MSS does not reveal the narrower hop)::

    client 10.1.0.2 -- wan -- 10.1.0.1 router 10.0.0.254 -- lan (unit, hosts)
           fd4e:4c43::2       fd4e:4c43::1    fd4e:4c42::fe

The hosts' large segments to the client meet the narrow hop; the router's
"packet too big" goes to their source, the VIP, which it routes to the unit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlbproxy.config import format_host_port
from tests.netns import Node, Topology, wait_for

ROOT = Path(__file__).resolve().parent.parent
VIP = "10.0.0.100"
UNIT_IP = "10.0.0.1"
CLIENT_IP = "10.0.0.2"
HOSTS = {"h1": "10.0.0.11", "h2": "10.0.0.12"}
SECRET = b"handoff farm secret\n"
HANDOFF_PORT = 9904


def cidr(ip: str) -> str:
    """``ip`` as a host route or a VIP on ``lo``: /32 or /128."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def url(ip: str, port: int, path: str = "/") -> str:
    return f"http://{format_host_port(ip, port)}{path}"


def server_endpoint(port: int, ip: str) -> str:
    """A Twisted server endpoint on ``ip`` (its colons escaped), as a TOML literal string."""
    kind = "tcp6" if ":" in ip else "tcp"
    return f"'{kind}:{port}:interface={ip.replace(':', chr(92) + ':')}'"


def listen(ip: str) -> str:
    """``ip`` as nginx's ``listen`` takes it (IPv6 in brackets)."""
    return f"[{ip}]" if ":" in ip else ip


@dataclass(frozen=True)
class Addresses:
    """The addresses the farm's traffic uses, all of one family."""

    vip: str
    unit: str
    client: str
    hosts: dict[str, str] = field(hash=False)

    @property
    def v6(self) -> bool:
        return ":" in self.vip

    @property
    def vip_cidr(self) -> str:
        return cidr(self.vip)


IPV4 = Addresses(VIP, UNIT_IP, CLIENT_IP, HOSTS)
IPV6 = Addresses("fd4e:4c42::100", "fd4e:4c42::1", "fd4e:4c42::2",
                 {"h1": "fd4e:4c42::11", "h2": "fd4e:4c42::12"})
#: The router's (IPv4, IPv6) addresses by segment, and a client behind it.
ROUTER = {"lan": ("10.0.0.254", "fd4e:4c42::fe"), "wan": ("10.1.0.1", "fd4e:4c43::1")}
ROUTED_CLIENT = ("10.1.0.2", "fd4e:4c43::2")
ROUTED_IPV4 = Addresses(VIP, UNIT_IP, ROUTED_CLIENT[0], HOSTS)
ROUTED_IPV6 = Addresses(IPV6.vip, IPV6.unit, ROUTED_CLIENT[1], IPV6.hosts)

NGINX = """\
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format handoff '$remote_addr $proxy_protocol_addr "$request" $status $bytes_sent';
    access_log {dir}/access.log handoff;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    server {{
        listen {ip}:8080;
        listen 127.0.0.1:8080;
        listen 127.0.0.1:8082 proxy_protocol;
        listen unix:{dir}/proxy.sock proxy_protocol;
        root {dir}/www;
    }}
}}
"""


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


class Output:
    """A process's output, collected by a thread, searched with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import threading

        self.proc = proc
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        end = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            for line in self.lines[start:]:
                match = regex.search(line)
                if match:
                    return match
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"no {pattern!r} in output (exit {self.proc.poll()}):\n" + "\n".join(self.lines))
            time.sleep(0.02)


# A client holding one keep-alive connection: a request per path, the first at
# once, each other when told (a line on stdin); prints one line per request.
_HOLD = (
    "import hashlib,socket,sys\n"
    "s=socket.create_connection((sys.argv[1],80),timeout=20)\n"
    "def ask(path):\n"
    "    s.sendall(b'GET '+path.encode()+b' HTTP/1.1\\r\\nHost: v\\r\\n\\r\\n')\n"
    "    data=b''\n"
    "    while b'\\r\\n\\r\\n' not in data:\n"
    "        chunk=s.recv(65536)\n"
    "        if not chunk: raise EOFError\n"
    "        data+=chunk\n"
    "    head,body=data.split(b'\\r\\n\\r\\n',1)\n"
    "    n=int([l for l in head.split(b'\\r\\n') if l.lower().startswith(b'content-length')][0].split(b':')[1])\n"
    "    h=hashlib.sha256(body); got=len(body)\n"
    "    while got<n:\n"
    "        chunk=s.recv(1<<20)\n"
    "        if not chunk: raise EOFError\n"
    "        h.update(chunk); got+=len(chunk)\n"
    "    return got, h.hexdigest(), body[:40]\n"
    "for i, path in enumerate(sys.argv[2:]):\n"
    "    if i: sys.stdin.readline()\n"
    "    try:\n"
    "        print('got', *ask(path), flush=True)\n"
    "    except ConnectionResetError:\n"
    "        print('reset', flush=True); break\n"
    "    except (TimeoutError, socket.timeout):\n"
    "        print('timeout', flush=True); break\n"
    "    except EOFError:\n"
    "        print('eof', flush=True); break\n"
)


def spawn(node: Node, argv: list[str]) -> Output:
    """A process in ``node``'s namespace, its output collected (the topology
    that made the node kills it at the end)."""
    proc = node.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=str(ROOT))
    return Output(proc)


def wait_port(node: Node, ip: str, port: int, timeout: float = 20.0) -> None:
    """Polls, inside ``node``, until ``ip:port`` accepts connections."""
    code = ("import socket,time,sys\n"
            f"end=time.monotonic()+{timeout}\n"
            "while True:\n"
            f"    try: socket.create_connection(({ip!r},{port}),timeout=1).close(); break\n"
            "    except OSError:\n"
            "        if time.monotonic()>end: sys.exit(1)\n"
            "        time.sleep(0.02)\n")
    node.python(code, timeout=timeout + 5)


def start_nginx(node: Node, directory: Path, ip: str) -> None:
    """Debian's nginx in ``node`` with the :data:`NGINX` config, serving
    ``directory/www``; returns once it accepts connections."""
    conf = directory / "nginx.conf"
    conf.write_text(NGINX.format(dir=directory, ip=listen(ip)))
    node.popen(["nginx", "-e", str(directory / "error.log"), "-c", str(conf)],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(node, "127.0.0.1", 8082)


def closed_cleanly(node: Node) -> bool:
    """No TCP socket of ``node`` waits in LAST_ACK: the clients' ACKs of the
    host's FINs reached it (a handed-off connection whose route went before
    that ACK would sit there, resending its FIN to a client its unit resets)."""
    return not node.run(["ss", "-Htan", "state", "last-ack"]).stdout.strip()


class Held:
    """One keep-alive connection from ``node`` to ``vip``:80 asking for
    ``paths`` in turn, each after the previous (see ``_HOLD``); the process
    goes with the topology that started it."""

    def __init__(self, node: Node, vip: str, *paths: str) -> None:
        self.proc = node.popen(["python3", "-c", _HOLD, vip, *paths], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = Output(self.proc)
        self._asked = 1

    def answer(self, timeout: float = 30.0) -> list[str]:
        """The latest request's outcome: ``["got", size, sha256, first bytes...]``,
        or ``["reset"]``, ``["eof"]``, ``["timeout"]``."""
        wait_for(lambda: len(self._outcomes()) >= self._asked or self.proc.poll() is not None, timeout=timeout,
                 what=f"the answer to request {self._asked}")
        outcomes = self._outcomes()
        assert len(outcomes) >= self._asked, "the client ended early:\n" + "\n".join(self.out.lines)
        return outcomes[self._asked - 1].split()

    def _outcomes(self) -> list[str]:
        return [line for line in list(self.out.lines) if line.split()[:1] in (["got"], ["reset"], ["eof"], ["timeout"])]

    def ask_next(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self._asked += 1


class HandoffFarm:
    """Builds the farm inside ``topo``; ``www`` files are written before nginx starts."""

    def __init__(self, topo: Topology, tmp: Path, files: dict[str, bytes] | None = None,
                 plumbing: str = "forwarder", addresses: Addresses = IPV4, dual_stack: bool = False,
                 proxy_protocol: str = "v1", router_mtu: int | None = None) -> None:
        self.topo = topo
        self.plumbing = plumbing
        self.tmp = tmp
        self.addresses = a = addresses
        if a.v6 and plumbing == "kernel":
            raise ValueError("the kernel-routed stand-in routes IPv4 only")
        if dual_stack and not a.v6:
            raise ValueError("a dual-stack farm has IPv6 addresses")
        if (router_mtu is not None) != (a.client in ROUTED_CLIENT):
            raise ValueError("a client behind the router has a ROUTED_* address plan")
        self.dual_stack = dual_stack
        #: The PROXY header the agents' bridges send nginx ("v1" or "v2").
        self.proxy_protocol = proxy_protocol
        #: The address the farm's traffic uses, by node name.
        self.ip = {"client": a.client, "unit": a.unit, **a.hosts}
        (tmp / "secret.key").write_bytes(SECRET)
        self.unit = self._node("unit", UNIT_IP)
        self.hosts = {name: self._node(name, ip) for name, ip in HOSTS.items()}
        self.router: Node | None = None
        if router_mtu is None:
            self.client = self._node("client", CLIENT_IP)
            self.client.add_route(a.vip_cidr, a.unit)
        else:
            self.client = self._behind_router(router_mtu)
        for node in (self.client, self.unit, *self.hosts.values()):
            node.run(["ip", "link", "set", "lo", "up"])
        self.unit.run(["ip", "addr", "add", a.vip_cidr, "dev", "lo"])
        self.unit.relax_rp_filter()
        for host in self.hosts.values():
            host.add_vip(a.vip)
        if dual_stack:
            self.client.add_route(cidr(IPV4.vip), UNIT_IP)
            self.unit.run(["ip", "addr", "add", cidr(IPV4.vip), "dev", "lo"])
            for host in self.hosts.values():
                host.add_vip(IPV4.vip)
        self.files = files or {}
        self.nginx: dict[str, Path] = {}
        self.agents: dict[str, Output] = {}
        for name, host in self.hosts.items():
            self._nginx(name, host)
            self._agent(name, host)
        self._apps()
        self._unit()

    def _behind_router(self, mtu: int) -> Node:
        a, family = self.addresses, 1 if self.addresses.v6 else 0
        self.topo.add_segment("wan")
        router = self.router = self.topo.add_node("router", ROUTER["lan"][0], ip6=ROUTER["lan"][1])
        self.topo.attach(router, "wan", ROUTER["wan"][0], ip6=ROUTER["wan"][1])
        client = self.topo.add_node("client", ROUTED_CLIENT[0], segment="wan", ip6=ROUTED_CLIENT[1])
        router.run(["ip", "link", "set", "eth1", "mtu", str(mtu)])
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            router.sysctl(key, 1)
        router.add_route(a.vip_cidr, a.unit)
        client.add_route(a.vip_cidr, ROUTER["wan"][family])
        wan = "fd4e:4c43::/64" if a.v6 else "10.1.0.0/24"
        for node in (self.unit, *self.hosts.values()):
            node.add_route(wan, ROUTER["lan"][family])
        return client

    def _node(self, name: str, ip: str) -> Node:
        return self.topo.add_node(name, ip, ip6=self.ip[name] if self.addresses.v6 else None)

    @property
    def vip(self) -> str:
        return self.addresses.vip

    def url(self, path: str, ip: str | None = None, port: int = 80) -> str:
        """``http://VIP/path`` (IPv6 literals in brackets), or at ``ip:port``."""
        return url(ip or self.vip, port, path)

    # -- processes ---------------------------------------------------------------------
    def _nginx(self, name: str, host: Node) -> None:
        directory = self.tmp / f"nginx-{name}"
        (directory / "www").mkdir(parents=True)
        for path, data in self.files.items():
            (directory / "www" / path).write_bytes(data)
        (directory / "www" / "hello").write_bytes(f"hello from {name}\n".encode())
        (directory / "www" / name).symlink_to(".")  # /h1/x is x on h1: the unit routes /h1/ there
        start_nginx(host, directory, self.ip[name])
        self.nginx[name] = directory

    def _agent(self, name: str, host: Node) -> None:
        a, ip = self.addresses, self.ip[name]
        # h1's nginx is bridged to through its Unix socket, h2's over loopback TCP.
        target = f"unix:{self.nginx[name] / 'proxy.sock'}" if name == "h1" else "127.0.0.1:8082"
        # nginx serves pool web and the pool of this host alone (h1 or h2).
        apps = "\n".join(f'[[app]]\nname = "{pool}"\nendpoint = "{format_host_port(ip, 8080)}"\ndeliver = "bridge"\n'
                         f'bridge_to = "{target}"\nproxy_protocol = "{self.proxy_protocol}"\n' for pool in ("web", name))
        if name == "h1":
            apps += (f'\n[[app]]\nname = "up"\nendpoint = "{format_host_port(ip, 8081)}"\ndeliver = "bridge"\n'
                     f'bridge_to = "127.0.0.1:8081"\n')
        else:
            apps += (f'\n[[app]]\nname = "apps"\nendpoint = "{format_host_port(ip, 9000)}"\ndeliver = "adopt"\n'
                     f'adopt_path = "{self.tmp / "adopt.sock"}"\n')
        config = self.tmp / f"agent-{name}.toml"
        config.write_text(
            f'[agent]\nname = "{name}"\nunits = ["{format_host_port(a.unit, 9903)}"]\n'
            f'api = "tcp:0:interface=127.0.0.1"\nsecret_file = "{self.tmp / "secret.key"}"\n'
            f'handoff = {server_endpoint(HANDOFF_PORT, ip)}\n\n{apps}'
        )
        self.agents[name] = spawn(host, ["twistd", "-n", "--pidfile=", "nlbagent", "--config", str(config)])
        self.agents[name].wait_for("handoffs on ")

    def _apps(self) -> None:
        h1, h2 = self.hosts["h1"], self.hosts["h2"]
        spawn(h1, [sys.executable, "-m", "tests.backend", "0.0.0.0", "8081", "b1"]).wait_for("^ready")
        spawn(h2, [sys.executable, "-m", "tests.handoff_app", str(self.tmp / "adopt.sock"),
                        f"{self.ip['h2']}:9000"]).wait_for("^ready")

    def _unit(self) -> None:
        a = self.addresses
        h1, h2 = a.hosts["h1"], a.hosts["h2"]
        vip_endpoint = r"'tcp6:80:interface=\:\:'" if self.dual_stack else server_endpoint(80, a.vip)
        config = self.tmp / "unit.toml"
        config.write_text(
            f'[unit]\nname = "u1"\nadmin = "tcp:0:interface=127.0.0.1"\nsecret_file = "{self.tmp / "secret.key"}"\n'
            f'health = "{format_host_port(a.unit, 9903)}"\nhandoff_port = {HANDOFF_PORT}\n\n'
            f'[[listener]]\nname = "vip"\nendpoint = {vip_endpoint}\npool = "web"\nhandoff = true\n'
            f'[[listener.route]]\npool = "apps"\npath_prefix = "/adopt"\n'
            f'[[listener.route]]\npool = "up"\npath_prefix = "/sha256"\n'
            f'[[listener.route]]\npool = "h1"\npath_prefix = "/h1/"\n'
            f'[[listener.route]]\npool = "h2"\npath_prefix = "/h2/"\n\n'
            f'[[listener]]\nname = "proxy"\nendpoint = {server_endpoint(8000, a.unit)}\npool = "web"\n\n'
            f'[pool.web]\nhosts = ["{format_host_port(h1, 8080)}", "{format_host_port(h2, 8080)}"]\n'
            f'[pool.up]\nhosts = ["{format_host_port(h1, 8081)}"]\n'
            f'[pool.apps]\nhosts = ["{format_host_port(h2, 9000)}"]\n'
            f'[pool.h1]\nhosts = ["{format_host_port(h1, 8080)}"]\n'
            f'[pool.h2]\nhosts = ["{format_host_port(h2, 8080)}"]\n'
        )
        if self.plumbing.startswith("twistd"):
            # The unit as operators run it: twistd sets up its own forwarder.
            fast = "forwarder_fast_path = true\n" if self.plumbing == "twistd-fast" else ""
            text = config.read_text().replace("[[listener]]", f'forwarder_in = "eth0"\n{fast}\n[[listener]]', 1)
            config.write_text(text)
            self.unit_out = spawn(self.unit, ["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(config)])
            self.admin = self.unit_out.wait_for(r"admin API on (http://\S+)").group(1).rstrip("/")
        else:
            how = ["kernel", f"{h1}=11", f"{h2}=12"] if self.plumbing == "kernel" else ["forwarder"]
            self.unit_out = spawn(self.unit, [sys.executable, "-m", "tests.handoff_unit", str(config), *how])
        self.unit_out.wait_for("farm known")

    # -- observing ---------------------------------------------------------------------
    def unit_stats(self) -> dict[str, Any]:
        import json

        if self.plumbing.startswith("twistd"):
            # From the admin API; the unit keeps no call log, and gives its
            # recent latencies' median rather than the latencies.
            answer = self.unit.run(["curl", "-sS", "--fail", "--max-time", "10", self.admin + "/api/v1/state"])
            handoff = json.loads(answer.stdout)["handoff"]
            return {**handoff, "log": [], "recent": []}
        start = len(self.unit_out.lines)
        os.kill(self.unit_out.proc.pid, signal.SIGUSR1)
        return dict(json.loads(self.unit_out.wait_for(r"handoff-stats (\{.*\})", start=start).group(1)))

    def access_log(self, host: str) -> list[str]:
        path = self.nginx[host] / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop_agent(self, name: str) -> None:
        proc = self.agents[name].proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
