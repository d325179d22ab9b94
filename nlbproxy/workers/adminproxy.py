# -*- test-case-name: tests.test_workers -*-
"""The admin API of a multi-process unit, served by its supervisor.

The contract is the single unit's (:mod:`nlbproxy.admin`); the supervisor
answers it for the whole unit from its workers' private admin APIs (loopback
sockets it created, a bearer token it drew):

* changes -- ``PUT .../directive``, ``POST .../cache/purge``, ``DELETE`` of a
  session -- go to every running worker; a directive the workers took is also
  remembered and replayed to a worker that restarts, before it serves (its
  admin socket takes the calls while its listeners still wait for the farm);
* ``GET /api/v1/state`` and ``GET /metrics`` are every running worker's
  documents merged (:mod:`nlbproxy.workers.aggregate`), plus the workers'
  own state and counters;
* ``POST /api/v1/reload`` and ``/upgrade`` are the supervisor's own
  (:meth:`~nlbproxy.workers.supervisor.Supervisor.reload_file`, ``upgrade``):
  200 ``{"reloaded": true, "roll": ...}`` / 202 ``{"upgrading": true, ...}``,
  or 409 ``{"error": ..., "reasons": [...]}``;
* ``/api/v1/workers/I/...`` is worker I's own answer to ``/...`` (its own
  state, metrics, health), to find a worker that disagrees;
* anything else (sessions, health, the status page) is any one running
  worker's answer, since they share that knowledge.

A worker that does not answer within :data:`~nlbproxy.limits.WORKER_ADMIN_TIMEOUT`
is left out of the merged documents and counted in ``nlbproxy_workers_unanswered_total``.
"""

from __future__ import annotations

import hmac
import json
import os
from io import BytesIO
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from nlbproxy import limits, statuspage
from nlbproxy.admin import PROMETHEUS_TYPE, AdminRequest
from nlbproxy.limits import MAX_ADMIN_BODY
from nlbproxy.metrics import PrometheusWriter
from nlbproxy.webapi import JSON_TYPE
from nlbproxy.workers.aggregate import merge_metrics, merge_states

if TYPE_CHECKING:
    from nlbproxy.workers.supervisor import Slot, Supervisor

log = Logger()

#: Metrics of the public health socket: the supervisor's own, not the workers' sum.
PUBLIC_HEALTH_FAMILIES = frozenset({"nlbproxy_health_datagrams_total", "nlbproxy_health_dropped_total"})


class Reply:
    """A worker's answer: status, content type and body."""

    __slots__ = ("code", "content_type", "body", "slot")

    def __init__(self, code: int, content_type: bytes, body: bytes) -> None:
        self.code = code
        self.content_type = content_type
        self.body = body
        #: The worker that answered, once known.
        self.slot: Slot | None = None

    def json(self) -> Any:
        return json.loads(self.body)


