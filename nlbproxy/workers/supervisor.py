# -*- test-case-name: tests.test_workers -*-
"""The supervisor of a unit with ``workers > 1`` (see :mod:`nlbproxy.workers`)."""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy import limits
from nlbproxy.config import UnitConfig, format_host_port
from nlbproxy.health.codec import SENDER_AGENT_KINDS, Codec, ReplayGuard
from nlbproxy.health.messages import node_id
from nlbproxy.unit import StartError, url_of
from nlbproxy.workers.adminproxy import WorkerAdmin, make_supervisor_site
from nlbproxy.workers.healthrelay import PublicHealth, WorkerLink
from nlbproxy.workers.policy import RestartPolicy
from nlbproxy.workers.sockets import (
    Inherited,
    connect_address,
    free_loopback_port,
    listening_sockets,
    loopback_datagram,
    loopback_stream,
)
from nlbproxy.workers.worker import WorkerSpec

log = Logger()

# The worker's own timestamp, redundant with the supervisor's.
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[0-9:.]+[+-]\d{4} ")

#: The first descriptor number a worker inherits its sockets at.
FIRST_FD = 3


@dataclass
class Slot:
    """One worker: its sockets (kept across restarts), process and history."""

    index: int
    listeners: dict[str, Inherited]
    admin: Inherited
    health: Inherited | None
    dam_name: str
    dam: str
    dam_address: tuple[str, int]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    process: WorkerProcess | None = None
    pid: int | None = None
    given_up: bool = False
    deaths: int = 0
    pending: Any = None

    @property
    def admin_address(self) -> tuple[str, int]:
        host, port = self.admin.sock.getsockname()[:2]
        return host, port

    @property
    def running(self) -> bool:
        return self.process is not None


class WorkerProcess(protocol.ProcessProtocol):
    """Watches one worker process; its stdin stays open as the worker's lifeline."""

    def __init__(self, supervisor: Supervisor, slot: Slot) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        # The worker logs to its stdout; its lines join the unit's log,
        # marked with the worker's index.
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            text = _TIMESTAMP.sub("", line.decode("utf-8", "replace"), count=1)
            log.info("[worker {i}] {line}", i=self.slot.index, line=text)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self.outReceived(b"\n")
        self.ended.callback(None)
        self.supervisor.worker_ended(self.slot, self, reason)


