"""The consolidated cache: scripts of agent messages with loss, duplication,
reordering and restarts, against a fake clock, plus a Hypothesis property
that any lossy history converges once the network behaves."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.health import cache as cache_module
from nlbproxy.health.cache import DEAD_AFTER, SNAPSHOT_RETRY, TICK, ConsolidatedCache
from nlbproxy.health.codec import SENDER_AGENT_KINDS, Codec, ReplayGuard, snapshot_parts, table_checksum
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
    Row,
    RowChange,
    RowKey,
    RowOp,
    SendSnapshot,
    node_id,
)
from nlbproxy.health.udp import HealthSocket

Address = tuple[str, int]


def key(n: int, app: str = "web") -> RowKey:
    return RowKey(app, f"10.0.0.{n}:80")


def row(n: int, health: Health = Health.UP, load: int = 10, target: Directive = Directive.ACTIVE) -> Row:
    return Row(key(n), health, load, 50, target, target)


class FakeAgent:
    """A host agent's table and message stream, with none of its timers."""

    def __init__(self, name: str, address: Address = ("192.0.2.1", 7001), epoch: int = 1000) -> None:
        self.id = node_id(name)
        self.name = name
        self.address = address
        self.epoch = epoch
        self.seq = 0
        self.generation = 0
        self.rows: dict[RowKey, Row] = {}

    def envelope(self, message: Message) -> Envelope:
        self.seq += 1
        return Envelope(self.id, self.epoch, self.seq, 0, message)

    def heartbeat(self, name: str = "") -> Envelope:
        return self.envelope(Heartbeat(self.generation, table_checksum(self.rows.values()), name))

    def change(self, *ops: RowOp) -> Envelope:
        for op in ops:
            if op.op == Op.DELETE:
                self.rows.pop(op.key, None)
            else:
                assert op.row is not None
                self.rows[op.key] = op.row
        self.generation = (self.generation + 1) % (1 << 32)
        return self.envelope(RowChange(self.generation, ops))

    def set(self, *rows: Row) -> Envelope:
        return self.change(*(RowOp(Op.UPDATE if r.key in self.rows else Op.ADD, r.key, r) for r in rows))

    def delete(self, *keys: RowKey) -> Envelope:
        return self.change(*(RowOp(Op.DELETE, k, None) for k in keys))

    def snapshot(self, nonce: int, limit: int = 1400) -> list[Envelope]:
        rows = sorted(self.rows.values(), key=lambda r: (r.key.app, r.key.endpoint))
        parts = snapshot_parts(nonce, self.generation, table_checksum(rows), rows, limit)
        return [self.envelope(part) for part in parts]

    def restart(self, epoch: int) -> None:
        self.epoch = epoch
        self.seq = 0


