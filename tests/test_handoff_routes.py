"""The forwarding table of handed-off connections: states, buffers, timeouts, durable form."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.routes import (
    ACK, FIN, RST, SYN, FlowKey, RouteError, RouteTable, State, TableFull, Verdict, Via, WireError,
    atom_key, from_atom, replumb, to_atom,
)
from nlbproxy.session.dam import DAM

KEY = FlowKey("10.0.0.5", 40000, "10.0.0.100", 80)
VIA = Via("10.0.1.7", "02:00:00:00:01:07", "eth1")


def table(**kw: object) -> tuple[Clock, RouteTable]:
    clock = Clock()
    return clock, RouteTable(clock, **kw)  # type: ignore[arg-type]


class FlowKeyTests(SynchronousTestCase):
    def test_packed_round_trip_v4_and_v6(self) -> None:
        for key in (KEY, FlowKey("2001:db8::5", 1, "2001:db8::100", 65535)):
            self.assertEqual(FlowKey.from_packed(key.packed), key)
        self.assertEqual(len(KEY.packed), 12)
        # Source address, destination address, ports: the header order.
        self.assertEqual(KEY.packed, bytes([10, 0, 0, 5, 10, 0, 0, 100]) + b"\x9c\x40\x00\x50")

    def test_canonical_text(self) -> None:
        self.assertEqual(FlowKey("2001:DB8:0::5", 1, "2001:db8::1", 2).client_ip, "2001:db8::5")

    def test_invalid(self) -> None:
        for args in [("10.0.0.5", 0, "10.0.0.1", 80), ("10.0.0.5", 1, "10.0.0.1", 65536),
                     ("10.0.0.5", 1, "::1", 80), ("nope", 1, "10.0.0.1", 80)]:
            with self.assertRaises(ValueError):
                FlowKey(*args)  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            FlowKey.from_packed(b"\x00" * 13)

    def test_via_validates(self) -> None:
        self.assertEqual(Via("h", "02:AA:00:00:00:01").host_mac, "02:aa:00:00:00:01")
        self.assertEqual(Via("h", "02:AA:00:00:00:01").mac_bytes, b"\x02\xaa\x00\x00\x00\x01")
        for args in [("", "02:00:00:00:00:01"), ("a b", "02:00:00:00:00:01"), ("h", "02:00:00:00:01"),
                     ("h", "zz:00:00:00:00:01")]:
            with self.assertRaises(ValueError):
                Via(*args)
        with self.assertRaises(ValueError):
            Via("10.0.0.1", "02:00:00:00:00:01", flow_id=1 << 32)
        with self.assertRaises(ValueError):
            Via("h", "02:00:00:00:00:01", flow_id=1)  # a tunnel needs the host's address


class LifecycleTests(SynchronousTestCase):
    def test_fence_buffer_commit_flush(self) -> None:
        clock, t = table()
        t.fence(KEY, VIA)
        self.assertEqual(t.packet(KEY.packed, b"one", ACK)[0], Verdict.BUFFERED)
        self.assertEqual(t.packet(KEY.packed, b"two", ACK)[0], Verdict.BUFFERED)
        self.assertEqual(t.buffered_bytes, 6)
        self.assertEqual(t.commit(KEY), [b"one", b"two"])
        self.assertEqual(t.buffered_bytes, 0)
        verdict, route = t.packet(KEY.packed, b"three", ACK)
        self.assertEqual(verdict, Verdict.FORWARD)
        assert route is not None
        self.assertEqual((route.via, route.packets, route.bytes), (VIA, 3, 11))
        self.assertEqual(t.stats["packets"], 3)

    def test_fence_twice_and_commit_unknown(self) -> None:
        _, t = table()
        t.fence(KEY, VIA)
        self.assertRaises(RouteError, t.fence, KEY, VIA)
        t.commit(KEY)
        self.assertRaises(RouteError, t.commit, KEY)
        self.assertRaises(RouteError, t.commit, FlowKey("10.0.0.6", 1, "10.0.0.100", 80))

    def test_table_full(self) -> None:
        _, t = table(max_routes=1)
        t.fence(KEY, VIA)
        self.assertRaises(TableFull, t.fence, FlowKey("10.0.0.6", 1, "10.0.0.100", 80), VIA)
        self.assertEqual(t.stats["fence_table_full"], 1)

    def test_buffer_limits_per_flow_and_total(self) -> None:
        _, t = table(fence_max_packets=2, fence_max_bytes=10, fence_total_bytes=12)
        other = FlowKey("10.0.0.6", 1, "10.0.0.100", 80)
        t.fence(KEY, VIA)
        t.fence(other, VIA)
        self.assertEqual(t.packet(KEY.packed, b"x" * 6, ACK)[0], Verdict.BUFFERED)
        self.assertEqual(t.packet(KEY.packed, b"x" * 5, ACK)[0], Verdict.DROP)  # 11 > 10 bytes
        self.assertEqual(t.packet(KEY.packed, b"x" * 4, ACK)[0], Verdict.BUFFERED)
        self.assertEqual(t.packet(KEY.packed, b"x", ACK)[0], Verdict.DROP)  # 3 > 2 packets
        self.assertEqual(t.packet(other.packed, b"x" * 3, ACK)[0], Verdict.DROP)  # 13 > 12 total
        self.assertEqual(t.packet(other.packed, b"x" * 2, ACK)[0], Verdict.BUFFERED)
        self.assertEqual(t.stats["drop_buffer_full"], 3)
        t.delete(KEY, "aborted")
        self.assertEqual(t.buffered_bytes, 2)

    def test_no_route(self) -> None:
        _, t = table()
        self.assertEqual(t.packet(KEY.packed, b"x", ACK), (Verdict.PASS, None))
        self.assertEqual(sum(t.stats.values()), 0)

    def test_fence_timeout(self) -> None:
        clock, t = table(fence_timeout=5)
        t.fence(KEY, VIA)
        t.packet(KEY.packed, b"held", ACK)
        clock.advance(4.9)
        self.assertEqual(t.tick(), [])
        clock.advance(0.1)
        [gone] = t.tick()
        self.assertEqual((gone.reason, gone.route.state, len(t), t.buffered_bytes),
                         ("fence_timeout", State.DELETED, 0, 0))

    def test_fin_then_backstop_timeout(self) -> None:
        clock, t = table(closing_timeout=60)
        t.fence(KEY, VIA)
        t.commit(KEY)
        self.assertEqual(t.packet(KEY.packed, b"fin", FIN | ACK)[0], Verdict.FORWARD)
        self.assertEqual(t.get(KEY).state, State.CLOSING)  # type: ignore[union-attr]
        clock.advance(30)
        # The client's last ACK still goes through.
        self.assertEqual(t.packet(KEY.packed, b"ack", ACK)[0], Verdict.FORWARD)
        clock.advance(30)
        [gone] = t.tick()
        self.assertEqual(gone.reason, "closing_timeout")

    def test_rst_shortens_closing(self) -> None:
        clock, t = table(closing_timeout=60, reset_timeout=5)
        t.fence(KEY, VIA)
        t.commit(KEY)
        t.packet(KEY.packed, b"fin", FIN | ACK)
        clock.advance(1)
        t.packet(KEY.packed, b"rst", RST)
        clock.advance(5)
        self.assertEqual([d.reason for d in t.tick()], ["closing_timeout"])

    def test_close_seen_while_fenced_applies_at_commit(self) -> None:
        clock, t = table(reset_timeout=5)
        t.fence(KEY, VIA)
        t.packet(KEY.packed, b"rst", RST)
        self.assertEqual(t.get(KEY).state, State.FENCED)  # type: ignore[union-attr]
        self.assertEqual(t.commit(KEY), [b"rst"])
        self.assertEqual(t.get(KEY).state, State.CLOSING)  # type: ignore[union-attr]
        clock.advance(5)
        self.assertEqual(len(t.tick()), 1)

    def test_agent_reports_end(self) -> None:
        _, t = table()
        t.fence(KEY, VIA)
        t.commit(KEY)
        gone = t.delete(KEY)
        assert gone is not None
        self.assertEqual((gone.reason, len(t)), ("ended", 0))
        self.assertIsNone(t.delete(KEY))
        self.assertEqual(t.stats["delete_unknown"], 1)

    def test_idle_timeout_refreshed_by_packets(self) -> None:
        clock, t = table(idle_timeout=100)
        t.fence(KEY, VIA)
        t.commit(KEY)
        clock.advance(90)
        t.packet(KEY.packed, b"x", ACK)
        clock.advance(90)
        self.assertEqual(t.tick(), [])
        clock.advance(10)
        self.assertEqual([d.reason for d in t.tick()], ["idle_timeout"])

    def test_syn_on_closing_flow_frees_it(self) -> None:
        _, t = table()
        t.fence(KEY, VIA)
        t.commit(KEY)
        t.packet(KEY.packed, b"fin", FIN | ACK)
        self.assertEqual(t.packet(KEY.packed, b"syn", SYN), (Verdict.PASS, None))
        self.assertNotIn(KEY, t)
        # Reported, so that the fence goes at once.
        self.assertEqual([d.reason for d in t.removed], ["reused"])
        self.assertEqual([d.reason for d in t.tick()], ["reused"])
        self.assertEqual(t.removed, [])

    def test_offloaded_route_only_watched(self) -> None:
        clock, t = table(idle_timeout=10, closing_timeout=20)
        t.fence(KEY, VIA)
        self.assertRaises(RouteError, t.offload, KEY)  # not committed yet
        t.commit(KEY)
        t.offload(KEY)
        clock.advance(1000)
        self.assertEqual(t.tick(), [])  # no idle timeout: its packets are not seen
        verdict, route = t.packet(KEY.packed, b"fin", FIN | ACK)
        self.assertEqual((verdict, route.state), (Verdict.FORWARD, State.CLOSING))  # type: ignore[union-attr]
        self.assertEqual((t.stats["packets"], t.stats["offloaded_seen"]), (0, 1))
        clock.advance(20)
        self.assertEqual([d.reason for d in t.tick()], ["closing_timeout"])

    def test_python_keys_are_what_the_fast_path_does_not_carry(self) -> None:
        _, t = table()
        t.fence(KEY, VIA)
        self.assertEqual(t.python_keys(), [KEY])
        t.commit(KEY)
        self.assertEqual(t.python_keys(), [KEY])  # committed, not offloaded (yet, or ever)
        t.offload(KEY)
        self.assertEqual(t.python_keys(), [])
        other = FlowKey("10.0.0.6", 40001, "10.0.0.100", 80)
        t.restore(other, VIA)  # taken over from the DAM: Python forwards it
        self.assertEqual(t.python_keys(), [other])
        t.delete(other)
        self.assertEqual(t.python_keys(), [])

    def test_delete_host(self) -> None:
        _, t = table()
        other = Via("10.0.1.8", "02:00:00:00:01:08", "eth1")
        t.fence(KEY, VIA)
        t.fence(FlowKey("10.0.0.6", 1, "10.0.0.100", 80), other)
        t.fence(FlowKey("10.0.0.7", 1, "10.0.0.100", 80), VIA)
        self.assertEqual(len(t.delete_host("10.0.1.7")), 2)
        self.assertEqual([r.via for r in t.routes()], [other])

    def test_inventory(self) -> None:
        _, t = table()
        t.fence(KEY, VIA)
        t.fence(FlowKey("2001:db8::5", 7, "2001:db8::100", 443), VIA)
        t.commit(KEY)
        inv = t.inventory(limit=1)
        self.assertEqual(inv["routes"], 2)
        self.assertEqual(inv["by_state"], {"committed": 1, "fenced": 1})
        self.assertEqual(inv["rows"], [{
            "client": "10.0.0.5:40000", "vip": "10.0.0.100:80", "host": "10.0.1.7",
            "host_mac": "02:00:00:00:01:07", "ifname": "eth1", "flow_id": None,
            "state": "committed", "since": 0.0, "packets": 0, "bytes": 0, "buffered": 0,
            "offloaded": False}])
        self.assertEqual(t.inventory()["rows"][1]["client"], "[2001:db8::5]:7")


class AtomTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        _, t = table()
        for key, via in [(KEY, VIA), (FlowKey("2001:db8::5", 7, "2001:db8::100", 443),
                                      Via("10.0.2.9", "02:00:00:00:00:02", "eth9", 4294967295, "10.0.0.2"))]:
            route = t.fence(key, via)
            atom_key, data, kind = to_atom(route)
            self.assertEqual(kind, "tcp-route")
            self.assertTrue(atom_key.startswith("route "))
            self.assertLessEqual(len(data.encode()), 255)
            self.assertLessEqual(len(atom_key.encode()), 255)
            got_key, got_via, state = from_atom(atom_key, data, via.ifname)
            self.assertEqual((got_key, got_via, state), (key, via, State.FENCED))
        t.commit(KEY)
        self.assertEqual(from_atom(*to_atom(t.get(KEY))[:2])[2], State.COMMITTED)  # type: ignore[arg-type]

    def test_malformed(self) -> None:
        good_key, good_data, _ = to_atom(RouteTable(Clock()).fence(KEY, VIA))
        bad = [
            ("session-cookie", good_data),
            ("route 10.0.0.5:40000", good_data),
            ("route 10.0.0.5:40000 10.0.0.100:80 x", good_data),
            ("route 10.0.0.5:0 10.0.0.100:80", good_data),
            ("route 10.0.0.5:40000 [10.0.0.100]:80", good_data),
            ("route 10.0.0.5:40000 [::1]:80", good_data),
            ("route 10.0.0.5:99999 10.0.0.100:80", good_data),
            ("route 300.0.0.5:1 10.0.0.100:80", good_data),
            (good_key, "2 c h 02:00:00:00:00:01 -"),
            (good_key, "1 c h 02:00:00:00:00:01"),
            (good_key, "1 q h 02:00:00:00:00:01 -"),
            (good_key, "1 c h 02:00:00:00:00 -"),
            (good_key, "1 c h 02:00:00:00:00:01 x"),
            (good_key, "1 c 10.0.0.1 02:00:00:00:00:01 4294967296"),
            (good_key, "1 c h 02:00:00:00:00:01 7"),
            (good_key, "1 c 10.0.0.1 02:00:00:00:00:01 7"),  # version 1 had no tunnel source
            (good_key, "2 c 10.0.0.1 02:00:00:00:00:01 7 -"),
            (good_key, "2 c 10.0.0.1 02:00:00:00:00:01 - 10.0.0.2"),
            (good_key, "2 c 10.0.0.1 02:00:00:00:00:01 7 2001:db8::2"),
            (good_key, "2 c 10.0.0.1 02:00:00:00:00:01 7 nowhere"),
            (good_key, "2 c 10.0.0.1 02:00:00:00:00:01 7 10.0.0.2 x"),
            (good_key, "3 c 10.0.0.1 02:00:00:00:00:01 - -"),
            (good_key, "1 c h 02:00:00:00:00:01 ٣"),
            (good_key, ""),
        ]
        for key, data in bad:
            with self.assertRaises(WireError, msg=(key, data)):
                from_atom(key, data)

    def test_version_1_still_read(self) -> None:
        # A unit not upgraded yet writes version 1; its untunnelled routes are taken over.
        key = atom_key(KEY)
        self.assertEqual(from_atom(key, "1 c 10.0.1.7 02:00:00:00:01:07 -", "eth1"), (KEY, VIA, State.COMMITTED))

    def test_replumb(self) -> None:
        _, source = table()
        source.fence(KEY, VIA)
        source.commit(KEY)
        atoms = [to_atom(source.get(KEY))[:2], ("cookie-value", "app/10.0.1.7:80"),  # type: ignore[arg-type]
                 ("route nonsense", "1 c")]
        clock, target = table()
        self.assertEqual(replumb(target, atoms, "eth3"), (1, 1))
        route = target.get(KEY)
        assert route is not None
        self.assertEqual((route.state, route.via.ifname), (State.COMMITTED, "eth3"))
        self.assertEqual(target.packet(KEY.packed, b"x", ACK)[0], Verdict.FORWARD)

    def test_through_a_real_dam(self) -> None:
        """A unit writes its routes into the DAM; another unit's table is rebuilt from the atoms."""
        clock = Clock()
        clock.advance(1_000)
        dam = DAM("unit-a", clock, lambda peer, call: None, replication=0)
        _, source = table()
        source.fence(KEY, VIA)
        source.commit(KEY)
        dam.add(*to_atom(source.get(KEY)))  # type: ignore[arg-type]
        dam.add("cookie-value", "app/10.0.1.7:80")
        _, target = table()
        live = [(a.key, a.data) for a in dam.atoms() if not a.dead]
        self.assertEqual(replumb(target, live, "eth1"), (1, 0))
        self.assertEqual(target.get(KEY).via, VIA)  # type: ignore[union-attr]
        # The route's end deletes the atom too.
        dam.delete(atom_key(KEY))
        self.assertIsNone(dam.get(atom_key(KEY)))

    @given(st.ip_addresses(v=4), st.integers(1, 65535), st.integers(1, 65535),
           st.one_of(st.none(), st.integers(0, 2**32 - 1)),
           st.sampled_from([State.FENCED, State.COMMITTED, State.CLOSING]))
    def test_round_trip_property(self, ip: object, cport: int, vport: int, flow_id: int | None,
                                 state: State) -> None:
        key = FlowKey(str(ip), cport, "10.9.9.9", vport)
        _, t = table()
        source = None if flow_id is None else "10.0.0.2"
        route = t.restore(key, Via("10.1.1.1", "02:00:00:00:00:01", flow_id=flow_id, source=source), state)
        self.assertEqual(from_atom(*to_atom(route)[:2]), (key, route.via, state))

    @given(st.text(max_size=80), st.text(max_size=80))
    def test_garbage_is_wire_error(self, key: str, data: str) -> None:
        try:
            from_atom("route " + key, data)
        except WireError:
            pass


