# -*- test-case-name: tests.test_health_e2e -*-
"""A balancing unit's health service: agents' messages and the unit's probes.

Wires the sans-I/O pieces to the reactor: the authenticated UDP socket where
host agents' messages arrive (:class:`~nlbproxy.health.udp.HealthSocket`),
the consolidated cache that ages hosts out (:class:`~nlbproxy.health.cache.
ConsolidatedCache`, ticked by a LoopingCall) and the translation of its rows
onto the farm (:class:`~nlbproxy.health.link.FarmHealth`); and, for pools
that ask for them, HTTP probes and HAProxy agent-checks of their hosts.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from nlbproxy.classifier import Farm, Host, Pool
from nlbproxy.config import UnitConfig
from nlbproxy.health.cache import TICK, ConsolidatedCache
from nlbproxy.health.codec import SENDER_AGENT_KINDS, Codec, ReplayGuard
from nlbproxy.health.link import FarmHealth
from nlbproxy.health.messages import Envelope, node_id
from nlbproxy.health.probe import AgentCheck, HttpProbe
from nlbproxy.health.udp import HealthSocket
from nlbproxy.session.tracker import SessionTracker
from nlbproxy.session.unitside import SessionReceiver

log = Logger()


class HealthRelayLink(Protocol):
    """Where a worker's health socket reads and writes instead of the public address."""

    def adopt(self, reactor: Any, socket: HealthSocket) -> Any:
        """Connects ``socket`` to the supervisor; returns the listening port."""
        ...


class _HostProbes:
    """Folds a host's HTTP probe and agent-check into its ``probe_*`` state."""

    def __init__(self, pool: Pool, host: Host) -> None:
        self.pool = pool
        self.host = host
        self.base_weight = host.weight
        self.check: tuple[bool, str] = (True, "")
        self.agent: tuple[bool, str] = (True, "")

    def _apply(self) -> None:
        self.host.probe_up = self.check[0] and self.agent[0]
        self.host.probe_reason = "; ".join(r for up, r in (self.check, self.agent) if not up and r)
        self.pool.changed()

    def check_changed(self, up: bool, reason: str) -> None:
        if (up, reason) != self.check:
            log.info("{pool}/{host} check: {state} ({reason})", pool=self.pool.name, host=self.host.key,
                     state="up" if up else "down", reason=reason)
        self.check = (up, f"check: {reason}")
        self._apply()

    def agent_check_changed(self, health: bool | None, directive: str | None, weight_pct: int | None,
                            reason: str) -> None:
        self.agent = (health is not False, f"agent-check: {reason}")
        host = self.host
        if host.agent is None:  # our own agent's rows take precedence
            host.agent_directive = directive
            host.agent_reason = f"agent-check: {reason}"
            host.refresh_directive()
        if weight_pct is not None:
            host.weight = max(1, self.base_weight * weight_pct // 100)
            host.capacity = host.weight
        self._apply()


class UnitHealth:
    """Starts and stops everything that keeps a unit's view of host health."""

    def __init__(self, config: UnitConfig, farm: Farm, reactor: Any, sessions: SessionTracker) -> None:
        self.config = config
        self.farm = farm
        self.reactor = reactor
        self.link = FarmHealth(farm)
        self.sessions = sessions
        self.receiver: SessionReceiver | None = None
        self.cache: ConsolidatedCache | None = None
        self.socket: HealthSocket | None = None
        self._port: Any = None
        self._ticker: LoopingCall | None = None
        #: host -> (its pool's check settings, its running probes)
        self._probes: dict[Host, tuple[tuple[Any, Any], list[HttpProbe | AgentCheck]]] = {}
        #: In a worker of a multi-process unit, the supervisor owns the
        #: public health socket: ``relay`` adopts the worker's private link
        #: to it instead (nlbproxy.workers.healthrelay).
        self.relay: HealthRelayLink | None = None

    def listen(self) -> None:
        """Binds the health socket (in privilegedStartService)."""
        if self.config.health is None:
            return
        assert self.config.secret is not None  # the config requires it
        codec = Codec(self.config.secret, self.reactor)
        self.cache = ConsolidatedCache(self.reactor, self._send, self.link)
        self.receiver = SessionReceiver(self._send, self.sessions.session_up, self.sessions.session_down)
        self.socket = HealthSocket(codec, ReplayGuard(), node_id(self.config.name), SENDER_AGENT_KINDS,
                                   self.reactor, self._received)
        if self.relay is not None:
            self._port = self.relay.adopt(self.reactor, self.socket)
            return
        ip, port = self.config.health
        self._port = self.reactor.listenUDP(port, self.socket, interface=ip)

    def _received(self, address: tuple[str, int], envelope: Envelope) -> None:
        # Session up/down go to the session tracker (acknowledged there);
        # everything else is the health-and-load protocol.
        assert self.cache is not None and self.receiver is not None
        if SessionReceiver.handles(envelope.message):
            self.receiver.receive(address, envelope)
        else:
            self.cache.receive(address, envelope)

    def _send(self, address: tuple[str, int], message: Any) -> None:
        assert self.socket is not None
        self.socket.send(address, message)

    @property
    def address(self) -> tuple[str, int] | None:
        if self._port is None:
            return None
        where = self._port.getHost()
        return where.host, where.port

    def start(self) -> None:
        if self.cache is not None:
            self._ticker = LoopingCall(self.cache.tick)
            self._ticker.clock = self.reactor
            self._ticker.start(TICK, now=False)
        self.sync()

    def sync(self) -> None:
        """Probes every host of a pool that asks for them: starts those of
        hosts that joined, stops those of hosts that left, and restarts a
        pool's when its ``check`` or ``agent_check`` changed (reload).  A host
        whose pool no longer probes is up again as far as probes go."""
        wanted: dict[Host, tuple[Pool, Any, Any]] = {}
        for pool in self.farm.pools.values():
            check, agent_check = pool.config.check, pool.config.agent_check
            if check is None and agent_check is None:
                continue
            for host in pool.hosts:
                wanted[host] = (pool, check, agent_check)
        for host, (settings, probes) in list(self._probes.items()):
            if wanted.get(host, (None, None, None))[1:] != settings:
                del self._probes[host]
                for probe in probes:
                    probe.stop()
                if host not in wanted:
                    host.probe_up, host.probe_reason = True, ""
        for host, (pool, check, agent_check) in wanted.items():
            if host in self._probes:
                continue
            host_probes = _HostProbes(pool, host)
            started: list[HttpProbe | AgentCheck] = []
            if check is not None:
                started.append(HttpProbe(
                    self.reactor, host.host, host.port, check.path, check.interval,
                    host_probes.check_changed, rise=check.rise, fall=check.fall, timeout=check.timeout,
                ))
            if agent_check is not None:
                started.append(AgentCheck(
                    self.reactor, host.host, agent_check.port, agent_check.interval,
                    host_probes.agent_check_changed,
                ))
            self._probes[host] = ((check, agent_check), started)
            for probe in started:
                probe.start()

    def stop(self) -> defer.Deferred[Any]:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        stops = [probe.stop() for _, probes in self._probes.values() for probe in probes]
        self._probes = {}
        if self._port is not None:
            stops.append(defer.maybeDeferred(self._port.stopListening))
            self._port = None
        return defer.gatherResults(stops)
