# -*- test-case-name: tests.test_handoff_forwarder -*-
"""The forwarder: carries a handed-off client's packets from the unit to the host.

The client keeps sending to the VIP, which the unit owns.  An AF_PACKET socket
on the client-facing interface sees every frame before netfilter (so also the
fenced ones the kernel then drops); frames of flows in the route table get
their Ethernet addresses rewritten -- destination the host's MAC, source the
unit's out interface -- and leave by the host-facing interface, unchanged
otherwise.  The host owns the VIP on ``lo`` and answers the client directly
(direct server return), so only the client-to-host half passes here --
and, for path MTU discovery, the ICMP "too big" messages a router sends
about the host's replies: their destination is the replies' source, the VIP.

Both sockets use PACKET_VNET_HDR and the 10-byte ``virtio_net_hdr`` is passed
through untouched: veth hands over partial checksums and GSO super-frames (up
to 64 KiB), which the far side only accepts with their header.

:class:`Forwarder` is the sans-I/O core (a frame in, where to send it out);
:class:`PacketPort` is the thin Twisted reader around the sockets, with the
reactor injected.  The route table's counters (:attr:`RouteTable.stats`) are
the forwarder's metrics: packets, bytes, drops by reason; :meth:`Forwarder.metrics`
gathers them for the admin API.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.python import failure, log
from zope.interface import implementer

from nlbproxy import limits
from nlbproxy.handoff.fence import check_table_name
from nlbproxy.handoff.neighbours import neighbour_mac
from nlbproxy.handoff.tunnel import Encapsulator, Mapping as TunnelMapping, TunnelError, TunnelPlan
from nlbproxy.handoff.packets import ETH_HLEN, VNET_HDR_LEN, Malformed, Parsed, parse, set_macs, too_big_key
from nlbproxy.handoff.routes import (
    Deleted, FlowKey, RouteError, RouteTable, State, TableFull, Verdict, Via, WireError, atom_key, from_atom,
    is_route_atom, to_atom,
)

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_STATISTICS = 6
ETH_P_ALL = 0x0003
#: ``sll_pkttype`` values: a frame to our MAC, and a frame we sent.
PACKET_HOST = 0
PACKET_OUTGOING = 4
SIOCGIFHWADDR = 0x8927
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

#: Receive buffer: a vnet header, a VLAN-tagged Ethernet header and the largest
#: IP packet (GSO super-frames included).
FRAME_BUFFER = VNET_HDR_LEN + 18 + 65535


class Forwarder:
    """Decides, for each received frame, whether and where it goes.

    ``macs`` maps each out interface to its own MAC address (the source of the
    rewritten frames).  Routes that carry a flow id are tunnelled by
    ``tunnel``, whether this unit fenced them or took them over.
    """

    def __init__(self, table: RouteTable, macs: Mapping[str, bytes]) -> None:
        self.table = table
        self.macs = dict(macs)
        self.tunnel = Encapsulator()
        #: Frames by outcome that the route table does not count.
        self.stats: Counter[str] = Counter()

    def frame(self, buf: bytearray, size: int, pkttype: int = PACKET_HOST) -> tuple[str, memoryview] | None:
        """``buf[:size]`` is a received vnet header and frame.  Returns the out
        interface and the bytes to send (``buf`` rewritten in place), or None
        when the frame is not sent now (not ours, buffered or dropped)."""
        self.stats["rx_frames"] += 1
        if pkttype != PACKET_HOST:
            # Frames to other MACs (a flooding bridge) or our own outgoing
            # copies are not addressed to the VIP's owner.
            self.stats["passed"] += 1
            return None
        parsed = parse(buf, VNET_HDR_LEN, size)
        if type(parsed) is not Parsed:
            if type(parsed) is Malformed:
                # The kernel sees the frame too and drops it itself.
                self.stats["malformed"] += 1
                self.stats[f"malformed_{parsed.reason.replace(' ', '_')}"] += 1
                return None
            return self._too_big(buf, size)
        assert isinstance(parsed, Parsed)
        view = memoryview(buf)[:size]
        verdict, route = self.table.packet(parsed.packed, view, parsed.flags)
        if verdict is not Verdict.FORWARD:
            if verdict is Verdict.PASS:
                self.stats["passed"] += 1
            return None
        assert route is not None
        if route.offloaded:
            return None
        return self._rewrite(buf, size, route.via, parsed)

    def _too_big(self, buf: bytearray, size: int) -> tuple[str, memoryview] | None:
        """An ICMP "too big" about a committed flow goes to the host, whose
        socket must lower its path MTU: without it the host resends the
        same large segments into the narrow hop for ever (IPv6 routers
        never fragment; IPv4 replies carry DF).  Everything else that is not
        TCP is the unit's own traffic."""
        packed = too_big_key(buf, VNET_HDR_LEN, size)
        route = self.table.lookup(packed) if packed is not None else None
        # A fenced flow has no host socket yet.
        if route is None or route.state not in (State.COMMITTED, State.CLOSING):
            self.stats["passed"] += 1
            return None
        via = route.via
        src = self.macs.get(via.ifname)
        if src is None:
            self.table.count_drop("no_interface")
            return None
        if via.flow_id is not None:
            # The flow-id tunnel carries TCP only: the message is routed to the host's own address.
            try:
                self.tunnel.redirect_too_big(buf, via)
            except TunnelError:
                self.table.count_drop("no_tunnel")
                return None
        set_macs(buf, VNET_HDR_LEN, via.mac_bytes, src)
        self.stats["too_big"] += 1
        return via.ifname, memoryview(buf)[:size]

    def _rewrite(self, buf: bytearray, size: int, via: Via, parsed: Parsed | None) -> tuple[str, memoryview] | None:
        src = self.macs.get(via.ifname)
        if src is None:
            self.table.count_drop("no_interface")
            return None
        set_macs(buf, VNET_HDR_LEN, via.mac_bytes, src)
        if via.flow_id is not None:
            if parsed is None:
                found = parse(buf, VNET_HDR_LEN, size)
                if not isinstance(found, Parsed):
                    self.table.count_drop("malformed")
                    return None
                parsed = found
            try:
                self.tunnel.encode(buf, parsed, via)
            except TunnelError:
                # The route's tunnel is of the other address family (a bad atom).
                self.table.count_drop("no_tunnel")
                return None
        return via.ifname, memoryview(buf)[:size]

    def commit(self, key: FlowKey) -> list[tuple[str, memoryview]]:
        """Commits ``key``'s route; returns its buffered frames, rewritten, in order."""
        route = self.table.get(key)
        held = self.table.commit(key)
        assert route is not None
        out = []
        for frame in held:
            sent = self._rewrite(bytearray(frame), len(frame), route.via, None)
            if sent is not None:
                out.append(sent)
        return out

    def metrics(self) -> dict[str, Any]:
        """Counters for the admin API and /metrics: packets and bytes
        forwarded, drops by reason, frames passed to the kernel, routes."""
        stats = self.table.stats
        drops = {k[len("drop_"):]: v for k, v in stats.items() if k.startswith("drop_")}
        return {
            "packets": stats["packets"],
            "bytes": stats["bytes"],
            "buffered_packets": stats["buffered_packets"],
            "drops": drops,
            "rx_frames": self.stats["rx_frames"],
            "passed": self.stats["passed"],
            "malformed": self.stats["malformed"],
            "too_big": self.stats["too_big"],
            "routes": len(self.table),
            "buffered_bytes": self.table.buffered_bytes,
        }


