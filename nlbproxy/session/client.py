# -*- test-case-name: tests.test_session_client -*-
"""A small blocking client of the host agent's session API, stdlib only.

For applications that are not Twisted (a WSGI app, a worker, a script)::

    from nlbproxy.session.client import SessionClient

    sessions = SessionClient("http://127.0.0.1:9902")
    sessions.up("web", cookie_value)             # at login
    sessions.down(cookie_value)                  # at logout (app found by the agent)
    sessions.up_many(("web", k) for k in keys)   # a bulk announcer, 10,000 per request

``api_url`` is the agent's ``api`` endpoint as its log prints it:
``http://HOST:PORT`` or ``unix:/PATH`` for a UNIX socket.  One client keeps
one persistent HTTP/1.1 connection, reconnecting once when the agent closed
it; it is not thread-safe (use one per thread).  Every call is bounded by
``timeout`` seconds.

Errors are exceptions, split by blame: :class:`SessionRefused` when the
agent refused what we sent (400: a bad key, an app it does not serve),
:class:`SessionUnavailable` when the agent could not be reached or is full
(503) -- worth retrying later -- and their base :class:`SessionApiError` for
anything else.  Terminating a session the agent does not have is not an
error: :meth:`SessionClient.down` returns False.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_TIMEOUT",
    "KINDS",
    "MAX_PER_REQUEST",
    "SessionApiError",
    "SessionClient",
    "SessionRefused",
    "SessionUnavailable",
]

#: Seconds any one call may take, connecting included.
DEFAULT_TIMEOUT = 5.0
#: Sessions per request of :meth:`SessionClient.up_many` / ``down_many``
#: (the agent's MAX_SESSIONS_PER_REQUEST).
MAX_PER_REQUEST = 10_000
KINDS = ("http-cookie", "tls-session", "client-ip", "user")
DEFAULT_KIND = "http-cookie"

#: What an item of :meth:`SessionClient.up_many` may be.
Announcement = tuple[str, str] | tuple[str, str, str] | dict[str, str]


class SessionApiError(Exception):
    """The agent answered ``status`` with ``message`` (or could not be asked)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status} {message}" if status is not None else message)
        self.status = status
        self.message = message


class SessionRefused(SessionApiError):
    """The request was wrong (400): fix the call, retrying will not help."""


class SessionUnavailable(SessionApiError):
    """The agent is not reachable, or cannot take sessions now (503): retry later."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SessionClient:
    """Announces and terminates sessions through the agent at ``api_url``."""

    def __init__(self, api_url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.api_url = api_url
        self.timeout = timeout
        if api_url.startswith("unix:"):
            self._unix: str | None = api_url[len("unix:") :]
            self._host, self._port, self._base = "localhost", 0, ""
        else:
            parts = urlsplit(api_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"api_url must be http://HOST:PORT or unix:/PATH, got {api_url!r}")
            self._unix = None
            self._host, self._port = parts.hostname, parts.port or 80
            self._base = parts.path.rstrip("/")
        self._connection: http.client.HTTPConnection | None = None

    # -- the calls -----------------------------------------------------------------------
    def up(self, app: str, key: str, kind: str = DEFAULT_KIND, endpoint: str | None = None) -> dict[str, Any]:
        """Announce that session ``key`` of ``app`` was established; returns
        the agent's record of it (``app``, ``key``, ``kind``, ``endpoint``,
        ``since``).  ``endpoint`` is needed only when the agent serves several
        endpoints of ``app``."""
        document: dict[str, Any] = {"app": app, "key": key, "kind": kind}
        if endpoint is not None:
            document["endpoint"] = endpoint
        return self._call("POST", "/v1/sessions", document)

    def down(self, key: str, app: str | None = None) -> bool:
        """Announce that session ``key`` was terminated.  ``app`` may be left
        out when one app of the agent holds ``key``.  Returns False if the
        agent had no such session."""
        path = "/v1/sessions/" + quote(key, safe="")
        if app is not None:
            path += "?" + urlencode({"app": app})
        try:
            self._call("DELETE", path)
        except SessionApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    def up_many(self, sessions: Iterable[Announcement]) -> int:
        """Announce many sessions: (app, key) or (app, key, kind) tuples, or
        dicts as the API takes them.  Sent :data:`MAX_PER_REQUEST` at a time;
        each request is all or nothing.  Returns how many were new."""
        created = 0
        for chunk in _chunks(sessions):
            answer = self._call("POST", "/v1/sessions", [_announcement(item) for item in chunk])
            created += answer["created"]
        return created

    def down_many(self, sessions: Iterable[str | tuple[str, str]]) -> int:
        """Terminate many sessions: keys, or (app, key) tuples.  Returns how
        many the agent had."""
        ended = 0
        for chunk in _chunks(sessions):
            body = [{"key": item} if isinstance(item, str) else {"app": item[0], "key": item[1]} for item in chunk]
            ended += self._call("POST", "/v1/sessions/end", body)["ended"]
        return ended

    def get(self, key: str, app: str | None = None) -> dict[str, Any] | None:
        """The agent's record of session ``key``, or None."""
        path = "/v1/sessions/" + quote(key, safe="")
        if app is not None:
            path += "?" + urlencode({"app": app})
        try:
            return self._call("GET", path)
        except SessionApiError as e:
            if e.status == 404:
                return None
            raise

    def sessions(self, app: str | None = None, page: int = 1000) -> Iterator[dict[str, Any]]:
        """Every session of the agent (of ``app``), in (app, key) order, fetched a page at a time."""
        after: str | None = None
        while True:
            query: dict[str, str | int] = {"limit": page}
            if app is not None:
                query["app"] = app
            if after is not None:
                query["after"] = after
            answer = self._call("GET", "/v1/sessions?" + urlencode(query))
            yield from answer["sessions"]
            after = answer["next"]
            if after is None:
                return

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ------------------------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            if self._unix is not None:
                self._connection = _UnixConnection(self._unix, self.timeout)
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        return self._connection

    def _call(self, method: str, path: str, document: object = None) -> Any:
        body = None if document is None else json.dumps(document).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        # Every call is idempotent (an up or a down applied twice is the
        # same), so a connection the agent closed while idle is retried once.
        for attempt in (1, 2):
            connection = self._connect()
            try:
                connection.request(method, self._base + path, body=body, headers=headers)
                response = connection.getresponse()
                raw = response.read()
                status = response.status
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt == 2:
                    raise SessionUnavailable(None, f"agent at {self.api_url} closed the connection: {e}") from e
                continue
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise SessionUnavailable(None, f"cannot reach the agent at {self.api_url}: {e}") from e
            if response.will_close:
                self.close()
            break
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"error": raw[:200].decode("utf-8", "replace")}
        if 200 <= status < 300:
            return answer
        message = answer.get("error", "") if isinstance(answer, dict) else str(answer)
        if status in (400, 413):
            raise SessionRefused(status, message)
        if status == 503:
            raise SessionUnavailable(status, message)
        raise SessionApiError(status, message)


def _announcement(item: Announcement) -> dict[str, str]:
    if isinstance(item, dict):
        return item
    if len(item) == 2:
        return {"app": item[0], "key": item[1]}
    return {"app": item[0], "key": item[1], "kind": item[2]}


def _chunks(items: Iterable[Any]) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == MAX_PER_REQUEST:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
