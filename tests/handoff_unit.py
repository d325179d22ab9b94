"""A balancing unit with the kernel-routed test plumbing:
``python -m tests.handoff_unit CONFIG HOST=MARK ...`` (run inside the unit's namespace).

Logs like ``twistd -n nlbproxy`` (``listener NAME on URL``), and prints the
unit's handoff counters as JSON on SIGUSR1 (``handoff-stats {...}``).
"""

from __future__ import annotations

import json
import signal
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from nlbproxy.config import load_config
from nlbproxy.unit import Unit
from tests.handoff_plumbing import KernelRoutes


def main() -> None:
    config = load_config(sys.argv[1])
    hosts = {arg.split("=")[0]: int(arg.split("=")[1]) for arg in sys.argv[2:]}
    plumbing = KernelRoutes(hosts)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    unit = Unit(config, reactor, plumbing)

    def stats(*_: object) -> None:
        s = unit.handoff.stats if unit.handoff else None
        if s is not None:
            latency = s.latency
            print("handoff-stats " + json.dumps({
                "handed_off": s.handed_off, "fell_back": dict(s.fell_back), "failed": dict(s.failed),
                "ended": s.ended, "log": [kind for kind, _ in plumbing.log[-8:]],
                "latency_sum": latency.total, "latency_count": latency.count, "recent": list(s.recent),
            }), flush=True)

    signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(stats))  # type: ignore[attr-defined]
    unit.startService()
    reactor.addSystemEventTrigger("before", "shutdown", unit.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