# --- sockets ------------------------------------------------------------------------


def interface_mac(ifname: str) -> bytes:
    """The MAC address of ``ifname`` in the caller's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16s16x", ifname.encode())
        reply = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, request)
    return reply[18:24]


def open_packet_socket(ifname: str, receive: bool, rcvbuf: int = limits.FORWARDER_RCVBUF,
                       sndbuf: int = limits.FORWARDER_SNDBUF) -> socket.socket:
    """A non-blocking AF_PACKET socket on ``ifname`` with virtio-net headers."""
    proto = ETH_P_ALL if receive else 0
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        if receive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            try:
                # Linux >= 4.20: our own sends never come back to this socket.
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        # Python's AF_PACKET address takes the protocol in host order (it
        # swaps it itself), unlike the socket() call.
        sock.bind((ifname, proto))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _PacketReader:
    """What the reactor asks of an AF_PACKET socket it reads (IReadDescriptor)."""

    #: Names the reader in logs.
    kind = "packets"
    rx_ifname: str
    _rx: socket.socket | None

    def stop(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        return self._rx.fileno() if self._rx is not None else -1

    def logPrefix(self) -> str:
        return f"{self.kind}({self.rx_ifname})"

    def connectionLost(self, reason: failure.Failure) -> None:
        log.msg(f"{self.logPrefix()}: lost: {reason.getErrorMessage()}")
        self.stop()


@implementer(IReadDescriptor)
class PacketPort(_PacketReader):
    """The forwarder's I/O: reads the client-facing interface, sends out of the
    host-facing ones, and runs the route table's timeouts.

    ``on_deleted`` hears of every route that leaves the table by a timeout or
    through :meth:`delete`, so that the unit lifts the fence and deletes the
    durable copy.  A frame that cannot be sent now (the socket's buffer is
    full) is dropped and counted: the client's TCP retransmits it, and
    blocking here would stall every other flow.
    """

    kind = "forwarder"

    def __init__(self, reactor: Any, forwarder: Forwarder, rx_ifname: str,
                 on_deleted: Callable[[list[Deleted]], None] | None = None,
                 max_batch: int = limits.FORWARDER_BATCH, tick_interval: float = 1.0,
                 opener: Callable[[str, bool], socket.socket] = open_packet_socket,
                 kernel: KernelPath | None = None,
                 attach: Callable[[socket.socket, list[Insn]], None] | None = None) -> None:
        self.reactor = reactor
        #: The fast path, when the unit has one: committed flows are offloaded to it.
        self.kernel = kernel
        self._attach = attach or attach_filter
        self.stats: Counter[str] = Counter()
        self.forwarder = forwarder
        self.rx_ifname = rx_ifname
        self.on_deleted = on_deleted
        self.max_batch = max_batch
        self._opener = opener
        self._rx: socket.socket | None = None
        self._tx: dict[str, socket.socket] = {}
        self._buf = bytearray(FRAME_BUFFER)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = reactor
        self._tick_interval = tick_interval

    def start(self) -> None:
        self._rx = self._opener(self.rx_ifname, True)
        self.refilter()
        for ifname in self.forwarder.macs:
            self._tx_socket(ifname)
        self.reactor.addReader(self)
        self._ticker.start(self._tick_interval, now=False)

    def stop(self) -> None:
        if self._ticker.running:
            self._ticker.stop()
        if self._rx is not None:
            self.reactor.removeReader(self)
            self._rx.close()
            self._rx = None
        for sock in self._tx.values():
            sock.close()
        self._tx.clear()

    def _tx_socket(self, ifname: str) -> socket.socket:
        sock = self._tx.get(ifname)
        if sock is None:
            sock = self._tx[ifname] = self._opener(ifname, False)
        return sock


    def doRead(self) -> None:
        # Read a batch per wake-up: one select round per frame would cost
        # more than the forwarding itself.
        rx = self._rx
        if rx is None:
            return
        buf = self._buf
        frame = self.forwarder.frame
        for _ in range(self.max_batch):
            try:
                size, address = rx.recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENETDOWN):
                    break
                raise
            out = frame(buf, size, address[2])
            if out is not None:
                self._send(*out)
        self._report_removed()

    def _report_removed(self) -> None:
        table = self.forwarder.table
        if table.removed:
            gone, table.removed = table.removed, []
            self._deleted(gone)

    def _deleted(self, gone: list[Deleted]) -> None:
        if self.kernel is not None:
            offloaded = [d.route.key for d in gone if d.route.offloaded]
            try:
                self.kernel.remove(*offloaded)
            except Exception as e:
                self.stats["kernel_remove_failed"] += 1
                log.msg(f"{self.logPrefix()}: fast-path routes not removed: {e}")
            self.refilter()
        if self.on_deleted is not None:
            self.on_deleted(gone)

    def refilter(self) -> None:
        """With a fast path, lets through the socket only what Python must see
        (fenced flows, flows the kernel does not carry, FIN/SYN/RST); call it
        before fencing a flow."""
        if self.kernel is None or self._rx is None:
            return
        self._attach(self._rx, socket_filter(self.forwarder.table.python_keys()))

    def _send(self, ifname: str, data: memoryview) -> None:
        try:
            self._tx_socket(ifname).send(data)
        except OSError:
            self.forwarder.table.count_drop("send_error")

    # the unit's calls

    def commit(self, key: FlowKey) -> int:
        """Commits ``key`` and sends its buffered frames; returns how many.

        With a fast path the route goes to the kernel right after, on the
        reactor's next turn (:meth:`offload`): the nftables call and the new
        socket filter cost a third of a millisecond, which the handoff's
        critical path (the unit's COMMIT to the agent) need not wait for.
        Until then the filter still lets the flow's frames in (it was
        fenced) and Python forwards them, so no frame arrives while no path
        exists; a later frame may overtake the buffered ones once the kernel
        has the route (TCP copes with that reordering).
        """
        sent = self.forwarder.commit(key)
        for ifname, data in sent:
            self._send(ifname, data)
        if self.kernel is not None:
            self.reactor.callLater(0, self.offload, key)
        return len(sent)

    def offload(self, key: FlowKey) -> None:
        """Hands committed ``key`` to the fast path and drops it from the
        socket filter; a route that ended or closed meanwhile stays as it is."""
        table = self.forwarder.table
        route = table.get(key)
        if self.kernel is None or route is None or route.state is not State.COMMITTED or route.offloaded:
            return
        if self.kernel.can_offload(route.via):
            try:
                self.kernel.add(key, route.via.host_mac)
                table.offload(key)
            except Exception as e:
                # The flow stays on the AF_PACKET path, which the filter must then let through.
                self.stats["offload_failed"] += 1
                log.msg(f"{self.logPrefix()}: {key} not offloaded: {e}")
        self.refilter()

    def delete(self, key: FlowKey, reason: str = "ended") -> None:
        gone = self.forwarder.table.delete(key, reason)
        if gone is not None:
            self._deleted([gone])

    def end(self, key: FlowKey) -> None:
        """The host's agent reported ``key``'s end: its route lingers (see
        :meth:`RouteTable.end`), or goes now if it was never committed."""
        gone = self.forwarder.table.end(key)
        if gone is not None:
            self._deleted([gone])

    def delete_host(self, host: str, reason: str = "host_gone") -> int:
        """Deletes every route to ``host`` (health says it is down); returns
        how many.  The fence goes with them, so the client's next packets
        reach the unit's kernel, which owns the VIP and has no socket for
        the flow: it answers them with a RST."""
        gone = self.forwarder.table.delete_host(host, reason)
        if gone:
            self._deleted(gone)
        return len(gone)

    def poll_kernel_drops(self) -> int:
        """Adds the frames the kernel dropped because the receive buffer was
        full (``PACKET_STATISTICS``, which resets on read) to ``drop_rx_overflow``."""
        if self._rx is None:
            return 0
        try:
            _, drops = struct.unpack("II", self._rx.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        except OSError:
            return 0
        if drops:
            self.forwarder.table.count_drop("rx_overflow", drops)
        return drops

    def _tick(self) -> None:
        self.poll_kernel_drops()
        gone = self.forwarder.table.tick()
        if gone:
            self._deleted(gone)


# --- the host's side of the tunnel -----------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_VNET = struct.Struct("=BBHHHH")  # virtio_net_hdr: little-endian on x86, native here


def open_tun(name: str) -> int:
    """Creates (or attaches to) TUN device ``name`` with virtio-net headers, up."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS,
                                                        struct.pack("16sH22x", name.encode(), 0)), 16)[0]
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))
    except BaseException:
        os.close(fd)
        raise
    return fd


