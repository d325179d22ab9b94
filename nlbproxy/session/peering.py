# -*- test-case-name: tests.test_dam_peering -*-
"""The DAM's transport between balancing units: AMP over TCP, authenticated.

:class:`DamService` is the I/O edge of :class:`~nlbproxy.session.dam.DAM`.
It listens on the unit's ``dam`` endpoint, keeps one connection to every
other unit (dialing the ``peers`` addresses, reconnecting with backoff),
tells the DAM which peers are connected and authenticated
(:meth:`DAM.set_peers`), carries the DAM's calls to them and feeds what they
send to :meth:`DAM.receive`.  Every protocol decision is the DAM's; this
module only moves calls and proves who is at the other end.

Wire
----
One AMP command per DAM call (declared below, apart from their handlers),
plus two for the handshake.  Atoms travel as the DAM's atom blobs
(:func:`~nlbproxy.session.dam.encode_chunks`): AMP caps a value at 64 KiB,
so a batch larger than that becomes several AddAtoms (or SyncBatch) commands,
only the last SyncBatch of a batch carrying ``last``.  The DAM calls are
one-way (``requiresAnswer = False``): the DAM's replies are calls of their
own (ReturnAtom answers QueryAtom), and TCP keeps each link in order.

Handshake
---------
Both ends prove they hold the farm's shared secret (``secret_file``), and the
initiator learns the responder's unit name, by an HMAC-SHA256
challenge/response with a fresh random challenge from each side::

    initiator -> Hello(version, unit=I, challenge=cI)
    responder <- (unit=R, challenge=cR, proof=HMAC(secret, "responder" I R cI cR))
    initiator -> Prove(proof=HMAC(secret, "initiator" I R cI cR))
    responder <- ()

The role label keeps one side's proof from being reflected as the other's;
the two challenges keep a recorded handshake from being replayed.  A peer is
a unit *name*, the one it proved with: calls are routed by name, not by
address.  Anything but Hello and Prove before the handshake completes, a
wrong proof, another protocol version, or no completion within
:data:`HANDSHAKE_TIMEOUT` drops the connection and is counted in
:attr:`DamService.stats`.

Every box after the handshake is authenticated too, so that an attacker on
the path can neither inject, alter, replay, reorder nor drop a DAM call
unnoticed: each direction has its own key derived from the secret, both
names and both challenges (:func:`session_key`), and each box carries
``_mac`` = HMAC-SHA256(key, sequence number || the box's other keys and
values, sorted and length-prefixed), truncated to :data:`MAC_SIZE` bytes.
The sequence numbers are implicit (0, 1, 2 ... per direction; TCP keeps the
order), so any box added or lost breaks every MAC after it.  A box with a
missing or wrong MAC drops the connection and is counted (``bad_mac``); the
DAM resyncs with the peer when it comes back.  A side authenticates what it
sends once it is ``ready``, and requires it from the first box the other
side sends after it became ready: the initiator after the answer to Prove,
the responder after it wrote that answer.  (Confidentiality is not a goal:
session keys and host addresses are not secrets worth a TLS layer here; use
a TLS endpoint string for ``dam`` if they are.)

Connections
-----------
Every unit dials every address in ``peers`` and accepts connections on its
endpoint, so two units that list each other meet twice.  The connection
dialed by the unit with the smaller name is kept on both sides (both apply
the same rule, so they agree without talking); the other is closed and its
dialer waits until that peer disconnects.  Replacing a connection that was
already in use counts as the peer leaving and joining again, which makes the
DAM resync with it: calls in flight on the closed connection may be lost.

Flow control: each connection registers itself as its transport's producer.
While the transport is paused (its send buffer is full) calls wait in the
connection's queue, up to :data:`MAX_QUEUED_BYTES`; past that the peer is not
keeping up, the connection is dropped and counted, and the DAM resyncs when
it comes back.  Calls for a peer with no connection wait in a bounded buffer
(:data:`MAX_BUFFERED_CALLS`) and are sent when it connects; more are dropped
and counted (the resync on connect repairs what they carried).

Readiness: :meth:`DamService.whenReady` fires once every peer address has
been tried once and the DAM has received the last SyncBatch of every
connected peer -- a restarting unit waits for it before it serves -- or after
:data:`RESYNC_DEADLINE`, whichever is first.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from nlbproxy.session.dam import (
    DAM,
    MAX_KEY,
    MAX_KIND,
    MAX_NAME,
    AddAtom,
    AddAtoms,
    Atom,
    Call,
    DeleteAtom,
    QueryAtom,
    ReturnAtom,
    SyncBatch,
    SyncRequest,
    WireError,
    decode_atoms,
    encode_atoms,
    encode_chunks,
)

__all__ = [
    "CHALLENGE_SIZE",
    "CONNECT_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "MAX_BUFFERED_CALLS",
    "MAX_CONNECTIONS",
    "MAX_QUEUED_BYTES",
    "PROTOCOL_VERSION",
    "RECONNECT_FACTOR",
    "RECONNECT_INITIAL",
    "RECONNECT_MAX",
    "RESYNC_DEADLINE",
    "TICK",
    "AddAtomsCommand",
    "DamService",
    "DeleteAtomCommand",
    "HandshakeRefused",
    "Hello",
    "PeerProtocol",
    "Prove",
    "QueryAtomCommand",
    "ReturnAtomCommand",
    "SyncBatchCommand",
    "SyncRequestCommand",
    "parse_peer",
    "proof",
]

log = Logger()

# --- named limits ---------------------------------------------------------------

#: Version of this handshake and command set; a peer with another is refused.
#: (2: every box after the handshake carries a MAC.)
PROTOCOL_VERSION = 2
#: Bytes of the truncated HMAC-SHA256 on each box after the handshake.
MAC_SIZE = 16
#: Bytes of each side's random challenge.
CHALLENGE_SIZE = 32
#: From TCP connect until both sides proved the secret; then the connection is dropped.
HANDSHAKE_TIMEOUT = 5.0
#: A dial attempt that has not connected by then fails (and is retried).
CONNECT_TIMEOUT = 5.0
#: Delay before redialing a peer after a failure, doubled (x RECONNECT_FACTOR)
#: per failure up to RECONNECT_MAX, each drawn between half and all of it so
#: that a farm restarting at once does not redial in lockstep.
RECONNECT_INITIAL = 0.1
RECONNECT_FACTOR = 2.0
RECONNECT_MAX = 5.0
#: Calls held for a peer that has no connection; more are dropped and counted.
MAX_BUFFERED_CALLS = 10_000
#: Names calls may be buffered for (a bound on the buffers' number).
MAX_BUFFERED_PEERS = 64
#: Bytes of calls waiting while one connection's transport is paused; more and
#: the peer is dropped (it resyncs when it reconnects).
MAX_QUEUED_BYTES = 32 * 1024 * 1024
#: Open connections, authenticated or not; more are refused at accept.
MAX_CONNECTIONS = 256
#: Seconds between DAM ticks (query escalation and timeouts, zombie expiry).
TICK = 0.02
#: whenReady() fires after this many seconds even if peers are still syncing.
RESYNC_DEADLINE = 10.0

_PROOF_LABEL = b"nlbproxy-dam-v1"
_KEY_LABEL = b"nlbproxy-dam-v2-box-key"
_MAC_KEY = b"_mac"
_CALL_OVERHEAD = 64  # bytes of AMP framing counted per queued command


def _prefixed(parts: Iterable[bytes]) -> bytes:
    """Each part length-prefixed, so that no two lists of parts collide."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def proof(secret: bytes, role: bytes, initiator: str, responder: str, c_init: bytes, c_resp: bytes) -> bytes:
    """HMAC-SHA256 by ``role`` (b"initiator" or b"responder") over both names
    and both challenges, each length-prefixed so no two inputs collide."""
    parts = [_PROOF_LABEL, role, initiator.encode(), responder.encode(), c_init, c_resp]
    message = b"".join(len(part).to_bytes(2, "big") + part for part in parts)
    return hmac.new(secret, message, hashlib.sha256).digest()


