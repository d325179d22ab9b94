# -*- test-case-name: tests.test_session_agent -*-
"""The host agent's side of session tracking, sans-I/O.

The seed (its "session tracking infrastructure"): applications on the host
tell the agent when a session is established and when it is terminated; the
agent's :class:`SessionTable` is the authoritative list of the sessions its
host holds, and every change goes to the balancing unit the agent is bound to
as SESSION_UP / SESSION_DOWN messages over "a reliable protocol".

Reliability is built here, on top of the authenticated, replay-guarded
datagrams of the health channel (:mod:`nlbproxy.health.codec`), by
:class:`SessionSender`:

- **Batching.**  A change marks its session *dirty*; one flush per reactor
  turn (``callLater(0)``) packs every dirty session into as few datagrams as
  fit :data:`~nlbproxy.health.codec.SESSION_BATCH_ROOM`, so a burst of
  thousands of announcements costs tens of datagrams, not thousands.  What is
  sent is the table's state at flush time, so an up and a down of one session
  between two flushes coalesce into one message -- or into none at all when
  the unit never heard of the session.
- **Retry until acknowledged.**  Every batch carries a batch id; the unit
  answers SESSION_ACK with it (and dedupes by it, so a retry that crosses an
  ack applies once).  A batch unacknowledged for :data:`ACK_TIMEOUT` is sent
  again.  At most :data:`MAX_IN_FLIGHT` batches are unacknowledged at once,
  spanning at most :data:`MAX_BATCH_SPAN` batch ids (the unit's dedupe window
  must be wider).
- **Per-session order.**  A session in an unacknowledged batch is *held*:
  its next change waits for that ack.  Without this, a lost up retried after
  the down that followed it would resurrect the session on the unit.
- **Binding and failover.**  The agent is bound to one unit at a time, the
  first of ``[agent] units`` to start with.  When unacknowledged batches have
  drawn no ack for :data:`BIND_FAILOVER` retry intervals, the agent binds to
  the next unit of the list; binding (and finding that the bound unit
  restarted -- a larger epoch, or another unit id at its address after an IP
  takeover) re-sends the whole table as SESSION_UP batches, plus a down for
  every session an unacknowledged batch may have told the old unit about, so
  the new unit has every session.  Once every unit has been tried without an
  ack, retries back off, doubling up to :data:`MAX_RETRY_INTERVAL`.
- **Keepalive.**  With nothing to send for :data:`KEEPALIVE_INTERVAL`, an
  empty SESSION_UP checks that the bound unit is still there (and the same
  incarnation), so failover and re-snapshots also happen on an idle host.

The sender owns no socket and no timer: the service gives it ``send`` (the
health socket's), a clock with ``seconds`` and ``callLater``, calls
:meth:`SessionSender.tick` every :data:`TICK`, and hands it every SESSION_ACK
(:meth:`SessionSender.receive`) and the epoch of every other message from a
unit (:meth:`SessionSender.observe`).
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.logger import Logger

from nlbproxy.health.codec import SESSION_BATCH_ROOM, session_entry_size
from nlbproxy.health.messages import (
    Envelope,
    Message,
    Session,
    SessionAck,
    SessionDown,
    SessionKind,
    SessionRef,
    SessionUp,
)

__all__ = [
    "ACK_TIMEOUT",
    "BIND_FAILOVER",
    "KEEPALIVE_INTERVAL",
    "MAX_BATCH_SPAN",
    "MAX_IN_FLIGHT",
    "MAX_KEY_BYTES",
    "MAX_RETRY_INTERVAL",
    "MAX_SESSIONS",
    "TICK",
    "SessionEntry",
    "SessionId",
    "SessionSender",
    "SessionTable",
    "SessionTableFull",
    "check_session",
]

log = Logger()

#: Sessions one agent's table holds; an announcement past it is refused
#: (the API answers 503) rather than growing the agent without bound.  About
#: 300 bytes each with a cookie-sized key: 75 MB at the limit.
MAX_SESSIONS = 250_000
#: Longest session key, in UTF-8 bytes (a u8-length string on the wire).
MAX_KEY_BYTES = 255
#: How long a batch may go unacknowledged before it is sent again (seconds).
#: Units answer within a round trip; this is loss recovery, not patience.
ACK_TIMEOUT = 0.25
#: Retry intervals without any ack after which the agent binds to the next
#: unit: 1.0 s at first, the time units take to age out a silent agent.
BIND_FAILOVER = 4
#: Longest retry interval once every unit has been tried without an ack.
MAX_RETRY_INTERVAL = 2.0
#: Batches unacknowledged at once.  At about 18 cookie sessions a batch this
#: is some 600 sessions per round trip: 20,000 announcements a second need a
#: round trip under 30 ms.
MAX_IN_FLIGHT = 32
#: Widest span of batch ids unacknowledged at once (oldest to newest).  The
#: unit remembers :data:`nlbproxy.session.unitside.DEDUPE_WINDOW` ids per
#: agent; a retry older than that would be taken for a duplicate and lost,
#: so a batch that keeps being lost stalls new batches before that happens.
MAX_BATCH_SPAN = 512
#: Idle time after which an empty SESSION_UP checks on the bound unit.
KEEPALIVE_INTERVAL = 5.0
#: How often the service calls :meth:`SessionSender.tick`.
TICK = 0.05

_U32 = 1 << 32

#: A session's identity in the table: (app, key).
SessionId = tuple[str, str]
Address = tuple[str, int]
Send = Callable[[Address, Message], None]


class ReactorTime(Protocol):
    """What the sender needs of a reactor: ``seconds`` and ``callLater``."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any: ...


