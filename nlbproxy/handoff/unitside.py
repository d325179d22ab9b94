# -*- test-case-name: tests.test_handoff_unitside -*-
"""The unit's side of handoff: peek, route, fence, dump, ship, close, commit.

A listener with ``handoff = true`` accepts connections with
:class:`HandoffFactory`, which wraps the listener's own router factory.  Its
protocol never lets Twisted read the socket: it stops the transport's reading
at once and watches the socket itself, peeking (``MSG_PEEK``) at the first
request so that its bytes stay in the kernel's receive queue and travel with
the connection.  ``SO_RCVLOWAT`` is raised to one byte past what was peeked,
so a partial request does not wake the reactor again until more arrives.

When the request head is complete, the listener's routes pick the pool and
the pool picks the host (:func:`choose`), and the connection goes through
the steps of :class:`Handoff`:

1. the agent of the host must be connected (:class:`AgentLink`); if it cannot
   be reached, the connection **falls back** to the router, which proxies
   it like any other (nothing was touched yet);
2. the flow is fenced (:class:`Plumbing`), so the unit's kernel neither
   answers nor takes the client's next segments, and the connection dumped
   in repair mode;
3. the blob goes to the agent; on its RESULT ok the repair-mode socket is
   closed (no FIN, no RST), the forwarder's route committed and the agent
   told (COMMIT);
4. a failed RESULT, a timeout or a lost channel: the connection is taken out
   of repair mode, unfenced and reset (the client sees a RST at once), and
   counted in :attr:`HandoffStats.failed`.

A request that does not parse, a client that closes, or one whose head is
not complete within the listener's ``header_timeout`` also falls back: the
router answers it (400, 408, ...) as it answers everyone else.

Falling back swaps the transport's protocol for one of the router's and
starts reading: the router reads the bytes that were only peeked.
"""

from __future__ import annotations

import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol as TypingProtocol

import h11
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nlbproxy.classifier import Host
from nlbproxy.config import parse_host_port
from nlbproxy.handoff import repair
from nlbproxy.handoff.channel import AgentLink, AgentUnavailable
from nlbproxy.handoff.state import encode, wire_address
from nlbproxy.handoff.tunnel import Mapping
from nlbproxy.handoff.wire import Ended, Result
from nlbproxy.metrics import Histogram, PrometheusWriter
from nlbproxy.routers import headers as hdrs
from nlbproxy.routing import Decision, RequestView

__all__ = [
    "Flow",
    "HandoffFactory",
    "HandoffStats",
    "HandoffUnit",
    "Peeked",
    "Plumbing",
    "choose",
    "peek_request",
]

log = Logger()


# -- sans-I/O: the request head and the host --------------------------------------------


@dataclass(frozen=True, slots=True)
class Peeked:
    """What the peeked bytes hold: ``request`` when the head is complete,
    ``invalid`` when they cannot be a request (the router answers them)."""

    request: h11.Request | None = None
    invalid: bool = False


def peek_request(data: bytes, max_header_bytes: int) -> Peeked:
    """Parse the first request head of ``data``; ``Peeked()`` means "need more"."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
    try:
        parser.receive_data(data)
        event = parser.next_event()
    except h11.RemoteProtocolError:
        return Peeked(invalid=True)
    if isinstance(event, h11.Request):
        return Peeked(request=event)
    return Peeked()


class Unroutable(Exception):
    """Routing cannot decide on the head alone (the rules want the body, a
    rule refused the request or failed, or it answers later): the connection
    is proxied, and the router decides."""


def choose(listener: Any, request: h11.Request, client_ip: str) -> Host | None:
    """The host for ``request`` by the listener's routes and the pool's affinity.

    Cookie and session affinity pick through the pool's allotment here: the
    handoff moves the whole connection, and its later requests go to the
    host that received it whatever they carry.  Raises :class:`RouteHere`
    when routing needs more than the request head.
    """
    fields = hdrs.fields(request.headers)
    routes = listener.routes
    if routes.body_prefix and routes.rules:
        raise Unroutable("the rules read the body")
    view = RequestView(request.method, request.target, hdrs.pairs(fields), client_ip,
                       getattr(listener, "scheme", b"http"), b"", False)
    try:
        decision = routes.decide(view)
    except Exception as exc:  # a Refusal, or a plugin's error: the router answers it
        raise Unroutable(str(exc)) from exc
    if not isinstance(decision, Decision):
        decision.addErrback(lambda _: None)
        raise Unroutable("a routing rule answers later")
    pool = listener.farm.pools.get(decision.pool)
    if pool is None:
        raise Unroutable(f"unknown pool {decision.pool!r}")
    host = None
    if decision.affinity_key is not None:
        host = pool.host_for_key(decision.affinity_key)
    if host is None and pool.config.affinity == "client_ip":
        host = pool.host_for_client_ip(client_ip)
    if host is None:
        host = pool.choose(())
        if host is not None and pool.config.affinity == "client_ip":
            pool.remember_client_ip(client_ip, host)
    return host


# -- the forwarder, as the unit side sees it ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flow:
    """A client's connection to the VIP: the fence's and the route's key."""

    client: tuple[str, int]
    vip: tuple[str, int]


