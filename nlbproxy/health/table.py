# -*- test-case-name: tests.test_health_table -*-
"""A host agent's health-and-load table (the seed's "H&L table"), sans-I/O.

One row per application endpoint of the host, keyed by
:class:`~nlbproxy.health.messages.RowKey` (the pool it serves and "ip:port"
as the units know it).  Each row gathers what its sources say and publishes
what the units need:

health
    Down when the application reported down (the local API) or the agent's
    own check of the endpoint failed; the published reason says which.  An
    application that never reported counts as up; an endpoint with a check
    is down ("check pending") until its first result.
load
    The application's reported load while it is fresher than
    :data:`LOAD_REPORT_TTL`, else the host load the agent measures.  The
    agent samples it every :data:`LOAD_SAMPLE_INTERVAL` into an EWMA
    (:data:`LOAD_ALPHA`), and a new load is published only when the average
    moved :data:`LOAD_HYSTERESIS` points from the last published one, or
    reached 0 or 100.  Because ``LOAD_ALPHA * 100 < LOAD_HYSTERESIS``, no
    single sample, however extreme, publishes on its own: a spike does not
    make the row flap.  The seed asks for exactly this: load is "a relatively
    slowly-changing or averaged value ... smoothed with a hysteresis-inducing
    mechanism", health "relatively-instantaneous".
capacity
    From the config (0-99).
directive
    ``target`` comes from three sources, highest precedence first: the
    operator (agent API), the agent's check (a failing check drains the
    endpoint, as in the seed's example), the application (its own report).
    A source may be cleared, handing the row to the next one; with none set
    the target is active.  ``current`` is what every unit confirmed: the
    agent sets it when its postulate cycle completes
    (:mod:`nlbproxy.health.agent`).

Every mutator returns the :class:`~nlbproxy.health.messages.RowChange`
messages that carry what it published, already numbered: each one advances
:attr:`HealthTable.generation` by one (the units' view of the table is at the
generation of the last message they applied), so after any call
``generation`` and :meth:`HealthTable.checksum` describe :meth:`HealthTable.rows`
exactly, as the next heartbeat will claim.  A change that publishes nothing
(a source moved, but the row the units see did not) returns ``[]``.
"""

from __future__ import annotations

from collections import deque

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from nlbproxy.health.codec import MAX_REASON, row_change_batches, table_checksum
from nlbproxy.health.messages import Directive, Health, Op, Row, RowChange, RowKey, RowOp

__all__ = [
    "CHECK_DOWN_DIRECTIVE",
    "LOAD_ALPHA",
    "APP_LOAD_HYSTERESIS",
    "LOAD_HYSTERESIS",
    "LOAD_REPORT_TTL",
    "LOAD_SAMPLE_INTERVAL",
    "MAX_ROWS",
    "PRECEDENCE",
    "AppSpec",
    "HealthTable",
    "RowDetail",
    "Source",
]

#: How often the agent feeds the load EWMA (seconds); the EWMA's alpha is per
#: sample, so this cadence is what gives it a time constant.
LOAD_SAMPLE_INTERVAL = 1.0
#: Weight of a new sample in the measured-load EWMA: a time constant of
#: about ``LOAD_SAMPLE_INTERVAL / LOAD_ALPHA`` = 3 s, so a CPU spike of a
#: second or two does not move the published load, while a lasting change
#: does within a few seconds.
LOAD_ALPHA = 0.3
#: Points (of 0-100) the measured average must move from the published load
#: before a new load is published.
LOAD_HYSTERESIS = 10
#: Measured samples whose median feeds the average (spike rejection).
SPIKE_WINDOW = 3
#: Points an application's own load report must move before it is published.
#: Reports are the application's considered figure and are published at
#: once, not averaged; this only keeps report jitter off the wire.
APP_LOAD_HYSTERESIS = 3
#: How long an application's load report is used; after it the measured host
#: load takes over until the application reports again.
LOAD_REPORT_TTL = 30.0
#: Rows one agent may have: the table must fit a snapshot and a unit's cache.
MAX_ROWS = 1024
#: What a failing check asks of the units for the endpoint.
CHECK_DOWN_DIRECTIVE = Directive.DRAINING


class Source(StrEnum):
    """Who set a directive."""

    APP = "app"
    CHECK = "check"
    OPERATOR = "operator"


#: Directive sources, the one that wins first.
PRECEDENCE: tuple[Source, ...] = (Source.OPERATOR, Source.CHECK, Source.APP)


class SecondsClock(Protocol):
    def seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class AppSpec:
    """A row as the config defines it."""

    key: RowKey
    capacity: int = 50
    #: The agent checks the endpoint itself: health is down until the first result.
    checked: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.capacity <= 99:
            raise ValueError(f"capacity={self.capacity!r} is outside 0..99")


@dataclass(frozen=True, slots=True)
class RowDetail:
    """A row with every source behind it, for the operator's view."""

    row: Row
    health_reason: str
    app_health: Health | None
    app_reason: str
    app_load: int | None
    app_load_age: float | None  # seconds since the app reported load
    check_up: bool | None  # None: no check, or no result yet
    check_reason: str
    load_source: str  # "app", "measured" or "" before the first sample
    smoothed_load: float | None
    directive_source: Source | None  # who set the target; None: the default
    directive_reason: str
    directives: dict[Source, tuple[Directive, str]]


