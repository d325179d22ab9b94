"""A balancing unit with a forwarder, run inside the unit's namespace:

``python -m tests.handoff_unit CONFIG forwarder``: the real AF_PACKET forwarder
(:class:`nlbproxy.handoff.forwarder.ForwarderPlumbing` on ``eth0``);
``python -m tests.handoff_unit CONFIG kernel HOST=MARK ...``: the kernel-routed
stand-in of tests/handoff_plumbing.py.

Logs like ``twistd -n nlbproxy`` (``listener NAME on URL``), and prints the
unit's handoff counters as JSON on SIGUSR1 (``handoff-stats {...}``).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from nlbproxy.config import load_config
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import Forwarder, ForwarderPlumbing, PacketPort, interface_mac
from nlbproxy.handoff.routes import RouteTable
from nlbproxy.unit import Unit
from tests.handoff_plumbing import KernelRoutes


class LoggedPlumbing:
    """Passes the unit side's calls on, remembering their names for the tests."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.log: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(*args: Any) -> Any:
            self.log.append(name)
            del self.log[:-64]
            return method(*args)

        return call


def main() -> None:
    config = load_config(sys.argv[1])
    plumbing: Any
    if sys.argv[2] == "kernel":
        plumbing = KernelRoutes({arg.split("=")[0]: int(arg.split("=")[1]) for arg in sys.argv[3:]})
    else:
        table = RouteTable(reactor)
        forwarder = Forwarder(table, {"eth0": interface_mac("eth0")})
        fence = Fence(open_backend(), "nlbt_unit")
        fence.setup()
        port = PacketPort(reactor, forwarder, "eth0")
        port.start()
        plumbing = ForwarderPlumbing(port, fence, "eth0")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    unit = Unit(config, reactor, LoggedPlumbing(plumbing))

    unit_plumbing = unit.handoff.plumbing if unit.handoff else None
    assert isinstance(unit_plumbing, LoggedPlumbing)

    def stats(*_: object) -> None:
        s = unit.handoff.stats if unit.handoff else None
        if s is not None:
            latency = s.latency
            print("handoff-stats " + json.dumps({
                "handed_off": s.handed_off, "fell_back": dict(s.fell_back), "failed": dict(s.failed),
                "ended": s.ended, "log": unit_plumbing.log[-8:],
                "latency_sum": latency.total, "latency_count": latency.count, "recent": list(s.recent),
            }), flush=True)

    signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(stats))  # type: ignore[attr-defined]
    unit.startService()
    reactor.addSystemEventTrigger("before", "shutdown", unit.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
