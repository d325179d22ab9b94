# -*- test-case-name: tests.test_workers -*-
"""A worker process: a Unit on the sockets and peers its supervisor gave it.

The supervisor starts ``twistd -n --pidfile= nlbproxy --config FILE --worker I``
with the sockets to adopt as inherited descriptors and writes its wiring
(:class:`WorkerSpec`, one JSON line: descriptor numbers, DAM peers, private
admin token, the farm secret) on the worker's stdin.  It keeps that pipe
open: end of file means the supervisor is gone, and the worker stops rather
than serve on as an orphan nobody restarts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tomllib
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy import limits
from nlbproxy.config import UnitConfig, parse_config
from nlbproxy.unit import Unit
from nlbproxy.workers.fdendpoint import endpoint_string
from nlbproxy.workers.healthrelay import RelayLink

log = Logger()


@dataclass(frozen=True)
class WorkerSpec:
    """What a supervisor tells worker ``index`` (JSON on its stdin)."""

    index: int
    listeners: dict[str, tuple[int, str]]
    admin: tuple[int, str]
    admin_token: str
    dam_name: str
    dam: tuple[int, str]
    peers: tuple[str, ...]
    secret: bytes
    health: tuple[int, str, tuple[str, int]] | None = None
    #: The config file's text the supervisor accepted (the file may have
    #: changed since: a worker restarted after a refused reload must not
    #: pick up the refused file).
    config: str = ""
    #: Where the worker writes ``serving`` once it serves.
    status_fd: int | None = None
    #: The supervisor's count of accepted configs this worker runs.
    generation: int = 0

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["secret"] = self.secret.hex()
        return json.dumps(data).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes) -> WorkerSpec:
        data = json.loads(line)
        health = data["health"]
        return cls(
            index=int(data["index"]),
            listeners={name: (int(fd), str(family)) for name, (fd, family) in data["listeners"].items()},
            admin=(int(data["admin"][0]), str(data["admin"][1])),
            admin_token=str(data["admin_token"]),
            dam_name=str(data["dam_name"]),
            dam=(int(data["dam"][0]), str(data["dam"][1])),
            peers=tuple(str(p) for p in data["peers"]),
            secret=bytes.fromhex(data["secret"]),
            health=None if health is None else (int(health[0]), str(health[1]), (str(health[2][0]), int(health[2][1]))),
            config=str(data.get("config", "")),
            status_fd=None if data.get("status_fd") is None else int(data["status_fd"]),
            generation=int(data.get("generation", 0)),
        )

    def unit_config(self, path: str) -> UnitConfig:
        """The operator's config this worker runs (relative names resolve from ``path``)."""
        return parse_config(tomllib.loads(self.config), path)


def worker_config(config: UnitConfig, spec: WorkerSpec) -> UnitConfig:
    """The unit config a worker runs: the operator's, rewired by ``spec``."""
    from nlbproxy.config import parse_host_port

    listeners = tuple(dataclasses.replace(lc, endpoint=endpoint_string(*spec.listeners[lc.name]))
                      for lc in config.listeners)
    access_log = config.access_log
    if access_log not in (None, "-"):
        # Buffered writes of several processes to one file could interleave
        # inside a line: each worker keeps a file of its own.
        access_log = f"{access_log}.w{spec.index}"
    return dataclasses.replace(
        config,
        workers=1,
        access_log=access_log,
        listeners=listeners,
        admin=endpoint_string(*spec.admin),
        admin_token=spec.admin_token,
        secret=spec.secret,
        dam=endpoint_string(*spec.dam),
        peers=tuple(parse_host_port(p) for p in spec.peers),
    )


class WorkerUnit(Unit):
    """A Unit on the sockets its supervisor made (``nlbfd`` endpoints) that says when it serves."""

    def __init__(self, config: UnitConfig, spec: WorkerSpec, reactor: Any) -> None:
        super().__init__(worker_config(config, spec), reactor, dam_name=spec.dam_name)
        self.spec = spec
        if spec.health is not None:
            fd, family, supervisor = spec.health
            self.health.relay = RelayLink(fd, family, supervisor)

    def _serve(self, _: object = None) -> None:
        super()._serve(_)
        if self.spec.status_fd is not None:
            try:
                os.write(self.spec.status_fd, b"serving\n")
            except OSError:
                log.warn("worker {i}: cannot tell the supervisor it serves", i=self.spec.index)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        # The supervisor keeps the listening sockets open for the worker that
        # replaces this one, so stop accepting first, then give connections
        # accepted a moment ago time to send their request: the graceful stop
        # closes at once those that carry none yet, which a client that just
        # connected sees as a reset.
        for port in self.ports.values():
            port.stopReading()
        yield deferLater(self.reactor, limits.WORKER_STOP_LINGER, lambda: None)
        yield super().stopService()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Stream sockets were closed once adopted (nlbfd endpoints); the
        # health link's datagram socket was dup'd and is not needed.
        if self.spec.health is not None:
            _close_quietly(self.spec.health[0])


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class ParentWatch:
    """Reads the worker's stdin; end of file (the supervisor died) stops the reactor."""

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self.reactor = reactor
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else ConnectionDone()

    def connectionLost(self, reason: Failure) -> None:
        self.reactor.removeReader(self)
        if self.reactor.running:
            log.warn("supervisor gone: worker stopping")
            self.reactor.stop()


def read_spec(stream: Any) -> WorkerSpec:
    """The first line of the worker's stdin."""
    line = stream.readline()
    if not line:
        raise SystemExit("worker: no wiring on stdin (is this a supervisor's child?)")
    return WorkerSpec.from_json(line)


def worker_service(path: str, spec: WorkerSpec, reactor: Any) -> WorkerUnit:
    # Reload and upgrade are the supervisor's to decide; a signal sent to
    # the whole process group (kill -HUP -PGID) must not stop a worker.
    for signum in (signal.SIGHUP, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    unit = WorkerUnit(spec.unit_config(path), spec, reactor)
    os.set_blocking(0, False)
    reactor.callWhenRunning(reactor.addReader, ParentWatch(reactor))
    return unit
