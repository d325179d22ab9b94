# -*- test-case-name: tests.test_router -*-
"""The HTTP/1.1 request router (the seed's "HTTP/SSL request router").

A client connection is parsed by an h11 server-role state machine, one
logical request at a time; every request is routed on its own (listener
rules pick a pool, the classifier picks a host) and relayed over a pooled
keep-alive backend connection, so two requests of one client connection may
go to two pools and hosts.

Flow control.  A request or response body is never held whole: each h11
``Data`` event is written to the other side at once, and each side's
:class:`~nlbproxy.flow.Pauser` is registered as the producer of the other
side's transport, so a full socket buffer on one side stops reading on the
other.  Pipelined requests wait in h11's bounded buffer: the client is paused
("pipeline") until the current response is complete, which also keeps the
responses in order.  While a backend connection is being opened, at most
``MAX_PENDING_BODY`` bytes of request body are held ("connecting").

Timeouts.  One :class:`~nlbproxy.flow.Deadline` per client connection moves
through three phases: waiting for the next request (keep-alive timeout),
reading request headers (header timeout, not extended by a slow drip:
slowloris), reading a request body or pushing a response to a client that
does not read (client timeout).  The backend side has its own deadline
(server timeout) in :mod:`nlbproxy.routers.upstream`.

Failures before the first response byte are retried on another host when
nothing was lost: always after a failed connect, and for idempotent requests
without a body after a reset.  The host is then left out for the pool's
``fail_timeout`` (passive health).  What cannot be retried becomes 502 (bad
or refused), 503 (no host, queue full) or 504 (timed out).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import h11
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as defer_TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import connectionDone, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nlbproxy import limits
from nlbproxy.cache import CacheRequest, Filling, Hit, ResponseCache
from nlbproxy.classifier import Farm, Host, Pool
from nlbproxy.config import ListenerConfig
from nlbproxy.filtering import RequestFilter
from nlbproxy.flow import Deadline, Pauser
from nlbproxy.metrics import ListenerStats
from nlbproxy.routers import headers as hdrs
from nlbproxy.routers.hostside import Head
from nlbproxy.routers.upstream import HostConnections, UpstreamConnection, Upstreams
from nlbproxy.routing import Decision, Refusal, RequestView, RouteTable, cookies_of
from nlbproxy.session.tracker import SessionTracker

log = Logger()

_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_Request = h11.Request
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_Response = h11.Response
_InformationalResponse = h11.InformationalResponse
_ConnectionClosed = h11.ConnectionClosed
_DONE = h11.DONE

#: RFC 9110 section 9.2.2: methods that may be repeated without harm.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: Failures that mean the host is unwell (passive health).
_HOST_FAILURES = frozenset({"connect_refused", "connect_timeout", "reset", "timeout", "bad_response"})
_STATUS_FOR_FAILURE = {
    "connect_refused": 502, "reset": 502, "bad_response": 502,
    "connect_timeout": 504, "timeout": 504, "queue_full": 503, "queue_timeout": 503,
}

_REASONS = {
    400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}

AccessLogger = Callable[["Exchange", float], None]


class Listener:
    """What the connections of one ``[[listener]]`` share."""

    def __init__(
        self,
        config: ListenerConfig,
        farm: Farm,
        upstreams: Upstreams,
        reactor: Any,
        unit_name: str,
        access_log: AccessLogger | None = None,
        scheme: bytes = b"http",
        sessions: SessionTracker | None = None,
        caches: Mapping[str, ResponseCache] | None = None,
        stats: ListenerStats | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.routes = RouteTable.for_listener(config)
        self.farm = farm
        #: Where a request goes until routing has decided (and if it never does).
        self.default_pool = farm.pools[config.pool]
        self.upstreams = upstreams
        self.reactor = reactor
        #: A listener that replaces another (reload) carries its statistics on.
        self.stats = stats if stats is not None else ListenerStats()
        self.filter = RequestFilter.for_listener(config, reactor, self.stats.filter)
        self.access_log = access_log
        self.scheme = scheme
        self.sessions = sessions
        #: Response caches by pool name (pools with ``cache``), shared by listeners.
        self.caches: Mapping[str, ResponseCache] = caches if caches is not None else {}
        self.via = b"1.1 " + unit_name.encode("ascii", "replace")
        self.connections: set[ClientConnection] = set()
        self.stopping = False
        #: Pools a reload removed while this listener, removed by the same
        #: reload, still serves its last requests with the old rules.
        self.retired_pools: Mapping[str, Pool] = {}

    def pool_named(self, name: str) -> Pool | None:
        return self.farm.pools.get(name) or self.retired_pools.get(name)

    def reconfigure(self, config: ListenerConfig) -> None:
        """Applies a reloaded config (same name and endpoint) to the next request.

        Requests in flight keep the pool they were routed to; connections
        keep the limits they were accepted with (``ClientConnection.config``).
        The filter is rebuilt only when its rules change, so that rate-limit
        buckets survive other changes.
        """
        old = self.config
        self.config = config
        self.routes = RouteTable.for_listener(config)
        self.default_pool = self.farm.pools[config.pool]
        if (old.deny, old.rate_limit) != (config.deny, config.rate_limit):
            self.filter = RequestFilter.for_listener(config, self.reactor, self.stats.filter)

    def close_idle(self, linger: float = 0.0) -> None:
        """Graceful stop: close idle connections, and busy ones after their response.

        With ``linger``, idle connections stay open that long for one more
        request (answered with ``Connection: close``) instead of closing at
        once, which races with a client that is sending on them.
        """
        self.stopping = True
        for conn in list(self.connections):
            conn.close_when_idle(linger)

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.transport.abortConnection()


class RouterFactory(Factory):
    """Builds a :class:`ClientConnection` per accepted connection."""

    noisy = False

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> ClientConnection | None:
        listener = self.listener
        if len(listener.connections) >= listener.config.max_connections or listener.stopping:
            listener.stats.reject(503)
            return None  # Twisted closes the socket at once
        return ClientConnection(listener)


# Client connection phases (what the deadline is counting).
_IDLE, _HEADERS, _BODY, _WAIT, _RESPONSE, _TUNNEL = range(6)


@implementer(IHalfCloseableProtocol)
class ClientConnection(Protocol):
    """One client TCP connection: h11 server role plus the current exchange."""

    #: A connected TCP transport (ITCPTransport plus abortConnection); Twisted
    #: types it as an optional ITransport, which has neither.
    transport: Any

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.config = listener.config
        self.exchange: Exchange | None = None
        self.requests = 0
        self.phase = _HEADERS
        self.closing = False
        self.tunnel: UpstreamConnection | None = None
        self.client_ip = ""

    # -- Twisted ---------------------------------------------------------------
    def connectionMade(self) -> None:
        transport = self.transport
        transport.setTcpNoDelay(True)
        self.client_ip = transport.getPeer().host
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
        self.pauser = Pauser(transport)
        self.deadline = Deadline(self.listener.reactor, self._timed_out)
        self.deadline.set(self.config.header_timeout)
        stats = self.listener.stats
        stats.connections += 1
        stats.open_connections += 1
        self.listener.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.deadline.set(limits.TUNNEL_TIMEOUT)
            self.tunnel.transport.write(data)
            return
        phase = self.phase
        if phase == _IDLE:
            self.phase = _HEADERS
        elif phase == _BODY:
            self.deadline.set(self.config.client_timeout)
        self.h11.receive_data(data)
        self._advance()
        if phase == _IDLE and self.phase == _HEADERS:
            # Only a request still incomplete after this read needs the
            # header deadline (one that came whole is the common case).
            self.deadline.set(self.config.header_timeout)

    def readConnectionLost(self) -> None:
        # The client half-closed: it may still read our answer.
        if self.tunnel is not None:
            self.tunnel.transport.loseWriteConnection()
            return
        self.h11.receive_data(b"")
        self._advance()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.deadline.stop()
        listener = self.listener
        listener.connections.discard(self)
        listener.stats.open_connections -= 1
        if self.tunnel is not None:
            self.tunnel.transport.loseConnection()
            self.tunnel = None
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()

    # -- parsing -----------------------------------------------------------------
    def _advance(self) -> None:
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is _NEED_DATA:
                return
            if event is _PAUSED:
                # A pipelined request (or bytes after an upgrade request)
                # waits its turn in h11's buffer; stop reading more.
                self.pauser.pause("pipeline")
                return
            kind = type(event)
            if kind is _Data:
                if self.exchange is not None:
                    self.exchange.request_data(event.data)  # type: ignore[union-attr]
            elif kind is _Request:
                self._request(event)  # type: ignore[arg-type]
            elif kind is _EndOfMessage:
                if self.exchange is not None:
                    self.exchange.request_end()
            elif kind is _ConnectionClosed:
                if self.exchange is None:
                    self.transport.loseConnection()
                return
            if self.exchange is None and conn.our_state is not h11.IDLE:
                return

    def _request(self, request: h11.Request) -> None:
        self.requests += 1
        listener = self.listener
        listener.stats.requests += 1
        config = self.config
        method = request.method
        fields = hdrs.fields(request.headers)
        if len(request.target) > config.max_request_line:
            self.local_response(414, b"request target too long\n")
            return
        if method == b"CONNECT":
            self.local_response(405, b"CONNECT is not supported\n")
            return
        content_length = -1
        chunked = upgrade = False
        # h11 bounds only a request that is still incomplete; one that came
        # whole in a single read is measured here.
        size = len(request.target)
        for _raw, name, value in fields:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"upgrade":
                upgrade = True
        if size > config.max_header_bytes:
            self.local_response(431, b"request headers too large\n")
            return
        if chunked and content_length >= 0:
            # RFC 9112 section 6.3: a smuggling attempt more often than not.
            self.local_response(400, b"both Content-Length and Transfer-Encoding\n")
            return
        max_body = config.max_body_bytes
        if max_body and content_length > max_body:
            self.local_response(413, b"request body too large\n")
            return
        pairs = None
        if listener.filter is not None:
            pairs = hdrs.pairs(fields)
            verdict = listener.filter.check(self.client_ip, method, request.target, pairs)
            if verdict is not None:
                if not (chunked or content_length > 0):
                    # A bodiless request's end is there already: taking it
                    # keeps the connection (a 429 is retried on it).
                    self.h11.next_event()
                self.local_response(verdict.status, verdict.body, headers=verdict.headers)
                return
        has_body = chunked or content_length > 0
        self.phase = _BODY if has_body else _WAIT
        if has_body:
            self.deadline.set(config.client_timeout)
        else:
            self.deadline.cancel()
        exchange = self.exchange = Exchange(self, request, fields, listener.default_pool, has_body, upgrade)
        exchange._pairs = pairs
        routes = listener.routes
        if not routes.rules:
            exchange.start()
        elif has_body and routes.body_prefix:
            # Rules look into the body: hold its first bytes, then decide.
            exchange.prefix_wanted = routes.body_prefix
            if self.h11.they_are_waiting_for_100_continue:
                # No host is chosen before the body comes, and the client
                # sends none before a go-ahead (RFC 9110 10.1.1): give it
                # here rather than leave the client to its own timeout.
                self.send(_InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        else:
            exchange.decide()

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        if self.exchange is not None and self.exchange.response_started:
            self.listener.stats.reject(status)  # local_response counts the others
            self.transport.abortConnection()
            return
        if self.exchange is not None:
            self.exchange.abandon()
        self.local_response(status, f"{exc}\n".encode("ascii", "replace"), close=True)

    # -- answering ---------------------------------------------------------------
    def send(self, event: Any) -> None:
        # h11's parser hands out bytearrays; its writer joins them into the
        # one bytes object Twisted's transports accept.  Twisted sends what
        # one reactor turn wrote in one go (measured: faster under
        # concurrency than sending each write at once).
        data = self.h11.send(event)
        if data:
            self.transport.write(data)

    def local_response(
        self, status: int, body: bytes, close: bool = False, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """An answer made by the unit itself (errors), ending the exchange.

        ``headers`` are added to the answer; a ``content-type`` among them
        replaces the default plain text one.
        """
        listener = self.listener
        if status >= 400:
            listener.stats.reject(status)
        exchange = self.exchange
        if exchange is not None:
            exchange.status = status
        conn = self.h11
        if exchange is not None and not exchange.has_body and conn.their_state is h11.SEND_BODY:
            # A bodiless request whose end h11 has not handed out yet: take
            # it, so an early answer (503) keeps the connection alive.
            try:
                conn.next_event()
            except h11.RemoteProtocolError:
                close = True
        request_unread = conn.their_state not in (_DONE, h11.MUST_CLOSE, h11.CLOSED)
        close = close or request_unread or self.closing
        extra = list(headers)
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *extra,
        ]
        if not any(name.lower() == b"content-type" for name, _ in extra):
            headers.insert(0, (b"content-type", b"text/plain; charset=utf-8"))
        if close:
            headers.append((b"connection", b"close"))
        if conn.our_state is h11.SEND_RESPONSE or conn.our_state is h11.IDLE:
            try:
                self.send(_Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
                self.send(_Data(data=body))
                self.send(_EndOfMessage())
            except h11.LocalProtocolError:
                close = True
        if exchange is not None:
            exchange.logged(listener)
            self.exchange = None
        if close:
            self.deadline.cancel()
            self.transport.loseConnection()
        else:
            self._next_request()

    def exchange_done(self) -> None:
        """The current exchange has sent its whole response and read its whole request."""
        self.exchange = None
        self._next_request()

    def _next_request(self) -> None:
        conn = self.h11
        if (
            self.closing
            or conn.our_state is not _DONE
            or conn.their_state is not _DONE
            or self.requests >= self.config.max_requests_per_connection
        ):
            self.deadline.cancel()
            self.transport.loseConnection()
            return
        conn.start_next_cycle()
        self.phase = _IDLE
        self.deadline.set(self.config.keepalive_timeout)
        if self.pauser.reasons:
            self.pauser.resume("pipeline")
        if conn.trailing_data[0]:
            self.phase = _HEADERS
            self.deadline.set(self.config.header_timeout)
            self._advance()

    def close_when_idle(self, linger: float = 0.0) -> None:
        self.closing = True
        if self.exchange is None and self.tunnel is None:
            if linger > 0 and (self.phase == _IDLE or self.h11.their_state is h11.IDLE):
                self.deadline.set(linger)  # _timed_out closes it (408 if half a request came)
            else:
                self.transport.loseConnection()

    def start_tunnel(self, upstream: UpstreamConnection) -> None:
        self.tunnel = upstream
        self.phase = _TUNNEL
        self.deadline.set(limits.TUNNEL_TIMEOUT)
        self.pauser.resume("pipeline")
        data, _closed = self.h11.trailing_data
        if data:
            upstream.transport.write(data)

    def _timed_out(self) -> None:
        phase = self.phase
        if phase == _HEADERS and self.h11.their_state is h11.IDLE and self.h11.trailing_data[0]:
            self.local_response(408, b"request headers not received in time\n", close=True)
            return
        if phase == _BODY and self.exchange is not None and not self.exchange.response_started:
            self.exchange.abandon()
            self.local_response(408, b"request body not received in time\n", close=True)
            return
        if phase in (_RESPONSE, _BODY):
            # A client that stopped reading our answer or sending its body.
            self.transport.abortConnection()
            return
        # Idle keep-alive, or a client that never sent a byte.
        self.transport.loseConnection()

    def backpressure(self, paused: bool) -> None:
        """The client stopped (True) or resumed (False) reading our response."""
        if paused:
            self.deadline.set(self.config.client_timeout)
        elif self.phase == _RESPONSE:
            self.deadline.cancel()


@implementer(IPushProducer)
class _HitWriter:
    """Registered with the client's transport while a cache hit is written:
    a full send buffer pauses it, and the exchange ends once it drains, so a
    client that pipelines requests for cached responses and does not read
    them makes the unit hold one response, not one per request."""

    __slots__ = ("exchange", "paused")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange: Exchange | None = exchange
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        exchange = self.exchange
        if self.paused and exchange is not None:
            self.exchange = None
            exchange.hit_written()

    def stopProducing(self) -> None:
        self.exchange = None


class Exchange:
    """One request and its response, from routing to the last byte."""

    __slots__ = (
        "client", "request", "fields", "pool", "host", "upstream", "hostconns", "tried", "started",
        "has_body", "request_complete", "body_bytes", "body_forwarded", "pending", "pending_bytes",
        "response_started", "response_complete", "status", "bytes_sent", "set_cookie",
        "cancelled", "queue_timer", "sent_end", "session", "upgrade", "prefix_wanted", "affinity_key",
        "routing", "cached", "filling", "_pairs",
    )

    def __init__(
        self,
        client: ClientConnection,
        request: h11.Request,
        fields: list[hdrs.Field],
        pool: Pool,
        has_body: bool,
        upgrade: bool,
    ) -> None:
        self.client = client
        self.request = request
        #: The request's header triples, as h11 parsed them.
        self.fields = fields
        self.pool = pool
        self.host: Host | None = None
        self.upstream: UpstreamConnection | None = None
        self.hostconns: HostConnections | None = None
        self.tried: list[Host] = []
        self.started = client.listener.reactor.seconds()
        self.has_body = has_body
        self.request_complete = False
        self.body_bytes = 0
        self.body_forwarded = False
        self.pending: list[bytes] | None = None
        self.pending_bytes = 0
        self.response_started = False
        self.response_complete = False
        self.status = 0
        self.bytes_sent = 0
        self.set_cookie: bytes | None = None
        self.cancelled = False
        self.sent_end = False
        #: The application's session cookie, with ``affinity = "session"``.
        self.session: str | None = None
        self.queue_timer: Any = None
        self.upgrade = hdrs.upgrade_protocol(fields) if upgrade else None
        #: Body bytes still to hold before routing decides (0: not waiting).
        self.prefix_wanted = 0
        #: From the routing decision: requests with one key share a host.
        self.affinity_key: bytes | None = None
        #: A routing decision still to come (a plugin answering later).
        self.routing: Deferred[Decision] | None = None
        self._pairs: list[tuple[bytes, bytes]] | None = None
        #: What the pool's cache may do with this exchange, and the response being kept.
        self.cached: CacheRequest | None = None
        self.filling: Filling | None = None

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """The request's (lower-case name, value) pairs, made once for the
        filter, the rules and affinity, whichever of them asks."""
        if self._pairs is None:
            self._pairs = hdrs.pairs(self.fields)
        return self._pairs

    # -- routing ---------------------------------------------------------------------
    def decide(self) -> None:
        """Ask the listener's rules (with the body prefix held so far) for the pool."""
        wanted = self.prefix_wanted
        self.prefix_wanted = 0
        client = self.client
        listener = client.listener
        body = b"".join(self.pending) if self.pending else b""
        complete = self.request_complete or not self.has_body
        if wanted and len(body) > wanted:
            body, complete = body[:wanted], False
        view = RequestView(
            self.request.method, self.request.target, self.pairs(), client.client_ip,
            listener.scheme, body, complete,
        )
        try:
            decision = listener.routes.decide(view)
        except Refusal as refusal:
            self._refused(refusal)
            return
        except Exception:
            log.failure("routing failed for {target!r}", target=self.request.target)
            self._routing_failed("routing failed")
            return
        if isinstance(decision, Deferred):
            self.routing = decision
            decision.addTimeout(limits.ROUTING_TIMEOUT, listener.reactor)
            decision.addCallbacks(self._decided_later, self._routing_error)
            return
        self._decided(decision)

    def _decided_later(self, decision: Decision) -> None:
        self.routing = None
        if not self.cancelled:
            self._decided(decision)

    def _routing_error(self, failure: Failure) -> None:
        self.routing = None
        if self.cancelled:
            return
        if isinstance(failure.value, Refusal):
            self._refused(failure.value)
            return
        log.failure("routing failed for {target!r}", failure, target=self.request.target)
        self._routing_failed("routing timed out" if failure.check(defer_TimeoutError) else "routing failed")

    def _decided(self, decision: Decision) -> None:
        pool = self.client.listener.pool_named(decision.pool)
        if pool is None:
            log.error("routing chose the unknown pool {pool!r}", pool=decision.pool)
            self._routing_failed("routing chose an unknown pool")
            return
        self.pool = pool
        self.affinity_key = decision.affinity_key
        self.start()

    def _refused(self, refusal: Refusal) -> None:
        self.status = refusal.status
        if self.pending is not None:
            self.client.pauser.resume("connecting")
        self.client.local_response(refusal.status, refusal.body, headers=refusal.headers)

    def _routing_failed(self, why: str) -> None:
        self.client.listener.stats.routing_failures += 1
        self._refused(Refusal(502, why.encode() + b"\n"))

    # -- choosing a host ---------------------------------------------------------
    def start(self) -> None:
        cache = self.client.listener.caches.get(self.pool.name)
        if cache is not None and self._from_cache(cache):
            return
        pool = self.pool
        affinity = pool.config.affinity
        sessions = self.client.listener.sessions
        if affinity == "session" and sessions is not None:
            cookie = cookies_of(self.pairs()).get(pool.config.session_cookie.encode())
            if cookie:
                self.session = cookie.decode("latin-1")
                found = sessions.lookup(pool, self.session, self._session_found)
                if found is None:
                    return  # the DAM asks the other units; _session_found goes on
                self._session_found(*found)
                return
        elif affinity == "tls_session" and sessions is not None:
            # The id in the client's TLS session tickets (nlbproxy.tls): the
            # same on resumption, on whichever unit the client resumes.
            tag = getattr(self.client.transport, "session_tag", None)
            self.session = tag() if tag is not None else None
            if self.session is not None:
                found = sessions.lookup(pool, self.session, self._session_found)
                if found is None:
                    return
                self._session_found(*found)
                return
        self._start_with(self._classify())

    def _from_cache(self, cache: ResponseCache) -> bool:
        """Answer from the cache if it holds a fresh response; True if it did."""
        request = self.request
        cached = cache.request(request.method, request.target, self.fields, self.has_body or self.upgrade is not None)
        if cached is None:
            return False
        hit = cached.get()
        if hit is None:
            self.cached = cached
            return False
        self._send_hit(hit, cached.head)
        return True

    def _send_hit(self, hit: Hit, head: bool) -> None:
        client = self.client
        self.status = hit.status
        self.response_started = True
        headers = hit.headers
        if client.closing or client.requests >= client.config.max_requests_per_connection:
            headers.append((b"connection", b"connection", b"close"))
        # A hit is written whole; the writer tells whether that filled the
        # client's send buffer, and then the next (pipelined) request waits.
        writer = _HitWriter(self)
        client.transport.registerProducer(writer, True)
        client.send(_Response(status_code=hit.status, headers=hdrs.wrap(headers), reason=hit.reason, _parsed=True))
        if hit.body and not head:
            client.send(_Data(data=hit.body))
            self.bytes_sent = len(hit.body)
        client.send(_EndOfMessage())
        if writer.paused:
            client.phase = _RESPONSE
            client.deadline.set(client.config.client_timeout)
        else:
            self.hit_written()

    def hit_written(self) -> None:
        """The hit's bytes left for the client (or fit its send buffer)."""
        client = self.client
        client.transport.unregisterProducer()
        self.response_complete = True
        self.logged(client.listener)
        if self.request_complete:
            client.exchange_done()
        # else the request's end, which h11 hands out next, ends the exchange

    def _session_found(self, host: Host | None, known: bool) -> None:
        if self.cancelled:
            return
        if host is None:
            host = self._classify()
            sessions = self.client.listener.sessions
            # A TLS session is bound on its first request (its id is ours,
            # not made up by the client).
            bind = known or self.pool.config.affinity == "tls_session"
            if bind and host is not None and sessions is not None and self.session is not None:
                # Its host is down or inactive: the session moves to the one
                # chosen.  (An unknown cookie binds nothing: clients must not
                # be able to fill the session table with made-up values.)
                sessions.bind(self.pool, self.session, host)
        self._start_with(host)

    def _start_with(self, host: Host | None) -> None:
        if host is None:
            self.client.local_response(503, b"no host available\n")
            return
        self._dispatch(host)

    def _classify(self) -> Host | None:
        pool = self.pool
        if self.affinity_key is not None:
            keyed = pool.host_for_key(self.affinity_key, self.tried)
            if keyed is not None:
                return keyed
        affinity = pool.config.affinity
        if affinity == "none" or affinity == "session" or affinity == "tls_session":
            return pool.choose(self.tried)
        host = None
        if not self.tried:
            if affinity == "cookie":
                token = cookies_of(self.pairs()).get(pool.config.affinity_cookie.encode())
                if token:
                    host = pool.host_for_token(token.decode("ascii", "replace"))
            else:
                host = pool.host_for_client_ip(self.client.client_ip)
        if host is None:
            host = pool.choose(self.tried)
            if host is not None and affinity == "cookie":
                self.set_cookie = self._affinity_cookie(host)
        return host

    def _affinity_cookie(self, host: Host) -> bytes:
        cookie = f"{self.pool.config.affinity_cookie}={host.affinity_token}; Path=/; HttpOnly; SameSite=Lax"
        if self.client.listener.scheme == b"https":
            cookie += "; Secure"
        return cookie.encode()

    def _dispatch(self, host: Host) -> None:
        self.host = host
        self.tried.append(host)
        host.active_requests += 1
        hostconns = self.client.listener.upstreams.for_host(host, self.pool.config)
        self.hostconns = hostconns
        hostconns.acquire(self)

    def _undispatch(self) -> None:
        if self.queue_timer is not None:
            self.queue_timer.cancel()
            self.queue_timer = None
        if self.hostconns is not None:
            self.hostconns.cancel(self)
            self.hostconns = None
        if self.host is not None:
            self.host.active_requests -= 1

    # -- callbacks from the connection pool --------------------------------------
    def queued(self, hostconns: HostConnections) -> None:
        self.queue_timer = self.client.listener.reactor.callLater(
            self.pool.config.connect_timeout, self._queue_timeout
        )

    def _queue_timeout(self) -> None:
        self.queue_timer = None
        self.upstream_error(None, "queue_timeout", "waited too long for a connection to the host")

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        if self.queue_timer is not None:
            self.queue_timer.cancel()
            self.queue_timer = None
        if self.cancelled:
            conn.exchange = None
            conn.owner.release(conn)
            return
        self.upstream = conn
        conn.exchange = self
        conn.uses += 1
        client = self.client
        request = self.request
        headers = hdrs.request_headers(
            self.fields, client.client_ip, client.listener.scheme, client.listener.via,
            conn.owner.host.key.encode(), self.upgrade,
        )
        conn.send_request(request.method, request.target, headers)
        if self.pending is not None:
            for chunk in self.pending:
                conn.send_data(chunk)
            self.body_forwarded = True
            self.pending = None
            self.pending_bytes = 0
            client.pauser.resume("connecting")
        # A bodiless request is complete on the host's side at once, even
        # before h11 hands us the client's end of message.
        self.sent_end = self.request_complete or not self.has_body
        if self.sent_end:
            conn.send_end()
        else:
            conn.transport.registerProducer(client.pauser, True)
        conn.arm()

    # -- request body from the client --------------------------------------------
    def request_data(self, data: bytes) -> None:
        self.body_bytes += len(data)
        max_body = self.client.config.max_body_bytes
        if max_body and self.body_bytes > max_body:
            if self.response_started:
                self.client.transport.abortConnection()
            else:
                self.abandon()
                self.client.local_response(413, b"request body too large\n", close=True)
            return
        if self.response_complete:
            return  # the host answered early; the rest of the body is read and dropped
        upstream = self.upstream
        if upstream is not None:
            self.body_forwarded = True
            upstream.send_data(data)
            upstream.arm()
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self.pending_bytes += len(data)
        wanted = self.prefix_wanted
        if wanted:
            if self.pending_bytes >= wanted:
                self.decide()
        elif self.pending_bytes > limits.MAX_PENDING_BODY:
            self.client.pauser.pause("connecting")

    def request_end(self) -> None:
        self.request_complete = True
        client = self.client
        if self.response_complete:
            client.exchange_done()
            return
        client.phase = _RESPONSE if self.response_started else _WAIT
        if not self.response_started:
            client.deadline.cancel()
        upstream = self.upstream
        if upstream is not None and not self.sent_end:
            self.sent_end = True
            upstream.transport.unregisterProducer()
            # A full host socket no longer holds back the client: what it
            # sends next is the next request, not this body.
            client.pauser.resume("backpressure")
            upstream.send_end()
        elif self.prefix_wanted:
            self.decide()  # the whole body is shorter than the prefix the rules want

    # -- response from the host ----------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self.client.send(_Data(data=data))
        if self.filling is not None and not self.filling.add(data):
            self.filling = None

    def upstream_head(self, conn: UpstreamConnection, head: Head) -> None:
        client = self.client
        status = head.status
        if status < 200:
            if status == 101 and self.upgrade is not None:
                self._switch_protocols(conn, head)
            elif client.h11.their_http_version == b"1.1":
                # RFC 9110 section 15.2: never a 1xx to an HTTP/1.0 client.
                # Its hop-by-hop headers are the host's, like a final response's.
                headers, _ = hdrs.response_headers(head.headers, client.listener.via, False)
                client.send(_InformationalResponse(
                    status_code=status, headers=hdrs.wrap(headers), reason=head.reason, _parsed=True,
                ))
            return
        self.response_started = True
        self.status = status
        headers, ambiguous = hdrs.response_headers(head.headers, client.listener.via, False)
        if ambiguous:
            conn.reusable = False
        if self.cached is not None:
            # Before the per-client headers below: those are not stored.
            self.filling = self.cached.admit(status, head.reason, headers, self.started)
        if self.set_cookie is not None:
            headers.append((b"set-cookie", b"set-cookie", self.set_cookie))
        if client.closing or client.requests >= client.config.max_requests_per_connection:
            # Tell the client this is the connection's last answer.
            headers.append((b"connection", b"connection", b"close"))
        if self.pool.config.affinity == "session":
            self._learn_session(headers)
        client.send(_Response(status_code=status, headers=hdrs.wrap(headers), reason=head.reason, _parsed=True))
        conn.pauser.on_backpressure = client.backpressure
        client.transport.registerProducer(conn.pauser, True)
        if self.request_complete:
            client.phase = _RESPONSE

    def upstream_end(self, conn: UpstreamConnection, trailers: list[hdrs.Field]) -> None:
        client = self.client
        if self.filling is not None:
            self._keep(trailers)
        if trailers and client.h11.their_http_version == b"1.1":
            # Only a chunked body carries trailers; an HTTP/1.0 client gets a
            # read-until-close body, and h11 refuses to send them.
            client.send(_EndOfMessage(headers=hdrs.wrap(trailers), _parsed=True))
        else:
            client.send(_EndOfMessage())
        self._response_done(conn)

    def _keep(self, trailers: list[hdrs.Field]) -> None:
        """The response is complete: the cache stores it."""
        filling = self.filling
        assert filling is not None
        self.filling = None
        if trailers:
            filling.drop()  # trailers are not stored, so neither is their response
        else:
            filling.finish()

    def _learn_session(self, headers: list[hdrs.Field]) -> None:
        """The application set or cleared its session cookie: follow it."""
        sessions = self.client.listener.sessions
        found = hdrs.set_cookie(headers, self.pool.config.session_cookie.encode())
        if found is None or sessions is None or self.host is None:
            return
        value, deleted = found
        session = value.decode("latin-1")
        if deleted:
            sessions.forget(self.pool.name, session)
        elif session:
            sessions.bind(self.pool, session, self.host)

    def _response_done(self, conn: UpstreamConnection) -> None:
        self.response_complete = True
        client = self.client
        client.transport.unregisterProducer()
        self.upstream = None
        conn.done()
        # Remembered before _finish_host lets go of the host.
        if self.pool.config.affinity == "client_ip" and self.host is not None:
            self.pool.remember_client_ip(client.client_ip, self.host)
        self._finish_host()
        self.logged(client.listener)
        if self.request_complete:
            client.exchange_done()
        else:
            # The host answered before reading the whole body: keep reading
            # and dropping it so the client sees our answer, not a reset.
            # The host's socket no longer limits how fast we read.
            conn.transport.unregisterProducer()
            client.pauser.resume("backpressure")
            client.phase = _BODY
            client.deadline.set(client.config.client_timeout)

    def _finish_host(self) -> None:
        host = self.host
        if host is not None:
            host.active_requests -= 1
            stats = host.stats
            stats.responses[self.status // 100] += 1
            stats.latency.observe(self.client.listener.reactor.seconds() - self.started)
            stats.bytes_in += self.bytes_sent
            stats.bytes_out += self.body_bytes
            self.host = None

    def _switch_protocols(self, conn: UpstreamConnection, head: Head) -> None:
        client = self.client
        self.status = 101
        headers, _ = hdrs.response_headers(head.headers, client.listener.via, True)
        client.send(_InformationalResponse(status_code=101, headers=hdrs.wrap(headers), reason=head.reason, _parsed=True))
        # The exchange is over; the tunnel's inactivity is timed by the
        # client connection's deadline, in both directions.
        self.response_complete = True
        conn.tunnel = True
        conn.deadline.cancel()
        conn.transport.registerProducer(client.pauser, True)
        client.transport.registerProducer(conn.pauser, True)
        client.start_tunnel(conn)
        data, conn.reader.trailing = conn.reader.trailing, b""
        if data:
            client.transport.write(data)
        self._finish_host()
        self.logged(client.listener)

    def tunnel_from_upstream(self, data: bytes) -> None:
        self.client.deadline.set(limits.TUNNEL_TIMEOUT)
        self.client.transport.write(data)

    def tunnel_closed(self) -> None:
        self.client.transport.loseConnection()

    # -- failures ------------------------------------------------------------------
    def upstream_error(self, conn: UpstreamConnection | None, kind: str, detail: str) -> None:
        host = self.host
        pool = self.pool
        keepalive_race = kind == "reset" and conn is not None and conn.uses > 1 and not conn.received_any
        if conn is not None:
            conn.exchange = None
        self.upstream = None
        if self.cancelled:
            return
        if host is not None:
            host.stats.errors[kind] = host.stats.errors.get(kind, 0) + 1
        if self.filling is not None:
            self.filling.drop()
            self.filling = None
        if self.response_started:
            # Too late for a clean answer: the client must see the failure.
            log.info("host {host} failed mid-response: {kind} {detail}", host=host, kind=kind, detail=detail)
            self._finish_host()
            self.logged(self.client.listener)
            self.client.exchange = None
            self.client.transport.abortConnection()
            return
        self._undispatch()
        self.host = None
        if kind in _HOST_FAILURES and host is not None and not keepalive_race:
            pool.mark_failed(host, f"{kind}: {detail}")
        if keepalive_race and host is not None and self.tried:
            self.tried.remove(host)  # the host may take the retry on a fresh connection
        if self._retryable(kind) and len(self.tried) <= pool.config.retries:
            if host is not None:
                host.stats.retries += 1
            retry = self._classify()
            if retry is not None:
                self._dispatch(retry)
                return
        self.status = _STATUS_FOR_FAILURE.get(kind, 502)
        log.info(
            "{pool}: answering {status} after {kind} from {host}: {detail}",
            pool=pool.name, status=self.status, kind=kind, host=host, detail=detail,
        )
        if self.pending is not None:
            self.client.pauser.resume("connecting")
        self.client.local_response(self.status, f"{kind}\n".encode())

    def _retryable(self, kind: str) -> bool:
        if kind in ("connect_refused", "connect_timeout", "queue_full", "queue_timeout"):
            return True  # nothing reached the host; buffered body bytes are still here
        if kind in ("reset", "timeout", "bad_response"):
            return self.request.method in IDEMPOTENT and not self.body_forwarded
        return False

    def abandon(self) -> None:
        """The client side failed (protocol error, body limit): drop the backend side."""
        self.cancelled = True
        if self.routing is not None:
            self.routing.cancel()
        if self.filling is not None:
            self.filling.drop()
            self.filling = None
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.discard()
        self._undispatch()
        self.host = None

    def client_gone(self) -> None:
        if self.response_complete:
            return
        if self.status == 0:
            self.status = 499  # nginx's "client closed request"
        self.abandon()
        self.logged(self.client.listener)

    def logged(self, listener: Listener) -> None:
        if listener.access_log is not None:
            listener.access_log(self, listener.reactor.seconds() - self.started)
