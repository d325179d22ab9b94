# -*- test-case-name: tests.test_session_client -*-
"""Session announcements for a Twisted web application, in one line.

::

    from nlbproxy.session.twisted_helper import announce_sessions

    site = Site(root)
    announce_sessions(site, "web", "http://127.0.0.1:9902")          # Twisted's own sessions
    announce_sessions(site, "web", "http://127.0.0.1:9902", "sid")   # or the app's cookie "sid"

Every response the wrapped resource tree sends is looked at once, as its
headers go out: when it sets the session cookie to a new value the session
is announced to the host agent (``POST /v1/sessions``); when it clears the
cookie (empty value, ``Max-Age=0`` or an ``Expires`` in the past) the
session the request carried is terminated (``POST /v1/sessions/end``); when
it replaces the value, the old session is terminated too unless
``end_replaced=False``.  For Twisted's own sessions (``request.getSession()``,
cookie ``TWISTED_SESSION``, the default) a session that expires on the server
is terminated as well.  The cookie name is compared exactly; Twisted prefixes
its session cookie with the site's path segments when the site is mounted
below the root (``TWISTED_SESSION_app``), so pass that name then.

Nothing waits on the agent: announcements are queued and sent once per
reactor turn, many per request, one request at a time and in order (an up
and a down of one key in one turn send only the last), through
``twisted.web.client.Agent`` with a persistent connection.  If the agent
cannot be reached they are retried every :data:`RETRY_DELAY` seconds; what
the agent refuses (a bad key, an unknown app) is logged and dropped.  At
most :data:`MAX_QUEUE` announcements wait; past that the oldest are dropped
and counted, so an agent that is down for long cannot grow the application.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from io import BytesIO
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.protocol import Protocol as Protocol_
from twisted.internet.protocol import connectionDone
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from nlbproxy.cookies import parse_set_cookie

__all__ = [
    "MAX_QUEUE",
    "RETRY_DELAY",
    "Announcer",
    "SessionAnnouncer",
    "SessionAnnouncingResource",
    "announce_sessions",
    "parse_set_cookie",
]

log = Logger()

#: Announcements waiting for the agent; past it the oldest are dropped.
MAX_QUEUE = 100_000
#: Sessions per request to the agent (its MAX_SESSIONS_PER_REQUEST).
MAX_PER_REQUEST = 10_000
#: Seconds between tries while the agent cannot be reached.
RETRY_DELAY = 1.0
#: Bytes of an agent's answer kept (for the log line of a refusal).
MAX_ANSWER = 4096
#: Twisted's session cookie (``Request.getSession``) for a site at the root.
TWISTED_SESSION = "TWISTED_SESSION"

_MARK = "_nlbproxy_session_hook"


class SessionAnnouncer:
    """Sends ups and downs of ``app``'s sessions to the agent at ``api_url``,
    batched per reactor turn, one request at a time.

    ``stats`` counts "up", "down" (queued), "sent", "refused", "retries" and
    "dropped" (queue overflow).
    """

    def __init__(self, reactor: Any, api_url: str, app: str, kind: str = "http-cookie",
                 agent: Any = None) -> None:
        self.reactor = reactor
        self.app = app
        self.kind = kind
        self._pool = HTTPConnectionPool(reactor)
        if api_url.startswith("unix:"):
            path = api_url[len("unix:") :]
            self._base = b"http://localhost"
            self.agent = agent or Agent.usingEndpointFactory(
                reactor, _Endpoints(lambda: UNIXClientEndpoint(reactor, path)), pool=self._pool
            )
        else:
            self._base = api_url.rstrip("/").encode()
            self.agent = agent or Agent(reactor, pool=self._pool)
        #: key -> True (up) or False (down); insertion order is the order of changes.
        self._queue: dict[str, bool] = {}
        self._busy = False
        self._scheduled: Any = None
        self.stats: Counter[str] = Counter()

    def up(self, key: str) -> None:
        self._enqueue(key, True)

    def down(self, key: str) -> None:
        self._enqueue(key, False)

    def _enqueue(self, key: str, up: bool) -> None:
        self.stats["up" if up else "down"] += 1
        self._queue.pop(key, None)
        self._queue[key] = up
        while len(self._queue) > MAX_QUEUE:
            del self._queue[next(iter(self._queue))]
            self.stats["dropped"] += 1
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._scheduled is None and not self._busy:
            self._scheduled = self.reactor.callLater(delay, self._send)

    def idle(self) -> bool:
        """Nothing queued or in flight (for tests and clean shutdowns)."""
        return not self._queue and not self._busy

    def close(self) -> Deferred[None]:
        """Close the kept-alive connection to the agent (at shutdown)."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        return self._pool.closeCachedConnections()

    def _send(self) -> None:
        self._scheduled = None
        if self._busy or not self._queue:
            return
        # Downs first when both are queued: keys are distinct in the queue,
        # so the two requests cannot reorder one key's changes.
        downs = [key for key, up in self._queue.items() if not up][:MAX_PER_REQUEST]
        if downs:
            sent = {key: False for key in downs}
            path, document = b"/v1/sessions/end", [{"app": self.app, "key": key} for key in downs]
        else:
            ups = list(self._queue)[:MAX_PER_REQUEST]
            sent = {key: True for key in ups}
            path, document = b"/v1/sessions", [{"app": self.app, "key": key, "kind": self.kind} for key in ups]
        for key in sent:
            del self._queue[key]
        self._busy = True
        body = FileBodyProducer(BytesIO(json.dumps(document).encode()))
        d: Deferred[Any] = self.agent.request(
            b"POST", self._base + path, Headers({b"Content-Type": [b"application/json"]}), body
        )
        d.addCallback(self._answered, sent)
        d.addErrback(self._unreachable, sent)

    def _answered(self, response: Any, sent: dict[str, bool]) -> Deferred[Any]:
        d: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(d))
        d.addCallback(self._read, response.code, sent)
        return d

    def _read(self, body: bytes, code: int, sent: dict[str, bool]) -> None:
        self._busy = False
        if 200 <= code < 300:
            self.stats["sent"] += len(sent)
        elif code >= 500:
            self._requeue(sent, f"agent answered {code}: {body[:200]!r}")
            return
        else:
            self.stats["refused"] += len(sent)
            log.warn("session agent refused {n} announcements of {app}: {code} {body}",
                     n=len(sent), app=self.app, code=code, body=body[:200].decode("utf-8", "replace"))
        if self._queue:
            self._schedule(0)

    def _unreachable(self, failure: Failure, sent: dict[str, bool]) -> None:
        self._busy = False
        self._requeue(sent, failure.getErrorMessage())

    def _requeue(self, sent: dict[str, bool], why: str) -> None:
        if self.stats["retries"] == 0 or self.stats["retries"] % 60 == 0:
            log.warn("cannot announce sessions of {app} to the agent ({why}); retrying every {delay} s",
                     app=self.app, why=why, delay=RETRY_DELAY)
        self.stats["retries"] += 1
        # Newer changes of a key (queued while this request was out) win.
        requeued = {key: up for key, up in sent.items() if key not in self._queue}
        requeued.update(self._queue)
        self._queue = requeued
        while len(self._queue) > MAX_QUEUE:
            del self._queue[next(iter(self._queue))]
            self.stats["dropped"] += 1
        self._schedule(RETRY_DELAY)