def session_key(secret: bytes, sender: bytes, initiator: str, responder: str, c_init: bytes, c_resp: bytes) -> bytes:
    """The key for boxes sent by ``sender`` (b"initiator" or b"responder") on one connection."""
    parts = [_KEY_LABEL, sender, initiator.encode(), responder.encode(), c_init, c_resp]
    return hmac.new(secret, _prefixed(parts), hashlib.sha256).digest()


def box_mac(key: bytes, sequence: int, box: dict[bytes, bytes]) -> bytes:
    """The MAC of the ``sequence``-th box sent with ``key`` (``_mac`` itself left out)."""
    items = sorted((k, v) for k, v in box.items() if k != _MAC_KEY)
    message = sequence.to_bytes(8, "big") + _prefixed(part for item in items for part in item)
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_SIZE]


def parse_peer(peer: str | tuple[str, int]) -> tuple[str, int]:
    """``"ip:port"`` or ``"[v6]:port"`` (or a (host, port) pair) as (host, port)."""
    if isinstance(peer, tuple):
        host, port = peer
    else:
        host, sep, port_text = peer.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"peer {peer!r} is not ip:port")
        host, port = host.strip("[]"), int(port_text)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"peer {peer!r}: port out of range")
    return host, port


# --- wire: AMP commands -----------------------------------------------------------


