"""The forwarder's sans-I/O parts: frame parsing, the rewrite decision, and the reader with fakes."""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.forwarder import (
    PACKET_HOST, PACKET_OUTGOING, Forwarder, ForwarderPlumbing, KernelPath, PacketPort, kernel_path_commands,
    kernel_route_commands, socket_filter, to_tun_header,
)
from nlbproxy.handoff.packets import (
    ETH_HLEN, NOT_TCP, VNET_HDR_LEN, VNET_HDR_NONE, Malformed, Parsed, build_tcp_frame, checksum, mac_bytes, mac_text, parse,
    tcp_checksum, too_big_key,
)
from nlbproxy.handoff.routes import ACK, FIN, RST, SYN, FlowKey, RouteTable, State, Via, atom_key, from_atom, to_atom
from nlbproxy.handoff.tunnel import Decapsulator, FlowIds, TunnelError, TunnelPlan
from nlbproxy.limits import END_LINGER
from nlbproxy.session.dam import DAM

CLIENT_MAC = mac_bytes("02:00:00:00:00:05")
UNIT_MAC = mac_bytes("02:00:00:00:00:02")
HOST_MAC = mac_bytes("02:00:00:00:00:03")
OUT_MAC = mac_bytes("02:00:00:00:01:02")
CLIENT = ipaddress.ip_address("10.0.0.5").packed
VIP = ipaddress.ip_address("10.0.0.100").packed
KEY = FlowKey("10.0.0.5", 40000, "10.0.0.100", 80)
VNET = bytes([1, 0, 0x36, 0, 0, 0, 0x22, 0, 0x10, 0])  # NEEDS_CSUM, csum_start 34, offset 16


def frame(flags: int = ACK, payload: bytes = b"data", sport: int = 40000, dport: int = 80) -> bytes:
    return build_tcp_frame(CLIENT_MAC, UNIT_MAC, CLIENT, VIP, sport, dport, flags, payload)


CLIENT6 = ipaddress.ip_address("fd4e:4c42::5").packed
VIP6 = ipaddress.ip_address("fd4e:4c42::100").packed
KEY6 = FlowKey("fd4e:4c42::5", 40000, "fd4e:4c42::100", 80)


def frame6(flags: int = ACK, sport: int = 40000, src: bytes = CLIENT6, payload: bytes = b"data") -> bytes:
    return build_tcp_frame(CLIENT_MAC, UNIT_MAC, src, VIP6, sport, 80, flags, payload)


ROUTER_MAC = mac_bytes("02:00:00:00:00:fe")
ROUTER4 = ipaddress.ip_address("10.0.0.254").packed
ROUTER6 = ipaddress.ip_address("fd4e:4c42::fe").packed


def too_big(v6: bool = False, sport: int = 40000, kind: tuple[int, int] | None = None) -> bytes:
    """A router's ICMP "fragmentation needed" (ICMPv6 "packet too big") to
    the VIP about a host's reply to the client's port ``sport``, quoted
    whole as routers do (the checksum is left to the host's kernel)."""
    client, vip, router = (CLIENT6, VIP6, ROUTER6) if v6 else (CLIENT, VIP, ROUTER4)
    quoted = build_tcp_frame(HOST_MAC, CLIENT_MAC, vip, client, 80, sport, ACK, b"x" * 1400)[14:]
    icmp = bytes(kind or ((2, 0) if v6 else (3, 4))) + bytes(2) + struct.pack("!I", 1280 if v6 else 1200) + quoted
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 64, router, vip)
        ethertype = b"\x86\xdd"
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, router, vip)
        ethertype = b"\x08\x00"
    return UNIT_MAC + ROUTER_MAC + ethertype + ip + icmp


def icmp6_sum(packet: bytes) -> int:
    """The ICMPv6 message's sum over its pseudo-header: 0xFFFF when its checksum is right."""
    pseudo = packet[8:40] + struct.pack("!IxxxB", len(packet) - 40, 58)
    return checksum(packet[40:], checksum(pseudo))


def checksummed(frame_: bytes) -> bytes:
    """``frame_`` (a :func:`too_big`) with the checksums a router computes."""
    data = bytearray(frame_)
    if data[12:14] == b"\x86\xdd":
        struct.pack_into("!H", data, 14 + 42, ~icmp6_sum(bytes(data[14:])) & 0xFFFF)
    else:
        struct.pack_into("!H", data, 14 + 10, ~checksum(data[14:34]) & 0xFFFF)
        struct.pack_into("!H", data, 14 + 22, ~checksum(data[34:]) & 0xFFFF)
    return bytes(data)


class ParseTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        got = parse(frame(FIN | ACK))
        self.assertEqual(got, Parsed(KEY.packed, FIN | ACK, 14, 34, 4))

    def test_with_vnet_header_offset(self) -> None:
        data = VNET + frame()
        self.assertEqual(parse(data, VNET_HDR_LEN), Parsed(KEY.packed, ACK, 24, 44, 4))

    def test_ipv6_and_extension_header(self) -> None:
        src, dst = ipaddress.ip_address("2001:db8::5").packed, ipaddress.ip_address("2001:db8::100").packed
        data = build_tcp_frame(CLIENT_MAC, UNIT_MAC, src, dst, 1234, 443)
        key = FlowKey("2001:db8::5", 1234, "2001:db8::100", 443)
        self.assertEqual(parse(data), Parsed(key.packed, ACK, 14, 54, 6))
        # The same with a hop-by-hop options header (8 bytes) before TCP.
        ip = bytearray(data[14:54])
        ip[6] = 0
        struct.pack_into("!H", ip, 4, struct.unpack_from("!H", ip, 4)[0] + 8)
        hop = bytes([6, 0]) + bytes(6)
        self.assertEqual(parse(data[:14] + bytes(ip) + hop + data[54:]), Parsed(key.packed, ACK, 14, 62, 6))

    def test_vlan(self) -> None:
        data = frame()
        tagged = data[:12] + b"\x81\x00\x00\x07" + data[12:]
        self.assertEqual(parse(tagged), Parsed(KEY.packed, ACK, 18, 38, 4))

    def test_not_tcp(self) -> None:
        arp = HOST_MAC + UNIT_MAC + b"\x08\x06" + bytes(28)
        self.assertIs(parse(arp), NOT_TCP)
        udp = bytearray(frame())
        udp[14 + 9] = 17
        self.assertIs(parse(bytes(udp)), NOT_TCP)

    def test_malformed(self) -> None:
        good = frame()

        def patched(offset: int, value: bytes) -> bytes:
            return good[:offset] + value + good[offset + len(value):]

        cases = {
            "short ethernet": good[:10],
            "short ipv4": good[:20],
            "ipv4 version": patched(14, b"\x65"),
            "ipv4 header length": patched(14, b"\x44"),
            "ipv4 total length": patched(16, b"\xff\xff"),
            "fragment": patched(20, b"\x20\x00"),
            "short tcp": patched(16, struct.pack("!H", 26))[:40],
            "tcp data offset": patched(34 + 12, b"\x40"),
        }
        for reason, data in cases.items():
            self.assertEqual(parse(data), Malformed(reason), reason)

    def test_checksums_of_built_frames(self) -> None:
        data = frame(payload=b"hello")
        self.assertEqual(checksum(data[14:34]), 0xFFFF)
        self.assertEqual(tcp_checksum(CLIENT, VIP, data[34:]), 0)
        self.assertEqual(mac_text(mac_bytes("02:0A:00:00:00:01")), "02:0a:00:00:00:01")
        self.assertRaises(ValueError, mac_bytes, "02:00")

    @given(st.binary(max_size=200), st.integers(0, 20))
    def test_garbage_never_raises(self, data: bytes, start: int) -> None:
        self.assertIsInstance(parse(data, min(start, len(data))), (Parsed, Malformed, type(NOT_TCP)))

    @given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535),
           st.integers(0, 255), st.binary(max_size=64))
    def test_built_frames_parse(self, src: object, dst: object, sport: int, dport: int, flags: int,
                                payload: bytes) -> None:
        s, d = src.packed, dst.packed  # type: ignore[attr-defined]
        data = build_tcp_frame(CLIENT_MAC, UNIT_MAC, s, d, sport, dport, flags, payload)
        self.assertEqual(parse(data), Parsed(s + d + struct.pack("!HH", sport, dport), flags, 14, 34, 4))
        for cut in range(len(data) - len(payload)):
            self.assertNotIsInstance(parse(data[:cut]), Parsed)


def forwarder() -> tuple[Clock, RouteTable, Forwarder]:
    clock = Clock()
    table = RouteTable(clock)
    return clock, table, Forwarder(table, {"eth1": OUT_MAC})