class _Collect(Protocol_):
    """Collects an answer's body (at most :data:`MAX_ANSWER` bytes are kept:
    only error messages are read, for the log)."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size < MAX_ANSWER:
            self.chunks.append(data[: MAX_ANSWER - self.size])
            self.size += len(self.chunks[-1])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # ResponseDone, or a connection lost mid-body: either way the status
        # line already said what happened.
        self.done.callback(b"".join(self.chunks))


class _Endpoints:
    """An IAgentEndpointFactory that always connects to one endpoint."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make

    def endpointForURI(self, uri: Any) -> Any:
        return self._make()


class Announcer(Protocol):
    """What the resource needs: :class:`SessionAnnouncer` or a test's recorder."""

    def up(self, key: str) -> None: ...

    def down(self, key: str) -> None: ...


class SessionAnnouncingResource(Resource):
    """Wraps ``wrapped`` (the root of a resource tree) so that its responses'
    session cookies are announced through ``announcer``, or through the one
    ``factory`` makes on the first request (from that request, so that it can
    use the site's reactor)."""

    def __init__(self, wrapped: IResource, cookie_name: str, announcer: Announcer | None = None,
                 factory: Callable[[Request], Announcer] | None = None, end_replaced: bool = True) -> None:
        super().__init__()
        if (announcer is None) == (factory is None):
            raise TypeError("give exactly one of announcer and factory")
        self.wrapped = wrapped
        self.cookie_name = cookie_name
        self._announcer = announcer
        self._factory = factory
        self.end_replaced = end_replaced
        self.isLeaf = bool(getattr(wrapped, "isLeaf", False))
        #: Twisted session uids whose expiry is being watched.
        self._watched: set[str] = set()

    @property
    def made_announcer(self) -> Announcer | None:
        """The announcer, once given or made."""
        return self._announcer

    def announcer(self, request: Request) -> Announcer:
        if self._announcer is None:
            assert self._factory is not None
            self._announcer = self._factory(request)
        return self._announcer

    def putChild(self, path: bytes, child: IResource) -> None:
        self.wrapped.putChild(path, child)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        self._hook(request)
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request: Request) -> Any:
        self._hook(request)
        return self.wrapped.render(request)

    def _hook(self, request: Request) -> None:
        """Look at the response headers the moment they are written: every
        way a response starts (``write``, ``finish`` of an empty body)
        passes through ``request.write``."""
        if getattr(request, _MARK, False):
            return
        setattr(request, _MARK, True)
        write = request.write

        def hooked(data: bytes) -> None:
            if not request.startedWriting:
                try:
                    self._inspect(request)
                except Exception:
                    log.failure("session announcement of {uri} failed", uri=request.uri)
            write(data)

        request.write = hooked  # type: ignore[method-assign]

    def _inspect(self, request: Request) -> None:
        name = self.cookie_name
        sent = [c for c in request.cookies if c.split(b"=", 1)[0].strip().decode("latin-1") == name]
        sent += [c for c in request.responseHeaders.getRawHeaders(b"set-cookie", [])
                 if c.split(b"=", 1)[0].strip().decode("latin-1") == name]
        if not sent:
            return
        _, value, cleared = parse_set_cookie(sent[-1])
        raw_old = request.getCookie(name.encode("latin-1"))
        old = raw_old.decode("latin-1") if raw_old else None
        announcer = self.announcer(request)
        if cleared:
            if old:
                announcer.down(old)
            return
        if value == old:
            return
        announcer.up(value)
        if old and self.end_replaced:
            announcer.down(old)
        self._watch_twisted_session(request, value, announcer)

    def _watch_twisted_session(self, request: Request, uid: str, announcer: Announcer) -> None:
        """A Twisted session expires on the server with no cookie change:
        terminate it then."""
        site = getattr(request, "site", None)
        session = getattr(site, "sessions", {}).get(uid.encode("latin-1"))
        if session is None or uid in self._watched:
            return
        self._watched.add(uid)

        def expired() -> None:
            self._watched.discard(uid)
            announcer.down(uid)

        session.notifyOnExpire(expired)


