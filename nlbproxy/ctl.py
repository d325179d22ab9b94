# -*- test-case-name: tests.test_ctl -*-
"""``nlbctl``: the operator's command line for a balancing unit's admin API.

::

    nlbctl [--admin URL] [--token-file FILE] state [--json]
    nlbctl [--admin URL] [--token-file FILE] drain|activate|deactivate POOL HOST [--json]
    nlbctl [--admin URL] [--token-file FILE] purge POOL PREFIX [--json]
    nlbctl [--admin URL] [--token-file FILE] certs|reload-certs [--json]
    nlbctl [--admin URL] [--token-file FILE] reload|upgrade [--json]

The admin URL comes from ``--admin``, else ``$NLBCTL_ADMIN``, else
``http://127.0.0.1:9901``; the bearer token from ``--token-file``, else
``$NLBCTL_TOKEN``.  The options may also follow the command.

Exit status: 0 on success, 1 when the API cannot be reached or answers an
error (one line on stderr, with the server's own error message), 2 for usage
errors.  Standard library only, so that it runs on any host with Python.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_ADMIN = "http://127.0.0.1:9901"
#: Seconds to wait for the admin API to connect and answer.
DEFAULT_TIMEOUT = 10.0
#: Bytes of an answer read at most; the state of a big farm stays far below.
MAX_ANSWER = 64 * 1024 * 1024

#: Command -> the directive it sets.
DIRECTIVE_COMMANDS = {"drain": "draining", "activate": "active", "deactivate": "inactive"}


class CtlError(Exception):
    """A failure to report on one line and exit 1."""


class UsageError(Exception):
    """A bad command line: exit 2."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The admin API never redirects; following one would send the bearer
    # token to wherever the redirect points.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class AdminClient:
    """Blocking calls to the admin API of one unit."""

    def __init__(self, base: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base = base
        self.token = token
        self.timeout = timeout
        # No proxies: the admin API is reached directly, whatever http_proxy
        # says for the rest of the host's traffic.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), _NoRedirect())

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/api/v1/state")

    def set_directive(self, pool: str, host: str, directive: str) -> dict[str, Any]:
        # Percent-encode everything, ":" "[" "]" of an IPv6 key included.
        path = f"/api/v1/pools/{quote(pool, safe='')}/hosts/{quote(host, safe='')}/directive"
        return self._call("PUT", path, directive.encode())

    def sessions(self, pool: str, after: str = "", limit: int = 100) -> dict[str, Any]:
        query = urlencode({"after": after, "limit": limit})
        return self._call("GET", f"/api/v1/pools/{quote(pool, safe='')}/sessions?{query}")

    def drop_session(self, pool: str, key: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/v1/pools/{quote(pool, safe='')}/sessions/{quote(key, safe='')}")

    def purge(self, pool: str, prefix: str) -> dict[str, Any]:
        path = f"/api/v1/pools/{quote(pool, safe='')}/cache/purge"
        return self._call("POST", path, json.dumps({"prefix": prefix}).encode(), "application/json")

    def certificates(self) -> dict[str, Any]:
        return self._call("GET", "/api/v1/certificates")

    def reload_certificates(self) -> dict[str, Any]:
        return self._call("POST", "/api/v1/certificates/reload", b"")
    def reload(self) -> dict[str, Any]:
        return self._call("POST", "/api/v1/reload", b"")

    def upgrade(self) -> dict[str, Any]:
        return self._call("POST", "/api/v1/upgrade", b"")

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str = "text/plain; charset=utf-8") -> dict[str, Any]:
        url = self.base + path
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                data = response.read(MAX_ANSWER)
        except urllib.error.HTTPError as e:
            raise CtlError(self._http_error(method, url, e)) from None
        except urllib.error.URLError as e:
            raise CtlError(f"cannot reach the admin API at {self.base}: "
                           f"{_reason(e.reason, self.timeout)}") from None
        except (OSError, http.client.HTTPException) as e:
            raise CtlError(f"{method} {url} failed: {_reason(e, self.timeout)}") from None
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise CtlError(f"{method} {url}: the answer is not a JSON object")
        return document

    def _http_error(self, method: str, url: str, error: urllib.error.HTTPError) -> str:
        message = error.reason
        try:
            document = json.loads(error.read(64 * 1024))
            if isinstance(document, dict) and isinstance(document.get("error"), str):
                message = document["error"]
        except (ValueError, OSError, http.client.HTTPException):
            pass
        text = f"{method} {url}: HTTP {error.code}: {message}"
        if error.code == 401:
            text += " (give the token with --token-file or $NLBCTL_TOKEN)"
        return " ".join(text.split())


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g}s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


