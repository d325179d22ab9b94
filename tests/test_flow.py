"""Pauser (one owner of "paused") and Deadline (cheap restartable timeout)."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from nlbproxy.flow import Deadline, Pauser


class RecordingTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


class _Owner:
    def __init__(self, clock: Clock) -> None:
        self.deadline = Deadline(clock, self.timed_out)

    def timed_out(self) -> None:
        pass


class PauserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.transport = RecordingTransport()
        self.pauser = Pauser(self.transport)

    def test_is_a_push_producer(self) -> None:
        self.assertTrue(verifyObject(IPushProducer, self.pauser))

    def test_reasons(self) -> None:
        p = self.pauser
        p.pause("pipeline")
        p.pause("connecting")
        p.pause("pipeline")
        self.assertEqual(p.reasons, {"pipeline", "connecting"})
        self.assertEqual(self.transport.calls, ["pause"])
        p.resume("pipeline")
        self.assertEqual(p.reasons, {"connecting"})
        self.assertEqual(self.transport.calls, ["pause"])
        p.resume("connecting")
        self.assertEqual(p.reasons, set())
        self.assertEqual(self.transport.calls, ["pause", "resume"])

    def test_resume_of_absent_reason_does_nothing(self) -> None:
        self.pauser.resume("pipeline")
        self.assertEqual(self.transport.calls, [])
        self.pauser.pause("connecting")
        self.pauser.resume("pipeline")
        self.assertEqual(self.transport.calls, ["pause"])
        self.assertEqual(self.pauser.reasons, {"connecting"})

    def test_backpressure_from_consumer(self) -> None:
        seen: list[bool] = []
        p = self.pauser
        p.on_backpressure = seen.append
        p.pause("pipeline")
        p.pauseProducing()
        self.assertEqual(p.reasons, {"pipeline", "backpressure"})
        p.resumeProducing()
        self.assertEqual(p.reasons, {"pipeline"})
        self.assertEqual(seen, [True, False])
        self.assertEqual(self.transport.calls, ["pause"])
        p.resume("pipeline")
        self.assertEqual(self.transport.calls, ["pause", "resume"])

    def test_stop_producing_changes_nothing(self) -> None:
        self.pauser.pause("pipeline")
        self.pauser.stopProducing()
        self.assertEqual(self.pauser.reasons, {"pipeline"})
        self.assertEqual(self.transport.calls, ["pause"])


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[float] = []
        self.deadline = Deadline(self.clock, lambda: self.fired.append(self.clock.seconds()))

    def test_fires_once_after_delay(self) -> None:
        self.deadline.set(5)
        self.assertTrue(self.deadline.armed)
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [5.0])
        self.assertFalse(self.deadline.armed)
        self.clock.advance(100)
        self.assertEqual(self.fired, [5.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_moving_later_does_not_touch_the_reactor(self) -> None:
        self.deadline.set(5)
        (call,) = self.clock.getDelayedCalls()
        for _ in range(100):
            self.clock.advance(0.04)
            self.deadline.set(5)
            self.assertEqual(self.clock.getDelayedCalls(), [call])
            self.assertEqual(call.getTime(), 5.0)
        # The call fires at its old time, finds the deadline moved, and waits the rest.
        self.clock.advance(5 - 4)
        self.assertEqual(self.fired, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertAlmostEqual(self.clock.getDelayedCalls()[0].getTime(), 9.0)
        self.clock.advance(4)
        self.assertEqual(len(self.fired), 1)
        self.assertAlmostEqual(self.fired[0], 9.0)

    def test_moving_earlier_schedules_anew(self) -> None:
        self.deadline.set(30)
        (old,) = self.clock.getDelayedCalls()
        self.deadline.set(10)
        (call,) = self.clock.getDelayedCalls()
        self.assertIsNot(call, old)
        self.assertTrue(old.cancelled)
        self.assertEqual(call.getTime(), 10.0)
        self.clock.advance(10)
        self.assertEqual(self.fired, [10.0])

    def test_cancel_is_lazy(self) -> None:
        self.deadline.set(5)
        (call,) = self.clock.getDelayedCalls()
        self.deadline.cancel()
        self.assertFalse(self.deadline.armed)
        # The call stays, so re-arming within its time costs nothing ...
        self.assertEqual(self.clock.getDelayedCalls(), [call])
        self.clock.advance(1)
        self.deadline.set(5)
        self.assertEqual(self.clock.getDelayedCalls(), [call])
        self.deadline.cancel()
        # ... and when it fires disarmed it does nothing and drops itself.
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.deadline.set(1)
        self.clock.advance(1)
        self.assertEqual(self.fired, [12.0])

    def test_stop_drops_the_call(self) -> None:
        self.deadline.set(5)
        self.deadline.stop()
        self.assertFalse(self.deadline.armed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.deadline.stop()
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_stop_lets_the_owner_go_without_the_collector(self) -> None:
        # A connection holds its deadline, whose callback is the
        # connection's bound method: stop() breaks that cycle, so the
        # connection is freed as soon as nothing else holds it.
        owner = _Owner(self.clock)
        owner.deadline.set(5)
        gone = weakref.ref(owner)
        owner.deadline.stop()
        gc.disable()
        try:
            del owner
            self.assertIsNone(gone())
        finally:
            gc.enable()

    def test_callback_may_set_again(self) -> None:
        def again() -> None:
            self.fired.append(self.clock.seconds())
            if len(self.fired) < 3:
                self.deadline.set(2)

        deadline = self.deadline = Deadline(self.clock, again)
        deadline.set(2)
        self.clock.pump([1] * 10)
        self.assertEqual(self.fired, [2.0, 4.0, 6.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])
