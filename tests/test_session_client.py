"""The applications' side of session tracking: the stdlib client
(nlbproxy.session.client) against a real ``twistd nlbagent`` whose sessions
reach a unit's receiver over real UDP, and the Twisted helper
(nlbproxy.session.twisted_helper) -- its cookie logic as event scripts, and
a Twisted web application announcing through a real agent API on loopback.

The ``SynchronousTestCase`` classes run under trial and pytest alike; the
real-process and real-reactor tests run under pytest (pytest-twisted).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nlbproxy.health.codec import ReplayGuard
from nlbproxy.health.messages import SessionKind, node_id
from nlbproxy.session.client import SessionClient, SessionRefused, SessionUnavailable
from nlbproxy.session.twisted_helper import (
    SessionAnnouncer,
    SessionAnnouncingResource,
    announce_sessions,
    parse_set_cookie,
)
from nlbproxy.session.unitside import SessionReceiver
from tests.realnet import Farm, UnitSocket, agent_config, start_agent, wait_until
from tests.test_admin import exchange

SECRET = b"session e2e secret"


class ReceivingUnit(UnitSocket):
    """A unit's health socket as far as sessions go: decodes what the agent
    sends with the real codec and answers through the real receiver."""

    def __init__(self) -> None:
        super().__init__(SECRET, "unit")
        self.guard = ReplayGuard()
        self.sessions: dict[tuple[str, str], tuple[SessionKind, str, int]] = {}
        self.receiver = SessionReceiver(self.send, self._up, self._down)

    def _up(self, app: str, key: str, kind: SessionKind, endpoint: str, agent: int) -> None:
        self.sessions[(app, key)] = (kind, endpoint, agent)

    def _down(self, app: str, key: str, agent: int) -> None:
        self.sessions.pop((app, key), None)

    def pump(self) -> None:
        for source, envelope in self.receive():
            if envelope is not None and self.guard.accept(envelope) and SessionReceiver.handles(envelope.message):
                self.receiver.receive(source, envelope)

    def wait_for(self, predicate: Any, what: str) -> None:
        def check() -> bool:
            self.pump()
            return bool(predicate())

        wait_until(check, what=what)


@pytest.fixture
def unit() -> Iterator[ReceivingUnit]:
    u = ReceivingUnit()
    try:
        yield u
    finally:
        u.close()


def test_client_against_a_real_agent(farm: Farm, unit: ReceivingUnit) -> None:
    (farm.tmp / "health.key").write_bytes(SECRET)
    config = agent_config("host-s", [f"127.0.0.1:{unit.address[1]}"],
                          [("web", "127.0.0.1:8080"), ("api", "127.0.0.1:9000"), ("api", "127.0.0.1:9001")],
                          "health.key")
    agent, api = start_agent(farm, config, "host-s")
    agent_id = node_id("host-s")

    with SessionClient(api) as client:
        record = client.up("web", "c00kie")
        assert (record["app"], record["key"], record["kind"], record["endpoint"]) == (
            "web", "c00kie", "http-cookie", "127.0.0.1:8080")
        unit.wait_for(lambda: ("web", "c00kie") in unit.sessions, "the session at the unit")
        assert unit.sessions[("web", "c00kie")] == (SessionKind.HTTP_COOKIE, "127.0.0.1:8080", agent_id)

        client.up("api", "user-7", kind="user", endpoint="127.0.0.1:9001")
        assert client.get("user-7")["endpoint"] == "127.0.0.1:9001"  # type: ignore[index]

        # Bulk: 20,000 sessions in two requests, all at the unit.
        started = time.monotonic()
        assert client.up_many(("web", f"bulk-{i:05d}") for i in range(20_000)) == 20_000
        took = time.monotonic() - started
        unit.wait_for(lambda: len(unit.sessions) == 20_002, "20,000 bulk sessions at the unit")
        assert took < 10, took

        assert client.down("c00kie") is True
        assert client.down("c00kie") is False
        assert client.down_many(f"bulk-{i:05d}" for i in range(0, 20_000, 2)) == 10_000
        unit.wait_for(lambda: len(unit.sessions) == 10_001, "the terminations at the unit")
        assert ("web", "c00kie") not in unit.sessions

        listed = list(client.sessions(app="web", page=1000))
        assert len(listed) == 10_000
        assert [s["key"] for s in listed] == sorted(s["key"] for s in listed)

        with pytest.raises(SessionRefused) as refused:
            client.up("nope", "k")
        assert refused.value.status == 400 and "not served" in refused.value.message
        with pytest.raises(SessionRefused):
            client.up("web", "k" * 256)
        with pytest.raises(SessionRefused):
            client.up("api", "k")  # two endpoints: name one
        assert client.get("missing") is None

        # Keys travel escaped in paths: a slash, a space, a non-ASCII letter.
        odd = "a/b c?é"
        client.up("web", odd)
        assert client.get(odd, app="web")["key"] == odd  # type: ignore[index]
        assert client.down(odd, app="web") is True
    assert "Traceback" not in agent.output(), agent.output()


def test_client_errors_without_an_agent() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = SessionClient(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(SessionUnavailable) as unavailable:
        client.up("web", "k")
    assert unavailable.value.status is None
    with pytest.raises(ValueError):
        SessionClient("ftp://x")


# -- the Twisted helper ------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def up(self, key: str) -> None:
        self.calls.append(("up", key))

    def down(self, key: str) -> None:
        self.calls.append(("down", key))


class App(Resource):
    """Login sets the cookie, logout clears it, rotate replaces it, page leaves it."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        path = request.path
        if path == b"/login":
            request.addCookie(b"sid", b"s-1", path=b"/")
        elif path == b"/rotate":
            request.addCookie(b"sid", b"s-2", path=b"/")
        elif path == b"/logout":
            request.addCookie(b"sid", b"", max_age=b"0", path=b"/")
        elif path == b"/raw-logout":
            request.setHeader(b"Set-Cookie", b"sid=deleted; Expires=Thu, 01 Jan 1970 00:00:00 GMT")
        elif path == b"/twisted":
            request.getSession()
        elif path == b"/other":
            request.addCookie(b"theme", b"dark")
        return b"ok"