# -- output ------------------------------------------------------------------------
HOST_COLUMNS = ("POOL", "HOST", "HEALTH", "DIRECTIVE", "WEIGHT", "LOAD", "ACTIVE",
                "REQUESTS", "SESSIONS", "CONNS(OPEN/IDLE)", "NOTE")
_HOST_NUMERIC = {"WEIGHT", "LOAD", "ACTIVE", "REQUESTS", "SESSIONS", "CONNS(OPEN/IDLE)"}
LISTENER_COLUMNS = ("LISTENER", "CONNECTIONS", "OPEN", "REQUESTS")


def _field(document: dict[str, Any], key: str) -> str:
    value = document.get(key)
    return "-" if value is None else str(value)


def host_row(pool: str, key: str, host: dict[str, Any]) -> list[str]:
    connections = host.get("connections") or {}
    notes = []
    if host.get("health") == "down" and host.get("health_reason"):
        notes.append(str(host["health_reason"]))
    if host.get("directive") != "active" and host.get("directive_reason"):
        notes.append(f"set by {host['directive_reason']}")
    return [
        pool, key, _field(host, "health"), _field(host, "directive"), _field(host, "weight"),
        _field(host, "load"), _field(host, "active_requests"), _field(host, "requests"),
        _field(host, "sessions"), f"{_field(connections, 'open')}/{_field(connections, 'idle')}",
        "; ".join(notes),
    ]


def format_table(columns: Sequence[str], rows: list[list[str]],
                 numeric: Collection[str] = ()) -> list[str]:
    """Aligned columns: numbers to the right, text to the left."""
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    lines = []
    for row in [list(columns), *rows]:
        cells = [cell.rjust(w) if name in numeric else cell.ljust(w)
                 for name, cell, w in zip(columns, row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_state(document: dict[str, Any]) -> str:
    lines = [f"unit: {document.get('unit', '-')}", ""]
    rows = []
    for pool, pool_doc in (document.get("pools") or {}).items():
        hosts = (pool_doc or {}).get("hosts") or {}
        if not hosts:
            rows.append([pool, "(no hosts)"] + [""] * (len(HOST_COLUMNS) - 2))
        for key, host in hosts.items():
            rows.append(host_row(pool, key, host))
    lines += format_table(HOST_COLUMNS, rows, _HOST_NUMERIC)
    listeners = document.get("listeners") or {}
    if listeners:
        rows = [[name, _field(s, "connections"), _field(s, "open_connections"),
                 _field(s, "requests")] for name, s in listeners.items()]
        lines.append("")
        lines += format_table(LISTENER_COLUMNS, rows, set(LISTENER_COLUMNS[1:]))
    return "\n".join(lines)


def format_host(pool: str, host: str, answer: dict[str, Any]) -> str:
    row = host_row(str(answer.get("pool", pool)), str(answer.get("host", host)), answer)
    return "\n".join(format_table(HOST_COLUMNS, [row], _HOST_NUMERIC))


# -- command line ------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    # The connection options are accepted before and after the command; with
    # SUPPRESS as default, the place they are not given leaves no attribute.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin", metavar="URL", default=argparse.SUPPRESS,
                        help=f"admin API of the unit (default $NLBCTL_ADMIN or {DEFAULT_ADMIN})")
    common.add_argument("--token-file", metavar="FILE", default=argparse.SUPPRESS,
                        help="file holding the admin bearer token (default $NLBCTL_TOKEN)")
    common.add_argument("--timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS,
                        help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT:g})")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's raw JSON")

    parser = argparse.ArgumentParser(
        prog="nlbctl", parents=[common],
        description="Show and steer a balancing unit of nlbproxy through its admin API.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("state", parents=[common, as_json],
                        help="pools, hosts and listeners with health, directives and counts")
    for name, directive in DIRECTIVE_COMMANDS.items():
        sub = commands.add_parser(name, parents=[common, as_json],
                                  help=f"set the directive of HOST in POOL to {directive}")
        sub.add_argument("pool", metavar="POOL")
        sub.add_argument("host", metavar="HOST", help='"ip:port", e.g. 10.0.0.5:80 or [::1]:80')
    sessions = commands.add_parser("sessions", parents=[common, as_json],
                                   help="list the sessions of POOL and their hosts, a page at a time")
    sessions.add_argument("pool", metavar="POOL")
    sessions.add_argument("--after", default="", metavar="KEY", help="start after this session key")
    sessions.add_argument("--limit", type=int, default=100, metavar="N", help="sessions per page (default 100)")
    drop = commands.add_parser("drop-session", parents=[common, as_json],
                               help="forget session KEY of POOL: its next request is balanced anew")
    drop.add_argument("pool", metavar="POOL")
    drop.add_argument("key", metavar="KEY")
    purge = commands.add_parser("purge", parents=[common, as_json],
                                help="drop the cached responses of POOL whose path starts with PREFIX")
    purge.add_argument("pool", metavar="POOL")
    purge.add_argument("prefix", metavar="PREFIX", help="a path prefix such as /static/ (/ for all)")
    commands.add_parser("certs", parents=[common, as_json],
                        help="the certificates each TLS listener serves, and its handshake counts")
    commands.add_parser("reload-certs", parents=[common, as_json],
                        help="re-read every listener's certificate files; open connections keep theirs")
    commands.add_parser("reload", parents=[common, as_json],
                        help="re-read the unit's config file and apply it (a refused file changes nothing)")
    commands.add_parser("upgrade", parents=[common, as_json],
                        help="start the new program on the unit's sockets; the old process then drains")
    return parser


