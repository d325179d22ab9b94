"""Fakes for event-script tests of the router core: no sockets, no real time.

A :class:`Harness` builds one :class:`~nlbproxy.routers.http.Listener` over a
:class:`~twisted.internet.testing.MemoryReactorClock`.  Clients and backends
are :class:`Peer` objects around a :class:`FakeTransport`, so a test reads as
a script of events::

    h = Harness(pools=[pool("web", "10.0.0.1:80")])
    c = h.client()
    c.send(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")   # client sends X
    b = h.accept()                                      # the unit connects
    assert b.received() == b"GET / HTTP/1.1\\r\\n..."    # backend receives Y
    b.send(b"HTTP/1.1 200 OK\\r\\n...")                  # backend answers Z
    assert c.received() == b"HTTP/1.1 200 OK\\r\\n..."   # client receives W

:class:`FakeTransport` behaves like a Twisted TCP transport where it matters
to the code under test: ``loseConnection``/``abortConnection`` deliver
``connectionLost`` on the next reactor turn (after which ``connected`` is
false and a registered producer is told ``stopProducing``), data sent to a
paused transport waits until it resumes, and an end of input reaches
``readConnectionLost`` of half-closeable protocols.  Every :class:`Peer`
action runs the reactor's due calls (``advance(0)``) afterwards, the way the
real reactor would before the next event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h11
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from nlbproxy.classifier import Farm, Host, Pool
from nlbproxy.config import (
    HeaderMatch,
    HostConfig,
    ListenerConfig,
    PoolConfig,
    RouteConfig,
    parse_host_port,
)
from nlbproxy.routers.http import ClientConnection, Exchange, Listener, RouterFactory
from nlbproxy.routers.upstream import UpstreamConnection, Upstreams

__all__ = [
    "SECRET",
    "Attempt",
    "Backend",
    "Client",
    "FakeTransport",
    "Harness",
    "HeaderMatch",
    "Peer",
    "RouteConfig",
    "parse_message",
    "pool",
    "route",
]

#: The farm secret of every harness (affinity tokens are derived from it).
SECRET = b"test-farm-secret"

_EOF = object()


def _address(ip: str, port: int) -> IPv4Address | IPv6Address:
    return IPv6Address("TCP", ip, port) if ":" in ip else IPv4Address("TCP", ip, port)


class FakeTransport(StringTransport):
    """A :class:`StringTransport` with the TCP behaviour the router relies on."""

    def __init__(self, clock: MemoryReactorClock, peer: Any, host: Any) -> None:
        # lenient: a real TCP transport accepts pause/resume after loseConnection.
        super().__init__(hostAddress=host, peerAddress=peer, lenient=True)
        self.clock = clock
        self.protocol: Any = None
        self.nodelay = False
        #: Calls of pauseProducing / resumeProducing, in order.
        self.flow: list[str] = []
        self.write_closed = False
        self.lost: Failure | None = None
        self._inbound: list[Any] = []
        self._closing: BaseException | None = None
        #: Bytes the peer may leave unread before the transport pauses its
        #: producer, like a full socket send buffer; None: never full.
        self.write_limit: int | None = None
        self._producer_paused = False

    # -- what the code under test calls ---------------------------------------
    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def pauseProducing(self) -> None:
        self.flow.append("pause")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.flow.append("resume")
        super().resumeProducing()
        if self._inbound:
            self.clock.callLater(0, self._deliver)

    def write(self, data: bytes) -> None:
        super().write(data)
        limit = self.write_limit
        if (
            limit is not None and self.producer is not None and not self._producer_paused
            and len(self.io.getvalue()) > limit
        ):
            self._producer_paused = True
            self.producer.pauseProducing()

    def unregisterProducer(self) -> None:
        # A TCP transport lets a producer go twice (or after the connection
        # was lost and it already dropped it); StringTransport raises.
        self.producer = None
        self.streaming = None
        self._producer_paused = False

    def loseConnection(self) -> None:
        self._close(error.ConnectionDone("closed by the unit"))

    def abortConnection(self) -> None:
        self.disconnected = True
        self._close(error.ConnectionAborted())

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    # -- what the test (the remote peer) does ---------------------------------
    @property
    def paused(self) -> bool:
        return self.producerState == "paused"

    @property
    def aborted(self) -> bool:
        return bool(self.disconnected)

    def receive(self, data: bytes) -> None:
        """Bytes from the remote peer; held while reading is paused."""
        assert self.lost is None, "the connection is closed"
        if self.disconnecting:
            return  # Twisted stops reading once loseConnection was called
        if self.paused or self._inbound:
            self._inbound.append(data)
            return
        self.protocol.dataReceived(data)

    def receive_eof(self) -> None:
        """The remote peer shut down its sending side."""
        if self.paused or self._inbound:
            self._inbound.append(_EOF)
            return
        self._eof()

    def drain(self) -> bytes:
        """The peer reads everything written so far; a paused producer resumes."""
        data = self.value()
        self.clear()
        if self._producer_paused:
            self._producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return data

    def connection_lost(self, reason: BaseException) -> None:
        """The connection ends now (the remote peer closed or reset it)."""
        if self.lost is not None:
            return
        self.lost = Failure(reason)
        self.connected = False
        self.disconnecting = True
        producer = self.producer
        if producer is not None:
            self.producer = None
            self.streaming = None
            producer.stopProducing()
        self.protocol.connectionLost(self.lost)

    # -- internals ---------------------------------------------------------------
    def _close(self, reason: BaseException) -> None:
        self.disconnecting = True
        if self._closing is None:
            self.clock.callLater(0, self._closed)
        if self._closing is None or isinstance(reason, error.ConnectionAborted):
            self._closing = reason

    def _closed(self) -> None:
        assert self._closing is not None
        self.connection_lost(self._closing)

    def _eof(self) -> None:
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        else:
            self.connection_lost(error.ConnectionDone("closed by the peer"))

    def _deliver(self) -> None:
        while self._inbound and not self.paused and not self.disconnecting:
            item = self._inbound.pop(0)
            if item is _EOF:
                self._eof()
            else:
                self.protocol.dataReceived(item)


class Peer:
    """The far end of one connection: a client of the unit or a backend host."""

    def __init__(self, harness: Harness, protocol: Any, transport: FakeTransport) -> None:
        self.harness = harness
        self.protocol = protocol
        self.transport = transport

    def send(self, data: bytes) -> Peer:
        self.transport.receive(data)
        self.harness.flush()
        return self

    def received(self) -> bytes:
        """What the unit wrote to this peer since the last call."""
        data = self.transport.drain()
        self.harness.flush()
        return data

    def fill_after(self, unread: int) -> None:
        """From now on the peer's receive window is full past ``unread`` bytes."""
        self.transport.write_limit = unread

    def shutdown_write(self) -> None:
        """A half-close (client) or an orderly close (backend) from the peer."""
        self.transport.receive_eof()
        self.harness.flush()

    def close(self) -> None:
        self.transport.connection_lost(error.ConnectionDone("closed by the peer"))
        self.harness.flush()

    def reset(self) -> None:
        self.transport.connection_lost(error.ConnectionLost("reset by the peer"))
        self.harness.flush()

    def stop_reading(self) -> None:
        """The peer's receive window is full: the transport pauses its producer."""
        producer = self.transport.producer
        assert producer is not None, "no producer registered on this transport"
        producer.pauseProducing()
        self.harness.flush()

    def start_reading(self) -> None:
        producer = self.transport.producer
        assert producer is not None, "no producer registered on this transport"
        producer.resumeProducing()
        self.harness.flush()

    @property
    def closed(self) -> bool:
        """The unit closed (or aborted) the connection and it is gone."""
        return self.transport.lost is not None

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def paused(self) -> bool:
        """The unit stopped reading from this peer."""
        return self.transport.paused


