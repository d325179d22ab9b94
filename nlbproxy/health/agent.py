# -*- test-case-name: tests.test_health_agent -*-
"""The host agent's side of the seven-message protocol, sans-I/O.

:class:`AgentCore` owns no socket: it is given a ``send(address, message)``
callable (the agent's :class:`~nlbproxy.health.udp.HealthSocket`), a clock
for its timers, and the :class:`~nlbproxy.health.table.HealthTable`.  The
service calls :meth:`AgentCore.tick` every :data:`HEARTBEAT_INTERVAL`, hands
it what the table's mutators return through :meth:`AgentCore.publish`, and
feeds it what units send through :meth:`AgentCore.receive`.

What goes out, to every unit:

- HEARTBEAT every tick with the table's generation and checksum, and every
  :data:`NAME_EVERY` heartbeats (the first one included) the host's name and
  handoff endpoint.  Units age a host out after 1.0 s of silence, four
  heartbeats: one lost datagram does not take a host out.
- ROW_CHANGE the moment the table publishes a change, so that a host whose
  application reports down is out as fast as one datagram travels.  A unit
  that missed one sees the next heartbeat's checksum disagree and asks for a
  snapshot.
- SEND_SNAPSHOT parts in answer to GET_SNAPSHOT, to the asking address only,
  at most once per :data:`SNAPSHOT_MIN_INTERVAL` per address.
- POSTULATE during a directive change (below), GOODBYE from :meth:`goodbye`.

The postulate cycle (the seed's "postulate table state" / "postulate wrong")
makes ``current`` follow ``target`` only once the units agree.  When a
published row's target differs from its current directive, the agent waits
:data:`POSTULATE_DELAY` for the row change to reach the units, then runs
rounds: each round sends POSTULATE(key, target) to every unit and listens
for :data:`POSTULATE_RETRY`.  A unit whose cache disagrees answers
POSTULATE_WRONG; a unit that agrees stays silent.  A round that drew no
wrong answer ends the cycle: current becomes target and a ROW_CHANGE says
so.  A round with a wrong answer starts another round.

Only wrong answers of the running round count, so a unit that answered
wrong and then died (or whose network went away) stops blocking after one
round: silence is agreement, and a dead unit cannot be waited for.  A unit
that keeps answering wrong (it cannot apply the agent's rows) would block
forever; :data:`POSTULATE_MAX_WAIT` bounds the cycle, after which the agent
logs the units that still disagree and sets current anyway -- the units that
agree are the ones routing by it.  A target that changes during a cycle
restarts it; a target that returns to current ends it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.logger import Logger

from nlbproxy.health.codec import snapshot_parts
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
    RowChange,
    RowKey,
)
from nlbproxy.health.table import HealthTable

__all__ = [
    "HEARTBEAT_INTERVAL",
    "MAX_SNAPSHOT_PEERS",
    "NAME_EVERY",
    "POSTULATE_DELAY",
    "POSTULATE_MAX_WAIT",
    "POSTULATE_RETRY",
    "SNAPSHOT_MIN_INTERVAL",
    "AgentCore",
    "Address",
    "Send",
]

log = Logger()

#: Between heartbeats (seconds).  Units age a host out after 1.0 s of
#: silence, so four heartbeats must be lost in a row to take a live host out,
#: and a killed agent is out within 1.0 s plus one heartbeat.
HEARTBEAT_INTERVAL = 0.25
#: Every how many heartbeats the host's name (and handoff endpoint) ride
#: along; the first heartbeat always carries them.
NAME_EVERY = 8
#: After a target change, how long to wait before the first POSTULATE: the
#: row change must have reached the units (and a unit that lost it must have
#: seen one heartbeat's checksum disagree and fetched a snapshot).
POSTULATE_DELAY = 0.25
#: One postulate round: how long the units have to answer POSTULATE_WRONG
#: before the round counts as agreed, and the period of re-sends.
POSTULATE_RETRY = 0.5
#: Longest a postulate cycle may take, from the target change; past it the
#: agent logs the units that still disagree and marks the directive current.
POSTULATE_MAX_WAIT = 10.0
#: Least time between two snapshots sent to one address: a unit's burst of
#: GET_SNAPSHOT (or a forged flood that passed the MAC) gets one answer.
SNAPSHOT_MIN_INTERVAL = 0.1
#: Addresses whose last snapshot time is remembered; the oldest go first.
MAX_SNAPSHOT_PEERS = 256

Address = tuple[str, int]
Send = Callable[[Address, Message], None]


class ReactorTime(Protocol):
    """What the core needs of a reactor: ``seconds`` and ``callLater``."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any: ...


@dataclass(slots=True)
class _Cycle:
    """A directive change being confirmed."""

    key: RowKey
    directive: Directive
    started: float
    rounds: int = 0
    #: Units (by address) that answered wrong in the running round.
    wrong: dict[Address, Directive] = field(default_factory=dict)
    timer: Any = None


