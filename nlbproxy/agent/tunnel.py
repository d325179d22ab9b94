# -*- test-case-name: tests.test_handoff_agent_tunnel -*-
"""The host's end of the flow-id tunnel, as ``[agent] tunnel_interface`` sets it up.

A unit that reaches this host through a router sends a handed-off flow's
packets with its own address as the source, this host's as the destination
and a flow id in the ports (:mod:`nlbproxy.handoff.tunnel`).  With each such
HANDOFF comes the flow's mapping; :class:`HostTunnel` installs it before the
connection is restored, so that the first tunnelled packet already finds it:

- the :class:`~nlbproxy.handoff.tunnel.Decapsulator` learns the mapping, and
  its :class:`~nlbproxy.handoff.forwarder.DecapsulatorPort` (an AF_PACKET
  socket on the interface, a TUN device to inject into) puts the client's
  packets back together;
- the fence table's tunnel set gets (forwarder address, flow id), so this
  host's kernel drops the tunnelled originals instead of answering them.

The mapping goes when the connection ends (or its handoff fails).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import DecapsulatorPort
from nlbproxy.handoff.tunnel import Decapsulator, Mapping

__all__ = ["TUN_NAME", "TUNNEL_TABLE", "HostTunnel", "TunnelStartError"]

log = Logger()

#: The TUN device the restored packets enter this host's stack by.
TUN_NAME = "nlbtun0"
#: The agent's nftables table (family inet) holding the tunnel sets.
TUNNEL_TABLE = "nlbagent_tunnel"


class TunnelStartError(Exception):
    """The tunnel's end could not be set up (no such interface, no nftables, not root)."""


def accept_restored(ifname: str, sysctls: str = "/proc/sys/net") -> list[str]:
    """Lets the restored packets in by TUN device ``ifname``; returns warnings.

    The client's address is not routed through the device, so IPv4 reverse
    path filtering would drop every restored packet there: it goes off on the
    device, and the kernel's strict mode for all devices (it applies the larger
    of the two) is reported.  IPv6 has no such filter, but a device born while
    ``default.disable_ipv6`` is set drops every IPv6 packet: IPv6 is enabled
    on it (when the kernel has IPv6 at all).
    """
    warnings = []
    with open(f"{sysctls}/ipv4/conf/{ifname}/rp_filter", "w") as f:
        f.write("0\n")
    try:
        with open(f"{sysctls}/ipv4/conf/all/rp_filter") as f:
            strict = f.read().strip() == "1"
    except OSError:
        strict = False
    if strict:
        warnings.append(f"net.ipv4.conf.all.rp_filter is 1 (strict): the kernel drops restored IPv4 packets on "
                        f"{ifname}; set it to 0 or 2")
    ipv6 = f"{sysctls}/ipv6/conf/{ifname}/disable_ipv6"
    if os.path.exists(ipv6):
        with open(ipv6, "w") as f:
            f.write("0\n")
    return warnings


class HostTunnel:
    """Decapsulator, its port and the fence's tunnel set on ``ifname``.

    Nothing touches the system before :meth:`start`.
    """

    def __init__(self, reactor: Any, ifname: str, *, table: str = TUNNEL_TABLE, tun_name: str = TUN_NAME,
                 backend_factory: Callable[[], Any] = open_backend,
                 port_factory: Callable[..., Any] = DecapsulatorPort,
                 relax: Callable[[str], list[str]] = accept_restored) -> None:
        self.reactor = reactor
        self.ifname = ifname
        self.table = table
        self.tun_name = tun_name
        self.decapsulator = Decapsulator()
        self.port: Any = None
        self.fence: Fence | None = None
        self._backend_factory = backend_factory
        self._port_factory = port_factory
        self._relax = relax

    def start(self) -> None:
        """:class:`TunnelStartError` with one line when it cannot."""
        try:
            self.fence = Fence(self._backend_factory(), self.table)
            self.fence.setup()
            self.port = self._port_factory(self.reactor, self.decapsulator, self.ifname, self.tun_name)
            self.port.start()
            warnings = self._relax(self.tun_name)
        except Exception as e:
            self.stop()
            raise TunnelStartError(f"tunnel on {self.ifname}: {e}") from e
        for warning in warnings:
            log.warn("tunnel end: {problem}", problem=warning)
        log.info("tunnel end on {ifname} (TUN {tun}, table {table})", ifname=self.ifname, tun=self.tun_name,
                 table=self.table)

    def stop(self) -> None:
        if self.port is not None:
            self.port.stop()
            self.port = None
        if self.fence is not None:
            try:
                self.fence.teardown()
            except Exception as e:
                log.warn("tunnel table not deleted: {e}", e=e)
            self.fence = None

    def add(self, mapping: Mapping) -> None:
        """Installs ``mapping``; raises (and installs nothing) when nftables refuses."""
        if self.fence is None:
            raise RuntimeError("the tunnel end is not running")
        self.fence.add_tunnel(mapping.forwarder_ip, mapping.flow_id)
        self.decapsulator.add(mapping)

    def remove(self, mapping: Mapping) -> None:
        self.decapsulator.remove(mapping.forwarder_ip, mapping.flow_id)
        if self.fence is not None:
            try:
                self.fence.remove_tunnel(mapping.forwarder_ip, mapping.flow_id)
            except Exception as e:
                log.warn("tunnel flow {fid:#x} not removed from the table: {e}", fid=mapping.flow_id, e=e)

    def __len__(self) -> int:
        return len(self.decapsulator)