class SessionTableFull(Exception):
    """The table holds :data:`MAX_SESSIONS` sessions; nothing was added."""


def check_session(app: str, key: str, endpoint: str) -> None:
    """ValueError, with a message for the application, if the session cannot
    travel: an empty key, or a string too long or not encodable as UTF-8."""
    if not key:
        raise ValueError("key must be a non-empty string")
    for name, value, limit in (("key", key, MAX_KEY_BYTES), ("app", app, 255), ("endpoint", endpoint, 255)):
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"{name} is not encodable as UTF-8") from None
        if size > limit:
            raise ValueError(f"{name} is {size} bytes of UTF-8, more than {limit}")


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """One line of the host's session table (the seed's session identifier
    and type, with where the session lives and since when)."""

    app: str
    key: str
    kind: SessionKind
    endpoint: str
    since: float  # wall-clock seconds of the announcement

    @property
    def id(self) -> SessionId:
        return (self.app, self.key)

    def session(self) -> Session:
        return Session(self.app, self.key, self.kind, self.endpoint)


class SessionTable:
    """The host's sessions, by (app, key): the authoritative copy.

    Bounded by ``max_sessions``: :meth:`up` of a new session past it raises
    :class:`SessionTableFull`; callers adding many check :meth:`room` first.
    """

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions={max_sessions!r} must be at least 1")
        self.max_sessions = max_sessions
        self._entries: dict[SessionId, SessionEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sid: object) -> bool:
        return sid in self._entries

    def __iter__(self) -> Iterator[SessionEntry]:
        return iter(self._entries.values())

    def get(self, sid: SessionId) -> SessionEntry | None:
        return self._entries.get(sid)

    def room(self) -> int:
        """How many new sessions still fit."""
        return self.max_sessions - len(self._entries)

    def up(self, app: str, key: str, kind: SessionKind, endpoint: str, now: float) -> SessionEntry:
        """Records the session; an existing one of the same key is replaced
        (keeping ``since`` when nothing else changed).  Returns the entry."""
        sid = (app, key)
        old = self._entries.get(sid)
        if old is not None and old.kind == kind and old.endpoint == endpoint:
            return old
        if old is None and len(self._entries) >= self.max_sessions:
            raise SessionTableFull(f"the session table holds {self.max_sessions} sessions")
        entry = self._entries[sid] = SessionEntry(app, key, SessionKind(kind), endpoint, now)
        return entry

    def down(self, app: str, key: str) -> SessionEntry | None:
        """Removes the session; returns what was there, or None."""
        return self._entries.pop((app, key), None)

    def apps_with(self, key: str, apps: Iterable[str]) -> list[str]:
        """Which of ``apps`` hold a session ``key``."""
        return [app for app in apps if (app, key) in self._entries]

    def count(self, app: str | None = None) -> int:
        if app is None:
            return len(self._entries)
        return sum(1 for a, _ in self._entries if a == app)

    def page(self, app: str | None = None, after: SessionId | None = None, limit: int = 100) -> list[SessionEntry]:
        """Up to ``limit`` entries in (app, key) order, past ``after``.

        One pass over the table and a heap of ``limit``: no sorted copy of
        the whole table is kept or made.
        """
        ids: Iterable[SessionId] = self._entries
        if app is not None:
            ids = (sid for sid in ids if sid[0] == app)
        if after is not None:
            cursor = after
            ids = (sid for sid in ids if sid > cursor)
        return [self._entries[sid] for sid in heapq.nsmallest(limit, ids)]