class HandshakeRefused(Exception):
    """The handshake cannot go on (version, proof, name); the connection closes."""


class Hello(amp.Command):
    """The initiator's name and challenge; the answer proves the responder."""

    commandName = b"Hello"
    arguments = [(b"version", amp.Integer()), (b"unit", amp.Unicode()), (b"challenge", amp.String())]
    response = [(b"unit", amp.Unicode()), (b"challenge", amp.String()), (b"proof", amp.String())]
    fatalErrors = {HandshakeRefused: b"REFUSED"}


class Prove(amp.Command):
    """The initiator's proof; an empty answer means both are authenticated."""

    commandName = b"Prove"
    arguments = [(b"proof", amp.String())]
    response = []
    fatalErrors = {HandshakeRefused: b"REFUSED"}


class AddAtomsCommand(amp.Command):
    """AddAtom / AddAtoms: an atom blob (zombies are deletes)."""

    commandName = b"AddAtoms"
    arguments = [(b"atoms", amp.String()), (b"refresh", amp.Boolean())]
    requiresAnswer = False


class DeleteAtomCommand(amp.Command):
    commandName = b"DeleteAtom"
    arguments = [(b"key", amp.Unicode()), (b"counter", amp.Integer()), (b"origin", amp.Unicode()),
                 (b"kind", amp.Unicode())]
    requiresAnswer = False


class QueryAtomCommand(amp.Command):
    commandName = b"QueryAtom"
    arguments = [(b"key", amp.Unicode()), (b"qid", amp.Integer())]
    requiresAnswer = False


class ReturnAtomCommand(amp.Command):
    """The answer to a QueryAtom: a blob of zero atoms (not found) or one."""

    commandName = b"ReturnAtom"
    arguments = [(b"qid", amp.Integer()), (b"atoms", amp.String())]
    requiresAnswer = False


class SyncRequestCommand(amp.Command):
    commandName = b"SyncRequest"
    arguments = []
    requiresAnswer = False


class SyncBatchCommand(amp.Command):
    commandName = b"SyncBatch"
    arguments = [(b"atoms", amp.String()), (b"last", amp.Boolean()), (b"counter", amp.Integer())]
    requiresAnswer = False


_HANDSHAKE = frozenset({Hello.commandName, Prove.commandName})
_U64 = 1 << 64

Outgoing = list[tuple[type[amp.Command], dict[str, Any]]]


def _out_add(call: AddAtom) -> Outgoing:
    return [(AddAtomsCommand, {"atoms": encode_atoms((call.atom,)), "refresh": call.refresh})]


def _out_adds(call: AddAtoms) -> Outgoing:
    return [(AddAtomsCommand, {"atoms": blob, "refresh": call.refresh}) for blob in encode_chunks(call.atoms)]


def _out_delete(call: DeleteAtom) -> Outgoing:
    counter, origin = call.version
    return [(DeleteAtomCommand, {"key": call.key, "counter": counter, "origin": origin, "kind": call.kind})]


def _out_query(call: QueryAtom) -> Outgoing:
    return [(QueryAtomCommand, {"key": call.key, "qid": call.qid})]


def _out_return(call: ReturnAtom) -> Outgoing:
    atoms = () if call.atom is None else (call.atom,)
    return [(ReturnAtomCommand, {"qid": call.qid, "atoms": encode_atoms(atoms)})]


def _out_sync_request(call: SyncRequest) -> Outgoing:
    return [(SyncRequestCommand, {})]


def _out_sync_batch(call: SyncBatch) -> Outgoing:
    blobs = encode_chunks(call.atoms)
    final = len(blobs) - 1
    return [
        (SyncBatchCommand, {"atoms": blob, "last": call.last and i == final,
                            "counter": call.counter if i == final else 0})
        for i, blob in enumerate(blobs)
    ]


