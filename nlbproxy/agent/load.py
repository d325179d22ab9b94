# -*- test-case-name: tests.test_health_agent -*-
"""The host load the agent measures when an application reports none.

:class:`CpuLoad` reads the aggregate ``cpu`` line of ``/proc/stat`` and
answers the share of CPU time spent busy (everything but idle and iowait)
since the previous sample, 0-100.  The reader is injectable, so tests feed it
text; on a system without ``/proc/stat`` it answers None and the table keeps
rows without a fresh application report as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

__all__ = ["PROC_STAT", "CpuLoad", "parse_cpu_line", "read_proc_stat"]

log = Logger()

PROC_STAT = "/proc/stat"


def read_proc_stat() -> str:
    with open(PROC_STAT, encoding="ascii") as f:
        return f.readline()


def parse_cpu_line(text: str) -> tuple[int, int]:
    """``(busy, total)`` jiffies of the first ``cpu`` line; ValueError if none.

    Fields: user nice system idle iowait irq softirq steal [guest guest_nice];
    guest time is already counted in user and nice, so it is left out.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            numbers = [int(n) for n in fields[1:9]]
            if len(numbers) < 4:
                break
            total = sum(numbers)
            idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line")


class CpuLoad:
    """Busy % of all CPUs between consecutive :meth:`sample` calls."""

    def __init__(self, read: Callable[[], str] = read_proc_stat) -> None:
        self._read = read
        self._last: tuple[int, int] | None = None
        self._warned = False

    def sample(self) -> int | None:
        """Busy % since the previous sample; None for the first sample, when
        no time passed, or when the counters cannot be read."""
        try:
            busy, total = parse_cpu_line(self._read())
        except (OSError, ValueError) as exc:
            if not self._warned:
                self._warned = True
                log.warn("cannot measure host load ({error}); using application reports only", error=exc)
            self._last = None
            return None
        last, self._last = self._last, (busy, total)
        if last is None or total <= last[1] or busy < last[0]:
            return None
        return max(0, min(100, round(100 * (busy - last[0]) / (total - last[1]))))
