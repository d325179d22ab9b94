"""The handoff channel's framing, handshake and messages (nlbproxy.handoff.wire)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.routes import FlowKey
from nlbproxy.handoff.tunnel import Mapping
from nlbproxy.handoff.wire import (
    MAX_FRAME,
    VERSION,
    Channel,
    ChannelError,
    Commit,
    Ended,
    Handoff,
    Message,
    Result,
)

SECRET = b"farm secret"
MAPPING = Mapping(0x00020003, "10.1.0.1", FlowKey("192.0.2.7", 40000, "10.1.0.100", 80))


def connect(unit_secret: bytes = SECRET, agent_secret: bytes = SECRET) -> tuple[Channel, Channel]:
    unit, agent = Channel("unit", unit_secret), Channel("agent", agent_secret)
    welcome, got = agent.receive(unit.hello())
    assert got == []
    prove, got = unit.receive(welcome)
    assert got == [] and unit.ready
    nothing, got = agent.receive(prove)
    assert (nothing, got) == (b"", []) and agent.ready
    return unit, agent


def deliver(sender: Channel, receiver: Channel, message: Message) -> list[Message]:
    reply, messages = receiver.receive(sender.send(message))
    assert reply == b""
    return messages


class HandshakeTests(SynchronousTestCase):
    def test_both_sides_ready(self) -> None:
        unit, agent = connect()
        self.assertTrue(unit.ready and agent.ready)

    def test_wrong_secret_at_the_agent(self) -> None:
        unit, agent = Channel("unit", SECRET), Channel("agent", b"other")
        welcome, _ = agent.receive(unit.hello())
        error = self.assertRaises(ChannelError, unit.receive, welcome)
        self.assertEqual(error.reason, "bad_proof")

    def test_wrong_secret_at_the_unit(self) -> None:
        # A unit without the secret cannot forge PROVE even after a WELCOME.
        unit, agent = Channel("unit", b"other"), Channel("agent", SECRET)
        agent.receive(unit.hello())
        prove_frame = b"\x03" + struct.pack("!I", 32) + b"\x00" * 32
        error = self.assertRaises(ChannelError, agent.receive, prove_frame)
        self.assertEqual(error.reason, "bad_proof")
        self.assertFalse(agent.ready)

    def test_reflected_proof_refused(self) -> None:
        # The agent's proof sent back as the unit's fails: the roles differ.
        unit, agent = Channel("unit", SECRET), Channel("agent", SECRET)
        welcome, _ = agent.receive(unit.hello())
        reflected = b"\x03" + struct.pack("!I", 32) + welcome[-32:]
        self.assertEqual(self.assertRaises(ChannelError, agent.receive, reflected).reason, "bad_proof")

    def test_other_version(self) -> None:
        agent = Channel("agent", SECRET)
        hello = bytearray(Channel("unit", SECRET).hello())
        hello[5] = VERSION + 1
        self.assertEqual(self.assertRaises(ChannelError, agent.receive, bytes(hello)).reason, "version")

    def test_large_frame_before_handshake(self) -> None:
        agent = Channel("agent", SECRET)
        frame = struct.pack("!BI", 1, 1000)
        self.assertEqual(self.assertRaises(ChannelError, agent.receive, frame).reason, "too_long")

    def test_message_before_handshake(self) -> None:
        unit, _ = connect()
        agent = Channel("agent", SECRET)
        frame = unit.send(Commit(1))
        self.assertEqual(self.assertRaises(ChannelError, agent.receive, frame).reason, "out_of_turn")

    def test_send_before_ready(self) -> None:
        self.assertRaises(RuntimeError, Channel("unit", SECRET).send, Commit(1))


class MessageTests(SynchronousTestCase):
    def test_round_trips(self) -> None:
        unit, agent = connect()
        blob = bytes(range(256)) * 1000
        self.assertEqual(deliver(unit, agent, Handoff(7, "web", "10.0.0.7:8080", blob)),
                         [Handoff(7, "web", "10.0.0.7:8080", blob)])
        self.assertEqual(deliver(agent, unit, Result(7, False, "no listener é")), [Result(7, False, "no listener é")])
        self.assertEqual(deliver(unit, agent, Commit(7)), [Commit(7)])
        self.assertEqual(deliver(agent, unit, Ended("10.0.0.2:4000", "10.0.0.100:80")),
                         [Ended("10.0.0.2:4000", "10.0.0.100:80")])

    def test_byte_by_byte(self) -> None:
        unit, agent = connect()
        data = unit.send(Handoff(1, "p", "h:1", b"x" * 100)) + unit.send(Commit(1))
        got: list[Message] = []
        for i in range(len(data)):
            got += agent.receive(data[i : i + 1])[1]
        self.assertEqual(got, [Handoff(1, "p", "h:1", b"x" * 100), Commit(1)])

    def test_role_cannot_send_the_others_messages(self) -> None:
        unit, agent = connect()
        self.assertRaises(RuntimeError, unit.send, Result(1, True))
        self.assertRaises(RuntimeError, agent.send, Handoff(1, "p", "e", b""))

    def test_tampered_frame(self) -> None:
        unit, agent = connect()
        frame = bytearray(unit.send(Handoff(1, "web", "h:1", b"blob")))
        frame[10] ^= 1
        self.assertEqual(self.assertRaises(ChannelError, agent.receive, bytes(frame)).reason, "bad_mac")

    def test_replayed_frame(self) -> None:
        unit, agent = connect()
        frame = unit.send(Commit(1))
        agent.receive(frame)
        self.assertEqual(self.assertRaises(ChannelError, agent.receive, frame).reason, "bad_mac")

    def test_reflected_frame(self) -> None:
        # A frame the unit sent, sent back to it, fails: directions are in the mac.
        unit, agent = connect()
        frame = unit.send(Commit(1))
        self.assertEqual(self.assertRaises(ChannelError, unit.receive, frame).reason, "bad_mac")

    def test_too_long(self) -> None:
        _, agent = connect()
        frame = struct.pack("!BI", 4, MAX_FRAME + 1)
        self.assertEqual(self.assertRaises(ChannelError, agent.receive, frame).reason, "too_long")

    def test_malformed_payloads(self) -> None:
        for kind, payload in ((5, b"\x00\x00\x00\x01\x02"), (5, b"\x00"), (6, b"\x00\x00\x00\x01\x00"),
                              (7, b"\x00\x05ab"), (99, b""), (4, b"\x00\x00\x00\x01\xff\xff")):
            u, a = connect()
            receiver = a if kind in (4, 6) else u
            sender = u if receiver is a else a
            frame = sender._frame(kind, payload, mac=True)
            error = self.assertRaises(ChannelError, receiver.receive, frame)
            self.assertIn(error.reason, ("malformed", "unknown_type"))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_property_garbage_after_handshake(self, data: bytes) -> None:
        _, agent = connect()
        try:
            agent.receive(data)
        except ChannelError:
            pass

    @settings(max_examples=100, deadline=None)
    @given(st.integers(0, 2**32 - 1), st.text(max_size=50), st.text(max_size=50), st.binary(max_size=2000))
    def test_property_handoff_round_trip(self, id_: int, pool: str, endpoint: str, blob: bytes) -> None:
        unit, agent = connect()
        self.assertEqual(deliver(unit, agent, Handoff(id_, pool, endpoint, blob)), [Handoff(id_, pool, endpoint, blob)])


class TunnelHandoffTests(SynchronousTestCase):
    """HANDOFF_TUNNEL: a handoff carrying the flow-id tunnel's mapping."""

    def test_round_trip_v4_and_v6(self) -> None:
        v6 = Mapping(0x00070008, "2001:db8:1::2", FlowKey("2001:db8::7", 1234, "2001:db8:1::100", 443))
        for mapping in (MAPPING, v6):
            unit, agent = connect()
            message = Handoff(9, "web", "10.2.0.7:8080", b"state blob", mapping)
            self.assertEqual(deliver(unit, agent, message), [message])

    def test_plain_handoff_keeps_its_frame_type(self) -> None:
        unit, _ = connect()
        self.assertEqual(unit.send(Handoff(1, "p", "h:1", b"x"))[0], 4)
        unit, _ = connect()
        self.assertEqual(unit.send(Handoff(1, "p", "h:1", b"x", MAPPING))[0], 8)

    def test_malformed(self) -> None:
        good = MAPPING.encode()
        head = struct.pack("!I", 1) + b"\x00\x01p" + b"\x00\x03h:1"
        bad_version = bytes([99]) + good[1:]
        for payload in (
            head,  # no mapping length
            head + struct.pack("!H", len(good) + 5) + good,  # mapping truncated
            head + struct.pack("!H", len(bad_version)) + bad_version,  # unknown mapping version
            head + struct.pack("!H", len(good) - 1) + good[:-1],  # mapping of the wrong size
            head + struct.pack("!H", 0),  # empty mapping
        ):
            unit, agent = connect()
            frame = unit._frame(8, payload, mac=True)
            self.assertEqual(self.assertRaises(ChannelError, agent.receive, frame).reason, "malformed")

    def test_agent_cannot_send_it(self) -> None:
        unit, agent = connect()
        frame = agent._frame(8, struct.pack("!I", 1) + b"\x00\x01p\x00\x03h:1"
                             + struct.pack("!H", len(MAPPING.encode())) + MAPPING.encode(), mac=True)
        self.assertEqual(self.assertRaises(ChannelError, unit.receive, frame).reason, "out_of_turn")

    @settings(max_examples=100, deadline=None)
    @given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=2000))
    def test_property_round_trip(self, id_: int, flow_id: int, blob: bytes) -> None:
        unit, agent = connect()
        message = Handoff(id_, "web", "10.2.0.7:80", blob, Mapping(flow_id, "10.1.0.1", MAPPING.key))
        self.assertEqual(deliver(unit, agent, message), [message])
