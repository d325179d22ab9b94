"""``workers`` in ``[unit]``: counts, "auto", and what a multi-process unit refuses."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import limits
from nlbproxy.config import ConfigError, parse_config
from nlbproxy.workers.worker import WorkerSpec, worker_config


def _config(unit: dict[str, Any], listener: dict[str, Any] | None = None) -> Any:
    return parse_config({
        "unit": unit,
        "listener": [{"name": "web", "endpoint": "tcp:8080:interface=127.0.0.1", "pool": "app", **(listener or {})}],
        "pool": {"app": {"hosts": ["127.0.0.1:9000"]}},
    }, "/etc/nlbproxy/unit.toml")


class WorkersKeyTests(SynchronousTestCase):
    def test_absent_is_one_process(self) -> None:
        self.assertEqual(_config({}).workers, 1)

    def test_counts_and_auto(self) -> None:
        self.assertEqual(_config({"workers": 3}).workers, 3)
        self.assertEqual(_config({"workers": "auto"}).workers, min(limits.MAX_WORKERS, os.cpu_count() or 1))

    def _error(self, unit: dict[str, Any], listener: dict[str, Any] | None = None) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            _config(unit, listener)
        return caught.exception

    def test_bad_values(self) -> None:
        for value, reason in ((0, "must be between 1 and 64, got 0"), (65, "must be between 1 and 64, got 65"),
                              ("all", "expected an integer or \"auto\", got 'all'"), (True, "expected an integer")):
            error = self._error({"workers": value})
            self.assertEqual(error.key, "unit.workers")
            self.assertIn(reason, error.reason)

    def test_handoff_needs_one_process(self) -> None:
        error = self._error({"workers": 2, "secret_file": __file__}, {"handoff": True})
        self.assertEqual((error.key, error.reason),
                         ("listener[0].handoff", "handoff needs a single process: set unit.workers = 1"))

    def test_dam_needs_a_fixed_tcp_port(self) -> None:
        for dam in ("tcp:0:interface=127.0.0.1", "unix:/run/dam.sock"):
            config = {"workers": 2, "dam": dam, "secret_file": __file__}
            error = self._error(config)
            self.assertEqual((error.key, error.reason),
                             ("unit.dam", "with workers > 1 the dam endpoint needs a TCP port other than 0"))
        self.assertEqual(_config({"workers": 2, "dam": "tcp:7000:interface=127.0.0.1", "secret_file": __file__})
                         .dam, "tcp:7000:interface=127.0.0.1")


class WorkerConfigTests(SynchronousTestCase):
    def test_rewired_for_the_worker(self) -> None:
        config = _config({"workers": 2, "name": "edge"})
        spec = WorkerSpec(index=1, listeners={"web": (3, "INET")}, admin=(4, "INET"), admin_token="t0k",
                          dam_name="edge.w1.1", dam=(6, "INET"),
                          peers=("127.0.0.1:7000",), secret=b"s" * 32, health=(5, "INET", ("127.0.0.1", 6000)),
                          config="[unit]\n", status_fd=7, generation=3)
        self.assertEqual(WorkerSpec.from_json(spec.to_json()), spec)
        rewired = worker_config(config, spec)
        self.assertEqual(rewired.listeners[0].endpoint, "nlbfd:3:INET")
        self.assertEqual(rewired.admin, "nlbfd:4:INET")
        self.assertEqual((rewired.admin_token, rewired.secret, rewired.workers), ("t0k", b"s" * 32, 1))
        self.assertEqual((rewired.dam, rewired.peers), ("nlbfd:6:INET", (("127.0.0.1", 7000),)))
        # What clients see of the unit does not change.
        self.assertIsNone(rewired.access_log)
        self.assertEqual(dataclasses.replace(rewired, listeners=config.listeners, admin=config.admin,
                                             admin_token=None, secret=None, workers=2, dam=None, peers=()), config)


class AccessLogTests(SynchronousTestCase):
    def test_each_worker_writes_its_own_file(self) -> None:
        spec = WorkerSpec(index=2, listeners={"web": (3, "INET")}, admin=(4, "INET"), admin_token="t",
                          dam_name="d", dam=(5, "INET"), peers=(), secret=b"s")
        config = _config({"workers": 3, "access_log": "/var/log/nlb/access.log"})
        self.assertEqual(worker_config(config, spec).access_log, "/var/log/nlb/access.log.w2")
        self.assertEqual(worker_config(_config({"workers": 3, "access_log": "-"}), spec).access_log, "-")


class InheritedSocketEndpointTests(SynchronousTestCase):
    def test_parsed_by_server_from_string(self) -> None:
        from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
        from twisted.internet.testing import MemoryReactor

        endpoint = serverFromString(MemoryReactor(), "nlbfd:7:INET6")
        assert isinstance(endpoint, AdoptedStreamServerEndpoint)
        self.assertEqual((endpoint.fileno, endpoint.addressFamily), (7, socket.AF_INET6))
        for bad in ("nlbfd:x:INET", "nlbfd:7:APPLETALK", "nlbfd"):
            with self.assertRaises(ValueError):
                serverFromString(MemoryReactor(), bad)


class BoundToTests(SynchronousTestCase):
    def test_same_address_however_spelt(self) -> None:
        from nlbproxy.workers.sockets import bound_to, listening_sockets

        sockets = listening_sockets("tcp:0:interface=127.0.0.1", 2)
        self.addCleanup(lambda: [s.sock.close() for s in sockets])
        port = sockets[0].sock.getsockname()[1]
        self.assertEqual(sockets[1].sock.getsockname()[1], port)
        self.assertTrue(bound_to(sockets[0], f"tcp:{port}:interface=127.0.0.1"))
        self.assertTrue(bound_to(sockets[0], f"tcp:port={port}:interface=127.0.0.1"))
        self.assertTrue(bound_to(sockets[0], "tcp:0:interface=127.0.0.1"))
        self.assertFalse(bound_to(sockets[0], f"tcp:{port}"))
        self.assertFalse(bound_to(sockets[0], f"tcp:{port + 1}:interface=127.0.0.1"))
        self.assertFalse(bound_to(sockets[0], f"tcp6:{port}:interface=\\:\\:1"))
        self.assertFalse(bound_to(sockets[0], "unix:/run/x.sock"))
