# -*- test-case-name: tests.test_netns -*-
"""Network-namespace topologies for the packet-level tests (handoff, forwarder, fence).

A ``Topology`` builds, inside namespaces of its own only, one "switch" namespace
holding a Linux bridge per L2 segment, and one namespace per node joined to a
segment by a veth pair (``eth0`` on the node's side, more interfaces when a node
joins several segments).  Nothing is created in the caller's namespace: the
veth pairs are born inside the switch namespace and their node ends moved out
at once, so a crash can leak at most namespaces, and those carry this module's
prefix plus the creating process id, which lets a later run sweep them once that
process is gone.

Every process started through a node is registered and killed (its whole
process group) at teardown, before the namespaces are deleted: a process left
running inside a namespace keeps its network stack alive after ``ip netns del``.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "nlbt"
#: IPv6 test addresses: unique local (RFC 4193), the counterpart of 10/8.
IPV6_TEST_NET = ipaddress.ip_network("fd00::/8")
# Namespace names read "<PREFIX><pid>x<counter><role>"; the pid lets a sweep tell
# a dead run's leftovers from a live run's namespaces.
_NAME = re.compile(r"^" + PREFIX + r"(\d+)x\d+")
_counter = itertools.count()


def require_netns() -> None:
    """Skips the calling test without root or ``ip netns``; fails instead under CI.

    CI sets ``NLB_REQUIRE_ROOT=1`` so that a missing privilege shows up as a
    failure there rather than as a silently skipped packet-level suite.
    """
    from tests.needs import unmet

    reason = _netns_unavailable()
    if reason is not None:
        unmet(f"network namespaces are unusable: {reason}")


def require_tools(*commands: str) -> None:
    """Like :func:`require_netns` for commands a test needs (``make deps`` installs them)."""
    from tests.needs import need_commands

    need_commands(*commands)


_probe_result: list[str | None] = []


def _netns_unavailable() -> str | None:
    if _probe_result:
        return _probe_result[0]
    reason: str | None = None
    if os.geteuid() != 0:
        reason = "not root"
    elif shutil.which("ip") is None:
        reason = "no ip command (iproute2)"
    else:
        name = f"{PREFIX}{os.getpid()}x{next(_counter)}probe"
        added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if added.returncode != 0:
            reason = f"ip netns add failed: {added.stderr.strip()}"
        else:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    _probe_result.append(reason)
    return reason


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Deletes namespaces left by runs whose process is gone; returns their names."""
    removed = []
    for name in list_namespaces():
        if not name.startswith(prefix):
            continue
        match = _NAME.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        if pid == os.getpid() and name in _live_names:
            continue
        _kill_namespace_pids(name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed


_live_names: set[str] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_pids(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Interface:
    name: str
    ip: str
    prefixlen: int
    mac: str
    segment: str
    #: The interface's IPv6 address (its /64 is on-link), when it has one.
    ip6: str | None = None


@dataclass
class Node:
    """One namespace joined to the topology; runs commands inside it."""

    name: str
    ns: str
    topology: Topology
    interfaces: list[Interface] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return self.interfaces[0].ip

    @property
    def ip6(self) -> str:
        ip6 = self.interfaces[0].ip6
        if ip6 is None:
            raise AttributeError(f"{self.name} has no IPv6 address")
        return ip6

    @property
    def mac(self) -> str:
        return self.interfaces[0].mac

    @property
    def ifname(self) -> str:
        return self.interfaces[0].name

    def interface(self, segment: str) -> Interface:
        for iface in self.interfaces:
            if iface.segment == segment:
                return iface
        raise KeyError(f"{self.name} has no interface on segment {segment!r}")

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and done.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(argv)} exited {done.returncode}:\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Starts a process in this namespace; the topology kills it at teardown."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self.topology._processes.append(proc)
        return proc

    def python(self, code: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Runs ``python -c code`` in this namespace (the image has no ping)."""
        return self.run([sys.executable, "-c", code], check=check, timeout=timeout)

    def serve_once(self, ip: str, port: int, reply: bytes = b"ok") -> subprocess.Popen[Any]:
        """A listener on ``ip:port`` that answers one connection with ``reply``; returns at once
        after the socket listens (it prints ``listening``)."""
        code = ("import socket,sys\n"
                f"s=socket.socket({_family(ip)}); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(({ip!r},{port})); s.listen(8); print('listening', flush=True)\n"
                f"c,_=s.accept(); c.sendall({reply!r}); c.close()\n")
        proc = self.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"[{self.name}] listener on {ip}:{port} failed to start")
        return proc

    def connect(self, ip: str, port: int, timeout: float = 5.0) -> bytes:
        """Connects to ``ip:port`` from this namespace and returns what the peer sends."""
        code = ("import socket,sys\n"
                f"c=socket.create_connection(({ip!r},{port}), timeout={timeout})\n"
                "data=b''\n"
                "while (chunk := c.recv(65536)): data += chunk\n"
                "sys.stdout.write(data.hex())\n")
        return bytes.fromhex(self.python(code, timeout=timeout + 10).stdout.strip())

    def worker(self) -> Worker:
        """A Python process in this namespace that runs snippets on request."""
        return Worker(self)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def add_vip(self, vip: str) -> None:
        """Owns ``vip`` on ``lo`` for direct server return, with the recipe's sysctls.

        rp_filter goes to 0: strict mode drops both the frames the forwarder
        delivers (their source is not routed back out of the same interface as
        the balancer's) and nothing else here needs it.  arp_ignore=1 and
        arp_announce=2 keep the host from answering or advertising the VIP on
        a segment it shares with the balancer, which owns the VIP for ARP.

        An IPv6 VIP needs none of these: IPv6 has no reverse-path filter of
        its own, and the kernel answers a neighbour solicitation only for an
        address of the interface it arrived on, never for one on ``lo``.
        """
        if ":" in vip:
            self.run(["ip", "-6", "addr", "add", f"{vip}/128", "dev", "lo", "nodad"])
            return
        self.run(["ip", "addr", "add", f"{vip}/32", "dev", "lo"])
        self.relax_rp_filter()
        for scope in ["all", *[i.name for i in self.interfaces]]:
            self.sysctl(f"net.ipv4.conf.{scope}.arp_ignore", 1)
            self.sysctl(f"net.ipv4.conf.{scope}.arp_announce", 2)

    def relax_rp_filter(self, mode: int = 0) -> None:
        # The kernel uses the larger of "all" and the interface's own value.
        for scope in ["all", "default", "lo", *[i.name for i in self.interfaces]]:
            self.sysctl(f"net.ipv4.conf.{scope}.rp_filter", mode)

    def add_route(self, dest: str, via: str) -> None:
        self.run(["ip", "route", "replace", dest, "via", via])

    def neighbour(self, ip: str, mac: str, ifname: str | None = None) -> None:
        """Pins an ARP entry, so a test does not depend on ARP replies the VIP setup suppresses."""
        self.run(["ip", "neigh", "replace", ip, "lladdr", mac, "dev", ifname or self.ifname,
                  "nud", "permanent"])

    def set_offloads(self, ifname: str | None = None, **features: bool) -> None:
        """``ethtool -K`` inside the namespace (e.g. ``gro=False``); needs ethtool."""
        args = []
        for key, on in features.items():
            args += [key.replace("_", "-"), "on" if on else "off"]
        self.run(["ethtool", "-K", ifname or self.ifname, *args])


_WORKER = r"""
import json, os, sys, traceback
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # the snippets' prints must not corrupt the replies
env = {"__name__": "__worker__"}
for line in sys.stdin:
    request = json.loads(line)
    try:
        if request["op"] == "exec":
            exec(request["src"], env)
            value = None
        else:
            value = eval(request["src"], env)
        out = {"ok": True, "value": value}
    except BaseException:
        out = {"ok": False, "error": traceback.format_exc()}
    reply.write(json.dumps(out, default=repr) + "\n")
    reply.flush()
"""


class Worker:
    """A persistent Python process inside a node's namespace.

    Code that must run in the namespace's network stack in-process (a
    forwarder, libnftables) runs here: ``exec`` runs statements and ``eval``
    returns an expression's JSON-able value.  Errors come back as the child's
    traceback in a RuntimeError.  The topology kills it at teardown.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
        self.proc = node.popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, bufsize=1,
                               env=dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1"))

    def _call(self, op: str, src: str) -> Any:
        import json

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, "src": src}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"[{self.node.name}] worker exited {self.proc.wait(5)}")
        out = json.loads(line)
        if not out["ok"]:
            raise RuntimeError(f"[{self.node.name}] worker error:\n{out['error']}")
        return out["value"]

    def exec(self, src: str) -> None:
        self._call("exec", src)

    def eval(self, src: str) -> Any:
        return self._call("eval", src)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class Topology:
    """Namespaces, bridges and veth pairs of one test; everything goes at exit.

    ``with Topology() as topo: a = topo.add_node("a", "10.0.0.1")`` puts ``a`` on
    the default segment ``"lan"``; ``topo.add_segment("back")`` and
    ``topo.attach(node, "back", "10.1.0.1")`` give a node a second leg.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.tag = f"{prefix}{os.getpid()}x{next(_counter)}"
        self.switch = f"{self.tag}sw"
        self.nodes: dict[str, Node] = {}
        self.segments: dict[str, str] = {}
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._ports = itertools.count()
        self._closed = False

    def __enter__(self) -> Topology:
        try:
            sweep_stale(self.prefix)
            self._add_namespace(self.switch)
            self.add_segment("lan")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _live_names.add(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_segment(self, segment: str) -> str:
        """A new bridge (an L2 segment) in the switch namespace; returns its name."""
        if segment in self.segments:
            raise ValueError(f"segment {segment!r} exists")
        bridge = f"br{len(self.segments)}"
        _ip("-n", self.switch, "link", "add", bridge, "type", "bridge")
        # Forward at once: the default 15 s learning delay would stall the first test frames.
        _ip("-n", self.switch, "link", "set", bridge, "type", "bridge", "forward_delay", "0",
            "stp_state", "0")
        _ip("-n", self.switch, "link", "set", bridge, "up")
        self.segments[segment] = bridge
        return bridge

    def add_node(self, name: str, ip: str, segment: str = "lan", prefixlen: int = 24,
                 ip6: str | None = None) -> Node:
        """A node on ``segment`` with ``ip`` (and ``ip6`` in a /64, when given)."""
        if not ip.startswith("10."):
            raise ValueError("test addresses come from 10.0.0.0/8")
        _check_ip6(ip6)
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        ns = f"{self.tag}{name}"
        self._add_namespace(ns)
        node = Node(name, ns, self)
        self.nodes[name] = node
        self.attach(node, segment, ip, prefixlen, ip6=ip6)
        return node

    def attach(self, node: Node, segment: str, ip: str, prefixlen: int = 24,
               ip6: str | None = None) -> Interface:
        """Joins ``node`` to ``segment`` with a new interface ``eth<N>`` holding
        ``ip`` and, when given, the IPv6 address ``ip6`` in a /64.

        Duplicate address detection is off on an interface with ``ip6``: it
        would keep the addresses (the link-local one too, which neighbour
        discovery speaks from) "tentative" for about a second, and every
        address here is unique by construction.
        """
        _check_ip6(ip6)
        bridge = self.segments[segment]
        port = f"p{next(self._ports)}"
        ifname = f"eth{len(node.interfaces)}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", ifname,
            "netns", node.ns)
        _ip("-n", self.switch, "link", "set", port, "master", bridge, "up")
        _ip("-n", node.ns, "addr", "add", f"{ip}/{prefixlen}", "dev", ifname)
        if ip6 is not None:
            node.sysctl(f"net.ipv6.conf.{ifname}.accept_dad", 0)
            _ip("-n", node.ns, "-6", "addr", "add", f"{ip6}/64", "dev", ifname, "nodad")
        _ip("-n", node.ns, "link", "set", ifname, "up")
        if ip6 is not None:
            wait_for(lambda: _ipv6_ready(node.ns, ifname), what=f"IPv6 on {node.name}'s {ifname}")
        mac = _read_mac(node.ns, ifname)
        iface = Interface(ifname, ip, prefixlen, mac, segment, ip6)
        node.interfaces.append(iface)
        return iface

    def close(self) -> None:
        """Kills the processes, then deletes the namespaces (links go with them)."""
        if self._closed:
            return
        self._closed = True
        for proc in self._processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
        for proc in self._processes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._namespaces):
            _kill_namespace_pids(ns)
            _ip("netns", "del", ns, check=False)
            _live_names.discard(ns)

    def namespaces(self) -> list[str]:
        return list(self._namespaces)


def _check_ip6(ip6: str | None) -> None:
    if ip6 is not None and ipaddress.ip_address(ip6) not in IPV6_TEST_NET:
        raise ValueError(f"IPv6 test addresses come from {IPV6_TEST_NET}")


def _family(ip: str) -> str:
    return "socket.AF_INET6" if ":" in ip else "socket.AF_INET"


def _ipv6_ready(ns: str, ifname: str) -> bool:
    """``ifname`` has its link-local address and none is tentative."""
    out = _ip("-n", ns, "-6", "-o", "addr", "show", "dev", ifname).stdout
    return "scope link" in out and "tentative" not in out


def _read_mac(ns: str, ifname: str) -> str:
    out = _ip("-n", ns, "-o", "link", "show", ifname).stdout
    match = re.search(r"link/ether ([0-9a-f:]{17})", out)
    if match is None:
        raise RuntimeError(f"no MAC address for {ifname} in {ns}: {out!r}")
    return match.group(1)


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Polls ``predicate`` with a deadline (no fixed sleeps)."""
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
