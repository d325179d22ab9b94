# -*- test-case-name: tests.test_health_udp -*-
"""The one UDP socket of a balancing unit's or a host agent's health link.

This is the thin I/O edge of the health protocol: :class:`HealthSocket` turns
outgoing messages into authenticated datagrams (:class:`~nlbproxy.health.codec.Codec`)
and incoming datagrams back into envelopes, refusing replays
(:class:`~nlbproxy.health.codec.ReplayGuard`), then hands each accepted
envelope to ``on_message``.  All protocol decisions live in the callee: the
unit's :class:`~nlbproxy.health.cache.ConsolidatedCache` or the agent.

Sending never raises for what the network does: UDP is lossy by contract and
the protocol above recovers from loss (heartbeats, snapshots), so a full send
buffer (``EWOULDBLOCK``/``ENOBUFS``), an ICMP refusal surfacing as
``ECONNREFUSED``, or an address the socket cannot reach is counted in
``stats["send_error"]`` and the datagram is lost like any other.  A message
that does not encode (a value out of range, too big for one datagram) is the
caller's bug and does raise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Protocol

from twisted.internet.error import InvalidAddressError, MessageLengthError
from twisted.internet.protocol import DatagramProtocol

from nlbproxy.health.codec import Codec, ReplayGuard
from nlbproxy.health.messages import Envelope, Kind, Message

__all__ = ["MAX_SEQ", "Clock", "HealthSocket", "OnMessage"]

#: Sequence numbers are u64 on the wire; an epoch that would pass this many
#: datagrams starts a new epoch instead of wrapping (it never happens: 2**64
#: datagrams at a million per second last half a million years).
MAX_SEQ = (1 << 64) - 1

#: Receives the (ip, port) a datagram came from and its accepted envelope.
OnMessage = Callable[[tuple[str, int], Envelope], None]


class Clock(Protocol):
    """The part of a reactor the socket needs: wall-clock seconds."""

    def seconds(self) -> float: ...


class HealthSocket(DatagramProtocol):
    """Sends and receives the health messages of one node (unit or agent).

    ``sender_id`` is this node's id (:func:`~nlbproxy.health.messages.node_id`
    of its name) and ``epoch`` its boot epoch: milliseconds of the clock at
    start unless given, so a restarted node's epoch is larger and peers know it
    restarted.  ``accept`` names the kinds this side takes
    (:data:`~nlbproxy.health.codec.SENDER_AGENT_KINDS` on a unit,
    :data:`~nlbproxy.health.codec.SENDER_UNIT_KINDS` on an agent).

    Counters: ``sent`` and ``received`` count datagrams written and envelopes
    delivered to ``on_message``; :attr:`drops` counts refused datagrams by
    reason (the codec's reasons, ``replay`` and ``old_epoch``);
    ``stats["send_error"]`` counts datagrams the kernel would not take, with
    the last such error in ``last_send_error``.
    """

    def __init__(
        self,
        codec: Codec,
        guard: ReplayGuard,
        sender_id: int,
        accept: frozenset[Kind],
        clock: Clock,
        on_message: OnMessage,
        epoch: int | None = None,
    ) -> None:
        self.codec = codec
        self.guard = guard
        self.sender_id = sender_id
        self.accept = accept
        self.clock = clock
        self.on_message = on_message
        self.epoch = int(clock.seconds() * 1000) if epoch is None else epoch
        self._seq = 0
        self.sent = 0
        self.received = 0
        self.stats: Counter[str] = Counter()
        self.last_send_error = ""

    @property
    def drops(self) -> Counter[str]:
        """Refused datagrams by reason: the codec's and the replay guard's, merged."""
        merged: Counter[str] = Counter()
        merged.update(self.codec.drops)
        merged.update(self.guard.drops)
        return merged

    def _envelope(self, message: Message) -> Envelope:
        if self._seq >= MAX_SEQ:
            # Unreachable in practice; a larger epoch keeps peers' replay
            # windows sound without wrapping the sequence.
            self.epoch += 1
            self._seq = 0
        self._seq += 1
        return Envelope(self.sender_id, self.epoch, self._seq, int(self.clock.seconds() * 1000), message)

    def send(self, address: tuple[str, int], message: Message) -> None:
        """Sends ``message`` to ``address`` ("ip", port) in one datagram."""
        datagram = self.codec.encode(self._envelope(message))
        if self.transport is None:
            self._send_failed("not listening")
            return
        try:
            self.transport.write(datagram, address)
        except (OSError, MessageLengthError, InvalidAddressError) as e:
            self._send_failed(f"{address[0]}:{address[1]}: {e}")
            return
        self.sent += 1

    def _send_failed(self, why: str) -> None:
        self.stats["send_error"] += 1
        self.last_send_error = why

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        envelope = self.codec.decode(datagram, self.accept)
        if envelope is None or not self.guard.accept(envelope):
            return
        self.received += 1
        # IPv6 sockets may report (host, port, flowinfo, scope_id).
        self.on_message((addr[0], addr[1]), envelope)
