# -*- test-case-name: tests.test_health_agent -*-
"""The agent's own HTTP check of each local application endpoint.

Every ``interval`` seconds :class:`EndpointCheck` opens a connection to the
endpoint, sends ``GET path`` with the endpoint as ``Host`` and
``Connection: close``, and reads the status line: 2xx and 3xx pass, anything
else -- another status, no status line within ``timeout``, a refused or reset
connection -- fails.  :class:`CheckState` turns results into up/down with
rise and fall (consecutive results needed to change state), so one slow
answer does not take an endpoint out; the first result decides at once,
since until then the endpoint is "check pending" (down) in the table.

Only changes of state reach ``on_change(key, up, reason)``, which the
service turns into a table update.  A check still running when the next one
is due is not doubled: the next one is skipped.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nlbproxy.agent.config import CheckConfig
from nlbproxy.health.messages import RowKey

__all__ = ["MAX_STATUS_LINE", "CheckState", "EndpointCheck", "OnChange", "check_request", "parse_status_line"]

log = Logger()

#: Bytes read from a checked endpoint before its status line must be complete.
MAX_STATUS_LINE = 1024

OnChange = Callable[[RowKey, bool, str], None]

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")


class CheckState:
    """Rise and fall over a stream of pass/fail results; sans-I/O."""

    def __init__(self, rise: int, fall: int) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise={rise!r} and fall={fall!r} must be at least 1")
        self.rise = rise
        self.fall = fall
        #: None until the first result.
        self.up: bool | None = None
        self.reason = "pending"
        self._streak = 0  # consecutive results against the current state

    def record(self, ok: bool, reason: str = "") -> bool:
        """Take one result; True when it changed the state (the first one does)."""
        if self.up is None or (ok != self.up and self._streak + 1 >= (self.rise if ok else self.fall)):
            self.up, self.reason, self._streak = ok, reason, 0
            return True
        if ok == self.up:
            self._streak = 0
            if not ok:
                self.reason = reason
        else:
            self._streak += 1
        return False


def check_request(path: str, host_header: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: nlbagent-check\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def parse_status_line(head: bytes) -> tuple[bool, str] | None:
    """The verdict on what an endpoint sent so far; None while the first line
    is incomplete."""
    line, crlf, _ = head.partition(b"\r\n")
    if not crlf:
        if len(head) >= MAX_STATUS_LINE:
            return False, "status line too long"
        return None
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        return False, "not an HTTP/1.x response"
    status = int(match.group(1))
    return 200 <= status < 400, f"HTTP {status}"


class _CheckProtocol(Protocol):
    """One check exchange: send the request, judge the status line, close."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.done: defer.Deferred[tuple[bool, str]] = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred[tuple[bool, str]]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.head += data
        verdict = parse_status_line(self.head[: MAX_STATUS_LINE + 2])
        if verdict is not None:
            self.done.callback(verdict)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback((False, "closed before a status line"))


def _failure_reason(failure: Failure, timeout: float) -> str:
    if failure.check(defer.TimeoutError, error.TimeoutError):
        return f"timeout after {timeout:g} s"
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    return failure.getErrorMessage() or repr(failure.value)


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


class EndpointCheck:
    """Checks one endpoint every ``config.interval`` seconds until stopped."""

    def __init__(
        self, reactor: Any, key: RowKey, host: str, port: int, config: CheckConfig, on_change: OnChange
    ) -> None:
        self.reactor = reactor
        self.key = key
        self.config = config
        self.on_change = on_change
        self.state = CheckState(config.rise, config.fall)
        self._endpoint = _endpoint(reactor, host, port, config.timeout)
        self._request = check_request(config.path, key.endpoint)
        self._loop = LoopingCall(self.run)
        self._loop.clock = reactor
        self._running: defer.Deferred[None] | None = None
        self._stopped = False
        #: Results by outcome, for the operator: "pass", "fail", "skipped".
        self.counts = {"pass": 0, "fail": 0, "skipped": 0}

    def start(self) -> None:
        self._loop.start(self.config.interval, now=True)

    def stop(self) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._running is not None:
            self._running.cancel()

    def run(self) -> defer.Deferred[None] | None:
        """One check now (skipped while the previous one still runs)."""
        if self._running is not None:
            self.counts["skipped"] += 1
            return None
        protocol = _CheckProtocol(self._request)
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False  # a check a second would fill the log with factory starts
        d: defer.Deferred[Any] = self._endpoint.connect(factory)
        d.addCallback(lambda _: protocol.done)
        d.addTimeout(self.config.timeout, self.reactor)
        d.addErrback(lambda failure: (False, _failure_reason(failure, self.config.timeout)))
        d.addCallback(self._result)
        self._running = d
        return d

    def _result(self, verdict: tuple[bool, str]) -> None:
        self._running = None
        if self._stopped:
            return
        ok, reason = verdict
        self.counts["pass" if ok else "fail"] += 1
        if self.state.record(ok, reason):
            log.info(
                "check of {app} {endpoint}: {state} ({reason})",
                app=self.key.app, endpoint=self.key.endpoint, state="up" if ok else "down", reason=reason,
            )
            self.on_change(self.key, ok, "" if ok else reason)
