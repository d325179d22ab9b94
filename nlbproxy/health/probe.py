# -*- test-case-name: tests.test_probe -*-
"""Active checks of hosts that run no agent: an HTTP probe and HAProxy's agent-check.

A balancing unit probes such a host itself (the seed's proxy that deduces
health "by performing external monitoring actions").  Both checks open a
fresh TCP connection through the injected reactor every ``interval``
seconds, give it ``timeout`` seconds (at most :data:`MAX_TIMEOUT`) and close
it; only the bookkeeping of results differs.

:class:`HttpProbe` sends ``GET path`` and reads the status line with h11: 2xx
and 3xx are successes, anything else (another status, a refused or timed out
connection, a malformed answer) a failure.  The host goes down after ``fall``
failures in a row and up after ``rise`` successes in a row.  Like HAProxy,
a host starts up but unconfirmed: the very first result decides, so a dead
host found at startup is taken out after one check, not ``fall``.  Failures
the router sees on real traffic count as well (:meth:`HttpProbe.passive_failure`).

:class:`AgentCheck` speaks HAProxy's agent-check: the agent writes one line
of words (:func:`parse_agent_line`) and closes.  What the words say is
applied at once, and what they do not say is left as it was.  As in HAProxy,
failing to reach the agent changes nothing: connectivity is the HTTP probe's
job; it is only counted.

Both report changes through a callback and nothing else; :meth:`stop`
cancels every timer and closes every connection, and the Deferred it returns
fires once the last connection is gone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import h11
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure

from nlbproxy import limits

__all__ = [
    "FALL",
    "MAX_LINE",
    "MAX_RESPONSE_HEAD",
    "MAX_TIMEOUT",
    "MAX_WEIGHT_PCT",
    "RISE",
    "USER_AGENT",
    "AgentCheck",
    "AgentReport",
    "HttpProbe",
    "parse_agent_line",
]

#: Consecutive successes that bring a host back up (the config's default).
RISE = limits.CHECK_RISE
#: Consecutive failures that take a host down (the config's default).
FALL = limits.CHECK_FALL
#: Longest a check may take by default, in seconds: a check's timeout is
#: ``min(interval, MAX_TIMEOUT)`` unless given, so a hung host cannot hold a
#: check for long.  Checks never overlap: the next one starts ``interval``
#: after the last one started, or as soon as it ended if that is later.
MAX_TIMEOUT = 2.0
#: Most bytes of response head the HTTP probe reads before calling the
#: answer malformed (h11's ``max_incomplete_event_size``).  A status line
#: and a few headers fit many times over.
MAX_RESPONSE_HEAD = 8192
#: Longest agent-check line, in bytes without the newline (HAProxy reads
#: one small buffer too); a longer line is an error.
MAX_LINE = 256
#: Largest weight percentage an agent may set; more is clamped.  HAProxy's
#: largest server weight is 256.
MAX_WEIGHT_PCT = 256
#: The probe's User-Agent, so that access logs can tell checks apart.
USER_AGENT = "nlbproxy-check"


class Reactor(Protocol):
    """The parts of a reactor a check uses (a ``MemoryReactorClock`` in tests)."""

    def connectTCP(
        self, host: str, port: int, factory: ClientFactory, timeout: float = ..., bindAddress: Any = ...
    ) -> IConnector: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall: ...

    def seconds(self) -> float: ...


# --- one check: a connection, a deadline, a result ------------------------------


class _Attempt:
    """One connection of a check, from connecting to closed.

    ``finish`` takes effect once, with the result; the connection may
    outlive it by a reactor turn, which ``is_closed`` and :meth:`when_closed`
    track so that :meth:`_Check.stop` can wait for it.
    """

    def __init__(self, check: _Check, started: float) -> None:
        self.check = check
        self.started = started
        self.finished = False
        self.connector: IConnector | None = None
        self.protocol: _CheckProtocol | None = None
        self.deadline: IDelayedCall | None = None
        self.is_closed = False
        self._waiters: list[Deferred[None]] = []

    def finish(self, ok: bool, detail: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.close()
        self.check._finished(self, ok, detail)

    def abandon(self) -> None:
        """Ends the attempt without a result (the check is stopping)."""
        self.finished = True
        self.close()

    def close(self) -> None:
        """Cancels the deadline and ends the connection, whatever its state."""
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        if self.is_closed:
            return
        if self.protocol is not None:
            # Connected, or about to be: connectionMade aborts a finished
            # attempt's connection itself; connectionLost closes the attempt.
            if self.protocol.transport is not None:
                self.protocol.transport.abortConnection()  # type: ignore[attr-defined]
        elif self.connector is not None:
            # A real connector reports the failure at once; a fake one
            # never will, and has no socket to close either way.
            try:
                self.connector.stopConnecting()
            except NotConnectingError:
                pass
            self.lost()

    def lost(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        self.check._open.discard(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_closed(self) -> Deferred[None]:
        if self.is_closed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


class _CheckProtocol(TwistedProtocol):
    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def connectionMade(self) -> None:
        if self.attempt.finished:
            # Finished (timed out, stopped) between connecting and now.
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.attempt.lost()
        self.closed_early()

    def closed_early(self) -> None:
        """The connection ended before a result: a failure unless finished."""
        self.attempt.finish(False, "connection closed before an answer")


class _Factory(ClientFactory):
    def __init__(self, attempt: _Attempt, build: Callable[[_Attempt], _CheckProtocol]) -> None:
        self.attempt = attempt
        self.build = build

    def buildProtocol(self, addr: Any) -> _CheckProtocol:
        protocol = self.attempt.protocol = self.build(self.attempt)
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.attempt.lost()
        self.attempt.finish(False, f"connect: {reason.getErrorMessage()}")


class _Check:
    """Schedules one attempt every ``interval`` seconds; subclasses say what
    an attempt sends and reads (``_protocol``) and what a result means
    (``_outcome``)."""

    def __init__(self, reactor: Reactor, host: str, port: int, interval: float, timeout: float | None) -> None:
        if not interval > 0:
            raise ValueError(f"interval={interval!r} must be positive")
        self.reactor = reactor
        self.host = host
        self.port = port
        self.interval = interval
        self.timeout = min(interval, MAX_TIMEOUT) if timeout is None else timeout
        if not self.timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be positive")
        self.running = False
        #: Results by kind, for metrics.
        self.stats: Counter[str] = Counter()
        self._next: IDelayedCall | None = None
        self._attempt: _Attempt | None = None
        self._open: set[_Attempt] = set()

    def start(self) -> None:
        """Checks now, then every ``interval`` seconds."""
        if self.running:
            return
        self.running = True
        self._next = self.reactor.callLater(0, self._begin)

    def stop(self) -> Deferred[None]:
        """Cancels the timers and closes connections; fires when all are closed."""
        self.running = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self._attempt = None
        waiting = []
        for attempt in list(self._open):
            attempt.abandon()
            waiting.append(attempt.when_closed())
        if not waiting:
            return succeed(None)
        done: Deferred[None] = gatherResults(waiting).addCallback(lambda _: None)
        return done

    def _begin(self) -> None:
        self._next = None
        attempt = _Attempt(self, self.reactor.seconds())
        self._attempt = attempt
        self._open.add(attempt)
        attempt.deadline = self.reactor.callLater(
            self.timeout, attempt.finish, False, f"no answer within {self.timeout:g} s"
        )
        attempt.connector = self.reactor.connectTCP(
            self.host, self.port, _Factory(attempt, self._protocol), timeout=self.timeout
        )

    def _finished(self, attempt: _Attempt, ok: bool, detail: str) -> None:
        if not self.running or attempt is not self._attempt:
            return
        self._attempt = None
        delay = max(0.0, self.interval - (self.reactor.seconds() - attempt.started))
        self._next = self.reactor.callLater(delay, self._begin)
        self._outcome(ok, detail)

    def _protocol(self, attempt: _Attempt) -> _CheckProtocol:
        raise NotImplementedError

    def _outcome(self, ok: bool, detail: str) -> None:
        raise NotImplementedError


# --- HTTP ----------------------------------------------------------------------


class _HttpCheckProtocol(_CheckProtocol):
    def __init__(self, attempt: _Attempt, request: h11.Request) -> None:
        super().__init__(attempt)
        self.request = request
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.attempt.finished:
            return
        assert self.transport is not None
        head = self.conn.send(self.request) or b""
        self.transport.write(head + (self.conn.send(h11.EndOfMessage()) or b""))

    def dataReceived(self, data: bytes) -> None:
        if self.attempt.finished:
            return
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                self.attempt.finish(False, f"malformed answer: {e}")
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                self.attempt.finish(200 <= status < 400, f"HTTP {status}")
                return
            self.attempt.finish(False, "connection closed before a status line")
            return


OnHealth = Callable[[bool, str], None]


class HttpProbe(_Check):
    """``GET path`` every ``interval`` seconds; ``on_change(up, reason)`` on
    every change of state, with the result that caused it as the reason.

    ``host_header`` defaults to the host key ("ip:port", "[ip6]:port").
    ``up`` is the state now (initially ``initial``); ``successes`` and
    ``failures`` count the current run of results; ``last_reason`` is the
    last result.
    """

    def __init__(
        self,
        reactor: Reactor,
        host: str,
        port: int,
        path: str,
        interval: float,
        on_change: OnHealth,
        rise: int = RISE,
        fall: int = FALL,
        timeout: float | None = None,
        host_header: str | None = None,
        initial: bool = True,
    ) -> None:
        super().__init__(reactor, host, port, interval, timeout)
        if rise < 1 or fall < 1:
            raise ValueError(f"rise={rise!r} and fall={fall!r} must be at least 1")
        if host_header is None:
            host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # Built and sent once here so that a bad path or host fails loudly
        # at configuration, not silently at every check.
        try:
            self.request = h11.Request(
                method="GET",
                target=path,
                headers=[("Host", host_header), ("User-Agent", USER_AGENT), ("Connection", "close")],
            )
            h11.Connection(h11.CLIENT).send(self.request)
        except h11.LocalProtocolError as e:
            raise ValueError(f"cannot check {path!r} with Host {host_header!r}: {e}") from None
        self.on_change = on_change
        self.rise = rise
        self.fall = fall
        self.up = initial
        self.successes = 0
        self.failures = 0
        self.last_reason = ""
        self._confirmed = False

    def _protocol(self, attempt: _Attempt) -> _CheckProtocol:
        return _HttpCheckProtocol(attempt, self.request)

    def passive_failure(self, reason: str) -> None:
        """A failure the router saw on real traffic counts like a failed check."""
        self.stats["passive"] += 1
        self._count(False, f"passive: {reason}")

    def _outcome(self, ok: bool, detail: str) -> None:
        self.stats["ok" if ok else "failed"] += 1
        self._count(ok, detail)

    def _count(self, ok: bool, reason: str) -> None:
        self.last_reason = reason
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        confirmed, self._confirmed = self._confirmed, True
        if self.up and not ok and (self.failures >= self.fall or not confirmed):
            self.up = False
            self.on_change(False, reason)
        elif not self.up and ok and self.successes >= self.rise:
            self.up = True
            self.on_change(True, reason)


# --- agent-check -------------------------------------------------------------------

_DOWN_WORDS = frozenset({"down", "fail", "stopped"})
_DIRECTIVE_WORDS = {"ready": "active", "drain": "draining", "maint": "inactive"}
_SEPARATORS = re.compile(r"[,\s]+")
_PERCENT = re.compile(r"([0-9]{1,6})%")


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What one agent-check line says; None for what it does not mention."""

    health: bool | None = None
    directive: str | None = None  # "active" | "draining" | "inactive"
    weight_pct: int | None = None
    description: str = ""  # the text after "#"
    ignored: tuple[str, ...] = ()  # words not understood (and "maxconn:N")


