# -*- test-case-name: tests.test_handoff_tunnel -*-
"""The seed's zero-overhead tunnel: a 32-bit flow id in the TCP port fields.

When the unit and the host do not share an L2 segment, rewriting MAC addresses
is not enough: the packet must be routed to the host, so its destination
address must be the host's.  The seed's tunneler does that without adding a
byte: the forwarder (address F) rewrites a client packet's source address to F,
its destination to the host's address H, and both TCP ports to a 32-bit flow
id (high half in the source port); the host's decapsulator looks the flow id up
in a mapping sent ahead with the handoff, and puts the client's address and
port and the VIP and its port back.  Full-size segments stay full-size, so
nothing is fragmented.

Checksums: the IPv4 header checksum is updated; the TCP checksum is updated
incrementally (RFC 1624) for the address and port changes.  A frame whose
virtio-net header says NEEDS_CSUM carries only the pseudo-header sum in the
TCP checksum field (the rest is computed on the way out), so only the address
change is folded into it, not inverted, and the ports are left to the final
computation.

Everything here is sans-I/O: :class:`Encapsulator` and :class:`Decapsulator`
rewrite a frame in a buffer in place; :class:`Mapping` is the versioned wire
form of one flow's entry; :class:`FlowIds` hands out ids.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from nlbproxy.handoff.packets import ETH_P_8021Q, VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN, Parsed, parse
from nlbproxy.handoff.routes import FlowKey, Via

_H = struct.Struct("!H")
_PORTS = struct.Struct("!HH")


class TunnelError(ValueError):
    """A mapping that is not valid (wire) or not usable (wrong family)."""


# --- checksum arithmetic ----------------------------------------------------------------


def _sum16(data: bytes) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def adjust(check: int, old: bytes, new: bytes, inverted: bool = True) -> int:
    """A 16-bit Internet checksum after ``old`` (even length) became ``new``.

    ``inverted``: the field holds the checksum proper (~sum), as in a complete
    header; otherwise it holds a partial, non-inverted sum (NEEDS_CSUM).
    """
    total = (~check & 0xFFFF) if inverted else check
    # Ones' complement subtraction of the old words: add their complements.
    total += sum(~w & 0xFFFF for w in struct.unpack(f"!{len(old) // 2}H", old)) + _sum16(new)
    total = _fold(total)
    return (~total & 0xFFFF) if inverted else total


# --- the mapping sent ahead ----------------------------------------------------------------

#: Version of the mapping's wire form; another is refused.
MAPPING_VERSION = 1
_MAPPING_HEAD = struct.Struct("!BBI")  # version, IP version, flow id


@dataclass(frozen=True, slots=True)
class Mapping:
    """Flow ``flow_id`` from forwarder ``forwarder_ip`` is connection ``key``."""

    flow_id: int
    forwarder_ip: str
    key: FlowKey

    def __post_init__(self) -> None:
        if not 0 <= self.flow_id < 1 << 32:
            raise TunnelError(f"flow id {self.flow_id} is not 32 bits")
        try:
            forwarder = ipaddress.ip_address(self.forwarder_ip)
        except ValueError as e:
            raise TunnelError(str(e)) from None
        if forwarder.version != ipaddress.ip_address(self.key.vip).version:
            raise TunnelError("forwarder and flow are of different address families")
        object.__setattr__(self, "forwarder_ip", str(forwarder))

    def encode(self) -> bytes:
        version = ipaddress.ip_address(self.forwarder_ip).version
        return (_MAPPING_HEAD.pack(MAPPING_VERSION, version, self.flow_id)
                + ipaddress.ip_address(self.forwarder_ip).packed + self.key.packed)

    @classmethod
    def decode(cls, blob: bytes) -> Mapping:
        if len(blob) < _MAPPING_HEAD.size:
            raise TunnelError("mapping too short")
        version, ipv, flow_id = _MAPPING_HEAD.unpack_from(blob)
        if version != MAPPING_VERSION:
            raise TunnelError(f"mapping version {version} is not {MAPPING_VERSION}")
        size = {4: 4, 6: 16}.get(ipv)
        if size is None:
            raise TunnelError(f"IP version {ipv}")
        body = blob[_MAPPING_HEAD.size:]
        if len(body) != 3 * size + 4:  # F, then the flow key's packed form
            raise TunnelError(f"mapping of {len(blob)} bytes for IPv{ipv}")
        try:
            key = FlowKey.from_packed(body[size:])
        except ValueError as e:
            raise TunnelError(f"bad flow in mapping: {e}") from None
        return cls(flow_id, str(ipaddress.ip_address(body[:size])), key)


class FlowIds:
    """Hands out flow ids, never one in use, never one with a zero port half
    (port 0 is refused by some stacks and middleboxes on the way).

    A unit starts at a random id: after a restart its flows of the last run
    may still be alive at a peer that took them over, under the same tunnel
    source; it reserves those it learns of (:meth:`reserve`).
    """

    def __init__(self, start: int | None = None) -> None:
        self._next = secrets.randbits(32) if start is None else start
        self._used: set[int] = set()

    def reserve(self, fid: int) -> None:
        """Marks ``fid`` in use (a live flow this unit did not allocate)."""
        self._used.add(fid)

    def allocate(self) -> int:
        for _ in range(1 << 20):
            fid = self._next
            self._next = (self._next + 1) & 0xFFFFFFFF
            if fid >> 16 and fid & 0xFFFF and fid not in self._used:
                self._used.add(fid)
                return fid
        raise TunnelError("no free flow id")

    def release(self, fid: int) -> None:
        self._used.discard(fid)

    def __len__(self) -> int:
        return len(self._used)


class TunnelPlan:
    """Which hosts a unit reaches through the tunnel, and how.

    A host whose address is in one of ``networks`` is on another segment:
    its flows get a flow id, leave with ``source`` (the forwarder's own
    address F, of the host's family) as their source, and go to the MAC of
    ``gateway``, the router towards those networks.
    """

    def __init__(self, networks: Iterable[str], sources: dict[int, str], gateways: dict[int, str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n) for n in networks)
        self.sources = {v: str(ipaddress.ip_address(a)) for v, a in sources.items()}
        self.gateways = {v: str(ipaddress.ip_address(a)) for v, a in gateways.items()}
        self.flow_ids = FlowIds()

    def reaches(self, host_ip: str) -> bool:
        """Whether ``host_ip`` is reached through the tunnel."""
        try:
            address = ipaddress.ip_address(host_ip)
        except ValueError:
            return False
        return any(address.version == n.version and address in n for n in self.networks)

    def source(self, host_ip: str) -> str:
        version = ipaddress.ip_address(host_ip).version
        try:
            return self.sources[version]
        except KeyError:
            raise TunnelError(f"no IPv{version} tunnel source for host {host_ip}") from None

    def gateway(self, host_ip: str) -> str:
        version = ipaddress.ip_address(host_ip).version
        try:
            return self.gateways[version]
        except KeyError:
            raise TunnelError(f"no IPv{version} tunnel gateway for host {host_ip}") from None


# --- rewriting frames in place --------------------------------------------------------------


def _partial(buf: bytearray, vnet: bool) -> bool:
    return vnet and bool(buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM)


def _rewrite(buf: bytearray, parsed: Parsed, src: bytes, dst: bytes, ports: bytes, vnet: bool) -> None:
    l3, l4 = parsed.l3, parsed.l4
    if parsed.version == 4:
        addr_at = l3 + 12
        width = 4
    else:
        addr_at = l3 + 8
        width = 16
    old_addrs = bytes(buf[addr_at:addr_at + 2 * width])
    new_addrs = src + dst
    old_ports = bytes(buf[l4:l4 + 4])
    check = _H.unpack_from(buf, l4 + 16)[0]
    if _partial(buf, vnet):
        # Only the pseudo-header sum is there; the ports join the final sum later.
        check = adjust(check, old_addrs, new_addrs, inverted=False)
    else:
        check = adjust(check, old_addrs + old_ports, new_addrs + ports)
    _H.pack_into(buf, l4 + 16, check)
    if parsed.version == 4:
        ip_check = _H.unpack_from(buf, l3 + 10)[0]
        _H.pack_into(buf, l3 + 10, adjust(ip_check, old_addrs, new_addrs))
    buf[addr_at:addr_at + 2 * width] = new_addrs
    buf[l4:l4 + 4] = ports


class Encapsulator:
    """The forwarder's half: client packet -> F to H, ports = flow id.

    F is the route's own tunnel source (``Via.source``), not this unit's:
    a unit that took a flow over from a failed peer keeps sending it from
    the peer's F, the address the host's decapsulator knows the flow by.
    """

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    def encode(self, buf: bytearray, parsed: Parsed, via: Via, vnet: bool = True) -> None:
        """Rewrites the frame in ``buf`` (after a vnet header when ``vnet``)."""
        assert via.flow_id is not None
        addresses = via.tunnel_addresses
        width = len(addresses) // 2
        if width != (4 if parsed.version == 4 else 16):
            raise TunnelError(f"an IPv{parsed.version} packet for the tunnel to host {via.host}")
        _rewrite(buf, parsed, addresses[:width], addresses[width:],
                 _PORTS.pack(via.flow_id >> 16, via.flow_id & 0xFFFF), vnet)
        self.stats["encoded"] += 1


    def redirect_too_big(self, buf: bytearray, via: Via, vnet: bool = True) -> None:
        """An ICMP "fragmentation needed" / ICMPv6 "packet too big" about
        tunnelled flow ``via`` (a narrower hop on the host's direct way to
        the client answered the VIP, which is routed to this unit) goes to
        the host as the tunnel's packets do, from the tunnel source to the
        host's own address; not from the hop itself: that router may be the
        one towards the host, and it drops a packet that claims to come from
        its own address.  The host's kernel finds the socket by the quoted
        headers, not the outer ones, and lowers its path MTU.  Checksums:
        the IPv4 header's, or the ICMPv6 one (it covers the addresses)."""
        start = VNET_HDR_LEN if vnet else 0
        l3 = start + 14
        if _H.unpack_from(buf, start + 12)[0] == ETH_P_8021Q:
            l3 += 4
        new = via.tunnel_addresses
        version = buf[l3] >> 4
        if (version, len(new)) == (4, 8):
            at = l3 + 12
            _H.pack_into(buf, l3 + 10, adjust(_H.unpack_from(buf, l3 + 10)[0], bytes(buf[at:at + 8]), new))
        elif (version, len(new)) == (6, 32):
            at, check_at = l3 + 8, l3 + 40 + 2
            check = adjust(_H.unpack_from(buf, check_at)[0], bytes(buf[at:at + 32]), new,
                           inverted=not _partial(buf, vnet))
            _H.pack_into(buf, check_at, check)
        else:
            raise TunnelError(f"an IPv{version} message for the tunnel to host {via.host}")
        buf[at:at + len(new)] = new
        self.stats["too_big"] += 1


class Decapsulator:
    """The host's half: a tunnelled frame back to client -> VIP with the real ports."""

    def __init__(self) -> None:
        self._mappings: dict[tuple[bytes, int], Mapping] = {}
        self.stats: Counter[str] = Counter()

    def add(self, mapping: Mapping) -> None:
        self._mappings[(ipaddress.ip_address(mapping.forwarder_ip).packed, mapping.flow_id)] = mapping

    def remove(self, forwarder_ip: str, flow_id: int) -> None:
        self._mappings.pop((ipaddress.ip_address(forwarder_ip).packed, flow_id), None)

    def __len__(self) -> int:
        return len(self._mappings)

    def decode(self, buf: bytearray, size: int, vnet: bool = True) -> FlowKey | None:
        """Restores the tunnelled frame in ``buf[:size]`` in place and returns
        its connection, or None (and leaves it alone) when it is not one of
        ours: not TCP, or no mapping for its forwarder and flow id."""
        start = VNET_HDR_LEN if vnet else 0
        parsed = parse(buf, start, size)
        if not isinstance(parsed, Parsed):
            self.stats["not_tcp"] += 1
            return None
        width = 4 if parsed.version == 4 else 16
        source = parsed.packed[:width]
        sport, dport = _PORTS.unpack_from(parsed.packed, 2 * width)
        mapping = self._mappings.get((source, sport << 16 | dport))
        if mapping is None:
            self.stats["unknown_flow"] += 1
            return None
        key = mapping.key
        packed = key.packed
        _rewrite(buf, parsed, packed[:width], packed[width:2 * width], packed[2 * width:], vnet)
        self.stats["decoded"] += 1
        return key