class Supervisor(service.Service):
    """Creates the sockets, runs the workers, serves the unit's admin API."""

    def __init__(self, config: UnitConfig, reactor: Any, executable: str = sys.executable) -> None:
        self.config = config
        self.reactor = reactor
        self.executable = executable
        self.count = config.workers
        self.token = secrets.token_urlsafe(24)
        # Every worker must sign affinity cookies and DAM calls alike.
        self.secret = config.secret if config.secret is not None else os.urandom(32)
        self.slots: list[Slot] = []
        self.public_health: PublicHealth | None = None
        self.link: WorkerLink | None = None
        self.admin: WorkerAdmin | None = None
        self._udp_ports: list[Any] = []
        self.admin_port: Any = None
        self.stopping = False

    # -- start -----------------------------------------------------------------
    def privilegedStartService(self) -> None:
        try:
            per_listener = {lc.name: listening_sockets(lc.endpoint, self.count) for lc in self.config.listeners}
        except OSError as exc:
            raise StartError(f"cannot listen: {exc}") from exc
        if self.config.dam is not None:
            face = connect_address(self.config.dam)
        for i in range(self.count):
            if i == 0 and self.config.dam is not None:
                dam, address = self.config.dam, face
            else:
                port = free_loopback_port()
                dam, address = f"tcp:{port}:interface=127.0.0.1", ("127.0.0.1", port)
            self.slots.append(Slot(
                index=i,
                listeners={name: socks[i] for name, socks in per_listener.items()},
                admin=loopback_stream(),
                health=loopback_datagram() if self.config.health is not None else None,
                dam_name=f"{self.config.name}.w{i}",
                dam=dam,
                dam_address=address,
            ))
        if self.config.health is not None:
            self._listen_health()
        self.admin = WorkerAdmin(self, self.reactor)
        site = make_supervisor_site(self.admin, self.config.admin_token, self.reactor)
        result: list[Any] = []
        serverFromString(self.reactor, self.config.admin).listen(site).addBoth(result.append)
        if not result or isinstance(result[0], Failure):
            why = result[0].getErrorMessage() if result else "did not bind at once"
            raise StartError(f"cannot listen on {self.config.admin}: {why}")
        self.admin_port = result[0]
        super().privilegedStartService()

    def _listen_health(self) -> None:
        assert self.config.health is not None
        codec = Codec(self.secret, self.reactor)
        self.public_health = PublicHealth(codec, ReplayGuard(), node_id(self.config.name), SENDER_AGENT_KINDS,
                                          self.reactor, lambda address, envelope: None)
        ip, port = self.config.health
        try:
            self._udp_ports.append(self.reactor.listenUDP(port, self.public_health, interface=ip))
        except Exception as exc:  # CannotListenError and friends
            raise StartError(f"cannot listen for health messages on {ip}:{port}: {exc}") from exc
        workers = []
        for slot in self.slots:
            assert slot.health is not None
            host, wport = slot.health.sock.getsockname()[:2]
            workers.append((host, wport))
        self.link = WorkerLink(self.public_health, Codec(self.secret, self.reactor), workers)
        self._udp_ports.append(self.reactor.listenUDP(0, self.link, interface="127.0.0.1"))

    def startService(self) -> None:
        if not self.slots:
            self.privilegedStartService()
        super().startService()
        # Logged before any worker runs: a worker logs its private admin URL.
        for name, inherited in self.slots[0].listeners.items():
            log.info("listener {name} on {url} ({n} workers)", name=name, url=_url(inherited), n=self.count)
        log.info("admin API on {url}", url=url_of(self.admin_port))
        if self.public_health is not None and self.public_health.transport is not None:
            where = self.public_health.transport.getHost()
            log.info("health messages on udp {ip}:{port}", ip=where.host, port=where.port)
        for slot in self.slots:
            self.spawn(slot)

    def spec(self, slot: Slot) -> tuple[WorkerSpec, dict[int, int]]:
        """What worker ``slot`` is told, and its descriptors (child -> ours)."""
        fds: dict[int, int] = {}

        def give(inherited: Inherited) -> tuple[int, str]:
            fd = FIRST_FD + len(fds)
            fds[fd] = inherited.sock.fileno()
            return fd, inherited.family

        listeners = {name: give(sock) for name, sock in slot.listeners.items()}
        admin = give(slot.admin)
        health = None
        if slot.health is not None:
            assert self.link is not None and self.link.transport is not None
            relay = self.link.transport.getHost()
            fd, family = give(slot.health)
            health = (fd, family, (relay.host, relay.port))
        peers = [format_host_port(*other.dam_address) for other in self.slots if other is not slot]
        if slot.index == 0:
            peers += [format_host_port(*p) for p in self.config.peers]
        spec = WorkerSpec(
            index=slot.index, listeners=listeners, admin=admin, admin_token=self.token,
            dam_name=slot.dam_name, dam=slot.dam, peers=tuple(peers), secret=self.secret, health=health,
        )
        return spec, fds

    def spawn(self, slot: Slot) -> None:
        slot.pending = None
        spec, fds = self.spec(slot)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        child_fds.update(fds)
        args = [
            self.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "nlbproxy", "--config", self.config.path, "--worker", str(slot.index),
        ]
        process = WorkerProcess(self, slot)
        transport = self.reactor.spawnProcess(process, self.executable, args, env=os.environ.copy(),
                                              childFDs=child_fds)
        transport.write(spec.to_json())
        slot.process = process
        slot.pid = transport.pid
        slot.policy.started(self.reactor.seconds())
        log.info("worker {i} started (pid {pid})", i=slot.index, pid=slot.pid)
        if self.admin is not None:
            self.admin.replay(slot)

    # -- deaths ----------------------------------------------------------------------
    def worker_ended(self, slot: Slot, process: WorkerProcess, reason: Failure) -> None:
        if slot.process is not process:
            return
        slot.process = None
        if self.stopping:
            return
        slot.deaths += 1
        how = _how(reason)
        delay = slot.policy.died(self.reactor.seconds())
        if delay is None:
            slot.given_up = True
            log.critical("worker {i} (pid {pid}) {how}: died {n} times in a row, not restarted",
                         i=slot.index, pid=slot.pid, how=how, n=slot.policy.streak)
            if not any(s.running or s.pending is not None for s in self.slots):
                log.critical("no worker left: the unit stops")
                self.reactor.stop()
            return
        log.warn("worker {i} (pid {pid}) {how}: restarting in {delay}s",
                 i=slot.index, pid=slot.pid, how=how, delay=delay)
        slot.pending = self.reactor.callLater(delay, self.spawn, slot)

    # -- stop ------------------------------------------------------------------------
    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.stopping = True
        waits = []
        for slot in self.slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            if slot.process is not None:
                waits.append(slot.process.ended)
                _signal(slot.process, signal.SIGTERM)
        if waits:
            done = defer.DeferredList(waits)
            timer = self.reactor.callLater(self.config.grace_period + limits.WORKER_STOP_MARGIN, self._kill)
            yield done
            if timer.active():
                timer.cancel()
        if self.admin_port is not None:
            yield defer.maybeDeferred(self.admin_port.stopListening)
        for port in self._udp_ports:
            yield defer.maybeDeferred(port.stopListening)
        closed: set[int] = set()
        for slot in self.slots:
            for inherited in [*slot.listeners.values(), slot.admin, slot.health]:
                if inherited is not None and id(inherited.sock) not in closed:
                    closed.add(id(inherited.sock))
                    inherited.sock.close()

    def _kill(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                log.warn("worker {i} did not stop in time: killed", i=slot.index)
                _signal(slot.process, signal.SIGKILL)


def _url(inherited: Inherited) -> str:
    address = inherited.sock.getsockname()
    if isinstance(address, str):
        return f"unix:{address}"
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"http://{host}:{address[1]}/"


def _signal(process: WorkerProcess, signum: int) -> None:
    try:
        process.transport.signalProcess(signum)  # type: ignore[union-attr]
    except error.ProcessExitedAlready:
        pass


def _how(reason: Failure) -> str:
    value = reason.value
    signum = getattr(value, "signal", None)
    if signum is not None:
        return f"killed by {signal.Signals(signum).name}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"