@dataclass(slots=True)
class _State:
    spec: AppSpec
    published: Row
    app_health: Health | None = None
    app_reason: str = ""
    app_load: int | None = None
    app_load_at: float = 0.0
    check_up: bool | None = None
    check_reason: str = ""
    directives: dict[Source, tuple[Directive, str]] = field(default_factory=dict)
    current: Directive = Directive.ACTIVE
    smoothed: float | None = None
    load_source: str = ""
    load: int = 0  # the published load; moves only past the hysteresis


def _cut(text: str) -> str:
    """``text`` within MAX_REASON bytes of UTF-8, cut on a character boundary
    (as the codec cuts it), so that operators see what the units see."""
    raw = text.encode("utf-8")
    if len(raw) <= MAX_REASON:
        return text
    return raw[:MAX_REASON].decode("utf-8", errors="ignore")


def _load(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"load={value!r} is not an integer 0..100")
    return value


class HealthTable:
    """The rows of one host agent and the sources behind them."""

    def __init__(
        self,
        apps: Iterable[AppSpec],
        clock: SecondsClock,
        *,
        alpha: float = LOAD_ALPHA,
        hysteresis: int = LOAD_HYSTERESIS,
        report_ttl: float = LOAD_REPORT_TTL,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha!r} must be in (0, 1]")
        if hysteresis < 1:
            raise ValueError(f"hysteresis={hysteresis!r} must be at least 1")
        self._clock = clock
        self._alpha = alpha
        self._hysteresis = hysteresis
        self._report_ttl = report_ttl
        #: The last few measured samples; their median feeds the average, so
        #: a spike of one sample never reaches it.
        self._recent: deque[int] = deque(maxlen=SPIKE_WINDOW)
        self._states: dict[RowKey, _State] = {}
        self._checksum: int | None = None
        #: The generation of the last RowChange published; u32, wraps.
        self.generation = 0
        for spec in apps:
            self._insert(spec)

    # -- reading ---------------------------------------------------------------
    def rows(self) -> tuple[Row, ...]:
        """The published rows, in the order they were added."""
        return tuple(state.published for state in self._states.values())

    def row(self, key: RowKey) -> Row:
        return self._states[key].published

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def __len__(self) -> int:
        return len(self._states)

    def keys_of(self, app: str) -> tuple[RowKey, ...]:
        """The keys of every endpoint of ``app``; KeyError if there is none."""
        keys = tuple(key for key in self._states if key.app == app)
        if not keys:
            raise KeyError(app)
        return keys

    def checksum(self) -> int:
        """CRC32 of the published rows, as heartbeats carry it."""
        if self._checksum is None:
            self._checksum = table_checksum(self.rows())
        return self._checksum

    def detail(self, key: RowKey) -> RowDetail:
        state = self._states[key]
        now = self._clock.seconds()
        source, (_, directive_reason) = self._target(state)
        return RowDetail(
            row=state.published,
            health_reason=self._health(state)[1],
            app_health=state.app_health,
            app_reason=state.app_reason,
            app_load=state.app_load,
            app_load_age=None if state.app_load is None else now - state.app_load_at,
            check_up=state.check_up,
            check_reason=state.check_reason,
            load_source=state.load_source,
            smoothed_load=state.smoothed,
            directive_source=source,
            directive_reason=directive_reason,
            directives=dict(state.directives),
        )

    # -- sources -----------------------------------------------------------------
    def report(
        self, app: str, *, health: Health | None = None, load: int | None = None, reason: str | None = None
    ) -> list[RowChange]:
        """What the application says about itself, for all its endpoints.

        ``health`` is published at once, and so is ``load`` when it moved by
        :data:`APP_LOAD_HYSTERESIS` or more (or reached 0 or 100); until the
        report is older than :data:`LOAD_REPORT_TTL` it overrides the
        measured load.  ``reason`` explains the health (kept until the next
        health report).
        """
        keys = self.keys_of(app)
        if load is not None:
            _load(load)
        now = self._clock.seconds()
        for key in keys:
            state = self._states[key]
            if health is not None:
                state.app_health = Health(health)
                state.app_reason = reason or ""
            if load is not None:
                state.app_load, state.app_load_at = load, now
                state.load_source = "app"
                state.smoothed = float(load)
                extreme = load in (0, 100) and load != state.load
                if abs(load - state.load) >= APP_LOAD_HYSTERESIS or extreme:
                    state.load = load
        return self._publish(keys)

    def check_result(self, key: RowKey, up: bool, reason: str = "") -> list[RowChange]:
        """The agent's own check of ``key`` changed state (after rise/fall).

        A failing check also asks the units to drain the endpoint
        (:data:`CHECK_DOWN_DIRECTIVE`); a passing one withdraws that.
        """
        state = self._states[key]
        state.check_up, state.check_reason = up, reason
        if up:
            state.directives.pop(Source.CHECK, None)
        else:
            state.directives[Source.CHECK] = (CHECK_DOWN_DIRECTIVE, "")
        return self._publish((key,))

    def set_directive(
        self, app: str, source: Source, directive: Directive | None, reason: str = ""
    ) -> list[RowChange]:
        """``source`` wants ``directive`` for every endpoint of ``app``; None
        withdraws what ``source`` asked, handing the row to the next source."""
        keys = self.keys_of(app)
        for key in keys:
            directives = self._states[key].directives
            if directive is None:
                directives.pop(Source(source), None)
            else:
                directives[Source(source)] = (Directive(directive), reason)
        return self._publish(keys)

    def set_current(self, key: RowKey, directive: Directive) -> list[RowChange]:
        """Every unit runs ``key`` under ``directive`` (the postulate cycle says so)."""
        self._states[key].current = Directive(directive)
        return self._publish((key,))

    def sample_load(self, measured: int | None) -> list[RowChange]:
        """Feed one sample to every row's load average.

        The sample of a row is its application's load report while fresh,
        else ``measured`` (the host's busy %, None when it is unknown, which
        leaves rows without a fresh report as they are).
        """
        if measured is not None:
            _load(measured)
            self._recent.append(measured)
            measured = sorted(self._recent)[(len(self._recent) - 1) // 2]
        now = self._clock.seconds()
        for state in self._states.values():
            if state.app_load is not None and now - state.app_load_at <= self._report_ttl:
                continue  # the application's report stands (see report())
            if measured is not None:
                value, state.load_source = measured, "measured"
            else:
                continue
            first = state.smoothed is None
            if state.smoothed is None:
                state.smoothed = float(value)
            else:
                state.smoothed += self._alpha * (value - state.smoothed)
            candidate = min(100, int(state.smoothed + 0.5))
            moved = abs(candidate - state.load) >= self._hysteresis
            extreme = candidate in (0, 100) and candidate != state.load
            if first or moved or extreme:
                state.load = candidate
        return self._publish(tuple(self._states))

    # -- rows come and go ----------------------------------------------------------
    def add(self, spec: AppSpec) -> list[RowChange]:
        """A new endpoint (an application started)."""
        if spec.key in self._states:
            raise ValueError(f"{spec.key} is already in the table")
        row = self._insert(spec)
        return self._commit([RowOp(Op.ADD, spec.key, row)])

    def remove(self, key: RowKey) -> list[RowChange]:
        """An endpoint is gone (its application stopped)."""
        del self._states[key]
        return self._commit([RowOp(Op.DELETE, key, None)])

    # -- the published row -------------------------------------------------------
    def _insert(self, spec: AppSpec) -> Row:
        if len(self._states) >= MAX_ROWS:
            raise ValueError(f"a table holds at most {MAX_ROWS} rows")
        if spec.key in self._states:
            raise ValueError(f"{spec.key} is twice in the table")
        placeholder = Row(spec.key, Health.DOWN, 0, spec.capacity, Directive.ACTIVE, Directive.ACTIVE)
        state = _State(spec, placeholder)
        state.published = self._compute(state)
        self._states[spec.key] = state
        self._checksum = None
        return state.published

    @staticmethod
    def _health(state: _State) -> tuple[Health, str]:
        reasons = []
        if state.app_health == Health.DOWN:
            reasons.append(f"app down: {state.app_reason}" if state.app_reason else "app down")
        if state.spec.checked and state.check_up is None:
            reasons.append("check pending")
        elif state.check_up is False:
            reasons.append(f"check failed: {state.check_reason}" if state.check_reason else "check failed")
        return (Health.DOWN if reasons else Health.UP), "; ".join(reasons)

    @staticmethod
    def _target(state: _State) -> tuple[Source | None, tuple[Directive, str]]:
        for source in PRECEDENCE:
            if source in state.directives:
                return source, state.directives[source]
        return None, (Directive.ACTIVE, "")

    def _compute(self, state: _State) -> Row:
        health, health_reason = self._health(state)
        source, (target, why) = self._target(state)
        parts = [health_reason] if health_reason else []
        if source is not None:
            parts.append(f"{target.word} by {source.value}" + (f": {why}" if why else ""))
        return Row(
            key=state.spec.key,
            health=health,
            load=state.load,
            capacity=state.spec.capacity,
            target=target,
            current=state.current,
            reason=_cut("; ".join(parts)),
        )

    def _publish(self, keys: Iterable[RowKey]) -> list[RowChange]:
        ops = []
        for key in keys:
            state = self._states[key]
            row = self._compute(state)
            if row != state.published:
                state.published = row
                ops.append(RowOp(Op.UPDATE, key, row))
        return self._commit(ops)

    def _commit(self, ops: list[RowOp]) -> list[RowChange]:
        if not ops:
            return []
        self._checksum = None
        batches = row_change_batches(ops, (self.generation + 1) & 0xFFFFFFFF)
        self.generation = batches[-1].generation
        return batches

    def __repr__(self) -> str:
        return f"<HealthTable {len(self._states)} rows at generation {self.generation}>"

