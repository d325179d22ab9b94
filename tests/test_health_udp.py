"""HealthSocket: envelopes out, authenticated and replay-checked envelopes in,
send errors counted, never raised; plus one exchange over real loopback UDP."""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.error import MessageLengthError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.health.codec import SENDER_AGENT_KINDS, SENDER_UNIT_KINDS, Codec, ReplayGuard
from nlbproxy.health.messages import Envelope, GetSnapshot, Goodbye, Heartbeat, node_id
from nlbproxy.health.udp import HealthSocket

SECRET = b"farm secret"
UNIT = ("192.0.2.10", 7000)
AGENT = ("192.0.2.1", 7001)


class FakeUDP:
    """The transport of a listening UDP port: records writes, or raises ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.error = error

    def write(self, datagram: bytes, address: tuple[str, int]) -> None:
        if self.error is not None:
            raise self.error
        self.written.append((datagram, address))


class HealthSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.25)
        self.got: list[tuple[tuple[str, int], Envelope]] = []
        self.unit = HealthSocket(
            Codec(SECRET, self.clock), ReplayGuard(), node_id("unit-a"), SENDER_AGENT_KINDS, self.clock,
            lambda address, envelope: self.got.append((address, envelope)),
        )
        self.unit_udp = FakeUDP()
        self.unit.makeConnection(self.unit_udp)  # type: ignore[arg-type]
        self.agent = HealthSocket(
            Codec(SECRET, self.clock), ReplayGuard(), node_id("host-a"), SENDER_UNIT_KINDS, self.clock,
            lambda address, envelope: None, epoch=42,
        )
        self.agent_udp = FakeUDP()
        self.agent.makeConnection(self.agent_udp)  # type: ignore[arg-type]

    def carry(self, udp: FakeUDP, to: HealthSocket, source: tuple[str, ...] | tuple[str, int] = AGENT) -> None:
        for datagram, _ in udp.written:
            to.datagramReceived(datagram, source)  # type: ignore[arg-type]
        udp.written.clear()

    def test_send_wraps_in_an_envelope(self) -> None:
        self.agent.send(UNIT, Heartbeat(3, 99, "host-a"))
        self.clock.advance(0.5)
        self.agent.send(UNIT, Goodbye())
        [(first, to), (second, _)] = self.agent_udp.written
        self.assertEqual(to, UNIT)
        codec = Codec(SECRET, self.clock)
        one, two = codec.decode(first), codec.decode(second)
        self.assertEqual(one, Envelope(node_id("host-a"), 42, 1, 1_700_000_000_250, Heartbeat(3, 99, "host-a")))
        self.assertEqual(two, Envelope(node_id("host-a"), 42, 2, 1_700_000_000_750, Goodbye()))
        self.assertEqual(self.agent.sent, 2)

    def test_default_epoch_is_the_clock_in_milliseconds(self) -> None:
        self.assertEqual(self.unit.epoch, 1_700_000_000_250)

    def test_received_envelopes_reach_on_message(self) -> None:
        self.agent.send(UNIT, Heartbeat(3, 99))
        self.carry(self.agent_udp, self.unit)
        [(address, envelope)] = self.got
        self.assertEqual(address, AGENT)
        self.assertEqual(envelope.message, Heartbeat(3, 99))
        self.assertEqual(self.unit.received, 1)

    def test_ipv6_source_is_host_and_port(self) -> None:
        self.agent.send(UNIT, Heartbeat(3, 99))
        self.carry(self.agent_udp, self.unit, ("2001:db8::1", 7001, 0, 0))  # type: ignore[arg-type]
        self.assertEqual(self.got[0][0], ("2001:db8::1", 7001))

    def test_wrong_key_is_dropped_and_counted(self) -> None:
        forger = HealthSocket(Codec(b"not the secret", self.clock), ReplayGuard(), node_id("host-a"),
                              SENDER_UNIT_KINDS, self.clock, lambda a, e: None)
        udp = FakeUDP()
        forger.makeConnection(udp)  # type: ignore[arg-type]
        forger.send(UNIT, Heartbeat(1, 1))
        self.carry(udp, self.unit)
        self.assertEqual(self.got, [])
        self.assertEqual(self.unit.drops["mac"], 1)
        self.assertEqual(self.unit.received, 0)

    def test_replays_are_dropped_and_counted(self) -> None:
        self.agent.send(UNIT, Heartbeat(1, 1))
        self.agent_udp.written *= 3
        self.carry(self.agent_udp, self.unit)
        self.assertEqual(len(self.got), 1)
        self.assertEqual(self.unit.drops, {"replay": 2})

    def test_stale_wrong_direction_and_garbage(self) -> None:
        old = Clock()
        old.advance(1_700_000_000.25 - 3600)
        stale = Codec(SECRET, old).encode(Envelope(node_id("host-a"), 1, 1, int(old.seconds() * 1000), Goodbye()))
        backwards = Codec(SECRET, self.clock).encode(
            Envelope(node_id("unit-b"), 1, 1, int(self.clock.seconds() * 1000), GetSnapshot(1)))
        for datagram in (stale, backwards, b"", b"x" * 100):
            self.unit.datagramReceived(datagram, AGENT)
        self.assertEqual(self.got, [])
        self.assertEqual(self.unit.drops, {"stale": 1, "direction": 1, "short": 1, "magic": 1})

    def test_send_errors_are_counted_not_raised(self) -> None:
        for error in (
            BlockingIOError(errno.EWOULDBLOCK, "would block"),
            OSError(errno.ENOBUFS, "no buffer space"),
            ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
            MessageLengthError("message too long"),
        ):
            self.agent_udp.error = error
            self.agent.send(UNIT, Heartbeat(1, 1))
        self.assertEqual(self.agent.stats["send_error"], 4)
        self.assertEqual(self.agent.sent, 0)
        self.assertIn("too long", self.agent.last_send_error)

    def test_send_before_listening_is_counted(self) -> None:
        idle = HealthSocket(Codec(SECRET, self.clock), ReplayGuard(), 1, SENDER_UNIT_KINDS, self.clock,
                            lambda a, e: None)
        idle.send(UNIT, Goodbye())
        self.assertEqual(idle.stats["send_error"], 1)

    def test_a_message_that_does_not_encode_is_our_bug(self) -> None:
        self.assertRaises(ValueError, self.agent.send, UNIT, Heartbeat(-1, 0))


@pytest_twisted.inlineCallbacks
def test_over_loopback():
    """A heartbeat from an agent's socket reaches a unit's over real UDP, and
    a snapshot request goes back."""
    from twisted.internet import reactor as installed

    reactor: Any = installed

    got_unit: list[Envelope] = []
    got_agent: list[Envelope] = []

    def answer(address: tuple[str, int], envelope: Envelope) -> None:
        got_unit.append(envelope)
        unit.send(address, GetSnapshot(7))

    unit = HealthSocket(Codec(SECRET, reactor), ReplayGuard(), node_id("unit"), SENDER_AGENT_KINDS, reactor, answer)
    agent = HealthSocket(Codec(SECRET, reactor), ReplayGuard(), node_id("agent"), SENDER_UNIT_KINDS, reactor,
                         lambda address, envelope: got_agent.append(envelope))
    unit_port = reactor.listenUDP(0, unit, interface="127.0.0.1")
    agent_port = reactor.listenUDP(0, agent, interface="127.0.0.1")
    try:
        deadline = time.monotonic() + 10
        while not got_agent:
            if time.monotonic() > deadline:
                pytest.fail("no answer over loopback")
            if not got_unit:
                agent.send(("127.0.0.1", unit_port.getHost().port), Heartbeat(0, 0, "agent"))
            yield task.deferLater(reactor, 0.01, lambda: None)
        assert got_unit[0].message == Heartbeat(0, 0, "agent")
        assert got_agent[0].message == GetSnapshot(7)
        assert unit.drops == {} and agent.drops == {}
    finally:
        yield unit_port.stopListening()
        yield agent_port.stopListening()
