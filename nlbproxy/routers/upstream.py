# -*- test-case-name: tests.test_router -*-
"""Backend connections: one keep-alive pool per host (connection aggregation).

A :class:`HostConnections` owns every connection the unit has to one host:
idle ones are reused last-in first-out (the warmest first), new ones are
opened up to ``max_conns_per_host``, and requests beyond that wait in a
bounded queue.  A connection carries at most one request at a time; it goes
back to the idle list only when both sides finished the exchange cleanly.

:class:`UpstreamConnection` is a thin protocol: it writes the exchange's
request and turns the host's bytes into response events with the sans-I/O
codec of :mod:`nlbproxy.routers.hostside`.  What to do with those events is
the exchange's business (``nlbproxy.routers.http``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import error as neterror
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone, ClientFactory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from nlbproxy.classifier import Host
from nlbproxy.config import PoolConfig
from nlbproxy.flow import Deadline, Pauser
from nlbproxy.routers.hostside import (
    DONE,
    LAST_CHUNK,
    Body,
    Field,
    Head,
    ResponseError,
    ResponseReader,
    chunk,
    request_head,
)
from nlbproxy.tls import BackendCreator, BackendTLS

if TYPE_CHECKING:
    from nlbproxy.routers.http import Exchange


class UpstreamConnection(Protocol):
    """One keep-alive HTTP/1.1 connection to a host."""

    #: A connected TCP transport (ITCPTransport plus abortConnection); Twisted
    #: types it as an optional ITransport, which has neither.
    transport: Any

    def __init__(self, owner: HostConnections, connector: _Connector | None = None) -> None:
        self.owner = owner
        self.connector = connector
        self.exchange: Exchange | None = None
        self.reader = ResponseReader()
        #: The request being sent has a chunked body (else a Content-Length or none).
        self.chunked = False
        #: The whole request (body included) has been written.
        self.request_sent = False
        #: Pauses reading from the host; its transport is set on connect.
        self.pauser = Pauser(None)
        self.deadline = Deadline(owner.clock, self._timed_out)
        self.tunnel = False
        self.received_any = False
        #: Exchanges carried so far; a reset on a reused connection is the
        #: keep-alive race, not a sign of a sick host.
        self.uses = 0
        #: Cleared when the host framed a response ambiguously (RFC 9112
        #: section 6.3: Content-Length with Transfer-Encoding): we read it by
        #: Transfer-Encoding, but never trust the connection again.
        self.reusable = True

    # -- Twisted --------------------------------------------------------------
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.pauser.transport = self.transport
        self.owner.connected(self)

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # An idle connection must stay silent; anything else means the
            # host is closing it or is confused: never reuse it.
            self.transport.abortConnection()
            return
        self.received_any = True
        if self.tunnel:
            # A tunnel's inactivity is timed by the client connection, in
            # both directions; the host's silence alone is no failure.
            exchange.tunnel_from_upstream(data)
            return
        try:
            events = self.reader.feed(data)
        except ResponseError as exc:
            # The connection is useless, and left open it would count
            # against max_conns_per_host.
            self.exchange = None
            self.deadline.cancel()
            self.transport.abortConnection()
            exchange.upstream_error(self, "bad_response", str(exc))
            return
        for event in events:
            if self.exchange is not exchange:
                return
            kind = type(event)
            if kind is Body:
                exchange.upstream_data(event.data)  # type: ignore[union-attr]
            elif kind is Head:
                exchange.upstream_head(self, event)  # type: ignore[arg-type]
            else:
                exchange.upstream_end(self, event.trailers)  # type: ignore[union-attr]
        if self.exchange is exchange and not self.tunnel:
            # The response goes on: the host was active just now.
            self.deadline.set(self.owner.config.server_timeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.deadline.stop()
        self.owner.lost(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            if self.tunnel:
                exchange.tunnel_closed()
                return
            # The end of a read-until-close body is the host closing.
            try:
                ended = self.reader.eof()
            except ResponseError:
                ended = []
            if ended:
                exchange.upstream_end(self, [])
                return
            exchange.upstream_error(self, "reset", reason.getErrorMessage())

    # -- used by the exchange -------------------------------------------------
    def send_request(self, method: bytes, target: bytes, headers: list[Field]) -> None:
        """Write a request's head; its body follows with :meth:`send_data`."""
        self.chunked = False
        for _raw, name, _value in headers:
            if name == b"transfer-encoding":
                self.chunked = True
        self.request_sent = False
        self.reader.expect(method)
        self.transport.write(request_head(method, target, headers))

    def send_data(self, data: bytes | bytearray) -> None:
        if not data:
            return  # an empty chunk would end a chunked body
        if type(data) is not bytes:
            data = bytes(data)  # h11's parser hands out bytearrays; transports take bytes
        if self.chunked:
            self.transport.writeSequence(chunk(data))
        else:
            self.transport.write(data)

    def send_end(self) -> None:
        """The request body is complete."""
        self.request_sent = True
        if self.chunked:
            self.transport.write(LAST_CHUNK)

    def arm(self) -> None:
        """Start counting the host's silence (a request is on its way)."""
        self.deadline.set(self.owner.config.server_timeout)

    def done(self) -> None:
        """The exchange finished; keep the connection if both sides ended cleanly."""
        self.exchange = None
        self.deadline.cancel()
        # The client transport that paused us is no longer our consumer:
        # a "backpressure" reason left behind would stall the next user.
        self.pauser.on_backpressure = None
        self.pauser.resume("backpressure")
        reader = self.reader
        # Not after an early answer (the rest of the request body was never
        # sent), a response the host framed by closing or asked to close
        # with, or bytes the host sent beyond its response.
        if (
            self.reusable and self.request_sent and reader.state == DONE and reader.keep_alive
            and not reader.trailing
        ):
            reader.reset()
            self.received_any = False
            self.owner.release(self)
        else:
            self.transport.loseConnection()

    def discard(self) -> None:
        """Drop the connection now (the exchange gave up on it)."""
        self.exchange = None
        self.deadline.cancel()
        self.transport.abortConnection()

    def _timed_out(self) -> None:
        exchange = self.exchange
        if exchange is None:  # idle timeout
            self.transport.loseConnection()
            return
        if self.pauser.reasons:
            # We stopped reading because the client is slow: not the host's fault.
            self.arm()
            return
        self.exchange = None
        self.transport.abortConnection()
        exchange.upstream_error(self, "timeout", "no data from the host")


