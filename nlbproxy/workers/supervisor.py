# -*- test-case-name: tests.test_workers -*-
"""The supervisor of a unit with ``workers > 1`` (see :mod:`nlbproxy.workers`).

Reload and upgrade (``SIGHUP``/``SIGUSR2``, ``POST /api/v1/reload`` and
``/upgrade``) replace the workers one at a time: the new process adopts the
same listening sockets as the one it replaces, and only once it serves is the
old one stopped gracefully (it finishes what it has in flight).  Both
processes accept from the same queue meanwhile, so no connection waits for a
start and none is refused.  A new process also runs the program as it now is
on disk, which is how an upgrade reaches the workers; the supervisor itself
keeps running its own code.  A config the supervisor cannot parse, or one that
changes what the supervisor itself owns (``workers``, ``admin``, ``health``,
``dam``, ``peers``, ``name``, the secret), is refused with its reasons and the
running one keeps serving; so is a config a new worker cannot start with (the
workers go back to the config they had).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy import limits
from nlbproxy.signals import ControlSignals
from nlbproxy.config import ConfigError, UnitConfig, format_host_port, parse_config
from nlbproxy.health.codec import SENDER_AGENT_KINDS, Codec, ReplayGuard
from nlbproxy.health.messages import node_id
from nlbproxy.unit import StartError, url_of
from nlbproxy.workers.adminproxy import WorkerAdmin, make_supervisor_site
from nlbproxy.workers.healthrelay import PublicHealth, WorkerLink
from nlbproxy.workers.policy import RestartPolicy
from nlbproxy.workers.sockets import (
    Inherited,
    bound_to,
    connect_address,
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

#: What a reload cannot change: the supervisor owns it (a restart can).
SUPERVISOR_KEYS = ("name", "workers", "admin", "health", "dam", "peers", "secret")


class ReloadRefused(Exception):
    """A reload or upgrade that will not happen, and why."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass
class Slot:
    """One worker: its sockets (kept across restarts), process and history."""

    index: int
    health: Inherited | None
    #: The worker's DAM socket (worker 0's is the unit's ``dam``); kept
    #: across restarts and shared by a worker and its replacement.
    dam: Inherited
    dam_address: tuple[str, int]
    spawned: int = 0
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    process: WorkerProcess | None = None
    #: Processes replaced by a reload, finishing their requests.
    retiring: list[WorkerProcess] = field(default_factory=list)
    given_up: bool = False
    pending: Any = None

    @property
    def admin_address(self) -> tuple[str, int]:
        assert self.process is not None
        host, port = self.process.admin.sock.getsockname()[:2]
        return host, port

    @property
    def running(self) -> bool:
        return self.process is not None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def generation(self) -> int:
        return self.process.generation if self.process is not None else -1


