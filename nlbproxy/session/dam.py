# -*- test-case-name: tests.test_dam -*-
"""The distributed atom manager (DAM): session atoms shared by balancing units.

This is the seed patent's DAM, sans-I/O.  Each balancing unit holds one
:class:`DAM`; it takes calls from peer units through :meth:`DAM.receive` and
hands calls for them to the ``send`` callable it was given (in production
:class:`nlbproxy.session.peering.DamService`, in tests an in-memory network).
It never touches a socket and reads time only from the injected clock.

Atoms
-----
An atom is (key, data, metadata): the session key, the host it is affinitized
to (``data``, for instance ``"app/10.0.0.7:8080"``), and who wrote it, when
and at which version.  :class:`Atom` is a slotted row kept as small as the
memory target (< 300 bytes each, key included) allows: the version is a
hybrid logical clock in microseconds (below), so it doubles as the write
time, and the host, kind and origin strings are interned and shared by every
atom that names them.  Deleting a session does not remove its atom: the atom
becomes a *zombie* (``dead``) that the router does not see (:meth:`DAM.get`
returns None) but that stays for a protocol-specific dead time, so late
packets and late messages about the session still find it.

Versions and the conflict rules
-------------------------------
Every write -- an add, or a delete, which is the write of a zombie -- gets a
version ``(counter, origin)``.  ``counter`` is a Lamport clock anchored to the
wall clock (a hybrid logical clock): a unit's next counter is the larger of
"one more than any counter it has written or seen" and "now, in microseconds".
Versions compare as tuples, the origin unit's name breaking ties, so every
unit orders any two writes the same way, and:

* **Higher version wins**, always and everywhere; that is the only rule.  A
  write that was caused by another (a delete issued after its add was seen)
  has a higher counter than it.  Of two concurrent writes, the later one wins
  if the units' clocks are closer than the time between them; if they are not,
  the one with the larger counter, then the larger unit name, wins -- but it
  is the same one on every unit.
* **Add and delete racing**: whichever was written later in that order wins.
  A delete leaves a zombie carrying the delete's version, so an add that is
  older but arrives later (a retried session up, an AddAtom overtaken by the
  DeleteAtom on another link) is refused and cannot bring the session back
  while the zombie lives.  An add written after the delete does revive the
  key: it is a new session that happens to reuse the key.
* **Two units disagreeing** (after a partition both sides wrote the key, or a
  message was lost with a connection): when they reconnect they resync (see
  below) and both keep the higher version; every other holder converges the
  same way, and units that merely cached the loser are corrected or drop
  their caches.
* **Host failure and fail-back**: an atom naming a host is just data.  The
  DAM never deletes or rewrites atoms because a host went down; the router
  decides whether an affinitized host is usable (healthy, active or
  draining).  When the host comes back its sessions go back to it, unless
  the application re-announced a session on another host in the meantime:
  that add is a later write and wins on every unit, including units that had
  cached the old one (see "refresh" below); a late, older announcement from
  the first host cannot undo it, and a newer one (the session moved back)
  wins again.

Placement: replication and hashing
----------------------------------
With ``replication`` N >= 1 every atom goes to N + 1 units chosen by
rendezvous (highest random weight) hashing of its key over the live units
(:func:`ranking`, keyed BLAKE2b, the same on every unit): the key's
:func:`assigned` units.  The origin -- the unit that took the session up --
also keeps its own copy, so an atom has N + 1 copies when its origin is one of
the assigned units and N + 2 otherwise: at least N beyond the origin's, and
any N units may die without losing it.  0 keeps an atom on its origin only
(the patent's level 0: no replication; queries ask everyone); ``None`` puts it
on every unit.  :func:`holders` is the assigned units plus the origin.

The assigned units do not depend on who wrote: every version of a key, from
whichever unit, goes to the same units, so they see every write and settle
every conflict.  (A placement of "N units other than the origin" sends two
versions of a key written on two units to two different sets of units; the
state-machine test found the stale copies that leaves after a partition
heals.)  Rendezvous hashing moves only the keys whose assigned units joined
or left.

Queries and caching upon acquisition
------------------------------------
A unit that does not hold a key asks for it (:meth:`DAM.query`): QueryAtom to
the key's assigned units, then, when those all answered "not found" or stayed
silent for :data:`QUERY_ESCALATE`, to every other live unit.  The first
ReturnAtom with a live atom resolves the query; a timeout or "not found" from
everyone resolves it with None.  Several waiters on one key share one query.
The atom a query brings back is cached in the local table (the patent's
"caching upon acquisition").

Caches are kept fresh without a directory of who cached what.  Deletes go to
every live unit.  A unit that replaces a live atom by one with other data, or
revives a zombie, fans the new atom out to every unit as a *refresh*, which a
unit applies only if it has the key.  A unit that receives an atom older than
its own, with other data, sends its own back to the sender.  Since every
version reaches the assigned units, one of them either replaces (and fans
out) or refuses (and corrects the sender).  The answer to a query that was in
flight when a peer joined is used but not cached: the join may mean this unit
missed a delete that the answer predates.  With replication 0 no unit sees
every version, so an update made on another unit than the first write's
origin reaches the old origin and caches only through queries; use
replication >= 1 where sessions move between hosts.

Membership, resync and re-replication
-------------------------------------
:meth:`DAM.set_peers` tells the DAM which peers are connected (and
authenticated) now.  When a peer joins -- a new unit, a restart, the end of a
partition or a dropped connection -- both sides send :class:`SyncRequest`
and answer the other's with :class:`SyncBatch` calls holding every atom and
zombie of the keys assigned to the requester, the last batch flagged
``last`` and carrying the sender's Lamport counter.  ``resync_done`` is false
while a peer's last batch is outstanding; a restarting unit waits for it
before it serves or writes (:attr:`DAM.on_resync` tells when;
``DamService.whenReady`` waits for it), and then its next writes outrank
everything written before it restarted, its own earlier writes included.

A join may also mean this unit missed calls while disconnected, so it hands
the live atoms it holds as a mere cache (neither assigned the key nor the
origin) to the assigned units and forgets them; they are fetched again on
demand.  When assignments change (a unit joined or left), every unit pushes
the atoms it has to the units newly assigned their keys: the re-replication
that restores the copies a dead unit held.  That pass is one scan of the
table per membership change.  An atom pushed to a unit that, in its own view
of the ring, is not assigned the key -- views differ while a membership
change is in flight, or it is the unit's own old write coming back after a
restart -- is not kept but passed on to the units that are; those rank higher
in the key's order, so forwarding always ends.

Zombies
-------
A delete is sent to every live unit, and each keeps the zombie until
``version time + dead time`` (the dead time per kind: :data:`ZOMBIE_TIMES`,
else ``zombie_time``), so the expiry is the same on every unit and survives a
resync.  :meth:`DAM.tick` removes expired zombies.  Zombies use as much
memory as atoms while they last: a unit carries every delete of the last dead
time, whatever the replication.

Throughput
----------
Adds, deletes and pushes are queued per peer and sent as one
:class:`AddAtoms` batch per peer per :meth:`DAM.flush` (a zombie in a batch is
a delete).  Without a ``wakeup`` hook every public call flushes at once; with
one (the service's ``callLater(0, dam.flush)``) a burst of announcements in
one reactor turn becomes one batch per peer.

Blame: a bad argument to :meth:`DAM.add` or a full table is the caller's to
handle (ValueError, :class:`DamFull`); what a peer sends that cannot be
applied (a version from the far future, an answer to a question not asked, a
full table) is dropped and counted in :attr:`DAM.stats`.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BATCH_ATOMS",
    "DEFAULT_KIND",
    "MAX_ATOMS",
    "MAX_DATA",
    "MAX_KEY",
    "MAX_KIND",
    "MAX_NAME",
    "MAX_PENDING_QUERIES",
    "MAX_QUERY_WAITERS",
    "MAX_SKEW",
    "MAX_VALUE",
    "QUERY_ESCALATE",
    "QUERY_TIMEOUT",
    "REPLICATION",
    "SYNC_BATCH",
    "WIRE_VERSION",
    "ZOMBIE_TIME",
    "ZOMBIE_TIMES",
    "AddAtom",
    "AddAtoms",
    "Atom",
    "Call",
    "DAM",
    "DamFull",
    "DeleteAtom",
    "QueryAtom",
    "ReturnAtom",
    "Send",
    "SyncBatch",
    "SyncRequest",
    "Version",
    "WireError",
    "assigned",
    "decode_atoms",
    "encode_atoms",
    "encode_chunks",
    "holders",
    "ranking",
]

# --- named limits and defaults ------------------------------------------------

#: Replication level unless configured (``[unit]`` ``replication``): each atom
#: on the 2 units its key hashes to (and its origin), so it survives the loss
#: of any one unit.
REPLICATION = 1
#: Dead time of a zombie, in seconds, for kinds not in :data:`ZOMBIE_TIMES`:
#: long enough to outlast any session up still in flight (agents retry for
#: less than this) and the requests of clients that still hold the cookie.
ZOMBIE_TIME = 60.0
#: Protocol-specific dead times: a TCP connection's is 2 x MSL (RFC 9293).
ZOMBIE_TIMES: Mapping[str, float] = {"tcp": 240.0}
#: A query not answered within this many seconds resolves with None (the
#: router then places the request by allotment).
QUERY_TIMEOUT = 0.25
#: A query whose key's assigned units stayed silent this long also asks the rest.
QUERY_ESCALATE = 0.05
#: Atoms and zombies one unit keeps (about 240 bytes each with a 32-byte key):
#: past it a local add raises :class:`DamFull`, a received atom for a new key is
#: dropped and counted, and a query answer is not cached.
MAX_ATOMS = 2_000_000
#: Queries in flight (one per key); past it a query resolves None at once.
MAX_PENDING_QUERIES = 10_000
#: Callbacks waiting on one query; past it a new waiter is told None at once.
MAX_QUERY_WAITERS = 1024
#: Atoms queued for one peer before they are sent without waiting for flush.
BATCH_ATOMS = 2048
#: Atoms per SyncBatch call.
SYNC_BATCH = 1024
#: A version more than this many seconds ahead of our clock is refused (a
#: peer with a broken clock would otherwise drag every later version along).
MAX_SKEW = 60.0
#: Longest key and data, in UTF-8 bytes; one length byte each on the wire.
MAX_KEY = 255
MAX_DATA = 255
#: Longest session kind and unit name, in UTF-8 bytes (a unit name keys BLAKE2b).
MAX_KIND = 32
MAX_NAME = 64
#: Largest encoded value a transport carries in one piece (AMP's limit).
MAX_VALUE = 0xFFFF
#: Version of the atom encoding; a blob of another version is refused.
WIRE_VERSION = 1
#: The kind of atoms added without one, and of zombies of unknown keys.
DEFAULT_KIND = "http-cookie"

_US = 1_000_000
_U64 = 1 << 64

#: ``(counter, origin)``: the version of a write; higher wins.
Version = tuple[int, str]


class SecondsClock(Protocol):
    """Anything with ``seconds()``: a reactor, or a ``task.Clock`` in tests."""

    def seconds(self) -> float: ...


class DamFull(Exception):
    """The table holds :data:`MAX_ATOMS` entries; the session was not added."""


class WireError(ValueError):
    """Bytes from a peer that are not a valid atom blob."""


# --- atoms -----------------------------------------------------------------------


class Atom:
    """One session: ``key`` -> ``data`` (the host), with its metadata.

    Treat it as immutable: the DAM replaces atoms, never changes them, and the
    same object may sit in several tables in tests.  ``counter`` and
    ``origin`` are the version; ``dead`` marks a zombie (a deleted session),
    whose version is the delete's.
    """

    __slots__ = ("counter", "data", "dead", "key", "kind", "origin")

    def __init__(self, key: str, data: str, kind: str, origin: str, counter: int, dead: bool = False) -> None:
        self.key = key
        self.data = data
        self.kind = kind
        self.origin = origin
        self.counter = counter
        self.dead = dead

    @property
    def version(self) -> Version:
        return (self.counter, self.origin)

    @property
    def added(self) -> float:
        """When the write happened, in seconds of the origin's clock (the
        hybrid clock's time: exact unless the origin had seen later times)."""
        return self.counter / _US

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Atom):
            return NotImplemented
        return (self.key, self.data, self.kind, self.origin, self.counter, self.dead) == (
            other.key, other.data, other.kind, other.origin, other.counter, other.dead)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        state = "zombie" if self.dead else "live"
        return f"Atom({self.key!r} -> {self.data!r}, {self.kind}, v=({self.counter}, {self.origin!r}), {state})"


