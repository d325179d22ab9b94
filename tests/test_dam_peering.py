"""DamService over real loopback TCP: the authenticated handshake, a wrong
secret and unauthenticated calls refused, one connection per pair of units,
atoms added on one unit found on the others, batches larger than an AMP value,
and a unit stopped and restarted that resyncs before it is ready.

The in-memory tests (trial-compatible) drive the handshake and flow control
over iosim's fake transports with a fake clock.  Each loopback test starts its
services on 127.0.0.1 port 0, reads the bound ports, and stops every service
it started; waits are polls with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.session import peering
from nlbproxy.session.dam import DAM, Atom, assigned, encode_atoms
from nlbproxy.session.peering import (
    CHALLENGE_SIZE,
    HANDSHAKE_TIMEOUT,
    PROTOCOL_VERSION,
    AddAtomsCommand,
    DamService,
    HandshakeRefused,
    Hello,
    PeerProtocol,
    Prove,
    parse_peer,
    proof,
)

SECRET = b"farm secret for the DAM peering tests\n"
DEADLINE = 10.0
H1 = "app/10.0.0.1:80"


@pytest.fixture(autouse=True)
def no_logged_errors() -> Generator[None, None, None]:
    """Fails a test that logged an error or an unhandled failure."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    errors: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(formatEvent(event) + ("\n" + failure.getTraceback() if failure is not None else ""))

    globalLogPublisher.addObserver(observer)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not errors, "\n".join(errors)


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


class Farm:
    """The services of one test; ``stop()`` stops all of them."""

    def __init__(self) -> None:
        self.services: list[DamService] = []

    def unit(self, name: str, peers: list[str], replication: int | None = 1, secret: bytes = SECRET) -> DamService:
        dam = DAM(name, reactor(), lambda peer, call: None, replication)
        svc = DamService(dam, name, "tcp:0:interface=127.0.0.1", peers, secret, reactor())
        svc.startService()
        self.services.append(svc)
        return svc

    def stop(self, svc: DamService) -> defer.Deferred[None]:
        self.services.remove(svc)
        return svc.stopService()

    def stop_all(self) -> defer.Deferred[Any]:
        running = [svc.stopService() for svc in self.services if svc.running]
        self.services = []
        return defer.gatherResults(running)


def address(svc: DamService) -> str:
    assert svc.address is not None
    host, port = svc.address
    return f"{host}:{port}"