class ForwarderTests(SynchronousTestCase):
    def test_rewrites_macs_only(self) -> None:
        _, table, fwd = forwarder()
        table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        table.commit(KEY)
        original = VNET + frame()
        buf = bytearray(original) + bytearray(100)  # a reused receive buffer is larger
        out = fwd.frame(buf, len(original))
        assert out is not None
        ifname, data = out
        self.assertEqual(ifname, "eth1")
        self.assertEqual(bytes(data), VNET + HOST_MAC + OUT_MAC + original[VNET_HDR_LEN + 12:])
        self.assertEqual(fwd.metrics()["packets"], 1)

    def test_fenced_frames_flushed_at_commit(self) -> None:
        _, table, fwd = forwarder()
        table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        first, second = VNET + frame(payload=b"one"), VNET + frame(payload=b"two")
        buf = bytearray(first)
        self.assertIsNone(fwd.frame(buf, len(buf)))
        buf[:] = second  # the receive buffer is reused
        self.assertIsNone(fwd.frame(buf, len(buf)))
        flushed = [bytes(d) for _, d in fwd.commit(KEY)]
        self.assertEqual(flushed, [VNET + HOST_MAC + OUT_MAC + f[VNET_HDR_LEN + 12:] for f in (first, second)])
        metrics = fwd.metrics()
        self.assertEqual((metrics["buffered_packets"], metrics["packets"], metrics["buffered_bytes"]), (2, 2, 0))

    def test_passes_what_is_not_ours(self) -> None:
        _, table, fwd = forwarder()
        data = bytearray(VNET + frame())
        self.assertIsNone(fwd.frame(data, len(data)))  # no route
        table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        table.commit(KEY)
        self.assertIsNone(fwd.frame(data, len(data), PACKET_OUTGOING))
        arp = bytearray(VNET + HOST_MAC + UNIT_MAC + b"\x08\x06" + bytes(28))
        self.assertIsNone(fwd.frame(arp, len(arp)))
        self.assertEqual(fwd.metrics()["passed"], 3)
        self.assertEqual(fwd.metrics()["packets"], 0)

    def test_too_big_about_a_committed_flow_goes_to_its_host(self) -> None:
        for v6, key in ((False, KEY), (True, KEY6)):
            _, table, fwd = forwarder()
            table.fence(key, Via("h1", mac_text(HOST_MAC), "eth1"))
            original = VNET + too_big(v6)
            data = bytearray(original)
            self.assertIsNone(fwd.frame(data, len(data)))  # fenced: no socket on the host yet
            table.commit(key)
            data = bytearray(original)
            out = fwd.frame(data, len(data))
            assert out is not None
            self.assertEqual((out[0], bytes(out[1])), ("eth1", VNET + HOST_MAC + OUT_MAC + original[VNET_HDR_LEN + 12:]))
            self.assertEqual((fwd.metrics()["too_big"], fwd.metrics()["passed"]), (1, 1))
            # Another flow's, or another ICMP message: the unit's own.
            for other in (too_big(v6, sport=40001), too_big(v6, kind=(1, 4) if v6 else (3, 1))):
                data = bytearray(VNET + other)
                self.assertIsNone(fwd.frame(data, len(data)))
            self.assertEqual((fwd.metrics()["too_big"], fwd.metrics()["passed"]), (1, 3))

    def test_too_big_about_a_tunnelled_flow_goes_to_the_hosts_address(self) -> None:
        # The tunnel carries TCP only: the message keeps its ICMP form and goes
        # from the tunnel source to the host's own address, checksums still right.
        for v6, key, host, source in ((False, KEY, "10.2.0.7", "10.0.0.2"),
                                      (True, KEY6, "fd4e:4c43::7", "fd4e:4c42::2")):
            _, table, fwd = forwarder()
            table.restore(key, Via(host, mac_text(ROUTER_MAC), "eth1", 0x00020003, source), State.COMMITTED)
            data = bytearray(VNET_HDR_NONE + checksummed(too_big(v6)))  # a router's message: checksums complete
            out = fwd.frame(data, len(data))
            assert out is not None
            sent = bytes(out[1])[VNET_HDR_LEN:]
            self.assertEqual(sent[:12], ROUTER_MAC + OUT_MAC)
            addresses = ipaddress.ip_address(source).packed + ipaddress.ip_address(host).packed
            if v6:
                self.assertEqual(sent[14 + 8:14 + 40], addresses)
                self.assertEqual(icmp6_sum(sent[14:]), 0xFFFF)
            else:
                self.assertEqual(sent[14 + 12:14 + 20], addresses)
                self.assertEqual(checksum(sent[14:34]), 0xFFFF)
            icmp = 14 + (40 if v6 else 20)  # the message itself is untouched, its checksum aside
            self.assertEqual(sent[icmp + 4:], checksummed(too_big(v6))[icmp + 4:])
            self.assertEqual((fwd.metrics()["too_big"], fwd.tunnel.stats["too_big"]), (1, 1))

    def test_malformed_counted(self) -> None:
        _, _, fwd = forwarder()
        data = bytearray(VNET + frame()[:40])
        self.assertIsNone(fwd.frame(data, len(data)))
        self.assertEqual((fwd.stats["malformed"], fwd.stats["malformed_ipv4_total_length"]), (1, 1))

    def test_unknown_out_interface_dropped(self) -> None:
        _, table, fwd = forwarder()
        table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth7"))
        table.commit(KEY)
        data = bytearray(VNET + frame())
        self.assertIsNone(fwd.frame(data, len(data)))
        self.assertEqual(fwd.metrics()["drops"], {"no_interface": 1})


class TooBigTests(SynchronousTestCase):
    def test_keys(self) -> None:
        self.assertEqual(too_big_key(too_big()), KEY.packed)
        self.assertEqual(too_big_key(too_big(v6=True)), KEY6.packed)
        self.assertEqual(too_big_key(VNET + too_big(v6=True), VNET_HDR_LEN), KEY6.packed)

    def test_other_frames(self) -> None:
        for data in (frame(), frame6(), too_big(kind=(3, 1)), too_big(kind=(11, 0)), too_big(True, kind=(1, 0)),
                     too_big(True, kind=(128, 0)), HOST_MAC + UNIT_MAC + b"\x08\x06" + bytes(28)):
            self.assertIsNone(too_big_key(data))

    def test_short_quotes(self) -> None:
        for v6, header in ((False, 14 + 20 + 8 + 20), (True, 14 + 40 + 8 + 40)):
            data = too_big(v6)
            self.assertIsNotNone(too_big_key(data[:header + 4]))  # the ports are all it needs
            for cut in range(header + 4):
                self.assertIsNone(too_big_key(data[:cut]))

    @given(st.binary(max_size=120))
    def test_never_raises(self, data: bytes) -> None:
        for prefix in (too_big()[:34], too_big(True)[:54], b""):
            key = too_big_key(prefix + data)
            self.assertTrue(key is None or len(key) in (12, 36))


class TunHeaderTests(SynchronousTestCase):
    def test_offsets_lose_the_ethernet_header(self) -> None:
        vnet = struct.pack("=BBHHHH", 1, 1, 66, 1448, 34, 16)
        self.assertEqual(to_tun_header(vnet), struct.pack("=BBHHHH", 1, 1, 52, 1448, 20, 16))
        self.assertEqual(to_tun_header(bytes(10)), bytes(10))


class FakeSocket:
    def __init__(self, ifname: str, receive: bool) -> None:
        self.ifname = ifname
        self.receive = receive
        self.inbox: list[tuple[bytes, int]] = []
        self.sent: list[bytes] = []
        self.fail = False
        self.closed = False
        self.kernel_drops = 0

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        drops, self.kernel_drops = self.kernel_drops, 0  # PACKET_STATISTICS resets on read
        return struct.pack("II", 100, drops)

    def fileno(self) -> int:
        return 99

    def recvfrom_into(self, buf: bytearray) -> tuple[int, tuple[str, int, int, int, bytes]]:
        if not self.inbox:
            raise BlockingIOError()
        data, pkttype = self.inbox.pop(0)
        buf[:len(data)] = data
        return len(data), (self.ifname, 0x800, pkttype, 1, CLIENT_MAC)

    def send(self, data: memoryview) -> int:
        if self.fail:
            raise OSError(105, "No buffer space available")
        self.sent.append(bytes(data))
        return len(data)

    def close(self) -> None:
        self.closed = True