class Plumbing(TypingProtocol):
    """The fence and the forwarder's routes (:mod:`nlbproxy.handoff.forwarder`)."""

    def fence(self, flow: Flow, host: Host) -> Mapping | None:
        """Stop the unit's kernel from seeing the flow's packets; hold them
        for the host.  Raising means the flow cannot be handed off.  Returns
        the tunnel's mapping when the host is reached through the flow-id
        tunnel (it goes to the agent with the handoff), else None."""

    def commit(self, flow: Flow) -> None:
        """The host owns the connection: forward the flow's packets to it."""

    def unfence(self, flow: Flow) -> None:
        """The handoff failed: the unit's kernel gets the flow back."""

    def ended(self, flow: Flow) -> None:
        """The host reported the connection's end: delete its route."""


# -- I/O -------------------------------------------------------------------------------


#: Handoff latencies kept for medians (the histogram has only its buckets).
RECENT_LATENCIES = 1024


class HandoffStats:
    """Counters of one unit's handoffs (``failed`` reset the client).

    ``latency`` is the critical path, from the complete request head to the
    committed route (the client's next segment reaches the host from then on).
    """

    def __init__(self) -> None:
        self.handed_off = 0
        self.fell_back: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.ended = 0
        self.latency = Histogram()
        self.recent: deque[float] = deque(maxlen=RECENT_LATENCIES)

    def write_metrics(self, w: PrometheusWriter) -> None:
        """Add the counters to ``GET /metrics`` (``nlbproxy_handoff_*``)."""
        w.add("nlbproxy_handoff_total", "counter", "Connections handed off to a host.", self.handed_off)
        for reason, count in sorted(self.fell_back.items()):
            w.add("nlbproxy_handoff_fallback_total", "counter",
                  "Connections of handoff listeners proxied instead, by reason.", count, reason=reason)
        for reason, count in sorted(self.failed.items()):
            w.add("nlbproxy_handoff_failed_total", "counter",
                  "Handoffs that failed after the dump; the client was reset.", count, reason=reason)
        w.add("nlbproxy_handoff_ended_total", "counter", "Handed-off connections their host reported ended.",
              self.ended)
        w.add_histogram("nlbproxy_handoff_duration_seconds",
                        "From the complete request head to the committed route.", self.latency)