class Recorder:
    """A CacheListener that logs calls and mirrors the rows it was told about."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.mirror: dict[tuple[int, RowKey], Row] = {}

    def row_changed(self, host_id: int, address: str, row: Row) -> None:
        self.calls.append(("changed", host_id, address, row))
        self.mirror[host_id, row.key] = row

    def row_removed(self, host_id: int, key: RowKey) -> None:
        self.calls.append(("removed", host_id, key))
        del self.mirror[host_id, key]

    def host_gone(self, host_id: int, reason: str) -> None:
        self.calls.append(("gone", host_id, reason))
        for host, k in [hk for hk in self.mirror if hk[0] == host_id]:
            del self.mirror[host, k]

    def take(self) -> list[tuple[object, ...]]:
        calls, self.calls = self.calls, []
        return calls


class CacheTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.sent: list[tuple[Address, Message]] = []
        self.listener = Recorder()
        self.cache = ConsolidatedCache(self.clock, lambda a, m: self.sent.append((a, m)), self.listener)

    def deliver(self, agent: FakeAgent, *envelopes: Envelope | Iterable[Envelope]) -> None:
        for item in envelopes:
            for envelope in [item] if isinstance(item, Envelope) else item:
                self.cache.receive(agent.address, envelope)

    def requests(self, agent: FakeAgent) -> list[int]:
        """Nonces of the snapshot requests sent to ``agent`` since the last call."""
        nonces = [m.nonce for a, m in self.sent if a == agent.address and isinstance(m, GetSnapshot)]
        self.sent = [(a, m) for a, m in self.sent if not (a == agent.address and isinstance(m, GetSnapshot))]
        return nonces

    def answer(self, agent: FakeAgent) -> int:
        """Answers every pending snapshot request of ``agent``; returns how many."""
        nonces = self.requests(agent)
        for nonce in nonces:
            self.deliver(agent, agent.snapshot(nonce))
        return len(nonces)

    def join(self, agent: FakeAgent, *rows: Row) -> None:
        """``agent`` with ``rows`` heartbeats and is answered: the cache is in sync."""
        agent.rows = {r.key: r for r in rows}
        self.deliver(agent, agent.heartbeat(agent.name))
        self.assertEqual(self.answer(agent), 1)
        self.assertCached(agent)

    def assertCached(self, agent: FakeAgent) -> None:
        self.assertEqual(dict(self.cache.rows(agent.id)), agent.rows)
        mirrored = {k: r for (h, k), r in self.listener.mirror.items() if h == agent.id}
        self.assertEqual(mirrored, agent.rows)


class JoinAndChangeTests(CacheTestBase):
    def test_new_host_is_asked_for_a_snapshot_and_cached(self) -> None:
        agent = FakeAgent("host-a")
        agent.rows = {r.key: r for r in (row(1), row(2))}
        self.deliver(agent, agent.heartbeat("host-a.example"))
        [(address, message)] = self.sent
        self.assertEqual(address, agent.address)
        self.assertIsInstance(message, GetSnapshot)
        self.assertEqual(self.listener.calls, [])
        self.answer(agent)
        self.assertEqual(
            sorted(self.listener.take(), key=repr),
            sorted([("changed", agent.id, "192.0.2.1", row(1)), ("changed", agent.id, "192.0.2.1", row(2))], key=repr),
        )
        view = self.cache.hosts()[agent.id]
        self.assertEqual((view.name, view.address, view.port, view.epoch), ("host-a.example", "192.0.2.1", 7001, 1000))
        self.assertEqual((view.generation, view.checksum, view.in_sync), (0, table_checksum(agent.rows.values()), True))
        self.assertEqual(view.rows, (row(1), row(2)))
        self.assertEqual(self.cache.stats["snapshots_applied"], 1)

    def test_row_change_applies_at_once(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1), row(2))
        self.listener.take()
        # "An application reported down is out within 0.5 s": no tick needed.
        self.deliver(agent, agent.set(row(1, Health.DOWN, 0)))
        self.assertEqual(self.listener.take(), [("changed", agent.id, "192.0.2.1", row(1, Health.DOWN, 0))])
        self.deliver(agent, agent.set(row(3)), agent.delete(key(2)))
        self.assertEqual(
            self.listener.take(),
            [("changed", agent.id, "192.0.2.1", row(3)), ("removed", agent.id, key(2))],
        )
        self.assertCached(agent)
        self.assertEqual(self.cache.stats["rows_applied"], 3)
        self.deliver(agent, agent.heartbeat())
        self.assertEqual(self.sent, [])

    def test_several_ops_in_one_message_notify_the_net_change(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1))
        self.listener.take()
        self.deliver(agent, agent.change(
            RowOp(Op.ADD, key(2), row(2)),
            RowOp(Op.DELETE, key(2), None),
            RowOp(Op.UPDATE, key(1), row(1, load=70)),
            RowOp(Op.UPDATE, key(1), row(1, load=80)),
        ))
        self.assertEqual(self.listener.take(), [("changed", agent.id, "192.0.2.1", row(1, load=80))])
        self.assertCached(agent)

    def test_snapshot_that_changes_nothing_tells_nothing(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1))
        self.listener.take()
        agent.restart(2000)
        self.deliver(agent, agent.heartbeat())
        self.answer(agent)
        self.assertEqual(self.listener.take(), [])
        self.assertEqual(self.cache.stats["restarts"], 1)

    def test_generation_wraps(self) -> None:
        agent = FakeAgent("host-a")
        agent.generation = (1 << 32) - 1
        self.join(agent, row(1))
        self.deliver(agent, agent.set(row(1, load=55)))
        self.assertEqual(agent.generation, 0)
        self.assertCached(agent)
        self.assertEqual(self.cache.stats["gaps"], 0)

    def test_messages_from_unknown_hosts(self) -> None:
        agent = FakeAgent("host-a")
        self.deliver(agent, agent.set(row(1)))
        self.deliver(agent, agent.envelope(SendSnapshot(1, 1, 0, 0, 1, ())))
        self.assertEqual(self.cache.stats["unknown_host"], 2)
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(self.listener.calls, [])

    def test_messages_units_send_are_refused(self) -> None:
        agent = FakeAgent("host-a")
        self.deliver(agent, agent.envelope(GetSnapshot(5)))
        self.deliver(agent, agent.envelope(PostulateWrong(key(1), Directive.ACTIVE, Directive.DRAINING)))
        self.assertEqual(self.cache.stats["wrong_direction"], 2)
        self.assertEqual((self.sent, self.listener.calls), ([], []))

    def test_older_epoch_is_refused(self) -> None:
        agent = FakeAgent("host-a", epoch=2000)
        self.join(agent, row(1))
        agent.restart(1500)
        self.deliver(agent, agent.set(row(1, Health.DOWN)))
        self.assertEqual(self.cache.stats["old_epoch"], 1)
        self.assertEqual(self.cache.rows(agent.id)[key(1)], row(1))


class LossTests(CacheTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.agent = FakeAgent("host-a")
        self.join(self.agent, row(1), row(2))
        self.listener.take()

    def test_lost_row_change_is_a_gap_repaired_by_snapshot(self) -> None:
        agent = self.agent
        agent.set(row(1, Health.DOWN))  # lost
        self.deliver(agent, agent.set(row(2, load=60)))
        self.assertEqual(self.cache.stats["gaps"], 1)
        self.assertEqual(self.cache.rows(agent.id)[key(2)], row(2))  # not applied across the gap
        self.assertEqual(self.answer(agent), 1)
        self.assertCached(agent)
        self.assertTrue(self.cache.hosts()[agent.id].in_sync)

    def test_lost_last_change_is_found_by_heartbeat(self) -> None:
        agent = self.agent
        agent.set(row(1, Health.DOWN))  # lost, and nothing follows it
        self.deliver(agent, agent.heartbeat())
        self.assertEqual(self.cache.stats["mismatches"], 1)
        self.answer(agent)
        self.assertCached(agent)

    def test_duplicate_is_applied_once(self) -> None:
        agent = self.agent
        change = agent.set(row(1, load=70))
        self.deliver(agent, change, change)
        self.assertEqual(len(self.listener.take()), 1)
        self.assertEqual(self.cache.stats["duplicates"], 1)
        self.assertEqual(self.sent, [])
        self.assertCached(agent)

    def test_reordered_changes(self) -> None:
        agent = self.agent
        first = agent.set(row(1, load=70))
        second = agent.set(row(2, load=80))
        self.deliver(agent, second)  # overtakes the first: a gap
        self.deliver(agent, first)  # fills it
        self.assertEqual(self.cache.rows(agent.id)[key(1)], row(1, load=70))
        self.answer(agent)
        self.assertCached(agent)

    def test_heartbeat_overtaken_by_a_change_is_not_compared(self) -> None:
        agent = self.agent
        old = agent.heartbeat()
        self.deliver(agent, agent.set(row(1, load=70)))
        self.deliver(agent, old)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.cache.stats["mismatches"], 0)

    def test_requests_are_rate_limited_and_retried(self) -> None:
        agent = self.agent
        agent.set(row(1, Health.DOWN))  # lost
        self.deliver(agent, agent.heartbeat())
        self.deliver(agent, agent.heartbeat())
        self.assertEqual(len(self.requests(agent)), 1)
        self.clock.advance(SNAPSHOT_RETRY / 2)
        self.cache.tick()
        self.assertEqual(self.requests(agent), [])
        self.clock.advance(SNAPSHOT_RETRY / 2)
        self.cache.tick()  # the request (or its answer) was lost: again
        [nonce] = self.requests(agent)
        self.deliver(agent, agent.snapshot(nonce))
        self.assertCached(agent)
        self.cache.tick()
        self.assertEqual(self.sent, [])
        self.assertEqual(self.cache.stats["snapshots_requested"], 3)  # join + 2

    def test_answer_to_an_abandoned_request_is_refused(self) -> None:
        agent = self.agent
        agent.set(row(1, Health.DOWN))
        self.deliver(agent, agent.heartbeat())
        [first] = self.requests(agent)
        self.clock.advance(SNAPSHOT_RETRY)
        self.cache.tick()
        [second] = self.requests(agent)
        self.deliver(agent, agent.snapshot(first))
        self.assertEqual(self.cache.stats["unsolicited_snapshot"], 1)
        self.deliver(agent, agent.snapshot(second))
        self.assertCached(agent)

    def test_snapshot_in_parts_reordered_and_duplicated(self) -> None:
        agent = self.agent
        agent.set(*(row(n, load=n) for n in range(1, 40)))  # lost
        self.deliver(agent, agent.heartbeat())
        [nonce] = self.requests(agent)
        parts = agent.snapshot(nonce, limit=300)
        self.assertGreater(len(parts), 3)
        self.deliver(agent, parts[-1], parts[-1], *parts[1:-1])
        self.assertEqual(self.cache.rows(agent.id)[key(1)], row(1))  # not yet
        self.deliver(agent, parts[0])
        self.assertCached(agent)

    def test_snapshot_with_wrong_checksum_is_refused_and_retried(self) -> None:
        agent = self.agent
        agent.set(row(1, Health.DOWN))
        self.deliver(agent, agent.heartbeat())
        [nonce] = self.requests(agent)
        bad = SendSnapshot(nonce, agent.generation, 12345, 0, 1, tuple(agent.rows.values()))
        self.deliver(agent, agent.envelope(bad))
        self.assertEqual(self.cache.stats["snapshot_checksum"], 1)
        self.assertEqual(self.cache.rows(agent.id)[key(1)], row(1))
        self.clock.advance(SNAPSHOT_RETRY)
        self.cache.tick()
        self.answer(agent)
        self.assertCached(agent)

    def test_snapshot_replaces_rows(self) -> None:
        agent = self.agent
        agent.delete(key(1))  # lost
        agent.set(row(3))  # lost
        self.deliver(agent, agent.heartbeat())
        self.answer(agent)
        self.assertEqual(
            self.listener.take(),
            [("removed", agent.id, key(1)), ("changed", agent.id, "192.0.2.1", row(3))],
        )
        self.assertCached(agent)

    def test_rows_that_cannot_be_confirmed_expire(self) -> None:
        agent = self.agent
        agent.set(row(1, Health.DOWN))  # lost, and so are all the snapshots
        for _ in range(int(DEAD_AFTER / 0.25) + 1):
            self.deliver(agent, agent.heartbeat())
            self.clock.advance(0.25)
            self.cache.tick()
        self.assertEqual(dict(self.cache.rows(agent.id)), {})
        self.assertIn(agent.id, self.cache)  # still heartbeating
        self.assertEqual(self.cache.stats["stale_rows_cleared"], 1)
        self.requests(agent)
        self.clock.advance(SNAPSHOT_RETRY)
        self.cache.tick()
        self.answer(agent)
        self.assertCached(agent)


class LifecycleTests(CacheTestBase):
    def test_silent_host_ages_out_within_target(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1))
        self.listener.take()
        # Heartbeats every 0.25 s keep it; the unit ticks every TICK.
        for _ in range(20):
            self.clock.advance(0.25)
            self.deliver(agent, agent.heartbeat())
            self.cache.tick()
        self.assertEqual(self.listener.take(), [])
        killed = self.clock.seconds()
        while agent.id in self.cache:
            self.clock.advance(TICK)
            self.cache.tick()
        gone_after = self.clock.seconds() - killed
        self.assertLessEqual(gone_after, DEAD_AFTER + TICK + 1e-9)
        self.assertLess(gone_after, 1.5)
        [(event, host_id, reason)] = self.listener.take()
        self.assertEqual((event, host_id), ("gone", agent.id))
        self.assertRegex(str(reason), r"^silent for 1\.[01] s$")
        self.assertEqual(self.listener.mirror, {})
        self.assertEqual(self.cache.stats["hosts_aged_out"], 1)
        # It comes back (same epoch: a partition, not a restart).
        self.join(agent, row(1))

    def test_goodbye_clears_at_once(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1), row(2))
        self.listener.take()
        late = agent.heartbeat()
        self.deliver(agent, agent.envelope(Goodbye()))
        self.assertEqual(self.listener.take(), [("gone", agent.id, "goodbye")])
        self.assertNotIn(agent.id, self.cache)
        # A heartbeat reordered behind the goodbye does not resurrect it ...
        self.deliver(agent, late)
        self.assertNotIn(agent.id, self.cache)
        self.assertEqual(self.cache.stats["after_goodbye"], 1)
        # ... but the restarted agent is welcome.
        agent.restart(2000)
        self.join(agent, row(1))

    def test_goodbye_is_forgotten_after_a_while(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1))
        self.deliver(agent, agent.envelope(Goodbye()))
        self.clock.advance(cache_module.GOODBYE_MEMORY)
        self.cache.tick()
        self.join(agent, row(1))

    def test_host_restart_keeps_rows_until_its_snapshot(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1), row(2))
        self.listener.take()
        agent.restart(5000)
        agent.generation = 0
        agent.rows = {key(2): row(2, Health.DOWN)}
        self.deliver(agent, agent.heartbeat())
        self.assertEqual(self.cache.hosts()[agent.id].epoch, 5000)
        self.assertEqual(len(self.cache.rows(agent.id)), 2)  # kept meanwhile
        # Row changes of the new epoch wait for its snapshot.
        self.deliver(agent, agent.set(row(3)))
        self.assertNotIn(key(3), self.cache.rows(agent.id))
        self.answer(agent)
        self.assertCached(agent)
        self.assertIn(("removed", agent.id, key(1)), self.listener.take())

    def test_unit_restart_rebuilds_from_heartbeats_and_snapshots(self) -> None:
        agents = [FakeAgent(f"host-{n}", (f"192.0.2.{n}", 7001)) for n in range(1, 4)]
        for n, agent in enumerate(agents, 1):
            self.join(agent, row(n), row(n + 10, load=n * 10))
            self.deliver(agent, agent.set(row(n, load=77)))
        # The unit restarts: a new, empty cache.
        self.listener = Recorder()
        self.sent = []
        self.cache = ConsolidatedCache(self.clock, lambda a, m: self.sent.append((a, m)), self.listener)
        for agent in agents:
            self.deliver(agent, agent.heartbeat())
        for agent in agents:
            self.answer(agent)
            self.assertCached(agent)
        self.assertEqual(len(self.cache), 3)

    def test_name_and_handoff_are_remembered(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1))
        self.deliver(agent, agent.envelope(Heartbeat(agent.generation, table_checksum(agent.rows.values()), "a.example", "tcp:9000")))
        self.deliver(agent, agent.heartbeat())  # without them this time
        view = self.cache.hosts()[agent.id]
        self.assertEqual((view.name, view.handoff), ("a.example", "tcp:9000"))

    def test_last_seen(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1))
        self.clock.advance(0.5)
        self.assertAlmostEqual(self.cache.hosts()[agent.id].last_seen, 0.5)

    def test_address_follows_the_datagrams(self) -> None:
        agent = FakeAgent("host-a")
        self.join(agent, row(1))
        agent.address = ("192.0.2.99", 7002)
        self.deliver(agent, agent.set(row(1, load=90)))
        self.assertEqual(self.listener.calls[-1], ("changed", agent.id, "192.0.2.99", row(1, load=90)))
        self.assertEqual(self.cache.hosts()[agent.id].port, 7002)


class PostulateTests(CacheTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.agent = FakeAgent("host-a")
        self.join(self.agent, row(1), row(2))

    def test_applied_directive_is_agreed_by_silence(self) -> None:
        agent = self.agent
        self.deliver(agent, agent.set(row(1, target=Directive.DRAINING)))
        self.deliver(agent, agent.envelope(Postulate(key(1), Directive.DRAINING)))
        self.assertEqual(self.sent, [])

    def test_unapplied_directive_is_wrong(self) -> None:
        agent = self.agent
        agent.set(row(1, target=Directive.DRAINING))  # lost
        self.deliver(agent, agent.envelope(Postulate(key(1), Directive.DRAINING)))
        self.assertEqual(
            self.sent, [(agent.address, PostulateWrong(key(1), Directive.DRAINING, Directive.ACTIVE))]
        )
        self.assertEqual(self.cache.stats["postulates_wrong"], 1)

    def test_unknown_row_or_host_is_wrong(self) -> None:
        agent = self.agent
        self.deliver(agent, agent.envelope(Postulate(key(9), Directive.INACTIVE)))
        stranger = FakeAgent("host-b", ("192.0.2.2", 7001))
        self.deliver(stranger, stranger.envelope(Postulate(key(1), Directive.DRAINING)))
        wrongs = [(a, m) for a, m in self.sent if isinstance(m, PostulateWrong)]
        self.assertEqual(wrongs, [
            (agent.address, PostulateWrong(key(9), Directive.INACTIVE, Directive.ACTIVE)),
            (stranger.address, PostulateWrong(key(1), Directive.DRAINING, Directive.ACTIVE)),
        ])
        # The missing row means the cache is behind: it asks.
        self.assertEqual(len(self.requests(agent)), 1)
        self.assertNotIn(stranger.id, self.cache)


class LimitTests(CacheTestBase):
    def test_rows_beyond_the_limit_are_dropped_and_counted(self) -> None:
        self.patch(cache_module, "MAX_ROWS_PER_HOST", 3)
        agent = FakeAgent("host-a")
        agent.rows = {r.key: r for r in (row(n) for n in range(1, 6))}
        self.deliver(agent, agent.heartbeat())
        self.answer(agent)
        self.assertEqual(len(self.cache.rows(agent.id)), 3)
        self.assertEqual(self.cache.stats["rows_dropped"], 2)
        # Heartbeats compare generations only now: no snapshot loop.
        self.deliver(agent, agent.heartbeat())
        self.assertEqual(self.requests(agent), [])
        self.deliver(agent, agent.set(row(7)))
        self.assertEqual(len(self.cache.rows(agent.id)), 3)
        self.assertEqual(self.cache.stats["rows_dropped"], 3)
        # Updates of kept rows still apply.
        self.deliver(agent, agent.set(row(1, Health.DOWN)))
        self.assertEqual(self.cache.rows(agent.id)[key(1)], row(1, Health.DOWN))

    def test_hosts_beyond_the_limit_are_refused(self) -> None:
        self.patch(cache_module, "MAX_HOSTS", 2)
        for n in range(1, 4):
            agent = FakeAgent(f"host-{n}", (f"192.0.2.{n}", 7001))
            self.deliver(agent, agent.heartbeat())
        self.assertEqual(len(self.cache), 2)
        self.assertEqual(self.cache.stats["hosts_refused"], 1)

    def test_too_many_snapshot_parts_are_refused(self) -> None:
        self.patch(cache_module, "MAX_SNAPSHOT_PARTS", 2)
        agent = FakeAgent("host-a")
        agent.rows = {r.key: r for r in (row(n) for n in range(1, 40))}
        self.deliver(agent, agent.heartbeat())
        [nonce] = self.requests(agent)
        self.deliver(agent, agent.snapshot(nonce, limit=300))
        self.assertGreater(self.cache.stats["snapshot_too_big"], 0)
        self.assertEqual(dict(self.cache.rows(agent.id)), {})

    def test_bad_dead_after(self) -> None:
        self.assertRaises(ValueError, ConsolidatedCache, self.clock, lambda a, m: None, self.listener, 0)


class _Wire:
    """Datagrams from an agent's socket to the unit's, through fake transports."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, Address]] = []

    def write(self, datagram: bytes, address: Address) -> None:
        self.datagrams.append((datagram, address))


