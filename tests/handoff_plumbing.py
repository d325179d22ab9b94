"""A kernel-routed stand-in for the forwarder, for the handoff end-to-end tests.

The unit side needs a fence and a route per handed-off flow
(:class:`nlbproxy.handoff.unitside.Plumbing`).  The AF_PACKET forwarder is
built elsewhere (:mod:`nlbproxy.handoff.forwarder`); these tests exercise the
migration itself, so here the unit's own kernel forwards: an nftables map
marks a flow's packets in raw prerouting (mark 1 = fenced, dropped; a host's
mark = forward), and policy routing sends marked packets to that host, ahead
of the local table that would deliver them to the unit's listener.  It runs in
the unit's network namespace, which the test created.
"""

from __future__ import annotations

import subprocess
from typing import Any

from nlbproxy.handoff.fence import open_backend
from nlbproxy.handoff.unitside import Flow

TABLE = "nlbt_route"
FENCED = 1


def setup_commands() -> str:
    return (
        f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        f"  map flows4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service : mark; }}\n"
        f"  chain prerouting {{\n"
        f"    type filter hook prerouting priority -300; policy accept;\n"
        f"    meta mark set ip saddr . tcp sport . ip daddr . tcp dport map @flows4\n"
        f"    meta mark {FENCED} drop\n"
        f"  }}\n"
        f"}}\n"
    )


def setup_routing(hosts: dict[str, int]) -> None:
    """Policy routes: packets marked with a host's mark go to that host."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0", "net.ipv4.conf.eth0.send_redirects=0"):
        subprocess.run(["sysctl", "-q", "-w", key], check=True)
    for host, mark in hosts.items():
        ip("route", "replace", "default", "via", host, "table", str(mark))
        ip("rule", "add", "pref", "10", "fwmark", str(mark), "table", str(mark))
    # The local table comes after the marks: a marked packet to the VIP is
    # forwarded, not delivered to the unit's listener.
    ip("rule", "add", "pref", "100", "table", "local")
    ip("rule", "del", "pref", "0", "table", "local")


class KernelRoutes:
    """:class:`~nlbproxy.handoff.unitside.Plumbing` by nftables marks and policy routing."""

    def __init__(self, hosts: dict[str, int]) -> None:
        self.hosts = hosts
        self.backend = open_backend()
        self.backend.run(setup_commands())
        setup_routing(hosts)

    @staticmethod
    def _element(flow: Flow) -> str:
        return f"{flow.client[0]} . {flow.client[1]} . {flow.vip[0]} . {flow.vip[1]}"

    def fence(self, flow: Flow, host: Any) -> None:
        self.backend.run(f"add element inet {TABLE} flows4 {{ {self._element(flow)} : {FENCED} }}\n")
        self._host = getattr(host, "host", str(host))
        self._marks = getattr(self, "_marks", {})
        self._marks[flow] = self.hosts[self._host]

    def commit(self, flow: Flow) -> None:
        mark = self._marks[flow]
        element = self._element(flow)
        self.backend.run(f"delete element inet {TABLE} flows4 {{ {element} }}\n"
                         f"add element inet {TABLE} flows4 {{ {element} : {mark} }}\n")

    def unfence(self, flow: Flow) -> None:
        self._marks.pop(flow, None)
        self.backend.run(f"delete element inet {TABLE} flows4 {{ {self._element(flow)} }}\n")

    def ended(self, flow: Flow) -> None:
        if self._marks.pop(flow, None) is not None:
            self.backend.run(f"delete element inet {TABLE} flows4 {{ {self._element(flow)} }}\n")
