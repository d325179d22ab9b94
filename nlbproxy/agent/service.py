# -*- test-case-name: tests.test_agent_e2e -*-
"""A host agent as one Twisted service: the I/O around the sans-I/O core.

Start binds the local API (before twistd drops privileges, so that a port in
use stops the start with one clear line) and the health socket on an
ephemeral UDP port of the units' address family, then starts the heartbeat,
the load sampling and the endpoint checks.  Every table change -- an
application's report through the API, a check changing state, a load sample
past the hysteresis -- goes through :meth:`AgentCore.publish
<nlbproxy.health.agent.AgentCore.publish>`, which sends it to the units at
once.  Stop sends GOODBYE first, so units clear the host at once instead of
aging it out, then stops everything.

With ``handoff`` set, start also listens there for the units' handoff
channel (:class:`~nlbproxy.agent.handoff.HandoffReceiver`); with
``tunnel_interface`` it first starts the flow-id tunnel's end there
(:class:`~nlbproxy.agent.tunnel.HostTunnel`).

Session tracking shares the health socket: the API's session routes feed the
:class:`~nlbproxy.session.agentside.SessionSender`, which sends SESSION_UP /
SESSION_DOWN to the bound unit; the socket's receive path hands it every
SESSION_ACK and lets it see the epoch of every other message from a unit (a
restarted unit gets the whole table again); a LoopingCall every
:data:`~nlbproxy.session.agentside.TICK` drives its retries, failover and
keepalive.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy.agent.api import make_api_site
from nlbproxy.agent.checks import EndpointCheck
from nlbproxy.agent.config import AgentConfig
from nlbproxy.agent.handoff import HandoffReceiver
from nlbproxy.agent.tunnel import HostTunnel, TunnelStartError
from nlbproxy.config import format_host_port
from nlbproxy.agent.load import CpuLoad
from nlbproxy.health.agent import HEARTBEAT_INTERVAL, AgentCore
from nlbproxy.health.codec import SENDER_UNIT_KINDS, Codec, ReplayGuard
from nlbproxy.health.messages import Envelope, RowKey, SessionAck, node_id
from nlbproxy.health.table import LOAD_SAMPLE_INTERVAL, AppSpec, HealthTable
from nlbproxy.health.udp import HealthSocket
from nlbproxy.session.agentside import TICK as SESSION_TICK
from nlbproxy.session.agentside import SessionSender

__all__ = ["AgentService", "StartError"]

log = Logger()


class StartError(Exception):
    """The API or the health socket could not be bound."""


class AgentService(service.Service):
    """One host agent."""

    def __init__(self, config: AgentConfig, reactor: Any, cpu: CpuLoad | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.table = HealthTable(
            [AppSpec(app.key, app.capacity, checked=app.check is not None) for app in config.apps], reactor
        )
        self.socket = HealthSocket(
            Codec(config.secret, reactor), ReplayGuard(), node_id(config.name), SENDER_UNIT_KINDS, reactor,
            self._received,
        )
        self.core = AgentCore(config.name, config.units, self.table, reactor, self.socket.send)
        self.sessions = SessionSender(config.units, reactor, self.socket.send)
        self.checks = [
            EndpointCheck(reactor, app.key, app.host, app.port, app.check, self._check_changed)
            for app in config.apps
            if app.check is not None
        ]
        self.cpu = cpu or CpuLoad()
        self._heartbeat = LoopingCall(self.core.tick)
        self._heartbeat.clock = reactor
        self._sampling = LoopingCall(self._sample_load)
        self._sampling.clock = reactor
        self._session_ticks = LoopingCall(self.sessions.tick)
        self._session_ticks.clock = reactor
        self.api_port: Any = None
        self.udp_port: Any = None
        self.tunnel = HostTunnel(reactor, config.tunnel_interface) if config.tunnel_interface else None
        self.handoff = HandoffReceiver(config, reactor, tunnel=self.tunnel) if config.handoff else None
        self.handoff_port: Any = None

    # -- wiring --------------------------------------------------------------------
    def _received(self, address: tuple[str, int], envelope: Envelope) -> None:
        if isinstance(envelope.message, SessionAck):
            self.sessions.receive(address, envelope)
            return
        self.sessions.observe(address, envelope)
        self.core.receive(address, envelope)

    def _check_changed(self, key: RowKey, up: bool, reason: str) -> None:
        self.core.publish(self.table.check_result(key, up, reason))

    def _sample_load(self) -> None:
        self.core.publish(self.table.sample_load(self.cpu.sample()))

    # -- start and stop ----------------------------------------------------------------
    def privilegedStartService(self) -> None:
        site = make_api_site(self.table, self.core.publish, self.config.name, self.reactor, self.sessions,
                             self.handoff)
        result: list[Any] = []
        serverFromString(self.reactor, self.config.api).listen(site).addBoth(result.append)
        if not result or isinstance(result[0], Failure):
            why = result[0].getErrorMessage() if result else "endpoint did not bind at once"
            raise StartError(f"cannot listen on {self.config.api}: {why}")
        self.api_port = result[0]
        try:
            self.udp_port = self.reactor.listenUDP(0, self.socket, interface=self.config.udp_interface)
        except Exception as exc:
            self.api_port.stopListening()
            raise StartError(f"cannot bind the health socket: {exc}") from exc
        if self.tunnel is not None:
            try:
                self.tunnel.start()
            except TunnelStartError as exc:
                self.api_port.stopListening()
                self.udp_port.stopListening()
                raise StartError(str(exc)) from exc
        if self.handoff is not None:
            assert self.config.handoff is not None
            result = []
            serverFromString(self.reactor, self.config.handoff).listen(self.handoff.factory()).addBoth(result.append)
            if not result or isinstance(result[0], Failure):
                why = result[0].getErrorMessage() if result else "endpoint did not bind at once"
                self.api_port.stopListening()
                self.udp_port.stopListening()
                if self.tunnel is not None:
                    self.tunnel.stop()
                raise StartError(f"cannot listen for handoffs on {self.config.handoff}: {why}")
            self.handoff_port = result[0]
        super().privilegedStartService()

    def startService(self) -> None:
        if self.api_port is None:
            self.privilegedStartService()
        super().startService()
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=True)
        self._sampling.start(LOAD_SAMPLE_INTERVAL, now=True)
        self._session_ticks.start(SESSION_TICK, now=True)
        for check in self.checks:
            check.start()
        host = self.api_port.getHost()
        url = f"unix:{host.name}" if getattr(host, "host", None) is None else (
            f"http://{format_host_port(host.host, host.port)}/"
        )
        udp = self.udp_port.getHost()
        log.info("agent {name} api on {url}", name=self.config.name, url=url)
        if self.handoff_port is not None:
            where = self.handoff_port.getHost()
            log.info("handoffs on {address}", address=format_host_port(where.host, where.port))
        log.info(
            "health to {units} from udp {udp}",
            units=", ".join(format_host_port(*unit) for unit in self.config.units),
            udp=format_host_port(udp.host, udp.port),
        )

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.core.goodbye()
        log.info("agent {name} said goodbye to the units", name=self.config.name)
        self.sessions.stop()
        for loop in (self._heartbeat, self._sampling, self._session_ticks):
            if loop.running:
                loop.stop()
        for check in self.checks:
            check.stop()
        ports = [p for p in (self.api_port, self.udp_port, self.handoff_port) if p is not None]
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        if self.handoff is not None:
            self.handoff.stop()
        if self.tunnel is not None:
            self.tunnel.stop()
