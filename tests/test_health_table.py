"""The host agent's health-and-load table: sources, precedence, load smoothing,
generations and the row changes it publishes.  Sans-I/O: runs under trial and
pytest alike."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.health.codec import Codec, table_checksum
from nlbproxy.health.messages import Directive, Envelope, Health, Op, Row, RowChange, RowKey
from nlbproxy.health.table import (
    APP_LOAD_HYSTERESIS,
    LOAD_HYSTERESIS,
    LOAD_REPORT_TTL,
    SPIKE_WINDOW,
    AppSpec,
    HealthTable,
    Source,
)

WEB1 = RowKey("web", "10.0.0.7:8080")
WEB2 = RowKey("web", "10.0.0.7:8081")
API = RowKey("api", "10.0.0.7:9000")


def make_table(clock: Clock, *, checked: bool = False) -> HealthTable:
    return HealthTable([AppSpec(WEB1, 40), AppSpec(WEB2, 60), AppSpec(API, 10, checked=checked)], clock)


def only_op(changes: list[RowChange]) -> Row:
    """The row of the one UPDATE in ``changes``."""
    assert len(changes) == 1 and len(changes[0].ops) == 1, changes
    (op,) = changes[0].ops
    assert op.op == Op.UPDATE and op.row is not None
    return op.row


class InitialTests(SynchronousTestCase):
    def test_rows_from_config(self) -> None:
        table = make_table(Clock())
        self.assertEqual([r.key for r in table.rows()], [WEB1, WEB2, API])
        row = table.row(WEB2)
        self.assertEqual(
            (row.health, row.load, row.capacity, row.target, row.current, row.reason),
            (Health.UP, 0, 60, Directive.ACTIVE, Directive.ACTIVE, ""),
        )
        self.assertEqual(table.generation, 0)
        self.assertEqual(table.checksum(), table_checksum(table.rows()))

    def test_checked_endpoint_is_down_until_its_first_result(self) -> None:
        table = make_table(Clock(), checked=True)
        self.assertEqual((table.row(API).health, table.row(API).reason), (Health.DOWN, "check pending"))
        row = only_op(table.check_result(API, True))
        self.assertEqual((row.health, row.reason), (Health.UP, ""))

    def test_keys_of_an_app(self) -> None:
        table = make_table(Clock())
        self.assertEqual(table.keys_of("web"), (WEB1, WEB2))
        self.assertRaises(KeyError, table.keys_of, "nope")

    def test_bad_specs(self) -> None:
        self.assertRaises(ValueError, AppSpec, WEB1, 100)
        self.assertRaises(ValueError, HealthTable, [AppSpec(WEB1), AppSpec(WEB1)], Clock())


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.table = make_table(self.clock, checked=True)
        self.table.check_result(API, True)

    def test_app_down_applies_to_every_endpoint_in_one_message(self) -> None:
        generation = self.table.generation
        changes = self.table.report("web", health=Health.DOWN, reason="maintenance")
        self.assertEqual(len(changes), 1)
        self.assertEqual(changes[0].generation, generation + 1)
        self.assertEqual([op.key for op in changes[0].ops], [WEB1, WEB2])
        for op in changes[0].ops:
            assert op.row is not None
            self.assertEqual((op.row.health, op.row.reason), (Health.DOWN, "app down: maintenance"))
        self.assertEqual(self.table.generation, generation + 1)
        self.assertEqual(self.table.row(API).health, Health.UP)

    def test_app_up_again(self) -> None:
        self.table.report("api", health=Health.DOWN)
        row = only_op(self.table.report("api", health=Health.UP))
        self.assertEqual((row.health, row.reason), (Health.UP, ""))

    def test_same_report_twice_publishes_once(self) -> None:
        self.assertEqual(len(self.table.report("api", health=Health.DOWN)), 1)
        generation = self.table.generation
        self.assertEqual(self.table.report("api", health=Health.DOWN), [])
        self.assertEqual(self.table.generation, generation)

    def test_check_failure_takes_health_down_and_drains(self) -> None:
        row = only_op(self.table.check_result(API, False, "HTTP 503"))
        self.assertEqual(row.health, Health.DOWN)
        self.assertEqual(row.target, Directive.DRAINING)
        self.assertEqual(row.current, Directive.ACTIVE)
        self.assertEqual(row.reason, "check failed: HTTP 503; draining by check")
        detail = self.table.detail(API)
        self.assertEqual((detail.directive_source, detail.check_up), (Source.CHECK, False))

    def test_both_sources_down_name_both(self) -> None:
        self.table.check_result(API, False, "timeout after 1 s")
        row = only_op(self.table.report("api", health=Health.DOWN, reason="deploy"))
        self.assertTrue(row.reason.startswith("app down: deploy; check failed: timeout"), row.reason)
        # The app coming back is not enough while the check fails.
        row = only_op(self.table.report("api", health=Health.UP))
        self.assertEqual(row.health, Health.DOWN)
        self.assertTrue(row.reason.startswith("check failed"), row.reason)
        row = only_op(self.table.check_result(API, True))
        self.assertEqual((row.health, row.target, row.reason), (Health.UP, Directive.ACTIVE, ""))

    def test_long_reasons_are_cut_as_on_the_wire(self) -> None:
        row = only_op(self.table.report("api", health=Health.DOWN, reason="é" * 100))
        self.assertLessEqual(len(row.reason.encode()), 64)
        self.assertEqual(self.table.checksum(), table_checksum(self.table.rows()))
        # The codec carries it unchanged.
        codec = Codec(b"k", self.clock)
        envelope = Envelope(1, 1, 1, 0, self.table.report("api", health=Health.UP)[0])
        self.assertEqual(codec.decode(codec.encode(envelope)), envelope)


class DirectiveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = make_table(Clock(), checked=True)
        self.table.check_result(API, True)

    def test_precedence_operator_over_check_over_app(self) -> None:
        row = only_op(self.table.set_directive("api", Source.APP, Directive.INACTIVE, "restart"))
        self.assertEqual((row.target, row.reason), (Directive.INACTIVE, "inactive by app: restart"))
        row = only_op(self.table.check_result(API, False, "refused"))
        self.assertEqual(row.target, Directive.DRAINING)
        self.assertIn("draining by check", row.reason)
        row = only_op(self.table.set_directive("api", Source.OPERATOR, Directive.ACTIVE, "I know"))
        self.assertEqual(row.target, Directive.ACTIVE)
        self.assertIn("active by operator: I know", row.reason)
        # Withdrawing hands the row back down the precedence list.
        row = only_op(self.table.set_directive("api", Source.OPERATOR, None))
        self.assertEqual(row.target, Directive.DRAINING)
        row = only_op(self.table.check_result(API, True))
        self.assertEqual((row.target, row.reason), (Directive.INACTIVE, "inactive by app: restart"))
        row = only_op(self.table.set_directive("api", Source.APP, None))
        self.assertEqual((row.target, row.reason), (Directive.ACTIVE, ""))

    def test_operator_sets_every_endpoint_of_an_app(self) -> None:
        (change,) = self.table.set_directive("web", Source.OPERATOR, Directive.DRAINING, "deploy")
        self.assertEqual({op.key for op in change.ops}, {WEB1, WEB2})
        detail = self.table.detail(WEB1)
        self.assertEqual((detail.directive_source, detail.directive_reason), (Source.OPERATOR, "deploy"))
        self.assertEqual(detail.directives, {Source.OPERATOR: (Directive.DRAINING, "deploy")})

    def test_current_follows_only_when_told(self) -> None:
        self.table.set_directive("api", Source.OPERATOR, Directive.DRAINING)
        self.assertEqual(self.table.row(API).current, Directive.ACTIVE)
        row = only_op(self.table.set_current(API, Directive.DRAINING))
        self.assertEqual((row.target, row.current), (Directive.DRAINING, Directive.DRAINING))


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.table = HealthTable([AppSpec(WEB1), AppSpec(API)], self.clock)

    def sample(self, measured: int | None) -> list[RowChange]:
        self.clock.advance(1.0)
        return self.table.sample_load(measured)

    def test_spike_window_rejects_single_samples(self) -> None:
        self.assertGreaterEqual(SPIKE_WINDOW, 3)

    def test_first_sample_publishes_then_spikes_do_not_flap(self) -> None:
        (change,) = self.sample(20)
        self.assertEqual([op.row.load for op in change.ops if op.row], [20, 20])
        generation = self.table.generation
        for spike in (100, 20, 20, 0, 20, 100, 20):
            self.assertEqual(self.sample(spike), [], f"spike {spike} published")
        self.assertEqual(self.table.generation, generation)
        self.assertEqual(self.table.row(WEB1).load, 20)

    def test_sustained_change_is_published_in_steps(self) -> None:
        self.sample(20)
        published: list[int] = []
        for _ in range(60):
            for change in self.sample(80):
                published.extend(op.row.load for op in change.ops if op.row and op.key == WEB1)
        self.assertTrue(published, "a sustained change was never published")
        self.assertTrue(all(b - a >= LOAD_HYSTERESIS for a, b in zip([20, *published], published[:-1])))
        self.assertEqual(self.table.row(WEB1).load, published[-1])
        self.assertGreaterEqual(published[-1], 80 - LOAD_HYSTERESIS)

    def test_reaching_the_extremes_publishes(self) -> None:
        self.sample(95)
        for _ in range(200):
            self.sample(100)
        self.assertEqual(self.table.row(WEB1).load, 100)
        for _ in range(200):
            self.sample(5)
        for _ in range(200):
            self.sample(0)
        self.assertEqual(self.table.row(WEB1).load, 0)

    def test_app_report_wins_while_fresh_then_measured_load(self) -> None:
        self.table.report("web", load=70)
        self.sample(10)
        self.assertEqual(self.table.row(WEB1).load, 70)
        self.assertEqual(self.table.row(API).load, 10)
        self.assertEqual(self.table.detail(WEB1).load_source, "app")
        # The report goes stale: measured load takes over (gradually).
        self.clock.advance(LOAD_REPORT_TTL)
        for _ in range(100):
            self.sample(10)
        self.assertEqual(self.table.detail(WEB1).load_source, "measured")
        self.assertLessEqual(self.table.row(WEB1).load, 10 + LOAD_HYSTERESIS)

    def test_unknown_measured_load_leaves_unreported_rows(self) -> None:
        self.assertEqual(self.sample(None), [])
        (change,) = self.table.report("api", load=30)
        self.assertEqual([op.key for op in change.ops], [API])
        self.assertEqual(self.sample(None), [])

    def test_load_report_publishes_at_once_past_its_hysteresis(self) -> None:
        (change,) = self.table.report("web", load=50)
        self.assertEqual({op.row.load for op in change.ops if op.row}, {50})
        self.assertEqual(self.table.report("web", load=50 + APP_LOAD_HYSTERESIS - 1), [])
        (change,) = self.table.report("web", load=10)
        self.assertEqual({op.row.load for op in change.ops if op.row}, {10})
        # A fresh report is not averaged with the host's measured load.
        changed = [op.key for change in self.sample(90) for op in change.ops]
        self.assertEqual(changed, [API])  # only the row without a report follows the host
        self.assertEqual(self.table.row(WEB1).load, 10)

    def test_out_of_range_load_is_our_bug(self) -> None:
        self.assertRaises(ValueError, self.table.report, "web", load=101)
        self.assertRaises(ValueError, self.table.sample_load, -1)


class GenerationTests(SynchronousTestCase):
    def test_every_message_is_one_generation_and_checksums_follow(self) -> None:
        clock = Clock()
        table = make_table(clock)
        seen = [table.checksum()]
        table.report("web", health=Health.DOWN)
        seen.append(table.checksum())
        table.report("api", health=Health.DOWN)
        seen.append(table.checksum())
        self.assertEqual(table.generation, 2)
        self.assertEqual(len(set(seen)), 3)

    def test_generation_wraps_at_u32(self) -> None:
        table = make_table(Clock())
        table.generation = 0xFFFFFFFF
        (change,) = table.report("api", health=Health.DOWN)
        self.assertEqual((change.generation, table.generation), (0, 0))

    def test_add_and_remove(self) -> None:
        table = make_table(Clock())
        new = RowKey("new", "10.0.0.7:7000")
        (change,) = table.add(AppSpec(new, 5))
        self.assertEqual((change.generation, change.ops[0].op), (1, Op.ADD))
        self.assertIn(new, table)
        self.assertRaises(ValueError, table.add, AppSpec(new))
        (change,) = table.remove(new)
        self.assertEqual((change.generation, change.ops[0].op, change.ops[0].row), (2, Op.DELETE, None))
        self.assertNotIn(new, table)

    def test_many_rows_split_into_several_messages(self) -> None:
        keys = [RowKey("app" + "x" * 60, f"10.0.{i // 250}.{i % 250}:8080") for i in range(100)]
        table = HealthTable([AppSpec(k) for k in keys], Clock())
        changes = table.report("app" + "x" * 60, health=Health.DOWN)
        self.assertGreater(len(changes), 1)
        self.assertEqual([c.generation for c in changes], list(range(1, len(changes) + 1)))
        self.assertEqual(table.generation, len(changes))
        self.assertEqual(sum(len(c.ops) for c in changes), 100)
