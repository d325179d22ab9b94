# -*- test-case-name: tests.test_unit -*-
"""A balancing unit: listeners, pools and the admin API as one Twisted service.

Start binds every listener in ``privilegedStartService`` (before twistd drops
privileges, and so that a port already in use stops the start with one
clear line).  Stop is graceful: listeners stop accepting, idle keep-alive
connections close, busy ones close after their response, and whatever is
still running after ``grace_period`` is aborted.

Reload (:meth:`Unit.reload`, from SIGHUP, ``POST /api/v1/reload`` or
``nlbctl reload``) applies a new config to the running unit as
:mod:`nlbproxy.reload` plans it; upgrade (:meth:`Unit.upgrade`, from
SIGUSR2, ``POST /api/v1/upgrade`` or ``nlbctl upgrade``) starts the new
program on this one's listening sockets (:mod:`nlbproxy.sockets`) and drains
this one once the new one serves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy import limits, sockets
from nlbproxy.signals import ControlSignals
from nlbproxy.accesslog import FileAccessLog, LoggerAccessLog
from nlbproxy.admin import AdminResource, make_admin_site
from nlbproxy.cache import ResponseCache, pool_caches
from nlbproxy.classifier import Farm
from nlbproxy.config import ConfigError, ListenerConfig, UnitConfig, format_host_port, load_config
from nlbproxy.reload import Plan, ReloadRefused, plan_reload
from nlbproxy.health.unitside import UnitHealth
from nlbproxy.session.dam import DAM
from nlbproxy.session.peering import DamService
from nlbproxy.session.tracker import SessionTracker
from nlbproxy.handoff.unitforwarder import ForwarderStartError, HandoffReport, UnitForwarder, build_forwarder
from nlbproxy.handoff.unitside import HandoffFactory, HandoffUnit, Plumbing
from nlbproxy.tls import CertificateError, TLSServer
from nlbproxy.routers.http import Listener, RouterFactory
from nlbproxy.routers.upstream import Upstreams

log = Logger()

#: Seconds a starting unit with a health socket waits before it serves, so
#: that every live agent heartbeats and sends its table first (agents
#: heartbeat every 0.25 s; the cache ages a host out after 1 s of silence).
HEALTH_WARMUP = 1.0
#: How often a graceful stop checks whether in-flight requests are done.
DRAIN_POLL_INTERVAL = 0.05


class StartError(Exception):
    """A listener could not be bound."""


class Unit(service.Service):
    """One balancing unit."""

    def __init__(
        self,
        config: UnitConfig,
        reactor: Any,
        plumbing: Plumbing | None = None,
        *,
        config_path: str | None = None,
        signals: bool = False,
        inherited: dict[str, int] | None = None,
        ready_fd: int | None = None,
        upgrade_blocker: str | None = None,
        dam_name: str | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        #: The file reloads re-read (None: this unit cannot reload, e.g. the demo).
        self.config_path = config_path
        #: Install SIGHUP (reload) and SIGUSR2 (upgrade) handlers at start.
        self.signals = signals
        self._signals = ControlSignals(reactor, self._reload_signalled, self._upgrade_signalled)
        #: Listening sockets handed over by the process this one upgrades.
        self.inherited = dict(inherited or {})
        self.ready_fd = ready_fd
        self.serving = False
        self.upgrading: _Upgrade | None = None
        #: Why this process cannot upgrade in place (how twistd runs it), if it cannot.
        self.upgrade_blocker = upgrade_blocker
        #: The upgrade took over: this process only drains.
        self.handed_over = False
        self.farm = Farm(config.pools.values(), reactor, config.secret)
        self.upstreams = Upstreams(reactor)
        # A worker of a multi-process unit (nlbproxy.workers) is a DAM peer
        # of its siblings, so it needs a name of its own there.
        dam_name = dam_name or config.name
        dam = DAM(dam_name, reactor, _no_peers, config.replication)
        # With a ``dam`` endpoint the DamService carries the DAM's calls to
        # the other units and drives its clock; alone, the tracker does.
        self.dam_service: DamService | None = None
        if config.dam is not None:
            assert config.secret is not None  # the config requires it
            self.dam_service = DamService(
                dam, dam_name, config.dam, [format_host_port(*p) for p in config.peers],
                config.secret, reactor,
            )
        self.sessions = SessionTracker(dam, reactor, standalone=self.dam_service is None)
        self.access_log = _access_log(config, reactor)
        self.caches = pool_caches(config.pools.values(), reactor)
        #: TLS of the listeners with certificates, by listener name (see _make_listener).
        self.tls: dict[str, TLSServer] = {}
        self.listeners = {lc.name: self._make_listener(lc) for lc in config.listeners}
        #: The admin API's view of the listeners' statistics, kept current by reloads.
        self.listener_stats = {n: li.stats for n, li in self.listeners.items()}
        #: Listeners a reload removed, while their connections finish.
        self.retiring: set[Listener] = set()
        self.health = UnitHealth(config, self.farm, reactor, self.sessions)
        self.ports: dict[str, Any] = {}
        self.admin_port: Any = None
        # Listeners with ``handoff = true``: ``plumbing`` is the forwarder,
        # by default the one ``[unit] forwarder_in`` configures.
        self.handoff: HandoffUnit | None = None
        self.forwarder: UnitForwarder | None = None
        if any(lc.handoff for lc in config.listeners):
            assert config.secret is not None  # the config requires it
            if plumbing is None:
                self.forwarder = build_forwarder(config, reactor, self.farm, dam)
                plumbing = self.forwarder
            self.handoff = HandoffUnit(config.secret, config.handoff_port, plumbing, reactor)

    def _make_listener(self, config: ListenerConfig, stats: Any = None) -> Listener:
        if config.certificates:
            # Certificates were checked when the config was read; a file
            # changed since then fails here with the same CertificateError.
            self.tls[config.name] = TLSServer(
                config.name, config.certificates, config.session_tickets, config.tls_session_timeout,
                secret=self.config.secret, clock=self.reactor, ticket_key_period=config.ticket_key_period,
            )
        else:
            self.tls.pop(config.name, None)
        return Listener(config, self.farm, self.upstreams, self.reactor, self.config.name, self.access_log,
                        scheme=b"https" if config.certificates else b"http", sessions=self.sessions,
                        caches=self.caches, stats=stats)

    def _factory(self, listener: Listener) -> Any:
        factory: Any = RouterFactory(listener)
        if listener.config.handoff and self.handoff is not None:
            factory = HandoffFactory(factory, self.handoff)
        server = self.tls.get(listener.name)
        if server is not None:
            factory = server.wrap(factory)
        return factory

    def _listen(self, description: str, factory: Any, name: str | None = None) -> Any:
        """Binds ``description``, or adopts the socket named ``name`` that an
        upgrading process handed over."""
        fd = self.inherited.pop(name, None) if name is not None else None
        if fd is not None:
            try:
                return sockets.adopt(self.reactor, fd, factory)
            except Exception as exc:  # CannotListenError and OSError alike
                raise StartError(f"cannot adopt the inherited socket of {name}: {exc}") from exc
        result: list[Any] = []
        serverFromString(self.reactor, description).listen(factory).addBoth(result.append)
        if not result:  # only an endpoint that binds asynchronously would do this
            raise StartError(f"cannot listen on {description}: endpoint did not bind at once")
        port = result[0]
        if isinstance(port, Failure):
            raise StartError(f"cannot listen on {description}: {port.getErrorMessage()}")
        return port

    def privilegedStartService(self) -> None:
        if self.forwarder is not None:
            try:
                self.forwarder.start()
            except ForwarderStartError as exc:
                raise StartError(str(exc)) from exc
        for name, listener in self.listeners.items():
            self.ports[name] = self._listen(listener.config.endpoint, self._factory(listener), name)
        self.admin_site = make_admin_site(
            self.farm, self.listener_stats, self.upstreams,
            self.config.name, self.config.admin_token, self.reactor, health=self.health,
            sessions=self.sessions, caches=self.caches, tls=self.tls, control=self,
            handoff=HandoffReport(self.handoff, self.forwarder) if self.handoff is not None else None,
        )
        self.admin_port = self._listen(self.config.admin, self.admin_site, sockets.ADMIN)
        # Sockets the old process handed over that no listener of ours wants
        # (the new program's config dropped them): closing ours is enough.
        for fd in self.inherited.values():
            os.close(fd)
        self.inherited.clear()
        try:
            self.health.listen()
        except Exception as exc:  # CannotListenError and friends
            raise StartError(f"cannot listen for health messages on {self.config.health}: {exc}") from exc
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        self.sessions.start()
        self.health.start()
        # A (re)starting unit serves only once it knows its farm: the other
        # units resynced its sessions (or their deadline passed) and the
        # agents have had time to announce their hosts.  Until then its
        # listeners are bound but do not accept, so clients queue.
        ready: list[defer.Deferred[Any]] = []
        if self.dam_service is not None:
            self.dam_service.startService()
            ready.append(self.dam_service.whenReady())
        if self.health.cache is not None:
            ready.append(deferLater(self.reactor, HEALTH_WARMUP, lambda: None))
        if ready:
            for port in self.ports.values():
                port.stopReading()
            defer.gatherResults(ready).addCallback(self._serve)
        else:
            self._serving()
        if self.signals:
            self._signals.install()
        for name, port in self.ports.items():
            scheme = "https" if name in self.tls else "http"
            log.info("listener {name} on {url}", name=name, url=url_of(port, scheme))
        log.info("admin API on {url}", url=url_of(self.admin_port))
        if self.health.address is not None:
            ip, port = self.health.address
            log.info("health messages on udp {ip}:{port}", ip=ip, port=port)

    def _serve(self, _: object = None) -> None:
        log.info("farm known (sessions resynced with peers {peers}, agents heard): serving",
                 peers=sorted(self.sessions.dam.peers))
        for port in self.ports.values():
            port.startReading()
        self._serving()

    def _serving(self) -> None:
        self.serving = True
        if self.ready_fd is not None:
            # The process that upgrades to us waits for this line to drain.
            sockets.notify_systemd(f"MAINPID={os.getpid()}")
            try:
                sockets.tell_ready(self.ready_fd)
            except OSError as exc:
                log.warn("cannot tell the old process we serve: {error}", error=exc)
            self.ready_fd = None

    @defer.inlineCallbacks
    def _drain(self, listeners: Iterable[Listener], linger: float = 0.0) -> Any:
        """Closes ``listeners``' connections gracefully (see :meth:`Listener.close_idle`);
        whatever still runs after ``grace_period`` is aborted."""
        listeners = list(listeners)
        for listener in listeners:
            listener.close_idle(linger)
        deadline = self.reactor.seconds() + self.config.grace_period
        while any(li.connections for li in listeners):
            if self.reactor.seconds() >= deadline:
                busy = sum(len(li.connections) for li in listeners)
                log.warn("grace period over: aborting {n} connections", n=busy)
                for listener in listeners:
                    listener.abort_all()
                break
            yield deferLater(self.reactor, DRAIN_POLL_INTERVAL, lambda: None)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self._signals.restore()
        if self.upgrading is not None:
            self.upgrading.abandon()
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports.values()])
        yield self._drain([*self.listeners.values(), *self.retiring])
        self.upstreams.close_idle()
        if self.handoff is not None:
            self.handoff.close()
        if self.forwarder is not None:
            self.forwarder.stop()
        yield self.health.stop()
        self.sessions.stop()
        if self.dam_service is not None and self.dam_service.running:
            yield self.dam_service.stopService()
        if self.admin_port is not None:
            yield defer.maybeDeferred(self.admin_port.stopListening)
        if self.access_log is not None:
            self.access_log.close()


    # -- reload ---------------------------------------------------------------
    def reload(self, config: UnitConfig) -> Plan:
        """Applies ``config`` to the running unit without dropping anything.

        Raises :class:`~nlbproxy.reload.ReloadRefused` (and changes nothing)
        when a change needs a restart or a new listener cannot be bound.
        Binding is the one step that can fail, so it comes first, with the
        new pools in place for the new listeners; everything after it is
        bookkeeping that cannot fail half-way.
        """
        if self.handed_over:
            raise ReloadRefused(["this process handed its sockets to its upgrade and is draining; "
                                 "reload the new process"])
        plan = plan_reload(self.config, config, handoff_available=self.handoff is not None)
        for pool_config in plan.pools_added:
            self.farm.add_pool(pool_config)
        new_listeners: dict[str, Listener] = {}
        new_ports: dict[str, Any] = {}
        tls_before = dict(self.tls)
        # New certificate files of listeners that stay: loading can fail, so
        # it comes before anything changes (the config check read them, but
        # they may have changed since); installing comes after.
        new_certificates: dict[str, Any] = {}
        for change in plan.listeners_changed:
            if "certificates" in change.keys:
                server = self.tls[change.new.name]
                try:
                    new_certificates[change.new.name] = server.load(change.new.certificates)
                except CertificateError as exc:
                    for pool_config in plan.pools_added:
                        self.farm.remove_pool(pool_config.name)
                    raise ReloadRefused([f"listener {change.new.name}.certificates: {exc}"]) from None
        try:
            for lc in (*plan.listeners_added, *(c.new for c in plan.listeners_replaced)):
                old = self.listeners.get(lc.name)
                listener = self._make_listener(lc, stats=old.stats if old is not None else None)
                new_ports[lc.name] = self._listen(lc.endpoint, self._factory(listener))
                new_listeners[lc.name] = listener
        except StartError as exc:
            for port in new_ports.values():
                port.stopListening()
            self.tls.clear()
            self.tls.update(tls_before)
            for pool_config in plan.pools_added:
                self.farm.remove_pool(pool_config.name)
            raise ReloadRefused([str(exc)]) from None
        if not self.serving:
            for port in new_ports.values():
                port.stopReading()

        for pool_config in plan.pools_added:
            if pool_config.cache is not None:
                self.caches[pool_config.name] = ResponseCache(pool_config.name, pool_config.cache, self.reactor)
        for pool_change in plan.pools_changed:
            pool = self.farm.pools[pool_change.new.name]
            _added, removed = pool.reconfigure(pool_change.new)
            self.upstreams.reconfigure(pool.hosts, pool_change.new)
            for host in removed:
                self.upstreams.retire(host)
            if "cache" in pool_change.keys:
                self.caches.pop(pool.name, None)
                if pool_change.new.cache is not None:
                    self.caches[pool.name] = ResponseCache(pool.name, pool_change.new.cache, self.reactor)
        for change in plan.listeners_changed:
            self.listeners[change.new.name].reconfigure(change.new)
            if change.new.name in new_certificates:
                self.tls[change.new.name].install(new_certificates[change.new.name], change.new.certificates)
        for lc in (*plan.listeners_removed, *(c.old for c in plan.listeners_replaced)):
            self._retire(self.listeners.pop(lc.name), self.ports.pop(lc.name))
        self.listeners.update(new_listeners)
        self.ports.update(new_ports)
        self.listener_stats.clear()
        self.listener_stats.update((n, li.stats) for n, li in self.listeners.items())
        for pool_config in plan.pools_removed:
            pool = self.farm.remove_pool(pool_config.name)
            for host in pool.hosts:
                self.upstreams.retire(host)
            self.caches.pop(pool_config.name, None)
        self.health.sync()
        self._reload_unit_keys(config, plan)
        self.config = config
        for name, port in new_ports.items():
            log.info("listener {name} on {url}", name=name, url=url_of(port))
        return plan

    def _reload_unit_keys(self, config: UnitConfig, plan: Plan) -> None:
        if "access_log" in plan.unit_keys or "log_format" in plan.unit_keys:
            old_log, self.access_log = self.access_log, _access_log(config, self.reactor)
            for listener in (*self.listeners.values(), *self.retiring):
                listener.access_log = self.access_log
            if old_log is not None:
                old_log.close()
        if "admin_token" in plan.unit_keys:
            resource = self.admin_site.resource
            assert isinstance(resource, AdminResource)
            resource.set_token(config.admin_token)

    def _retire(self, listener: Listener, port: Any) -> None:
        """A listener the reload removed: stop accepting, then drain it."""
        self.retiring.add(listener)
        # Its last requests follow its old rules, whose pools this reload may remove.
        listener.retired_pools = dict(self.farm.pools)
        port.stopListening()
        done = self._drain([listener], limits.DRAIN_IDLE_LINGER)
        done.addBoth(lambda _: self.retiring.discard(listener))
        log.info("listener {name} removed: draining {n} connections", name=listener.name,
                 n=len(listener.connections))

    def reload_file(self) -> Plan:
        """Re-reads the config file given at start and reloads it.

        Raises :class:`~nlbproxy.reload.ReloadRefused` with the reason (an
        invalid file's one-line ``ConfigError`` included); the refusal is
        logged and the old config keeps serving.
        """
        try:
            if self.config_path is None:
                raise ReloadRefused(["this unit was not started from a config file"])
            try:
                config = load_config(self.config_path)
            except ConfigError as exc:
                raise ReloadRefused([str(exc)]) from None
            plan = self.reload(config)
        except ReloadRefused as exc:
            log.error("reload refused, the old config keeps serving: {reason}", reason=exc)
            raise
        log.info("reloaded {path}: {summary}", path=self.config_path, summary=plan.summary())
        return plan

    # -- signals ------------------------------------------------------------------
    def _reload_signalled(self) -> None:
        log.info("SIGHUP: reloading {path}", path=self.config_path)
        try:
            self.reload_file()
        except ReloadRefused:
            pass  # logged

    def _upgrade_signalled(self) -> None:
        log.info("SIGUSR2: upgrading the program")
        try:
            self.upgrade()
        except ReloadRefused as exc:
            log.error("upgrade refused: {reason}", reason=exc)

    # -- upgrade ------------------------------------------------------------------
    def upgrade(self, argv: list[str] | None = None) -> int:
        """Starts the new program on this unit's listening sockets; returns its pid.

        ``argv`` defaults to this process's own command line, run by the
        same interpreter (whose files the package upgrade replaced).  Once
        the new process serves, this one stops accepting and drains; if the
        new one exits or stays silent for ``UPGRADE_TIMEOUT`` seconds this
        one keeps serving.  Raises ReloadRefused when it cannot start.
        """
        reasons = []
        if self.handed_over:
            reasons.append("this process handed its sockets to its upgrade already and is draining")
        if self.upgrading is not None:
            reasons.append(f"an upgrade is already running (new process {self.upgrading.pid})")
        if self.config_path is None:
            reasons.append("this unit was not started from a config file")
        if self.upgrade_blocker is not None:
            reasons.append(self.upgrade_blocker)
        if not self.serving:
            reasons.append("this unit does not serve yet")
        # Sockets that are not handed over yet: the new process would fail to bind them.
        if self.config.health is not None:
            reasons.append("unit.health: the health socket is not handed over yet; restart instead")
        if self.config.dam is not None:
            reasons.append("unit.dam: the DAM endpoint is not handed over yet; restart instead")
        if self.retiring:
            reasons.append("a removed listener is still draining; try again once it is done")
        if self.config_path is not None:
            reasons.extend(self._upgrade_file_problems(self.config_path))
        if reasons:
            raise ReloadRefused(reasons)
        ports = {**self.ports, sockets.ADMIN: self.admin_port}
        env, child_fds = sockets.pass_listeners(ports)
        child_fds.update({0: 0, 1: 1, 2: 2})
        ready_fd = max(child_fds) + 1
        child_fds[ready_fd] = "r"  # type: ignore[assignment]  # the child writes, we read
        environ = {k: v for k, v in os.environ.items()
                   if k not in (sockets.LISTEN_FDS_ENV, sockets.READY_FD_ENV)}
        environ.update(env)
        environ[sockets.READY_FD_ENV] = str(ready_fd)
        args = argv if argv is not None else [sys.executable, *sys.argv]
        upgrade = _Upgrade(self, ready_fd)
        process = self.reactor.spawnProcess(upgrade, args[0], args, env=environ, childFDs=child_fds)
        upgrade.pid = process.pid
        upgrade.timer = self.reactor.callLater(limits.UPGRADE_TIMEOUT, upgrade.timed_out)
        self.upgrading = upgrade
        log.info("upgrade: started the new program as process {pid}", pid=process.pid)
        return int(process.pid)

    def _upgrade_file_problems(self, path: str) -> list[str]:
        """Why the new program could not take over with the file as it is now.

        It reads the file afresh and adopts each socket by listener name, so
        a listener whose endpoint moved since the last reload (or a moved
        admin endpoint) would get the old address: reload first.
        """
        try:
            config = load_config(path)
        except ConfigError as exc:
            return [str(exc)]
        running = {lc.name: lc.endpoint for lc in self.config.listeners}
        moved = [f"listener {lc.name}" for lc in config.listeners
                 if running.get(lc.name, lc.endpoint) != lc.endpoint]
        if config.admin != self.config.admin:
            moved.append("unit.admin")
        if moved:
            return [f"{', '.join(moved)}: the file moves the endpoint since the unit loaded it; "
                    "reload (or restart) to move it, then upgrade"]
        return []

    @defer.inlineCallbacks
    def _hand_over(self) -> Any:
        """The new process serves: stop accepting and drain, then exit."""
        log.info("upgrade: process {pid} serves; draining this one", pid=self.upgrading and self.upgrading.pid)
        self.upgrading = None
        self.handed_over = True
        yield defer.gatherResults([defer.maybeDeferred(sockets.release, port)
                                   for port in (*self.ports.values(), self.admin_port)])
        self.ports.clear()
        self.admin_port = None
        yield self._drain([*self.listeners.values(), *self.retiring], limits.DRAIN_IDLE_LINGER)
        log.info("upgrade: drained; exiting")
        self.reactor.stop()


class _Upgrade(ProcessProtocol):
    """The new program while it starts: it says ``ready`` on its pipe or fails."""

    def __init__(self, unit: Unit, ready_fd: int) -> None:
        self.unit = unit
        self.ready_fd = ready_fd
        self.pid: int | None = None
        self.timer: Any = None
        self.said = b""
        self.done = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.ready_fd or self.done:
            return
        self.said += data[:64]
        if sockets.READY_LINE in self.said:
            self._finish()
            self.unit._hand_over()

    def processEnded(self, reason: Failure) -> None:
        if not self.done:
            log.error("upgrade failed: the new program exited before it served ({reason}); "
                      "this process keeps serving", reason=reason.getErrorMessage())
            self._finish()
            self.unit.upgrading = None

    def timed_out(self) -> None:
        self.timer = None
        if not self.done:
            log.error("upgrade failed: the new program did not serve within {t} s; stopping it",
                      t=limits.UPGRADE_TIMEOUT)
            self.abandon()

    def abandon(self) -> None:
        """Stop the new program (it never took over)."""
        if self.done:
            return
        self._finish()
        self.unit.upgrading = None
        if self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def _finish(self) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


def _access_log(config: UnitConfig, reactor: Any) -> FileAccessLog | LoggerAccessLog | None:
    if config.access_log == "-":
        return LoggerAccessLog(config.log_format)
    if config.access_log:
        return FileAccessLog(config.access_log, config.log_format, reactor)
    return None


def _no_peers(peer: str, call: Any) -> None:
    """The DAM's transport while the unit has no ``dam`` endpoint: no peer exists."""
    raise AssertionError(f"a unit without peers sent {call!r} to {peer}")


def url_of(port: Any, scheme: str = "http") -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        return f"unix:{address.name}"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{address.port}/"
