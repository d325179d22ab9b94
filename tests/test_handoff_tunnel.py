"""The zero-overhead tunnel: encode/decode in place, checksums, the mapping's wire form, flow ids."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.forwarder import Forwarder
from nlbproxy.handoff.packets import (
    IPPROTO_TCP, VNET_HDR_LEN, VNET_HDR_NONE, Parsed, build_tcp_frame, checksum, mac_bytes, mac_text, parse,
    tcp_checksum,
)
from nlbproxy.handoff.routes import FlowKey, RouteTable, State, Via
from nlbproxy.handoff.tunnel import (
    Decapsulator, Encapsulator, FlowIds, Mapping, TunnelError, adjust,
)

MAC_A = mac_bytes("02:00:00:00:00:05")
MAC_B = mac_bytes("02:00:00:00:00:02")
KEY = FlowKey("10.0.0.5", 40000, "10.0.0.100", 80)
F, H = "10.0.1.2", "10.0.2.3"
NEEDS_CSUM = bytes([1, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def frame(key: FlowKey = KEY, payload: bytes = b"payload!") -> bytes:
    return build_tcp_frame(MAC_A, MAC_B, ip(key.client_ip), ip(key.vip), key.client_port, key.vport,
                           0x18, payload, seq=12345, ack=678)


def valid(data: bytes | bytearray, start: int = 0) -> bool:
    parsed = parse(data, start)
    assert isinstance(parsed, Parsed)
    width = 4 if parsed.version == 4 else 16
    src, dst = bytes(parsed.packed[:width]), bytes(parsed.packed[width:2 * width])
    ip_ok = parsed.version == 6 or checksum(data[parsed.l3:parsed.l4]) == 0xFFFF
    return ip_ok and tcp_checksum(src, dst, data[parsed.l4:]) == 0


def partial(data: bytes) -> bytearray:
    """``data`` as a NEEDS_CSUM frame: only the pseudo-header sum in the TCP checksum."""
    parsed = parse(data)
    assert isinstance(parsed, Parsed)
    width = 4 if parsed.version == 4 else 16
    seg_len = len(data) - parsed.l4
    pseudo = parsed.packed[:2 * width] + (struct.pack("!BBH", 0, IPPROTO_TCP, seg_len) if width == 4
                                          else struct.pack("!IxxxB", seg_len, IPPROTO_TCP))
    buf = bytearray(NEEDS_CSUM + data)
    struct.pack_into("!H", buf, VNET_HDR_LEN + parsed.l4 + 16, checksum(pseudo))
    return buf


def finish(buf: bytearray) -> bytes:
    """What the NIC (or the kernel) does with a NEEDS_CSUM frame: complete the checksum."""
    frame = bytearray(buf[VNET_HDR_LEN:])
    parsed = parse(frame)
    assert isinstance(parsed, Parsed)
    struct.pack_into("!H", frame, parsed.l4 + 16, ~checksum(frame[parsed.l4:]) & 0xFFFF)
    return bytes(frame)


class ChecksumTests(SynchronousTestCase):
    @given(st.binary(min_size=20, max_size=20), st.binary(min_size=4, max_size=4))
    def test_adjust_keeps_a_header_valid(self, header: bytes, new: bytes) -> None:
        # A real header is never all zeros (IPv4 starts 0x45; the TCP pseudo
        # header holds the protocol), the one case where ~0 and 0 differ.
        before = bytearray(b"\x45" + header[1:])
        before[10:12] = b"\x00\x00"
        struct.pack_into("!H", before, 10, ~checksum(before) & 0xFFFF)
        self.assertEqual(checksum(before), 0xFFFF)
        after = bytearray(before)
        after[12:16] = new
        struct.pack_into("!H", after, 10, adjust(struct.unpack_from("!H", before, 10)[0], bytes(before[12:16]), new))
        self.assertEqual(checksum(after), 0xFFFF)


class TunnelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.enc = Encapsulator()
        self.dec = Decapsulator()
        self.dec.add(Mapping(0x00020003, F, KEY))

    def encode(self, buf: bytearray, vnet: bool, host: str = H, flow_id: int = 0x00020003) -> None:
        parsed = parse(buf, VNET_HDR_LEN if vnet else 0)
        assert isinstance(parsed, Parsed)
        source = F if ":" not in host else "2001:db8:1::2"
        self.enc.encode(buf, parsed, Via(host, "02:00:00:00:00:09", "eth1", flow_id, source), vnet=vnet)

    def test_complete_checksum_round_trip(self) -> None:
        original = frame()
        buf = bytearray(original)
        self.encode(buf, vnet=False)
        self.assertEqual(len(buf), len(original))  # zero overhead
        parsed = parse(buf)
        assert isinstance(parsed, Parsed)
        self.assertEqual(parsed.packed, ip(F) + ip(H) + b"\x00\x02\x00\x03")
        self.assertTrue(valid(buf))
        self.assertEqual(self.dec.decode(buf, len(buf), vnet=False), KEY)
        self.assertEqual(bytes(buf), original)

    def test_partial_checksum_round_trip(self) -> None:
        original = frame()
        buf = partial(original)
        self.encode(buf, vnet=True)
        self.assertTrue(valid(finish(buf)))  # what the host receives checks out
        self.assertEqual(self.dec.decode(buf, len(buf)), KEY)
        self.assertEqual(finish(buf), original)

    def test_ipv6(self) -> None:
        key = FlowKey("2001:db8::5", 5555, "2001:db8::100", 443)
        self.dec.add(Mapping(0x00070008, "2001:db8:1::2", key))
        original = frame(key)
        buf = bytearray(original)
        self.encode(buf, vnet=False, host="2001:db8:2::3", flow_id=0x00070008)
        self.assertTrue(valid(buf))
        self.assertEqual(self.dec.decode(buf, len(buf), vnet=False), key)
        self.assertEqual(bytes(buf), original)

    def test_family_mismatch(self) -> None:
        buf = bytearray(frame())
        self.assertRaises(TunnelError, self.encode, buf, False, "2001:db8:2::3")

    def test_unknown_flow_left_alone(self) -> None:
        buf = bytearray(frame())
        self.encode(buf, vnet=False, flow_id=0x00090009)
        before = bytes(buf)
        self.assertIsNone(self.dec.decode(buf, len(buf), vnet=False))
        self.assertEqual(bytes(buf), before)
        self.assertEqual(self.dec.stats["unknown_flow"], 1)
        self.dec.remove(F, 0x00020003)
        self.assertEqual(len(self.dec), 0)

    @given(st.ip_addresses(v=4), st.integers(1, 65535), st.integers(1, 65535), st.integers(0x10001, 0xFFFFFFFF),
           st.binary(max_size=300), st.booleans())
    def test_round_trip_property(self, client: object, cport: int, vport: int, flow_id: int, payload: bytes,
                                 with_vnet: bool) -> None:
        key = FlowKey(str(client), cport, "10.9.9.9", vport)
        dec = Decapsulator()
        dec.add(Mapping(flow_id, F, key))
        original = frame(key, payload)
        buf = partial(original) if with_vnet else bytearray(original)
        self.encode(buf, with_vnet, flow_id=flow_id)
        self.assertTrue(valid(finish(buf) if with_vnet else buf))
        self.assertEqual(dec.decode(buf, len(buf), vnet=with_vnet), key)
        self.assertEqual(finish(buf) if with_vnet else bytes(buf), original)

    @given(st.ip_addresses(v=6), st.integers(1, 65535), st.integers(1, 65535), st.integers(0x10001, 0xFFFFFFFF),
           st.binary(max_size=300), st.booleans())
    def test_ipv6_round_trip_property(self, client: object, cport: int, vport: int, flow_id: int, payload: bytes,
                                      with_vnet: bool) -> None:
        key = FlowKey(str(client), cport, "fd4e:4c42::100", vport)
        dec = Decapsulator()
        dec.add(Mapping(flow_id, "2001:db8:1::2", key))
        original = frame(key, payload)
        buf = partial(original) if with_vnet else bytearray(original)
        self.encode(buf, with_vnet, host="fd4e:4c44::3", flow_id=flow_id)
        self.assertEqual(len(buf), len(original) + (VNET_HDR_LEN if with_vnet else 0))
        self.assertTrue(valid(finish(buf) if with_vnet else buf))
        self.assertEqual(dec.decode(buf, len(buf), vnet=with_vnet), key)
        self.assertEqual(finish(buf) if with_vnet else bytes(buf), original)

    def test_through_the_forwarder(self) -> None:
        table = RouteTable(Clock())
        fwd = Forwarder(table, {"eth1": MAC_B})
        table.fence(KEY, Via(H, "02:00:00:00:00:09", "eth1", flow_id=0x00020003, source=F))
        table.commit(KEY)
        original = frame()
        buf = bytearray(VNET_HDR_NONE + original)
        out = fwd.frame(buf, len(buf))
        assert out is not None
        sent = bytearray(out[1])
        self.assertEqual(sent[VNET_HDR_LEN:VNET_HDR_LEN + 12], mac_bytes("02:00:00:00:00:09") + MAC_B)
        self.assertTrue(valid(sent, VNET_HDR_LEN))
        self.assertEqual(self.dec.decode(sent, len(sent)), KEY)
        self.assertEqual(bytes(sent[VNET_HDR_LEN + 12:]), original[12:])

    def test_taken_over_flow_keeps_its_tunnel_source(self) -> None:
        # This unit's own source is not F: the route's (a failed peer's) is used.
        table = RouteTable(Clock())
        fwd = Forwarder(table, {"eth1": MAC_B})
        table.restore(KEY, Via(H, "02:00:00:00:00:09", "eth1", 0x00020003, F), State.COMMITTED)
        buf = bytearray(VNET_HDR_NONE + frame())
        out = fwd.frame(buf, len(buf))
        assert out is not None
        sent = bytearray(out[1])
        self.assertEqual(self.dec.decode(sent, len(sent)), KEY)

    def test_route_of_the_other_family_drops(self) -> None:
        table = RouteTable(Clock())
        fwd = Forwarder(table, {"eth1": MAC_B})
        table.fence(KEY, Via("2001:db8:2::3", mac_text(MAC_A), "eth1", 0x00020003, "2001:db8:1::2"))
        table.commit(KEY)
        buf = bytearray(VNET_HDR_NONE + frame())
        self.assertIsNone(fwd.frame(buf, len(buf)))
        self.assertEqual(fwd.metrics()["drops"], {"no_tunnel": 1})


class MappingTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for mapping in [Mapping(0x00020003, F, KEY),
                        Mapping(0xFFFFFFFF, "2001:db8:1::2", FlowKey("2001:db8::5", 1, "2001:db8::100", 2))]:
            blob = mapping.encode()
            self.assertEqual(Mapping.decode(blob), mapping)
        self.assertEqual(len(Mapping(1, F, KEY).encode()), 6 + 4 + 12)

    def test_malformed(self) -> None:
        good = Mapping(0x00020003, F, KEY).encode()
        for blob in [b"", good[:5], b"\x02" + good[1:], good[:1] + b"\x05" + good[2:], good + b"x", good[:-1],
                     good[:-4] + b"\x00\x00\x00\x50", good[:1] + b"\x06" + good[2:]]:
            with self.assertRaises(TunnelError, msg=blob):
                Mapping.decode(blob)
        self.assertRaises(TunnelError, Mapping, 1 << 32, F, KEY)
        self.assertRaises(TunnelError, Mapping, 1, "2001:db8::1", KEY)
        self.assertRaises(TunnelError, Mapping, 1, "nope", KEY)

    @given(st.binary(max_size=60))
    def test_garbage(self, blob: bytes) -> None:
        try:
            Mapping.decode(blob)
        except TunnelError:
            pass


class FlowIdTests(SynchronousTestCase):
    def test_no_zero_halves_no_reuse(self) -> None:
        ids = FlowIds(start=0x0001FFFE)
        got = [ids.allocate() for _ in range(4)]
        self.assertEqual(got, [0x0001FFFE, 0x0001FFFF, 0x00020001, 0x00020002])
        ids.release(0x0001FFFF)
        self.assertEqual(len(ids), 3)
        wrapped = FlowIds(start=0xFFFFFFFF)
        self.assertEqual([wrapped.allocate(), wrapped.allocate()], [0xFFFFFFFF, 0x00010001])