def admin_url(value: str) -> str:
    """``value`` as the base URL of the API; raises UsageError."""
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"--admin wants an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def read_token(token_file: str | None, environ: Mapping[str, str]) -> str | None:
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CtlError(f"cannot read token file {token_file}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
        if not token:
            raise CtlError(f"token file {token_file} is empty")
        return token
    return environ.get("NLBCTL_TOKEN", "").strip() or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        base = admin_url(getattr(args, "admin", None)
                         or os.environ.get("NLBCTL_ADMIN") or DEFAULT_ADMIN)
        timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
        if not timeout > 0:
            raise UsageError("--timeout must be a positive number of seconds")
        client = AdminClient(base, read_token(getattr(args, "token_file", None), os.environ),
                             timeout)
        return _COMMANDS[args.command](client, args, sys.stdout)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"nlbctl: error: {e}", file=sys.stderr)
        return 2
    except CtlError as e:
        print(f"nlbctl: {e}", file=sys.stderr)
        return 1


def _state(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    document = client.state()
    if args.json:
        print(json.dumps(document, indent=2), file=out)
    else:
        print(format_state(document), file=out)
    return 0


def _directive(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    answer = client.set_directive(args.pool, args.host, DIRECTIVE_COMMANDS[args.command])
    if args.json:
        print(json.dumps(answer, indent=2), file=out)
    else:
        print(format_host(args.pool, args.host, answer), file=out)
    return 0


def _sessions(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    page = client.sessions(args.pool, args.after, args.limit)
    if args.json:
        print(json.dumps(page, indent=2), file=out)
        return 0
    rows = [[s.get("key", ""), s.get("host", ""), s.get("kind", ""), s.get("origin", "")]
            for s in page.get("sessions", [])]
    print("\n".join(format_table(("SESSION", "HOST", "KIND", "ADDED BY"), rows)), file=out)
    if page.get("next"):
        print(f"more: nlbctl sessions {args.pool} --after {page['next']}", file=out)
    return 0


def _drop_session(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    answer = client.drop_session(args.pool, args.key)
    print(json.dumps(answer, indent=2) if args.json else f"dropped session {args.key} of {args.pool}", file=out)
    return 0


def _purge(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    if not args.prefix.startswith("/"):
        raise UsageError(f"PREFIX must be a path starting with '/', got {args.prefix!r}")
    answer = client.purge(args.pool, args.prefix)
    text = f"purged {answer.get('purged', 0)} cached responses of {args.pool} under {args.prefix}"
    print(json.dumps(answer, indent=2) if args.json else text, file=out)
    return 0
def _certificates(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "reload-certs":
        document = client.reload_certificates()
    else:
        document = client.certificates()
    if args.json:
        print(json.dumps(document, indent=2), file=out)
        return 0
    rows = []
    for listener, doc in (document.get("listeners") or {}).items():
        for cert in doc.get("certificates") or []:
            rows.append([listener, str(cert.get("file", "")), " ".join(cert.get("names") or []),
                         str(cert.get("not_after", ""))])
    print("\n".join(format_table(("LISTENER", "FILE", "NAMES", "NOT AFTER"), rows)), file=out)
    if args.command == "reload-certs":
        print(f"reloaded {len(rows)} certificates", file=out)
    return 0


def _reload(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    answer = client.reload()
    print(json.dumps(answer, indent=2) if args.json else f"reloaded: {answer.get('summary', '')}", file=out)
    return 0


def _upgrade(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    answer = client.upgrade()
    text = f"upgrading: the new program runs as process {answer.get('pid')}; this one drains once it serves"
    print(json.dumps(answer, indent=2) if args.json else text, file=out)
    return 0


_COMMANDS: dict[str, Callable[[AdminClient, argparse.Namespace, TextIO], int]] = {
    "state": _state, **dict.fromkeys(DIRECTIVE_COMMANDS, _directive),
    "sessions": _sessions, "drop-session": _drop_session, "purge": _purge,
    "certs": _certificates, "reload-certs": _certificates,
    "reload": _reload, "upgrade": _upgrade,
}


if __name__ == "__main__":
    sys.exit(main())
