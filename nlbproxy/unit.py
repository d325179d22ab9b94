# -*- test-case-name: tests.test_unit -*-
"""A balancing unit: listeners, pools and the admin API as one Twisted service.

Start binds every listener in ``privilegedStartService`` (before twistd drops
privileges, and so that a port already in use stops the start with one
clear line).  Stop is graceful: listeners stop accepting, idle keep-alive
connections close, busy ones close after their response, and whatever is
still running after ``grace_period`` is aborted.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy.accesslog import FileAccessLog, LoggerAccessLog
from nlbproxy.admin import make_admin_site
from nlbproxy.cache import pool_caches
from nlbproxy.classifier import Farm
from nlbproxy.config import UnitConfig, format_host_port
from nlbproxy.health.unitside import UnitHealth
from nlbproxy.session.dam import DAM
from nlbproxy.session.peering import DamService
from nlbproxy.session.tracker import SessionTracker
from nlbproxy.handoff.unitside import HandoffFactory, HandoffUnit, Plumbing
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

    def __init__(self, config: UnitConfig, reactor: Any, plumbing: Plumbing | None = None,
                 dam_name: str | None = None) -> None:
        self.config = config
        self.reactor = reactor
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
        self.access_log: FileAccessLog | LoggerAccessLog | None = None
        if config.access_log == "-":
            self.access_log = LoggerAccessLog(config.log_format)
        elif config.access_log:
            self.access_log = FileAccessLog(config.access_log, config.log_format, reactor)
        self.caches = pool_caches(config.pools.values(), reactor)
        self.listeners = {
            lc.name: Listener(lc, self.farm, self.upstreams, reactor, config.name, self.access_log,
                              sessions=self.sessions, caches=self.caches)
            for lc in config.listeners
        }
        self.health = UnitHealth(config, self.farm, reactor, self.sessions)
        self.ports: dict[str, Any] = {}
        self.admin_port: Any = None
        # Listeners with ``handoff = true``: ``plumbing`` is the forwarder.
        self.handoff: HandoffUnit | None = None
        if any(lc.handoff for lc in config.listeners):
            assert config.secret is not None  # the config requires it
            self.handoff = HandoffUnit(config.secret, config.handoff_port, plumbing, reactor)

    def _listen(self, description: str, factory: Any) -> Any:
        result: list[Any] = []
        serverFromString(self.reactor, description).listen(factory).addBoth(result.append)
        if not result:  # only an endpoint that binds asynchronously would do this
            raise StartError(f"cannot listen on {description}: endpoint did not bind at once")
        port = result[0]
        if isinstance(port, Failure):
            raise StartError(f"cannot listen on {description}: {port.getErrorMessage()}")
        return port

    def privilegedStartService(self) -> None:
        for name, listener in self.listeners.items():
            factory: Any = RouterFactory(listener)
            if listener.config.handoff and self.handoff is not None:
                factory = HandoffFactory(factory, self.handoff)
            self.ports[name] = self._listen(listener.config.endpoint, factory)
        site = make_admin_site(
            self.farm, {n: li.stats for n, li in self.listeners.items()}, self.upstreams,
            self.config.name, self.config.admin_token, self.reactor, health=self.health,
            sessions=self.sessions, caches=self.caches,
        )
        self.admin_port = self._listen(self.config.admin, site)
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
        for name, port in self.ports.items():
            log.info("listener {name} on {url}", name=name, url=url_of(port))
        log.info("admin API on {url}", url=url_of(self.admin_port))
        if self.health.address is not None:
            ip, port = self.health.address
            log.info("health messages on udp {ip}:{port}", ip=ip, port=port)

    def _serve(self, _: object = None) -> None:
        log.info("farm known (sessions resynced with peers {peers}, agents heard): serving",
                 peers=sorted(self.sessions.dam.peers))
        for port in self.ports.values():
            port.startReading()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports.values()])
        for listener in self.listeners.values():
            listener.close_idle()
        deadline = self.reactor.seconds() + self.config.grace_period
        while any(li.connections for li in self.listeners.values()):
            if self.reactor.seconds() >= deadline:
                busy = sum(len(li.connections) for li in self.listeners.values())
                log.warn("grace period over: aborting {n} connections", n=busy)
                for listener in self.listeners.values():
                    listener.abort_all()
                break
            yield deferLater(self.reactor, DRAIN_POLL_INTERVAL, lambda: None)
        self.upstreams.close_idle()
        if self.handoff is not None:
            self.handoff.close()
        yield self.health.stop()
        self.sessions.stop()
        if self.dam_service is not None and self.dam_service.running:
            yield self.dam_service.stopService()
        if self.admin_port is not None:
            yield defer.maybeDeferred(self.admin_port.stopListening)
        if self.access_log is not None:
            self.access_log.close()


def _no_peers(peer: str, call: Any) -> None:
    """The DAM's transport while the unit has no ``dam`` endpoint: no peer exists."""
    raise AssertionError(f"a unit without peers sent {call!r} to {peer}")


def url_of(port: Any) -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        return f"unix:{address.name}"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{address.port}/"