def to_tun_header(vnet: bytes | bytearray | memoryview) -> bytes:
    """A vnet header for the same packet without its Ethernet header: the
    offsets (header length, checksum start) count from the IP header on a TUN
    device."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(vnet)
    if hdr_len >= ETH_HLEN:
        hdr_len -= ETH_HLEN
    if csum_start >= ETH_HLEN:
        csum_start -= ETH_HLEN
    return _VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


@implementer(IReadDescriptor)
class DecapsulatorPort(_PacketReader):
    """The host's tunnel end: reads tunnelled frames from the host's interface,
    restores them (:class:`nlbproxy.handoff.tunnel.Decapsulator`) and hands the
    IP packet to the host's stack through a TUN device, as if the client's
    packet had arrived directly.  The host's fence table drops the tunnelled
    originals (:meth:`nlbproxy.handoff.fence.Fence.add_tunnel`), and the TUN
    device needs rp_filter off: the client's address is not routed through it.
    """

    kind = "decapsulator"

    def __init__(self, reactor: Any, decapsulator: Any, rx_ifname: str, tun_name: str,
                 max_batch: int = limits.FORWARDER_BATCH,
                 opener: Callable[[str, bool], socket.socket] = open_packet_socket,
                 tun_opener: Callable[[str], int] = open_tun) -> None:
        self.reactor = reactor
        self.decapsulator = decapsulator
        self.rx_ifname = rx_ifname
        self.tun_name = tun_name
        self.max_batch = max_batch
        self._opener = opener
        self._tun_opener = tun_opener
        self._rx: socket.socket | None = None
        self._tun = -1
        self._buf = bytearray(FRAME_BUFFER)
        self.stats: Counter[str] = Counter()

    def start(self) -> None:
        self._tun = self._tun_opener(self.tun_name)
        self._rx = self._opener(self.rx_ifname, True)
        self.reactor.addReader(self)

    def stop(self) -> None:
        if self._rx is not None:
            self.reactor.removeReader(self)
            self._rx.close()
            self._rx = None
        if self._tun >= 0:
            os.close(self._tun)
            self._tun = -1


    def doRead(self) -> None:
        rx = self._rx
        if rx is None:
            return
        buf = self._buf
        view = memoryview(buf)
        for _ in range(self.max_batch):
            try:
                size, address = rx.recvfrom_into(buf)
            except BlockingIOError:
                return
            if address[2] != PACKET_HOST:
                continue
            if self.decapsulator.decode(buf, size) is None:
                continue
            try:
                os.writev(self._tun, [to_tun_header(buf), view[VNET_HDR_LEN + ETH_HLEN:size]])
                self.stats["injected"] += 1
            except OSError:
                self.stats["drop_inject_error"] += 1


# --- the unit side's plumbing ---------------------------------------------------------------


class ForwarderPlumbing:
    """The handoff unit side's ``Plumbing`` (fence, commit, unfence, ended) on
    this forwarder: the route table, the nftables fence and, when given, the
    DAM that makes routes durable for other units.

    ``flow`` is anything with ``client`` and ``vip`` as (ip, port) pairs and
    ``host`` anything with a ``host`` attribute holding the host's IP address
    (or that address itself).  Every way a route ends -- the agent's report,
    an aborted handoff, a timeout, a reused 4-tuple -- lifts the fence and
    deletes the atom, through the port's ``on_deleted``.
    """

    def __init__(self, port: PacketPort, fence: Any, ifname: str,
                 resolve_mac: Callable[[str], str] = neighbour_mac, dam: Any = None,
                 mac_ttl: float = limits.FORWARDER_MAC_TTL, tunnel: TunnelPlan | None = None) -> None:
        self.port = port
        self.tunnel = tunnel
        #: Flow ids of this unit's tunnelled routes, released when the route goes.
        self._flow_ids: dict[FlowKey, int] = {}
        self.table = port.forwarder.table
        self.fence_ = fence
        self.ifname = ifname
        self.resolve_mac = resolve_mac
        self.dam = dam
        self.mac_ttl = mac_ttl
        self.stats: Counter[str] = Counter()
        #: host IP -> (MAC, until when it is reused)
        self._macs: dict[str, tuple[str, float]] = {}
        port.on_deleted = self._deleted

    @staticmethod
    def key(flow: Any) -> FlowKey:
        return FlowKey(flow.client[0], int(flow.client[1]), flow.vip[0], int(flow.vip[1]))

    def fence(self, flow: Any, host: Any) -> TunnelMapping | None:
        """Fences ``flow`` towards ``host``; for a host reached through the
        tunnel returns the mapping its agent must know before the first
        tunnelled packet (None otherwise)."""
        key = self.key(flow)
        host_ip = str(getattr(host, "host", host))
        mapping = None
        if self.tunnel is not None and self.tunnel.reaches(host_ip):
            source = self.tunnel.source(host_ip)
            flow_id = self.tunnel.flow_ids.allocate()
            try:
                # A flow of the other family than the host's cannot be
                # tunnelled (the addresses are rewritten within a family).
                mapping = TunnelMapping(flow_id, source, key)
            except TunnelError:
                self.tunnel.flow_ids.release(flow_id)
                raise
        try:
            if mapping is None:
                via = Via(host_ip, self.host_mac(host_ip), self.ifname)
            else:
                assert self.tunnel is not None
                via = Via(host_ip, self.host_mac(self.tunnel.gateway(host_ip)), self.ifname, mapping.flow_id,
                          mapping.forwarder_ip)
            self.table.fence(key, via)
        except BaseException:
            self._release(mapping)
            raise
        if mapping is not None:
            self._flow_ids[key] = mapping.flow_id
        try:
            # The socket must let the flow's frames in before the kernel stops seeing them.
            self.port.refilter()
            self.fence_.add(key)
        except BaseException:
            self.table.delete(key, "aborted")
            self._flow_ids.pop(key, None)
            self._release(mapping)
            raise
        self._durable(key)
        return mapping

    def _release(self, mapping: TunnelMapping | None) -> None:
        if mapping is not None and self.tunnel is not None:
            self.tunnel.flow_ids.release(mapping.flow_id)

    def host_mac(self, ip: str) -> str:
        """``resolve_mac(ip)``, reused for ``mac_ttl`` seconds (failures are not)."""
        now = self.port.reactor.seconds()
        known = self._macs.get(ip)
        if known is not None and now < known[1]:
            return known[0]
        mac = self.resolve_mac(ip)
        if len(self._macs) >= limits.FORWARDER_MAC_ENTRIES:
            self._macs.clear()
        self._macs[ip] = (mac, now + self.mac_ttl)
        return mac

    def commit(self, flow: Any) -> None:
        key = self.key(flow)
        self.port.commit(key)
        self._durable(key)

    def unfence(self, flow: Any) -> None:
        self.port.delete(self.key(flow), "aborted")

    def ended(self, flow: Any) -> None:
        key = self.key(flow)
        route = self.table.get(key)
        self.port.end(key)
        if route is not None and route.ended:
            # The connection is over: no other unit is to take it over.  The
            # route itself lingers here for the client's last ACK.
            self._forget(key)

    def replumb(self, atoms: Iterable[tuple[str, str]]) -> tuple[int, int]:
        """Takes over the routes of ``(key, data)`` DAM atoms (another unit
        failed and its clients' traffic now arrives here): each is restored,
        fenced (this unit owns the VIP too, and its kernel must not reset the
        flow) and, when committed, offloaded if there is a fast path.
        Returns (taken over, refused)."""
        taken = refused = 0
        for atom_key_, data in atoms:
            if not is_route_atom(atom_key_):
                continue
            try:
                key, via, state = from_atom(atom_key_, data, self.ifname)
                self.table.restore(key, via, state)
            except (WireError, TableFull, RouteError) as e:
                refused += 1
                self.stats["replumb_refused"] += 1
                log.msg(f"route atom {atom_key_!r} not taken over: {e}")
                continue
            if via.flow_id is not None and self.tunnel is not None and via.source in self.tunnel.sources.values():
                # Our own flow id from an earlier run: it must not be handed out again.
                self.tunnel.flow_ids.reserve(via.flow_id)
                self._flow_ids[key] = via.flow_id
            try:
                self.port.refilter()
                self.fence_.add(key)
            except Exception as e:
                self.table.delete(key, "aborted")
                refused += 1
                self.stats["replumb_refused"] += 1
                log.msg(f"route {key} not taken over: {e}")
                continue
            kernel = self.port.kernel
            if state is State.COMMITTED and kernel is not None and kernel.can_offload(via):
                try:
                    kernel.add(key, via.host_mac)
                    self.table.offload(key)
                except Exception as e:
                    self.stats["offload_failed"] += 1
                    log.msg(f"{key} not offloaded: {e}")
            taken += 1
        self.port.refilter()
        self.stats["replumbed"] += taken
        return taken, refused

    def _durable(self, key: FlowKey) -> None:
        route = self.table.get(key)
        if self.dam is None or route is None:
            return
        try:
            self.dam.add(*to_atom(route))
        except Exception as e:  # a full DAM must not fail the handoff: the route works locally
            self.stats["dam_add_failed"] += 1
            log.msg(f"route {key} not made durable: {e}")

    def _deleted(self, gone: list[Deleted]) -> None:
        keys = [d.route.key for d in gone]
        for key in keys:
            fid = self._flow_ids.pop(key, None)
            if fid is not None and self.tunnel is not None:
                self.tunnel.flow_ids.release(fid)
        try:
            self.fence_.remove(*keys)
        except Exception as e:
            self.stats["unfence_failed"] += 1
            log.msg(f"fence not lifted for {len(keys)} flows: {e}")
        for deleted in gone:
            if not deleted.route.ended:  # an ended route's atom went at its end
                self._forget(deleted.route.key)

    def _forget(self, key: FlowKey) -> None:
        """Deletes ``key``'s route atom."""
        if self.dam is not None:
            try:
                self.dam.delete(atom_key(key))
            except Exception:
                self.stats["dam_delete_failed"] += 1


# --- the kernel fast path --------------------------------------------------------------------
#
# Forwarding every committed flow's frames through Python costs a wake-up and
# two copies per frame.  nftables can do the same MAC rewrite in the kernel: a
# netdev-family ingress chain on the client-facing interface looks the flow up
# in a map (flow -> host MAC), rewrites both Ethernet addresses and sends the
# frame out of the host-facing interface ("fwd to"), before the IP stack (and
# the fence) ever sees it.  The AF_PACKET socket still sees those frames --
# taps run before the ingress hook -- so a socket filter keeps only what
# Python must still handle: frames of fenced flows (to buffer), and FIN, SYN
# and RST frames (for the backstop).


def kernel_path_commands(table: str, rx_ifname: str, out_ifname: str, out_mac: str) -> str:
    """The netdev table of the fast path, created afresh (one transaction)."""
    check_table_name(table)
    for name in (rx_ifname, out_ifname):
        if not _IFNAME.match(name):
            raise ValueError(f"interface name {name!r}")
    if not re.match(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", out_mac):
        raise ValueError(f"MAC {out_mac!r}")
    return (
        f"add table netdev {table}\n"
        f"delete table netdev {table}\n"
        f"table netdev {table} {{\n"
        f"  map routes4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service : ether_addr; }}\n"
        f"  map routes6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service : ether_addr; }}\n"
        f"  chain ingress {{\n"
        f"    type filter hook ingress device \"{rx_ifname}\" priority -500; policy accept;\n"
        f"    ether type ip ether daddr set ip saddr . tcp sport . ip daddr . tcp dport map @routes4"
        f" ether saddr set {out_mac} fwd to \"{out_ifname}\"\n"
        f"    ether type ip6 ether daddr set ip6 saddr . tcp sport . ip6 daddr . tcp dport map @routes6"
        f" ether saddr set {out_mac} fwd to \"{out_ifname}\"\n"
        f"  }}\n"
        f"}}\n"
    )


def kernel_route_commands(verb: str, table: str, routes: list[tuple[FlowKey, str]]) -> str:
    check_table_name(table)
    lines = []
    for key, mac in routes:
        family = "6" if ":" in key.client_ip else "4"
        element = f"{key.client_ip} . {key.client_port} . {key.vip} . {key.vport}"
        if verb == "add":
            lines.append(f"add element netdev {table} routes{family} {{ {element} : {mac} }}\n")
        elif verb == "delete":
            lines.append(f"delete element netdev {table} routes{family} {{ {element} }}\n")
        else:
            raise ValueError(f"verb {verb!r}")
    return "".join(lines)


class KernelPath:
    """The fast path's nftables table, owned by the unit (see above).

    Routes whose out interface is ``out_ifname`` and that are not tunnelled
    can be offloaded; the others stay on the AF_PACKET path.
    """

    def __init__(self, backend: Any, rx_ifname: str, out_ifname: str, out_mac: str,
                 table: str = "nlbproxy_fast") -> None:
        self.backend = backend
        self.rx_ifname = rx_ifname
        self.out_ifname = out_ifname
        self.out_mac = out_mac.lower()
        self.table = check_table_name(table)
        self._routes: dict[FlowKey, str] = {}
        self.active = False

    def __len__(self) -> int:
        return len(self._routes)

    def setup(self) -> None:
        self.backend.run(kernel_path_commands(self.table, self.rx_ifname, self.out_ifname, self.out_mac))
        self._routes.clear()
        self.active = True

    def teardown(self) -> None:
        if self.active:
            self.backend.run(f"add table netdev {self.table}\ndelete table netdev {self.table}\n")
            self.active = False
        self._routes.clear()

    def can_offload(self, via: Via) -> bool:
        return self.active and via.flow_id is None and via.ifname == self.out_ifname

    def add(self, key: FlowKey, mac: str) -> None:
        self.backend.run(kernel_route_commands("add", self.table, [(key, mac)]))
        self._routes[key] = mac

    def remove(self, *keys: FlowKey) -> None:
        gone = [(k, self._routes[k]) for k in keys if k in self._routes]
        if gone:
            self.backend.run(kernel_route_commands("delete", self.table, gone))
            for k, _ in gone:
                del self._routes[k]


# --- the socket filter (classic BPF) ------------------------------------------------------------

SO_ATTACH_FILTER = 26
_BPF_LD_H_ABS, _BPF_LD_B_ABS, _BPF_LD_W_ABS = 0x28, 0x30, 0x20
_BPF_LDX_MSH = 0xB1
_BPF_LD_B_IND, _BPF_LD_H_IND = 0x50, 0x48
_BPF_JEQ_K, _BPF_JSET_K = 0x15, 0x45
_BPF_RET_K = 0x06
#: Fenced flows a filter names one by one; with more it lets every TCP frame through.
MAX_FILTER_FLOWS = 48
_ACCEPT = 0x40000

#: A cBPF instruction: (code, jt, jf, k).
Insn = tuple[int, int, int, int]


def socket_filter(fenced: list[FlowKey], max_flows: int = MAX_FILTER_FLOWS) -> list[Insn]:
    """A classic BPF program for the AF_PACKET socket of a fast-path unit: it
    keeps TCP frames (IPv4 and IPv6) with FIN, SYN or RST, frames of the
    ``fenced`` flows (client address and port) and ICMP "too big" messages
    (the kernel's fast path forwards TCP only); it drops the rest.  More
    than ``max_flows`` fenced flows: every TCP frame is kept.

    An IPv6 flow is named by the last 32 bits of the client's address and
    its port: a filter compares words, and one word per flow keeps every
    jump within reach whatever the mix of families.  A frame of another
    client that shares them costs a wake-up, nothing more (Python matches
    whole keys).  IPv6 frames whose TCP header follows extension headers
    are all kept: Python walks those headers.
    """
    everything = len(fenced) > max_flows
    v4 = [k for k in fenced if ":" not in k.client_ip]
    v6 = [k for k in fenced if ":" in k.client_ip]
    prog: list[tuple[Any, ...]] = [
        (_BPF_LD_H_ABS, 0, 0, 12),
        (_BPF_JEQ_K, "v4", 0, 0x0800),
        (_BPF_JEQ_K, 0, "drop", 0x86DD),
        (_BPF_LD_B_ABS, 0, 0, 20),                 # IPv6 next header
        (_BPF_JEQ_K, "tcp6", 0, 6),
        (_BPF_JEQ_K, "icmp6", 0, 58),
        (_BPF_JEQ_K, "accept", 0, 0),              # hop-by-hop options
        (_BPF_JEQ_K, "accept", 0, 43),             # routing
        (_BPF_JEQ_K, "accept", "drop", 60),        # destination options
        ("icmp6",),
        (_BPF_LD_B_ABS, 0, 0, 14 + 40),            # ICMPv6 type
        (_BPF_JEQ_K, "accept", "drop", 2),         # packet too big
        ("tcp6",),
    ]
    if everything:
        prog.append((_BPF_RET_K, 0, 0, _ACCEPT))
    else:
        prog += [
            (_BPF_LD_B_ABS, 0, 0, 14 + 40 + 13),   # TCP flags
            (_BPF_JSET_K, "accept", 0, 0x07),      # FIN, SYN, RST
        ]
        for i, key in enumerate(v6):
            low = int.from_bytes(ipaddress.ip_address(key.client_ip).packed[12:], "big")
            prog += [
                (_BPF_LD_W_ABS, 0, 0, 14 + 8 + 12),  # the source address's last word
                (_BPF_JEQ_K, 0, f"next6_{i}", low),
                (_BPF_LD_H_ABS, 0, 0, 14 + 40),    # source port
                (_BPF_JEQ_K, "accept", f"next6_{i}", key.client_port),
                (f"next6_{i}",),
            ]
        prog.append((_BPF_RET_K, 0, 0, 0))
    prog += [
        ("v4",),
        (_BPF_LD_B_ABS, 0, 0, 23),                 # IPv4 protocol
        (_BPF_JEQ_K, "tcp4", 0, 6),
        (_BPF_JEQ_K, 0, "drop", 1),                # ICMP
        (_BPF_LDX_MSH, 0, 0, 14),                  # X = IP header length
        (_BPF_LD_H_IND, 0, 0, 14),                 # ICMP type and code
        (_BPF_JEQ_K, "accept", "drop", 0x0304),    # fragmentation needed
        ("tcp4",),
    ]
    if everything:
        prog.append((_BPF_RET_K, 0, 0, _ACCEPT))
    else:
        prog += [
            (_BPF_LD_H_ABS, 0, 0, 20),             # fragment offset: only the first has ports
            (_BPF_JSET_K, "drop", 0, 0x1FFF),
            (_BPF_LDX_MSH, 0, 0, 14),              # X = IP header length
            (_BPF_LD_B_IND, 0, 0, 14 + 13),        # TCP flags
            (_BPF_JSET_K, "accept", 0, 0x07),      # FIN, SYN, RST
        ]
        for i, key in enumerate(v4):
            address = int.from_bytes(ipaddress.ip_address(key.client_ip).packed, "big")
            prog += [
                (_BPF_LD_W_ABS, 0, 0, 26),         # source address
                (_BPF_JEQ_K, 0, f"next{i}", address),
                (_BPF_LD_H_IND, 0, 0, 14),         # source port
                (_BPF_JEQ_K, "accept", f"next{i}", key.client_port),
                (f"next{i}",),
            ]
    prog += [("drop",), (_BPF_RET_K, 0, 0, 0), ("accept",), (_BPF_RET_K, 0, 0, _ACCEPT)]
    return _assemble(prog)


def _assemble(prog: list[tuple[Any, ...]]) -> list[Insn]:
    labels: dict[str, int] = {}
    position = 0
    for insn in prog:
        if len(insn) == 1:
            labels[insn[0]] = position
        else:
            position += 1

    def offset(target: Any, here: int) -> int:
        if isinstance(target, int):
            return target
        delta = labels[target] - here - 1
        if not 0 <= delta < 256:
            raise ValueError("filter too long for a jump")
        return delta

    out: list[Insn] = []
    for insn in prog:
        if len(insn) == 1:
            continue
        code, jt, jf, k = insn
        here = len(out)
        out.append((code, offset(jt, here), offset(jf, here), k))
    return out


def attach_filter(sock: socket.socket, program: list[Insn]) -> None:
    import ctypes

    raw = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
