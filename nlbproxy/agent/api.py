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
from io import BytesIO
from typing import Any, NamedTuple, cast

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nlbproxy.health.messages import Directive, Health, RowChange, RowKey
from nlbproxy.health.table import HealthTable, RowDetail, Source

__all__ = ["MAX_API_BODY", "AgentApi", "ApiRequest", "make_api_site", "parse_directive", "parse_report", "row_document"]

log = Logger()

#: Request bodies of the API; more gets 413.
MAX_API_BODY = 64 * 1024
#: Longest reason kept from a request, in characters (the units see at most
#: 64 bytes of the composed reason).
MAX_REASON_CHARS = 256

JSON_TYPE = b"application/json"
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
    word = value.strip()
    if word not in _DIRECTIVES:
        shown = word if len(word) <= 40 else word[:40] + "..."
        raise BadRequest(f"unknown directive {shown!r}; use one of {', '.join(_DIRECTIVES)}")
    return _DIRECTIVES[word]


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
class _Answer(NamedTuple):
    code: int
    document: object


class _Refusal(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_Handler = Callable[[Request, list[str]], _Answer]
_Pattern = tuple[str | None, ...]


class AgentApi(Resource):
    """The whole API as one leaf resource dispatching on a route table.

    ``publish`` receives what each table change returns (the agent core's
    :meth:`~nlbproxy.health.agent.AgentCore.publish`), so a report reaches
    the units before the answer goes back to the application.
    """

    isLeaf = True

    def __init__(self, table: HealthTable, publish: Publish, agent_name: str) -> None:
        super().__init__()
        self.table = table
        self.publish = publish
        self.agent_name = agent_name
        self.routes: list[tuple[_Pattern, dict[bytes, _Handler]]] = [
            (("v1", "table"), {b"GET": self.get_table}),
            (("v1", "apps", None), {b"GET": self.get_app, b"PUT": self.put_app}),
            (("v1", "apps", None, "directive"), {b"PUT": self.put_directive, b"DELETE": self.delete_directive}),
        ]

    def render(self, request: Request) -> bytes:
        try:
            answer = self._dispatch(request)
        except _Refusal as refusal:
            answer = _Answer(refusal.code, {"error": refusal.message})
        body = json.dumps(answer.document).encode() + b"\n"
        request.setResponseCode(answer.code)
        request.setHeader(b"Content-Type", JSON_TYPE)
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def _dispatch(self, request: Request) -> _Answer:
        try:
            segments = [s.decode("utf-8") for s in request.postpath or ()]
        except UnicodeDecodeError:
            raise _Refusal(404, "no such path") from None
        for pattern, handlers in self.routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            handler = handlers.get(b"GET" if request.method == b"HEAD" else request.method)
            if handler is None:
                allowed = list(handlers) + ([b"HEAD"] if b"GET" in handlers else [])
                request.setHeader(b"Allow", b", ".join(allowed))
                raise _Refusal(405, f"method not allowed; use {b', '.join(allowed).decode()}")
            return handler(request, params)
        raise _Refusal(404, "no such path")

    # -- helpers -----------------------------------------------------------------
    def _keys(self, app: str) -> tuple[RowKey, ...]:
        try:
            return self.table.keys_of(app)
        except KeyError:
            raise _Refusal(404, f"no app {app}") from None

    def _app_answer(self, app: str) -> _Answer:
        rows = [row_document(self.table.detail(key)) for key in self._keys(app)]
        return _Answer(200, {"app": app, "rows": rows})

    @staticmethod
    def _body(request: Request) -> bytes:
        body = request.content.read(MAX_API_BODY + 1) if request.content else b""
        if len(body) > MAX_API_BODY:
            raise _Refusal(413, f"body over {MAX_API_BODY} bytes")
        return body

    # -- handlers ------------------------------------------------------------------
    def get_table(self, request: Request, params: list[str]) -> _Answer:
        table = self.table
        rows = [row_document(table.detail(row.key)) for row in table.rows()]
        return _Answer(
            200,
            {"agent": self.agent_name, "generation": table.generation, "checksum": table.checksum(), "rows": rows},
        )

    def get_app(self, request: Request, params: list[str]) -> _Answer:
        return self._app_answer(params[0])

    def put_app(self, request: Request, params: list[str]) -> _Answer:
        (app,) = params
        body = self._body(request)
        self._keys(app)
        try:
            report = parse_report(body)
        except BadRequest as e:
            raise _Refusal(400, str(e)) from None
        if report.health is not None or report.load is not None:
            self.publish(self.table.report(app, health=report.health, load=report.load, reason=report.reason))
        if report.sets_directive:
            self.publish(self.table.set_directive(app, Source.APP, report.directive, report.reason or ""))
        return self._app_answer(app)

    def put_directive(self, request: Request, params: list[str]) -> _Answer:
        (app,) = params
        body = self._body(request)
        self._keys(app)
        try:
            directive, reason = parse_directive(body)
        except BadRequest as e:
            raise _Refusal(400, str(e)) from None
        return self._operator(request, app, directive, reason)

    def delete_directive(self, request: Request, params: list[str]) -> _Answer:
        (app,) = params
        self._keys(app)
        return self._operator(request, app, None, "")

    def _operator(self, request: Request, app: str, directive: Directive | None, reason: str) -> _Answer:
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


def _match(pattern: _Pattern, segments: list[str]) -> list[str] | None:
    if len(pattern) != len(segments):
        return None
    params = []
    for want, got in zip(pattern, segments):
        if want is None:
            params.append(got)
        elif want != got:
            return None
    return params


class ApiRequest(Request):
    """A request that keeps at most ``MAX_API_BODY + 1`` bytes of its body.

    Twisted reads the whole body before rendering; storing only the first
    bytes past the limit bounds memory, and the resource still sees that the
    body was too long and answers 413.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        content = cast(BytesIO, self.content)
        room = MAX_API_BODY + 1 - content.tell()
        if room > 0:
            content.write(data[:room])

    def processingFailed(self, reason: Failure) -> Failure:
        # A bug of ours: logged with its traceback, answered in JSON like
        # every other error of the API.
        log.failure("agent API request {method} {uri} failed", reason, method=self.method, uri=self.uri)
        body = b'{"error": "internal error"}\n'
        self.setResponseCode(500)
        self.setHeader(b"Content-Type", JSON_TYPE)
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


def make_api_site(table: HealthTable, publish: Publish, agent_name: str, reactor: Any = None) -> Site:
    """The API as a Site, for ``serverFromString(...).listen(site)``."""
    site = Site(AgentApi(table, publish, agent_name), requestFactory=ApiRequest, reactor=reactor)
    site.displayTracebacks = False
    return site
