"""The neighbour table through rtnetlink (nlbproxy.handoff.neighbours), on canned kernel answers.

The dumps below were captured from Linux 6.18 in a namespace holding, on
eth0 (ifindex 3): fd4e:4c42::11 REACHABLE, ::12 STALE, ::13 FAILED,
10.0.0.11 PERMANENT and 10.0.0.13 FAILED (plus the kernel's own ff02::16
NOARP entries), each dump requested with sequence number 7.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.neighbours import (
    NLM_F_DUMP, NLM_F_REQUEST, NUD_REACHABLE, NUD_STALE, RTM_GETNEIGH, Neighbour, NetlinkError, dump_request,
    find_mac, neighbour_mac, parse_dump,
)

SEQ = 7

DUMP6 = bytes.fromhex(
    "580000001c00020007000000644c00000a000000020000004000000514000100ff020000000000000000000000000016"
    "0a00020033330000001600000800040000000000140003008c1700001c0000001c00000000000000"
    "580000001c00020007000000644c00000a000000030000000400000114000100fd4e4c42000000000000000000000012"
    "0a00020002000000001200000800040000000000140003008a1700001a0000001a00000000000000"
    "580000001c00020007000000644c00000a000000030000004000000514000100ff020000000000000000000000000016"
    "0a00020033330000001600000800040000000000140003008b1700001b0000001b00000000000000"
    "4c0000001c00020007000000644c00000a000000030000002000000114000100fd4e4c42000000000000000000000013"
    "08000400000000001400030089170000190000001900000000000000"
    "580000001c00020007000000644c00000a000000030000000200000114000100fd4e4c42000000000000000000000011"
    "0a00020002000000001100000800040000000000140003001b0000001b0000001b00000001000000"
    "140000000300020007000000644c000000000000"
)

DUMP4 = bytes.fromhex(
    "4c0000001c00020007000000644c0000020000000300000080000001080001000a00000b0a00020002000000002100"
    "0008000400000000001400030018000000180000001800000000000000"
    "400000001c00020007000000644c0000020000000300000020000001080001000a00000d08000400000000001400"
    "030088170000180000001800000000000000"
    "140000000300020007000000644c000000000000"
)

#: Where the NLMSG_DONE message starts in each dump (its last 20 bytes).
DONE = 20


def renumber(dump: bytes, seq: int = 1) -> bytes:
    """``dump`` with every message's sequence number set to ``seq`` (a lookup's own dump is 1)."""
    data = bytearray(dump)
    offset = 0
    while offset < len(data):
        struct.pack_into("=I", data, offset + 8, seq)
        offset += struct.unpack_from("=I", data, offset)[0]
    return bytes(data)


class FakeNetlink:
    """A netlink socket that answers a dump with canned datagrams."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = list(datagrams)
        self.sent: list[tuple[bytes, Any]] = []
        self.closed = False

    def __enter__(self) -> FakeNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def sendto(self, data: bytes, address: Any) -> int:
        self.sent.append((data, address))
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.datagrams:
            raise TimeoutError("the fake kernel has nothing more to say")
        return self.datagrams.pop(0)


