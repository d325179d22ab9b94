# -*- test-case-name: tests.test_unit -*-
"""``twistd nlbproxy``: options and service maker of a balancing unit."""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.python import usage

from nlbproxy import sockets
from nlbproxy.config import ConfigError, demo_config, load_config


class Options(usage.Options):
    synopsis = "--config FILE | --demo"
    longdesc = "Run a balancing unit (an nlbproxy request router) from a TOML config file."
    optParameters = [
        ["config", "c", None, "The unit's TOML config file."],
        ["demo-port", None, 8080, "With --demo: the port of the demo listener.", int],
        ["demo-admin-port", None, 9901, "With --demo: the port of the admin API.", int],
        ["worker", None, None, "Internal: run as worker I of a supervisor (its wiring comes on stdin).", int],
    ]
    optFlags = [["demo", None, "Run in front of an embedded demo farm of three backends on loopback."]]

    def postOptions(self) -> None:
        if bool(self["config"]) == bool(self["demo"]):
            raise usage.UsageError("give exactly one of --config FILE and --demo")
        if self["worker"] is not None and not self["config"]:
            raise usage.UsageError("--worker needs --config FILE")
        if self["config"] and self["worker"] is None:
            # (A worker takes the config text its supervisor accepted.)
            try:
                self["unit_config"] = load_config(self["config"])
            except ConfigError as exc:
                raise usage.UsageError(str(exc)) from None


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor  # the process's reactor, chosen by twistd
    from nlbproxy.unit import Unit

    if options["demo"]:
        from nlbproxy.demo import start_backends

        ports = start_backends(reactor)
        config = demo_config(
            options["demo-port"], [p.getHost().port for p in ports], options["demo-admin-port"]
        )
        unit = Unit(config, reactor)
        unit.demo_ports = ports  # type: ignore[attr-defined]
        reactor.callWhenRunning(_announce_demo, unit)
        return unit
    if options["worker"] is not None:
        import sys

        from nlbproxy.workers.worker import read_spec, worker_service

        return worker_service(os.path.abspath(options["config"]), read_spec(sys.stdin.buffer), reactor)
    config = options["unit_config"]
    if config.workers > 1:
        from nlbproxy.workers.supervisor import Supervisor

        return Supervisor(config, reactor)
    # An upgrading unit started us with its listening sockets: adopt them
    # (and keep the variables from any process we start in turn).
    try:
        inherited, ready_fd = sockets.take_inherited()
    except sockets.InheritedError as exc:
        raise usage.UsageError(str(exc)) from None
    return Unit(
        config, reactor, config_path=os.path.abspath(options["config"]), signals=True,
        inherited=inherited, ready_fd=ready_fd, upgrade_blocker=_upgrade_blocker(options),
    )


def _upgrade_blocker(options: Options) -> str | None:
    """Why this twistd cannot upgrade itself in place, if it cannot.

    The new program runs the same command line as a child of this process:
    a daemon's child would daemonize away (its first process exits at once),
    and twistd refuses to start while a pidfile names a running process.
    """
    parent = getattr(options, "parent", None)  # twistd's own options
    if parent is None:
        return None
    if not parent.get("nodaemon"):
        return "upgrade needs twistd -n (run in the foreground, e.g. under systemd)"
    if parent.get("pidfile"):
        return "upgrade needs twistd --pidfile= (the new process would find the old one's pidfile)"
    return None


def _announce_demo(unit: Any) -> None:
    from nlbproxy.unit import url_of

    url = url_of(unit.ports["web"])
    admin = url_of(unit.admin_port).rstrip("/")
    print(
        f"\nnlbproxy demo is up: try  curl {url}  (three backends behind it)\n"
        f"  state:   nlbctl --admin {admin} state\n"
        f"  drain:   nlbctl --admin {admin} drain demo 127.0.0.1:{unit.demo_ports[0].getHost().port}\n",
        flush=True,
    )