def _check_text(value: object, name: str, limit: int, empty: bool = False) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r} is not a str")
    raw = value.encode("utf-8")
    if len(raw) > limit or (not raw and not empty):
        raise ValueError(f"{name}={value!r} must be {'0' if empty else '1'} to {limit} bytes of UTF-8")
    return raw


# --- wire: the calls between units ------------------------------------------------
#
# Each call is a frozen value; a transport turns it into bytes and back (see
# nlbproxy.session.peering, which declares one AMP command per call).  Atoms
# travel as blobs made by encode_atoms: the transport caps a value at
# MAX_VALUE bytes, so encode_chunks splits batches.


@dataclass(frozen=True, slots=True)
class AddAtom:
    """Store ``atom`` (a zombie is a delete).  With ``refresh`` only a unit that
    has the key (or is querying it) applies it: the update fan-out to caches."""

    atom: Atom
    refresh: bool = False


@dataclass(frozen=True, slots=True)
class AddAtoms:
    """Many AddAtom in one call; what the DAM sends under load."""

    atoms: tuple[Atom, ...]
    refresh: bool = False


@dataclass(frozen=True, slots=True)
class DeleteAtom:
    """Session ``key`` ended at ``version``; keep a zombie of that version."""

    key: str
    version: Version
    kind: str = DEFAULT_KIND