class ParseTests(SynchronousTestCase):
    def test_request_is_a_dump_of_one_family(self) -> None:
        data = dump_request(socket.AF_INET6, SEQ)
        length, kind, flags, seq, port = struct.unpack_from("=IHHII", data)
        self.assertEqual((length, len(data), kind, flags, seq, port),
                         (28, 28, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, SEQ, 0))
        self.assertEqual(data[16], socket.AF_INET6)
        self.assertEqual(data[17:], bytes(11))

    def test_ipv6_dump(self) -> None:
        found, done = parse_dump(DUMP6, SEQ)
        self.assertTrue(done)
        ours = [n for n in found if n.ip.startswith("fd4e")]
        self.assertEqual(ours, [
            Neighbour("fd4e:4c42::12", "02:00:00:00:00:12", NUD_STALE, 3),
            Neighbour("fd4e:4c42::13", None, 0x20, 3),
            Neighbour("fd4e:4c42::11", "02:00:00:00:00:11", NUD_REACHABLE, 3),
        ])
        self.assertEqual(find_mac(found, "fd4e:4c42::11"), "02:00:00:00:00:11")
        # A stale entry still names the host; a failed one names nothing.
        self.assertEqual(find_mac(found, "fd4e:4c42:0::12"), "02:00:00:00:00:12")
        self.assertIsNone(find_mac(found, "fd4e:4c42::13"))
        self.assertIsNone(find_mac(found, "fd4e:4c42::99"))

    def test_ipv4_dump(self) -> None:
        found, done = parse_dump(DUMP4, SEQ)
        self.assertTrue(done)
        self.assertEqual(find_mac(found, "10.0.0.11"), "02:00:00:00:00:21")
        self.assertIsNone(find_mac(found, "10.0.0.13"))

    def test_a_datagram_without_done_continues(self) -> None:
        found, done = parse_dump(DUMP6[:-DONE], SEQ)
        self.assertFalse(done)
        self.assertEqual(len(found), 5)

    def test_other_sequence_numbers_are_skipped(self) -> None:
        self.assertEqual(parse_dump(DUMP4, SEQ + 1), ([], False))

    def test_error_answer(self) -> None:
        error = struct.pack("=IHHII", 36, 2, 0, SEQ, 0) + struct.pack("=i", -1) + bytes(16)
        with self.assertRaises(NetlinkError) as caught:
            parse_dump(error, SEQ)
        self.assertEqual(caught.exception.errno, 1)

    def test_cut_short(self) -> None:
        self.assertRaises(NetlinkError, parse_dump, DUMP4[:30], SEQ)
        self.assertRaises(NetlinkError, parse_dump, DUMP4[:-DONE] + b"\x01\x02", SEQ)
        # An attribute that claims more than its message holds.
        broken = bytearray(DUMP4)
        struct.pack_into("=H", broken, 28, 200)
        self.assertRaises(NetlinkError, parse_dump, bytes(broken), SEQ)

    @given(st.binary(max_size=200))
    def test_garbage_is_an_error_or_nothing(self, data: bytes) -> None:
        try:
            found, _ = parse_dump(data, SEQ)
        except NetlinkError:
            return
        for entry in found:
            self.assertIsInstance(entry, Neighbour)


class LookupTests(SynchronousTestCase):
    def test_ipv6_address_from_a_dump(self) -> None:
        fake = FakeNetlink([renumber(DUMP6)])
        self.assertEqual(neighbour_mac("fd4e:4c42::11", lambda: fake), "02:00:00:00:00:11")  # type: ignore[arg-type,return-value]
        self.assertEqual(fake.sent, [(dump_request(socket.AF_INET6, 1), (0, 0))])
        self.assertTrue(fake.closed)

    def test_ipv4_address_from_a_dump(self) -> None:
        fake = FakeNetlink([renumber(DUMP4)])
        self.assertEqual(neighbour_mac("10.0.0.11", lambda: fake), "02:00:00:00:00:21")  # type: ignore[arg-type,return-value]
        self.assertEqual(fake.sent[0][0][16], socket.AF_INET)

    def test_dump_over_several_datagrams(self) -> None:
        data = renumber(DUMP6)
        # The wanted entry (the last) comes in the second datagram.
        split = len(data) - DONE - 0x58
        fake = FakeNetlink([data[:split], data[split:]])
        self.assertEqual(neighbour_mac("fd4e:4c42::11", lambda: fake), "02:00:00:00:00:11")  # type: ignore[arg-type,return-value]
        self.assertEqual(fake.datagrams, [])

    def test_no_entry(self) -> None:
        data = renumber(DUMP6)
        for ip in ("fd4e:4c42::13", "fd4e:4c42::99"):
            fake = FakeNetlink([data])
            self.assertRaises(LookupError, neighbour_mac, ip, lambda fake=fake: fake)
            self.assertTrue(fake.closed)

    def test_a_zone_names_the_interface(self) -> None:
        # A router's link-local address is the same on each of its links: a
        # zoned address (the config scopes a link-local tunnel_gateway to the
        # forwarder's way out) finds the neighbour on that interface only.
        data = renumber(DUMP6)
        found, _ = parse_dump(DUMP6, SEQ)
        self.assertEqual(find_mac(found, "fd4e:4c42::11", ifindex=3), "02:00:00:00:00:11")
        self.assertIsNone(find_mac(found, "fd4e:4c42::11", ifindex=4))
        names = {"eth0": 3, "eth1": 4}

        def index_of(name: str) -> int:
            if name not in names:
                raise OSError(19, "No such device")
            return names[name]

        fake = FakeNetlink([data])
        self.assertEqual(neighbour_mac("fd4e:4c42::11%eth0", lambda: fake, index_of),  # type: ignore[arg-type,return-value]
                         "02:00:00:00:00:11")
        for ip in ("fd4e:4c42::11%eth1", "fd4e:4c42::11%eth9"):
            fake = FakeNetlink([data])
            self.assertRaises(LookupError, neighbour_mac, ip, lambda fake=fake: fake, index_of)