class ThroughTheSocketTests(SynchronousTestCase):
    """The cache behind a real HealthSocket: forged datagrams never reach it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.listener = Recorder()
        self.unit_wire = _Wire()
        self.unit_socket = HealthSocket(
            Codec(b"farm secret", self.clock), ReplayGuard(), node_id("unit"), SENDER_AGENT_KINDS,
            self.clock, lambda address, envelope: self.cache.receive(address, envelope),
        )
        self.unit_socket.makeConnection(self.unit_wire)  # type: ignore[arg-type]
        self.cache = ConsolidatedCache(self.clock, self.unit_socket.send, self.listener)

    def agent_socket(self, secret: bytes) -> tuple[HealthSocket, _Wire]:
        wire = _Wire()
        sock = HealthSocket(Codec(secret, self.clock), ReplayGuard(), node_id("host-a"),
                            frozenset(), self.clock, lambda a, e: None)
        sock.makeConnection(wire)  # type: ignore[arg-type]
        return sock, wire

    def carry(self, wire: _Wire) -> None:
        for datagram, _ in wire.datagrams:
            self.unit_socket.datagramReceived(datagram, ("192.0.2.1", 7001))
        wire.datagrams.clear()

    def test_forged_datagrams_are_dropped_and_counted(self) -> None:
        forger, wire = self.agent_socket(b"guessed secret")
        forger.send(("192.0.2.100", 7000), Heartbeat(1, 0))
        forger.send(("192.0.2.100", 7000), RowChange(1, (RowOp(Op.ADD, key(1), row(1)),)))
        forger.send(("192.0.2.100", 7000), Goodbye())
        self.carry(wire)
        self.assertEqual(self.unit_socket.drops["mac"], 3)
        self.assertEqual((len(self.cache), self.listener.calls, self.unit_wire.datagrams), (0, [], []))

    def test_replayed_and_garbage_datagrams_are_dropped(self) -> None:
        agent, wire = self.agent_socket(b"farm secret")
        agent.send(("192.0.2.100", 7000), Heartbeat(0, table_checksum(())))
        wire.datagrams.append(wire.datagrams[0])
        wire.datagrams.append((b"NLBH\x01garbage", ("192.0.2.100", 7000)))
        self.carry(wire)
        self.assertEqual(self.unit_socket.drops["replay"], 1)
        self.assertEqual(self.unit_socket.drops["short"], 1)
        self.assertEqual(self.unit_socket.received, 1)
        # The one good heartbeat got a snapshot request out.
        self.assertEqual(len(self.unit_wire.datagrams), 1)
        self.assertEqual(self.unit_wire.datagrams[0][1], ("192.0.2.1", 7001))

    def test_the_genuine_agent_gets_in(self) -> None:
        agent, wire = self.agent_socket(b"farm secret")
        agent.send(("192.0.2.100", 7000), Heartbeat(0, table_checksum([row(1)])))
        self.carry(wire)
        [(datagram, _)] = self.unit_wire.datagrams
        request = Codec(b"farm secret", self.clock).decode(datagram)
        assert request is not None and isinstance(request.message, GetSnapshot)
        agent.send(("192.0.2.100", 7000), SendSnapshot(request.message.nonce, 0, table_checksum([row(1)]), 0, 1, (row(1),)))
        self.carry(wire)
        self.assertEqual(self.listener.mirror, {(node_id("host-a"), key(1)): row(1)})


# --- property: whatever the network did, a quiet network brings the copy back ---

_ACTIONS = st.sampled_from(
    ["set", "set", "delete", "heartbeat", "deliver", "deliver", "deliver", "deliver", "answer", "tick", "restart"]
)


class ConvergenceTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_any_history_converges(self, data: st.DataObject) -> None:
        clock = Clock()
        clock.advance(100)
        sent: list[tuple[Address, Message]] = []
        listener = Recorder()
        cache = ConsolidatedCache(clock, lambda a, m: sent.append((a, m)), listener)
        agent = FakeAgent("host-a")
        in_flight: list[Envelope] = []
        # Start in sync, so that the history exercises row changes, gaps and
        # mismatches, not only joining.
        agent.rows = {r.key: r for r in (row(1), row(2))}
        cache.receive(agent.address, agent.heartbeat())
        for _, request in sent:
            assert isinstance(request, GetSnapshot)
            for part in agent.snapshot(request.nonce):
                cache.receive(agent.address, part)
        sent.clear()

        def check_mirror() -> None:
            cached = {(agent.id, k): r for k, r in cache.rows(agent.id).items()}
            self.assertEqual(listener.mirror, cached)

        def answer(lossy: bool) -> None:
            requests = [m for a, m in sent if isinstance(m, GetSnapshot)]
            sent.clear()
            for request in requests:
                if lossy and data.draw(st.booleans(), "request lost"):
                    continue
                in_flight.extend(agent.snapshot(request.nonce, limit=200))

        for _ in range(data.draw(st.integers(1, 40), "steps")):
            action = data.draw(_ACTIONS)
            if action == "set":
                n = data.draw(st.integers(1, 4))
                in_flight.append(agent.set(row(n, data.draw(st.sampled_from(Health)), data.draw(st.integers(0, 100)))))
            elif action == "delete" and agent.rows:
                in_flight.append(agent.delete(data.draw(st.sampled_from(sorted(agent.rows, key=repr)))))
            elif action == "heartbeat":
                in_flight.append(agent.heartbeat())
            elif action == "deliver" and in_flight:
                index = data.draw(st.integers(0, len(in_flight) - 1), "which (reordering)")
                fate = data.draw(st.sampled_from(["deliver", "drop", "duplicate"]))
                envelope = in_flight[index] if fate == "duplicate" else in_flight.pop(index)
                if fate != "drop":
                    cache.receive(agent.address, envelope)
            elif action == "answer":
                answer(lossy=True)
            elif action == "tick":
                clock.advance(data.draw(st.sampled_from([TICK, 0.25, SNAPSHOT_RETRY, DEAD_AFTER])))
                cache.tick()
            elif action == "restart":
                agent.restart(agent.epoch + 1)
            check_mirror()

        # The network heals: what is still in flight arrives late, in order,
        # then heartbeats flow and requests are answered.
        for envelope in in_flight:
            cache.receive(agent.address, envelope)
        for _ in range(5):
            clock.advance(SNAPSHOT_RETRY)
            cache.tick()
            cache.receive(agent.address, agent.heartbeat())
            in_flight = []
            answer(lossy=False)
            for envelope in in_flight:
                cache.receive(agent.address, envelope)
            check_mirror()
        self.assertEqual(dict(cache.rows(agent.id)), agent.rows)
        self.assertTrue(cache.hosts()[agent.id].in_sync)
        check_mirror()