def parse_agent_line(line: str) -> AgentReport:
    """Parses HAProxy agent-check words: ``up``; ``down``, ``fail``,
    ``stopped`` (down); ``ready``, ``drain``, ``maint`` (directive active,
    draining, inactive); ``NN%`` (weight); anything after ``#`` is a
    description.  Words are separated by commas or blanks, case does not
    matter, and a later word overrides an earlier one of the same kind."""
    words, _, description = line.partition("#")
    health: bool | None = None
    directive: str | None = None
    weight: int | None = None
    ignored: list[str] = []
    for word in _SEPARATORS.split(words.strip().lower()):
        if not word:
            continue
        if word == "up":
            health = True
        elif word in _DOWN_WORDS:
            health = False
        elif word in _DIRECTIVE_WORDS:
            directive = _DIRECTIVE_WORDS[word]
        elif (match := _PERCENT.fullmatch(word)) is not None:
            weight = min(int(match.group(1)), MAX_WEIGHT_PCT)
        else:
            ignored.append(word)
    return AgentReport(health, directive, weight, description.strip(), tuple(ignored))


class _AgentLineProtocol(_CheckProtocol):
    def __init__(self, attempt: _Attempt) -> None:
        super().__init__(attempt)
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.attempt.finished:
            return
        self.buffer += data
        line, newline, _ = self.buffer.partition(b"\n")
        if newline and len(line) <= MAX_LINE + 1:  # +1: a "\r" before "\n"
            self._line(line)
        elif len(self.buffer) > MAX_LINE + 1:
            self.attempt.finish(False, f"line longer than {MAX_LINE} bytes")

    def closed_early(self) -> None:
        # HAProxy also takes what came before the close as the line.
        if self.buffer and len(self.buffer) <= MAX_LINE:
            self._line(self.buffer)
        else:
            self.attempt.finish(False, "closed without a line")

    def _line(self, line: bytes) -> None:
        if len(line.rstrip(b"\r")) > MAX_LINE:
            self.attempt.finish(False, f"line longer than {MAX_LINE} bytes")
            return
        self.attempt.finish(True, line.rstrip(b"\r").decode("utf-8", "replace"))


