"""Real SOAP services for end-to-end tests: ``python -m tests.soapapps VERSION NAME``.

A spyne application (SOAP 1.1 or 1.2, VERSION ``11`` or ``12``) served by the
stdlib WSGI server in threads on a free loopback port, printed as
``ready PORT``.  Target namespace ``urn:nlb:calc``; every operation's
SOAPAction (and SOAP 1.2 ``action``) is its name.  Operations:

- ``add(a, b)`` / ``sub(a, b)`` / ``whoami()``: ``"NAME RESULT"`` (``"NAME"``),
  so a test sees which host served it
- ``fail(reason)``: a SOAP Fault (HTTP 500) with that reason, counted
- ``failures()``: how many ``fail`` calls this process has served
- ``digest(text)``: ``"LENGTH SHA256"`` of the raw HTTP request body, so a
  test sees the body reach the host byte for byte
"""

from __future__ import annotations

import hashlib
import io
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from spyne import Application, Fault, Integer, ServiceBase, Unicode, rpc
from spyne.protocol.soap import Soap11, Soap12
from spyne.server.wsgi import WsgiApplication

NAMESPACE = "urn:nlb:calc"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def application(name: str, version: str) -> WsgiApplication:
    failures = [0]
    lock = threading.Lock()

    class Calc(ServiceBase):  # type: ignore[misc]
        @rpc(Integer, Integer, _returns=Unicode)
        def add(ctx: Any, a: int, b: int) -> str:
            return f"{name} {a + b}"

        @rpc(Integer, Integer, _returns=Unicode)
        def sub(ctx: Any, a: int, b: int) -> str:
            return f"{name} {a - b}"

        @rpc(_returns=Unicode)
        def whoami(ctx: Any) -> str:
            return name

        @rpc(Unicode, _returns=Unicode)
        def fail(ctx: Any, reason: str) -> str:
            with lock:
                failures[0] += 1
            raise Fault("Client", f"{name}: {reason}")

        @rpc(_returns=Integer)
        def failures(ctx: Any) -> int:
            return failures[0]

        @rpc(Unicode, _returns=Unicode)
        def digest(ctx: Any, text: str) -> str:
            return str(ctx.transport.req_env["nlb.digest"])

    protocol = Soap11 if version == "11" else Soap12
    app = Application([Calc], NAMESPACE, name="Calc", in_protocol=protocol(validator="lxml"),
                      out_protocol=protocol())
    return _Digesting(WsgiApplication(app))


class _Digesting:
    """WSGI middleware: reads the whole request body first and notes its
    length and SHA-256 in the environ for ``digest``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        environ["nlb.digest"] = f"{len(raw)} {hashlib.sha256(raw).hexdigest()}"
        environ["wsgi.input"] = io.BytesIO(raw)
        return self.app(environ, start_response)


def main() -> None:
    version, name = sys.argv[1], sys.argv[2]
    server = make_server("127.0.0.1", 0, application(name, version), server_class=_Server,
                         handler_class=_Quiet)
    print("ready", server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
