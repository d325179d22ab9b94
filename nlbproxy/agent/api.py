# -*- test-case-name: tests.test_agent_api -*-
"""The host agent's local HTTP API, for applications and operators (a contract).

``PUT /v1/apps/NAME``
    The application ``NAME`` (its pool name) reports on itself: a JSON object
    with any of ``"health"`` (``"up"`` or ``"down"``), ``"load"`` (0-100),
    ``"reason"`` (why, shown with the health) and ``"directive"`` (the
    application's own wish: ``"active"``, ``"draining"``, ``"inactive"``, or
    null to withdraw it).  At least one of health, load and directive.
``PUT /v1/apps/NAME/directive``
    The operator sets the target directive of ``NAME``: a body of
    ``active``, ``draining`` or ``inactive`` (surrounding whitespace
    ignored), the same as a JSON string, or a JSON object
    ``{"directive": ..., "reason": ...}`` where a null directive withdraws the
    operator's directive.  ``DELETE`` on the same path withdraws it too.
``GET /v1/table``
    The whole table: ``{"agent": NAME, "generation": N, "checksum": N,
    "rows": [ROW, ...]}``; ``GET /v1/apps/NAME`` gives ``{"app": NAME, "rows":
    [ROW, ...]}`` for one application, as the PUTs answer.

``GET /v1/handoff``
    Present when the agent takes handoffs (``[agent] handoff``): ``{"agent":
    NAME, "bridges": N, "held": N, "stats": {COUNTER: N}}`` -- live bridged
    connections, restored connections waiting for the unit's commit, and the
    receiver's counters (``restored``, ``adopted``, ``bridged``,
    ``bridge_ended``, refusals and channel drops by reason); ``"tunnel"``
    (null without ``tunnel_interface``) is ``{"interface": NAME, "mappings":
    N, "port": {COUNTER: N}}``, the flow-id tunnel's end.

Sessions (the seed's session API; present when the agent tracks sessions):

``POST /v1/sessions``
    An application announces that a session was established: a JSON object
    ``{"app": NAME, "key": KEY}`` (the key is the value of the session
    cookie, at most 255 bytes of UTF-8) with optional ``"kind"`` (one of
    :data:`SESSION_KINDS`, default ``"http-cookie"``) and ``"endpoint"``
    (which endpoint of the app holds it; required only when the agent
    serves several endpoints of the app).  Answers 201 and the session when
    it is new, 200 when it was known.  A bulk announcer posts a JSON list of
    such objects instead (at most :data:`MAX_SESSIONS_PER_REQUEST`, body at
    most :data:`MAX_SESSIONS_BODY`), validated all or nothing, and gets 200
    ``{"accepted": N, "created": N}``.
``DELETE /v1/sessions/KEY?app=NAME``
    The session is terminated: 200 and the session, or 404 if the agent has
    no such session.  ``app`` may be left out when only one app holds KEY.
``POST /v1/sessions/end``
    Bulk termination: a JSON object ``{"key": KEY, "app": NAME}`` (app
    optional as above) or a list of them; 200 ``{"ended": N, "missing": N}``.
``GET /v1/sessions?app=NAME&limit=N&after=CURSOR``
    A page of the table in (app, key) order: ``{"agent": NAME, "total": N,
    "sessions": [SESSION, ...], "next": CURSOR or null, "tracking": {...}}``
    where ``tracking`` tells which unit the sessions go to and how far behind
    it is.  ``limit`` defaults to 100, at most :data:`MAX_PAGE`; pass
    ``next`` back as ``after`` for the next page.  ``GET /v1/sessions/KEY``
    (``?app=`` as for DELETE) gives one session.

A ``SESSION`` is ``{"app", "key", "kind", "endpoint", "since"}`` (since: Unix
seconds).  Session requests naming an app the agent does not serve, an
endpoint it does not have or a bad kind or key get 400; a full table
(:data:`nlbproxy.session.agentside.MAX_SESSIONS`) gets 503 and nothing of the
request is applied.

A ``ROW`` holds what the units see (``app``, ``endpoint``, ``health``,
``load``, ``capacity``, ``target``, ``current``, ``reason``) and what is
behind it (``health_reason``, ``directive_source``, ``directive_reason``,
``load_source``, ``smoothed_load``, ``sources``).  When an agent serves
several endpoints of one application, a PUT applies to all of them.

Directive precedence is the table's: operator over the agent's check over
the application (:data:`nlbproxy.health.table.PRECEDENCE`).  Errors are JSON
``{"error": "..."}``: 400 for a bad body, 404 for an unknown path or
application, 405 (with ``Allow``) for a wrong method, 413 for a body over
:data:`MAX_API_BODY`, 500 (logged) for a bug of ours.  The API has no
authentication: bind it to loopback (the config insists on an interface).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.logger import Logger
from twisted.web.server import Request, Site

from nlbproxy.config import format_host_port, parse_host_port
from nlbproxy.health.messages import Directive, Health, RowChange, RowKey, SessionKind
from nlbproxy.health.table import HealthTable, RowDetail, Source
from nlbproxy.session.agentside import SessionEntry, SessionSender, SessionTableFull, check_session
from nlbproxy.webapi import Answer, BoundedRequest, JsonApiResource, Refusal, json_answer, one_of, read_body

__all__ = [
    "MAX_API_BODY",
    "MAX_PAGE",
    "MAX_REQUEST_BODY",
    "MAX_SESSIONS_BODY",
    "MAX_SESSIONS_PER_REQUEST",
    "SESSION_KINDS",
    "AgentApi",
    "ApiRequest",
    "SessionRequest",
    "make_api_site",
    "parse_directive",
    "parse_report",
    "parse_session_ends",
    "parse_sessions",
    "row_document",
    "session_document",
]

log = Logger()

#: Request bodies of the API; more gets 413.
MAX_API_BODY = 64 * 1024
#: Bodies of the session routes, where bulk announcers post lists: 10,000
#: sessions with cookie-sized keys take about 1 MB; more gets 413.
MAX_SESSIONS_BODY = 4 * 1024 * 1024
#: Sessions in one request's list; more gets 400.
MAX_SESSIONS_PER_REQUEST = 10_000
#: Most sessions one page of ``GET /v1/sessions`` lists.
MAX_PAGE = 1000
#: What :class:`ApiRequest` keeps of any body: the largest route limit, plus
#: one byte to tell that it was exceeded.
MAX_REQUEST_BODY = max(MAX_API_BODY, MAX_SESSIONS_BODY)
#: Session kinds by their API spelling.
SESSION_KINDS = {kind.word: kind for kind in SessionKind}
DEFAULT_SESSION_KIND = SessionKind.HTTP_COOKIE
#: Longest reason kept from a request, in characters (the units see at most
#: 64 bytes of the composed reason).
MAX_REASON_CHARS = 256

_DIRECTIVES = {d.word: d for d in Directive}
_HEALTH = {"up": Health.UP, "down": Health.DOWN}

Publish = Callable[[list[RowChange]], None]


class BadRequest(ValueError):
    """The client's fault; becomes a 400 with this message."""