@dataclass(slots=True)
class _Batch:
    id: int
    message: SessionUp | SessionDown
    sids: tuple[SessionId, ...]
    sent_at: float
    tries: int = 1


class SessionSender:
    """Keeps the bound unit's view of the host's sessions equal to the table.

    ``units`` are the units' health addresses in order of preference (the
    config's ``[agent] units``); ``send(address, message)`` sends one message
    in one datagram.  Applications' changes come in through :meth:`up` and
    :meth:`down`, which also update :attr:`table`.

    ``stats`` counts, for the operator: "batches", "ups", "downs",
    "keepalives", "retries", "acks", "stale_acks", "coalesced", "failovers",
    "rebinds", "unit_restarts".
    """

    def __init__(
        self,
        units: Sequence[Address],
        clock: ReactorTime,
        send: Send,
        table: SessionTable | None = None,
        *,
        ack_timeout: float = ACK_TIMEOUT,
        bind_failover: int = BIND_FAILOVER,
        max_in_flight: int = MAX_IN_FLIGHT,
        keepalive: float = KEEPALIVE_INTERVAL,
    ) -> None:
        if not units:
            raise ValueError("session tracking needs at least one unit")
        if not 1 <= max_in_flight <= MAX_BATCH_SPAN:
            raise ValueError(f"max_in_flight={max_in_flight!r} must be 1..{MAX_BATCH_SPAN}")
        self.units = tuple(units)
        self.clock = clock
        self._send = send
        self.table = table if table is not None else SessionTable()
        self.ack_timeout = ack_timeout
        self.bind_failover = bind_failover
        self.max_in_flight = max_in_flight
        self.keepalive = keepalive
        self.stats: Counter[str] = Counter()

        self._index = 0  # of the unit we send to
        #: The unit that acknowledged us at that address: its node id and
        #: epoch.  None until the first ack after (re)binding.
        self._bound: tuple[int, int] | None = None
        #: Sessions whose state the unit has not been sent, in the order they
        #: changed.  The value says whether the unit may know the session:
        #: if it is gone from the table by the time it is sent, a down is sent
        #: only then (an up and a down the unit never saw cancel out).
        self._dirty: dict[SessionId, bool] = {}
        #: Sessions in an unacknowledged batch -> that batch's id.
        self._held: dict[SessionId, int] = {}
        #: Unacknowledged batches by id, oldest first.
        self._in_flight: OrderedDict[int, _Batch] = OrderedDict()
        self._next_batch = 1
        #: Since when unacknowledged batches have drawn no ack.
        self._waiting_since: float | None = None
        #: Failovers since the last ack; every ``len(units)`` of them double
        #: the retry interval.
        self._failovers = 0
        #: When we last sent a new batch or got an ack; None: probe at once.
        self._last_activity: float | None = None
        self._flush_call: Any = None
        self._stopped = False

    # -- what the API and the service see ------------------------------------------
    @property
    def unit(self) -> Address:
        """The unit session messages go to now."""
        return self.units[self._index]

    @property
    def bound(self) -> bool:
        """Whether :attr:`unit` has acknowledged since we (re)bound to it."""
        return self._bound is not None

    @property
    def backlog(self) -> int:
        """Sessions changed and not yet sent."""
        return len(self._dirty)

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet acknowledged."""
        return len(self._in_flight)

    @property
    def unacknowledged(self) -> int:
        """Sessions in batches sent and not yet acknowledged."""
        return len(self._held)

    def up(self, app: str, key: str, kind: SessionKind, endpoint: str) -> tuple[SessionEntry, bool]:
        """A session is established: record it and tell the unit.  Returns the
        entry and whether it is new.  Raises :class:`SessionTableFull`."""
        sid = (app, key)
        old = self.table.get(sid)
        entry = self.table.up(app, key, kind, endpoint, self.clock.seconds())
        if entry is not old:
            self._mark(sid, old is not None)
        return entry, old is None

    def down(self, app: str, key: str) -> SessionEntry | None:
        """A session is terminated: drop it and tell the unit.  Returns the
        entry it had, or None if there was no such session."""
        entry = self.table.down(app, key)
        if entry is not None:
            self._mark((app, key), True)
        return entry

    def status(self) -> dict[str, Any]:
        host, port = self.unit
        return {
            "unit": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "bound": self.bound,
            "sessions": len(self.table),
            "backlog": self.backlog,
            "in_flight": self.in_flight,
            "unacknowledged": self.unacknowledged,
            "stats": dict(self.stats),
        }

    # -- in ------------------------------------------------------------------------------
    def receive(self, address: Address, envelope: Envelope) -> None:
        """A SESSION_ACK from a unit (authenticated and replay-checked already).

        Acks are matched by batch id, not by address: batch ids are never
        reused within our epoch and a rebind forgets every batch sent before
        it, so a late ack from a unit we left matches nothing.
        """
        message = envelope.message
        if not isinstance(message, SessionAck):
            raise TypeError(f"{type(message).__name__} is not a session acknowledgement")
        batch = self._in_flight.get(message.batch)
        if batch is None:
            self.stats["stale_acks"] += 1
            return
        if self._changed_unit(envelope.sender, envelope.epoch):
            return
        now = self.clock.seconds()
        if self._bound is None:
            self._bound = (envelope.sender, envelope.epoch)
            log.info("sessions bound to unit {unit}", unit=self.status()["unit"])
        del self._in_flight[batch.id]
        for sid in batch.sids:
            if self._held.get(sid) == batch.id:
                del self._held[sid]
        self.stats["acks"] += 1
        self._failovers = 0
        self._last_activity = now
        self._waiting_since = now if self._in_flight else None
        if self._dirty:
            self._schedule_flush()

    def observe(self, address: Address, envelope: Envelope) -> None:
        """Any other message from a unit: a new epoch of the bound unit means
        it restarted and lost our sessions."""
        if self._bound is not None and envelope.sender == self._bound[0]:
            self._changed_unit(envelope.sender, envelope.epoch)

    def _changed_unit(self, sender: int, epoch: int) -> bool:
        """Whether the unit at our address is not the one that acknowledged
        us before (restarted, or another unit took its address); if so,
        re-send it everything."""
        if self._bound is None:
            return False
        bound_sender, bound_epoch = self._bound
        if sender == bound_sender and epoch <= bound_epoch:
            return False
        log.info("unit {unit} restarted or was replaced: re-sending {n} sessions",
                 unit=self.status()["unit"], n=len(self.table))
        self.stats["unit_restarts"] += 1
        self._rebind()
        return True

    # -- time --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Retries, failover and keepalive; the service calls it every :data:`TICK`."""
        if self._stopped:
            return
        now = self.clock.seconds()
        if self._dirty and self._flush_call is None:
            self.flush()
        if self._in_flight:
            assert self._waiting_since is not None
            interval = self._retry_interval()
            if now - self._waiting_since >= self.bind_failover * interval:
                self._failover(now)
                return
            for batch in list(self._in_flight.values()):
                if batch.id in self._in_flight and now - batch.sent_at >= interval:
                    batch.sent_at = now
                    batch.tries += 1
                    self.stats["retries"] += 1
                    self._send(self.unit, batch.message)
        elif not self._dirty and (self._last_activity is None or now - self._last_activity >= self.keepalive):
            self.stats["keepalives"] += 1
            self._emit(SessionUp(self._take_batch_id(), ()), (), now)

    def _retry_interval(self) -> float:
        rounds = self._failovers // len(self.units)
        return min(self.ack_timeout * (2 ** min(rounds, 16)), max(MAX_RETRY_INTERVAL, self.ack_timeout))

    def _failover(self, now: float) -> None:
        self.stats["failovers"] += 1
        self._failovers += 1
        old = self.status()["unit"]
        self._index = (self._index + 1) % len(self.units)
        waited = self.bind_failover * self.ack_timeout
        if self._failovers == len(self.units):
            log.warn("no unit acknowledges session messages; retrying, backing off to every {every} s",
                     every=MAX_RETRY_INTERVAL)
        elif self._failovers < len(self.units):
            log.warn("unit {old} did not acknowledge session messages for {waited} s; binding to {new}",
                     old=old, waited=waited, new=self.status()["unit"])
        if len(self.units) == 1:
            # Nowhere else to go: keep retrying the same batches, slower.
            self._waiting_since = now
            return
        self._rebind()

    def _rebind(self) -> None:
        """Start over with :attr:`unit`: forget what is unacknowledged and
        make everything it must hear dirty -- a down for every session an
        unacknowledged batch may have told anyone about that the table no
        longer has, and an up for every session the table has."""
        self.stats["rebinds"] += 1
        for batch in self._in_flight.values():
            for sid in batch.sids:
                self._dirty[sid] = True
        for entry in self.table:
            self._dirty[entry.id] = True
        self._in_flight.clear()
        self._held.clear()
        self._bound = None
        self._waiting_since = None
        self._last_activity = None  # probe the unit even with nothing to send
        self._schedule_flush()

    # -- out ---------------------------------------------------------------------------------
    def _mark(self, sid: SessionId, unit_may_know: bool) -> None:
        if sid not in self._dirty:
            self._dirty[sid] = unit_may_know or sid in self._held
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is None and not self._stopped:
            self._flush_call = self.clock.callLater(0, self.flush)

    def _take_batch_id(self) -> int:
        batch_id = self._next_batch
        self._next_batch = (batch_id + 1) % _U32
        return batch_id

    def _window_open(self, built: int, unnumbered: int) -> bool:
        """Whether one more batch may go out besides those in flight, the
        ``built`` ones about to go and the ``unnumbered`` other one being
        filled (whose id is not taken yet)."""
        if len(self._in_flight) + built + unnumbered >= self.max_in_flight:
            return False
        if not self._in_flight:
            return True
        oldest = next(iter(self._in_flight))
        return (self._next_batch + unnumbered - oldest) % _U32 < MAX_BATCH_SPAN

    def flush(self) -> None:
        """Send what is dirty, as full batches, as far as the window allows.

        Batches are built first and sent after the dirty set is settled, so
        nothing ``send`` sets off can change the set under the loop.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._stopped or not self._dirty:
            return
        built: list[tuple[SessionUp | SessionDown, tuple[SessionId, ...]]] = []
        # Two open batches, ups and downs: their entries, ids and body size.
        ups: list[Session] = []
        downs: list[SessionRef] = []
        up_ids: list[SessionId] = []
        down_ids: list[SessionId] = []
        up_size = down_size = 0
        done: list[SessionId] = []
        for sid, unit_may_know in self._dirty.items():
            if sid in self._held:
                continue
            entry = self.table.get(sid)
            if entry is None and not unit_may_know:
                self.stats["coalesced"] += 1
                done.append(sid)
                continue
            if entry is not None:
                session = entry.session()
                size = session_entry_size(session)
                if ups and up_size + size > SESSION_BATCH_ROOM:
                    built.append((SessionUp(self._take_batch_id(), tuple(ups)), tuple(up_ids)))
                    ups, up_ids, up_size = [], [], 0
                if not ups and not self._window_open(len(built), 1 if downs else 0):
                    break
                ups.append(session)
                up_ids.append(sid)
                up_size += size
            else:
                ref = SessionRef(*sid)
                size = session_entry_size(ref)
                if downs and down_size + size > SESSION_BATCH_ROOM:
                    built.append((SessionDown(self._take_batch_id(), tuple(downs)), tuple(down_ids)))
                    downs, down_ids, down_size = [], [], 0
                if not downs and not self._window_open(len(built), 1 if ups else 0):
                    break
                downs.append(ref)
                down_ids.append(sid)
                down_size += size
            done.append(sid)
        if ups:
            built.append((SessionUp(self._take_batch_id(), tuple(ups)), tuple(up_ids)))
        if downs:
            built.append((SessionDown(self._take_batch_id(), tuple(downs)), tuple(down_ids)))
        for sid in done:
            del self._dirty[sid]
        now = self.clock.seconds()
        for message, sids in built:
            self._emit(message, sids, now)

    def _emit(self, message: SessionUp | SessionDown, sids: tuple[SessionId, ...], now: float) -> None:
        batch = _Batch(message.batch, message, sids, now)
        if not self._in_flight:
            self._waiting_since = now
        self._in_flight[batch.id] = batch
        for sid in sids:
            self._held[sid] = batch.id
        self.stats["batches"] += 1
        if isinstance(message, SessionUp):
            self.stats["ups"] += len(sids)
        else:
            self.stats["downs"] += len(sids)
        self._last_activity = now
        self._send(self.unit, message)

    def stop(self) -> None:
        """Send nothing more (the service is stopping)."""
        self._stopped = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