@defer.inlineCallbacks
def poll(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Generator[Any, Any, float]:
    """Waits until ``predicate()`` is true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield task.deferLater(reactor(), 0.002, lambda: None)
    return time.monotonic() - start


@defer.inlineCallbacks
def started(farm: Farm, name: str, peers: list[str], **options: Any) -> Generator[Any, Any, DamService]:
    svc = farm.unit(name, peers, **options)
    yield svc.listening
    return svc


@defer.inlineCallbacks
def lookup(svc: DamService, key: str) -> Generator[Any, Any, Atom | None]:
    """What the router would use: the local atom, else a query."""
    found: defer.Deferred[Atom | None] = defer.Deferred()
    svc.dam.query(key, found.callback)
    atom = yield found
    return atom


def connected(*services: DamService) -> Callable[[], bool]:
    names = {svc.me for svc in services}
    return lambda: all(svc.peers == names - {svc.me} and svc.dam.peers == svc.peers for svc in services)


@pytest_twisted.inlineCallbacks
def test_handshake_names_each_peer():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        b = yield started(farm, "b", [address(a)])
        yield poll(connected(a, b), "a and b connected")
        assert a.stats["connected"] == b.stats["connected"] == 1
        assert a.stats["auth_failed"] == b.stats["auth_failed"] == 0
        yield b.whenReady()
        assert b.dam.resync_done
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_units_that_dial_each_other_keep_one_connection():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        b = yield started(farm, "b", [address(a)])
        a.add_peer(address(b))
        yield poll(lambda: a.stats["duplicate_connection"] + b.stats["duplicate_connection"] >= 1
                   and connected(a, b)(), "the duplicate resolved")
        # The connection kept is the one "a" (the smaller name) dialed, on both sides.
        kept_a, kept_b = a._active["b"], b._active["a"]
        assert kept_a.initiator and not kept_b.initiator
        assert kept_a.transport.getHost().port == kept_b.transport.getPeer().port
        dials = a.stats["dials"] + b.stats["dials"]
        yield task.deferLater(reactor(), 0.5, lambda: None)
        assert a.stats["dials"] + b.stats["dials"] == dials  # the loser's dialer is parked
        assert connected(a, b)()
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_a_wrong_secret_is_refused():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        intruder = yield started(farm, "x", [address(a)], secret=b"not the farm's secret")
        yield poll(lambda: intruder.stats["auth_failed"] >= 1 and a.stats["handshake_incomplete"] >= 1,
                   "the refusal")
        assert a.peers == frozenset() and intruder.peers == frozenset()
        assert a.dam.peers == frozenset()
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_a_wrong_proof_and_unauthenticated_calls_are_dropped_and_counted():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        host, port = parse_peer(address(a))
        endpoint = TCP4ClientEndpoint(reactor(), host, port)

        # A client that answers the challenge without the secret.
        client = yield connectProtocol(endpoint, amp.AMP())
        answer = yield client.callRemote(Hello, version=PROTOCOL_VERSION, unit="mallory",
                                         challenge=b"c" * CHALLENGE_SIZE)
        assert answer["unit"] == "a"
        assert answer["proof"] == proof(SECRET, b"responder", "mallory", "a", b"c" * CHALLENGE_SIZE,
                                        answer["challenge"])
        with pytest.raises(HandshakeRefused):
            yield client.callRemote(Prove, proof=b"\0" * 32)
        yield poll(lambda: a.stats["auth_failed"] == 1 and not a._protocols, "the wrong proof dropped")

        # A client that skips the handshake.
        client = yield connectProtocol(endpoint, amp.AMP())
        client.callRemote(AddAtomsCommand, atoms=encode_atoms([Atom("k", H1, "http-cookie", "mallory", 1)]),
                          refresh=False)
        yield poll(lambda: a.stats["unauthenticated_call"] == 1 and not a._protocols, "the call dropped")
        assert a.dam.get("k") is None
        assert a.peers == frozenset()
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_an_add_on_one_unit_is_visible_on_the_others():
    """Full replication: pushed to every unit.  Replication 1: every unit
    finds every atom, locally or by a query."""
    farm = Farm()
    try:
        a = yield started(farm, "a", [], replication=None)
        b = yield started(farm, "b", [address(a)], replication=None)
        c = yield started(farm, "c", [address(a), address(b)], replication=None)
        yield poll(connected(a, b, c), "three units connected")
        a.dam.add("session-1", H1)
        took = yield poll(lambda: all(s.dam.get("session-1") for s in (b, c)), "the atom on b and c", 1.0)
        assert took < 0.1, f"{took * 1000:.1f} ms"
        yield farm.stop_all()

        farm = Farm()
        a = yield started(farm, "a", [])
        b = yield started(farm, "b", [address(a)])
        c = yield started(farm, "c", [address(a), address(b)])
        yield poll(connected(a, b, c), "three units connected")
        units = [a, b, c]
        keys = [f"key-{i}" for i in range(300)]
        for i, key in enumerate(keys):
            units[i % 3].dam.add(key, H1)
        yield poll(lambda: all(sum(s.dam.get(k) is not None for s in units) >= 2 for k in keys),
                   "two copies of every atom")
        for svc in units:
            for key in keys:
                atom = yield lookup(svc, key)
                assert atom is not None and atom.data == H1, (svc.me, key)
        assert sum(svc.dam.stats["cached"] for svc in units) > 0
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_a_batch_larger_than_an_amp_value_is_split():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        b = yield started(farm, "b", [address(a)])
        yield poll(connected(a, b), "connected")
        keys = [f"{i:0200d}" for i in range(3000)]  # ~700 KB in one reactor turn
        for key in keys:
            a.dam.add(key, H1)
        yield poll(lambda: len(b.dam) == len(keys), "every atom on b")
        assert b.dam.stats["recv_AddAtoms"] > 10
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_a_stopped_unit_loses_nothing_and_resyncs_when_restarted():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        b = yield started(farm, "b", [address(a)])
        c = yield started(farm, "c", [address(a), address(b)])
        yield poll(connected(a, b, c), "three units connected")
        keys = [f"key-{i}" for i in range(300)]
        for i, key in enumerate(keys):
            (a, b, c)[i % 3].dam.add(key, f"app/10.0.0.{i % 7}:80")
        yield poll(lambda: all(sum(s.dam.get(k) is not None for s in (a, b, c)) >= 2 for k in keys),
                   "two copies of every atom")

        yield farm.stop(c)  # killing a unit loses no session
        yield poll(connected(a, b), "a and b see c gone")
        for svc in (a, b):
            for i, key in enumerate(keys):
                atom = yield lookup(svc, key)
                assert atom is not None and atom.data == f"app/10.0.0.{i % 7}:80"

        again = farm.unit("c", [address(a), address(b)])
        yield again.whenReady()  # ready means resynced: its share is here before it serves
        assert again.dam.resync_done and again.ready
        mine = [k for k in keys if "c" in assigned(k, ["a", "b", "c"], 1)]
        assert mine
        assert all(again.dam.get(k) is not None for k in mine)
        assert connected(a, b, again)()
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_ready_waits_for_unreachable_peers_to_be_tried():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        yield a.whenReady()  # no peers: ready at once
        lonely = farm.unit("b", ["127.0.0.1:1", address(a)])
        yield lonely.whenReady()
        assert lonely.stats["connect_failed"] >= 1
        assert lonely.peers == {"a"}
    finally:
        yield farm.stop_all()


@pytest_twisted.inlineCallbacks
def test_a_peers_list_naming_this_unit_is_dialed_once():
    farm = Farm()
    try:
        a = yield started(farm, "a", [])
        a.add_peer(address(a))
        yield poll(lambda: a.stats["self_connection"] == 1 and a.stats["refused_by_peer"] == 1, "the refusal")
        yield task.deferLater(reactor(), 0.5, lambda: None)
        assert a.stats["dials"] == 1 and a.peers == frozenset()
    finally:
        yield farm.stop_all()


# --- in memory -------------------------------------------------------------------------------


class InMemoryTests(SynchronousTestCase):
    """Two services wired by iosim: no sockets, a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.a = self.service("a")
        self.b = self.service("b")

    def service(self, name: str, secret: bytes = SECRET) -> DamService:
        svc = DamService(DAM(name, self.clock, lambda peer, call: None, 1), name, "tcp:0", [], secret, self.clock)
        svc.running = True  # as if started, without listening or dialing
        return svc

    def connect(self, initiator: DamService, responder: DamService) -> tuple[PeerProtocol, PeerProtocol, IOPump]:
        client, server, pump = connectedServerAndClient(
            lambda: PeerProtocol(responder, False), lambda: PeerProtocol(initiator, True), clock=self.clock)
        self.settle(pump)
        return client, server, pump

    def settle(self, pump: IOPump) -> None:
        for _ in range(10):
            pump.flush()
            self.clock.advance(0)
        pump.flush()

    def test_handshake_then_calls_flow_both_ways(self) -> None:
        client, server, pump = self.connect(self.a, self.b)
        self.assertEqual((client.stage, server.stage), ("ready", "ready"))
        self.assertEqual((self.a.peers, self.b.peers), ({"b"}, {"a"}))
        self.a.dam.add("k1", H1)
        self.b.dam.add("k2", H1)
        self.settle(pump)
        self.assertIsNotNone(self.b.dam.get("k1"))
        self.assertIsNotNone(self.a.dam.get("k2"))
        self.assertTrue(self.a.dam.resync_done and self.b.dam.resync_done)

    def test_calls_wait_while_the_transport_is_paused(self) -> None:
        client, server, pump = self.connect(self.a, self.b)
        client.pauseProducing()
        self.a.dam.add("k", H1)
        self.a.dam.flush()
        self.settle(pump)
        self.assertIsNone(self.b.dam.get("k"))
        client.resumeProducing()
        self.settle(pump)
        self.assertIsNotNone(self.b.dam.get("k"))

    def test_a_peer_that_does_not_keep_up_is_dropped(self) -> None:
        self.patch(peering, "MAX_QUEUED_BYTES", 4096)
        client, server, pump = self.connect(self.a, self.b)
        client.pauseProducing()
        for i in range(200):
            self.a.dam.add(f"key-{i}", H1)
            self.a.dam.flush()
        self.settle(pump)
        self.assertEqual(self.a.stats["send_overflow"], 1)
        self.assertEqual((self.a.peers, self.a.dam.peers, self.b.peers), (frozenset(), frozenset(), frozenset()))

    def test_a_silent_peer_is_dropped_after_the_handshake_timeout(self) -> None:
        silent, server, pump = connectedServerAndClient(
            lambda: PeerProtocol(self.b, False), amp.AMP, clock=self.clock)
        self.clock.advance(HANDSHAKE_TIMEOUT)
        pump.flush()
        self.assertEqual(self.b.stats["handshake_timeout"], 1)
        self.assertEqual(server.stage, "closed")

    def test_another_protocol_version_is_refused(self) -> None:
        client, server, pump = connectedServerAndClient(
            lambda: PeerProtocol(self.b, False), amp.AMP, clock=self.clock)
        failures: list[Any] = []
        client.callRemote(Hello, version=PROTOCOL_VERSION + 1, unit="a",
                          challenge=b"c" * CHALLENGE_SIZE).addErrback(failures.append)
        pump.flush()
        self.assertTrue(failures[0].check(HandshakeRefused))
        self.assertEqual(self.b.stats["version_mismatch"], 1)
        self.assertEqual(server.stage, "closed")

    def test_a_wrong_secret_fails_on_both_ends(self) -> None:
        intruder = self.service("x", secret=b"another secret")
        client, server, pump = self.connect(intruder, self.b)
        self.assertEqual(intruder.stats["auth_failed"], 1)
        self.assertEqual((client.stage, server.stage), ("closed", "closed"))
        self.assertEqual((intruder.peers, self.b.peers), (frozenset(), frozenset()))

    # --- boxes after the handshake are authenticated ---------------------------------------

    def injected(self, into: PeerProtocol, box: amp.AmpBox) -> None:
        """``box`` arrives on ``into``'s connection as if written by an attacker on the path."""
        into.dataReceived(box.serialize())

    def test_an_injected_call_is_dropped_and_counted(self) -> None:
        client, server, pump = self.connect(self.a, self.b)
        forged = amp.AmpBox(_command=b"AddAtoms", atoms=encode_atoms((Atom("evil", H1, "session", "a", 99),)),
                            refresh=b"False")
        self.injected(server, forged)
        self.settle(pump)
        self.assertEqual(self.b.stats["bad_mac"], 1)
        self.assertIsNone(self.b.dam.get("evil"))
        self.assertEqual((client.stage, server.stage), ("closed", "closed"))

    def test_a_replayed_call_is_dropped(self) -> None:
        client, server, pump = self.connect(self.a, self.b)
        sent: list[bytes] = []
        write = client.transport.write
        client.transport.write = lambda data: (sent.append(data), write(data))  # type: ignore[method-assign]
        self.a.dam.add("k1", H1)
        self.settle(pump)
        self.assertIsNotNone(self.b.dam.get("k1"))
        self.b.dam.delete("k1")  # were the replay accepted, k1 would come back
        self.settle(pump)
        server.dataReceived(b"".join(sent))
        self.settle(pump)
        self.assertEqual(self.b.stats["bad_mac"], 1)
        self.assertIsNone(self.b.dam.get("k1"))

    def test_box_macs_bind_key_sequence_and_every_field(self) -> None:
        box = {b"_command": b"QueryAtom", b"key": b"k", b"qid": b"1"}
        mac = peering.box_mac(b"k" * 32, 0, box)
        self.assertEqual(len(mac), peering.MAC_SIZE)
        self.assertEqual(mac, peering.box_mac(b"k" * 32, 0, dict(reversed(list(box.items())))))
        self.assertEqual(mac, peering.box_mac(b"k" * 32, 0, {**box, b"_mac": b"ignored"}))
        self.assertNotEqual(mac, peering.box_mac(b"j" * 32, 0, box))
        self.assertNotEqual(mac, peering.box_mac(b"k" * 32, 1, box))
        self.assertNotEqual(mac, peering.box_mac(b"k" * 32, 0, {**box, b"qid": b"2"}))
        # Length prefixes: moving bytes between key and value changes the MAC.
        self.assertNotEqual(peering.box_mac(b"k", 0, {b"ab": b"c"}), peering.box_mac(b"k", 0, {b"a": b"bc"}))

    def test_each_direction_has_its_own_key(self) -> None:
        client, server, pump = self.connect(self.a, self.b)
        self.assertEqual(client._send_key, server._recv_key)
        self.assertEqual(client._recv_key, server._send_key)
        self.assertNotEqual(client._send_key, client._recv_key)
