"""RestartPolicy: immediate first restart, growing backoff, give up, reset after a stable run."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.workers.policy import RestartPolicy


class RestartPolicyTests(SynchronousTestCase):
    def test_backoff_grows_then_gives_up(self) -> None:
        policy = RestartPolicy(delays=(0.0, 1.0, 4.0), stable_after=30.0, max_restarts=4)
        delays = []
        now = 0.0
        for _ in range(5):
            policy.started(now)
            now += 1.0
            delays.append(policy.died(now))
        self.assertEqual(delays, [0.0, 1.0, 4.0, 4.0, None])
        self.assertEqual(policy.restarts, 4)

    def test_a_stable_run_starts_the_backoff_over(self) -> None:
        policy = RestartPolicy(delays=(0.0, 1.0), stable_after=30.0, max_restarts=2)
        policy.started(0.0)
        self.assertEqual(policy.died(1.0), 0.0)
        policy.started(1.0)
        self.assertEqual(policy.died(2.0), 1.0)
        policy.started(2.0)
        self.assertEqual(policy.died(40.0), 0.0)
        self.assertEqual(policy.restarts, 3)

    def test_needs_a_delay(self) -> None:
        with self.assertRaises(ValueError):
            RestartPolicy(delays=())