def get(site: Site, path: str, cookie: str = "") -> None:
    headers = f"Cookie: {cookie}\r\n" if cookie else ""
    [(response, _)] = exchange(site, f"GET {path} HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode())
    assert response.status_code == 200


class HelperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.recorder = Recorder()
        self.site = Site(SessionAnnouncingResource(App(), "sid", self.recorder))

    def test_login_logout_rotate(self) -> None:
        get(self.site, "/login")
        get(self.site, "/page", "sid=s-1")
        get(self.site, "/login", "sid=s-1")  # the same value again: nothing
        get(self.site, "/rotate", "sid=s-1")
        get(self.site, "/logout", "sid=s-2")
        get(self.site, "/raw-logout", "sid=s-3")
        get(self.site, "/logout")  # no session to end
        get(self.site, "/other", "sid=s-4")
        self.assertEqual(self.recorder.calls,
                         [("up", "s-1"), ("up", "s-2"), ("down", "s-1"), ("down", "s-2"), ("down", "s-3")])

    def test_replaced_sessions_can_be_kept(self) -> None:
        site = Site(SessionAnnouncingResource(App(), "sid", self.recorder, end_replaced=False))
        get(site, "/rotate", "sid=s-1")
        self.assertEqual(self.recorder.calls, [("up", "s-2")])

    def test_twisted_sessions_and_their_expiry(self) -> None:
        clock = Clock()
        site = Site(App(), reactor=clock)
        site.sessionFactory.sessionTimeout = 10
        site.resource = SessionAnnouncingResource(site.resource, "TWISTED_SESSION", self.recorder)
        get(site, "/twisted")
        [(what, uid)] = self.recorder.calls
        self.assertEqual(what, "up")
        self.assertIn(uid.encode(), site.sessions)
        clock.advance(11)
        self.assertEqual(self.recorder.calls, [("up", uid), ("down", uid)])

    def test_tree_below_the_wrapper(self) -> None:
        root = Resource()
        root.putChild(b"app", App())
        site = Site(SessionAnnouncingResource(root, "sid", self.recorder))
        get(site, "/app")
        self.assertEqual(self.recorder.calls, [])

    def test_announce_sessions_wraps_a_site_or_a_resource(self) -> None:
        site = Site(App())
        self.assertIs(announce_sessions(site, "web", "http://127.0.0.1:1", "sid", reactor=Clock()), site)
        self.assertIsInstance(site.resource, SessionAnnouncingResource)
        wrapped = announce_sessions(App(), "web", "http://127.0.0.1:1")
        self.assertIsInstance(wrapped, SessionAnnouncingResource)

    def test_parse_set_cookie(self) -> None:
        past = formatdate(time.time() - 60, usegmt=True)
        future = formatdate(time.time() + 3600, usegmt=True)
        self.assertEqual(parse_set_cookie(b"sid=abc; Path=/; HttpOnly"), ("sid", "abc", False))
        self.assertEqual(parse_set_cookie('sid="q v"; Max-Age=60'), ("sid", "q v", False))
        self.assertEqual(parse_set_cookie("sid=abc; Max-Age=0"), ("sid", "abc", True))
        self.assertEqual(parse_set_cookie("sid=; Path=/"), ("sid", "", True))
        self.assertEqual(parse_set_cookie(f"sid=abc; Expires={past}"), ("sid", "abc", True))
        self.assertEqual(parse_set_cookie(f"sid=abc; expires={future}"), ("sid", "abc", False))
        self.assertEqual(parse_set_cookie("sid=abc; Max-Age=soon; Expires=never"), ("sid", "abc", False))


class FakeResponse:
    phrase = b"OK"

    def __init__(self, code: int, body: bytes = b"{}") -> None:
        self.code = code
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Records requests; each answers when the test says."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any, body: Any) -> Any:
        d: Deferred[Any] = Deferred()
        self.requests.append((uri, d))
        return d


class AnnouncerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        self.announcer = SessionAnnouncer(self.clock, "http://127.0.0.1:9902", "web", agent=self.agent)

    def answer(self, code: int) -> None:
        _, d = self.agent.requests.pop(0)
        d.callback(FakeResponse(code))

    def test_one_request_per_turn_in_order(self) -> None:
        for key in ("a", "b", "c"):
            self.announcer.up(key)
        self.announcer.down("b")  # coalesced with its up: only the down goes
        self.clock.advance(0)
        self.assertEqual([uri for uri, _ in self.agent.requests], [b"http://127.0.0.1:9902/v1/sessions/end"])
        self.announcer.up("d")
        self.clock.advance(0)
        self.assertEqual(len(self.agent.requests), 1)  # one at a time
        self.answer(200)
        self.clock.advance(0)
        self.assertEqual([uri for uri, _ in self.agent.requests], [b"http://127.0.0.1:9902/v1/sessions"])
        self.answer(201)
        self.assertTrue(self.announcer.idle())
        self.assertEqual(self.announcer.stats["sent"], 4)

    def test_unreachable_agent_is_retried(self) -> None:
        self.announcer.up("a")
        self.clock.advance(0)
        _, d = self.agent.requests.pop(0)
        d.errback(ConnectionRefusedError())
        self.clock.advance(0.5)
        self.assertEqual(self.agent.requests, [])
        self.clock.advance(0.6)
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.announcer.stats["retries"], 1)

    def test_refused_is_dropped(self) -> None:
        self.announcer.up("a")
        self.clock.advance(0)
        self.answer(400)
        self.assertTrue(self.announcer.idle())
        self.assertEqual(self.announcer.stats["refused"], 1)
        self.flushLoggedErrors()


@pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_a_twisted_app_announces_through_a_real_agent_api():
    """announce_sessions on a real Site; the agent API on loopback; Twisted's client."""
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody

    from nlbproxy.agent.api import make_api_site
    from nlbproxy.health.messages import RowKey
    from nlbproxy.health.table import AppSpec, HealthTable
    from nlbproxy.session.agentside import SessionSender

    table = HealthTable([AppSpec(RowKey("web", "10.0.0.7:8080"))], reactor)
    sent: list[Any] = []
    sender = SessionSender([("127.0.0.1", 9)], reactor, lambda address, message: sent.append(message))
    api_site: Any = make_api_site(table, lambda c: None, "host", reactor, sender)
    api_port: Any = reactor.listenTCP(0, api_site, interface="127.0.0.1")
    api_url = f"http://127.0.0.1:{api_port.getHost().port}"
    app_site = announce_sessions(Site(App(), reactor=reactor), "web", api_url, "sid")
    app_port: Any = reactor.listenTCP(0, app_site, interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{app_port.getHost().port}".encode()
        client = Agent(reactor)
        response = yield client.request(b"GET", base + b"/login")
        yield readBody(response)
        yield _poll(lambda: ("web", "s-1") in sender.table)
        response = yield client.request(b"GET", base + b"/logout", Headers({b"Cookie": [b"sid=s-1"]}))
        yield readBody(response)
        yield _poll(lambda: ("web", "s-1") not in sender.table)
    finally:
        sender.stop()
        yield app_port.stopListening()
        yield api_port.stopListening()
        yield app_site.resource.made_announcer.close()


def _poll(predicate: Any, timeout: float = 10.0) -> Any:
    from twisted.internet import reactor, task

    end = time.monotonic() + timeout

    def check() -> Any:
        if predicate():
            return None
        if time.monotonic() > end:
            raise AssertionError("timed out")
        clock: Any = reactor
        return task.deferLater(clock, 0.01, check)

    return check()