@implementer(IHandshakeListener)
class TLSUpstreamConnection(UpstreamConnection):
    """A connection to a host of a pool with ``tls``.

    It counts as connected only once the handshake is done and the host's
    certificate names what the pool expects; until then it is still
    "connecting" for the pool, so no request byte is written to a host that
    failed verification, and a failure is a connect failure (no retry on
    another host: a certificate problem is the operator's to fix, and a 502
    says so).
    """

    tls_error: str | None = None
    handshaken = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.pauser.transport = self.transport
        # The TCP connect is timed by the reactor; the handshake by us.
        self.deadline.set(self.owner.config.connect_timeout)

    def handshakeCompleted(self) -> None:
        tls = self.owner.tls
        assert tls is not None
        problem = tls.check_identity(self.transport.getHandle())
        if problem is not None:
            self.tls_error = problem
            self.transport.abortConnection()
            return
        self.handshaken = True
        self.deadline.cancel()
        self.owner.connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.handshaken:
            super().connectionLost(reason)
            return
        self.deadline.stop()
        connector, self.connector = self.connector, None
        if connector is None:  # timed out (reported already)
            return
        if self.tls_error is not None:
            kind, detail = "tls_verify", self.tls_error
        elif reason.check(neterror.ConnectionLost, neterror.ConnectionDone):
            kind, detail = "tls_handshake", "the host closed the connection during the TLS handshake"
        else:
            kind, detail = "tls_handshake", f"TLS handshake failed: {reason.getErrorMessage()}"
        self.owner.connect_failed(connector, reason, kind, detail)

    def _timed_out(self) -> None:
        if self.handshaken:
            super()._timed_out()
            return
        connector, self.connector = self.connector, None
        self.transport.abortConnection()
        if connector is not None:
            self.owner.connect_failed(connector, Failure(neterror.TimeoutError()), "connect_timeout",
                                      "no TLS handshake from the host in time")


