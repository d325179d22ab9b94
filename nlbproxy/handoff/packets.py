# -*- test-case-name: tests.test_handoff_forwarder -*-
"""Ethernet, IPv4, IPv6 and TCP headers, as much as the forwarder needs, sans-I/O.

Frames arrive from an AF_PACKET socket opened with PACKET_VNET_HDR: a 10-byte
``virtio_net_hdr`` and then the Ethernet frame.  The header tells the kernel on
the far side that the frame may carry a partial checksum (veth hands those
over) or be a GRO/TSO super-frame of up to 64 KiB; the forwarder passes it
through unchanged, and nothing here changes lengths, so its offsets stay right.

:func:`parse` reads one frame and returns where its headers are and the flow
key the route table is indexed by (:attr:`FlowKey.packed`): the source and
destination addresses and the two ports, as they sit in the headers.  It never
raises on what arrived from the wire: a frame that is not TCP over IP is
:data:`NOT_TCP` (the unit's own traffic, left to its kernel) and a frame that
claims to be TCP over IP but is cut short or inconsistent is :class:`Malformed`
with a reason.

:func:`too_big_key` reads the one kind of non-TCP frame the forwarder cares
about: an ICMP "fragmentation needed" or ICMPv6 "packet too big" message
about a segment a host sent the client (see :class:`Forwarder`).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

#: Length of ``struct virtio_net_hdr`` (without the mergeable-buffers field).
VNET_HDR_LEN = 10
#: A header saying "complete frame, no offload": for frames we build ourselves.
VNET_HDR_NONE = bytes(VNET_HDR_LEN)
#: ``flags``: the checksum at csum_start + csum_offset is partial (pseudo-header only).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
#: ICMP destination unreachable / fragmentation needed; ICMPv6 packet too big.
ICMP_UNREACH, ICMP_FRAG_NEEDED = 3, 4
ICMPV6_PACKET_TOO_BIG = 2
ICMP_HLEN = 8

# IPv6 extension headers skipped on the way to TCP (hop-by-hop, routing,
# destination options); a fragment header (44) makes the packet unforwardable
# by flow, since only the first fragment carries the ports.
_IPV6_SKIP = frozenset((0, 43, 60))
_IPV6_FRAGMENT = 44

_H = struct.Struct("!H")


class Parsed(NamedTuple):
    """Where a TCP frame's headers are, relative to the frame's first byte."""

    packed: bytes
    flags: int
    l3: int
    l4: int
    version: int


class Malformed(NamedTuple):
    reason: str


class NotTcp(NamedTuple):
    pass


NOT_TCP = NotTcp()


def parse(frame: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> Parsed | Malformed | NotTcp:
    """Parses the frame in ``frame[start:end]`` (``start`` skips a vnet header)."""
    if end is None:
        end = len(frame)
    size = end - start
    if size < ETH_HLEN:
        return Malformed("short ethernet")
    ethertype = _H.unpack_from(frame, start + 12)[0]
    l3 = start + ETH_HLEN
    if ethertype == ETH_P_8021Q:
        if size < ETH_HLEN + 4:
            return Malformed("short vlan")
        ethertype = _H.unpack_from(frame, start + 16)[0]
        l3 += 4
    if ethertype == ETH_P_IP:
        if end - l3 < 20:
            return Malformed("short ipv4")
        vihl = frame[l3]
        if vihl >> 4 != 4:
            return Malformed("ipv4 version")
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or end - l3 < ihl:
            return Malformed("ipv4 header length")
        if frame[l3 + 9] != IPPROTO_TCP:
            return NOT_TCP
        total = _H.unpack_from(frame, l3 + 2)[0]
        # A GSO super-frame above 64 KiB (BIG TCP) carries 0 here.
        if total and (total < ihl or l3 + total > end):
            return Malformed("ipv4 total length")
        if _H.unpack_from(frame, l3 + 6)[0] & 0x3FFF:
            return Malformed("fragment")
        l4 = l3 + ihl
        addresses = bytes(frame[l3 + 12:l3 + 20])
        version = 4
    elif ethertype == ETH_P_IPV6:
        if end - l3 < 40:
            return Malformed("short ipv6")
        if frame[l3] >> 4 != 6:
            return Malformed("ipv6 version")
        payload = _H.unpack_from(frame, l3 + 4)[0]
        if payload and l3 + 40 + payload > end:
            return Malformed("ipv6 payload length")
        nxt = frame[l3 + 6]
        l4 = l3 + 40
        while nxt in _IPV6_SKIP:
            if end - l4 < 8:
                return Malformed("short ipv6 extension")
            nxt, length = frame[l4], (frame[l4 + 1] + 1) * 8
            l4 += length
        if nxt == _IPV6_FRAGMENT:
            return Malformed("fragment")
        if nxt != IPPROTO_TCP:
            return NOT_TCP
        addresses = bytes(frame[l3 + 8:l3 + 40])
        version = 6
    else:
        return NOT_TCP
    if end - l4 < 20:
        return Malformed("short tcp")
    offset = (frame[l4 + 12] >> 4) * 4
    if offset < 20 or end - l4 < offset:
        return Malformed("tcp data offset")
    return Parsed(addresses + bytes(frame[l4:l4 + 4]), frame[l4 + 13], l3, l4, version)


def too_big_key(frame: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> bytes | None:
    """The flow key of the TCP segment an ICMP "fragmentation needed" or
    ICMPv6 "packet too big" message in ``frame[start:end]`` quotes, in the
    client-to-VIP order of :attr:`Parsed.packed`; None for any other frame.

    The quoted segment went from the VIP to the client: a host's direct
    reply that met a narrower hop, whose router answered its source, the
    VIP, which the network routes to the unit.  Only the quoted headers'
    addresses and first four TCP bytes (the ports) are read; the host's
    kernel checks the rest.
    """
    if end is None:
        end = len(frame)
    if end - start < ETH_HLEN:
        return None
    ethertype = _H.unpack_from(frame, start + 12)[0]
    l3 = start + ETH_HLEN
    if ethertype == ETH_P_8021Q:
        if end - l3 < 4:
            return None
        ethertype = _H.unpack_from(frame, start + 16)[0]
        l3 += 4
    if ethertype == ETH_P_IP:
        if end - l3 < 20 or frame[l3] >> 4 != 4 or frame[l3 + 9] != IPPROTO_ICMP:
            return None
        if _H.unpack_from(frame, l3 + 6)[0] & 0x3FFF:
            return None  # a fragment
        icmp = l3 + (frame[l3] & 0x0F) * 4
        if end - icmp < ICMP_HLEN or (frame[icmp], frame[icmp + 1]) != (ICMP_UNREACH, ICMP_FRAG_NEEDED):
            return None
        inner = icmp + ICMP_HLEN
        if end - inner < 20 or frame[inner] >> 4 != 4 or frame[inner + 9] != IPPROTO_TCP:
            return None
        tcp = inner + (frame[inner] & 0x0F) * 4
        addresses, size = inner + 12, 4
    elif ethertype == ETH_P_IPV6:
        # A router's own message: no extension headers before ICMPv6.
        if end - l3 < 40 or frame[l3] >> 4 != 6 or frame[l3 + 6] != IPPROTO_ICMPV6:
            return None
        icmp = l3 + 40
        if end - icmp < ICMP_HLEN or frame[icmp] != ICMPV6_PACKET_TOO_BIG:
            return None
        inner = icmp + ICMP_HLEN
        if end - inner < 40 or frame[inner] >> 4 != 6 or frame[inner + 6] != IPPROTO_TCP:
            return None
        tcp = inner + 40
        addresses, size = inner + 8, 16
    else:
        return None
    if end - tcp < 4:
        return None
    source = bytes(frame[addresses:addresses + size])
    dest = bytes(frame[addresses + size:addresses + 2 * size])
    return dest + source + bytes(frame[tcp + 2:tcp + 4]) + bytes(frame[tcp:tcp + 2])


def set_macs(buf: bytearray, start: int, dst: bytes, src: bytes) -> None:
    """Rewrites the Ethernet addresses of the frame at ``buf[start:]`` in place."""
    buf[start:start + 6] = dst
    buf[start + 6:start + 12] = src


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return raw


# --- building frames (tests, the tunnel's decapsulator) ------------------------------


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``, folded, not inverted."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_checksum(src: bytes, dst: bytes, segment: bytes | bytearray | memoryview) -> int:
    """The checksum a TCP segment between ``src`` and ``dst`` must carry."""
    pseudo = src + dst + struct.pack("!BBH" if len(src) == 4 else "!IxxxB", *(
        (0, IPPROTO_TCP, len(segment)) if len(src) == 4 else (len(segment), IPPROTO_TCP)))
    return ~checksum(segment, checksum(pseudo)) & 0xFFFF


def build_tcp_frame(src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, sport: int, dport: int,
                    flags: int = 0x10, payload: bytes = b"", seq: int = 1, ack: int = 1) -> bytes:
    """A complete Ethernet/IP/TCP frame with correct checksums."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload)
    struct.pack_into("!H", tcp, 16, tcp_checksum(src_ip, dst_ip, tcp))
    if len(src_ip) == 4:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, IPPROTO_TCP, 0,
                                   src_ip, dst_ip))
        struct.pack_into("!H", ip, 10, ~checksum(ip) & 0xFFFF)
        ethertype = ETH_P_IP
    else:
        ip = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(tcp), IPPROTO_TCP, 64, src_ip, dst_ip))
        ethertype = ETH_P_IPV6
    return dst_mac + src_mac + _H.pack(ethertype) + bytes(ip) + bytes(tcp)