class WorkerAdmin:
    """Calls the workers' private admin APIs for the supervisor."""

    def __init__(self, supervisor: Supervisor, reactor: Any) -> None:
        self.supervisor = supervisor
        self.reactor = reactor
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        #: (pool, host) -> (path, body) of the operator's last directive.
        self.directives: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        self.unanswered = 0

    def running(self) -> list[Slot]:
        return [slot for slot in self.supervisor.slots if slot.running]

    @defer.inlineCallbacks
    def call(self, slot: Slot, method: bytes, path: bytes, body: bytes = b"") -> Any:
        host, port = slot.admin_address
        headers = Headers({b"Authorization": [b"Bearer " + self.supervisor.token.encode()]})
        producer = FileBodyProducer(BytesIO(body)) if method in (b"PUT", b"POST") else None
        request = self.agent.request(method, b"http://%s:%d%s" % (host.encode(), port, path), headers, producer)
        request.addTimeout(limits.WORKER_ADMIN_TIMEOUT, self.reactor)
        response = yield request
        data = yield readBody(response)
        content_type = (response.headers.getRawHeaders(b"Content-Type") or [JSON_TYPE])[0]
        return Reply(response.code, content_type, data)

    @defer.inlineCallbacks
    def fan_out(self, method: bytes, path: bytes, body: bytes = b"") -> Any:
        """Every running worker's reply (failed calls left out and counted)."""
        slots = self.running()
        calls = [self.call(slot, method, path, body) for slot in slots]
        results = yield defer.DeferredList(calls, consumeErrors=True)
        replies = []
        for slot, (ok, value) in zip(slots, results):
            if ok:
                value.slot = slot
                replies.append(value)
            else:
                self.unanswered += 1
                log.warn("a worker did not answer {method} {path}: {why}", method=method.decode(),
                         path=path.decode("ascii", "replace"), why=value.getErrorMessage())
        return replies

    def remember(self, path: bytes, body: bytes, reply: Reply) -> None:
        document = reply.json()
        self.directives[(document["pool"], document["host"])] = (path, body)

    def replay(self, slot: Slot) -> None:
        """Gives a (re)started worker the operator's directives.

        Called when the worker starts (its admin socket queues the calls
        until it listens, before its listeners accept) and again when it
        serves: a host its agent announces exists only once the agent was
        heard, so a directive for it is retried until the host is known.
        """
        process = slot.process
        for (pool, host), (path, body) in list(self.directives.items()):
            self._replay_one(slot, process, pool, host, path, body)

    @defer.inlineCallbacks
    def _replay_one(self, slot: Slot, process: Any, pool: str, host: str, path: bytes, body: bytes) -> Any:
        for _ in range(limits.WORKER_REPLAY_TRIES):
            if slot.process is not process or self.directives.get((pool, host)) != (path, body):
                return
            try:
                reply = yield self.call(slot, b"PUT", path, body)
            except Exception as exc:  # the worker died or is stuck: its restart replays again
                log.warn("worker {i}: directive of {pool}/{host} not replayed: {why}",
                         i=slot.index, pool=pool, host=host, why=exc)
                return
            if reply.code != 404:
                return
            yield deferLater(self.reactor, limits.WORKER_REPLAY_INTERVAL, lambda: None)
        log.warn("worker {i}: directive of {pool}/{host} not replayed: no such host there",
                 i=slot.index, pool=pool, host=host)

    def workers_document(self, replies: list[Reply]) -> list[dict[str, Any]]:
        """Each worker's process state and what its listeners counted."""
        counted: dict[int, dict[str, int]] = {}
        for reply in replies:
            if reply.slot is not None and reply.code == 200:
                listeners = reply.json().get("listeners", {}).values()
                counted[reply.slot.index] = {
                    "connections": sum(li.get("connections", 0) for li in listeners),
                    "requests": sum(li.get("requests", 0) for li in listeners),
                }
        return [
            {"index": s.index, "pid": s.pid, "running": s.running, "restarts": s.policy.restarts,
             "given_up": s.given_up, "generation": s.generation,
             "serving": s.process is not None and s.process.serving, "retiring": len(s.retiring), **counted.get(s.index, {"connections": 0, "requests": 0})}
            for s in self.supervisor.slots
        ]

    def own_metrics(self) -> str:
        w = PrometheusWriter()
        w.add("nlbproxy_workers", "gauge", "Worker processes the unit is configured with.", len(self.supervisor.slots))
        for slot in self.supervisor.slots:
            w.add("nlbproxy_worker_up", "gauge", "1 while the worker process runs.",
                  1 if slot.running else 0, worker=str(slot.index))
        for slot in self.supervisor.slots:
            w.add("nlbproxy_worker_restarts_total", "counter", "Restarts of a worker that died.",
                  slot.policy.restarts, worker=str(slot.index))
        w.add("nlbproxy_workers_unanswered_total", "counter",
              "Calls to a worker's private admin API that failed or timed out.", self.unanswered)
        public = self.supervisor.public_health
        if public is not None:
            # The unit's socket, not the sum of the copies relayed to workers.
            w.add("nlbproxy_health_datagrams_total", "counter", "Health datagrams received and accepted.",
                  public.received, direction="in")
            w.add("nlbproxy_health_datagrams_total", "counter", "Health datagrams received and accepted.",
                  public.sent, direction="out")
            for reason, count in sorted(public.drops.items()):
                w.add("nlbproxy_health_dropped_total", "counter",
                      "Health datagrams dropped: malformed, unauthenticated, stale or replayed.", count, reason=reason)
        link = self.supervisor.link
        if link is not None:
            w.add("nlbproxy_health_relayed_total", "counter",
                  "Agent datagrams relayed to workers (one per worker).", link.relayed)
            w.add("nlbproxy_health_relay_answers_total", "counter",
                  "Workers' health answers sent to agents as the unit.", link.answered)
            for reason, count in sorted(link.drops.items()):
                w.add("nlbproxy_health_relay_dropped_total", "counter",
                      "Frames the supervisor's worker link dropped.", count, reason=reason)
        return w.render()