#: How each DAM call becomes AMP commands.
_OUTGOING: dict[type, Callable[[Any], Outgoing]] = {
    AddAtom: _out_add,
    AddAtoms: _out_adds,
    DeleteAtom: _out_delete,
    QueryAtom: _out_query,
    ReturnAtom: _out_return,
    SyncRequest: _out_sync_request,
    SyncBatch: _out_sync_batch,
}


def _size(kwargs: dict[str, Any]) -> int:
    return _CALL_OVERHEAD + sum(len(v) for v in kwargs.values() if isinstance(v, (bytes, str)))


class _Malformed(Exception):
    """A call from an authenticated peer that does not parse: the peer's bug."""


# --- one connection ----------------------------------------------------------------------


@implementer(IPushProducer)
class PeerProtocol(amp.AMP):
    """One connection to another unit: the handshake, then DAM calls both ways.

    ``stage`` (AMP's parser owns ``state``): ``new`` (connected, nothing
    said), ``hello`` (Hello sent or answered: waiting for the other side's
    proof), ``proved`` (responder: answer to Prove on its way), ``ready``
    (both proved; DAM calls flow), ``closed``.  Only Hello (responder, in
    ``new``) and Prove (responder, in ``hello``) are accepted before
    ``ready``.
    """

    def __init__(self, owner: DamService, initiator: bool, dialer: _Dialer | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.initiator = initiator
        self.dialer = dialer
        #: The peer's unit name: claimed in Hello, proven once ``ready``.
        self.peer: str | None = None
        self.stage = "new"
        #: Closed because the other connection to the same peer was kept.
        self.superseded = False
        #: Closed because it reached this very unit (a peers list naming itself).
        self.to_self = False
        self._challenge = b""
        self._expected = b""
        #: Per-direction box keys and sequence numbers, set by the handshake.
        self._send_key = b""
        self._recv_key = b""
        self._send_seq = 0
        self._recv_seq = 0
        self._timer: Any = None
        self._paused = False
        self._queue: deque[tuple[type[amp.Command], dict[str, Any], int]] = deque()
        self._queued = 0
        self._aborting = False
        self.closed: defer.Deferred[None] = defer.Deferred()

    # --- connection events ---------------------------------------------------

    @property
    def _tcp(self) -> Any:
        # The TCP transport: IConsumer and abortConnection, which ITransport lacks.
        return self.transport

    def connectionMade(self) -> None:
        super().connectionMade()
        # Calls are small and latency matters (a session announced on one
        # unit must route on every unit within 100 ms): no Nagle delay.
        # Batching happens above, one AddAtoms per peer per reactor turn.
        with contextlib.suppress(AttributeError, OSError):
            self._tcp.setTcpNoDelay(True)
        self._tcp.registerProducer(self, True)
        self._timer = self.owner.reactor.callLater(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        if self.initiator:
            self.stage = "hello"
            self._challenge = os.urandom(CHALLENGE_SIZE)
            answer = self.callRemote(Hello, version=PROTOCOL_VERSION, unit=self.owner.me, challenge=self._challenge)
            answer.addCallbacks(self._hello_answered, self._handshake_failed)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.stage != "ready":
            self.owner.stats["handshake_incomplete"] += 1
        self.stage = "closed"
        self._queue.clear()
        super().connectionLost(reason)
        self.owner._lost(self)
        self.closed.callback(None)

    def abort(self, why: str) -> None:
        """Drop the connection at once and count ``why`` (the first reason only)."""
        if self._aborting or self.stage == "closed":
            return
        self._aborting = True
        self.owner.stats[why] += 1
        log.info("dam: dropping connection to {peer} ({why})", peer=self.describe(), why=why)
        if self.transport is not None:
            self._tcp.abortConnection()

    def describe(self) -> str:
        address = self.transport.getPeer() if self.transport is not None else None
        return f"{self.peer or '?'} at {getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.stage != "ready":
            self.abort("handshake_timeout")

    # --- the handshake: initiator side ----------------------------------------------------

    def _hello_answered(self, answer: dict[str, Any]) -> None:
        if self.stage != "hello":
            return
        unit, challenge, their_proof = answer["unit"], answer["challenge"], answer["proof"]
        if not _valid_name(unit) or len(challenge) != CHALLENGE_SIZE:
            self.abort("handshake_malformed")
            return
        expected = proof(self.owner.secret, b"responder", self.owner.me, unit, self._challenge, challenge)
        if not hmac.compare_digest(expected, their_proof):
            self.abort("auth_failed")
            return
        if unit == self.owner.me:
            self.to_self = True
            self.abort("self_connection")
            return
        self.peer = unit
        secret, me = self.owner.secret, self.owner.me
        self._send_key = session_key(secret, b"initiator", me, unit, self._challenge, challenge)
        self._recv_key = session_key(secret, b"responder", me, unit, self._challenge, challenge)
        mine = proof(self.owner.secret, b"initiator", self.owner.me, unit, self._challenge, challenge)
        self.callRemote(Prove, proof=mine).addCallbacks(lambda _: self._ready(), self._handshake_failed)

    def _handshake_failed(self, failure: Failure) -> None:
        if failure.check(HandshakeRefused, amp.RemoteAmpError) and self.stage != "closed":
            why = failure.getErrorMessage()
            log.info("dam: {peer} refused the handshake: {why}", peer=self.describe(), why=why)
            if why == "self_connection":
                self.to_self = True  # our peers list names us: stop dialing it
            self.abort("refused_by_peer")
        # Otherwise the connection is already gone; connectionLost counted it.

    # --- the handshake: responder side ----------------------------------------------------

    @Hello.responder
    def _on_hello(self, version: int, unit: str, challenge: bytes) -> dict[str, Any]:
        if self.initiator or self.stage != "new":
            self._refuse("handshake_unexpected")
        if version != PROTOCOL_VERSION:
            self._refuse("version_mismatch")
        if not _valid_name(unit) or len(challenge) != CHALLENGE_SIZE:
            self._refuse("handshake_malformed")
        if unit == self.owner.me:
            self._refuse("self_connection")
        self.stage = "hello"
        self.peer = unit  # claimed; proven by Prove
        self._challenge = os.urandom(CHALLENGE_SIZE)
        self._expected = proof(self.owner.secret, b"initiator", unit, self.owner.me, challenge, self._challenge)
        mine = proof(self.owner.secret, b"responder", unit, self.owner.me, challenge, self._challenge)
        self._send_key = session_key(self.owner.secret, b"responder", unit, self.owner.me, challenge, self._challenge)
        self._recv_key = session_key(self.owner.secret, b"initiator", unit, self.owner.me, challenge, self._challenge)
        return {"unit": self.owner.me, "challenge": self._challenge, "proof": mine}

    @Prove.responder
    def _on_prove(self, proof: bytes) -> dict[str, Any]:
        if self.initiator or self.stage != "hello":
            self._refuse("handshake_unexpected")
        if not hmac.compare_digest(self._expected, proof):
            self._refuse("auth_failed")
        self.stage = "proved"
        # Ready after this answer is written, so that the initiator (ready
        # when it reads the answer) never sees a DAM call first.
        self.owner.reactor.callLater(0, self._ready)
        return {}

    def _refuse(self, why: str) -> None:
        self.owner.stats[why] += 1
        log.info("dam: refusing {peer}: {why}", peer=self.describe(), why=why)
        raise HandshakeRefused(why)

    def _ready(self) -> None:
        if self.stage == "closed":
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.stage = "ready"
        self.owner._ready(self)

    # --- box authentication ---------------------------------------------------------------

    def sendBox(self, box: amp.AmpBox) -> None:
        if self.stage == "ready":
            box[_MAC_KEY] = box_mac(self._send_key, self._send_seq, box)
            self._send_seq += 1
        super().sendBox(box)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if self.stage == "ready" or (self.stage == "proved" and not self.initiator):
            mac = box.pop(_MAC_KEY, b"")
            if not hmac.compare_digest(mac, box_mac(self._recv_key, self._recv_seq, box)):
                self.abort("bad_mac")
                return
            self._recv_seq += 1
        elif _MAC_KEY in box:
            self.abort("handshake_malformed")  # a MAC before the keys exist
            return
        super().ampBoxReceived(box)

    def locateResponder(self, name: bytes) -> Callable[[amp.AmpBox], defer.Deferred[amp.AmpBox]] | None:
        if name not in _HANDSHAKE and self.stage != "ready":
            # Everything but the handshake needs an authenticated peer.
            self.abort("unauthenticated_call")
            return lambda box: defer.succeed(amp.AmpBox())
        return super().locateResponder(name)

    # --- DAM calls in ------------------------------------------------------------------

    def _deliver(self, call: Call) -> dict[str, Any]:
        if self.peer is not None and self.stage == "ready":
            self.owner.dam.receive(self.peer, call)
        return {}

    def _atoms(self, blob: bytes) -> tuple[Atom, ...]:
        try:
            return decode_atoms(blob)
        except WireError as exc:
            raise _Malformed(str(exc)) from None

    def _guard(self, make: Callable[[], Call]) -> dict[str, Any]:
        try:
            call = make()
        except _Malformed as exc:
            log.info("dam: malformed call from {peer}: {why}", peer=self.describe(), why=str(exc))
            self.abort("malformed")
            return {}
        return self._deliver(call)

    @AddAtomsCommand.responder
    def _on_add_atoms(self, atoms: bytes, refresh: bool) -> dict[str, Any]:
        return self._guard(lambda: AddAtoms(self._atoms(atoms), refresh))

    @DeleteAtomCommand.responder
    def _on_delete_atom(self, key: str, counter: int, origin: str, kind: str) -> dict[str, Any]:
        def make() -> Call:
            if not (_text_ok(key, MAX_KEY) and _valid_name(origin) and _text_ok(kind, MAX_KIND)
                    and 0 <= counter < _U64):
                raise _Malformed("DeleteAtom field out of range")
            return DeleteAtom(key, (counter, origin), kind)

        return self._guard(make)

    @QueryAtomCommand.responder
    def _on_query_atom(self, key: str, qid: int) -> dict[str, Any]:
        def make() -> Call:
            if not _text_ok(key, MAX_KEY):
                raise _Malformed("QueryAtom key out of range")
            return QueryAtom(key, qid)

        return self._guard(make)

    @ReturnAtomCommand.responder
    def _on_return_atom(self, qid: int, atoms: bytes) -> dict[str, Any]:
        def make() -> Call:
            found = self._atoms(atoms)
            if len(found) > 1:
                raise _Malformed("ReturnAtom with more than one atom")
            return ReturnAtom(qid, found[0] if found else None)

        return self._guard(make)

    @SyncRequestCommand.responder
    def _on_sync_request(self) -> dict[str, Any]:
        return self._deliver(SyncRequest())

    @SyncBatchCommand.responder
    def _on_sync_batch(self, atoms: bytes, last: bool, counter: int) -> dict[str, Any]:
        def make() -> Call:
            if not 0 <= counter < _U64:
                raise _Malformed("SyncBatch counter out of range")
            return SyncBatch(self._atoms(atoms), last, counter)

        return self._guard(make)

    # --- DAM calls out -------------------------------------------------------------------

    def send_call(self, call: Call) -> None:
        if self._aborting or self.stage == "closed":
            return  # the peer leaves the DAM when the loss is reported; it resyncs on return
        for command, kwargs in _OUTGOING[type(call)](call):
            if self._paused or self._queue:
                size = _size(kwargs)
                if self._queued + size > MAX_QUEUED_BYTES:
                    self.abort("send_overflow")
                    return
                self._queue.append((command, kwargs, size))
                self._queued += size
            else:
                self.callRemote(command, **kwargs)

    # IPushProducer: the transport tells us when its send buffer is full.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._queue and not self._paused and self.stage == "ready":
            command, kwargs, size = self._queue.popleft()
            self._queued -= size
            self.callRemote(command, **kwargs)

    def stopProducing(self) -> None:
        self._queue.clear()
        self._queued = 0


def _text_ok(value: str, limit: int) -> bool:
    return 0 < len(value.encode()) <= limit


def _valid_name(value: object) -> bool:
    return isinstance(value, str) and _text_ok(value, MAX_NAME)


class _Factory(Factory):
    def __init__(self, owner: DamService, initiator: bool, dialer: _Dialer | None = None) -> None:
        self.owner = owner
        self.initiator = initiator
        self.dialer = dialer

    def buildProtocol(self, addr: Any) -> PeerProtocol | None:
        if len(self.owner._protocols) >= MAX_CONNECTIONS:
            self.owner.stats["too_many_connections"] += 1
            return None
        proto = PeerProtocol(self.owner, self.initiator, self.dialer)
        self.owner._protocols.add(proto)
        return proto


# --- dialing ---------------------------------------------------------------------------


class _Dialer:
    """Keeps one outgoing connection to one peer address alive.

    After a failure it waits (backoff) and dials again.  When its connection
    is closed because the other one to the same peer was kept, it *parks*
    until that peer disconnects; when it reached this very unit, it parks for
    good.
    """

    def __init__(self, owner: DamService, host: str, port: int) -> None:
        self.owner = owner
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        self.endpoint = endpoint_type(owner.reactor, host, port, timeout=CONNECT_TIMEOUT)
        #: The unit name last proven at this address.
        self.name: str | None = None
        #: At least one attempt has ended (connected, refused, failed).
        self.tried = False
        #: Waiting for ``name`` to disconnect (or for good: ``forever``).
        self.parked = False
        self.forever = False
        self.delay = RECONNECT_INITIAL
        self._call: Any = None
        self._connecting: defer.Deferred[Any] | None = None
        self._stopped = False

    def start(self) -> None:
        self._dial()

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._connecting is not None:
            self._connecting.cancel()

    def _dial(self) -> None:
        self._call = None
        if self._stopped or self.parked:
            return
        self.owner.stats["dials"] += 1
        attempt = self.endpoint.connect(_Factory(self.owner, True, self))
        self._connecting = attempt
        attempt.addCallbacks(self._connected, self._failed)

    def _connected(self, proto: PeerProtocol) -> None:
        self._connecting = None

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._stopped:
            return
        self.owner.stats["connect_failed"] += 1
        self.tried = True
        self._retry()
        self.owner._check_ready()

    def _retry(self) -> None:
        if self._stopped or self.parked or self._call is not None:
            return
        delay = self.delay * random.uniform(0.5, 1.0)
        self.delay = min(self.delay * RECONNECT_FACTOR, RECONNECT_MAX)
        self._call = self.owner.reactor.callLater(delay, self._dial)

    def ready(self, name: str) -> None:
        self.name = name
        self.tried = True
        self.delay = RECONNECT_INITIAL

    def lost(self, proto: PeerProtocol) -> None:
        self.tried = True
        if proto.to_self:
            self.parked = self.forever = True
            return
        if proto.superseded and proto.peer is not None and proto.peer in self.owner._active:
            self.name = proto.peer
            self.parked = True
            return
        self._retry()

    def unpark(self) -> None:
        if self.parked and not self.forever:
            self.parked = False
            self.delay = RECONNECT_INITIAL
            self._retry()


# --- the service ----------------------------------------------------------------------------


class DamService(service.Service):
    """Connects ``dam`` to the other units of the farm.

    ``me`` is this unit's name (the DAM's), ``reactor`` provides TCP and time,
    ``listen_endpoint`` the ``dam`` endpoint string (``"tcp:0:interface=127.0.0.1"`` picks a port: read
    :attr:`address` once :attr:`listening` fired), ``peers`` the other units'
    addresses ("ip:port"), ``secret`` the farm's shared key.  The service
    takes over the DAM's ``send``, ``wakeup`` and ``on_resync``, and ticks it.
    """

    def __init__(
        self,
        dam: DAM,
        me: str,
        listen_endpoint: str,
        peers: Iterable[str | tuple[str, int]],
        secret: bytes,
        reactor: Any,
    ) -> None:
        if me != dam.me:
            raise ValueError(f"the service is {me!r} but its DAM is {dam.me!r}")
        if not secret:
            raise ValueError("an empty secret authenticates nothing")
        self.dam = dam
        self.me = me
        self.secret = bytes(secret)
        self.reactor = reactor
        self.listen_endpoint = listen_endpoint
        #: Connections, refusals, drops: every event worth a metric.
        self.stats: Counter[str] = Counter()
        self._dialers = [_Dialer(self, *parse_peer(peer)) for peer in peers]
        self._protocols: set[PeerProtocol] = set()
        #: The connection used for each authenticated peer.
        self._active: dict[str, PeerProtocol] = {}
        self._buffers: dict[str, deque[Call]] = {}
        self._port: IListeningPort | None = None
        #: Fires with the listening port once the endpoint listens.
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()
        self._ready_waiters: list[defer.Deferred[None]] = []
        self.ready = False
        self._deadline: Any = None
        self._flush_call: Any = None
        self._ticker: Any = None
        dam.send = self.send
        dam.wakeup = self._wakeup
        # Not from inside the DAM's receive: whenReady's callbacks may use it.
        dam.on_resync = lambda: self.reactor.callLater(0, self._check_ready)

    # --- state ------------------------------------------------------------------------

    @property
    def peers(self) -> frozenset[str]:
        """Names of the peers connected and authenticated now."""
        return frozenset(self._active)

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) this unit listens on, once listening."""
        if self._port is None:
            return None
        host = self._port.getHost()
        return host.host, host.port  # type: ignore[attr-defined]

    def add_peer(self, peer: str | tuple[str, int]) -> None:
        """Dial one more peer address (and keep dialing it)."""
        dialer = _Dialer(self, *parse_peer(peer))
        self._dialers.append(dialer)
        if self.running:
            dialer.start()

    def whenReady(self) -> defer.Deferred[None]:
        """Fires once resynced with every reachable peer (see the module doc)."""
        if self.ready:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    # --- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        from twisted.internet.task import LoopingCall

        endpoint = serverFromString(self.reactor, self.listen_endpoint)
        endpoint.listen(_Factory(self, False)).addCallbacks(self._listening, self._listen_failed)
        for dialer in self._dialers:
            dialer.start()
        self._ticker = LoopingCall(self.dam.tick)
        self._ticker.clock = self.reactor
        self._ticker.start(TICK, now=False)
        self._deadline = self.reactor.callLater(RESYNC_DEADLINE, self._ready_deadline)
        self._check_ready()

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        log.info("dam: unit {me} listening on {address}", me=self.me, address=self.address)
        self.listening.callback(port)

    def _listen_failed(self, failure: Failure) -> None:
        log.failure("dam: cannot listen on {endpoint}", failure, endpoint=self.listen_endpoint)
        self.listening.errback(failure)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for delayed in (self._deadline, self._flush_call):
            if delayed is not None and delayed.active():
                delayed.cancel()
        self._deadline = self._flush_call = None
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        for dialer in self._dialers:
            dialer.stop()
        waits: list[defer.Deferred[Any]] = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
            self._port = None
        for proto in list(self._protocols):
            waits.append(proto.closed)
            if proto.transport is not None:
                proto._tcp.abortConnection()
        self._active.clear()
        self.dam.set_peers(())
        done = defer.gatherResults(waits, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # --- connections ------------------------------------------------------------------------

    def _ready(self, proto: PeerProtocol) -> None:
        name = proto.peer
        assert name is not None
        if not self.running:
            proto.abort("stopping")
            return
        existing = self._active.get(name)
        if existing is not None:
            keep_new = _dialed_by(proto, self.me) == min(self.me, name) != _dialed_by(existing, self.me)
            loser = existing if keep_new else proto
            loser.superseded = True
            loser.abort("duplicate_connection")
            if not keep_new:
                return
            # Calls may have been lost with the replaced connection: leave
            # and rejoin, so the DAM resyncs with this peer.
            del self._active[name]
            self.dam.set_peers(self._active)
        self._active[name] = proto
        log.info("dam: {me} connected to {peer}", me=self.me, peer=proto.describe())
        self.stats["connected"] += 1
        if proto.dialer is not None:
            proto.dialer.ready(name)
        for call in self._buffers.pop(name, ()):
            proto.send_call(call)
        self.dam.set_peers(self._active)
        self._check_ready()

    def _lost(self, proto: PeerProtocol) -> None:
        self._protocols.discard(proto)
        name = proto.peer
        if name is not None and self._active.get(name) is proto:
            del self._active[name]
            log.info("dam: {me} lost {peer}", me=self.me, peer=name)
            self.stats["disconnected"] += 1
            self.dam.set_peers(self._active)
            for dialer in self._dialers:
                if dialer.name == name:
                    dialer.unpark()
        if proto.dialer is not None:
            proto.dialer.lost(proto)
        self._check_ready()

    # --- the DAM's side ---------------------------------------------------------------------

    def send(self, peer: str, call: Call) -> None:
        """The DAM's ``send``: to the peer's connection, else a bounded buffer."""
        proto = self._active.get(peer)
        if proto is not None:
            proto.send_call(call)
            return
        buffered = self._buffers.get(peer)
        if buffered is None:
            if len(self._buffers) >= MAX_BUFFERED_PEERS:
                self.stats["send_dropped"] += 1
                return
            buffered = self._buffers[peer] = deque()
        if len(buffered) >= MAX_BUFFERED_CALLS:
            self.stats["send_dropped"] += 1
            return
        buffered.append(call)
        self.stats["send_buffered"] += 1

    def _wakeup(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        self.dam.flush()

    def _check_ready(self) -> None:
        if self.ready or not self.running:
            return
        if all(d.tried for d in self._dialers) and self.dam.resync_done:
            self._become_ready()

    def _ready_deadline(self) -> None:
        self._deadline = None
        if not self.ready:
            self.stats["ready_deadline"] += 1
            log.warn("dam: {me} serving before resync completed (deadline)", me=self.me)
            self._become_ready()

    def _become_ready(self) -> None:
        self.ready = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _dialed_by(proto: PeerProtocol, me: str) -> str | None:
    """The name of the unit that dialed ``proto``."""
    return me if proto.initiator else proto.peer