@dataclass(frozen=True, slots=True)
class QueryAtom:
    """Do you have ``key``?  Answered by a ReturnAtom with the same ``qid``."""

    key: str
    qid: int


@dataclass(frozen=True, slots=True)
class ReturnAtom:
    """The answer to QueryAtom ``qid``: the entry (live or zombie), or None."""

    qid: int
    atom: Atom | None


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """Send me every atom I should hold (I just joined, or rejoined)."""


@dataclass(frozen=True, slots=True)
class SyncBatch:
    """Part of the answer to a SyncRequest; ``last`` on the final one, which
    also carries the sender's Lamport ``counter``."""

    atoms: tuple[Atom, ...]
    last: bool
    counter: int = 0


Call = AddAtom | AddAtoms | DeleteAtom | QueryAtom | ReturnAtom | SyncRequest | SyncBatch
#: ``send(peer, call)``: deliver ``call`` to unit ``peer``.
Send = Callable[[str, Call], None]

# Atom blob, network byte order:
#
#     blob  = version u8 (WIRE_VERSION), count u32, count x atom
#     atom  = flags u8 (bit 0: zombie; others zero), counter u64,
#             key_len u8, data_len u8, kind_len u8, origin_len u8,
#             key, data, kind, origin (UTF-8)
#
# key, kind and origin are never empty; data is empty only for a zombie of a
# key the deleting unit did not know.
_BLOB = struct.Struct("!BI")
_ATOM = struct.Struct("!BQBBBB")
_DEAD = 1


def _encode_one(atom: Atom) -> bytes:
    key = atom.key.encode()
    data = atom.data.encode()
    kind = atom.kind.encode()
    origin = atom.origin.encode()
    if not 0 <= atom.counter < _U64:
        raise ValueError(f"counter {atom.counter!r} of {atom!r} is not a u64")
    head = _ATOM.pack(_DEAD if atom.dead else 0, atom.counter, len(key), len(data), len(kind), len(origin))
    return b"".join((head, key, data, kind, origin))


