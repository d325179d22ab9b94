# -*- test-case-name: tests.test_health_cache -*-
"""The consolidated health-and-load cache of a balancing unit.

Every host agent keeps a health-and-load table (one :class:`Row` per
application endpoint) and pushes it to every unit: row changes as they
happen, a heartbeat with the table's generation and checksum every
``HEARTBEAT_INTERVAL`` (0.25 s; the constant lives in the agent), a snapshot
when asked.  :class:`ConsolidatedCache` is the unit's copy of all those
tables.  It is sans-I/O: envelopes come in through :meth:`~ConsolidatedCache.receive`,
replies go out through the injected ``send``, time comes from the injected
clock, and the owner calls :meth:`~ConsolidatedCache.tick` every :data:`TICK`
seconds.  What the cache learns reaches the classifier through a
:class:`CacheListener`.

How the copy stays true (the seed's heartbeat/snapshot scheme):

* Row changes carry the table's generation after the change.  One whose
  generation is the cached one plus one applies; one at or behind it is a
  duplicate (or was overtaken by a snapshot) and is ignored; anything else
  means a row change was lost, and the unit asks for a snapshot.
* A heartbeat whose generation or checksum differs from the cached table's
  means the copy is wrong in a way row changes did not reveal: ask for a
  snapshot.  A heartbeat sent before the datagram that brought the cache to
  its generation (a lower sequence number) is old news and is not compared.
* A new host, a restarted one (a larger epoch) and a unit that just started
  (an empty cache) all look the same: a heartbeat from a host the cache
  cannot vouch for, answered with a snapshot request.  A restarted host's
  old rows stay until its snapshot arrives, because its applications most
  likely kept running; but rows the cache has not been able to confirm for
  ``dead_after`` seconds are dropped, so a copy that cannot be repaired
  never keeps traffic flowing longer than a silent host would.
* Snapshot requests are rate limited to one per :data:`SNAPSHOT_RETRY` per
  host and retried from :meth:`~ConsolidatedCache.tick` until one arrives
  whole and matches its checksum; it then replaces the host's rows at once.
* A host silent for ``dead_after`` seconds is aged out; a goodbye clears it
  at once.  Either way the listener hears ``host_gone``.

Blame: everything here arrives authenticated (the codec checked the MAC and
the replay guard the sequence), so odd but well-formed messages from an agent
are counted in :attr:`~ConsolidatedCache.stats` and otherwise ignored, never
raised.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from nlbproxy.health.codec import table_checksum
from nlbproxy.health.messages import (
    Directive,
    Envelope,
    GetSnapshot,
    Goodbye,
    Heartbeat,
    Message,
    Op,
    Postulate,
    PostulateWrong,
    Row,
    RowChange,
    RowKey,
    SendSnapshot,
)

__all__ = [
    "DEAD_AFTER",
    "GOODBYE_MEMORY",
    "MAX_HOSTS",
    "MAX_ROWS_PER_HOST",
    "MAX_SNAPSHOT_PARTS",
    "SNAPSHOT_RETRY",
    "TICK",
    "CacheListener",
    "ConsolidatedCache",
    "HostView",
]

# Agents heartbeat every 0.25 s (HEARTBEAT_INTERVAL, in the agent).  The
# targets are "a killed agent's host gets no new requests within 1.5 s" and
# "an application reported down is out within 0.5 s"; the second is a row
# change applied on arrival, the first is bounded by DEAD_AFTER + TICK.

#: Seconds without any datagram from a host before it is aged out: four
#: heartbeat intervals, so three lost heartbeats in a row are tolerated.
DEAD_AFTER = 1.0
#: Seconds between the owner's calls of :meth:`ConsolidatedCache.tick`; the
#: aging out of a silent host is late by at most this much.
TICK = 0.1
#: Least seconds between two snapshot requests to one host.  Longer than a
#: LAN round trip, so an answer in flight is not asked for again, and short
#: enough for three tries before ``DEAD_AFTER`` gives up on stale rows.
SNAPSHOT_RETRY = 0.3
#: Hosts the cache tracks; a heartbeat from one more is dropped and counted
#: ("hosts_refused").  Matches the codec's replay guard (MAX_SENDERS).
MAX_HOSTS = 4096
#: Rows cached per host; rows beyond are dropped and counted ("rows_dropped").
#: A host with this many application endpoints is misconfigured.
MAX_ROWS_PER_HOST = 256
#: Parts of one snapshot the cache assembles; a larger snapshot is refused
#: ("snapshot_too_big").  Every part but an empty table's holds a row, and
#: a part fills most of a datagram, so this bounds assembly memory to about
#: 90 KiB per host while leaving room for MAX_ROWS_PER_HOST long rows.
MAX_SNAPSHOT_PARTS = 64
#: Seconds a goodbye is remembered, so datagrams of the departed epoch that
#: were reordered behind it do not bring the host back.  The codec refuses
#: datagrams older than its MAX_AGE (30 s) anyway, so this is long enough.
GOODBYE_MEMORY = 30.0

_GENERATIONS = 1 << 32  # generations are u32 and wrap
_HALF = _GENERATIONS >> 1
_NONCES = 1 << 32


def _at_or_behind(generation: int, cached: int) -> bool:
    """Serial-number comparison (RFC 1982): ``generation`` <= ``cached``."""
    return (cached - generation) % _GENERATIONS < _HALF


class CacheListener(Protocol):
    """What the cache tells the classifier's side.

    ``address`` is the source IP of the host's datagrams.  ``host_gone``
    means every row of the host is gone (aged out or goodbye); ``row_removed``
    is not called for them as well.
    """

    def row_changed(self, host_id: int, address: str, row: Row) -> None: ...

    def row_removed(self, host_id: int, key: RowKey) -> None: ...

    def host_gone(self, host_id: int, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class HostView:
    """A read-only copy of what the cache holds for one host (admin API)."""

    host_id: int
    name: str
    address: str
    port: int
    handoff: str
    epoch: int
    generation: int | None  # None until the first snapshot of this epoch
    checksum: int  # of the cached rows
    in_sync: bool  # False while a snapshot is awaited
    last_seen: float  # seconds since its last datagram
    rows: tuple[Row, ...]


@dataclass(slots=True)
class _Request:
    """A snapshot asked for, and the parts of the answer received so far."""

    nonce: int
    sent_at: float
    header: tuple[int, int, int] | None = None  # generation, checksum, parts
    parts: dict[int, tuple[Row, ...]] = field(default_factory=dict)
    last_seq: int = 0


@dataclass(slots=True)
class _Host:
    host_id: int
    reply_to: tuple[str, int]
    epoch: int
    last_seen: float
    name: str = ""
    handoff: str = ""
    #: The agent's generation the rows are at; None until a snapshot of
    #: this epoch arrived, and then no row change can apply.
    generation: int | None = None
    #: Sequence number of the datagram that brought the rows to
    #: ``generation``; heartbeats sent before it are not compared.
    synced_seq: int = 0
    rows: dict[RowKey, Row] = field(default_factory=dict)
    #: table_checksum(rows), computed when first needed after a change.
    checksum: int | None = None
    #: When the cache last found out its copy was wrong; None while in sync.
    unsynced_since: float | None = None
    request: _Request | None = None
    #: Rows were dropped for MAX_ROWS_PER_HOST: the checksum cannot match,
    #: so heartbeats are compared by generation only.
    overflow: bool = False


@dataclass(slots=True)
class _Tombstone:
    epoch: int
    until: float


class _Clock(Protocol):
    def seconds(self) -> float: ...


Send = Callable[[tuple[str, int], Message], None]


class ConsolidatedCache:
    """Every host agent's table, as this unit knows it.

    ``send(address, message)`` sends a GetSnapshot or PostulateWrong to an
    agent (:meth:`~nlbproxy.health.udp.HealthSocket.send`).  ``stats`` counts:
    ``snapshots_requested``, ``snapshots_applied``, ``rows_applied``,
    ``gaps`` (a row change skipped generations), ``duplicates``,
    ``mismatches`` (a heartbeat disagreed), ``restarts`` (a new epoch),
    ``hosts_aged_out``, ``goodbyes``, ``stale_rows_cleared``,
    ``postulates_wrong``, and drops: ``hosts_refused``, ``rows_dropped``,
    ``unknown_host``, ``old_epoch``, ``after_goodbye``, ``wrong_direction``,
    ``unsolicited_snapshot``, ``snapshot_checksum``, ``snapshot_too_big``.
    """

    def __init__(
        self, clock: _Clock, send: Send, listener: CacheListener, dead_after: float = DEAD_AFTER
    ) -> None:
        if not dead_after > 0:
            raise ValueError(f"dead_after={dead_after!r} must be positive")
        self.clock = clock
        self.send = send
        self.listener = listener
        self.dead_after = dead_after
        self.stats: Counter[str] = Counter()
        self._hosts: dict[int, _Host] = {}
        self._tombstones: OrderedDict[int, _Tombstone] = OrderedDict()
        # Nonces only tell this unit's requests apart; they start from the
        # clock so a restarted unit does not take an answer to its previous
        # life's request for one to its own.
        self._nonces = itertools.count(int(clock.seconds() * 1000))
        self._handlers: dict[type, Callable[[_Host, tuple[str, int], Envelope], None]] = {
            Heartbeat: self._on_heartbeat,
            Goodbye: self._on_goodbye,
            RowChange: self._on_row_change,
            SendSnapshot: self._on_snapshot,
            Postulate: self._on_postulate,
        }

    # -- read side -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._hosts)

    def __contains__(self, host_id: object) -> bool:
        return host_id in self._hosts

    def rows(self, host_id: int) -> Mapping[RowKey, Row]:
        """The cached rows of ``host_id`` (empty if unknown), read-only."""
        host = self._hosts.get(host_id)
        return MappingProxyType(host.rows if host is not None else {})

    def hosts(self) -> dict[int, HostView]:
        """A snapshot of every host, by host id, for the admin API."""
        now = self.clock.seconds()
        return {
            host.host_id: HostView(
                host_id=host.host_id,
                name=host.name,
                address=host.reply_to[0],
                port=host.reply_to[1],
                handoff=host.handoff,
                epoch=host.epoch,
                generation=host.generation,
                checksum=self._checksum(host),
                in_sync=host.unsynced_since is None,
                last_seen=now - host.last_seen,
                rows=tuple(sorted(host.rows.values(), key=lambda r: (r.key.app, r.key.endpoint))),
            )
            for host in self._hosts.values()
        }

    # -- input -------------------------------------------------------------------

    def receive(self, address: tuple[str, int], envelope: Envelope) -> None:
        """One authenticated envelope from an agent at ``address`` (ip, port)."""
        now = self.clock.seconds()
        host_id = envelope.sender
        message = envelope.message
        handler = self._handlers.get(type(message))
        if handler is None:
            # GetSnapshot / PostulateWrong are what units send, not agents.
            self.stats["wrong_direction"] += 1
            return
        tombstone = self._tombstones.get(host_id)
        if tombstone is not None and envelope.epoch <= tombstone.epoch:
            self.stats["after_goodbye"] += 1
            return
        host = self._hosts.get(host_id)
        if host is None:
            if isinstance(message, Postulate):
                # Not knowing the host at all is the most out of date a
                # cache can be: say so, or the agent would take silence
                # for agreement.
                self._postulate_wrong(address, message, None)
                return
            if isinstance(message, Goodbye):
                self._bury(host_id, envelope.epoch, now)
                return
            if not isinstance(message, Heartbeat):
                self.stats["unknown_host"] += 1
                return
            if len(self._hosts) >= MAX_HOSTS:
                self.stats["hosts_refused"] += 1
                return
            host = self._hosts[host_id] = _Host(host_id, address, envelope.epoch, now)
        elif envelope.epoch < host.epoch:
            self.stats["old_epoch"] += 1
            return
        elif envelope.epoch > host.epoch:
            self._restarted(host, envelope.epoch, now)
        host.last_seen = now
        host.reply_to = address
        handler(host, address, envelope)

    def tick(self) -> None:
        """Ages out silent hosts, drops rows that stayed unconfirmed too long,
        retries snapshot requests.  Call every :data:`TICK` seconds."""
        now = self.clock.seconds()
        for host in list(self._hosts.values()):
            # Deadlines are compared as absolute times, computed the way
            # the clock adds, so "exactly dead_after later" is not lost to
            # float rounding.
            if now >= host.last_seen + self.dead_after:
                silent = now - host.last_seen
                del self._hosts[host.host_id]
                self.stats["hosts_aged_out"] += 1
                self.listener.host_gone(host.host_id, f"silent for {silent:.1f} s")
                continue
            if host.unsynced_since is None:
                continue
            if host.rows and now >= host.unsynced_since + self.dead_after:
                self.stats["stale_rows_cleared"] += 1
                self._replace_rows(host, {})
            self._request_snapshot(host, now)
        while self._tombstones:
            host_id, tombstone = next(iter(self._tombstones.items()))
            if tombstone.until > now:
                break
            del self._tombstones[host_id]

    # -- handlers, one per message an agent sends ------------------------------------

    def _on_heartbeat(self, host: _Host, address: tuple[str, int], envelope: Envelope) -> None:
        message = envelope.message
        assert isinstance(message, Heartbeat)
        # Names and handoff endpoints come every few heartbeats; "" is "not
        # in this one", not "none".
        if message.name:
            host.name = message.name
        if message.handoff:
            host.handoff = message.handoff
        if host.generation is None:
            self._out_of_sync(host)
            return
        if envelope.seq < host.synced_seq:
            return
        if message.generation == host.generation and (
            host.overflow or message.checksum == self._checksum(host)
        ):
            # Agreement also settles a disagreement that a late row change
            # has repaired since.
            host.unsynced_since = None
            host.request = None
            return
        self.stats["mismatches"] += 1
        self._out_of_sync(host)

    def _on_goodbye(self, host: _Host, address: tuple[str, int], envelope: Envelope) -> None:
        del self._hosts[host.host_id]
        self._bury(host.host_id, envelope.epoch, self.clock.seconds())
        self.stats["goodbyes"] += 1
        self.listener.host_gone(host.host_id, "goodbye")

    def _on_row_change(self, host: _Host, address: tuple[str, int], envelope: Envelope) -> None:
        message = envelope.message
        assert isinstance(message, RowChange)
        if host.generation is None:
            self._out_of_sync(host)
            return
        if _at_or_behind(message.generation, host.generation):
            self.stats["duplicates"] += 1
            return
        if message.generation != (host.generation + 1) % _GENERATIONS:
            self.stats["gaps"] += 1
            self._out_of_sync(host)
            return
        rows = dict(host.rows)
        for op in message.ops:
            if op.op == Op.DELETE:
                rows.pop(op.key, None)
            elif op.row is None or op.row.key != op.key:
                raise AssertionError(f"the codec let through {op!r}")
            elif op.key not in rows and len(rows) >= MAX_ROWS_PER_HOST:
                self.stats["rows_dropped"] += 1
                host.overflow = True
                continue
            else:
                rows[op.key] = op.row
            self.stats["rows_applied"] += 1
        host.generation = message.generation
        host.synced_seq = max(host.synced_seq, envelope.seq)
        self._replace_rows(host, rows)

    def _on_snapshot(self, host: _Host, address: tuple[str, int], envelope: Envelope) -> None:
        message = envelope.message
        assert isinstance(message, SendSnapshot)
        request = host.request
        if request is None or message.nonce != request.nonce:
            self.stats["unsolicited_snapshot"] += 1
            return
        if message.parts > MAX_SNAPSHOT_PARTS:
            self.stats["snapshot_too_big"] += 1
            return
        header = (message.generation, message.checksum, message.parts)
        if request.header != header:
            # The agent answered this request twice with different tables
            # (a duplicated request); keep the answer that is arriving.
            request.header = header
            request.parts = {}
            request.last_seq = 0
        request.parts[message.part] = message.rows
        request.last_seq = max(request.last_seq, envelope.seq)
        if len(request.parts) < message.parts:
            return
        table = [row for part in range(message.parts) for row in request.parts[part]]
        if table_checksum(table) != message.checksum:
            # Retried from tick() after SNAPSHOT_RETRY.
            self.stats["snapshot_checksum"] += 1
            request.header = None
            request.parts = {}
            return
        rows: dict[RowKey, Row] = {}
        overflow = False
        for row in table:
            if row.key not in rows and len(rows) >= MAX_ROWS_PER_HOST:
                self.stats["rows_dropped"] += 1
                overflow = True
                continue
            rows[row.key] = row
        host.generation = message.generation
        host.synced_seq = max(host.synced_seq, request.last_seq)
        host.overflow = overflow
        host.unsynced_since = None
        host.request = None
        self.stats["snapshots_applied"] += 1
        self._replace_rows(host, rows)

    def _on_postulate(self, host: _Host, address: tuple[str, int], envelope: Envelope) -> None:
        message = envelope.message
        assert isinstance(message, Postulate)
        row = host.rows.get(message.key)
        if row is not None and row.target == message.directive:
            # This unit has applied the directive: agreeing is staying silent.
            return
        if row is None:
            self._out_of_sync(host)
        self._postulate_wrong(address, message, row)

    # -- helpers -------------------------------------------------------------------

    def _postulate_wrong(self, address: tuple[str, int], message: Postulate, row: Row | None) -> None:
        # Without a row the unit routes the endpoint as its config says,
        # which is as active.
        actual = row.target if row is not None else Directive.ACTIVE
        self.stats["postulates_wrong"] += 1
        self.send(address, PostulateWrong(message.key, message.directive, actual))

    def _restarted(self, host: _Host, epoch: int, now: float) -> None:
        self.stats["restarts"] += 1
        host.epoch = epoch
        host.generation = None
        host.synced_seq = 0
        host.request = None
        host.unsynced_since = now

    def _bury(self, host_id: int, epoch: int, now: float) -> None:
        self._tombstones.pop(host_id, None)
        self._tombstones[host_id] = _Tombstone(epoch, now + GOODBYE_MEMORY)
        while len(self._tombstones) > MAX_HOSTS:
            self._tombstones.popitem(last=False)

    def _checksum(self, host: _Host) -> int:
        if host.checksum is None:
            host.checksum = table_checksum(host.rows.values())
        return host.checksum

    def _out_of_sync(self, host: _Host) -> None:
        now = self.clock.seconds()
        if host.unsynced_since is None:
            host.unsynced_since = now
        self._request_snapshot(host, now)

    def _request_snapshot(self, host: _Host, now: float) -> None:
        if host.request is not None and now < host.request.sent_at + SNAPSHOT_RETRY:
            return
        # A fresh nonce per try: parts answering an older try are refused
        # rather than mixed into this one.
        nonce = next(self._nonces) % _NONCES
        host.request = _Request(nonce, now)
        self.stats["snapshots_requested"] += 1
        self.send(host.reply_to, GetSnapshot(nonce))

    def _replace_rows(self, host: _Host, rows: dict[RowKey, Row]) -> None:
        """Makes ``rows`` the host's rows, then tells the listener what differs."""
        old = host.rows
        host.rows = rows
        host.checksum = None
        removed: Iterable[RowKey] = [key for key in old if key not in rows]
        changed = [row for key, row in rows.items() if old.get(key) != row]
        for key in removed:
            self.listener.row_removed(host.host_id, key)
        for row in changed:
            self.listener.row_changed(host.host_id, host.reply_to[0], row)