class RouteMachine(RuleBasedStateMachine):
    """Random fence/commit/packet/delete/time sequences against a simple model."""

    keys = [FlowKey("10.0.0.5", p, "10.0.0.100", 80) for p in (1, 2, 3)]

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.t = RouteTable(self.clock, max_routes=2, fence_max_packets=3, fence_max_bytes=40,
                            fence_total_bytes=60, fence_timeout=5, closing_timeout=20,
                            reset_timeout=2, idle_timeout=50)
        #: key -> state, and the packets buffered per fenced key.
        self.model: dict[FlowKey, State] = {}
        self.held: dict[FlowKey, list[bytes]] = {}

    @rule(k=st.sampled_from(keys))
    def fence(self, k: FlowKey) -> None:
        if k in self.model:
            try:
                self.t.fence(k, VIA)
            except RouteError:
                return
            raise AssertionError("fenced twice")
        if len(self.model) >= 2:
            try:
                self.t.fence(k, VIA)
            except TableFull:
                return
            raise AssertionError("table over its limit")
        self.t.fence(k, VIA)
        self.model[k] = State.FENCED
        self.held[k] = []

    @rule(k=st.sampled_from(keys))
    def commit(self, k: FlowKey) -> None:
        if self.model.get(k) is not State.FENCED:
            try:
                self.t.commit(k)
            except RouteError:
                return
            raise AssertionError("commit allowed outside FENCED")
        flushed = self.t.commit(k)
        assert flushed == self.held.pop(k)
        self.model[k] = self.t.get(k).state  # type: ignore[union-attr]
        assert self.model[k] in (State.COMMITTED, State.CLOSING)

    @rule(k=st.sampled_from(keys), size=st.integers(1, 30),
          flags=st.sampled_from([ACK, ACK | FIN, RST, SYN, ACK | RST]))
    def packet(self, k: FlowKey, size: int, flags: int) -> None:
        frame = bytes([k.client_port]) * size
        verdict, route = self.t.packet(k.packed, frame, flags)
        state = self.model.get(k)
        if state is None:
            assert (verdict, route) == (Verdict.PASS, None)
        elif state is State.FENCED:
            if verdict is Verdict.BUFFERED:
                self.held[k].append(frame)
            else:
                assert verdict is Verdict.DROP
        elif state is State.CLOSING and flags == SYN:
            assert (verdict, route) == (Verdict.PASS, None)
            del self.model[k]
            assert self.t.removed.pop().route.key == k  # the forwarder drains these
        else:
            assert verdict is Verdict.FORWARD and route is not None
            if flags & (FIN | RST):
                self.model[k] = State.CLOSING

    @rule(k=st.sampled_from(keys))
    def offload(self, k: FlowKey) -> None:
        if self.model.get(k) is State.COMMITTED:
            assert self.t.offload(k).offloaded
        else:
            try:
                self.t.offload(k)
            except RouteError:
                return
            raise AssertionError("offloaded outside COMMITTED")

    @rule(k=st.sampled_from(keys))
    def delete(self, k: FlowKey) -> None:
        gone = self.t.delete(k)
        assert (gone is not None) == (k in self.model)
        self.model.pop(k, None)
        self.held.pop(k, None)

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0, 10.0, 60.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        for gone in self.t.tick():
            assert gone.route.state is State.DELETED
            self.model.pop(gone.route.key)
            self.held.pop(gone.route.key, None)

    @precondition(lambda self: bool(self.model))
    @rule()
    def durable_round_trip(self) -> None:
        for route in self.t.routes():
            key, via, state = from_atom(*to_atom(route)[:2], VIA.ifname)
            assert (key, via, state) == (route.key, route.via, route.state)

    @invariant()
    def agrees(self) -> None:
        assert {r.key: r.state for r in self.t.routes()} == self.model
        assert self.t.buffered_bytes == sum(len(f) for fs in self.held.values() for f in fs)
        assert self.t.buffered_bytes <= 60
        for route in self.t.routes():
            assert route.buffer == self.held.get(route.key, [])
            assert len(route.buffer) <= 3 and route.buffered_bytes <= 40
            assert route.state is State.FENCED or not route.buffer
        inv = self.t.inventory()
        assert inv["routes"] == len(self.model) == sum(inv["by_state"].values())
        assert set(self.t.fenced_keys()) == {k for k, v in self.model.items() if v is State.FENCED}


class TestRouteMachine(RouteMachine.TestCase):  # type: ignore[name-defined,misc]
    """The state machine, as a unittest case that trial also collects."""

    settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])

    def test_machine(self) -> None:
        self.runTest()