class Client(Peer):
    protocol: ClientConnection

    @property
    def pauser_reasons(self) -> set[str]:
        return set(self.protocol.pauser.reasons)


class Backend(Peer):
    protocol: UpstreamConnection

    def __init__(self, harness: Harness, protocol: Any, transport: FakeTransport, key: str) -> None:
        super().__init__(harness, protocol, transport)
        self.key = key

    @property
    def pauser_reasons(self) -> set[str]:
        pauser = self.protocol.pauser
        assert pauser is not None
        return set(pauser.reasons)


class Attempt:
    """A connection attempt of the unit that the test has not resolved yet."""

    def __init__(self, host: str, port: int, factory: Any, connector: Any, timeout: float) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.connector = connector
        self.timeout = timeout

    @property
    def key(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<Attempt {self.key}>"


def pool(name: str, *hosts: str | tuple[str, int], **options: Any) -> PoolConfig:
    """A pool config; a host is ``"ip:port"`` or ``("ip:port", weight)``.

    Pools here balance by round robin unless told otherwise, so that scripts
    know which host comes next.
    """
    options.setdefault("balance", "round_robin")
    configs = []
    for entry in hosts:
        address, weight = (entry, 1) if isinstance(entry, str) else entry
        ip, port = parse_host_port(address)
        configs.append(HostConfig(ip, port, weight))
    return PoolConfig(name, tuple(configs), **options)


def route(pool: str, **keys: Any) -> RouteConfig:
    return RouteConfig(pool=pool, **keys)


class Harness:
    """One listener of a unit, its farm and its backend pools, on a fake reactor."""

    def __init__(
        self,
        pools: Sequence[PoolConfig] = (),
        default_pool: str | None = None,
        routes: Sequence[RouteConfig] = (),
        unit_name: str = "unit1",
        scheme: bytes = b"http",
        **listener_options: Any,
    ) -> None:
        if not pools:
            pools = [pool("web", "10.0.0.1:8080")]
        self.reactor = MemoryReactorClock()
        self.farm = Farm(pools, self.reactor, SECRET)
        self.upstreams = Upstreams(self.reactor)
        self.config = ListenerConfig(
            name="test", endpoint="tcp:0", pool=default_pool or pools[0].name,
            routes=tuple(routes), **listener_options,
        )
        #: (method, target, status) of every access-log line.
        self.access_log: list[tuple[bytes, bytes, int]] = []
        self.listener = Listener(
            self.config, self.farm, self.upstreams, self.reactor, unit_name,
            access_log=self._log, scheme=scheme,
        )
        self.factory = RouterFactory(self.listener)
        self._seen = 0
        self._pending: list[Attempt] = []
        self.backends: list[Backend] = []

    def _log(self, exchange: Exchange, duration: float) -> None:
        self.access_log.append((exchange.request.method, exchange.request.target, exchange.status))

    # -- time --------------------------------------------------------------------
    def flush(self) -> None:
        """Run what the reactor would run before the next network event."""
        self.reactor.advance(0)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()

    # -- farm ----------------------------------------------------------------------
    def pool(self, name: str) -> Pool:
        return self.farm.pools[name]

    def host(self, key: str, pool: str | None = None) -> Host:
        return self.farm.host(pool or self.config.pool, key)

    def health(self, key: str, pool: str | None = None) -> str:
        return self.host(key, pool).health(self.reactor.seconds())

    # -- clients -------------------------------------------------------------------
    def client(self, ip: str = "192.0.2.10", port: int = 50000) -> Client:
        """A client connection accepted by the listener."""
        peer = _address(ip, port)
        protocol = self.factory.buildProtocol(peer)
        assert protocol is not None, "the listener refused the connection"
        transport = FakeTransport(self.reactor, peer, _address("203.0.113.1", 80))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return Client(self, protocol, transport)

    # -- backends ------------------------------------------------------------------
    def attempts(self) -> list[Attempt]:
        """Connection attempts the unit made that the test has not resolved."""
        clients = self.reactor.tcpClients
        while self._seen < len(clients):
            host, port, factory, timeout, _bind = clients[self._seen]
            self._pending.append(Attempt(host, port, factory, self.reactor.connectors[self._seen], timeout))
            self._seen += 1
        return list(self._pending)

    def _take(self, i: int) -> Attempt:
        pending = self.attempts()
        assert len(pending) > i, f"no connection attempt #{i}: {pending}"
        return self._pending.pop(i)

    def accept(self, i: int = 0) -> Backend:
        """The host accepts attempt ``i``: the unit's protocol is connected."""
        attempt = self._take(i)
        peer = _address(attempt.host, attempt.port)
        protocol = attempt.factory.buildProtocol(peer)
        transport = FakeTransport(self.reactor, peer, _address("10.255.0.1", 40000 + len(self.backends)))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        backend = Backend(self, protocol, transport, attempt.key)
        self.backends.append(backend)
        self.flush()
        return backend

    def next_backend(self) -> Backend:
        """Where the last request went: a new connection (accepted now) or
        the one reused connection that has unread bytes."""
        if self.attempts():
            return self.accept()
        busy = [b for b in self.backends if not b.closed and b.transport.value()]
        assert len(busy) == 1, f"expected one backend with a request, got {len(busy)}"
        return busy[0]

    def refuse(self, i: int = 0) -> Attempt:
        attempt = self._take(i)
        attempt.factory.clientConnectionFailed(attempt.connector, Failure(error.ConnectionRefusedError()))
        self.flush()
        return attempt

    def time_out(self, i: int = 0) -> Attempt:
        attempt = self._take(i)
        attempt.factory.clientConnectionFailed(attempt.connector, Failure(error.TimeoutError()))
        self.flush()
        return attempt


def parse_message(data: bytes, method: bytes = b"GET") -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Status, headers (lower-case name -> values) and body of one response."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    status = 0
    headers: dict[bytes, list[bytes]] = {}
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            for name, value in event.headers:
                headers.setdefault(bytes(name), []).append(bytes(value))
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body
        elif event is h11.NEED_DATA:
            conn.receive_data(b"")  # read-until-close bodies end here
        else:
            raise AssertionError(f"unexpected {event!r}")