class _Connector(ClientFactory):
    """Opens one connection and hands it to its first exchange."""

    noisy = False

    def __init__(self, owner: HostConnections, exchange: Exchange) -> None:
        self.owner = owner
        self.exchange: Exchange | None = exchange

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        if self.owner.tls is not None:
            return TLSUpstreamConnection(self.owner, self)
        return UpstreamConnection(self.owner, self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.owner.connect_failed(self, reason)


class HostConnections:
    """All connections of the unit to one host of one pool."""

    def __init__(self, host: Host, config: PoolConfig, reactor: Any, tls: BackendTLS | None = None) -> None:
        self.host = host
        #: How TLS connections to this host are made (a pool with ``tls``).
        self.tls: BackendCreator | None = tls.creator(host.host) if tls is not None else None
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connected, busy or idle
        self.connecting: dict[_Connector, None] = {}
        self.waiters: deque[Exchange] = deque()
        #: The host left its pool (reload): connections close once idle.
        self.retired = False

    # -- acquiring -----------------------------------------------------------
    def acquire(self, exchange: Exchange) -> None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and conn.transport.connected:
                conn.deadline.cancel()
                exchange.upstream_ready(conn)
                return
        if self.open + len(self.connecting) < self.config.max_conns_per_host:
            self._connect(exchange)
        elif len(self.waiters) < self.config.max_queue_per_host:
            self.waiters.append(exchange)
            exchange.queued(self)
        else:
            exchange.upstream_error(None, "queue_full", "too many requests waiting for the host")

    def cancel(self, exchange: Exchange) -> None:
        """``exchange`` no longer wants a connection (client gone, queue timeout)."""
        try:
            self.waiters.remove(exchange)
        except ValueError:
            pass
        for connector in self.connecting:
            if connector.exchange is exchange:
                connector.exchange = None

    def _connect(self, exchange: Exchange) -> None:
        connector = _Connector(self, exchange)
        self.connecting[connector] = None
        factory: Any = connector
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, True, connector)
            factory.noisy = False
        self.reactor.connectTCP(
            self.host.host, self.host.port, factory, timeout=self.config.connect_timeout
        )

    # -- callbacks from connections -------------------------------------------
    def connected(self, conn: UpstreamConnection) -> None:
        self.open += 1
        connector, conn.connector = conn.connector, None
        exchange = None
        if connector is not None:
            self.connecting.pop(connector, None)
            exchange = connector.exchange
        if exchange is None:
            self.release(conn)
        else:
            exchange.upstream_ready(conn)

    def connect_failed(self, connector: _Connector, reason: Failure, kind: str | None = None,
                       detail: str | None = None) -> None:
        self.connecting.pop(connector, None)
        exchange = connector.exchange
        if kind is None:
            kind = "connect_timeout" if reason.check(neterror.TimeoutError) else "connect_refused"
        if detail is None:
            detail = reason.getErrorMessage()
        if exchange is not None:
            exchange.upstream_error(None, kind, detail)
        # Queued requests would meet the same fate; let them try other hosts.
        while self.waiters:
            self.waiters.popleft().upstream_error(None, kind, detail)

    def release(self, conn: UpstreamConnection) -> None:
        if self.waiters:
            exchange = self.waiters.popleft()
            exchange.upstream_ready(conn)
        elif not self.retired and len(self.idle) < self.config.max_idle_per_host:
            self.idle.append(conn)
            conn.deadline.set(self.config.upstream_idle_timeout)
        else:
            conn.transport.loseConnection()

    def lost(self, conn: UpstreamConnection) -> None:
        self.open -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def counts(self) -> tuple[int, int]:
        return self.open, len(self.idle)


class Upstreams:
    """The connection pools of every host the unit talks to."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._by_host: dict[Host, HostConnections] = {}
        #: One client TLS context per pool with ``tls``, built on first use.
        self._tls: dict[str, BackendTLS] = {}

    def for_host(self, host: Host, config: PoolConfig) -> HostConnections:
        pool = self._by_host.get(host)
        if pool is None:
            tls = None
            if config.tls is not None:
                tls = self._tls.get(config.name)
                if tls is None:
                    tls = self._tls[config.name] = BackendTLS(config.tls)
            pool = self._by_host[host] = HostConnections(host, config, self.reactor, tls)
        return pool

    def reconfigure(self, hosts: Iterable[Host], config: PoolConfig) -> None:
        """A pool's reloaded config reaches its hosts' connection pools."""
        for host in hosts:
            conns = self._by_host.get(host)
            if conns is not None:
                conns.config = config

    def retire(self, host: Host) -> None:
        """``host`` left its pool: idle connections close now, busy ones when
        their exchange is done."""
        conns = self._by_host.pop(host, None)
        if conns is None:
            return
        conns.retired = True
        for conn in list(conns.idle):
            conn.transport.loseConnection()

    def counts(self, host: Host) -> tuple[int, int]:
        pool = self._by_host.get(host)
        return pool.counts() if pool is not None else (0, 0)

    def close_idle(self) -> None:
        for pool in self._by_host.values():
            for conn in list(pool.idle):
                conn.transport.loseConnection()