def announce_sessions(site_or_resource: Site | IResource, app: str, api_url: str,
                      cookie_name: str = TWISTED_SESSION, *, kind: str = "http-cookie",
                      end_replaced: bool = True, reactor: Any = None) -> Any:
    """Announce the sessions of a Twisted web application to its host agent.

    ``site_or_resource`` is a :class:`~twisted.web.server.Site` (its root
    resource is wrapped in place and the site returned) or a root resource
    (the wrapping resource is returned: serve that).  ``app`` is the pool
    name the agent serves the application as, ``api_url`` the agent's API
    (``http://127.0.0.1:9902`` or ``unix:/path``), ``cookie_name`` the
    session cookie.  The reactor is the site's unless given.
    """
    def make(request: Request) -> SessionAnnouncer:
        used = reactor
        if used is None:
            used = getattr(getattr(request, "site", None), "reactor", None)
        if used is None:
            raise RuntimeError("announce_sessions: pass reactor=, the request has no site reactor")
        return SessionAnnouncer(used, api_url, app, kind)

    announcer = None if reactor is None else SessionAnnouncer(reactor, api_url, app, kind)
    factory = make if reactor is None else None
    if isinstance(site_or_resource, Site):
        site_or_resource.resource = SessionAnnouncingResource(
            site_or_resource.resource, cookie_name, announcer, factory, end_replaced
        )
        return site_or_resource
    return SessionAnnouncingResource(site_or_resource, cookie_name, announcer, factory, end_replaced)