def encode_atoms(atoms: Iterable[Atom]) -> bytes:
    """One blob holding ``atoms``, in order (no size limit: see encode_chunks)."""
    parts = [_encode_one(atom) for atom in atoms]
    return _BLOB.pack(WIRE_VERSION, len(parts)) + b"".join(parts)


def encode_chunks(atoms: Iterable[Atom], limit: int = MAX_VALUE) -> list[bytes]:
    """Blobs of at most ``limit`` bytes holding ``atoms`` in order; no atoms
    give one empty blob (an empty SyncBatch still travels)."""
    blobs: list[bytes] = []
    parts: list[bytes] = []
    used = _BLOB.size
    for atom in atoms:
        one = _encode_one(atom)
        if used + len(one) > limit and parts:
            blobs.append(_BLOB.pack(WIRE_VERSION, len(parts)) + b"".join(parts))
            parts, used = [], _BLOB.size
        if used + len(one) > limit:
            raise ValueError(f"{atom!r} alone needs {len(one)} bytes, more than {limit}")
        parts.append(one)
        used += len(one)
    if parts or not blobs:
        blobs.append(_BLOB.pack(WIRE_VERSION, len(parts)) + b"".join(parts))
    return blobs


def decode_atoms(blob: bytes) -> tuple[Atom, ...]:
    """The atoms in ``blob``; :class:`WireError` if it is not a valid blob."""
    if len(blob) < _BLOB.size:
        raise WireError("short blob")
    version, count = _BLOB.unpack_from(blob)
    if version != WIRE_VERSION:
        raise WireError(f"atom blob version {version}, not {WIRE_VERSION}")
    atoms: list[Atom] = []
    at = _BLOB.size
    end = len(blob)
    intern = sys.intern
    try:
        for _ in range(count):
            if at + _ATOM.size > end:
                raise WireError("blob ends inside an atom")
            flags, counter, nk, nd, nt, no = _ATOM.unpack_from(blob, at)
            at += _ATOM.size
            if flags & ~_DEAD:
                raise WireError(f"unknown atom flags {flags:#x}")
            if not nk or not nt or not no or nt > MAX_KIND or no > MAX_NAME or (not nd and not flags):
                raise WireError("empty or overlong field")
            stop = at + nk + nd + nt + no
            if stop > end:
                raise WireError("blob ends inside an atom")
            key = blob[at : at + nk].decode()
            at += nk
            data = intern(blob[at : at + nd].decode())
            at += nd
            kind = intern(blob[at : at + nt].decode())
            at += nt
            origin = intern(blob[at:stop].decode())
            at = stop
            atoms.append(Atom(key, data, kind, origin, counter, flags == _DEAD))
    except UnicodeDecodeError as exc:
        raise WireError(f"not UTF-8: {exc}") from None
    if at != end:
        raise WireError("trailing bytes after the atoms")
    return tuple(atoms)


# --- placement -------------------------------------------------------------------------


def _weight(unit: str, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=unit.encode()).digest(), "big")


def ranking(key: str, units: Iterable[str]) -> list[str]:
    """``units`` in the key's rendezvous order: highest weight first, where a
    unit's weight is BLAKE2b keyed by the unit's name over the key (ties, which
    do not happen in practice, by name).  The same on every unit."""
    raw = key.encode()
    return sorted(units, key=lambda unit: (_weight(unit, raw), unit), reverse=True)


def assigned(key: str, ring: Collection[str], replication: int | None) -> frozenset[str]:
    """The units of ``ring`` that hash placement gives ``key``: the first
    ``replication + 1`` of its ranking (every unit for None, none for 0).
    Every version of the key goes to them, whoever wrote it."""
    if replication == 0:
        return frozenset()
    if replication is None or replication + 1 >= len(ring):
        return frozenset(ring)
    return frozenset(ranking(key, ring)[: replication + 1])


def holders(key: str, origin: str, ring: Collection[str], replication: int | None) -> frozenset[str]:
    """The units of ``ring`` (the live units, this one included) that should
    hold a write of ``key`` by ``origin``: the key's :func:`assigned` units,
    plus the origin itself while it is live."""
    chosen = assigned(key, ring, replication)
    if origin in ring and origin not in chosen:
        return chosen | {origin}
    return chosen


# --- the DAM --------------------------------------------------------------------------


class _Query:
    """A query in flight: one per key, shared by all its waiters."""

    __slots__ = ("asked", "cache", "deadline", "escalate_at", "key", "phase", "qid", "waiters", "waiting")

    def __init__(self, key: str, qid: int, deadline: float, escalate_at: float) -> None:
        self.key = key
        self.qid = qid
        self.waiters: list[Callable[[Atom | None], None]] = []
        self.asked: set[str] = set()
        self.waiting: set[str] = set()
        self.phase = 1
        # Cleared when a peer joins while the query is in flight: this unit
        # may have missed a delete or update that the answer predates, and
        # the cache drop of the join would not see an atom stored later.
        self.cache = True
        self.deadline = deadline
        self.escalate_at = escalate_at


class DAM:
    """This unit's portion of the distributed atom manager.

    ``me`` is this unit's name (peers know it by it), ``clock`` gives seconds
    (the reactor), ``send(peer, call)`` carries calls to peers -- a transport
    may replace the :attr:`send` attribute -- and ``replication`` the level:
    N >= 1 puts each atom on the N + 1 units its key hashes to and on its
    origin, 0 on its origin only, None on every unit.  ``wakeup``, when
    set, is called once when calls are queued, and the owner must then call
    :meth:`flush` soon (say ``callLater(0)``); when None every public call
    flushes before returning.  :meth:`tick` must run every few tens of
    milliseconds (query escalation and timeouts, zombie expiry).
    """

    def __init__(
        self,
        me: str,
        clock: SecondsClock,
        send: Send,
        replication: int | None,
        zombie_time: float = ZOMBIE_TIME,
        query_timeout: float = QUERY_TIMEOUT,
        *,
        zombie_times: Mapping[str, float] = ZOMBIE_TIMES,
        query_escalate: float = QUERY_ESCALATE,
        max_atoms: int = MAX_ATOMS,
        max_pending_queries: int = MAX_PENDING_QUERIES,
        max_skew: float = MAX_SKEW,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        _check_text(me, "me", MAX_NAME)
        if replication is not None and (not isinstance(replication, int) or replication < 0):
            raise ValueError(f"replication={replication!r} must be None or an int >= 0")
        for name, value in (("zombie_time", zombie_time), ("query_timeout", query_timeout),
                            ("query_escalate", query_escalate), ("max_skew", max_skew)):
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be positive")
        if max_atoms < 1 or max_pending_queries < 1:
            raise ValueError("max_atoms and max_pending_queries must be at least 1")
        self.me = me
        self.send = send
        self.wakeup = wakeup
        #: Called when the last outstanding SyncBatch arrived (resync_done).
        self.on_resync: Callable[[], None] | None = None
        self.replication = replication
        self._clock = clock
        self._zombie_time = zombie_time
        self._zombie_times = dict(zombie_times)
        self._query_timeout = query_timeout
        self._query_escalate = query_escalate
        self._max_atoms = max_atoms
        self._max_queries = max_pending_queries
        self._max_skew_us = round(max_skew * _US)
        #: Every counter, every event: see the class and module docs.
        self.stats: Counter[str] = Counter()

        self._table: dict[str, Atom] = {}
        self._dead = 0  # zombies in _table
        # (expiry, key, counter) of every zombie stored; stale rows are skipped.
        self._zombie_heap: list[tuple[float, str, int]] = []
        self._counter = 0
        self._live: frozenset[str] = frozenset()
        self._ring: tuple[str, ...] = (me,)
        self._pending_sync: set[str] = set()
        self._queries: dict[str, _Query] = {}
        self._qids: dict[int, _Query] = {}
        self._next_qid = 0
        # Calls waiting for flush(), per peer: atoms to store, and refreshes.
        self._outbox: dict[str, list[Atom]] = {}
        self._refresh: dict[str, list[Atom]] = {}
        self._armed = False
        self._handlers: dict[type, Callable[[str, object], None]] = {
            AddAtom: self._on_add,  # type: ignore[dict-item]
            AddAtoms: self._on_adds,  # type: ignore[dict-item]
            DeleteAtom: self._on_delete,  # type: ignore[dict-item]
            QueryAtom: self._on_query,  # type: ignore[dict-item]
            ReturnAtom: self._on_return,  # type: ignore[dict-item]
            SyncRequest: self._on_sync_request,  # type: ignore[dict-item]
            SyncBatch: self._on_sync_batch,  # type: ignore[dict-item]
        }
        self._call_names = {kind: "recv_" + kind.__name__ for kind in self._handlers}

    # --- reading -------------------------------------------------------------

    def __len__(self) -> int:
        """Entries held: live atoms (own, replicas and caches) and zombies."""
        return len(self._table)

    @property
    def zombies(self) -> int:
        return self._dead

    @property
    def peers(self) -> frozenset[str]:
        """The live peers, as last given to :meth:`set_peers`."""
        return self._live

    @property
    def resync_done(self) -> bool:
        """No SyncBatch is outstanding from any live peer."""
        return not self._pending_sync

    @property
    def pending_sync(self) -> frozenset[str]:
        return frozenset(self._pending_sync)

    def get(self, key: str) -> Atom | None:
        """The live atom for ``key`` in the local table (own, replica or
        cached), or None -- also for a zombie.  On None the router may
        :meth:`query`."""
        atom = self._table.get(key)
        if atom is None or atom.dead:
            return None
        return atom

    def entry(self, key: str) -> Atom | None:
        """The local entry for ``key``, zombies included."""
        return self._table.get(key)

    def atoms(self) -> list[Atom]:
        """Every local entry, zombies included (a copy)."""
        return list(self._table.values())

    def holders(self, key: str, origin: str | None = None) -> frozenset[str]:
        """Who should hold ``key`` now (origin: the local entry's, else ours)."""
        if origin is None:
            entry = self._table.get(key)
            origin = entry.origin if entry is not None else self.me
        return holders(key, origin, self._ring, self.replication)

    # --- local writes -------------------------------------------------------------

    def add(self, key: str, data: str, kind: str = DEFAULT_KIND) -> Atom:
        """Session ``key`` is at ``data`` (session up): store and replicate.

        Returns the atom written.  ValueError for a bad argument,
        :class:`DamFull` when the key is new and the table is full.
        """
        _check_text(key, "key", MAX_KEY)
        _check_text(data, "data", MAX_DATA)
        _check_text(kind, "kind", MAX_KIND)
        current = self._table.get(key)
        if current is None and len(self._table) >= self._max_atoms:
            self.stats["add_table_full"] += 1
            raise DamFull(f"the DAM holds {len(self._table)} entries")
        atom = Atom(key, sys.intern(data), sys.intern(kind), self.me, self._tick_counter())
        self._store(key, atom, current)
        self.stats["added"] += 1
        replicas = assigned(key, self._ring, self.replication) - {self.me}
        for peer in replicas:
            self._queue(peer, atom)
        if current is not None and (current.dead or current.data != atom.data):
            # Units that cached the old atom (or hold its zombie) must see this.
            for peer in self._live - replicas:
                self._queue(peer, atom, refresh=True)
        query = self._queries.get(key)
        if query is not None:
            self._resolve(query, atom)
        self._dirty()
        return atom

    def delete(self, key: str) -> Atom:
        """Session ``key`` ended (session down): keep a zombie for the dead time
        and tell every live unit, since any may hold or cache the key.
        Returns the zombie written."""
        _check_text(key, "key", MAX_KEY)
        current = self._table.get(key)
        if current is not None:
            zombie = Atom(key, current.data, current.kind, self.me, self._tick_counter(), True)
        else:
            zombie = Atom(key, "", DEFAULT_KIND, self.me, self._tick_counter(), True)
        if current is not None or len(self._table) < self._max_atoms:
            self._store(key, zombie, current)
        else:
            self.stats["drop_table_full"] += 1
        self.stats["deleted"] += 1
        for peer in self._live:
            self._queue(peer, zombie)
        self._dirty()
        return zombie

    # --- queries ---------------------------------------------------------------

    def query(self, key: str, callback: Callable[[Atom | None], None]) -> None:
        """Find ``key`` wherever it is; ``callback(atom or None)`` exactly once.

        Synchronously if it is here (live) or cannot be found (no peers, too
        many queries); otherwise when a peer returns it, everyone asked says
        no, or :data:`QUERY_TIMEOUT` passes.  A returned atom is cached.
        """
        atom = self.get(key)
        if atom is not None:
            self.stats["query_local"] += 1
            callback(atom)
            return
        query = self._queries.get(key)
        if query is not None:
            if len(query.waiters) >= MAX_QUERY_WAITERS:
                self.stats["query_overflow"] += 1
                callback(None)
            else:
                self.stats["query_shared"] += 1
                query.waiters.append(callback)
            return
        if not self._live or len(self._qids) >= self._max_queries:
            self.stats["query_overflow" if self._live else "query_alone"] += 1
            callback(None)
            return
        now = self._clock.seconds()
        self._next_qid += 1
        query = _Query(key, self._next_qid, now + self._query_timeout, now + self._query_escalate)
        query.waiters.append(callback)
        self._queries[key] = query
        self._qids[query.qid] = query
        self.stats["queries"] += 1
        first = assigned(key, self._ring, self.replication) - {self.me}
        self._ask(query, first or self._live)
        self._dirty()

    def _ask(self, query: _Query, peers: Iterable[str]) -> None:
        for peer in peers:
            query.asked.add(peer)
            query.waiting.add(peer)
            self._send_now(peer, QueryAtom(query.key, query.qid))

    def _advance(self, query: _Query) -> None:
        """Everyone asked so far has answered, none with a live atom."""
        rest = self._live - query.asked
        if query.phase == 1 and rest:
            query.phase = 2
            self._ask(query, rest)
        else:
            self._resolve(query, self.get(query.key))

    def _resolve(self, query: _Query, atom: Atom | None) -> None:
        # Callbacks may re-enter (query again, add); a query resolves once.
        if self._qids.pop(query.qid, None) is None:
            return
        del self._queries[query.key]
        self.stats["query_hit" if atom is not None else "query_miss"] += 1
        for callback in query.waiters:
            callback(atom)

    # --- membership -----------------------------------------------------------

    def set_peers(self, live: Iterable[str]) -> None:
        """The peers connected (and authenticated) now.  Joins start a resync
        both ways; any change re-replicates to new holders."""
        peers = frozenset(live) - {self.me}
        joined = peers - self._live
        left = self._live - peers
        if not joined and not left:
            return
        old_ring = self._ring
        self._live = peers
        self._ring = tuple(sorted(peers | {self.me}))
        self.stats["joins"] += len(joined)
        self.stats["leaves"] += len(left)
        was_syncing = bool(self._pending_sync)
        for peer in left:
            self._pending_sync.discard(peer)
            self._outbox.pop(peer, None)
            self._refresh.pop(peer, None)
        for query in list(self._qids.values()):
            if joined:
                query.cache = False
            if self._qids.get(query.qid) is query and query.waiting & left:
                query.waiting -= left
                if not query.waiting:
                    self._advance(query)
        self._rebalance(old_ring, joined)
        for peer in sorted(joined):
            self._pending_sync.add(peer)
            self._send_now(peer, SyncRequest())
        if was_syncing and not self._pending_sync:
            self._synced()
        self._dirty()

    def _rebalance(self, old_ring: tuple[str, ...], joined: frozenset[str]) -> None:
        """Push every entry to the units newly assigned its key; after a join,
        hand the live atoms held only as caches to the key's assigned units
        and forget them (this unit may have missed updates to them).

        Newly joined peers are left out of the pushes: they ask for their
        share with a SyncRequest.
        """
        if self.replication is None:
            return  # every unit holds everything: joiners resync, leavers need nothing
        me, ring, replication = self.me, self._ring, self.replication
        for key, atom in list(self._table.items()):
            now = assigned(key, ring, replication)
            if joined and not atom.dead and atom.origin != me and me not in now:
                for peer in now:
                    self._queue(peer, atom)
                del self._table[key]
                self.stats["cache_dropped"] += 1
                continue
            for peer in now - assigned(key, old_ring, replication) - joined:
                if peer != me:
                    self._queue(peer, atom)
                    self.stats["pushed"] += 1

    def _synced(self) -> None:
        self.stats["resynced"] += 1
        if self.on_resync is not None:
            self.on_resync()

    # --- calls from peers ---------------------------------------------------------

    def receive(self, peer: str, call: Call) -> None:
        """Apply ``call`` from unit ``peer`` (authenticated by the transport)."""
        handler = self._handlers.get(type(call))
        if handler is None:
            raise TypeError(f"{call!r} is not a DAM call")
        self.stats[self._call_names[type(call)]] += 1
        handler(peer, call)
        self._dirty()

    def _on_add(self, peer: str, call: AddAtom) -> None:
        self._apply(call.atom, call.refresh, peer)

    def _on_adds(self, peer: str, call: AddAtoms) -> None:
        apply, refresh = self._apply, call.refresh
        for atom in call.atoms:
            apply(atom, refresh, peer)

    def _on_delete(self, peer: str, call: DeleteAtom) -> None:
        counter, origin = call.version
        current = self._table.get(call.key)
        data, kind = (current.data, current.kind) if current is not None else ("", call.kind)
        self._apply(Atom(call.key, data, kind, origin, counter, True), False, peer)

    def _on_query(self, peer: str, call: QueryAtom) -> None:
        self._send_now(peer, ReturnAtom(call.qid, self._table.get(call.key)))

    def _on_return(self, peer: str, call: ReturnAtom) -> None:
        query = self._qids.get(call.qid)
        if query is None or peer not in query.waiting:
            self.stats["late_return"] += 1
            return
        query.waiting.discard(peer)
        atom = call.atom
        if atom is not None and atom.key != query.key:
            self.stats["drop_malformed"] += 1
        elif atom is not None and query.cache:
            if self._apply(atom, False, peer, answer=True) and not atom.dead:
                # Stored, so _apply resolved the query: caching upon acquisition.
                if self.me not in self.holders(atom.key, atom.origin):
                    self.stats["cached"] += 1
                return
        elif atom is not None and not atom.dead:
            current = self._table.get(atom.key)
            if current is None or atom.version > current.version:
                self.stats["not_cached"] += 1
                self._resolve(query, atom)  # use it, but do not keep it
                return
        if self._qids.get(call.qid) is not query:
            return
        live = self.get(query.key)
        if live is not None:  # a live atom newer than the one returned
            self._resolve(query, live)
        elif not query.waiting:
            self._advance(query)

    def _on_sync_request(self, peer: str, call: SyncRequest) -> None:
        # The requester may not be in our ring yet if its connection became
        # ready on its side first; its share is computed as if it were.
        ring = self._ring if peer in self._live else tuple(sorted({*self._ring, peer}))
        replication = self.replication
        batch: list[Atom] = []
        sent = 0
        for atom in list(self._table.values()):
            if replication is None or peer in assigned(atom.key, ring, replication):
                batch.append(atom)
                if len(batch) == SYNC_BATCH:
                    self._send_now(peer, SyncBatch(tuple(batch), False))
                    sent += len(batch)
                    batch = []
        # The last batch carries our clock: a restarted peer's next writes
        # then outrank everything written before, its own earlier ones too.
        self._send_now(peer, SyncBatch(tuple(batch), True, self._counter))
        self.stats["sync_atoms_sent"] += sent + len(batch)

    def _on_sync_batch(self, peer: str, call: SyncBatch) -> None:
        apply = self._apply
        for atom in call.atoms:
            apply(atom, False, peer)
        if call.counter > self._counter:
            if call.counter - self._max_skew_us > self._clock.seconds() * _US:
                self.stats["drop_future"] += 1
            else:
                self._counter = call.counter
        if call.last and peer in self._pending_sync:
            self._pending_sync.discard(peer)
            if not self._pending_sync:
                self._synced()

    # --- the conflict rule ---------------------------------------------------------

    def _apply(self, atom: Atom, refresh: bool = False, peer: str | None = None, answer: bool = False) -> bool:
        """Store ``atom`` if it is newer than what we have; True if stored.

        Only an ``answer`` (a ReturnAtom) resolves a pending query for the
        key: a push that happens to arrive meanwhile may be a replay of an
        older write, and taking it as the answer would cache it for good
        (the real answer then arrives late and is dropped).

        A refresh is only applied over an entry we have (or a key we query).
        A unit that replaces a live atom by one with other data, or revives a
        zombie, fans the new atom out to every unit as a refresh: any unit that
        had the old one may have handed it to a cache.  So does one that
        replaces a live atom by a zombie that did not come from the deleting
        unit itself (a resync or a push: the delete's own broadcast may have
        missed units then).  A ``peer`` that sent an atom older than ours,
        with other data, gets ours back as a refresh.
        """
        counter = atom.counter
        if counter > self._counter:
            if counter - self._max_skew_us > self._clock.seconds() * _US:
                self.stats["drop_future"] += 1
                return False
            self._counter = counter
        key = atom.key
        current = self._table.get(key)
        if current is None:
            if refresh and key not in self._queries:
                self.stats["refresh_skipped"] += 1
                return False
            if atom.dead:
                if self._expiry(atom) <= self._clock.seconds():
                    self.stats["expired_on_arrival"] += 1
                    return False
            elif peer is not None and not answer and not refresh and self.me not in assigned(
                    key, self._ring, self.replication):
                # Pushed by a unit whose view of the ring differs from ours (a
                # membership change in flight), or our own write coming back
                # after a restart: keeping it would make a copy that no update
                # or delete is sure to reach.  Pass it on to the units the key
                # is assigned to in our view; they rank above us, so
                # forwarding always climbs the ranking and ends.
                self.stats["forwarded"] += 1
                for other in assigned(key, self._ring, self.replication) - {peer}:
                    self._queue(other, atom)
                return False
            if len(self._table) >= self._max_atoms:
                self.stats["drop_table_full"] += 1
                return False
        elif counter < current.counter or (counter == current.counter and atom.origin <= current.origin):
            if counter == current.counter and atom.origin == current.origin:
                self.stats["duplicate"] += 1
            else:
                self.stats["stale"] += 1
                if peer is not None and (atom.dead != current.dead or atom.data != current.data):
                    self.stats["corrected"] += 1
                    self._queue(peer, current, refresh=True)
            return False
        self._store(key, atom, current)
        self.stats["applied"] += 1
        if current is None:
            fan_out = False
        elif atom.dead:  # a delete reaching us other than by its own broadcast
            fan_out = not current.dead and peer != atom.origin
        else:  # a move to another host, or a revival
            fan_out = current.dead or current.data != atom.data
        if fan_out:
            self.stats["fanout"] += 1
            for other in self._live:
                if other != atom.origin and other != peer:
                    self._queue(other, atom, refresh=True)
        if answer and not atom.dead:
            query = self._queries.get(key)
            if query is not None:
                self._resolve(query, atom)
        return True

    def _store(self, key: str, atom: Atom, current: Atom | None) -> None:
        self._table[key] = atom
        self._dead += atom.dead - (current is not None and current.dead)
        if atom.dead:
            heapq.heappush(self._zombie_heap, (self._expiry(atom), key, atom.counter))

    def _expiry(self, zombie: Atom) -> float:
        return zombie.counter / _US + self._zombie_times.get(zombie.kind, self._zombie_time)

    def _tick_counter(self) -> int:
        """The counter of a local write: after everything seen, and not before now."""
        self._counter = max(self._counter + 1, int(self._clock.seconds() * _US))
        return self._counter

    # --- time ---------------------------------------------------------------------

    def tick(self) -> None:
        """Expire zombies, escalate and time out queries, flush."""
        now = self._clock.seconds()
        heap = self._zombie_heap
        while heap and heap[0][0] <= now:
            _, key, counter = heapq.heappop(heap)
            entry = self._table.get(key)
            if entry is not None and entry.dead and entry.counter == counter:
                del self._table[key]
                self._dead -= 1
                self.stats["zombies_expired"] += 1
        for query in list(self._qids.values()):
            if self._qids.get(query.qid) is not query:
                continue  # resolved by an earlier one's callback
            if now >= query.deadline:
                self.stats["query_timeout"] += 1
                self._resolve(query, self.get(query.key))
            elif query.phase == 1 and now >= query.escalate_at:
                rest = self._live - query.asked
                query.phase = 2
                if rest:
                    self.stats["query_escalated"] += 1
                    self._ask(query, rest)
        self.flush()

    # --- sending --------------------------------------------------------------------

    def _queue(self, peer: str, atom: Atom, refresh: bool = False) -> None:
        box = self._refresh if refresh else self._outbox
        queued = box.get(peer)
        if queued is None:
            box[peer] = [atom]
        else:
            queued.append(atom)
            if len(queued) >= BATCH_ATOMS:
                del box[peer]
                self.send(peer, AddAtoms(tuple(queued), refresh))

    def _dirty(self) -> None:
        if not (self._outbox or self._refresh):
            return
        if self.wakeup is None:
            self.flush()
        elif not self._armed:
            self._armed = True
            self.wakeup()

    def flush(self) -> None:
        """Send the queued atoms: one call per peer (and per kind of batch)."""
        self._armed = False
        for box, refresh in ((self._outbox, False), (self._refresh, True)):
            while box:
                peer, atoms = box.popitem()
                self.send(peer, _batch_call(atoms, refresh))

    def _send_now(self, peer: str, call: Call) -> None:
        # Keep each link in order: what was queued for the peer goes first.
        for box, refresh in ((self._outbox, False), (self._refresh, True)):
            atoms = box.pop(peer, None)
            if atoms:
                self.send(peer, _batch_call(atoms, refresh))
        self.send(peer, call)


def _batch_call(atoms: Sequence[Atom], refresh: bool) -> Call:
    """The call carrying ``atoms``: the patent's AddAtom / DeleteAtom for one."""
    if len(atoms) == 1:
        atom = atoms[0]
        if atom.dead and not refresh:
            return DeleteAtom(atom.key, atom.version, atom.kind)
        return AddAtom(atom, refresh)
    return AddAtoms(tuple(atoms), refresh)
