"""Active checks: the HTTP probe and HAProxy's agent-check, as event scripts
on a MemoryReactorClock, plus real servers on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import error, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from nlbproxy.health.probe import (
    MAX_LINE,
    MAX_TIMEOUT,
    MAX_WEIGHT_PCT,
    AgentCheck,
    AgentReport,
    HttpProbe,
    parse_agent_line,
)


class Connection:
    """The connection of one check on a MemoryReactorClock."""

    def __init__(self, reactor: MemoryReactorClock, index: int = -1) -> None:
        self.reactor = reactor
        self.host, self.port, self.factory, self.timeout, _ = reactor.tcpClients[index]
        self.connector = reactor.connectors[index]
        self.protocol: Any = None
        self.transport = StringTransport()

    def open(self) -> Connection:
        self.protocol = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return self

    def refuse(self) -> None:
        self.factory.clientConnectionFailed(self.connector, Failure(error.ConnectionRefusedError()))

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def close(self) -> None:
        self.protocol.connectionLost(Failure(error.ConnectionDone()))

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)


class HttpProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.changes: list[tuple[bool, str]] = []

    def probe(self, **kw: Any) -> HttpProbe:
        options: dict[str, Any] = {"interval": 1.0, "path": "/health"}
        options.update(kw)
        probe = HttpProbe(self.reactor, "10.0.0.1", 8080, on_change=lambda up, why: self.changes.append((up, why)),
                          **options)
        probe.start()
        self.reactor.advance(0)
        return probe

    def check(self, answer: bytes | None, close: bool = False) -> Connection:
        """Runs the pending check: connects and answers (None: refuse)."""
        c = Connection(self.reactor)
        if answer is None:
            c.refuse()
        else:
            c.open().send(answer)
            if close:
                c.close()
        return c

    def next_check(self, probe: HttpProbe) -> None:
        before = len(self.reactor.tcpClients)
        self.reactor.advance(probe.interval)
        self.assertEqual(len(self.reactor.tcpClients), before + 1)

    def test_request_and_connection(self) -> None:
        self.probe()
        c = Connection(self.reactor).open()
        self.assertEqual((c.host, c.port, c.timeout), ("10.0.0.1", 8080, 1.0))
        self.assertEqual(
            c.transport.value(),
            b"GET /health HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: nlbproxy-check\r\nConnection: close\r\n\r\n",
        )
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(c.aborted)

    def test_ipv6_host_header_and_override(self) -> None:
        probe = HttpProbe(self.reactor, "2001:db8::1", 80, "/", 1.0, lambda up, why: None)
        probe.start()
        self.reactor.advance(0)
        self.assertIn(b"Host: [2001:db8::1]:80\r\n", Connection(self.reactor).open().transport.value())
        probe = HttpProbe(self.reactor, "10.0.0.1", 80, "/", 1.0, lambda up, why: None, host_header="app.example")
        probe.start()
        self.reactor.advance(0)
        self.assertIn(b"Host: app.example\r\n", Connection(self.reactor).open().transport.value())

    def test_bad_path_fails_at_configuration(self) -> None:
        self.assertRaises(ValueError, HttpProbe, self.reactor, "10.0.0.1", 80, "/a b", 1.0, lambda up, why: None)
        self.assertRaises(ValueError, HttpProbe, self.reactor, "10.0.0.1", 80, "/", 0, lambda up, why: None)
        self.assertRaises(ValueError, HttpProbe, self.reactor, "10.0.0.1", 80, "/", 1, lambda up, why: None, rise=0)

    def test_rise_and_fall(self) -> None:
        probe = self.probe()
        self.check(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual((probe.up, self.changes), (True, []))
        self.next_check(probe)
        self.check(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        self.assertTrue(probe.up)  # one failure of fall=2
        self.next_check(probe)
        self.check(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        self.assertEqual((probe.up, self.changes), (False, [(False, "HTTP 503")]))
        self.next_check(probe)
        self.check(b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n")
        self.assertFalse(probe.up)  # one success of rise=2
        self.next_check(probe)
        self.check(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual((probe.up, self.changes[-1]), (True, (True, "HTTP 204")))
        self.assertEqual(probe.stats, {"ok": 3, "failed": 2})

    def test_first_result_decides(self) -> None:
        probe = self.probe()
        self.check(None)
        [(up, reason)] = self.changes
        self.assertFalse(up or probe.up)
        self.assertIn("refused", reason)
        self.assertTrue(reason.startswith("connect: "))

    def test_custom_rise_fall(self) -> None:
        probe = self.probe(rise=1, fall=3)
        self.check(b"HTTP/1.1 200 OK\r\n\r\n")
        for _ in range(2):
            self.next_check(probe)
            self.check(None)
        self.assertTrue(probe.up)
        self.next_check(probe)
        self.check(None)
        self.assertFalse(probe.up)
        self.next_check(probe)
        self.check(b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertTrue(probe.up)

    def test_timeout(self) -> None:
        probe = self.probe(interval=5.0)
        self.assertEqual(probe.timeout, MAX_TIMEOUT)
        c = Connection(self.reactor).open()
        self.reactor.advance(MAX_TIMEOUT)
        self.assertTrue(c.aborted)
        self.assertEqual(self.changes, [(False, "no answer within 2 s")])
        c.close()  # the abort lands
        self.assertEqual(len(self.changes), 1)
        # The next check starts an interval after the last one started.
        self.reactor.advance(5.0 - MAX_TIMEOUT - 0.001)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.001)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_timeout_while_connecting(self) -> None:
        probe = self.probe(interval=0.5)
        self.assertEqual(probe.timeout, 0.5)
        c = Connection(self.reactor)
        self.reactor.advance(0.5)
        self.assertTrue(c.connector.stoppedConnecting)
        self.assertEqual(self.changes, [(False, "no answer within 0.5 s")])

    def test_malformed_answers_and_early_close(self) -> None:
        probe = self.probe(rise=1, fall=1)
        self.check(b"HTTP/1.1 200 OK\r\n\r\n")
        self.next_check(probe)
        self.check(b"HTTP/1.1 abc OK\r\n\r\n")
        self.assertEqual(self.changes[-1][0], False)
        self.assertTrue(self.changes[-1][1].startswith("malformed answer"))
        self.next_check(probe)
        self.check(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(self.changes[-1], (True, "HTTP 200"))
        self.next_check(probe)
        self.check(b"HTTP/1.1 2", close=True)
        self.assertEqual(self.changes[-1], (False, "connection closed before an answer"))
        self.next_check(probe)
        self.check(b"SSH-2.0-OpenSSH_9.6\r\n", close=True)
        self.assertEqual(self.changes[-1], (False, "connection closed before an answer"))
        self.next_check(probe)
        self.check(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")  # the status is enough
        self.assertEqual(self.changes[-1], (True, "HTTP 200"))
        self.next_check(probe)
        c = self.check(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 9000)  # head past MAX_RESPONSE_HEAD
        self.assertTrue(c.aborted)
        self.assertFalse(probe.up)
        self.assertTrue(self.changes[-1][1].startswith("malformed answer"))

    def test_passive_failures_count(self) -> None:
        probe = self.probe()
        self.check(b"HTTP/1.1 200 OK\r\n\r\n")
        probe.passive_failure("connection refused")
        self.assertTrue(probe.up)
        probe.passive_failure("reset before any response byte")
        self.assertEqual(self.changes, [(False, "passive: reset before any response byte")])
        self.assertEqual(probe.stats["passive"], 2)

    def test_stop_leaves_nothing_behind(self) -> None:
        probe = self.probe()
        c = Connection(self.reactor).open()
        stopped = probe.stop()
        self.assertTrue(c.aborted)
        self.assertNoResult(stopped)
        c.close()
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.changes, [])
        # Idle between checks: nothing to wait for.
        probe.start()
        self.reactor.advance(0)
        self.check(b"HTTP/1.1 200 OK\r\n\r\n", close=True)
        self.successResultOf(probe.stop())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_while_connecting(self) -> None:
        probe = self.probe()
        c = Connection(self.reactor)
        self.successResultOf(probe.stop())
        self.assertTrue(c.connector.stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        # A connection that completes anyway is closed at once.
        c.open()
        self.assertTrue(c.aborted)
        self.assertEqual(self.changes, [])


class ParseAgentLineTests(SynchronousTestCase):
    def test_words(self) -> None:
        self.assertEqual(parse_agent_line("up"), AgentReport(health=True))
        for word in ("down", "fail", "stopped", "DOWN"):
            self.assertEqual(parse_agent_line(word).health, False)
        self.assertEqual(parse_agent_line("ready").directive, "active")
        self.assertEqual(parse_agent_line("drain").directive, "draining")
        self.assertEqual(parse_agent_line("maint").directive, "inactive")
        self.assertEqual(parse_agent_line("75%").weight_pct, 75)

    def test_combined_and_description(self) -> None:
        self.assertEqual(
            parse_agent_line(" up, ready 50%\tmaxconn:30 bogus"),
            AgentReport(True, "active", 50, "", ("maxconn:30", "bogus")),
        )
        self.assertEqual(parse_agent_line("down#disk full, sorry"), AgentReport(False, description="disk full, sorry"))
        self.assertEqual(parse_agent_line("drain,up,down").health, False)  # the last word wins
        self.assertEqual(parse_agent_line("").health, None)
        self.assertEqual(parse_agent_line("1000%").weight_pct, MAX_WEIGHT_PCT)

    @given(st.text(max_size=300))
    def test_any_text_parses(self, line: str) -> None:
        report = parse_agent_line(line)
        self.assertIn(report.health, (None, True, False))
        self.assertIn(report.directive, (None, "active", "draining", "inactive"))
        self.assertTrue(report.weight_pct is None or 0 <= report.weight_pct <= MAX_WEIGHT_PCT)


class AgentCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.changes: list[tuple[bool | None, str | None, int | None, str]] = []
        self.agent = AgentCheck(self.reactor, "10.0.0.1", 9999, 1.0,
                                lambda *change: self.changes.append(change))
        self.agent.start()
        self.reactor.advance(0)

    def line(self, data: bytes, close: bool = True) -> Connection:
        c = Connection(self.reactor).open()
        c.send(data)
        if close:
            c.close()
        self.reactor.advance(self.agent.interval)
        return c

    def test_state_merges_what_lines_say(self) -> None:
        c = self.line(b"up ready 100%\n")
        self.assertEqual((c.host, c.port), ("10.0.0.1", 9999))
        self.assertEqual(self.changes, [(True, "active", 100, "up ready 100%")])
        self.line(b"drain 50%\r\n")
        self.assertEqual(self.changes[-1], (True, "draining", 50, "drain 50%"))
        self.line(b"drain 50%\n")  # nothing new: no call
        self.assertEqual(len(self.changes), 2)
        self.line(b"down#maintenance window\n")
        self.assertEqual(self.changes[-1], (False, "draining", 50, "maintenance window"))
        self.line(b"maint")  # no newline: the close ends the line
        self.assertEqual(self.changes[-1], (False, "inactive", 50, "maint"))
        self.assertEqual(self.agent.stats["line"], 5)

    def test_errors_change_nothing(self) -> None:
        self.line(b"up\n")
        Connection(self.reactor).refuse()
        self.reactor.advance(1.0)
        self.line(b"")  # closed without a line
        c = self.line(b"x" * (MAX_LINE + 10), close=False)
        self.assertTrue(c.aborted)
        self.line(b"up" + b" " * MAX_LINE + b"\n")
        self.assertEqual(self.changes, [(True, None, None, "up")])
        self.assertEqual(self.agent.stats["error"], 4)
        self.assertIn("longer than 256", self.agent.last_error)

    def test_timeout_and_stop(self) -> None:
        c = Connection(self.reactor).open()
        self.reactor.advance(1.0)
        self.assertTrue(c.aborted)
        self.assertEqual(self.agent.last_error, "no answer within 1 s")
        c.close()
        c = Connection(self.reactor).open()
        stopped = self.agent.stop()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(c.aborted)
        self.assertNoResult(stopped)
        c.close()
        self.successResultOf(stopped)
        self.assertEqual(self.changes, [])


# --- real servers on loopback ---------------------------------------------------------

DEADLINE = 10.0


def wait_until(predicate: Callable[[], bool], what: str) -> Any:
    """Polls ``predicate`` on the reactor until true, failing after DEADLINE."""
    from twisted.internet import reactor

    deadline = time.monotonic() + DEADLINE

    @pytest_twisted.inlineCallbacks
    def poll():
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.01, lambda: None)

    return poll()


class Flipping(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.hits = 0

    def render_GET(self, request: Any) -> bytes:
        self.hits += 1
        request.setResponseCode(self.status)
        return b"ok" if self.status == 200 else b"broken"


@pytest_twisted.inlineCallbacks
def test_http_probe_against_a_real_server():
    from twisted.internet import reactor as installed

    reactor: Any = installed

    site = Flipping()
    port = reactor.listenTCP(0, server.Site(site), interface="127.0.0.1")
    changes: list[tuple[bool, str]] = []
    # A timeout longer than the interval: generous on a busy machine.
    probe = HttpProbe(reactor, "127.0.0.1", port.getHost().port, "/health", 0.05,
                      lambda up, why: changes.append((up, why)), timeout=1.0)
    try:
        probe.start()
        yield wait_until(lambda: site.hits >= 2, "two good checks")
        assert probe.up and changes == []
        site.status = 500
        yield wait_until(lambda: not probe.up, "the probe to see the 500s")
        assert changes == [(False, "HTTP 500")]
        site.status = 200
        yield wait_until(lambda: probe.up, "the probe to see the 200s again")
        assert changes == [(False, "HTTP 500"), (True, "HTTP 200")]
    finally:
        yield probe.stop()
        yield port.stopListening()
    assert not probe._open and probe._next is None


class LineServer(Protocol):
    factory: Any

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.factory.line)
        self.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_agent_check_against_a_real_server():
    from twisted.internet import reactor as installed

    reactor: Any = installed

    factory = Factory.forProtocol(LineServer)
    factory.line = b"up ready 100%\n"  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    changes: list[tuple[Any, ...]] = []
    check = AgentCheck(reactor, "127.0.0.1", port.getHost().port, 0.05, lambda *c: changes.append(c), timeout=1.0)
    try:
        check.start()
        yield wait_until(lambda: changes == [(True, "active", 100, "up ready 100%")], "the first line")
        factory.line = b"drain 50%\n"  # type: ignore[attr-defined]
        yield wait_until(lambda: len(changes) == 2, "the drain")
        assert changes[-1] == (True, "draining", 50, "drain 50%")
        factory.line = b"down#maintenance\n"  # type: ignore[attr-defined]
        yield wait_until(lambda: len(changes) == 3, "the down")
        assert changes[-1] == (False, "draining", 50, "maintenance")
    finally:
        yield check.stop()
        yield port.stopListening()
    assert not check._open and check._next is None
