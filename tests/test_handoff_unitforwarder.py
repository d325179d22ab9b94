"""A unit's forwarder as ``[unit] forwarder_*`` builds it, with fake sockets and nftables:
table setup and teardown, DAM-durable routes, dead hosts' routes deleted, a failed
peer's routes taken over, and what the admin API shows of it."""

from __future__ import annotations

import ipaddress
import json
import socket
from types import SimpleNamespace
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.admin import render_metrics, state_document
from nlbproxy.classifier import Farm
from nlbproxy.config import HostConfig, PoolConfig
from nlbproxy.handoff.forwarder import PACKET_HOST
from nlbproxy.handoff.packets import VNET_HDR_LEN, mac_text
from nlbproxy.handoff.routes import State, atom_key
from nlbproxy.handoff.unitforwarder import (
    ForwarderStartError, HandoffReport, UnitForwarder, build_forwarder, dead_hosts, hosts_by_address,
)
from nlbproxy.handoff.unitside import Flow, HandoffStats
from nlbproxy.limits import END_LINGER
from nlbproxy.session.dam import DAM
from tests.test_admin import FakeUpstreams
from tests.test_handoff_forwarder import HOST_MAC, KEY, OUT_MAC, VNET, FakeSocket, FakeSockets, frame

HOST_IP = "10.0.1.3"
FLOW = Flow(("10.0.0.5", 40000), ("10.0.0.100", 80))


class RecordingBackend:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.fail_on: str | None = None
        self.closed = False

    def run(self, commands: str) -> None:
        if self.fail_on is not None and self.fail_on in commands:
            raise OSError(f"nft refused {self.fail_on}")
        self.commands.append(commands)

    def close(self) -> None:
        self.closed = True


class Host:
    host = HOST_IP


class FilteredSocket(FakeSocket):
    """Takes the socket filter the fast path attaches."""

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        self.filter = value


class FakeUnit:
    def __init__(self) -> None:
        self.stats = HandoffStats()


def make_farm(clock: Any) -> Farm:
    web = PoolConfig(name="web", hosts=(HostConfig(HOST_IP, 8080), HostConfig("10.0.1.4", 8080)))
    api = PoolConfig(name="api", hosts=(HostConfig(HOST_IP, 9000),))
    return Farm([web, api], clock, b"k" * 32)


class Network:
    """DAMs of units that call each other directly (synchronous flushes)."""

    def __init__(self, clock: Any, *names: str) -> None:
        self.dams = {name: DAM(name, clock, self._sender(name), replication=None) for name in names}
        for name, dam in self.dams.items():
            dam.set_peers(set(names) - {name})

    def _sender(self, me: str) -> Any:
        return lambda peer, call: self.dams[peer].receive(me, call)


class UnitForwarderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.farm = make_farm(self.reactor)
        self.net = Network(self.reactor, "u1", "u2")
        self.backend = RecordingBackend()
        self.sockets: dict[str, FakeSocket] = {}
        self.forwarders = {name: self.make(dam) for name, dam in self.net.dams.items()}
        self.fwd = self.forwarders["u1"]

    def make(self, dam: DAM, fast_path: bool = False) -> UnitForwarder:
        def opener(ifname: str, receive: bool) -> socket.socket:
            sock = self.sockets[f"{dam.me}:{'rx' if receive else 'tx'}:{ifname}"] = FilteredSocket(ifname, receive)
            return sock  # type: ignore[return-value]

        fwd = UnitForwarder(self.reactor, self.farm, dam, "eth0", "eth1", fast_path=fast_path,
                            fence_table=f"fence_{dam.me}", backend_factory=lambda: self.backend, opener=opener,
                            mac_of=lambda ifname: OUT_MAC, resolve_mac=lambda ip: mac_text(HOST_MAC))
        self.addCleanup(fwd.stop)
        return fwd

    def hand_off(self) -> None:
        self.fwd.fence(FLOW, Host())
        self.sockets["u1:rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        self.fwd.port.doRead()  # type: ignore[union-attr]
        self.fwd.commit(FLOW)

    def test_start_sets_up_tables_and_stop_removes_them(self) -> None:
        self.assertRaises(RuntimeError, self.fwd.fence, FLOW, Host())  # not started: the handoff falls back
        self.fwd.start()
        self.assertIn("add table inet fence_u1", self.backend.commands[0])
        self.assertTrue(self.fwd.state()["running"])
        self.fwd.stop()
        self.assertIn("delete table inet fence_u1", self.backend.commands[-1])
        self.assertTrue(self.backend.closed)
        self.assertEqual(self.sockets["u1:rx:eth0"].closed, True)

    def test_fast_path_table(self) -> None:
        fwd = self.make(self.net.dams["u2"], fast_path=True)
        fwd.start()
        self.assertTrue(any("table netdev fence_u2_fast" in c for c in self.backend.commands))
        self.assertTrue(fwd.state()["fast_path"])
        fwd.stop()
        self.assertIn("delete table netdev fence_u2_fast", "".join(self.backend.commands[-2:]))

    def test_start_failures_are_one_line(self) -> None:
        fwd = UnitForwarder(self.reactor, self.farm, None, "nosuch0", mac_of=self._no_interface,
                            backend_factory=lambda: self.backend)
        error = self.assertRaises(ForwarderStartError, fwd.start)
        self.assertIn("nosuch0", str(error))
        self.backend.fail_on = "add table inet"
        fwd = UnitForwarder(self.reactor, self.farm, None, "eth0", mac_of=lambda ifname: OUT_MAC,
                            backend_factory=lambda: self.backend, opener=lambda i, r: FakeSocket(i, r))
        error = self.assertRaises(ForwarderStartError, fwd.start)
        self.assertIn("nft refused", str(error))
        self.assertIsNone(fwd.plumbing)

    @staticmethod
    def _no_interface(ifname: str) -> bytes:
        raise OSError(19, "No such device")

    def test_routes_are_durable_and_counted_per_host(self) -> None:
        self.fwd.start()
        self.hand_off()
        self.assertEqual(len(self.sockets["u1:tx:eth1"].sent), 1)
        self.assertIsNotNone(self.net.dams["u2"].get(atom_key(KEY)))  # replicated to the peer
        self.assertEqual(self.fwd.handed_off(), {HOST_IP: 1})
        self.fwd.ended(FLOW)
        # No longer live, and no other unit is to take it over; the route only lingers.
        self.assertEqual((self.fwd.handed_off(), len(self.fwd.table)), ({}, 1))
        self.assertIsNone(self.net.dams["u2"].get(atom_key(KEY)))
        self.reactor.advance(END_LINGER + 1)
        self.assertEqual(len(self.fwd.table), 0)

    def test_dead_host_loses_its_routes(self) -> None:
        self.fwd.start()
        self.hand_off()
        web_host, api_host = self.farm.pools["web"].hosts[0], self.farm.pools["api"].hosts[0]
        web_host.agent_up = False
        self.reactor.advance(1)
        self.assertEqual(len(self.fwd.table), 1)  # the address still serves pool api
        api_host.probe_up = False
        self.reactor.advance(1)
        self.assertEqual((len(self.fwd.table), self.fwd.table.stats["deleted_host_down"]), (0, 1))
        self.assertFalse(any(c.startswith("add element") for c in self.backend.commands[-1:]))
        self.assertIsNone(self.net.dams["u1"].get(atom_key(KEY)))
        self.assertEqual(self.fwd.stats["host_down_routes"], 1)

    def test_dead_hosts(self) -> None:
        self.assertEqual(sorted(hosts_by_address(self.farm)), ["10.0.1.3", "10.0.1.4"])
        self.farm.pools["web"].hosts[1].agent_up = False
        # Unknown addresses are left alone: only health's word deletes routes.
        self.assertEqual(dead_hosts(["10.0.1.4", "10.0.1.4", "10.9.9.9", HOST_IP], self.farm), ["10.0.1.4"])

    def test_failed_peer_routes_taken_over(self) -> None:
        for fwd in self.forwarders.values():
            fwd.start()
        self.hand_off()
        other = self.forwarders["u2"]
        self.reactor.advance(1)
        self.assertEqual(len(other.table), 0)  # the peer is alive: nothing to take over
        self.net.dams["u2"].set_peers(())  # u1's connection dropped: it failed
        self.reactor.advance(1)
        route = other.table.get(KEY)
        assert route is not None
        self.assertEqual((route.state, route.via.ifname, other.stats["taken_over"]), (State.COMMITTED, "eth1", 1))
        self.assertEqual(other.handed_off(), {HOST_IP: 1})
        self.sockets["u2:rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        other.port.doRead()  # type: ignore[union-attr]
        self.assertEqual(len(self.sockets["u2:tx:eth1"].sent), 1)
        self.reactor.advance(1)
        self.assertEqual(other.stats["taken_over"], 1)  # once
        # u1 was only cut off: its host's agent reported the end to it, and
        # the atom's deletion reaches u2 when they reconnect.
        self.forwarders["u1"].ended(FLOW)
        self.reactor.advance(END_LINGER + 1)
        self.net.dams["u2"].set_peers({"u1"})
        self.net.dams["u1"].set_peers(())
        self.net.dams["u1"].set_peers({"u2"})
        self.reactor.advance(1)
        self.assertEqual((len(other.table), other.table.stats["deleted_ended_elsewhere"]), (0, 1))

    def test_restarted_unit_takes_its_routes_back(self) -> None:
        for fwd in self.forwarders.values():
            fwd.start()
        self.hand_off()
        other = self.forwarders["u2"]
        # u1 dies; u2 carries its flow.
        self.forwarders["u1"].stop()
        self.net.dams["u2"].set_peers(())
        self.reactor.advance(1)
        self.assertEqual(other.stats["taken_over"], 1)
        # u1 comes back under its name with nothing in memory, and resyncs.
        self.net.dams["u1"] = DAM("u1", self.reactor, self.net._sender("u1"), replication=None)
        again = self.make(self.net.dams["u1"])
        again.start()
        self.reactor.advance(1)
        self.assertEqual(len(again.table), 0)  # alone, nothing to take back
        self.net.dams["u1"].set_peers({"u2"})
        self.net.dams["u2"].set_peers({"u1"})
        self.reactor.advance(1)
        route = again.table.get(KEY)
        assert route is not None
        self.assertEqual((route.state, again.stats["taken_back"]), (State.COMMITTED, 1))
        self.reactor.advance(1)
        self.assertEqual(again.stats["taken_back"], 1)  # once
        # Traffic may come back to u1 (a preempting VRRP master): its packets go on to the host.
        self.sockets["u1:rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        again.port.doRead()  # type: ignore[union-attr]
        self.assertEqual(len(self.sockets["u1:tx:eth1"].sent), 1)
        # The connection ends at u2 (its backstop saw the FIN): u1 lets the route go too.
        other.port.delete(KEY, "ended")  # type: ignore[union-attr]
        self.reactor.advance(1)
        self.assertEqual((len(again.table), again.table.stats["deleted_ended_elsewhere"]), (0, 1))

    def test_admin_view(self) -> None:
        self.fwd.start()
        self.hand_off()
        unit = FakeUnit()
        unit.stats.handed_off = 1
        unit.stats.recent.extend([0.002, 0.001, 0.003])
        report = HandoffReport(unit, self.fwd)
        document = state_document(self.farm, {}, FakeUpstreams(), "u1", 1000.0, None, report)
        json.dumps(document)
        hosts = document["pools"]["web"]["hosts"]
        self.assertEqual((hosts[f"{HOST_IP}:8080"]["handed_off"], hosts["10.0.1.4:8080"]["handed_off"]), (1, 0))
        handoff = document["handoff"]
        self.assertEqual((handoff["handed_off"], handoff["live"], handoff["latency_median"]), (1, 1, 0.002))
        self.assertEqual(handoff["forwarder"]["metrics"]["packets"], 1)
        self.assertEqual(handoff["forwarder"]["inventory"]["rows"][0]["host"], HOST_IP)
        text = render_metrics(self.farm, {}, FakeUpstreams(), 1000.0, handoff=report)
        for line in ("nlbproxy_handoff_total 1", "nlbproxy_forwarder_packets_total 1",
                     'nlbproxy_forwarder_routes{state="committed"} 1',
                     f'nlbproxy_handoff_connections{{host="{HOST_IP}"}} 1'):
            self.assertIn(line, text)
        without = state_document(self.farm, {}, FakeUpstreams(), "u1", 1000.0)
        self.assertNotIn("handoff", without)
        self.assertNotIn("handed_off", without["pools"]["web"]["hosts"][f"{HOST_IP}:8080"])
        no_forwarder = HandoffReport(unit, None)
        self.assertIsNone(no_forwarder.state()["forwarder"])
        self.assertEqual(no_forwarder.handed_off(), {})


class TunnelledUnitForwarderTests(SynchronousTestCase):
    """``[unit] tunnel_*`` builds a forwarder whose routes to hosts in
    tunnel_networks are tunnelled, and whose fence hands out their mappings."""

    def test_build_from_config(self) -> None:
        reactor = MemoryReactorClock()
        config = SimpleNamespace(forwarder_in="eth0", forwarder_out="eth1", forwarder_fast_path=False,
                                 fence_table="fence_t", tunnel_networks=("10.0.1.0/24",),
                                 tunnel_source="10.0.0.2", tunnel_gateway="10.0.0.1")
        fwd = build_forwarder(config, reactor, make_farm(reactor), None)
        assert fwd is not None and fwd.tunnel is not None
        sockets = FakeSockets()
        backend = RecordingBackend()
        fwd._backend_factory, fwd._opener, fwd._mac_of = lambda: backend, sockets.open, lambda ifname: OUT_MAC
        fwd._resolve_mac = {"10.0.0.1": "02:00:00:00:00:01"}.__getitem__
        fwd.start()
        self.addCleanup(fwd.stop)
        mapping = fwd.fence(FLOW, Host())
        assert mapping is not None
        self.assertEqual((mapping.forwarder_ip, mapping.key), ("10.0.0.2", KEY))
        sockets["rx:eth0"].inbox = [(VNET + frame(), PACKET_HOST)]
        fwd.port.doRead()  # type: ignore[union-attr]
        fwd.commit(FLOW)
        [sent] = sockets["tx:eth1"].sent
        self.assertEqual(sent[VNET_HDR_LEN + 26:VNET_HDR_LEN + 34],
                         ipaddress.ip_address("10.0.0.2").packed + ipaddress.ip_address(HOST_IP).packed)
        fwd.ended(FLOW)
        reactor.advance(END_LINGER + 1)
        self.assertEqual(len(fwd.tunnel.flow_ids), 0)
        plain = SimpleNamespace(**{**vars(config), "tunnel_networks": (), "tunnel_source": None,
                                   "tunnel_gateway": None})
        untunnelled = build_forwarder(plain, reactor, make_farm(reactor), None)
        assert untunnelled is not None
        self.assertIsNone(untunnelled.tunnel)
