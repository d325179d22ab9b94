# -*- test-case-name: tests.test_handoff_neighbours -*-
"""The unit's neighbour table (ARP for IPv4, NDP for IPv6), read through rtnetlink.

The forwarder rewrites a handed-off flow's frames to the host's MAC address,
which the unit's kernel has already resolved: the unit talks to every host's
agent.  ``/proc/net/arp`` lists IPv4 neighbours only; the kernel's neighbour
table as a whole is read with an ``RTM_GETNEIGH`` dump on a ``NETLINK_ROUTE``
socket -- one request and a few ``recv`` calls in-process, for either
family, no command forked.

:func:`dump_request`, :func:`parse_dump` and :func:`find_mac` are sans-I/O
(the request's bytes, the kernel's answer as neighbours, the lookup);
:func:`neighbour_mac` is the thin I/O around them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nlbproxy import limits

__all__ = ["Neighbour", "NetlinkError", "dump_request", "find_mac", "neighbour_mac", "parse_dump"]

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/neighbour.h>
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NDA_DST = 1
NDA_LLADDR = 2
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
#: The states whose link-layer address is usable (the kernel's NUD_VALID, the
#: entries /proc/net/arp flags "complete"): a STALE entry's address is still
#: the host's, the kernel only means to confirm it on next use.
NUD_VALID = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
_RTATTR = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _align(n: int) -> int:
    return (n + 3) & ~3


class NetlinkError(OSError):
    """The kernel refused the dump, or answered something that is not one."""


@dataclass(frozen=True, slots=True)
class Neighbour:
    """One entry of the neighbour table; ``mac`` is None without an Ethernet address."""

    ip: str
    mac: str | None
    state: int
    ifindex: int

    @property
    def usable(self) -> bool:
        return self.mac is not None and bool(self.state & NUD_VALID)


def dump_request(family: int, seq: int) -> bytes:
    """An ``RTM_GETNEIGH`` dump request for ``family`` (``socket.AF_INET`` or ``AF_INET6``)."""
    body = _NDMSG.pack(family, 0, 0, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_dump(data: bytes, seq: int) -> tuple[list[Neighbour], bool]:
    """The neighbours in one datagram of the kernel's answer to dump ``seq``,
    and whether the dump is complete (``NLMSG_DONE`` seen).

    Messages of other sequence numbers are skipped; an ``NLMSG_ERROR`` or a
    message cut short raises :class:`NetlinkError`.
    """
    found: list[Neighbour] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, msg_seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkError(f"netlink message of length {length} at {offset} in {len(data)} bytes")
        body = offset + _NLMSGHDR.size
        end = offset + length
        offset += _align(length)
        if msg_seq != seq:
            continue
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            code = _ERRNO.unpack_from(data, body)[0] if end - body >= _ERRNO.size else 0
            raise NetlinkError(-code, f"neighbour dump refused: errno {-code}")
        if kind == RTM_NEWNEIGH:
            entry = _neighbour(data, body, end)
            if entry is not None:
                found.append(entry)
    if offset < len(data):
        raise NetlinkError(f"{len(data) - offset} trailing bytes after the last netlink message")
    return found, False


def _neighbour(data: bytes, start: int, end: int) -> Neighbour | None:
    if end - start < _NDMSG.size:
        raise NetlinkError("RTM_NEWNEIGH shorter than its ndmsg")
    family, _, _, ifindex, state, _, _ = _NDMSG.unpack_from(data, start)
    dst: bytes | None = None
    lladdr: bytes | None = None
    offset = start + _NDMSG.size
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            raise NetlinkError(f"attribute of length {length} overruns its RTM_NEWNEIGH")
        value = data[offset + _RTATTR.size:offset + length]
        if kind == NDA_DST:
            dst = value
        elif kind == NDA_LLADDR:
            lladdr = value
        offset += _align(length)
    if dst is None or (family, len(dst)) not in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
        return None  # a bridge's FDB-like entry, or a family the forwarder does not route
    mac = ":".join(f"{b:02x}" for b in lladdr) if lladdr is not None and len(lladdr) == 6 else None
    return Neighbour(str(ipaddress.ip_address(dst)), mac, state, ifindex)


def find_mac(neighbours: Iterable[Neighbour], ip: str, ifindex: int | None = None) -> str | None:
    """The MAC address of ``ip`` among ``neighbours`` (usable entries only),
    on interface ``ifindex`` when given: a link-local address (a router's
    ``fe80::1``) names one neighbour per link."""
    wanted = str(ipaddress.ip_address(ip.partition("%")[0]))
    for entry in neighbours:
        if entry.ip == wanted and entry.usable and ifindex in (None, entry.ifindex):
            assert entry.mac is not None
            return entry.mac
    return None


def _open_netlink() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    sock.settimeout(limits.NEIGHBOUR_DUMP_TIMEOUT)
    return sock


def neighbour_mac(ip: str, opener: Callable[[], socket.socket] = _open_netlink,
                  index_of: Callable[[str], int] = socket.if_nametoindex) -> str:
    """The MAC address the kernel of the caller's network namespace has
    resolved for ``ip`` (IPv4 or IPv6; with a zone, ``fe80::1%eth1``, the
    neighbour on that interface).

    LookupError when there is no usable entry (the handoff then falls back to
    proxying); NetlinkError (an OSError) when the table cannot be read.
    """
    family = _FAMILIES[ipaddress.ip_address(ip).version]
    zone = ip.partition("%")[2]
    try:
        ifindex = index_of(zone) if zone else None
    except OSError:
        raise LookupError(f"no interface {zone} for neighbour {ip}") from None
    with opener() as sock:
        # One dump per socket: the sequence number only tells our answer
        # from a stray one.
        seq = 1
        sock.sendto(dump_request(family, seq), (0, 0))
        read = 0
        while read < limits.NEIGHBOUR_DUMP_MAX_BYTES:
            data = sock.recv(limits.NEIGHBOUR_RECV_BUFFER)
            if not data:
                break
            read += len(data)
            neighbours, done = parse_dump(data, seq)
            mac = find_mac(neighbours, ip, ifindex)
            if mac is not None:
                # Closing the socket mid-dump is fine: the kernel drops the rest.
                return mac
            if done:
                break
    raise LookupError(f"no neighbour entry for {ip}")
