"""Session tracking on the agent and its counterpart on the unit, sans-I/O:
the session table, the sender's batching, coalescing, retries, failover and
re-snapshots (nlbproxy.session.agentside), the unit's receiver with its
dedupe (nlbproxy.session.unitside), both together over a lossy link through
the real codec, and the agent API's session routes.

Event scripts against a fake clock and a recording ``send``; every test is a
``SynchronousTestCase`` and runs under trial and pytest alike.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from io import BytesIO
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from nlbproxy.agent.api import MAX_SESSIONS_BODY, MAX_SESSIONS_PER_REQUEST, AgentApi, make_api_site
from nlbproxy.health.codec import SENDER_AGENT_KINDS, SENDER_UNIT_KINDS, Codec, ReplayGuard
from nlbproxy.health.messages import (
    MAX_DATAGRAM,
    Envelope,
    GetSnapshot,
    Heartbeat,
    Message,
    RowKey,
    Session,
    SessionAck,
    SessionDown,
    SessionKind,
    SessionRef,
    SessionUp,
)
from nlbproxy.health.table import AppSpec, HealthTable
from nlbproxy.session.agentside import (
    ACK_TIMEOUT,
    BIND_FAILOVER,
    KEEPALIVE_INTERVAL,
    MAX_BATCH_SPAN,
    MAX_IN_FLIGHT,
    MAX_RETRY_INTERVAL,
    SessionSender,
    SessionTable,
    SessionTableFull,
    check_session,
)
from nlbproxy.session.unitside import DEDUPE_WINDOW, SessionReceiver
from tests.test_admin import exchange

A = ("10.0.0.1", 9903)
B = ("10.0.0.2", 9903)
C = ("10.0.0.3", 9903)
UNIT_A, UNIT_B = 101, 102
EP = "10.0.0.7:8080"
COOKIE = SessionKind.HTTP_COOKIE
NOW = 1_700_000_000.0


def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


class Wire:
    """A recording ``send``."""

    def __init__(self) -> None:
        self.sent: list[tuple[tuple[str, int], Message]] = []

    def __call__(self, address: tuple[str, int], message: Message) -> None:
        self.sent.append((address, message))

    def take(self) -> list[tuple[tuple[str, int], Message]]:
        sent, self.sent = self.sent, []
        return sent


class Script:
    """A sender with a recording wire and a fake clock, plus a unit's acks."""

    def __init__(self, units: tuple[tuple[str, int], ...] = (A,), **kw: Any) -> None:
        self.clock = clock()
        self.wire = Wire()
        self.sender = SessionSender(units, self.clock, self.wire, **kw)
        self.seq = 0

    def turn(self) -> list[tuple[tuple[str, int], Message]]:
        """End the reactor turn: the flush runs; return what it sent."""
        self.clock.advance(0)
        return self.wire.take()

    def ack(self, batch: int, unit: int = UNIT_A, epoch: int = 1, address: tuple[str, int] = A) -> None:
        self.seq += 1
        self.sender.receive(address, Envelope(unit, epoch, self.seq, 0, SessionAck(batch)))

    def ack_all(self, sent: list[tuple[tuple[str, int], Message]], **kw: Any) -> None:
        for _, message in sent:
            assert isinstance(message, (SessionUp, SessionDown))
            self.ack(message.batch, **kw)

    def tick_for(self, seconds: float) -> list[tuple[tuple[str, int], Message]]:
        """Run the sender's ticks for ``seconds``; return everything sent."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(0.05)
            self.sender.tick()
        return self.wire.take()

    def up(self, key: str, app: str = "web", kind: SessionKind = COOKIE, endpoint: str = EP) -> None:
        self.sender.up(app, key, kind, endpoint)


def sessions_in(sent: list[tuple[tuple[str, int], Message]]) -> list[str]:
    return [s.key for _, m in sent if isinstance(m, SessionUp) for s in m.sessions]


def downs_in(sent: list[tuple[tuple[str, int], Message]]) -> list[str]:
    return [s.key for _, m in sent if isinstance(m, SessionDown) for s in m.sessions]


class TableTests(SynchronousTestCase):
    def test_up_down_and_replace(self) -> None:
        table = SessionTable()
        first = table.up("web", "k", COOKIE, EP, 1.0)
        self.assertIs(table.up("web", "k", COOKIE, EP, 2.0), first)  # unchanged: same entry, same since
        moved = table.up("web", "k", SessionKind.USER, EP, 3.0)
        self.assertEqual((moved.kind, moved.since), (SessionKind.USER, 3.0))
        self.assertEqual(len(table), 1)
        self.assertEqual(table.down("web", "k"), moved)
        self.assertIsNone(table.down("web", "k"))

    def test_bounded(self) -> None:
        table = SessionTable(max_sessions=3)
        for key in "abc":
            table.up("web", key, COOKIE, EP, 0)
        self.assertEqual(table.room(), 0)
        self.assertRaises(SessionTableFull, table.up, "web", "d", COOKIE, EP, 0)
        table.up("web", "a", SessionKind.USER, EP, 0)  # replacing needs no room
        table.down("web", "b")
        table.up("web", "d", COOKIE, EP, 0)
        self.assertEqual(sorted(e.key for e in table), ["a", "c", "d"])
        self.assertRaises(ValueError, SessionTable, 0)

    def test_sender_refuses_past_the_bound_and_sends_nothing(self) -> None:
        s = Script()
        s.sender.table.max_sessions = 2
        s.up("a")
        s.up("b")
        self.assertRaises(SessionTableFull, s.up, "c")
        self.assertEqual(sorted(sessions_in(s.turn())), ["a", "b"])

    def test_page_in_key_order(self) -> None:
        table = SessionTable()
        for app, key in [("web", "b"), ("api", "z"), ("web", "a"), ("web", "c")]:
            table.up(app, key, COOKIE, EP, 0)
        self.assertEqual([e.id for e in table.page(limit=2)], [("api", "z"), ("web", "a")])
        self.assertEqual([e.key for e in table.page("web", ("web", "a"), 5)], ["b", "c"])
        self.assertEqual(table.count("web"), 3)
        self.assertEqual(table.apps_with("z", ["web", "api"]), ["api"])

    def test_check_session(self) -> None:
        check_session("web", "k" * 255, EP)
        for app, key in [("web", ""), ("web", "k" * 256), ("web", "é" * 128), ("web", "\ud800"), ("w" * 256, "k")]:
            self.assertRaises(ValueError, check_session, app, key, EP)


class BatchingTests(SynchronousTestCase):
    def test_one_flush_per_turn_in_full_datagrams(self) -> None:
        s = Script(max_in_flight=MAX_IN_FLIGHT)
        keys = [f"{i:06d}-" + "c" * 32 for i in range(300)]
        for key in keys:
            s.up(key)
        self.assertEqual(s.wire.sent, [])  # nothing until the turn ends
        sent = s.turn()
        self.assertEqual(sorted(sessions_in(sent)), keys)
        codec = Codec(b"k", s.clock)
        sizes = [len(codec.encode(Envelope(1, 1, 1, int(NOW * 1000), m))) for _, m in sent]
        self.assertTrue(all(size <= MAX_DATAGRAM for size in sizes))
        self.assertTrue(all(size > MAX_DATAGRAM - 60 for size in sizes[:-1]), sizes)  # full but the last
        self.assertEqual(len({m.batch for _, m in sent if isinstance(m, SessionUp)}), len(sent))
        self.assertEqual({address for address, _ in sent}, {A})
        self.assertEqual(s.sender.stats["batches"], len(sent))

    def test_sessions_carry_kind_and_endpoint(self) -> None:
        s = Script()
        s.up("t", app="api", kind=SessionKind.TLS_SESSION, endpoint="[2001:db8::7]:443")
        [(_, message)] = s.turn()
        self.assertEqual(message, SessionUp(1, (Session("api", "t", SessionKind.TLS_SESSION, "[2001:db8::7]:443"),)))

    def test_unchanged_announcement_sends_nothing(self) -> None:
        s = Script()
        s.up("k")
        s.ack_all(s.turn())
        s.up("k")
        self.assertEqual(s.turn(), [])
        s.up("k", kind=SessionKind.USER)
        [(_, message)] = s.turn()
        assert isinstance(message, SessionUp)
        self.assertEqual(message.sessions[0].kind, SessionKind.USER)

    def test_window_limits_batches_in_flight(self) -> None:
        s = Script(max_in_flight=2)
        for i in range(100):
            s.up(f"{i:03d}" + "x" * 60)
        first = s.turn()
        self.assertEqual(len(first), 2)
        self.assertEqual(s.sender.in_flight, 2)
        self.assertGreater(s.sender.backlog, 0)
        s.ack_all(first)
        second = s.turn()
        self.assertEqual(len(second), 2)
        self.assertFalse(set(sessions_in(first)) & set(sessions_in(second)))

    def test_batch_ids_stay_within_the_span_a_unit_remembers(self) -> None:
        self.assertLess(MAX_BATCH_SPAN, DEDUPE_WINDOW)
        s = Script(max_in_flight=4)
        for i in range(MAX_BATCH_SPAN * 20):  # some 600 batches' worth
            s.up(f"{i:05d}" + "x" * 60)
        stuck = s.turn()
        # Every batch but the first is acknowledged, again and again: the first
        # one, retried, must never fall out of the unit's dedupe window.
        oldest = stuck[0][1]
        assert isinstance(oldest, SessionUp)
        sent = stuck[1:]
        highest = oldest.batch
        while sent:
            s.ack_all(sent)
            sent = s.turn()
            for _, m in sent:
                assert isinstance(m, SessionUp)
                highest = max(highest, m.batch)
        self.assertLess(highest - oldest.batch, MAX_BATCH_SPAN)
        self.assertGreater(s.sender.backlog, 0)  # stalled until the old batch is acked
        s.ack(oldest.batch)
        self.assertGreater(len(s.turn()), 0)


class CoalescingTests(SynchronousTestCase):
    def test_up_then_down_unseen_by_the_unit_sends_nothing(self) -> None:
        s = Script()
        s.up("k")
        s.sender.down("web", "k")
        self.assertEqual(s.turn(), [])
        self.assertEqual(s.sender.stats["coalesced"], 1)

    def test_down_then_up_of_a_known_session_sends_the_up(self) -> None:
        s = Script()
        s.up("k")
        s.ack_all(s.turn())
        s.sender.down("web", "k")
        s.up("k", kind=SessionKind.USER)
        sent = s.turn()
        self.assertEqual((sessions_in(sent), downs_in(sent)), (["k"], []))

    def test_update_then_down_of_a_known_session_sends_one_down(self) -> None:
        s = Script()
        s.up("k")
        s.ack_all(s.turn())
        s.up("k", kind=SessionKind.USER)
        s.sender.down("web", "k")
        sent = s.turn()
        self.assertEqual((sessions_in(sent), downs_in(sent)), ([], ["k"]))

    def test_a_session_in_flight_is_held(self) -> None:
        """The down waits for the up's ack: retried, the up could otherwise
        arrive after the down and bring the session back."""
        s = Script()
        s.up("k")
        [(_, up)] = s.turn()
        s.sender.down("web", "k")
        s.up("other")
        sent = s.turn()
        self.assertEqual((sessions_in(sent), downs_in(sent)), (["other"], []))
        assert isinstance(up, SessionUp)
        s.ack(up.batch)
        self.assertEqual(downs_in(s.turn()), ["k"])

    def test_up_down_up_down_while_held_still_ends_with_a_down(self) -> None:
        s = Script()
        s.up("k")
        [(_, up)] = s.turn()
        for _ in range(2):
            s.sender.down("web", "k")
            s.up("k")
        s.sender.down("web", "k")
        self.assertEqual(s.turn(), [])
        assert isinstance(up, SessionUp)
        s.ack(up.batch)
        self.assertEqual(downs_in(s.turn()), ["k"])


class RetryTests(SynchronousTestCase):
    def test_retried_every_ack_timeout_until_acked(self) -> None:
        s = Script()
        s.up("k")
        [(_, first)] = s.turn()
        retries = s.tick_for(ACK_TIMEOUT * 3.5)
        self.assertEqual([m for _, m in retries], [first, first, first])
        assert isinstance(first, SessionUp)
        s.ack(first.batch)
        self.assertEqual(s.tick_for(ACK_TIMEOUT * 3), [])
        self.assertEqual(s.sender.stats["retries"], 3)
        self.assertTrue(s.sender.bound)

    def test_unknown_and_duplicate_acks_are_ignored(self) -> None:
        s = Script()
        s.up("k")
        [(_, first)] = s.turn()
        assert isinstance(first, SessionUp)
        s.ack(first.batch + 7)
        self.assertEqual(s.sender.in_flight, 1)
        s.ack(first.batch)
        s.ack(first.batch)
        self.assertEqual(s.sender.stats["stale_acks"], 2)

    def test_only_acks_reach_receive(self) -> None:
        s = Script()
        self.assertRaises(TypeError, s.sender.receive, A, Envelope(UNIT_A, 1, 1, 0, GetSnapshot(1)))


class FailoverTests(SynchronousTestCase):
    def bound_script(self) -> Script:
        """Bound to A, which has sessions a and b; c is in flight, unacked."""
        s = Script(units=(A, B, C))
        s.up("a")
        s.up("b")
        s.ack_all(s.turn())
        s.up("c")
        s.up("gone")
        s.ack_all(s.turn())
        s.sender.down("web", "gone")
        s.up("c", kind=SessionKind.USER)  # held until c's ack... which never comes
        sent = s.turn()
        self.assertEqual(downs_in(sent), ["gone"])
        return s

    def test_binds_to_the_next_unit_after_misses_and_resends_everything(self) -> None:
        s = self.bound_script()
        before = s.tick_for(BIND_FAILOVER * ACK_TIMEOUT - 0.01)
        self.assertEqual({address for address, _ in before}, {A})
        after = s.tick_for(0.1)
        self.assertEqual({address for address, _ in after}, {B})
        self.assertEqual(s.sender.unit, B)
        self.assertFalse(s.sender.bound)
        # The table in full, and the down A may not have applied.
        self.assertEqual(sorted(sessions_in(after)), ["a", "b", "c"])
        self.assertEqual(downs_in(after), ["gone"])
        self.assertEqual(s.sender.stats["failovers"], 1)
        # B acks: bound; a late ack from A matches nothing.
        s.ack_all(after, unit=UNIT_B, address=B)
        self.assertTrue(s.sender.bound)
        self.assertEqual(s.sender.in_flight, 0)
        s.ack(1)
        self.assertEqual(s.sender.stats["stale_acks"], 1)

    def test_first_unit_that_acks_is_bound(self) -> None:
        s = Script(units=(A, B))
        s.up("k")
        s.turn()
        sent = s.tick_for(BIND_FAILOVER * ACK_TIMEOUT + 0.05)
        [(address, message)] = [(a, m) for a, m in sent if a == B]
        self.assertEqual(sessions_in([(address, message)]), ["k"])
        assert isinstance(message, SessionUp)
        s.ack(message.batch, unit=UNIT_B, address=B)
        self.assertEqual((s.sender.unit, s.sender.bound), (B, True))

    def test_wraps_around_and_backs_off(self) -> None:
        s = Script(units=(A, B))
        s.up("k")
        s.turn()
        s.tick_for(2 * BIND_FAILOVER * ACK_TIMEOUT + 0.1)
        self.assertEqual((s.sender.unit, s.sender.stats["failovers"]), (A, 2))
        # Every unit tried: retries slow down, up to MAX_RETRY_INTERVAL.
        sent = s.tick_for(4.0)
        self.assertLess(len(sent), 4.0 / ACK_TIMEOUT)
        s.tick_for(60)
        quiet = s.tick_for(10 * MAX_RETRY_INTERVAL)
        self.assertLessEqual(len(quiet), 11)
        self.assertGreaterEqual(len(quiet), 4)

    def test_one_unit_keeps_its_batches_and_backs_off(self) -> None:
        s = Script()
        s.up("k")
        [(_, first)] = s.turn()
        s.tick_for(30)
        self.assertEqual(s.sender.stats["rebinds"], 0)
        sent = s.tick_for(10 * MAX_RETRY_INTERVAL)
        self.assertEqual({m for _, m in sent}, {first})
        self.assertLessEqual(len(sent), 11)
        assert isinstance(first, SessionUp)
        s.ack(first.batch)
        self.assertEqual(s.tick_for(KEEPALIVE_INTERVAL - 1), [])

    def test_a_unit_restart_gets_the_whole_table(self) -> None:
        s = Script()
        for key in "abc":
            s.up(key)
        s.ack_all(s.turn(), epoch=1)
        s.up("d")
        [(_, d)] = s.turn()
        assert isinstance(d, SessionUp)
        s.ack(d.batch, epoch=2)  # the unit restarted since it last acked
        resent = s.turn()
        self.assertEqual(sorted(sessions_in(resent)), ["a", "b", "c", "d"])
        self.assertEqual(s.sender.stats["unit_restarts"], 1)
        s.ack_all(resent, epoch=2)
        self.assertTrue(s.sender.bound)

    def test_a_restart_seen_in_other_messages(self) -> None:
        s = Script()
        s.up("a")
        s.ack_all(s.turn(), epoch=5)
        s.sender.observe(A, Envelope(UNIT_A, 5, 1, 0, GetSnapshot(1)))
        self.assertEqual(s.turn(), [])
        s.sender.observe(A, Envelope(999, 9, 1, 0, GetSnapshot(1)))  # another unit: not ours
        self.assertEqual(s.turn(), [])
        s.sender.observe(A, Envelope(UNIT_A, 6, 1, 0, GetSnapshot(1)))
        self.assertEqual(sessions_in(s.turn()), ["a"])

    def test_another_unit_took_the_address(self) -> None:
        s = Script()
        s.up("a")
        s.ack_all(s.turn())
        s.up("b")
        [(_, b)] = s.turn()
        assert isinstance(b, SessionUp)
        s.ack(b.batch, unit=UNIT_B)  # IP takeover: unit B answers at A's address
        self.assertEqual(sorted(sessions_in(s.turn())), ["a", "b"])


class KeepaliveTests(SynchronousTestCase):
    def test_probes_at_start_and_when_idle(self) -> None:
        s = Script()
        [(_, probe)] = s.tick_for(0.05)
        self.assertEqual(probe, SessionUp(1, ()))
        s.ack(1)
        self.assertTrue(s.sender.bound)
        self.assertEqual(s.tick_for(KEEPALIVE_INTERVAL - 0.1), [])
        [(_, probe)] = s.tick_for(0.2)
        self.assertEqual(probe, SessionUp(2, ()))
        self.assertEqual(s.sender.stats["keepalives"], 2)

    def test_an_idle_agent_fails_over_from_a_dead_unit(self) -> None:
        s = Script(units=(A, B))
        s.tick_for(0.05)
        s.ack(1)
        s.tick_for(KEEPALIVE_INTERVAL + BIND_FAILOVER * ACK_TIMEOUT + 0.1)
        self.assertEqual(s.sender.unit, B)

    def test_stopped_sends_nothing(self) -> None:
        s = Script()
        s.up("a")
        s.sender.stop()
        self.assertEqual(s.turn(), [])
        self.assertEqual(s.tick_for(10), [])


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.acks = Wire()
        self.ups: list[tuple[str, str, SessionKind, str, int]] = []
        self.downs: list[tuple[str, str, int]] = []
        self.receiver = SessionReceiver(self.acks, lambda *a: self.ups.append(a), lambda *a: self.downs.append(a))

    def deliver(self, message: SessionUp | SessionDown, agent: int = 7, epoch: int = 1) -> None:
        self.receiver.receive(("10.0.0.7", 5000), Envelope(agent, epoch, 1, 0, message))

    def test_applies_and_acks(self) -> None:
        self.deliver(SessionUp(1, (Session("web", "k", COOKIE, EP),)))
        self.deliver(SessionDown(2, (SessionRef("web", "k"),)))
        self.assertEqual(self.ups, [("web", "k", COOKIE, EP, 7)])
        self.assertEqual(self.downs, [("web", "k", 7)])
        self.assertEqual(self.acks.take(), [(("10.0.0.7", 5000), SessionAck(1)), (("10.0.0.7", 5000), SessionAck(2))])

    def test_duplicates_are_acked_not_applied(self) -> None:
        up = SessionUp(5, (Session("web", "k", COOKIE, EP),))
        self.deliver(up)
        self.deliver(SessionDown(6, (SessionRef("web", "k"),)))
        self.deliver(up)  # a late retry crossing the down
        self.assertEqual(len(self.ups), 1)
        self.assertEqual([m for _, m in self.acks.take()], [SessionAck(5), SessionAck(6), SessionAck(5)])
        self.assertEqual(self.receiver.stats["duplicates"], 1)

    def test_out_of_order_within_the_window(self) -> None:
        for batch in [10, 8, 9, 8, 10, 11]:
            self.deliver(SessionUp(batch, ()))
        self.assertEqual(self.receiver.stats["batches"], 4)
        self.assertEqual(self.receiver.stats["duplicates"], 2)
        self.deliver(SessionUp(11 - DEDUPE_WINDOW, ()))  # below the window: taken for a duplicate
        self.assertEqual(self.receiver.stats["duplicates"], 3)
        self.assertEqual(len(self.acks.take()), 7)

    def test_batch_ids_wrap(self) -> None:
        for batch in [2**32 - 2, 2**32 - 1, 0, 1, 2**32 - 1]:
            self.deliver(SessionUp(batch, ()))
        self.assertEqual((self.receiver.stats["batches"], self.receiver.stats["duplicates"]), (4, 1))

    def test_agent_restart_starts_a_new_window(self) -> None:
        self.deliver(SessionUp(1, ()), epoch=1)
        self.deliver(SessionUp(1, ()), epoch=2)
        self.deliver(SessionUp(2, ()), epoch=1)  # the old incarnation: acked only
        self.assertEqual(self.receiver.stats["batches"], 2)
        self.assertEqual(self.receiver.stats["old_epoch"], 1)
        self.assertEqual(len(self.acks.take()), 3)

    def test_agents_are_independent_and_bounded(self) -> None:
        receiver = SessionReceiver(self.acks, lambda *a: None, lambda *a: None, max_agents=2)
        for agent in (1, 2, 3):
            receiver.receive(A, Envelope(agent, 1, 1, 0, SessionUp(1, ())))
        self.assertEqual(receiver.stats["forgotten"], 1)
        receiver.receive(A, Envelope(3, 1, 1, 0, SessionUp(1, ())))
        self.assertEqual(receiver.stats["duplicates"], 1)
        self.assertRaises(ValueError, SessionReceiver, self.acks, print, print, 0)

    def test_handles_only_session_messages(self) -> None:
        self.assertTrue(SessionReceiver.handles(SessionUp(1, ())))
        self.assertTrue(SessionReceiver.handles(SessionDown(1, ())))
        self.assertFalse(SessionReceiver.handles(Heartbeat(1, 1)))
        self.assertRaises(TypeError, self.receiver.receive, A, Envelope(1, 1, 1, 0, Heartbeat(1, 1)))


class LossyLink:
    """Agent and units through the real codec and replay guards, with a
    network that loses, duplicates and reorders datagrams."""

    SECRET = b"fleet secret"

    def __init__(self, rng: random.Random, loss: float, units: tuple[tuple[str, int], ...] = (A,)) -> None:
        self.rng = rng
        self.loss = loss
        self.clock = clock()
        self.codec = Codec(self.SECRET, self.clock)
        self.dead: set[tuple[str, int]] = set()
        self.in_transit: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []  # (from, to, datagram)
        self.agent_seq = 0
        self.agent_guard = ReplayGuard()
        self.sender = SessionSender(units, self.clock, self._agent_send)
        self.views: dict[tuple[str, int], dict[tuple[str, str], tuple[SessionKind, str]]] = {}
        self.receivers: dict[tuple[str, int], tuple[SessionReceiver, ReplayGuard, list[int]]] = {}
        for i, unit in enumerate(units):
            self.views[unit] = {}
            view = self.views[unit]
            seq = [0]

            def ack(address: tuple[str, int], message: Message, unit: tuple[str, int] = unit, i: int = i,
                    seq: list[int] = seq) -> None:
                seq[0] += 1
                envelope = Envelope(200 + i, 1, seq[0], int(self.clock.seconds() * 1000), message)
                self._transmit(unit, address, self.codec.encode(envelope))

            def on_up(app: str, key: str, kind: SessionKind, endpoint: str, agent: int,
                      view: dict[tuple[str, str], tuple[SessionKind, str]] = view) -> None:
                view[(app, key)] = (kind, endpoint)

            def on_down(app: str, key: str, agent: int,
                        view: dict[tuple[str, str], tuple[SessionKind, str]] = view) -> None:
                view.pop((app, key), None)

            self.receivers[unit] = (SessionReceiver(ack, on_up, on_down), ReplayGuard(), seq)

    AGENT = ("10.0.0.7", 5000)

    def _agent_send(self, address: tuple[str, int], message: Message) -> None:
        self.agent_seq += 1
        envelope = Envelope(7, 1, self.agent_seq, int(self.clock.seconds() * 1000), message)
        self._transmit(self.AGENT, address, self.codec.encode(envelope))

    def _transmit(self, source: tuple[str, int], to: tuple[str, int], datagram: bytes) -> None:
        if self.rng.random() < self.loss:
            return
        self.in_transit.append((source, to, datagram))
        if self.rng.random() < self.loss:
            self.in_transit.append((source, to, datagram))  # duplicated

    def deliver(self) -> None:
        """Deliver what is in transit, shuffled."""
        batch, self.in_transit = self.in_transit, []
        self.rng.shuffle(batch)
        for source, to, datagram in batch:
            if to == self.AGENT:
                envelope = self.codec.decode(datagram, SENDER_UNIT_KINDS)
                if envelope is not None and self.agent_guard.accept(envelope):
                    self.sender.receive(source, envelope)
            elif to not in self.dead:
                receiver, guard, _ = self.receivers[to]
                envelope = self.codec.decode(datagram, SENDER_AGENT_KINDS)
                if envelope is not None and guard.accept(envelope):
                    receiver.receive(source, envelope)

    def settled(self, unit: tuple[str, int] = A) -> bool:
        sender = self.sender
        return sender.backlog == 0 and sender.unacknowledged == 0 and self.views[unit] == self.table()

    def run(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end and not until():
            self.clock.advance(0.01)
            self.deliver()
            if round(self.clock.seconds() * 100) % 5 == 0:
                self.sender.tick()

    def table(self) -> dict[tuple[str, str], tuple[SessionKind, str]]:
        return {e.id: (e.kind, e.endpoint) for e in self.sender.table}


operations = st.lists(
    st.tuples(st.sampled_from(["up", "down", "turn"]), st.integers(0, 15), st.sampled_from(SessionKind)),
    max_size=120,
)


class ConvergenceTests(SynchronousTestCase):
    @settings(deadline=None, max_examples=60)
    @given(operations, st.floats(0, 0.4), st.integers(0, 2**32))
    def test_the_unit_converges_on_the_table(self, ops: list[tuple[str, int, SessionKind]], loss: float,
                                             seed: int) -> None:
        link = LossyLink(random.Random(seed), loss)
        for op, n, kind in ops:
            if op == "up":
                link.sender.up("web", f"k{n}", kind, EP)
            elif op == "down":
                link.sender.down("web", f"k{n}")
            else:
                link.clock.advance(0)
                link.deliver()
        link.run(60, link.settled)
        self.assertEqual(link.views[A], link.table())
        self.assertEqual((link.sender.backlog, link.sender.unacknowledged), (0, 0))

    def test_after_failover_the_new_unit_has_every_session(self) -> None:
        link = LossyLink(random.Random(5), 0.1, units=(A, B))
        for i in range(500):
            link.sender.up("web", f"s{i}", COOKIE, EP)
        link.run(10, link.settled)
        self.assertEqual(link.views[A], link.table())
        link.dead.add(A)
        for i in range(0, 500, 2):
            link.sender.down("web", f"s{i}")
        link.sender.up("web", "late", COOKIE, EP)
        link.run(20, lambda: link.settled(B))
        self.assertEqual(link.sender.unit, B)
        self.assertEqual(link.views[B], link.table())
        self.assertEqual(len(link.table()), 251)


# -- the agent API's session routes ------------------------------------------------------------

WEB = RowKey("web", EP)
API1 = RowKey("api", "10.0.0.7:9000")
API2 = RowKey("api", "10.0.0.7:9001")


class ApiFixture:
    def __init__(self, max_sessions: int | None = None) -> None:
        self.clock = clock()
        self.wire = Wire()
        self.table = HealthTable([AppSpec(WEB), AppSpec(API1), AppSpec(API2)], self.clock)
        self.sender = SessionSender((A,), self.clock, self.wire,
                                    SessionTable(max_sessions) if max_sessions else None)
        self.resource = AgentApi(self.table, lambda changes: None, "host-7", self.sender)

    def call(self, method: bytes, path: str, body: Any = b"", args: dict[str, str] | None = None) -> tuple[int, Any]:
        request: Any = DummyRequest([segment.encode() for segment in path.lstrip("/").split("/")])
        request.method = method
        request.content = BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
        request.args = {k.encode(): [v.encode()] for k, v in (args or {}).items()}
        result = self.resource.render(request)
        assert result is not NOT_DONE_YET
        return request.responseCode or 200, json.loads(result)


class ApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = ApiFixture()

    def test_announce_one(self) -> None:
        code, doc = self.f.call(b"POST", "/v1/sessions", {"app": "web", "key": "c00kie"})
        self.assertEqual(code, 201)
        self.assertEqual(doc, {"app": "web", "key": "c00kie", "kind": "http-cookie", "endpoint": EP, "since": NOW})
        code, _ = self.f.call(b"POST", "/v1/sessions", {"app": "web", "key": "c00kie"})
        self.assertEqual(code, 200)
        self.f.clock.advance(0)
        [(address, message)] = self.f.wire.take()
        self.assertEqual((address, message), (A, SessionUp(1, (Session("web", "c00kie", COOKIE, EP),))))

    def test_kinds_and_endpoints(self) -> None:
        code, doc = self.f.call(b"POST", "/v1/sessions",
                                {"app": "api", "key": "u", "kind": "user", "endpoint": "10.0.0.7:9001"})
        self.assertEqual((code, doc["kind"], doc["endpoint"]), (201, "user", "10.0.0.7:9001"))
        code, doc = self.f.call(b"POST", "/v1/sessions", {"app": "api", "key": "v"})
        self.assertEqual(code, 400)
        self.assertIn("endpoint", doc["error"])
        code, doc = self.f.call(b"POST", "/v1/sessions", {"app": "api", "key": "v", "endpoint": "10.0.0.7:1"})
        self.assertEqual(code, 400)

    def test_bulk_list(self) -> None:
        items = [{"app": "web", "key": f"k{i}"} for i in range(2000)] + [{"app": "web", "key": "k0"}]
        code, doc = self.f.call(b"POST", "/v1/sessions", items)
        self.assertEqual((code, doc), (200, {"accepted": 2001, "created": 2000}))
        self.assertEqual(len(self.f.sender.table), 2000)
        self.f.clock.advance(0)
        self.assertEqual(len(self.f.wire.take()), MAX_IN_FLIGHT)  # the window, of full batches

    def test_bulk_list_is_all_or_nothing(self) -> None:
        items: list[Any] = [{"app": "web", "key": "a"}, {"app": "web", "key": ""}]
        code, doc = self.f.call(b"POST", "/v1/sessions", items)
        self.assertEqual(code, 400)
        self.assertIn("item 1", doc["error"])
        self.assertEqual(len(self.f.sender.table), 0)
        code, doc = self.f.call(b"POST", "/v1/sessions", [{"app": "web", "key": "x"}] * (MAX_SESSIONS_PER_REQUEST + 1))
        self.assertEqual(code, 400)

    def test_bad_announcements(self) -> None:
        for body, word in [
            (b"not json", "JSON"),
            ({"key": "k"}, "app"),
            ({"app": "web"}, "key"),
            ({"app": "web", "key": 5}, "string"),
            ({"app": "web", "key": "k", "kind": "tcp"}, "kind"),
            ({"app": "web", "key": "k", "ttl": 5}, "unknown key"),
            ({"app": "nope", "key": "k"}, "not served"),
            ({"app": "web", "key": "k" * 256}, "255"),
            (["a"], "object"),
        ]:
            with self.subTest(body=body):
                code, doc = self.f.call(b"POST", "/v1/sessions", body)
                self.assertEqual(code, 400)
                self.assertIn(word, doc["error"])

    def test_full_table_is_503_and_applies_nothing(self) -> None:
        f = ApiFixture(max_sessions=2)
        f.call(b"POST", "/v1/sessions", {"app": "web", "key": "a"})
        code, _ = f.call(b"POST", "/v1/sessions", [{"app": "web", "key": "a"}, {"app": "web", "key": "b"}])
        self.assertEqual(code, 200)
        code, doc = f.call(b"POST", "/v1/sessions", [{"app": "web", "key": "c"}, {"app": "web", "key": "d"}])
        self.assertEqual(code, 503)
        self.assertEqual(sorted(e.key for e in f.sender.table), ["a", "b"])

    def test_delete(self) -> None:
        self.f.call(b"POST", "/v1/sessions", {"app": "web", "key": "a/b c"})
        # The key is one path segment (Twisted unquotes %2F inside it).
        request: Any = DummyRequest([b"v1", b"sessions", b"a/b c"])
        request.method = b"DELETE"
        request.args = {}
        self.assertEqual(json.loads(self.f.resource.render(request))["key"], "a/b c")
        self.assertEqual(len(self.f.sender.table), 0)
        self.f.clock.advance(0)
        self.assertEqual(self.f.wire.take(), [])  # up and down in one turn: coalesced away
        code, doc = self.f.call(b"DELETE", "/v1/sessions/a")
        self.assertEqual(code, 404)
        self.assertIn("no session", doc["error"])

    def test_delete_needs_app_only_when_ambiguous(self) -> None:
        self.f.call(b"POST", "/v1/sessions", {"app": "web", "key": "k"})
        self.f.call(b"POST", "/v1/sessions", {"app": "api", "key": "k", "endpoint": "10.0.0.7:9000"})
        code, doc = self.f.call(b"DELETE", "/v1/sessions/k")
        self.assertEqual(code, 400)
        self.assertIn("name one", doc["error"])
        code, doc = self.f.call(b"DELETE", "/v1/sessions/k", args={"app": "api"})
        self.assertEqual((code, doc["app"]), (200, "api"))
        code, doc = self.f.call(b"DELETE", "/v1/sessions/k")
        self.assertEqual((code, doc["app"]), (200, "web"))
        code, _ = self.f.call(b"DELETE", "/v1/sessions/k", args={"app": "nope"})
        self.assertEqual(code, 400)

    def test_bulk_end(self) -> None:
        self.f.call(b"POST", "/v1/sessions", [{"app": "web", "key": k} for k in "abc"])
        code, doc = self.f.call(b"POST", "/v1/sessions/end", [{"key": "a"}, {"app": "web", "key": "b"}, {"key": "z"}])
        self.assertEqual((code, doc), (200, {"ended": 2, "missing": 1}))
        code, doc = self.f.call(b"POST", "/v1/sessions/end", {"key": "c"})
        self.assertEqual((code, doc), (200, {"ended": 1, "missing": 0}))
        code, _ = self.f.call(b"POST", "/v1/sessions/end", {"key": "c", "kind": "user"})
        self.assertEqual(code, 400)

    def test_a_session_named_end(self) -> None:
        self.f.call(b"POST", "/v1/sessions", {"app": "web", "key": "end"})
        self.assertEqual(self.f.call(b"GET", "/v1/sessions/end")[1]["key"], "end")
        self.assertEqual(self.f.call(b"DELETE", "/v1/sessions/end")[0], 200)

    def test_listing_pages(self) -> None:
        self.f.call(b"POST", "/v1/sessions", [{"app": "web", "key": f"k{i:02d}"} for i in range(25)])
        self.f.call(b"POST", "/v1/sessions", {"app": "api", "key": "x", "endpoint": "10.0.0.7:9000"})
        code, doc = self.f.call(b"GET", "/v1/sessions", args={"limit": "10", "app": "web"})
        self.assertEqual((code, doc["total"], len(doc["sessions"]), doc["next"]), (200, 25, 10, "web/k09"))
        self.assertEqual(doc["tracking"]["unit"], "10.0.0.1:9903")
        keys = [s["key"] for s in doc["sessions"]]
        while doc["next"]:
            code, doc = self.f.call(b"GET", "/v1/sessions", args={"limit": "10", "app": "web", "after": doc["next"]})
            keys += [s["key"] for s in doc["sessions"]]
        self.assertEqual(keys, [f"k{i:02d}" for i in range(25)])
        code, doc = self.f.call(b"GET", "/v1/sessions")
        self.assertEqual((doc["total"], doc["sessions"][0]["app"], doc["next"]), (26, "api", None))
        for args in [{"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"limit": "²"}, {"after": "nocursor"},
                     {"app": "nope"}]:
            with self.subTest(args=args):
                self.assertEqual(self.f.call(b"GET", "/v1/sessions", args=args)[0], 400)

    def test_methods(self) -> None:
        request: Any = DummyRequest([b"v1", b"sessions", b"k"])
        request.method = b"PUT"
        self.f.resource.render(request)
        self.assertEqual(request.responseCode, 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Allow"), [b"GET, DELETE, HEAD"])
        self.assertEqual(self.f.call(b"DELETE", "/v1/sessions")[0], 405)

    def test_without_session_tracking_the_routes_are_absent(self) -> None:
        resource = AgentApi(self.f.table, lambda changes: None, "host-7")
        request: Any = DummyRequest([b"v1", b"sessions"])
        request.method = b"GET"
        resource.render(request)
        self.assertEqual(request.responseCode, 404)

    def test_bulk_body_limit_over_http(self) -> None:
        site = make_api_site(self.f.table, lambda changes: None, "host-7", self.f.clock, self.f.sender)
        items = json.dumps([{"app": "web", "key": f"{i:08d}" + "k" * 90} for i in range(9000)]).encode()
        self.assertGreater(len(items), 64 * 1024)
        [(response, answer)] = exchange(
            site, b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(items), items)
        )
        self.assertEqual((response.status_code, json.loads(answer)["created"]), (200, 9000))
        body = b" " * (MAX_SESSIONS_BODY + 1)
        [(response, _)] = exchange(
            site, b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(response.status_code, 413)
