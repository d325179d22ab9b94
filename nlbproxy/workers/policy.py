# -*- test-case-name: tests.test_workers_policy -*-
"""When to restart a worker that died: a backoff, reset by a stable run."""

from __future__ import annotations

from collections.abc import Sequence

from nlbproxy import limits


class RestartPolicy:
    """Sans-I/O restart decisions for one worker slot.

    The first death after a stable run restarts at once (a crash should cost
    the clients queued on that worker as little as possible); each further
    death in a row waits longer, and after ``max_restarts`` of them the slot
    is given up on, so a worker that cannot start does not spin.
    """

    def __init__(
        self,
        delays: Sequence[float] = limits.WORKER_RESTART_DELAYS,
        stable_after: float = limits.WORKER_STABLE_AFTER,
        max_restarts: int = limits.WORKER_MAX_RESTARTS,
    ) -> None:
        if not delays:
            raise ValueError("at least one restart delay is needed")
        self.delays = tuple(delays)
        self.stable_after = stable_after
        self.max_restarts = max_restarts
        self.streak = 0
        self.restarts = 0
        self._started_at: float | None = None

    def started(self, now: float) -> None:
        self._started_at = now

    def died(self, now: float) -> float | None:
        """Seconds to wait before the restart, or None to give up."""
        if self._started_at is not None and now - self._started_at >= self.stable_after:
            self.streak = 0
        self._started_at = None
        if self.streak >= self.max_restarts:
            return None
        delay = self.delays[min(self.streak, len(self.delays) - 1)]
        self.streak += 1
        self.restarts += 1
        return delay
