# -*- test-case-name: tests.test_reload -*-
"""The signals a running unit (or its workers' supervisor) answers.

SIGHUP reloads the config and SIGUSR2 upgrades the program (twistd rotates
its log on SIGUSR1 and stops on SIGTERM/SIGINT, so these two are free).
Python runs a signal handler in the main thread between two bytecodes,
which may be in the middle of the reactor's own work: the handlers only hand
the work to the reactor, which runs it in its next turn.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


class ControlSignals:
    """SIGHUP -> ``reload()``, SIGUSR2 -> ``upgrade()``, run by ``reactor``."""

    def __init__(self, reactor: Any, reload: Callable[[], None], upgrade: Callable[[], None]) -> None:
        self.reactor = reactor
        self._work = {signal.SIGHUP: reload, signal.SIGUSR2: upgrade}
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum, work in self._work.items():
            self._previous[signum] = signal.signal(signum, self._handler(work))

    def _handler(self, work: Callable[[], None]) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(work)

        return handler

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