class SupervisorResource(Resource):
    """The public admin API of a multi-process unit (see the module doc)."""

    isLeaf = True

    def __init__(self, admin: WorkerAdmin, token: str | None) -> None:
        super().__init__()
        self.admin = admin
        self._token = token.encode() if token is not None else None

    def set_token(self, token: str | None) -> None:
        """A reloaded admin token: the next request must carry it."""
        self._token = token.encode() if token is not None else None

    def render(self, request: Request) -> Any:
        segments = tuple(s.decode("utf-8", "replace") for s in request.postpath or ())
        is_page = request.method in (b"GET", b"HEAD") and segments in statuspage.PATHS
        if self._token is not None and not is_page:
            header = request.getHeader(b"Authorization") or b""
            scheme, _, credentials = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self._token):
                request.setHeader(b"WWW-Authenticate", b"Bearer")
                return self._error(request, 401, "missing or wrong bearer token")
        body = request.content.read(MAX_ADMIN_BODY + 1) if request.content else b""
        if len(body) > MAX_ADMIN_BODY:
            return self._error(request, 413, f"body over {MAX_ADMIN_BODY} bytes")
        d = self._answer(request, segments, body)
        d.addCallback(self._send, request)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    @defer.inlineCallbacks
    def _answer(self, request: Request, segments: tuple[str, ...], body: bytes) -> Any:
        method = request.method
        path = request.uri
        admin = self.admin
        shape = (len(segments), segments[:2], segments[-1:] if segments else ())
        if method == b"PUT" and shape == (7, ("api", "v1"), ("directive",)):
            replies = yield admin.fan_out(method, path, body)
            ok = [r for r in replies if r.code == 200]
            if ok:
                admin.remember(path, body, ok[0])
            return (ok or replies or [None])[0]
        if method == b"POST" and shape == (6, ("api", "v1"), ("purge",)):
            replies = yield admin.fan_out(method, path, body)
            ok = [r for r in replies if r.code == 200]
            if not ok:
                return (replies or [None])[0]
            document = ok[0].json()
            document["purged"] = sum(r.json().get("purged", 0) for r in ok)
            return Reply(200, JSON_TYPE, json.dumps(document).encode() + b"\n")
        if method == b"DELETE" and shape[:2] == (6, ("api", "v1")):
            replies = yield admin.fan_out(method, path, body)
            ok = [r for r in replies if r.code == 200]
            return (ok or replies or [None])[0]
        if method == b"POST" and segments in (("api", "v1", "reload"), ("api", "v1", "upgrade")):
            return self._control(segments[2])
        if method == b"GET" and segments == ("api", "v1", "state"):
            replies = yield admin.fan_out(method, path)
            documents = [r.json() for r in replies if r.code == 200]
            if not documents:
                return (replies or [None])[0]
            document = merge_states(documents)
            document["workers"] = admin.workers_document(replies)
            document["generation"] = admin.supervisor.generation
            document["roll"] = admin.supervisor.last_roll
            return Reply(200, JSON_TYPE, json.dumps(document).encode() + b"\n")
        if method == b"GET" and segments == ("metrics",):
            replies = yield admin.fan_out(method, path)
            texts = [r.body.decode() for r in replies if r.code == 200]
            text = (merge_metrics(texts, PUBLIC_HEALTH_FAMILIES) if texts else "") + admin.own_metrics()
            return Reply(200, PROMETHEUS_TYPE, text.encode())
        if segments[:3] == ("api", "v1", "workers") and len(segments) > 3:
            # One worker's own API, for operators chasing a worker that disagrees.
            index = segments[3]
            chosen = [s for s in admin.running() if str(s.index) == index]
            if not chosen:
                return Reply(404, JSON_TYPE, json.dumps({"error": f"no running worker {index}"}).encode() + b"\n")
            inner = b"/" + b"/".join(request.uri.split(b"?")[0].split(b"/")[5:])
            query = request.uri.partition(b"?")[2]
            reply = yield admin.call(chosen[0], method, inner + (b"?" + query if query else b""), body)
            return reply
        for slot in admin.running():
            try:
                reply = yield admin.call(slot, method, path, body)
            except Exception as exc:  # a worker dying under us: ask the next one
                log.warn("worker {i} did not answer {path}: {why}", i=slot.index,
                         path=path.decode("ascii", "replace"), why=exc)
                admin.unanswered += 1
                continue
            return reply
        return None

    def _control(self, what: str) -> Reply:
        from nlbproxy.workers.supervisor import ReloadRefused

        supervisor = self.admin.supervisor
        log.info("{what} asked through the admin API", what=what)
        try:
            roll = supervisor.reload_file() if what == "reload" else supervisor.upgrade()
        except ReloadRefused as exc:
            return _json(409, {"error": str(exc), "reasons": exc.reasons})
        if what == "reload":
            return _json(200, {"reloaded": True, "roll": roll})
        return _json(202, {"upgrading": True, "pid": os.getpid(), "roll": roll})

    def _send(self, reply: Reply | None, request: Request) -> None:
        if reply is None:
            reply = Reply(503, JSON_TYPE, b'{"error": "no worker answered"}\n')
        request.setResponseCode(reply.code)
        request.setHeader(b"Content-Type", reply.content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method != b"HEAD":
            request.write(reply.body)
        request.finish()

    def _failed(self, failure: Any, request: Request) -> None:
        log.failure("admin API: {uri}", failure, uri=request.uri)
        if not request.finished and not request._disconnected:
            self._send(Reply(500, JSON_TYPE, b'{"error": "internal error"}\n'), request)

    def _error(self, request: Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", JSON_TYPE)
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps({"error": message}).encode() + b"\n"


def _json(code: int, document: object) -> Reply:
    return Reply(code, JSON_TYPE, json.dumps(document).encode() + b"\n")


class SupervisorSite(Site):
    resource: SupervisorResource


def make_supervisor_site(admin: WorkerAdmin, token: str | None, reactor: Any) -> SupervisorSite:
    site = SupervisorSite(SupervisorResource(admin, token), requestFactory=AdminRequest, reactor=reactor)
    site.displayTracebacks = False
    return site