class AgentCore:
    """The agent's protocol state: heartbeats, row changes, snapshots, postulates."""

    def __init__(
        self,
        name: str,
        units: Sequence[Address],
        table: HealthTable,
        clock: ReactorTime,
        send: Send,
        handoff: str = "",
    ) -> None:
        if not units:
            raise ValueError("an agent needs at least one unit")
        self.name = name
        self.units = tuple(units)
        self.table = table
        self.clock = clock
        self._send = send
        self.handoff = handoff
        self.heartbeats = 0
        self._cycles: dict[RowKey, _Cycle] = {}
        self._snapshot_at: OrderedDict[Address, float] = OrderedDict()
        self._stopped = False
        #: Counters for the operator: "snapshots", "snapshot_rate_limited",
        #: "postulates", "postulate_wrong", "postulate_wrong_stale",
        #: "postulate_confirmed", "postulate_gave_up", "row_changes".
        self.stats: Counter[str] = Counter()
        for row in table.rows():
            self._track(row.key, row.target, row.current)

    # -- out -------------------------------------------------------------------
    def _broadcast(self, message: Message) -> None:
        for unit in self.units:
            self._send(unit, message)

    def tick(self) -> None:
        """Send one heartbeat to every unit."""
        named = self.heartbeats % NAME_EVERY == 0
        self.heartbeats += 1
        self._broadcast(
            Heartbeat(
                self.table.generation,
                self.table.checksum(),
                self.name if named else "",
                self.handoff if named else "",
            )
        )

    def publish(self, changes: Iterable[RowChange]) -> None:
        """Send what a table mutator returned, and start or end postulate
        cycles for the directives it changed."""
        for change in changes:
            self.stats["row_changes"] += 1
            self._broadcast(change)
            for op in change.ops:
                if op.op == Op.DELETE or op.row is None:
                    self._end(op.key)
                else:
                    self._track(op.key, op.row.target, op.row.current)

    def goodbye(self) -> None:
        """Clean shutdown: tell every unit, and stop all timers."""
        self.stop()
        self._broadcast(Goodbye())

    def stop(self) -> None:
        """Cancel the postulate timers; nothing more is sent by them."""
        self._stopped = True
        for key in list(self._cycles):
            self._end(key)

    # -- in ----------------------------------------------------------------------
    def receive(self, address: Address, envelope: Envelope) -> None:
        """A message a unit sent (authenticated and replay-checked already)."""
        message = envelope.message
        if isinstance(message, GetSnapshot):
            self._on_get_snapshot(address, message)
        elif isinstance(message, PostulateWrong):
            self._on_postulate_wrong(address, message)
        else:
            # The socket accepts only SENDER_UNIT_KINDS: anything else here is
            # a wiring bug of ours, not something a peer can cause.
            raise TypeError(f"{type(message).__name__} is not a message units send")

    def _on_get_snapshot(self, address: Address, message: GetSnapshot) -> None:
        now = self.clock.seconds()
        last = self._snapshot_at.get(address)
        if last is not None and now - last < SNAPSHOT_MIN_INTERVAL:
            self.stats["snapshot_rate_limited"] += 1
            return
        self._snapshot_at.pop(address, None)
        self._snapshot_at[address] = now
        while len(self._snapshot_at) > MAX_SNAPSHOT_PEERS:
            self._snapshot_at.popitem(last=False)
        self.stats["snapshots"] += 1
        table = self.table
        for part in snapshot_parts(message.nonce, table.generation, table.checksum(), table.rows()):
            self._send(address, part)

    def _on_postulate_wrong(self, address: Address, message: PostulateWrong) -> None:
        cycle = self._cycles.get(message.key)
        if cycle is None or cycle.directive != message.postulated or cycle.rounds == 0:
            # An answer to a cycle that ended or was superseded.
            self.stats["postulate_wrong_stale"] += 1
            return
        self.stats["postulate_wrong"] += 1
        cycle.wrong[address] = message.actual

    # -- the postulate cycle -------------------------------------------------------
    def _track(self, key: RowKey, target: Directive, current: Directive) -> None:
        cycle = self._cycles.get(key)
        if target == current:
            self._end(key)
        elif cycle is None or cycle.directive != target:
            self._end(key)
            if self._stopped:
                return
            cycle = _Cycle(key, target, self.clock.seconds())
            cycle.timer = self.clock.callLater(POSTULATE_DELAY, self._round, cycle)
            self._cycles[key] = cycle

    def _end(self, key: RowKey) -> None:
        cycle = self._cycles.pop(key, None)
        if cycle is not None and cycle.timer is not None and cycle.timer.active():
            cycle.timer.cancel()

    def _round(self, cycle: _Cycle) -> None:
        """Send the postulate of a new round."""
        cycle.rounds += 1
        cycle.wrong.clear()
        self.stats["postulates"] += 1
        self._broadcast(Postulate(cycle.key, cycle.directive))
        cycle.timer = self.clock.callLater(POSTULATE_RETRY, self._round_over, cycle)

    def _round_over(self, cycle: _Cycle) -> None:
        cycle.timer = None
        if cycle.wrong:
            waited = self.clock.seconds() - cycle.started
            if waited + POSTULATE_RETRY <= POSTULATE_MAX_WAIT:
                self._round(cycle)
                return
            self.stats["postulate_gave_up"] += 1
            log.warn(
                "directive {directive} of {app} {endpoint}: units {units} still disagree "
                "after {waited:.1f} s; marking it current anyway",
                directive=cycle.directive.word, app=cycle.key.app, endpoint=cycle.key.endpoint,
                units=", ".join(f"{host}:{port}={actual.word}" for (host, port), actual in cycle.wrong.items()),
                waited=waited,
            )
        else:
            self.stats["postulate_confirmed"] += 1
        del self._cycles[cycle.key]
        self.publish(self.table.set_current(cycle.key, cycle.directive))

    def pending(self) -> dict[RowKey, Directive]:
        """Directive changes being confirmed, by key."""
        return {key: cycle.directive for key, cycle in self._cycles.items()}
