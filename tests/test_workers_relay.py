"""The supervisor-worker health link: frames, relay to every worker, answers sent as the unit."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.health.codec import SENDER_AGENT_KINDS, SENDER_UNIT_KINDS, Codec, ReplayGuard
from nlbproxy.health.messages import Envelope, GetSnapshot, Heartbeat, SessionAck, node_id
from nlbproxy.health.udp import HealthSocket
from nlbproxy.workers.healthrelay import PublicHealth, RelayedHealth, WorkerLink, frame, unframe

SECRET = b"farm secret"
AGENT = ("192.0.2.1", 7001)
W0, W1 = ("127.0.0.1", 4000), ("127.0.0.1", 4001)
SUPERVISOR = ("127.0.0.1", 5000)


class FakeUDP:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.written.append((datagram, address))

    def getHost(self) -> Any:
        return None


def _clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


class FrameTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        self.assertEqual(unframe(frame(AGENT, b"datagram")), (AGENT, b"datagram"))
        self.assertEqual(unframe(frame(("::1", 9), b"x")), (("::1", 9), b"x"))

    def test_malformed(self) -> None:
        for data in (b"", b"\x00", b"\x00\x00\x01x", b"\x09\x00\x01short", b"\x01\x00\x01\xff\x00"):
            self.assertIsNone(unframe(data), data)


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = _clock()
        self.public = PublicHealth(Codec(SECRET, self.clock), ReplayGuard(), node_id("unit"), SENDER_AGENT_KINDS,
                                   self.clock, lambda address, envelope: None)
        self.public_udp = FakeUDP()
        self.public.transport = self.public_udp  # type: ignore[assignment]
        self.link = WorkerLink(self.public, Codec(SECRET, self.clock), [W0, W1])
        self.link_udp = FakeUDP()
        self.link.transport = self.link_udp  # type: ignore[assignment]
        self.agent = Codec(SECRET, self.clock)

    def _from_agent(self, seq: int) -> bytes:
        envelope = Envelope(node_id("host"), 1, seq, int(self.clock.seconds() * 1000), Heartbeat(1, 2, "host"))
        return self.agent.encode(envelope)

    def test_agent_datagrams_go_to_every_worker_unchanged(self) -> None:
        datagram = self._from_agent(1)
        self.public.datagramReceived(datagram, AGENT)
        self.assertEqual(self.link_udp.written, [(frame(AGENT, datagram), W0), (frame(AGENT, datagram), W1)])
        self.assertEqual(self.link.relayed, 2)

    def test_forged_and_replayed_datagrams_are_not_relayed(self) -> None:
        datagram = self._from_agent(1)
        self.public.datagramReceived(datagram, AGENT)
        self.public.datagramReceived(datagram, AGENT)
        self.public.datagramReceived(datagram[:-1] + bytes([datagram[-1] ^ 1]), AGENT)
        self.assertEqual(len(self.link_udp.written), 2)
        self.assertEqual(self.public.drops["mac"] + self.public.drops["replay"], 2)

    def test_worker_answers_leave_as_the_unit(self) -> None:
        workers = []
        for address in (W0, W1):
            inner = HealthSocket(Codec(SECRET, self.clock), ReplayGuard(), node_id("unit"), SENDER_AGENT_KINDS,
                                 self.clock, lambda a, e: None, epoch=address[1])
            relayed = RelayedHealth(inner, SUPERVISOR)
            relayed.transport = FakeUDP()  # type: ignore[assignment]
            relayed.startProtocol()
            inner.send(AGENT, SessionAck(7))
            workers.append((address, relayed))
        for address, relayed in workers:
            for data, to in relayed.transport.written:  # type: ignore[union-attr]
                self.assertEqual(to, SUPERVISOR)
                self.link.datagramReceived(data, address)
        unit_side = Codec(SECRET, self.clock)
        sent = [(unit_side.decode(d, SENDER_UNIT_KINDS), a) for d, a in self.public_udp.written]
        self.assertEqual([a for _, a in sent], [AGENT, AGENT])
        envelopes = [e for e, _ in sent]
        assert envelopes[0] is not None and envelopes[1] is not None
        # One sender, one epoch, one sequence: the agent sees one unit.
        self.assertEqual({(e.sender, e.epoch) for e in envelopes}, {(node_id("unit"), self.public.epoch)})
        self.assertEqual([e.seq for e in envelopes], [1, 2])
        self.assertEqual([e.message for e in envelopes], [SessionAck(7), SessionAck(7)])

    def test_frames_from_strangers_or_without_the_secret_are_dropped(self) -> None:
        forged = Codec(b"another secret", self.clock).encode(Envelope(1, 1, 1, int(self.clock.seconds() * 1000),
                                                                      GetSnapshot(1)))
        self.link.datagramReceived(frame(AGENT, forged), W0)
        self.link.datagramReceived(frame(AGENT, b"x" * 40), ("127.0.0.1", 9999))
        self.link.datagramReceived(b"\x00", W1)
        self.assertEqual(self.public_udp.written, [])
        self.assertEqual(dict(self.link.drops), {"unauthenticated": 1, "stranger": 1, "malformed": 1})

    def test_worker_side_takes_frames_from_its_supervisor_only(self) -> None:
        received = []
        inner = HealthSocket(Codec(SECRET, self.clock), ReplayGuard(), node_id("unit"), SENDER_AGENT_KINDS,
                             self.clock, lambda a, e: received.append((a, e.message)))
        relayed = RelayedHealth(inner, SUPERVISOR)
        relayed.transport = FakeUDP()  # type: ignore[assignment]
        relayed.startProtocol()
        datagram = self._from_agent(3)
        relayed.datagramReceived(frame(AGENT, datagram), ("127.0.0.1", 6666))
        relayed.datagramReceived(b"\x05", SUPERVISOR)
        relayed.datagramReceived(frame(AGENT, datagram), SUPERVISOR)
        self.assertEqual(received, [(AGENT, Heartbeat(1, 2, "host"))])
        self.assertEqual(dict(relayed.drops), {"stranger": 1, "malformed": 1})
        relayed.stopProtocol()
        self.assertIsNone(inner.transport)
