"""nlbctl against a fake admin API (a stdlib HTTP server on loopback that records
what it was asked), and once end to end against the real admin Site.

``main`` blocks in urllib, so the fake serves from its own thread; the end to
end test runs ``main`` in a worker thread while the reactor serves the Site.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import pytest_twisted
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.ctl import admin_url, format_table, main

STATE: dict[str, Any] = {
    "unit": "unit-a",
    "pools": {
        "web": {"affinity": "cookie", "hosts": {
            "10.0.0.1:80": {
                "health": "up", "health_reason": "", "directive": "active",
                "directive_reason": "config", "weight": 1, "load": 0,
                "active_requests": 2, "requests": 1234,
                "connections": {"open": 5, "idle": 2}},
            "[2001:db8::1]:8080": {
                "health": "down", "health_reason": "connect refused",
                "directive": "draining", "directive_reason": "operator", "weight": 10,
                "load": 0, "active_requests": 0, "requests": 7,
                "connections": {"open": 0, "idle": 0}},
        }},
        "empty": {"affinity": "none", "hosts": {}},
    },
    "listeners": {"public": {"connections": 11, "open_connections": 3, "requests": 40}},
}

Answer = tuple[int, bytes]


class FakeAdmin:
    """Records requests; ``answer(method, path, body)`` gives (status, JSON body)."""

    def __init__(self, answer: Callable[[str, str, bytes], Answer]) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.answer = answer
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                fake.requests.append((self.command, self.path, dict(self.headers), body))
                status, payload = fake.answer(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,),
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def api_like(method: str, path: str, body: bytes) -> Answer:
    if method == "GET" and path == "/api/v1/state":
        return 200, json.dumps(STATE).encode()
    if method == "PUT" and path.endswith("/directive"):
        return 200, json.dumps({
            "pool": "web", "host": "10.0.0.1:80",
            **STATE["pools"]["web"]["hosts"]["10.0.0.1:80"],
            "directive": body.decode(), "directive_reason": "operator",
        }).encode()
    return 404, b'{"error": "no such path"}'


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class CtlTestCase(SynchronousTestCase):
    answer: Callable[[str, str, bytes], Answer] = staticmethod(api_like)

    def setUp(self) -> None:
        environ = mock.patch.dict(os.environ)
        environ.start()
        self.addCleanup(environ.stop)
        for name in ("NLBCTL_ADMIN", "NLBCTL_TOKEN"):
            os.environ.pop(name, None)
        self.fake = FakeAdmin(type(self).answer)
        self.addCleanup(self.fake.stop)

    def ctl(self, *argv: str) -> tuple[int, str, str]:
        return run("--admin", self.fake.url, *argv)

    def path(self, name: str) -> str:
        # Not mktemp(): under pytest it leaves directories in the working tree.
        if not hasattr(self, "_tmp"):
            self._tmp = tempfile.mkdtemp(prefix="nlbctl-test-")
            self.addCleanup(shutil.rmtree, self._tmp)
        return os.path.join(self._tmp, name)


class StateTests(CtlTestCase):
    def test_table(self) -> None:
        code, out, err = self.ctl("state")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([r[:2] for r in self.fake.requests], [("GET", "/api/v1/state")])
        lines = out.splitlines()
        self.assertEqual(lines[0], "unit: unit-a")
        self.assertEqual(lines[2].split(), ["POOL", "HOST", "HEALTH", "DIRECTIVE", "WEIGHT",
                                            "LOAD", "ACTIVE", "REQUESTS", "SESSIONS",
                                            "CONNS(OPEN/IDLE)", "NOTE"])
        self.assertEqual(lines[3].split(),
                         ["web", "10.0.0.1:80", "up", "active", "1", "0", "2", "1234", "-", "5/2"])
        self.assertEqual(lines[4].split(None, 10),
                         ["web", "[2001:db8::1]:8080", "down", "draining", "10", "0", "0", "7",
                          "-", "0/0", "connect refused; set by operator"])
        self.assertEqual(lines[5].split(), ["empty", "(no", "hosts)"])
        self.assertEqual(lines[7].split(), ["LISTENER", "CONNECTIONS", "OPEN", "REQUESTS"])
        self.assertEqual(lines[8].split(), ["public", "11", "3", "40"])
        # Columns line up: every host row starts HEALTH where the header does.
        column = lines[2].index("HEALTH")
        self.assertEqual({line[column:].split()[0] for line in lines[3:5]}, {"up", "down"})

    def test_json(self) -> None:
        code, out, _ = self.ctl("state", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), STATE)

    def test_missing_fields_do_not_crash(self) -> None:
        self.answer_with(200, b'{"unit": "u", "pools": {"p": {"hosts": {"h:1": {}}}}}')
        code, out, _ = self.ctl("state")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[3].split(), ["p", "h:1", "-", "-", "-", "-", "-", "-",
                                                       "-", "-/-"])

    def answer_with(self, status: int, payload: bytes) -> None:
        self.fake.answer = lambda method, path, body: (status, payload)


class DirectiveTests(CtlTestCase):
    def test_commands(self) -> None:
        for command, directive in (("drain", "draining"), ("activate", "active"),
                                   ("deactivate", "inactive")):
            code, out, err = self.ctl(command, "web", "10.0.0.1:80")
            self.assertEqual((code, err), (0, ""))
            method, path, _headers, body = self.fake.requests[-1]
            self.assertEqual((method, path, body),
                             ("PUT", "/api/v1/pools/web/hosts/10.0.0.1%3A80/directive",
                              directive.encode()))
            row = out.splitlines()[1].split()
            self.assertEqual(row[:4], ["web", "10.0.0.1:80", "up", directive])

    def test_ipv6_and_odd_names_are_percent_encoded(self) -> None:
        self.ctl("drain", "my pool/x", "[::1]:80")
        self.assertEqual(self.fake.requests[-1][1],
                         "/api/v1/pools/my%20pool%2Fx/hosts/%5B%3A%3A1%5D%3A80/directive")

    def test_json(self) -> None:
        code, out, _ = self.ctl("deactivate", "web", "10.0.0.1:80", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["directive"], "inactive")


class ConnectionOptionTests(CtlTestCase):
    def test_no_token_by_default(self) -> None:
        self.ctl("state")
        self.assertNotIn("Authorization", self.fake.requests[-1][2])

    def test_token_file(self) -> None:
        path = self.path("token")
        with open(path, "w") as f:
            f.write("  tok-123\n")
        self.ctl("--token-file", path, "state")
        self.assertEqual(self.fake.requests[-1][2]["Authorization"], "Bearer tok-123")

    def test_token_env_and_file_wins(self) -> None:
        os.environ["NLBCTL_TOKEN"] = "from-env"
        self.ctl("state")
        self.assertEqual(self.fake.requests[-1][2]["Authorization"], "Bearer from-env")
        path = self.path("token")
        with open(path, "w") as f:
            f.write("from-file")
        self.ctl("state", "--token-file", path)
        self.assertEqual(self.fake.requests[-1][2]["Authorization"], "Bearer from-file")

    def test_admin_from_env_and_after_the_command(self) -> None:
        os.environ["NLBCTL_ADMIN"] = self.fake.url + "/"
        self.assertEqual(run("state")[0], 0)
        os.environ["NLBCTL_ADMIN"] = "http://127.0.0.1:1"
        self.assertEqual(run("state", "--admin", self.fake.url)[0], 0)
        self.assertEqual(len(self.fake.requests), 2)

    def test_admin_url_forms(self) -> None:
        self.assertEqual(admin_url("127.0.0.1:9901"), "http://127.0.0.1:9901")
        self.assertEqual(admin_url("https://lb.example/nlb/"), "https://lb.example/nlb")
        self.assertEqual(admin_url("http://[::1]:9901"), "http://[::1]:9901")


class ErrorTests(CtlTestCase):
    def test_server_error_message(self) -> None:
        self.fake.answer = lambda m, p, b: (404, b'{"error": "no host 10.9.9.9:80 in pool web"}')
        code, out, err = self.ctl("drain", "web", "10.9.9.9:80")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"nlbctl: PUT {self.fake.url}/api/v1/pools/web/hosts/"
                              "10.9.9.9%3A80/directive: HTTP 404: no host 10.9.9.9:80 in pool web\n")

    def test_unauthorized_hint(self) -> None:
        self.fake.answer = lambda m, p, b: (401, b'{"error": "missing or wrong bearer token"}')
        code, _, err = self.ctl("state")
        self.assertEqual(code, 1)
        self.assertIn("HTTP 401: missing or wrong bearer token", err)
        self.assertIn("--token-file", err)
        self.assertEqual(err.count("\n"), 1)

    def test_error_without_json(self) -> None:
        self.fake.answer = lambda m, p, b: (500, b"<html>oops</html>")
        code, _, err = self.ctl("state")
        self.assertEqual(code, 1)
        self.assertTrue(err.endswith("HTTP 500: Internal Server Error\n"), err)

    def test_answer_not_json(self) -> None:
        self.fake.answer = lambda m, p, b: (200, b"[1, 2]")
        code, _, err = self.ctl("state")
        self.assertEqual(code, 1)
        self.assertIn("not a JSON object", err)

    def test_connection_refused_names_the_url(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
        code, out, err = run("--admin", url, "state")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"nlbctl: cannot reach the admin API at {url}: "
                              "connection refused\n")

    def test_timeout(self) -> None:
        release = threading.Event()
        self.addCleanup(release.set)

        def slow(method: str, path: str, body: bytes) -> Answer:
            release.wait(10)
            return api_like(method, path, body)

        self.fake.answer = slow
        code, _, err = self.ctl("--timeout", "0.2", "state")
        self.assertEqual(code, 1)
        self.assertIn("no answer within 0.2s", err)

    def test_token_file_problems(self) -> None:
        missing = self.path("missing")
        code, _, err = self.ctl("--token-file", missing, "state")
        self.assertEqual(code, 1)
        self.assertIn(f"cannot read token file {missing}", err)
        empty = self.path("empty")
        open(empty, "w").close()
        self.assertEqual(self.ctl("--token-file", empty, "state")[0], 1)
        self.assertEqual(self.fake.requests, [])

    def test_usage_errors(self) -> None:
        for argv in ([], ["frobnicate"], ["drain", "web"], ["state", "extra"],
                     ["--admin", "ftp://x", "state"], ["--timeout", "0", "state"],
                     ["--timeout", "soon", "state"]):
            code, _out, err = run(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("usage: nlbctl", err, argv)
        self.assertEqual(self.fake.requests, [])

    def test_help(self) -> None:
        code, out, _ = run("--help")
        self.assertEqual(code, 0)
        for command in ("state", "drain", "activate", "deactivate"):
            self.assertIn(command, out)


class FormatTests(SynchronousTestCase):
    def test_numbers_right_text_left(self) -> None:
        lines = format_table(("NAME", "N"), [["a", "5"], ["long-name", "1234"]], {"N"})
        self.assertEqual(lines, ["NAME          N", "a             5", "long-name  1234"])


@pytest_twisted.inlineCallbacks
def test_end_to_end_against_the_admin_site():
    """nlbctl in a worker thread, the real admin Site on the reactor."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    from nlbproxy.admin import make_admin_site
    from tests.test_admin import FakeUpstreams, make_farm

    farm = make_farm(reactor)
    site = make_admin_site(farm, {}, FakeUpstreams(), "unit-e2e", "tok", reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    with mock.patch.dict(os.environ, {"NLBCTL_TOKEN": "tok"}):
        try:
            code, out, err = yield deferToThread(run, "--admin", url, "drain", "web",
                                                 "[2001:db8::1]:8080")
            assert (code, err) == (0, ""), err
            assert farm.host("web", "[2001:db8::1]:8080").directive == "draining"
            code, out, err = yield deferToThread(run, "--admin", url, "state")
            assert code == 0
            assert "unit: unit-e2e" in out
            assert any(line.split()[1:4] == ["[2001:db8::1]:8080", "up", "draining"]
                       for line in out.splitlines() if line.startswith("web"))
            code, out, err = yield deferToThread(run, "--admin", url, "drain", "web",
                                                 "10.9.9.9:80")
            assert code == 1
            assert "HTTP 404: no host 10.9.9.9:80 in pool web" in err
        finally:
            yield port.stopListening()