OnAgent = Callable[[bool | None, str | None, int | None, str], None]


class AgentCheck(_Check):
    """HAProxy's agent-check against ``host:port`` every ``interval`` seconds.

    The state is what the agent said last about each of health, directive and
    weight (None while it never said); when a line changes it,
    ``on_change(health, directive, weight_pct, reason)`` gets the whole state
    and the line's description (or the line) as the reason.  Errors (no
    connection, no line, a line too long) are counted in ``stats["error"]``
    with the last in ``last_error``, and change nothing.
    """

    def __init__(
        self,
        reactor: Reactor,
        host: str,
        port: int,
        interval: float,
        on_change: OnAgent,
        timeout: float | None = None,
    ) -> None:
        super().__init__(reactor, host, port, interval, timeout)
        self.on_change = on_change
        self.health: bool | None = None
        self.directive: str | None = None
        self.weight_pct: int | None = None
        self.last_line = ""
        self.last_error = ""

    def _protocol(self, attempt: _Attempt) -> _CheckProtocol:
        return _AgentLineProtocol(attempt)

    def _outcome(self, ok: bool, detail: str) -> None:
        if not ok:
            self.stats["error"] += 1
            self.last_error = detail
            return
        self.stats["line"] += 1
        self.last_line = detail
        report = parse_agent_line(detail)
        if report.ignored:
            self.stats["ignored_words"] += len(report.ignored)
        before = (self.health, self.directive, self.weight_pct)
        if report.health is not None:
            self.health = report.health
        if report.directive is not None:
            self.directive = report.directive
        if report.weight_pct is not None:
            self.weight_pct = report.weight_pct
        if (self.health, self.directive, self.weight_pct) != before:
            self.on_change(self.health, self.directive, self.weight_pct, report.description or detail.strip())