class WorkerProcess(protocol.ProcessProtocol):
    """One worker process; its stdin stays open as the worker's lifeline."""

    def __init__(self, supervisor: Supervisor, slot: Slot, generation: int, status_fd: int,
                 admin: Inherited) -> None:
        self.supervisor = supervisor
        self.slot = slot
        #: This process's private admin socket: its own, so that the
        #: supervisor's calls reach it and not the worker it replaces.
        self.admin = admin
        self.generation = generation
        self.status_fd = status_fd
        self.pid: int | None = None
        self.serving = False
        #: During a reload: the process this one replaces once it serves.
        self.replaces: WorkerProcess | None = None
        self.start_timer: Any = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""
        self.exited = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.status_fd:
            if b"serving" in data and not self.serving:
                self.serving = True
                self.supervisor.worker_serving(self)
            return
        # The worker logs to its stdout; its lines join the unit's log,
        # marked with the worker's index.
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            text = _TIMESTAMP.sub("", line.decode("utf-8", "replace"), count=1)
            log.info("[worker {i}] {line}", i=self.slot.index, line=text)

    def signal(self, signum: int) -> None:
        try:
            self.transport.signalProcess(signum)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self.childDataReceived(1, b"\n")
        self.admin.sock.close()
        self.exited = True
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class Supervisor(service.Service):
    """Creates the sockets, runs the workers, serves the unit's admin API."""

    def __init__(self, config: UnitConfig, reactor: Any, executable: str = sys.executable) -> None:
        self.reactor = reactor
        self.executable = executable
        self.path = os.path.abspath(config.path)
        # Workers get the text the supervisor parsed, not whatever the file
        # holds when they start.
        self.config_text = _read(self.path)
        self.config = parse_config(tomllib.loads(self.config_text), self.path)
        self.count = self.config.workers
        self.generation = 0
        self.token = secrets.token_urlsafe(24)
        # Every worker must sign affinity cookies and DAM calls alike.
        self.secret = self.config.secret if self.config.secret is not None else os.urandom(32)
        self.slots: list[Slot] = []
        #: (listener name, endpoint) -> one socket per worker.
        self.listener_sockets: dict[tuple[str, str], list[Inherited]] = {}
        self.public_health: PublicHealth | None = None
        self.link: WorkerLink | None = None
        self.admin: WorkerAdmin | None = None
        self._udp_ports: list[Any] = []
        self.admin_port: Any = None
        self.stopping = False
        self._rolling = False
        self._previous: tuple[UnitConfig, str] | None = None
        self.last_roll: dict[str, Any] = {}
        self._signals = ControlSignals(reactor, self._reload_signalled, self._upgrade_signalled)

    # -- start -----------------------------------------------------------------
    def privilegedStartService(self) -> None:
        self._open_listeners(self.config)
        for i in range(self.count):
            if i == 0 and self.config.dam is not None:
                try:
                    dam = listening_sockets(self.config.dam, 1)[0]
                except OSError as exc:
                    raise StartError(f"cannot listen on {self.config.dam}: {exc}") from exc
                address = connect_address(self.config.dam)
            else:
                dam = loopback_stream()
                address = dam.sock.getsockname()[:2]
            self.slots.append(Slot(
                index=i,
                health=loopback_datagram() if self.config.health is not None else None,
                dam=dam,
                dam_address=address,
            ))
        if self.config.health is not None:
            self._listen_health()
        self.admin = WorkerAdmin(self, self.reactor)
        self.site = make_supervisor_site(self.admin, self.config.admin_token, self.reactor)
        result: list[Any] = []
        serverFromString(self.reactor, self.config.admin).listen(self.site).addBoth(result.append)
        if not result or isinstance(result[0], Failure):
            why = result[0].getErrorMessage() if result else "did not bind at once"
            raise StartError(f"cannot listen on {self.config.admin}: {why}")
        self.admin_port = result[0]
        super().privilegedStartService()

    def _open_listeners(self, config: UnitConfig) -> None:
        """Sockets for the listeners of ``config`` that have none yet."""
        for lc in config.listeners:
            key = (lc.name, lc.endpoint)
            if key in self.listener_sockets:
                continue
            same = self._same_address(lc.name, lc.endpoint)
            if same is not None:
                # Spelt differently (or port 0 made concrete): the same
                # sockets, which must not close under queued connections.
                self.listener_sockets[key] = self.listener_sockets.pop(same)
                continue
            try:
                self.listener_sockets[key] = listening_sockets(lc.endpoint, self.count)
            except OSError as exc:
                raise StartError(f"cannot listen on {lc.endpoint}: {exc}") from exc

    def _same_address(self, name: str, endpoint: str) -> tuple[str, str] | None:
        """The key of listener ``name``'s sockets if ``endpoint`` binds where they are."""
        for key, sockets in self.listener_sockets.items():
            if key[0] == name and bound_to(sockets[0], endpoint):
                return key
        return None

    def _close_stale_listeners(self) -> None:
        """Closes the sockets of listeners no process uses any more."""
        if self._rolling or any(slot.retiring for slot in self.slots):
            return
        wanted = {(lc.name, lc.endpoint) for lc in self.config.listeners}
        for key in [k for k in self.listener_sockets if k not in wanted]:
            for inherited in {id(i.sock): i for i in self.listener_sockets.pop(key)}.values():
                inherited.sock.close()
            log.info("listener {name} on {endpoint} closed", name=key[0], endpoint=key[1])

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
        for lc in self.config.listeners:
            log.info("listener {name} on {url} ({n} workers)", name=lc.name,
                     url=_url(self.listener_sockets[(lc.name, lc.endpoint)][0]), n=self.count)
        log.info("admin API on {url}", url=url_of(self.admin_port))
        if self.public_health is not None and self.public_health.transport is not None:
            where = self.public_health.transport.getHost()
            log.info("health messages on udp {ip}:{port}", ip=where.host, port=where.port)
        for slot in self.slots:
            self.spawn(slot)
        self._signals.install()

    def spec(self, slot: Slot, admin_socket: Inherited) -> tuple[WorkerSpec, dict[int, int | str], int]:
        """What worker ``slot`` is told, its descriptors (child -> ours) and its status descriptor."""
        fds: dict[int, int | str] = {}

        def give(inherited: Inherited) -> tuple[int, str]:
            fd = FIRST_FD + len(fds)
            fds[fd] = inherited.sock.fileno()
            return fd, inherited.family

        listeners = {lc.name: give(self.listener_sockets[(lc.name, lc.endpoint)][slot.index])
                     for lc in self.config.listeners}
        admin = give(admin_socket)
        dam = give(slot.dam)
        health = None
        if slot.health is not None:
            assert self.link is not None and self.link.transport is not None
            relay = self.link.transport.getHost()
            fd, family = give(slot.health)
            health = (fd, family, (relay.host, relay.port))
        status_fd = FIRST_FD + len(fds)
        fds[status_fd] = "r"
        peers = [format_host_port(*other.dam_address) for other in self.slots if other is not slot]
        if slot.index == 0:
            peers += [format_host_port(*p) for p in self.config.peers]
        spec = WorkerSpec(
            index=slot.index, listeners=listeners, admin=admin, admin_token=self.token,
            # Each process is a DAM peer of its own: a reload's new worker and
            # the one it replaces run side by side for a while.
            dam_name=f"{self.config.name}.w{slot.index}.{slot.spawned}", dam=dam, peers=tuple(peers),
            secret=self.secret, health=health, config=self.config_text, status_fd=status_fd,
            generation=self.generation,
        )
        return spec, fds, status_fd

    def spawn(self, slot: Slot) -> WorkerProcess:
        """Starts a worker process for ``slot``; it becomes the slot's process."""
        if slot.pending is not None and slot.pending.active():
            slot.pending.cancel()
        slot.pending = None
        slot.spawned += 1
        admin = loopback_stream()
        spec, fds, status_fd = self.spec(slot, admin)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        child_fds.update(fds)
        args = [
            self.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "nlbproxy", "--config", self.path, "--worker", str(slot.index),
        ]
        process = WorkerProcess(self, slot, self.generation, status_fd, admin)
        transport = self.reactor.spawnProcess(process, self.executable, args, env=os.environ.copy(),
                                              childFDs=child_fds)
        transport.write(spec.to_json())
        process.pid = transport.pid
        slot.process = process
        slot.policy.started(self.reactor.seconds())
        log.info("worker {i} started (pid {pid}, config generation {g})", i=slot.index, pid=process.pid,
                 g=self.generation)
        if self.admin is not None:
            self.admin.replay(slot)
        return process

    # -- what workers do -----------------------------------------------------------------
    def worker_serving(self, process: WorkerProcess) -> None:
        slot = process.slot
        log.info("worker {i} (pid {pid}) serving", i=slot.index, pid=process.pid)
        if self.admin is not None and slot.process is process:
            self.admin.replay(slot)
        old = process.replaces
        if old is None:
            return
        process.replaces = None
        if process.start_timer is not None and process.start_timer.active():
            process.start_timer.cancel()
        if not old.exited:
            slot.retiring.append(old)
            old.signal(signal.SIGTERM)
        self._roll_next()

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        slot = process.slot
        how = _how(reason)
        if process in slot.retiring:
            slot.retiring.remove(process)
            log.info("worker {i} (pid {pid}, generation {g}) retired: {how}", i=slot.index, pid=process.pid,
                     g=process.generation, how=how)
            self._close_stale_listeners()
            return
        if slot.process is not process:
            return
        slot.process = None
        if self.stopping:
            return
        if process.replaces is not None:
            self._roll_failed(process, f"worker {slot.index} with the new config {how} before serving")
            return
        delay = slot.policy.died(self.reactor.seconds())
        if delay is None:
            slot.given_up = True
            log.critical("worker {i} (pid {pid}) {how}: died {n} times in a row, not restarted",
                         i=slot.index, pid=process.pid, how=how, n=slot.policy.streak)
            if not any(s.running or s.pending is not None for s in self.slots):
                log.critical("no worker left: the unit stops")
                self.reactor.stop()
            return
        log.warn("worker {i} (pid {pid}) {how}: restarting in {delay}s",
                 i=slot.index, pid=process.pid, how=how, delay=delay)
        slot.pending = self.reactor.callLater(delay, self.spawn, slot)

    # -- reload and upgrade --------------------------------------------------------------
    def reload_file(self) -> dict[str, Any]:
        """Checks the config file and rolls the workers onto it; raises ReloadRefused."""
        try:
            text = _read(self.path)
            config = parse_config(tomllib.loads(text), self.path)
        except ConfigError as exc:
            raise ReloadRefused([str(exc)]) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ReloadRefused([f"{self.path}: invalid TOML: {exc}"]) from None
        except OSError as exc:
            raise ReloadRefused([f"{self.path}: cannot read config file: {exc.strerror}"]) from None
        reasons = [
            f"unit.{key}: changing it needs a restart of the unit (the supervisor owns it)"
            for key in SUPERVISOR_KEYS
            if getattr(config, key) != getattr(self.config, key)
            and not (key == "secret" and self.config.secret is None and config.secret is None)
        ]
        if reasons:
            raise ReloadRefused(reasons)
        try:
            self._open_listeners(config)
        except StartError as exc:
            raise ReloadRefused([str(exc)]) from None
        self._previous = (self.config, self.config_text)
        self.config, self.config_text = config, text
        self.site.resource.set_token(config.admin_token)
        return self._start_roll("reload")

    def upgrade(self) -> dict[str, Any]:
        """New worker processes (running the program now on disk) on the same config."""
        self._previous = None
        return self._start_roll("upgrade")

    def _start_roll(self, why: str) -> dict[str, Any]:
        self.generation += 1
        self.last_roll = {"why": why, "generation": self.generation, "done": False, "error": None}
        log.info("{why}: replacing the workers one at a time (config generation {g})", why=why,
                 g=self.generation)
        if not self._rolling:
            self._rolling = True
            self._roll_next()
        return dict(self.last_roll)

    def _roll_next(self) -> None:
        stale = [s for s in self.slots if s.generation < self.generation and not s.given_up]
        if not stale or self.stopping:
            self._rolling = False
            if not self.stopping:
                self.last_roll["done"] = True
                log.info("every worker runs config generation {g}", g=self.generation)
                self._close_stale_listeners()
            return
        slot = stale[0]
        old = slot.process
        process = self.spawn(slot)
        if old is None:
            # Dead or waiting for a restart: nothing to hand over from.
            process.replaces = None
            self.reactor.callLater(0, self._roll_next)
            return
        process.replaces = old
        process.start_timer = self.reactor.callLater(
            limits.WORKER_START_TIMEOUT, self._start_timed_out, process)

    def _start_timed_out(self, process: WorkerProcess) -> None:
        if process.replaces is not None and process.slot.process is process:
            log.error("worker {i} (pid {pid}) did not serve within {t}s: killed",
                      i=process.slot.index, pid=process.pid, t=limits.WORKER_START_TIMEOUT)
            process.signal(signal.SIGKILL)

    def _roll_failed(self, process: WorkerProcess, why: str) -> None:
        slot = process.slot
        if process.start_timer is not None and process.start_timer.active():
            process.start_timer.cancel()
        slot.process = process.replaces  # the old worker never stopped
        process.replaces = None
        log.error("{why}: the workers go back to the config they had", why=why)
        self.last_roll["error"] = why
        if self._previous is not None:
            self.config, self.config_text = self._previous
            self._previous = None
            self.site.resource.set_token(self.config.admin_token)
            self.generation += 1
            self.reactor.callLater(0, self._roll_next)
        else:
            self._rolling = False

    # -- signals ---------------------------------------------------------------------------
    def _reload_signalled(self) -> None:
        log.info("SIGHUP: reloading {path}", path=self.path)
        try:
            self.reload_file()
        except ReloadRefused as exc:
            log.error("reload refused, the running config keeps serving: {why}", why=exc)

    def _upgrade_signalled(self) -> None:
        log.info("SIGUSR2: upgrading the workers")
        self.upgrade()

    # -- stop ------------------------------------------------------------------------
    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.stopping = True
        self._signals.restore()
        waits = []
        for slot in self.slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            for process in [*slot.retiring, *([slot.process] if slot.process is not None else [])]:
                waits.append(process.ended)
                process.signal(signal.SIGTERM)
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
        sockets = [i for socks in self.listener_sockets.values() for i in socks]
        sockets += [i for slot in self.slots for i in (slot.dam, slot.health) if i is not None]
        for inherited in sockets:
            if id(inherited.sock) not in closed:
                closed.add(id(inherited.sock))
                inherited.sock.close()

    def _kill(self) -> None:
        for slot in self.slots:
            for process in [*slot.retiring, *([slot.process] if slot.process is not None else [])]:
                log.warn("worker {i} (pid {pid}) did not stop in time: killed", i=slot.index, pid=process.pid)
                process.signal(signal.SIGKILL)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def _url(inherited: Inherited) -> str:
    address = inherited.sock.getsockname()
    if isinstance(address, str):
        return f"unix:{address}"
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"http://{host}:{address[1]}/"


def _how(reason: Failure) -> str:
    value = reason.value
    signum = getattr(value, "signal", None)
    if signum is not None:
        return f"killed by {signal.Signals(signum).name}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"