class FakeSockets(dict[str, FakeSocket]):
    """The fake AF_PACKET sockets a PacketPort opened, by "rx:eth0" / "tx:eth1"."""

    def open(self, ifname: str, receive: bool) -> socket.socket:
        sock = self[("rx:" if receive else "tx:") + ifname] = FakeSocket(ifname, receive)
        return sock  # type: ignore[return-value]


class PacketPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.table = RouteTable(self.reactor, closing_timeout=10)
        self.fwd = Forwarder(self.table, {"eth1": OUT_MAC})
        self.sockets = FakeSockets()
        self.deleted: list[str] = []

        self.port = PacketPort(self.reactor, self.fwd, "eth0", max_batch=3, opener=self.sockets.open,
                               on_deleted=lambda gone: self.deleted.extend(d.reason for d in gone))
        self.port.start()
        self.addCleanup(self.port.stop)

    def test_reads_in_batches_and_forwards(self) -> None:
        self.assertIn(self.port, self.reactor.getReaders())
        self.table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        rx, tx = self.sockets["rx:eth0"], self.sockets["tx:eth1"]
        rx.inbox = [(VNET + frame(payload=bytes([i])), PACKET_HOST) for i in range(5)]
        self.port.doRead()  # fenced: buffered
        self.assertEqual((len(rx.inbox), tx.sent), (2, []))
        self.assertEqual(self.port.commit(KEY), 3)
        self.port.doRead()
        self.assertEqual([s[-1] for s in tx.sent], [0, 1, 2, 3, 4])
        self.assertTrue(all(s[VNET_HDR_LEN:VNET_HDR_LEN + 12] == HOST_MAC + OUT_MAC for s in tx.sent))

    def test_send_error_counted(self) -> None:
        self.table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        self.table.commit(KEY)
        self.sockets["tx:eth1"].fail = True
        self.sockets["rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        self.port.doRead()
        self.assertEqual(self.fwd.metrics()["drops"], {"send_error": 1})

    def test_backstop_timeout_reported(self) -> None:
        self.table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        self.port.commit(KEY)
        self.sockets["rx:eth0"].inbox = [(VNET + frame(FIN | ACK), PACKET_HOST)]
        self.port.doRead()
        self.reactor.advance(10)
        self.assertEqual(self.deleted, ["closing_timeout"])
        self.assertEqual(len(self.table), 0)

    def test_reused_tuple_reported_after_the_batch(self) -> None:
        self.table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        self.port.commit(KEY)
        self.sockets["rx:eth0"].inbox = [(VNET + frame(FIN | ACK), PACKET_HOST), (VNET + frame(SYN), PACKET_HOST)]
        self.port.doRead()
        self.assertEqual(self.deleted, ["reused"])
        self.assertEqual(self.table.removed, [])

    def test_kernel_drops_counted_each_tick(self) -> None:
        self.sockets["rx:eth0"].kernel_drops = 7
        self.reactor.advance(1)
        self.reactor.advance(1)
        self.assertEqual(self.fwd.metrics()["drops"], {"rx_overflow": 7})

    def test_explicit_delete_and_stop(self) -> None:
        self.table.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth1"))
        self.port.delete(KEY)
        self.port.delete(KEY)
        self.assertEqual(self.deleted, ["ended"])
        self.port.stop()
        self.assertNotIn(self.port, self.reactor.getReaders())
        self.assertTrue(all(s.closed for s in self.sockets.values()))


class Flow:
    """What the unit side hands the plumbing (its own Flow has these fields)."""

    def __init__(self, client: tuple[str, int], vip: tuple[str, int]) -> None:
        self.client, self.vip = client, vip


class Host:
    host = "10.0.1.3"


class RecordingFence:
    def __init__(self) -> None:
        self.keys: set[FlowKey] = set()
        self.fail = False

    def add(self, *keys: FlowKey) -> None:
        if self.fail:
            raise OSError("nftables refused")
        self.keys.update(keys)

    def remove(self, *keys: FlowKey) -> None:
        self.keys.difference_update(keys)


class PlumbingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.table = RouteTable(self.reactor, closing_timeout=10)
        self.fwd = Forwarder(self.table, {"eth1": OUT_MAC})
        self.sockets = FakeSockets()

        self.port = PacketPort(self.reactor, self.fwd, "eth0", opener=self.sockets.open)
        self.port.start()
        self.addCleanup(self.port.stop)
        self.fence = RecordingFence()
        self.dam = DAM("unit-a", self.reactor, lambda peer, call: None, replication=0)
        self.plumbing = ForwarderPlumbing(self.port, self.fence, "eth1",
                                          resolve_mac=lambda ip: mac_text(HOST_MAC), dam=self.dam)
        self.flow = Flow(("10.0.0.5", 40000), ("10.0.0.100", 80))

    def test_fence_commit_ended(self) -> None:
        self.plumbing.fence(self.flow, Host())
        self.assertEqual(self.fence.keys, {KEY})
        self.assertEqual(from_atom(atom_key(KEY), self.dam.get(atom_key(KEY)).data)[2], State.FENCED)  # type: ignore[union-attr]
        self.sockets["rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        self.port.doRead()
        self.plumbing.commit(self.flow)
        self.assertEqual(len(self.sockets["tx:eth1"].sent), 1)
        self.assertEqual(from_atom(atom_key(KEY), self.dam.get(atom_key(KEY)).data)[2], State.COMMITTED)  # type: ignore[union-attr]
        self.plumbing.ended(self.flow)
        # The route lingers: the client's last ACK of the host's FIN still goes to the host.
        self.assertEqual((self.fence.keys, self.table.get(KEY).state), ({KEY}, State.CLOSING))  # type: ignore[union-attr]
        self.sockets["rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        self.port.doRead()
        self.assertEqual(len(self.sockets["tx:eth1"].sent), 2)
        self.assertIsNone(self.dam.get(atom_key(KEY)))  # no other unit is to take it over
        self.reactor.advance(END_LINGER + 1)
        self.assertEqual((self.fence.keys, len(self.table), self.table.stats["deleted_ended"]), (set(), 0, 1))
        self.assertEqual(self.dam.stats["deleted"], 1)

    def test_end_of_a_route_never_committed_deletes_it_at_once(self) -> None:
        self.plumbing.fence(self.flow, Host())
        self.plumbing.ended(self.flow)
        self.assertEqual((self.fence.keys, len(self.table)), (set(), 0))

    def test_unfence_after_failed_handoff(self) -> None:
        self.plumbing.fence(self.flow, "10.0.1.3")
        self.plumbing.unfence(self.flow)
        self.assertEqual((self.fence.keys, len(self.table), self.table.stats["deleted_aborted"]), (set(), 0, 1))

    def test_fence_failure_leaves_no_route(self) -> None:
        self.fence.fail = True
        self.assertRaises(OSError, self.plumbing.fence, self.flow, Host())
        self.assertEqual(len(self.table), 0)

    def test_host_mac_reused_for_its_ttl(self) -> None:
        looked_up: list[str] = []
        macs = iter(["02:00:00:00:00:03", "02:00:00:00:00:09"])

        def resolve(ip: str) -> str:
            looked_up.append(ip)
            return next(macs)

        self.plumbing.resolve_mac = resolve
        self.plumbing.fence(self.flow, "10.0.1.3")
        self.plumbing.unfence(self.flow)
        self.plumbing.fence(self.flow, "10.0.1.3")
        self.assertEqual((looked_up, self.table.get(KEY).via.host_mac), (["10.0.1.3"], "02:00:00:00:00:03"))  # type: ignore[union-attr]
        self.plumbing.unfence(self.flow)
        self.reactor.advance(self.plumbing.mac_ttl)
        self.plumbing.fence(self.flow, "10.0.1.3")  # the host's MAC changed: read again
        self.assertEqual((looked_up, self.table.get(KEY).via.host_mac), (["10.0.1.3"] * 2, "02:00:00:00:00:09"))  # type: ignore[union-attr]

    def test_unknown_neighbour(self) -> None:
        def unknown(ip: str) -> str:
            raise LookupError(f"no neighbour entry for {ip}")

        self.plumbing.resolve_mac = unknown
        self.assertRaises(LookupError, self.plumbing.fence, Flow(("10.0.0.5", 1), ("10.0.0.100", 80)),
                          "10.0.1.9")
        self.assertEqual(len(self.table), 0)

    def test_replumb_from_atoms(self) -> None:
        source = RouteTable(Clock())
        source.fence(KEY, Via("10.0.1.3", mac_text(HOST_MAC), "eth9"))
        source.commit(KEY)
        good = to_atom(source.get(KEY))[:2]  # type: ignore[arg-type]
        other = FlowKey("10.0.0.6", 1, "10.0.0.100", 80)
        atoms = [good, ("cookie", "app/10.0.1.3:80"), ("route 10.0.0.7:1 10.0.0.100:80", "9 c x")]
        self.assertEqual(self.plumbing.replumb(atoms), (1, 1))
        route = self.table.get(KEY)
        assert route is not None
        self.assertEqual((route.state, route.via.ifname), (State.COMMITTED, "eth1"))
        self.assertEqual(self.fence.keys, {KEY})
        self.fence.fail = True
        source.fence(other, Via("10.0.1.3", mac_text(HOST_MAC), "eth9"))
        self.assertEqual(self.plumbing.replumb([to_atom(source.get(other))[:2]]), (0, 1))  # type: ignore[arg-type]
        self.assertIsNone(self.table.get(other))

    def test_timeout_lifts_fence_and_atom(self) -> None:
        self.plumbing.fence(self.flow, Host())
        self.reactor.advance(self.table.fence_timeout + 1)
        self.assertEqual((self.fence.keys, len(self.table)), (set(), 0))
        self.assertIsNone(self.dam.get(atom_key(KEY)))


def run_bpf(program: list[tuple[int, int, int, int]], packet: bytes) -> int:
    """A classic BPF interpreter for the instructions socket_filter emits; out of
    bounds loads reject the packet, as in the kernel."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        try:
            if code == 0x28:
                a = struct.unpack_from("!H", packet, k)[0]
            elif code == 0x30:
                a = packet[k]
            elif code == 0x20:
                a = struct.unpack_from("!I", packet, k)[0]
            elif code == 0xB1:
                x = (packet[k] & 0x0F) * 4
            elif code == 0x50:
                a = packet[x + k]
            elif code == 0x48:
                a = struct.unpack_from("!H", packet, x + k)[0]
            elif code == 0x15:
                pc += jt if a == k else jf
            elif code == 0x45:
                pc += jt if a & k else jf
            elif code == 0x06:
                return k
            else:
                raise AssertionError(f"unexpected opcode {code:#x}")
        except (IndexError, struct.error):
            return 0


def wanted(packet: bytes, fenced: list[FlowKey]) -> bool:
    """What the filter must keep, said plainly."""
    parsed = parse(packet)
    if not isinstance(parsed, Parsed):
        return False
    if parsed.version == 6 and parsed.l4 != ETH_HLEN + 40:
        return True  # extension headers: Python walks them
    if parsed.flags & 0x07:
        return True
    size = 4 if parsed.version == 4 else 16
    return any(parsed.packed[:size] == ipaddress.ip_address(k.client_ip).packed
               and parsed.packed[2 * size:2 * size + 2] == struct.pack("!H", k.client_port) for k in fenced)


class SocketFilterTests(SynchronousTestCase):
    fenced = [KEY, FlowKey("10.0.0.6", 1, "10.0.0.100", 80), KEY6, FlowKey("fd4e:4c42::6", 1, "fd4e:4c42::100", 80)]

    def test_examples(self) -> None:
        program = socket_filter(self.fenced)
        self.assertTrue(run_bpf(program, frame()))                      # fenced flow
        self.assertFalse(run_bpf(program, frame(sport=40001)))          # another flow's ACK
        self.assertTrue(run_bpf(program, frame(FIN | ACK, sport=40001)))  # its FIN
        self.assertFalse(run_bpf(program, HOST_MAC + UNIT_MAC + b"\x08\x06" + bytes(28)))  # ARP
        self.assertFalse(run_bpf(socket_filter([]), frame()))

    def test_ipv6_examples(self) -> None:
        program = socket_filter(self.fenced)
        self.assertTrue(run_bpf(program, frame6()))                       # fenced flow
        self.assertFalse(run_bpf(program, frame6(sport=40001)))           # another flow's ACK
        self.assertTrue(run_bpf(program, frame6(RST, sport=40001)))       # its RST
        self.assertFalse(run_bpf(program, frame6(src=ipaddress.ip_address("fd4e:4c42::7").packed)))
        self.assertFalse(run_bpf(socket_filter([KEY]), frame6()))         # only IPv4 flows fenced
        # A hop-by-hop header before TCP: kept, Python finds the ports.
        data = bytearray(frame6())
        tcp = bytes(data[ETH_HLEN + 40:])
        data[ETH_HLEN + 6] = 0
        data[ETH_HLEN + 4:ETH_HLEN + 6] = struct.pack("!H", len(tcp) + 8)
        data[ETH_HLEN + 40:] = bytes([6, 0]) + bytes(6) + tcp
        self.assertTrue(wanted(bytes(data), []))
        self.assertTrue(run_bpf(socket_filter([]), bytes(data)))
        # ICMPv6 (neighbour discovery): the kernel's.
        icmp = bytearray(frame6())
        icmp[ETH_HLEN + 6] = 58
        self.assertFalse(run_bpf(program, bytes(icmp)))

    def test_too_big_messages_kept(self) -> None:
        for fenced in ([], self.fenced):
            program = socket_filter(fenced)
            self.assertTrue(run_bpf(program, too_big()))
            self.assertTrue(run_bpf(program, too_big(v6=True)))
            self.assertFalse(run_bpf(program, too_big(kind=(3, 1))))
            self.assertFalse(run_bpf(program, too_big(v6=True, kind=(1, 0))))

    def test_too_many_flows_keeps_all_tcp(self) -> None:
        many = [FlowKey("10.0.0.5", p, "10.0.0.100", 80) for p in range(1, 100)]
        program = socket_filter(many, max_flows=10)
        self.assertTrue(run_bpf(program, frame(sport=9999)))
        self.assertTrue(run_bpf(program, frame6(sport=9999)))
        # The longest filters' jumps still fit in a byte, whatever the mix of families.
        v6 = [FlowKey(f"fd4e:4c42::{p:x}", p, "fd4e:4c42::100", 80) for p in range(1, 100)]
        for keys in (many[:48], v6[:48], many[:24] + v6[:24]):
            program = socket_filter(keys)
            self.assertEqual(len(program), 27 + 4 * 48)
            for key in (keys[0], keys[-1]):
                src, sport = ipaddress.ip_address(key.client_ip).packed, key.client_port
                data = frame(sport=sport) if len(src) == 4 else frame6(src=src, sport=sport)
                self.assertTrue(run_bpf(program, data), key)

    @given(st.sampled_from([CLIENT, ipaddress.ip_address("10.0.0.6").packed, ipaddress.ip_address("10.0.0.7").packed]),
           st.sampled_from([40000, 1, 2]), st.integers(0, 255), st.binary(max_size=20), st.integers(0, 80))
    def test_matches_the_plain_rule(self, src: bytes, sport: int, flags: int, payload: bytes, cut: int) -> None:
        data = build_tcp_frame(CLIENT_MAC, UNIT_MAC, src, VIP, sport, 80, flags, payload)
        data = data[:len(data) - cut] if cut < len(data) - 54 else data
        kept = bool(run_bpf(socket_filter(self.fenced), data))
        if isinstance(parse(data), Parsed):
            self.assertEqual(kept, wanted(data, self.fenced))
        else:
            # A frame the parser refuses may pass the coarser filter; Python then counts it.
            self.assertFalse(wanted(data, self.fenced))

    @given(st.sampled_from([CLIENT6, ipaddress.ip_address("fd4e:4c42::6").packed,
                            ipaddress.ip_address("fd4e:4c42::7").packed]),
           st.sampled_from([40000, 1, 2]), st.integers(0, 255), st.binary(max_size=20), st.integers(0, 80))
    def test_matches_the_plain_rule_over_ipv6(self, src: bytes, sport: int, flags: int, payload: bytes,
                                              cut: int) -> None:
        data = build_tcp_frame(CLIENT_MAC, UNIT_MAC, src, VIP6, sport, 80, flags, payload)
        data = data[:len(data) - cut] if cut < len(data) - 74 else data
        kept = bool(run_bpf(socket_filter(self.fenced), data))
        if isinstance(parse(data), Parsed):
            self.assertEqual(kept, wanted(data, self.fenced))
        else:
            self.assertFalse(wanted(data, self.fenced))


class KernelPathTests(SynchronousTestCase):
    def test_commands(self) -> None:
        text = kernel_path_commands("fast", "eth0", "eth1", "02:00:00:00:01:02")
        self.assertIn('type filter hook ingress device "eth0" priority -500', text)
        self.assertIn('ether saddr set 02:00:00:00:01:02 fwd to "eth1"', text)
        self.assertEqual(kernel_route_commands("add", "fast", [(KEY, "02:00:00:00:00:03")]),
                         "add element netdev fast routes4 { 10.0.0.5 . 40000 . 10.0.0.100 . 80 : 02:00:00:00:00:03 }\n")
        self.assertRaises(ValueError, kernel_path_commands, "fast", 'eth0"; flush ruleset', "eth1", "02:00:00:00:01:02")
        self.assertRaises(ValueError, kernel_path_commands, "fast", "eth0", "eth1", "nope")

    def test_port_offloads_at_commit_and_removes_at_end(self) -> None:
        reactor = MemoryReactorClock()
        table = RouteTable(reactor)
        fwd = Forwarder(table, {"eth1": OUT_MAC})
        commands: list[str] = []
        backend = type("B", (), {"run": lambda self, text: commands.append(text)})()
        kernel = KernelPath(backend, "eth0", "eth1", mac_text(OUT_MAC))
        kernel.setup()
        filters: list[list[tuple[int, int, int, int]]] = []
        sockets = FakeSockets()

        port = PacketPort(reactor, fwd, "eth0", opener=sockets.open, kernel=kernel,
                          attach=lambda sock, program: filters.append(program))
        port.start()
        self.addCleanup(port.stop)
        plumbing = ForwarderPlumbing(port, RecordingFence(), "eth1", resolve_mac=lambda ip: mac_text(HOST_MAC))
        flow = Flow(("10.0.0.5", 40000), ("10.0.0.100", 80))
        plumbing.fence(flow, Host())
        self.assertTrue(run_bpf(filters[-1], frame()))  # let in before the fence
        sockets["rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        port.doRead()
        plumbing.commit(flow)
        # Committed, not yet offloaded: Python forwards, and the filter still lets the flow in.
        self.assertEqual(len(sockets["tx:eth1"].sent), 1)  # the buffered frame, by Python
        self.assertFalse(any(c.startswith("add element") for c in commands))
        self.assertTrue(run_bpf(filters[-1], frame()))
        reactor.advance(0)  # the next turn: the fast path takes it
        self.assertIn("add element netdev nlbproxy_fast routes4 { 10.0.0.5 . 40000 . 10.0.0.100 . 80 : "
                      "02:00:00:00:00:03 }\n", commands)
        self.assertFalse(run_bpf(filters[-1], frame()))  # now the kernel's
        self.assertTrue(table.get(KEY).offloaded)  # type: ignore[union-attr]
        # A frame the filter let through anyway (a FIN) is watched, not sent twice.
        sockets["rx:eth0"].inbox = [(VNET + frame(FIN | ACK), PACKET_HOST)]
        port.doRead()
        self.assertEqual(len(sockets["tx:eth1"].sent), 1)
        self.assertEqual(table.get(KEY).state, State.CLOSING)  # type: ignore[union-attr]
        plumbing.ended(flow)
        self.assertEqual(len(kernel), 1)  # lingering
        reactor.advance(END_LINGER + 1)
        self.assertTrue(commands[-1].startswith("delete element netdev nlbproxy_fast routes4"))
        self.assertEqual(len(kernel), 0)

    def test_offload_skips_a_route_that_ended_first(self) -> None:
        reactor = MemoryReactorClock()
        table = RouteTable(reactor)
        commands: list[str] = []
        backend = type("B", (), {"run": lambda self, text: commands.append(text)})()
        kernel = KernelPath(backend, "eth0", "eth1", mac_text(OUT_MAC))
        kernel.setup()
        sockets = FakeSockets()

        port = PacketPort(reactor, Forwarder(table, {"eth1": OUT_MAC}), "eth0", opener=sockets.open, kernel=kernel,
                          attach=lambda sock, program: None)
        port.start()
        self.addCleanup(port.stop)
        plumbing = ForwarderPlumbing(port, RecordingFence(), "eth1", resolve_mac=lambda ip: mac_text(HOST_MAC))
        flow = Flow(("10.0.0.5", 40000), ("10.0.0.100", 80))
        plumbing.fence(flow, Host())
        plumbing.commit(flow)
        plumbing.ended(flow)
        reactor.advance(0)
        self.assertFalse(any(c.startswith(("add element", "delete element")) for c in commands))
        self.assertEqual(len(kernel), 0)


class TunnelPlumbingTests(SynchronousTestCase):
    """A host in the unit's ``tunnel_networks``: its flows get a flow id and go
    to the router's MAC, and the mapping for its agent comes out of fence."""

    ROUTER_MAC = "02:00:00:00:00:01"

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.table = RouteTable(self.reactor, closing_timeout=10)
        self.fwd = Forwarder(self.table, {"eth1": OUT_MAC})
        self.sockets = FakeSockets()

        self.port = PacketPort(self.reactor, self.fwd, "eth0", opener=self.sockets.open)
        self.port.start()
        self.addCleanup(self.port.stop)
        self.fence = RecordingFence()
        self.macs = {"10.0.0.1": self.ROUTER_MAC, "10.0.1.3": mac_text(HOST_MAC)}
        self.plan = TunnelPlan(["10.2.0.0/16"], {4: "10.0.0.2"}, {4: "10.0.0.1"})
        self.plumbing = ForwarderPlumbing(self.port, self.fence, "eth1", resolve_mac=self.macs.__getitem__,
                                          tunnel=self.plan)
        self.flow = Flow(("10.0.0.5", 40000), ("10.0.0.100", 80))

    def test_tunnelled_host(self) -> None:
        mapping = self.plumbing.fence(self.flow, "10.2.0.7")
        assert mapping is not None
        self.assertEqual((mapping.forwarder_ip, mapping.key), ("10.0.0.2", KEY))
        route = self.table.get(KEY)
        assert route is not None
        self.assertEqual((route.via.host, route.via.flow_id, route.via.mac_bytes),
                         ("10.2.0.7", mapping.flow_id, mac_bytes(self.ROUTER_MAC)))
        self.sockets["rx:eth0"].inbox = [(VNET + frame(payload=b"hello"), PACKET_HOST)]
        self.port.doRead()
        self.plumbing.commit(self.flow)
        [sent] = self.sockets["tx:eth1"].sent
        eth = sent[VNET_HDR_LEN:]  # what leaves carries the vnet header the socket wants
        self.assertEqual(eth[:6], mac_bytes(self.ROUTER_MAC))
        self.assertEqual(eth[14 + 12:14 + 20], ipaddress.ip_address("10.0.0.2").packed
                         + ipaddress.ip_address("10.2.0.7").packed)
        self.assertEqual(struct.unpack_from("!HH", eth, 34), (mapping.flow_id >> 16, mapping.flow_id & 0xFFFF))
        # The host's decapsulator, told the mapping, restores the client's packet.
        decap = Decapsulator()
        decap.add(mapping)
        restored = bytearray(sent)
        self.assertEqual(decap.decode(restored, len(restored)), KEY)
        self.assertEqual(restored[VNET_HDR_LEN + 14 + 12:VNET_HDR_LEN + 14 + 20], CLIENT + VIP)

    def test_host_on_the_segment_is_not_tunnelled(self) -> None:
        self.assertIsNone(self.plumbing.fence(self.flow, Host()))
        route = self.table.get(KEY)
        assert route is not None
        self.assertEqual((route.via.flow_id, route.via.mac_bytes), (None, HOST_MAC))
        self.assertEqual(len(self.plan.flow_ids), 0)

    def test_flow_id_released_when_the_route_goes(self) -> None:
        for end in (self.plumbing.ended, self.plumbing.unfence):
            self.plumbing.fence(self.flow, "10.2.0.7")
            self.assertEqual(len(self.plan.flow_ids), 1)
            end(self.flow)
            self.assertEqual(len(self.plan.flow_ids), 0)

    def test_flow_id_released_when_the_fence_fails(self) -> None:
        self.fence.fail = True
        self.assertRaises(OSError, self.plumbing.fence, self.flow, "10.2.0.7")
        self.assertEqual((len(self.plan.flow_ids), len(self.table)), (0, 0))
        self.fence.fail = False
        del self.macs["10.0.0.1"]  # the router unresolved: no route, no flow id kept
        self.reactor.advance(10)  # past the MAC's reuse
        self.assertRaises(KeyError, self.plumbing.fence, self.flow, "10.2.0.7")
        self.assertEqual((len(self.plan.flow_ids), len(self.table)), (0, 0))

    def test_flow_of_another_family_is_refused_and_keeps_no_flow_id(self) -> None:
        # An IPv4 client's flow to a host behind an IPv6 tunnel (a pool host
        # named, and resolved to an IPv6 address): refused, the id given back.
        plan = TunnelPlan(["fd4e:4c44::/64"], {6: "fd4e:4c42::2"}, {6: "fd4e:4c42::1"})
        self.macs["fd4e:4c42::1"] = self.ROUTER_MAC
        plumbing = ForwarderPlumbing(self.port, self.fence, "eth1", resolve_mac=self.macs.__getitem__, tunnel=plan)
        self.assertRaises(TunnelError, plumbing.fence, self.flow, "fd4e:4c44::3")
        self.assertEqual((len(plan.flow_ids), len(self.table), len(self.fence.keys)), (0, 0, 0))
        flow6 = Flow(("fd4e:4c42::5", 40000), ("fd4e:4c42::100", 80))
        mapping = plumbing.fence(flow6, "fd4e:4c44::3")
        assert mapping is not None
        self.assertEqual((mapping.forwarder_ip, len(plan.flow_ids)), ("fd4e:4c42::2", 1))

    def test_own_flow_taken_back_is_not_handed_out_again(self) -> None:
        # A flow this unit tunnelled in an earlier run (its source is ours),
        # carried by a peer since: its flow id stays in use until it ends.
        self.plan.flow_ids = FlowIds(start=0x00020003)
        atom = ("route 10.0.0.5:40000 10.0.0.100:80", "2 c 10.2.0.7 02:00:00:00:00:01 131075 10.0.0.2")
        self.assertEqual(self.plumbing.replumb([atom]), (1, 0))
        self.assertEqual(len(self.plan.flow_ids), 1)
        self.assertEqual(self.plan.flow_ids.allocate(), 0x00020004)
        self.plumbing.ended(self.flow)
        self.assertEqual(len(self.plan.flow_ids), 2)  # until the route has lingered
        self.reactor.advance(END_LINGER + 1)
        self.assertEqual(len(self.plan.flow_ids), 1)  # the one just allocated
        # A peer's flow (another source) reserves nothing here.
        other = ("route 10.0.0.5:40000 10.0.0.100:80", "2 c 10.2.0.7 02:00:00:00:00:01 131077 10.0.0.9")
        self.assertEqual(self.plumbing.replumb([other]), (1, 0))
        self.assertEqual(self.plan.flow_ids.allocate(), 0x00020005)

    def test_plan(self) -> None:
        self.assertTrue(self.plan.reaches("10.2.3.4"))
        self.assertFalse(self.plan.reaches("10.3.0.1"))
        self.assertFalse(self.plan.reaches("2001:db8::1"))
        self.assertFalse(self.plan.reaches("not-an-address"))
        self.assertRaises(TunnelError, self.plan.source, "2001:db8::1")
        self.assertRaises(TunnelError, self.plan.gateway, "2001:db8::1")