class Report(NamedTuple):
    health: Health | None
    load: int | None
    reason: str | None
    #: The report names a directive: ``directive`` is it, or None to withdraw it.
    sets_directive: bool
    directive: Directive | None


def _body_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("body is not valid JSON") from None


def _reason(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest("reason must be a string")
    return value.strip()[:MAX_REASON_CHARS]


def _directive(value: object) -> Directive | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("directive must be a string or null")
    return _DIRECTIVES[one_of(value.strip(), _DIRECTIVES, "directive", BadRequest)]


def parse_report(body: bytes) -> Report:
    """The application's report in a ``PUT /v1/apps/NAME`` body."""
    document = _body_json(body)
    if not isinstance(document, dict):
        raise BadRequest("body must be a JSON object")
    unknown = sorted(set(document) - {"health", "load", "reason", "directive"})
    if unknown:
        raise BadRequest(f"unknown key {unknown[0]!r}; use health, load, reason, directive")
    if not {"health", "load", "directive"} & document.keys():
        raise BadRequest("report at least one of health, load, directive")
    health = None
    if "health" in document:
        if document["health"] not in _HEALTH:
            raise BadRequest('health must be "up" or "down"')
        health = _HEALTH[document["health"]]
    load = None
    if "load" in document:
        value = document["load"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadRequest("load must be a number 0-100")
        if not 0 <= value <= 100:
            raise BadRequest(f"load must be a number 0-100, got {value}")
        load = round(value)
    reason = _reason(document["reason"]) if "reason" in document else None
    sets_directive = "directive" in document
    directive = _directive(document["directive"]) if sets_directive else None
    return Report(health, load, reason, sets_directive, directive)


def parse_directive(body: bytes) -> tuple[Directive | None, str]:
    """The operator's directive and reason in a ``PUT .../directive`` body."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8") from None
    if not text.startswith(('"', "{")):
        return _directive(text), ""
    document = _body_json(text.encode())
    if isinstance(document, str):
        return _directive(document), ""
    if not isinstance(document, dict):
        raise BadRequest("body must be a directive, a JSON string or a JSON object")
    unknown = sorted(set(document) - {"directive", "reason"})
    if unknown:
        raise BadRequest(f"unknown key {unknown[0]!r}; use directive, reason")
    if "directive" not in document:
        raise BadRequest("missing key 'directive'")
    return _directive(document["directive"]), _reason(document.get("reason", ""))


class SessionRequest(NamedTuple):
    """One session named by a request; ``app`` None when left out (ends only)."""

    app: str | None
    key: str
    kind: SessionKind
    endpoint: str | None


def _items(body: bytes, allowed: frozenset[str], required: tuple[str, ...]) -> tuple[list[dict[str, Any]], bool]:
    document = _body_json(body)
    many = isinstance(document, list)
    items = document if many else [document]
    if len(items) > MAX_SESSIONS_PER_REQUEST:
        raise BadRequest(f"at most {MAX_SESSIONS_PER_REQUEST} sessions per request, got {len(items)}")
    for i, item in enumerate(items):
        where = f"item {i}: " if many else ""
        if not isinstance(item, dict):
            raise BadRequest(f"{where}a session must be a JSON object" + ("" if many else " or a list of them"))
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise BadRequest(f"{where}unknown key {unknown[0]!r}; use {', '.join(sorted(allowed))}")
        for name in required:
            if name not in item:
                raise BadRequest(f"{where}missing key {name!r}")
        for name, value in item.items():
            if not isinstance(value, str) and not (value is None and name in ("app", "endpoint", "kind")):
                raise BadRequest(f"{where}{name} must be a string")
    return items, many


def _checked(item: dict[str, Any], where: str) -> SessionRequest:
    word = item.get("kind") or DEFAULT_SESSION_KIND.word
    if word not in SESSION_KINDS:
        raise BadRequest(f"{where}unknown kind {word[:40]!r}; use one of {', '.join(SESSION_KINDS)}")
    app, key, endpoint = item.get("app"), item["key"], item.get("endpoint")
    try:
        check_session(app or "", key, endpoint or "")
    except ValueError as e:
        raise BadRequest(f"{where}{e}") from None
    return SessionRequest(app, key, SESSION_KINDS[word], endpoint)


def parse_sessions(body: bytes) -> tuple[list[SessionRequest], bool]:
    """The sessions a ``POST /v1/sessions`` body announces, and whether it was a list."""
    items, many = _items(body, frozenset({"app", "key", "kind", "endpoint"}), ("app", "key"))
    requests = [_checked(item, f"item {i}: " if many else "") for i, item in enumerate(items)]
    for i, request in enumerate(requests):
        if not request.app:
            raise BadRequest(f"{f'item {i}: ' if many else ''}app must be a non-empty string")
    return requests, many


def parse_session_ends(body: bytes) -> list[SessionRequest]:
    """The sessions a ``POST /v1/sessions/end`` body terminates."""
    items, many = _items(body, frozenset({"app", "key"}), ("key",))
    return [_checked(item, f"item {i}: " if many else "") for i, item in enumerate(items)]


def session_document(entry: SessionEntry) -> dict[str, Any]:
    """One session as the API shows it."""
    return {
        "app": entry.app,
        "key": entry.key,
        "kind": entry.kind.word,
        "endpoint": entry.endpoint,
        "since": round(entry.since, 3),
    }


def row_document(detail: RowDetail) -> dict[str, Any]:
    """One row as the API shows it."""
    row = detail.row
    return {
        "app": row.key.app,
        "endpoint": row.key.endpoint,
        "health": "up" if row.health == Health.UP else "down",
        "health_reason": detail.health_reason,
        "load": row.load,
        "capacity": row.capacity,
        "target": row.target.word,
        "current": row.current.word,
        "reason": row.reason,
        "directive_source": None if detail.directive_source is None else detail.directive_source.value,
        "directive_reason": detail.directive_reason,
        "load_source": detail.load_source or None,
        "smoothed_load": None if detail.smoothed_load is None else round(detail.smoothed_load, 2),
        "sources": {
            "app": {
                "health": None if detail.app_health is None else ("up" if detail.app_health == Health.UP else "down"),
                "reason": detail.app_reason,
                "load": detail.app_load,
                "load_age": None if detail.app_load_age is None else round(detail.app_load_age, 3),
            },
            "check": {"up": detail.check_up, "reason": detail.check_reason},
            "directives": {
                source.value: {"directive": directive.word, "reason": reason}
                for source, (directive, reason) in detail.directives.items()
            },
        },
    }


# -- HTTP --------------------------------------------------------------------------
class AgentApi(JsonApiResource):
    """The whole API as one leaf resource dispatching on a route table.

    ``publish`` receives what each table change returns (the agent core's
    :meth:`~nlbproxy.health.agent.AgentCore.publish`), so a report reaches
    the units before the answer goes back to the application.
    """

    def __init__(
        self, table: HealthTable, publish: Publish, agent_name: str, sessions: SessionSender | None = None,
        handoff: Any = None,
    ) -> None:
        super().__init__()
        self.handoff = handoff
        self.table = table
        self.publish = publish
        self.agent_name = agent_name
        self.sessions = sessions
        self.routes = [
            (("v1", "table"), {b"GET": self.get_table}),
            (("v1", "apps", None), {b"GET": self.get_app, b"PUT": self.put_app}),
            (("v1", "apps", None, "directive"), {b"PUT": self.put_directive, b"DELETE": self.delete_directive}),
        ]
        if handoff is not None:
            self.routes.append((("v1", "handoff"), {b"GET": self.get_handoff}))
        if sessions is not None:
            # ("v1", "sessions", "end") only takes POST; other methods on it
            # fall through to the session named "end".
            self.routes += [
                (("v1", "sessions"), {b"GET": self.get_sessions, b"POST": self.post_sessions}),
                (("v1", "sessions", "end"), {b"POST": self.post_session_ends}),
                (("v1", "sessions", None), {b"GET": self.get_session, b"DELETE": self.delete_session}),
            ]

    # -- helpers -----------------------------------------------------------------
    def _keys(self, app: str) -> tuple[RowKey, ...]:
        try:
            return self.table.keys_of(app)
        except KeyError:
            raise Refusal(404, f"no app {app}") from None

    def _app_answer(self, app: str) -> Answer:
        rows = [row_document(self.table.detail(key)) for key in self._keys(app)]
        return json_answer(200, {"app": app, "rows": rows})

    # -- handlers ------------------------------------------------------------------
    def get_table(self, request: Request, params: list[str]) -> Answer:
        table = self.table
        rows = [row_document(table.detail(row.key)) for row in table.rows()]
        return json_answer(
            200,
            {"agent": self.agent_name, "generation": table.generation, "checksum": table.checksum(), "rows": rows},
        )

    def get_handoff(self, request: Request, params: list[str]) -> Answer:
        receiver = self.handoff
        tunnel = receiver.tunnel
        return json_answer(200, {"agent": self.agent_name, "bridges": len(receiver.bridges),
                                 "held": receiver.held, "stats": dict(receiver.stats),
                                 "tunnel": None if tunnel is None else {
                                     "interface": tunnel.ifname, "mappings": len(tunnel),
                                     "port": dict(tunnel.port.stats) if tunnel.port is not None else {}}})

    def get_app(self, request: Request, params: list[str]) -> Answer:
        return self._app_answer(params[0])

    def put_app(self, request: Request, params: list[str]) -> Answer:
        (app,) = params
        body = read_body(request, MAX_API_BODY)
        self._keys(app)
        try:
            report = parse_report(body)
        except BadRequest as e:
            raise Refusal(400, str(e)) from None
        if report.health is not None or report.load is not None:
            self.publish(self.table.report(app, health=report.health, load=report.load, reason=report.reason))
        if report.sets_directive:
            self.publish(self.table.set_directive(app, Source.APP, report.directive, report.reason or ""))
        return self._app_answer(app)

    def put_directive(self, request: Request, params: list[str]) -> Answer:
        (app,) = params
        body = read_body(request, MAX_API_BODY)
        self._keys(app)
        try:
            directive, reason = parse_directive(body)
        except BadRequest as e:
            raise Refusal(400, str(e)) from None
        return self._operator(request, app, directive, reason)

    def delete_directive(self, request: Request, params: list[str]) -> Answer:
        (app,) = params
        self._keys(app)
        return self._operator(request, app, None, "")

    def _operator(self, request: Request, app: str, directive: Directive | None, reason: str) -> Answer:
        self.publish(self.table.set_directive(app, Source.OPERATOR, directive, reason))
        client = request.getClientAddress()
        log.info(
            "operator directive of {app} {action} by {client}{why}",
            app=app,
            action=f"set to {directive.word}" if directive is not None else "withdrawn",
            client=getattr(client, "host", client),
            why=f": {reason}" if reason else "",
        )
        return self._app_answer(app)


    # -- sessions ------------------------------------------------------------------------
    @property
    def _sender(self) -> SessionSender:
        assert self.sessions is not None  # the routes exist only with it
        return self.sessions

    def _apps(self) -> list[str]:
        return list(dict.fromkeys(row.key.app for row in self.table.rows()))

    def _endpoint(self, app: str, endpoint: str | None) -> str:
        """The endpoint of ``app`` a session lives at."""
        try:
            keys = self.table.keys_of(app)
        except KeyError:
            raise BadRequest(f"app {app[:60]!r} is not served by this agent") from None
        endpoints = [key.endpoint for key in keys]
        if endpoint is None:
            if len(endpoints) > 1:
                raise BadRequest(f"app {app!r} has {len(endpoints)} endpoints here; name one with \"endpoint\"")
            return endpoints[0]
        try:
            endpoint = format_host_port(*parse_host_port(endpoint))
        except ValueError:
            pass
        if endpoint not in endpoints:
            raise BadRequest(f"app {app!r} has no endpoint {endpoint[:60]!r} here; it has {', '.join(endpoints)}")
        return endpoint

    def _app_of(self, key: str, app: str | None, apps: list[str]) -> str | None:
        """The app of ``apps`` whose session ``key`` is meant, or None if no app holds it."""
        if app is not None:
            if app not in apps:
                raise BadRequest(f"app {app[:60]!r} is not served by this agent")
            return app
        holders = self._sender.table.apps_with(key, apps)
        if len(holders) > 1:
            raise BadRequest(f"apps {', '.join(holders)} all hold session {key[:60]!r}; name one with app")
        return holders[0] if holders else None

    @staticmethod
    def _query(request: Request, name: str) -> str | None:
        values = (request.args or {}).get(name.encode())
        if not values:
            return None
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{name} is not UTF-8") from None

    def post_sessions(self, request: Request, params: list[str]) -> Answer:
        body = read_body(request, MAX_SESSIONS_BODY)
        try:
            announced, many = parse_sessions(body)
            resolved = [(s.app or "", s.key, s.kind, self._endpoint(s.app or "", s.endpoint)) for s in announced]
        except BadRequest as e:
            raise Refusal(400, str(e)) from None
        sender = self._sender
        new = {(app, key) for app, key, _, _ in resolved if (app, key) not in sender.table}
        if len(new) > sender.table.room():
            raise Refusal(503, f"the session table is full ({sender.table.max_sessions} sessions); nothing applied")
        created = 0
        try:
            for app, key, kind, endpoint in resolved:
                entry, fresh = sender.up(app, key, kind, endpoint)
                created += fresh
        except SessionTableFull as e:  # pragma: no cover - room() was checked
            raise Refusal(503, str(e)) from None
        if many:
            return json_answer(200, {"accepted": len(resolved), "created": created})
        return json_answer(201 if created else 200, session_document(entry))

    def post_session_ends(self, request: Request, params: list[str]) -> Answer:
        body = read_body(request, MAX_SESSIONS_BODY)
        try:
            apps = self._apps()
            ends = [(self._app_of(s.key, s.app, apps), s.key) for s in parse_session_ends(body)]
        except BadRequest as e:
            raise Refusal(400, str(e)) from None
        ended = 0
        for app, key in ends:
            if app is not None and self._sender.down(app, key) is not None:
                ended += 1
        return json_answer(200, {"ended": ended, "missing": len(ends) - ended})

    def _one_session(self, request: Request, key: str) -> tuple[str, SessionEntry]:
        try:
            app = self._app_of(key, self._query(request, "app"), self._apps())
        except BadRequest as e:
            raise Refusal(400, str(e)) from None
        entry = None if app is None else self._sender.table.get((app, key))
        if app is None or entry is None:
            raise Refusal(404, f"no session {key[:60]!r}" + ("" if app is None else f" of app {app}"))
        return app, entry

    def get_session(self, request: Request, params: list[str]) -> Answer:
        return json_answer(200, session_document(self._one_session(request, params[0])[1]))

    def delete_session(self, request: Request, params: list[str]) -> Answer:
        app, entry = self._one_session(request, params[0])
        self._sender.down(app, entry.key)
        return json_answer(200, session_document(entry))

    def get_sessions(self, request: Request, params: list[str]) -> Answer:
        sender = self._sender
        try:
            app = self._query(request, "app")
            if app is not None and app not in self._apps():
                raise BadRequest(f"app {app[:60]!r} is not served by this agent")
            limit_text = self._query(request, "limit")
            limit = 100 if limit_text is None else int(limit_text) if _whole(limit_text) else -1
            if not 1 <= limit <= MAX_PAGE:
                raise BadRequest(f"limit must be a whole number 1-{MAX_PAGE}")
            cursor = self._query(request, "after")
            after = None
            if cursor is not None:
                cursor_app, slash, cursor_key = cursor.partition("/")
                if not slash:
                    raise BadRequest("after must be a cursor as given in next")
                after = (cursor_app, cursor_key)
        except BadRequest as e:
            raise Refusal(400, str(e)) from None
        entries = sender.table.page(app, after, limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        return json_answer(200, {
            "agent": self.agent_name,
            "total": sender.table.count(app),
            "sessions": [session_document(entry) for entry in entries],
            "next": f"{entries[-1].app}/{entries[-1].key}" if more else None,
            "tracking": sender.status(),
        })


def _whole(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 9


class ApiRequest(BoundedRequest):
    """A request that keeps at most ``MAX_REQUEST_BODY + 1`` bytes of its body.

    The resource still sees that a body was too long for its route
    (:data:`MAX_API_BODY`, or :data:`MAX_SESSIONS_BODY` for the session
    routes) and answers 413.  The path is not known yet when the body
    arrives, hence one limit for all.
    """

    body_limit = MAX_REQUEST_BODY
    api_name = "agent API"
    logger = log


def make_api_site(
    table: HealthTable, publish: Publish, agent_name: str, reactor: Any = None, sessions: SessionSender | None = None,
    handoff: Any = None,
) -> Site:
    """The API as a Site, for ``serverFromString(...).listen(site)``; ``handoff``
    is the agent's :class:`~nlbproxy.agent.handoff.HandoffReceiver`, if any."""
    site = Site(AgentApi(table, publish, agent_name, sessions, handoff), requestFactory=ApiRequest, reactor=reactor)
    site.displayTracebacks = False
    return site