class HandoffUnit:
    """What the handoff listeners of a unit share: agents' links, the plumbing, stats."""

    def __init__(self, secret: bytes, agent_port: int, plumbing: Plumbing | None, reactor: Any,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.secret = secret
        self.agent_port = agent_port
        self.plumbing = plumbing
        self.reactor = reactor
        self.clock = clock
        self.links: dict[str, AgentLink] = {}
        self.stats = HandoffStats()
        if plumbing is None:
            log.warn("handoff listeners have no forwarder: every connection is proxied")

    def link(self, host: Host) -> AgentLink:
        link = self.links.get(host.host)
        if link is None:
            link = AgentLink((host.host, self.agent_port), self.secret, self.reactor, self._ended)
            self.links[host.host] = link
        return link

    def _ended(self, message: Ended) -> None:
        self.stats.ended += 1
        if self.plumbing is not None:
            self.plumbing.ended(Flow(parse_host_port(message.client), parse_host_port(message.vip)))

    def close(self) -> None:
        for link in self.links.values():
            link.close()


class HandoffFactory(Factory):
    """Accepts for a handoff listener; ``router`` serves what falls back."""

    noisy = False

    def __init__(self, router: Factory, unit: HandoffUnit) -> None:
        self.router = router
        self.unit = unit

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return _Peeking(self, addr)


@implementer(IReadDescriptor)
class _Peeking(Protocol):
    """One accepted connection until it is handed off or falls back."""

    transport: Any

    def __init__(self, factory: HandoffFactory, addr: Any) -> None:
        self.factory = factory
        self.unit = factory.unit
        self.addr = addr
        self.listener = factory.router.listener  # type: ignore[attr-defined]
        self.sock: socket.socket | None = None
        self.watching = False
        self.timer: Any = None
        self.started = 0.0
        self.flow: Flow | None = None

    # -- Twisted ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.transport.stopReading()
        if self.unit.plumbing is None:
            self.fall_back("no_forwarder")
            return
        self.sock = self.transport.getHandle()
        self.timer = self.unit.reactor.callLater(self.listener.config.header_timeout, self.fall_back, "timeout")
        self.watching = True
        self.unit.reactor.addReader(self)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def logPrefix(self) -> str:
        return "handoff"

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._unwatch()

    def doRead(self) -> None:
        assert self.sock is not None
        limit = self.listener.config.max_header_bytes
        try:
            data = self.sock.recv(limit + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self.fall_back("error")  # the router reads the error and cleans up
            return
        if not data:
            self.fall_back("closed")
            return
        # The peek may hold the start of the body (or pipelined requests)
        # after the head: only a head that is still incomplete past the
        # limit is refused (the router answers it 431).
        peeked = peek_request(data, limit)
        if peeked.request is not None:
            self._unwatch()
            self._route(peeked.request)
        elif peeked.invalid or len(data) > limit:
            self.fall_back("invalid")
        else:
            # Not readable again until one more byte than we have arrives.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1)

    def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.unit.reactor.removeReader(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    # -- the handoff ---------------------------------------------------------------------
    def _route(self, request: h11.Request) -> None:
        self.started = self.unit.clock()
        try:
            host = choose(self.listener, request, self.addr.host)
        except Unroutable:
            self.fall_back("routing")
            return
        if host is None:
            self.fall_back("no_host")  # the router answers 503
            return
        link = self.unit.link(host)
        if link.protocol is not None:
            self._hand_off(host, link)
            return
        link.connect().addCallbacks(lambda _: self._hand_off(host, link),
                                    lambda failure: self.fall_back("agent_unavailable"))

    def _hand_off(self, host: Host, link: AgentLink) -> None:
        assert self.sock is not None and self.unit.plumbing is not None
        if self.transport.disconnected:
            return
        # As the packets carry them: an IPv4 client of a dual-stack listener
        # is fenced and routed by its IPv4 address, not the mapped one.
        flow = Flow(wire_address(self.sock.getpeername()), wire_address(self.sock.getsockname()))
        try:
            tunnel = self.unit.plumbing.fence(flow, host)
        except Exception as exc:
            log.warn("cannot fence {flow}: {error}", flow=flow, error=exc)
            self.fall_back("fence_failed")
            return
        self.flow = flow
        try:
            state = repair.dump(self.sock)
        except repair.RepairError as exc:
            log.warn("cannot dump {flow}: {error}", flow=flow, error=exc)
            self.unit.plumbing.unfence(flow)
            self.fall_back("dump_failed")
            return
        try:
            id_, waiting = link.handoff(host.pool, host.key, encode(state), tunnel)
        except AgentUnavailable:
            repair.cancel(self.sock)
            self.unit.plumbing.unfence(flow)
            self.fall_back("agent_unavailable")
            return
        waiting.addCallbacks(lambda result: self._answered(link, id_, result), self._lost)

    def _answered(self, link: AgentLink, id_: int, result: Result) -> None:
        assert self.flow is not None and self.unit.plumbing is not None
        if not result.ok:
            log.warn("handoff of {flow} refused: {why}", flow=self.flow, why=result.reason)
            self._reset("refused")
            return
        # Still in repair mode: Twisted's abort closes it without FIN or RST.
        self.transport.abortConnection()
        self.unit.plumbing.commit(self.flow)
        link.commit(id_)
        stats = self.unit.stats
        stats.handed_off += 1
        elapsed = self.unit.clock() - self.started
        stats.latency.observe(elapsed)
        stats.recent.append(elapsed)

    def _lost(self, failure: Failure) -> None:
        log.warn("handoff of {flow} failed: {why}", flow=self.flow, why=failure.getErrorMessage())
        self._reset("timeout" if failure.check(defer.TimeoutError, defer.CancelledError) else "channel_lost")

    def _reset(self, why: str) -> None:
        """Give the connection back to this kernel and reset it: the client
        learns at once, and the host (if it restored a copy) resets its own."""
        assert self.sock is not None and self.flow is not None and self.unit.plumbing is not None
        self.unit.stats.failed[why] += 1
        try:
            repair.cancel(self.sock)
        except OSError:
            pass
        self.unit.plumbing.unfence(self.flow)
        self.transport.abortConnection()  # SO_LINGER 0: a RST

    # -- falling back to the router -----------------------------------------------------
    def fall_back(self, why: str) -> None:
        self._unwatch()
        self.timer = None
        if self.transport.disconnected:
            return
        self.unit.stats.fell_back[why] += 1
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass
        router = self.factory.router.buildProtocol(self.addr)
        if router is None:
            self.transport.loseConnection()
            return
        self.transport.protocol = router
        router.makeConnection(self.transport)
        self.transport.startReading()

