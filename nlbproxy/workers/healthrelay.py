# -*- test-case-name: tests.test_workers_relay -*-
"""The health link between a supervisor and its workers.

Agents know the unit by one ``health`` address and expect one sender back:
one node id, one boot epoch, one sequence.  The supervisor owns that socket
(:class:`PublicHealth`).  Each agent datagram it accepts (MAC, freshness,
replay: the codec and guard of any unit) is relayed byte for byte to every
worker, framed with the agent's address (:func:`frame`), over loopback UDP
(:class:`WorkerLink`).  Each worker checks the MAC again (the loopback link
is no more trusted than the network) and feeds its own consolidated cache and
session receiver, exactly as a single unit would, so every worker's view of
the farm follows the same messages.

What a worker answers (snapshot requests, postulate-wrong, session acks)
goes the other way: the worker's health socket encodes it as usual, the
:class:`RelayedHealth` shim frames it with the agent's address and writes it
to the supervisor, which checks it, takes the message out and sends it from
the public socket with the unit's own envelope.  Nothing is deduplicated:
each worker asks for its own snapshot with its own nonce, since only the
answer to its nonce repairs its copy (the agent answers one request per
0.1 s per address, so the k-th worker's retry, 0.3 s later, gets its turn);
duplicated acks and postulate-wrongs are harmless to the agent.

Datagrams for a worker that is restarting wait in its socket, which the
supervisor keeps open; the codec's freshness check drops the stale ones.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from nlbproxy.health.codec import SENDER_UNIT_KINDS, Codec
from nlbproxy.health.udp import HealthSocket

Address = tuple[str, int]

# ip length u8, port u16, then the ip in ASCII and the datagram.
_HEAD = struct.Struct("!BH")


def frame(address: Address, datagram: bytes) -> bytes:
    """``datagram`` with the agent address it came from or goes to."""
    ip = address[0].encode("ascii")
    return _HEAD.pack(len(ip), address[1]) + ip + datagram


def unframe(data: bytes) -> tuple[Address, bytes] | None:
    """The address and datagram of a frame, or None for a malformed one."""
    if len(data) < _HEAD.size:
        return None
    length, port = _HEAD.unpack_from(data)
    end = _HEAD.size + length
    if length == 0 or len(data) <= end:
        return None
    try:
        ip = data[_HEAD.size:end].decode("ascii")
    except UnicodeDecodeError:
        return None
    return (ip, port), data[end:]


def from_peer(drops: Counter[str], data: bytes, addr: tuple[str, int], known: bool) -> tuple[Address, bytes] | None:
    """The address and datagram of a frame from a relay peer; None (and the
    drop counted) when it came from a stranger or is malformed."""
    if not known:
        drops["stranger"] += 1
        return None
    framed = unframe(data)
    if framed is None:
        drops["malformed"] += 1
    return framed


class PublicHealth(HealthSocket):
    """The unit's public health socket in a supervisor: accepts, relays, answers.

    ``send`` (inherited) is how workers' answers leave as the unit's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relay: Callable[[Address, bytes], None] = lambda address, datagram: None

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        envelope = self.codec.decode(datagram, self.accept)
        if envelope is None or not self.guard.accept(envelope):
            return
        self.received += 1
        self.relay((addr[0], addr[1]), datagram)


class WorkerLink(DatagramProtocol):
    """The supervisor's end of the loopback links to its workers.

    ``workers`` are the addresses of the workers' link sockets (created by the
    supervisor, so nothing else on the machine can own them); frames from any
    other address are dropped and counted, as are frames whose datagram does
    not authenticate with the farm secret.
    """

    def __init__(self, public: PublicHealth, codec: Codec, workers: Iterable[Address]) -> None:
        self.public = public
        self.codec = codec
        self.workers = list(workers)
        self.relayed = 0
        self.answered = 0
        self.drops: Counter[str] = Counter()
        public.relay = self.relay

    def relay(self, address: Address, datagram: bytes) -> None:
        if self.transport is None:
            return
        data = frame(address, datagram)
        for worker in self.workers:
            try:
                self.transport.write(data, worker)
            except OSError:
                # A worker's full socket (it is restarting or stuck) loses
                # the datagram like the network would; heartbeats repair it.
                self.drops["worker_full"] += 1
            else:
                self.relayed += 1

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        framed = from_peer(self.drops, data, addr, (addr[0], addr[1]) in self.workers)
        if framed is None:
            return
        address, datagram = framed
        envelope = self.codec.decode(datagram, SENDER_UNIT_KINDS)
        if envelope is None:
            self.drops["unauthenticated"] += 1
            return
        self.answered += 1
        self.public.send(address, envelope.message)


class _Shim:
    """The transport a worker's HealthSocket writes to: frames go to the supervisor."""

    def __init__(self, outer: Any, supervisor: Address) -> None:
        self.outer = outer
        self.supervisor = supervisor

    def write(self, datagram: bytes, addr: Address) -> None:
        self.outer.write(frame(addr, datagram), self.supervisor)

    def getHost(self) -> Any:
        return self.outer.getHost()


class RelayedHealth(DatagramProtocol):
    """A worker's end of its link: unframes for, and frames from, its HealthSocket."""

    def __init__(self, inner: HealthSocket, supervisor: Address) -> None:
        self.inner = inner
        self.supervisor = supervisor
        self.drops: Counter[str] = Counter()

    def startProtocol(self) -> None:
        self.inner.transport = _Shim(self.transport, self.supervisor)  # type: ignore[assignment]

    def stopProtocol(self) -> None:
        self.inner.transport = None

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        framed = from_peer(self.drops, data, addr, (addr[0], addr[1]) == self.supervisor)
        if framed is None:
            return
        address, datagram = framed
        self.inner.datagramReceived(datagram, address)


class RelayLink:
    """What a worker's UnitHealth adopts instead of binding the public address."""

    def __init__(self, fd: int, family: str, supervisor: Address) -> None:
        self.fd = fd
        self.family = getattr(socket, "AF_" + family)
        self.supervisor = supervisor

    def adopt(self, reactor: Any, health_socket: HealthSocket) -> Any:
        return reactor.adoptDatagramPort(self.fd, self.family, RelayedHealth(health_socket, self.supervisor))
