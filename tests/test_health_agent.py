"""The host agent's protocol core (heartbeats, row changes, snapshots, the
postulate cycle, goodbye) as event scripts against a fake clock and a
recording ``send``; and the agent's checks and load measurement against
fakes.  Everything here runs under trial and pytest alike."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IConnector
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.agent.checks import CheckState, EndpointCheck, check_request, parse_status_line
from nlbproxy.agent.config import CheckConfig
from nlbproxy.agent.load import CpuLoad, parse_cpu_line
from nlbproxy.health.agent import (
    HEARTBEAT_INTERVAL,
    NAME_EVERY,
    POSTULATE_DELAY,
    POSTULATE_MAX_WAIT,
    POSTULATE_RETRY,
    SNAPSHOT_MIN_INTERVAL,
    Address,
    AgentCore,
)
from nlbproxy.health.messages import (
    Directive,
    Envelope,
    GetSnapshot,
    Goodbye,
    Health,
    Heartbeat,
    Message,
    Op,
    Postulate,
    PostulateWrong,
    RowChange,
    RowKey,
    SendSnapshot,
)
from nlbproxy.health.table import AppSpec, HealthTable, Source

UNIT_A: Address = ("10.0.0.1", 9903)
UNIT_B: Address = ("10.0.0.2", 9903)
WEB = RowKey("web", "10.0.0.7:8080")
API = RowKey("api", "10.0.0.7:9000")


def envelope(message: Message, seq: int = 1) -> Envelope:
    return Envelope(sender=99, epoch=1, seq=seq, sent_ms=0, message=message)


class Harness:
    """An AgentCore on a fake clock whose sends are recorded."""

    def __init__(self, units: tuple[Address, ...] = (UNIT_A, UNIT_B), handoff: str = "") -> None:
        self.clock = Clock()
        self.table = HealthTable([AppSpec(WEB, 40), AppSpec(API, 10)], self.clock)
        self.sent: list[tuple[Address, Message]] = []
        self.core = AgentCore("host-7", list(units), self.table, self.clock,
                              lambda a, m: self.sent.append((a, m)), handoff)

    def take(self, kind: type | None = None) -> list[tuple[Address, Any]]:
        """What was sent since the last take (of ``kind`` only, the rest dropped)."""
        sent, self.sent = self.sent, []
        return [(a, m) for a, m in sent if kind is None or isinstance(m, kind)]

    def wrong(self, unit: Address, key: RowKey, postulated: Directive, actual: Directive) -> None:
        self.core.receive(unit, envelope(PostulateWrong(key, postulated, actual)))

    def operator(self, app: str, directive: Directive | None) -> None:
        self.core.publish(self.table.set_directive(app, Source.OPERATOR, directive, "test"))


class HeartbeatTests(SynchronousTestCase):
    def test_cadence_and_contents(self) -> None:
        h = Harness(handoff="tcp:9910")
        beats = []
        for _ in range(2 * NAME_EVERY):
            h.core.tick()
            h.clock.advance(HEARTBEAT_INTERVAL)
            beats.append(h.take())
        for sent in beats:
            self.assertEqual([a for a, _ in sent], [UNIT_A, UNIT_B])
            for _, m in sent:
                self.assertIsInstance(m, Heartbeat)
                self.assertEqual((m.generation, m.checksum), (0, h.table.checksum()))
        named = [i for i, sent in enumerate(beats) if sent[0][1].name]
        self.assertEqual(named, [0, NAME_EVERY])
        self.assertEqual((beats[0][0][1].name, beats[0][0][1].handoff), ("host-7", "tcp:9910"))
        self.assertEqual(beats[1][0][1].handoff, "")

    def test_heartbeat_follows_the_table(self) -> None:
        h = Harness()
        h.core.publish(h.table.report("web", health=Health.DOWN))
        h.take()
        h.core.tick()
        (_, beat), _ = h.take()
        self.assertEqual((beat.generation, beat.checksum), (1, h.table.checksum()))

    def test_needs_a_unit(self) -> None:
        self.assertRaises(ValueError, AgentCore, "h", [], HealthTable([], Clock()), Clock(), lambda a, m: None)


class RowChangeTests(SynchronousTestCase):
    def test_change_goes_to_every_unit_at_once(self) -> None:
        h = Harness()
        h.core.publish(h.table.report("web", health=Health.DOWN, reason="oom"))
        sent = h.take()
        self.assertEqual([a for a, _ in sent], [UNIT_A, UNIT_B])
        change = sent[0][1]
        self.assertIsInstance(change, RowChange)
        self.assertEqual(change.generation, 1)
        (op,) = change.ops
        self.assertEqual((op.op, op.key, op.row.health, op.row.reason), (Op.UPDATE, WEB, Health.DOWN, "app down: oom"))

    def test_nothing_published_sends_nothing(self) -> None:
        h = Harness()
        h.core.publish(h.table.report("web", load=2))  # below the report hysteresis
        self.assertEqual(h.take(), [])


class SnapshotTests(SynchronousTestCase):
    def test_answer_goes_to_the_asker_only(self) -> None:
        h = Harness()
        h.core.publish(h.table.report("api", health=Health.DOWN))
        h.take()
        asker = ("10.0.0.9", 40000)
        h.core.receive(asker, envelope(GetSnapshot(1234)))
        sent = h.take()
        self.assertEqual({a for a, _ in sent}, {asker})
        parts: list[SendSnapshot] = [m for _, m in sent]
        self.assertEqual([(p.part, p.parts) for p in parts], [(0, 1)])
        self.assertEqual((parts[0].nonce, parts[0].generation, parts[0].checksum), (1234, 1, h.table.checksum()))
        self.assertEqual(parts[0].rows, h.table.rows())

    def test_rate_limited_per_address(self) -> None:
        h = Harness()
        h.core.receive(UNIT_A, envelope(GetSnapshot(1)))
        h.core.receive(UNIT_A, envelope(GetSnapshot(2), seq=2))
        h.core.receive(UNIT_B, envelope(GetSnapshot(3)))
        self.assertEqual([(a, m.nonce) for a, m in h.take()], [(UNIT_A, 1), (UNIT_B, 3)])
        self.assertEqual(h.core.stats["snapshot_rate_limited"], 1)
        h.clock.advance(SNAPSHOT_MIN_INTERVAL)
        h.core.receive(UNIT_A, envelope(GetSnapshot(4), seq=3))
        self.assertEqual([m.nonce for _, m in h.take()], [4])

    def test_agent_kinds_from_a_unit_are_a_wiring_bug(self) -> None:
        h = Harness()
        self.assertRaises(TypeError, h.core.receive, UNIT_A, envelope(Heartbeat(0, 0)))


class PostulateTests(SynchronousTestCase):
    def test_confirmed_when_no_unit_objects(self) -> None:
        h = Harness()
        h.operator("web", Directive.DRAINING)
        (_, change), _ = h.take()
        self.assertEqual((change.ops[0].row.target, change.ops[0].row.current), (Directive.DRAINING, Directive.ACTIVE))
        self.assertEqual(h.core.pending(), {WEB: Directive.DRAINING})
        h.clock.advance(POSTULATE_DELAY - 0.01)
        self.assertEqual(h.take(), [])
        h.clock.advance(0.01)
        self.assertEqual(h.take(), [(UNIT_A, Postulate(WEB, Directive.DRAINING)),
                                    (UNIT_B, Postulate(WEB, Directive.DRAINING))])
        h.clock.advance(POSTULATE_RETRY)
        sent = h.take()
        self.assertEqual([a for a, _ in sent], [UNIT_A, UNIT_B])
        (op,) = sent[0][1].ops
        self.assertEqual((op.row.target, op.row.current), (Directive.DRAINING, Directive.DRAINING))
        self.assertEqual(h.table.row(WEB).current, Directive.DRAINING)
        self.assertEqual(h.core.pending(), {})
        self.assertEqual(h.core.stats["postulate_confirmed"], 1)
        h.clock.advance(10)
        self.assertEqual(h.take(), [])

    def test_resent_while_a_unit_answers_wrong_then_confirmed(self) -> None:
        h = Harness()
        h.operator("web", Directive.INACTIVE)
        h.clock.advance(POSTULATE_DELAY)
        h.take()
        for _ in range(3):  # three rounds, unit B disagrees in each
            h.wrong(UNIT_B, WEB, Directive.INACTIVE, Directive.ACTIVE)
            h.clock.advance(POSTULATE_RETRY)
            self.assertEqual([m for _, m in h.take()], [Postulate(WEB, Directive.INACTIVE)] * 2)
            self.assertEqual(h.table.row(WEB).current, Directive.ACTIVE)
        h.clock.advance(POSTULATE_RETRY)  # a round with no wrong answer
        (_, change), _ = h.take()
        self.assertEqual(change.ops[0].row.current, Directive.INACTIVE)
        self.assertEqual(h.core.stats["postulates"], 4)

    def test_a_unit_that_dies_after_a_wrong_answer_does_not_block(self) -> None:
        h = Harness()
        h.operator("web", Directive.DRAINING)
        h.clock.advance(POSTULATE_DELAY)
        h.wrong(UNIT_A, WEB, Directive.DRAINING, Directive.ACTIVE)
        h.clock.advance(POSTULATE_RETRY)
        self.assertEqual(h.table.row(WEB).current, Directive.ACTIVE)
        # Unit A is gone: it sends nothing more; the next round passes.
        h.clock.advance(POSTULATE_RETRY)
        self.assertEqual(h.table.row(WEB).current, Directive.DRAINING)

    def test_a_unit_that_keeps_disagreeing_is_bounded_by_the_max_wait(self) -> None:
        h = Harness()
        h.operator("web", Directive.DRAINING)
        h.clock.advance(POSTULATE_DELAY)
        elapsed = POSTULATE_DELAY
        while h.table.row(WEB).current != Directive.DRAINING:
            h.wrong(UNIT_A, WEB, Directive.DRAINING, Directive.ACTIVE)
            h.clock.advance(POSTULATE_RETRY)
            elapsed += POSTULATE_RETRY
            self.assertLessEqual(elapsed, POSTULATE_MAX_WAIT + POSTULATE_RETRY)
        self.assertGreater(elapsed, POSTULATE_MAX_WAIT - 2 * POSTULATE_RETRY)
        self.assertEqual(h.core.stats["postulate_gave_up"], 1)
        self.flushLoggedErrors()

    def test_wrong_answers_for_another_cycle_are_stale(self) -> None:
        h = Harness()
        h.wrong(UNIT_A, WEB, Directive.DRAINING, Directive.ACTIVE)
        h.operator("web", Directive.DRAINING)
        h.wrong(UNIT_A, WEB, Directive.DRAINING, Directive.ACTIVE)  # before the first round
        h.clock.advance(POSTULATE_DELAY)
        h.wrong(UNIT_A, WEB, Directive.INACTIVE, Directive.ACTIVE)  # another directive
        h.clock.advance(POSTULATE_RETRY)
        self.assertEqual(h.table.row(WEB).current, Directive.DRAINING)
        self.assertEqual(h.core.stats["postulate_wrong_stale"], 3)

    def test_target_change_mid_cycle_restarts_it(self) -> None:
        h = Harness()
        h.operator("web", Directive.DRAINING)
        h.clock.advance(POSTULATE_DELAY)
        h.operator("web", Directive.INACTIVE)
        h.take()
        h.clock.advance(POSTULATE_RETRY)  # the draining round's end: cancelled
        self.assertEqual(h.table.row(WEB).current, Directive.ACTIVE)
        self.assertEqual([m for _, m in h.take()], [Postulate(WEB, Directive.INACTIVE)] * 2)
        h.clock.advance(POSTULATE_RETRY)
        self.assertEqual(h.table.row(WEB).current, Directive.INACTIVE)

    def test_target_back_to_current_ends_the_cycle(self) -> None:
        h = Harness()
        h.operator("web", Directive.DRAINING)
        h.operator("web", None)
        self.assertEqual(h.core.pending(), {})
        h.take()
        h.clock.advance(10)
        self.assertEqual(h.take(), [])

    def test_check_failure_drains_through_the_cycle(self) -> None:
        h = Harness()
        h.core.publish(h.table.check_result(API, False, "refused"))
        h.clock.pump([POSTULATE_DELAY, POSTULATE_RETRY])
        row = h.table.row(API)
        self.assertEqual((row.health, row.target, row.current), (Health.DOWN, Directive.DRAINING, Directive.DRAINING))


class GoodbyeTests(SynchronousTestCase):
    def test_goodbye_to_every_unit_and_timers_stop(self) -> None:
        h = Harness()
        h.operator("web", Directive.DRAINING)
        h.take()
        h.core.goodbye()
        self.assertEqual(h.take(), [(UNIT_A, Goodbye()), (UNIT_B, Goodbye())])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.operator("api", Directive.DRAINING)  # late change: sent, but no new cycle
        self.assertEqual(h.clock.getDelayedCalls(), [])


class CheckStateTests(SynchronousTestCase):
    def test_first_result_decides_then_rise_and_fall(self) -> None:
        state = CheckState(rise=2, fall=3)
        self.assertIsNone(state.up)
        self.assertTrue(state.record(True))
        self.assertFalse(state.record(False, "HTTP 500"))
        self.assertFalse(state.record(False, "HTTP 500"))
        self.assertFalse(state.record(True))  # streak broken
        self.assertFalse(state.record(False, "a"))
        self.assertFalse(state.record(False, "b"))
        self.assertTrue(state.record(False, "c"))
        self.assertEqual((state.up, state.reason), (False, "c"))
        self.assertFalse(state.record(True))
        self.assertTrue(state.record(True))
        self.assertTrue(state.up)

    def test_first_failure_is_down_at_once(self) -> None:
        state = CheckState(2, 2)
        self.assertTrue(state.record(False, "connection refused"))
        self.assertFalse(state.up)

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, CheckState, 0, 1)


class StatusLineTests(SynchronousTestCase):
    def test_verdicts(self) -> None:
        self.assertEqual(parse_status_line(b"HTTP/1.1 200 OK\r\n"), (True, "HTTP 200"))
        self.assertEqual(parse_status_line(b"HTTP/1.0 302 Found\r\nLocation: /\r\n"), (True, "HTTP 302"))
        self.assertEqual(parse_status_line(b"HTTP/1.1 503\r\n"), (False, "HTTP 503"))
        self.assertEqual(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), (False, "not an HTTP/1.x response"))
        self.assertIsNone(parse_status_line(b"HTTP/1.1 20"))
        self.assertEqual(parse_status_line(b"x" * 2000), (False, "status line too long"))

    def test_request(self) -> None:
        self.assertEqual(
            check_request("/healthz", "10.0.0.7:8080"),
            b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.7:8080\r\nUser-Agent: nlbagent-check\r\n"
            b"Accept: */*\r\nConnection: close\r\n\r\n",
        )


class EndpointCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.changes: list[tuple[RowKey, bool, str]] = []
        config = CheckConfig(path="/hz", interval=1.0, rise=2, fall=2, timeout=0.5)
        self.check = EndpointCheck(self.reactor, WEB, "10.0.0.7", 8080, config,
                                   lambda *change: self.changes.append(change))

    def connect(self) -> tuple[Any, StringTransport]:
        """The protocol of the last connection attempt, connected."""
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), ("10.0.0.7", 8080, 0.5))
        protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_pass_and_fail(self) -> None:
        self.check.start()
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), check_request("/hz", WEB.endpoint))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.changes, [(WEB, True, "")])
        for _ in range(2):
            self.reactor.advance(1.0)
            protocol, _ = self.connect()
            protocol.dataReceived(b"HTTP/1.1 503 Busy\r\n\r\n")
        self.assertEqual(self.changes[-1], (WEB, False, "HTTP 503"))
        self.check.stop()

    def test_timeout_and_refused(self) -> None:
        self.check.start()
        protocol, transport = self.connect()
        self.reactor.advance(0.5)  # no answer
        self.assertTrue(transport.disconnecting or getattr(transport, "aborted", False))
        self.assertEqual(self.changes, [(WEB, False, "timeout after 0.5 s")])
        self.reactor.advance(0.5)
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(cast(IConnector, None), Failure(ConnectionRefusedError()))
        self.assertEqual(self.check.state.reason, "connection refused")
        self.check.stop()

    def test_a_running_check_is_not_doubled_and_stop_is_quiet(self) -> None:
        self.check.start()
        self.assertIsNone(self.check.run())
        self.assertEqual(self.check.counts["skipped"], 1)
        self.check.stop()
        self.assertEqual(self.changes, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class CpuLoadTests(SynchronousTestCase):
    def test_busy_share_between_samples(self) -> None:
        lines = iter([
            "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n",
            "cpu  150 0 150 900 0 0 0 0 0 0\n",  # +100 busy of +200
            "cpu  150 0 150 900 0 0 0 0 0 0\n",  # no time passed
            "cpu  150 0 150 1000 100 0 0 0 0 0\n",  # idle and iowait only
        ])
        load = CpuLoad(lambda: next(lines))
        self.assertEqual([load.sample() for _ in range(4)], [None, 50, None, 0])

    def test_unreadable(self) -> None:
        def broken() -> str:
            raise OSError("no /proc")

        load = CpuLoad(broken)
        self.assertIsNone(load.sample())
        self.assertIsNone(CpuLoad(lambda: "intr 1 2 3\n").sample())
        self.flushLoggedErrors()

    def test_parse(self) -> None:
        self.assertEqual(parse_cpu_line("cpu  1 2 3 4 5 6 7 8 9 10\n"), (1 + 2 + 3 + 6 + 7 + 8, 36))
        self.assertRaises(ValueError, parse_cpu_line, "cpu0 1 2 3 4\n")

    def test_real_proc_stat_when_there_is_one(self) -> None:
        load = CpuLoad()
        load.sample()
        result = load.sample()
        self.assertTrue(result is None or 0 <= result <= 100)
