# -*- test-case-name: tests.test_handoff_channel -*-
"""The handoff channel's I/O: a Twisted protocol around :class:`~nlbproxy.handoff.wire.Channel`.

:class:`ChannelProtocol` is both ends; the wire module decides everything.
The unit keeps one :class:`AgentLink` per host agent: it dials the agent on
first use, keeps the connection, matches RESULTs to their HANDOFFs, and
fails a handoff at once (:class:`AgentUnavailable`) when the agent cannot be
reached, so the unit can fall back to proxying the connection itself.  The
agent side is a factory of :class:`ChannelProtocol` whose ``on_message``
handles HANDOFF and COMMIT (:mod:`nlbproxy.agent.handoff`).

A connection that breaks the protocol (bad proof, bad mac, garbage) or does
not finish the handshake within :data:`HANDSHAKE_TIMEOUT` is aborted and the
reason counted in the owner's ``stats``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy.handoff.tunnel import Mapping
from nlbproxy.handoff.wire import Channel, ChannelError, Commit, Ended, Handoff, Message, Result

__all__ = [
    "HANDOFF_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "MAX_PENDING",
    "AgentLink",
    "AgentUnavailable",
    "ChannelProtocol",
]

log = Logger()

#: Seconds for a new channel connection to authenticate.
HANDSHAKE_TIMEOUT = 5.0
#: Seconds the unit waits for an agent's RESULT; past it the handoff fails
#: (the client is reset: the connection may already live on the host).
HANDOFF_TIMEOUT = 2.0
#: Handoffs in flight to one agent; more fail at once (fall back to proxying).
MAX_PENDING = 1024


class AgentUnavailable(Exception):
    """The agent could not be reached; nothing was sent, the unit may proxy."""


class ChannelProtocol(Protocol):
    """One handoff channel connection; ``on_message`` gets every message."""

    # The TCP transport: abortConnection, which ITransport lacks.
    transport: Any

    def __init__(self, role: str, secret: bytes, reactor: Any, stats: Counter[str],
                 on_message: Callable[[ChannelProtocol, Message], None],
                 on_ready: Callable[[ChannelProtocol], None] | None = None,
                 on_lost: Callable[[ChannelProtocol], None] | None = None) -> None:
        self.channel = Channel(role, secret)
        self.reactor = reactor
        self.stats = stats
        self.on_message = on_message
        self.on_ready = on_ready
        self.on_lost = on_lost
        self._timeout: Any = None
        self.connected_ = False

    def connectionMade(self) -> None:
        self.connected_ = True
        # Messages are small and each is on a client's critical path: with
        # Nagle a HANDOFF written while the previous COMMIT is unacknowledged
        # would wait for the agent's delayed ACK (up to 40 ms).
        self.transport.setTcpNoDelay(True)
        self._timeout = self.reactor.callLater(HANDSHAKE_TIMEOUT, self._handshake_timed_out)
        if self.channel.role == "unit":
            self.transport.write(self.channel.hello())

    def _handshake_timed_out(self) -> None:
        self._timeout = None
        self.stats["handshake_timeout"] += 1
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        was_ready = self.channel.ready
        try:
            reply, messages = self.channel.receive(data)
        except ChannelError as exc:
            self.stats[exc.reason] += 1
            log.warn("handoff channel from {peer} dropped: {why}", peer=self.transport.getPeer(), why=exc)
            self.transport.abortConnection()
            return
        if reply:
            self.transport.write(reply)
        if self.channel.ready and not was_ready:
            if self._timeout is not None:
                self._timeout.cancel()
                self._timeout = None
            if self.on_ready is not None:
                self.on_ready(self)
        for message in messages:
            if not self.connected_:
                break
            self.on_message(self, message)

    def send(self, message: Message) -> None:
        self.transport.write(self.channel.send(message))
        # Twisted writes on the reactor's next turn, after whatever the
        # caller does next (the agent starts a delivery thread, the unit
        # commits a route): each message is on a client's critical path, so
        # it goes now.  A write error stays buffered, and the reactor's own
        # doWrite then meets it and closes the connection.
        transport = self.transport
        if self.connected_ and hasattr(transport, "doWrite") and not transport.disconnecting:
            transport.doWrite()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        if self.on_lost is not None:
            self.on_lost(self)


class AgentLink:
    """The unit's channel to one host agent at ``address`` ("ip", port)."""

    def __init__(self, address: tuple[str, int], secret: bytes, reactor: Any,
                 on_ended: Callable[[Ended], None], stats: Counter[str] | None = None) -> None:
        self.address = address
        self.secret = secret
        self.reactor = reactor
        self.on_ended = on_ended
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.protocol: ChannelProtocol | None = None
        self._waiting: list[defer.Deferred[ChannelProtocol]] = []
        self._pending: dict[int, defer.Deferred[Result]] = {}
        self._next_id = 1

    # -- connection ------------------------------------------------------------------
    def connect(self) -> defer.Deferred[ChannelProtocol]:
        """The authenticated connection, dialed if there is none."""
        if self.protocol is not None:
            return defer.succeed(self.protocol)
        waiting: defer.Deferred[ChannelProtocol] = defer.Deferred()
        self._waiting.append(waiting)
        if len(self._waiting) == 1:
            host, port = self.address
            endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
            endpoint = endpoint_type(self.reactor, host, port, timeout=int(HANDSHAKE_TIMEOUT))
            factory = Factory.forProtocol(lambda: ChannelProtocol(
                "unit", self.secret, self.reactor, self.stats, self._message, self._ready, self._lost))
            endpoint.connect(factory).addErrback(self._failed)
        return waiting

    def _ready(self, protocol: ChannelProtocol) -> None:
        self.protocol = protocol
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(protocol)

    def _failed(self, reason: Failure) -> None:
        self.stats["connect_failed"] += 1
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.errback(Failure(AgentUnavailable(f"agent {self.address}: {reason.getErrorMessage()}")))

    def _lost(self, protocol: ChannelProtocol) -> None:
        if self.protocol is protocol:
            self.protocol = None
        elif self._waiting:
            # Lost before the handshake completed (a refused proof, a timeout).
            self._failed(Failure(AgentUnavailable("the channel closed during the handshake")))
            return
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.errback(Failure(ConnectionError(f"channel to agent {self.address} lost")))

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.transport.loseConnection()

    # -- calls ---------------------------------------------------------------------------
    def handoff(self, pool: str, endpoint: str, blob: bytes,
                tunnel: Mapping | None = None) -> tuple[int, defer.Deferred[Result]]:
        """Send a HANDOFF on the live connection; (id, Deferred of the RESULT).
        ``tunnel`` goes with it when the unit reaches the host through the
        flow-id tunnel.

        Needs :attr:`protocol` (call :meth:`connect` first): the unit must
        know the agent is there before it fences and dumps the connection.
        """
        if self.protocol is None:
            raise AgentUnavailable(f"no channel to agent {self.address}")
        if len(self._pending) >= MAX_PENDING:
            raise AgentUnavailable(f"{MAX_PENDING} handoffs in flight to agent {self.address}")
        id_ = self._next_id
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        waiting: defer.Deferred[Result] = defer.Deferred()
        self._pending[id_] = waiting
        self.protocol.send(Handoff(id_, pool, endpoint, blob, tunnel))
        waiting.addTimeout(HANDOFF_TIMEOUT, self.reactor, onTimeoutCancel=self._timed_out(id_))
        return id_, waiting

    def _timed_out(self, id_: int) -> Callable[[Any, float], Any]:
        def forget(result: Any, timeout: float) -> Any:
            self._pending.pop(id_, None)
            self.stats["handoff_timeout"] += 1
            raise defer.TimeoutError(f"agent {self.address} did not answer within {timeout}s")
        return forget

    def commit(self, id_: int) -> None:
        if self.protocol is not None:
            self.protocol.send(Commit(id_))

    def _message(self, protocol: ChannelProtocol, message: Message) -> None:
        if isinstance(message, Result):
            waiting = self._pending.pop(message.id, None)
            if waiting is None:
                self.stats["unknown_result"] += 1
                return
            waiting.callback(message)
        elif isinstance(message, Ended):
            self.on_ended(message)
