# -*- test-case-name: tests.test_admin -*-
"""The plumbing shared by nlbproxy's small JSON APIs: the unit's admin API
(:mod:`nlbproxy.admin`) and the host agent's local API
(:mod:`nlbproxy.agent.api`).

An API is one leaf :class:`JsonApiResource` whose ``routes`` map path
patterns to handlers by method.  A handler gets the request and the path's
parameters and returns an :class:`Answer` (most often through
:func:`json_answer`), or raises :class:`Refusal` for an error the client
caused.  The resource answers:

* 404 for a path no route matches (or one that is not UTF-8);
* 405, with ``Allow``, for a path some route matches and a method none of the
  matching routes takes (``HEAD`` is allowed wherever ``GET`` is, and is
  answered as the ``GET`` with its ``Content-Length`` and without a body);
* whatever :meth:`JsonApiResource.authorize` refuses, before the path is
  looked at, so that a client turned away learns nothing about the paths;
* every error as JSON ``{"error": "..."}``, every answer with
  ``Cache-Control: no-store``.

The API's Site uses a :class:`BoundedRequest` subclass as its request
factory: it keeps at most ``body_limit + 1`` bytes of a body, so that
:func:`read_body` can tell a body over the limit (413) without the whole of it
in memory, and it answers a bug of ours with a JSON 500 logged with its
traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from io import BytesIO
from typing import ClassVar, NamedTuple, cast

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = [
    "JSON_TYPE",
    "Answer",
    "BoundedRequest",
    "Handler",
    "JsonApiResource",
    "Pattern",
    "Refusal",
    "Route",
    "json_answer",
    "match",
    "one_of",
    "read_body",
]

log = Logger()

JSON_TYPE = b"application/json"


class Answer(NamedTuple):
    """What a handler answers: status, body and its content type."""

    code: int
    body: bytes
    content_type: bytes = JSON_TYPE


class Refusal(Exception):
    """An error the client caused: becomes a JSON error answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def json_answer(code: int, document: object) -> Answer:
    """``document`` as a JSON answer with status ``code``."""
    return Answer(code, json.dumps(document).encode() + b"\n")


#: A route's pattern: literal segments, and None where a parameter goes.
Pattern = tuple[str | None, ...]
#: A route's handler: the request and the path's parameters, in order.
Handler = Callable[[Request, list[str]], Answer]
#: A pattern and its handlers by method (``GET`` also serves ``HEAD``).
Route = tuple[Pattern, dict[bytes, Handler]]


def match(pattern: Pattern, segments: list[str]) -> list[str] | None:
    """The parameters of ``segments`` if they fit ``pattern``, else None."""
    if len(pattern) != len(segments):
        return None
    params = []
    for want, got in zip(pattern, segments):
        if want is None:
            params.append(got)
        elif want != got:
            return None
    return params


def read_body(request: Request, limit: int) -> bytes:
    """The request's body; a :class:`Refusal` 413 when it is over ``limit`` bytes."""
    body = request.content.read(limit + 1) if request.content else b""
    if len(body) > limit:
        raise Refusal(413, f"body over {limit} bytes")
    return body


def one_of(word: str, choices: Collection[str], what: str, error: type[ValueError] = ValueError) -> str:
    """``word`` if it is one of ``choices``, else ``error`` with the APIs' message.

    The message names ``what`` was asked for, ``word`` (cut to 40 characters)
    and the choices, e.g. ``unknown directive 'x'; use one of active, ...``.
    """
    if word not in choices:
        shown = word if len(word) <= 40 else word[:40] + "..."
        raise error(f"unknown {what} {shown!r}; use one of {', '.join(choices)}")
    return word


class JsonApiResource(Resource):
    """A whole JSON API as one leaf resource dispatching on a route table.

    A leaf keeps the path in ``request.postpath`` (split on ``/`` first, then
    percent-decoded by Twisted), which is exactly what the parameters need,
    and gives one place for authentication, 404 and 405.  Subclasses fill
    :attr:`routes`; routes are tried in order and the first whose pattern
    matches and that takes the method answers, so a path matching several
    patterns can be served by different routes for different methods.
    """

    isLeaf = True
    routes: list[Route]

    def authorize(self, request: Request) -> None:
        """Called first for every request: raise a :class:`Refusal` to turn it away.

        The default lets every request through.
        """

    def render(self, request: Request) -> bytes:
        try:
            answer = self.dispatch(request)
        except Refusal as refusal:
            answer = json_answer(refusal.code, {"error": refusal.message})
        request.setResponseCode(answer.code)
        request.setHeader(b"Content-Type", answer.content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % len(answer.body))
            return b""
        return answer.body

    def dispatch(self, request: Request) -> Answer:
        """The handler's answer to ``request``; raises :class:`Refusal` for 401, 404 and 405."""
        self.authorize(request)
        try:
            segments = [s.decode("utf-8") for s in request.postpath or ()]
        except UnicodeDecodeError:
            raise Refusal(404, "no such path") from None
        method = b"GET" if request.method == b"HEAD" else request.method
        allowed: list[bytes] = []
        for pattern, handlers in self.routes:
            params = match(pattern, segments)
            if params is None:
                continue
            handler = handlers.get(method)
            if handler is not None:
                return handler(request, params)
            allowed += [m for m in handlers if m not in allowed]
        if allowed:
            allowed += [b"HEAD"] if b"GET" in allowed else []
            request.setHeader(b"Allow", b", ".join(allowed))
            raise Refusal(405, f"method not allowed; use {b', '.join(allowed).decode()}")
        raise Refusal(404, "no such path")


class BoundedRequest(Request):
    """A request that keeps at most ``body_limit + 1`` bytes of its body.

    Twisted reads the whole body before rendering; storing only the first
    bytes past the limit bounds memory, and the resource still sees that the
    body was too long and answers 413.  Subclasses set :attr:`body_limit`,
    and :attr:`api_name` and :attr:`logger` for the log of a failed request.
    """

    #: Bytes of the body kept, plus one to tell that it was exceeded.
    body_limit: ClassVar[int] = 0
    #: The API in the log of a failed request: "``api_name`` request ... failed".
    api_name: ClassVar[str] = "JSON API"
    #: Where a failed request is logged.
    logger: ClassVar[Logger] = log

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        content = cast(BytesIO, self.content)
        room = self.body_limit + 1 - content.tell()
        if room > 0:
            content.write(data[:room])

    def processingFailed(self, reason: Failure) -> Failure:
        # A bug of ours: logged with its traceback like Twisted does, but
        # answered in JSON like every other error of the API.
        self.logger.failure(f"{self.api_name} request {{method}} {{uri}} failed", reason,
                            method=self.method, uri=self.uri)
        body = b'{"error": "internal error"}\n'
        self.setResponseCode(500)
        self.setHeader(b"Content-Type", JSON_TYPE)
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason
