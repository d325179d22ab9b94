"""A real HTTP/1.1 backend for end-to-end tests: ``python -m tests.backend PORT NAME``.

Stdlib only (``http.server`` in threads, keep-alive on), so the router is
tested against a server it shares no code with.  Paths:

- ``/`` or anything else: ``NAME`` and the path
- ``/bytes/N``: N bytes of a repeating pattern, content-length, streamed
- ``/chunked/N``: N bytes, chunked
- ``/sha256`` (POST/PUT): reads the body (content-length or chunked) and
  answers ``LENGTH SHA256``
- ``/headers``: the request headers as JSON
- ``/slow/MS``: answers after MS milliseconds
- ``/status/CODE``: an empty answer with that status
- ``/ws``: ``101 Switching Protocols`` on an Upgrade request, then echoes bytes
- ``/login/ID``, ``/logout/ID``: set, or delete, the session cookie ``SID=ID``
- ``/cached/ANY?cc=CACHE_CONTROL&vary=HEADER``: ``NAME N TARGET VALUE`` where N
  counts the requests this server answered for TARGET and VALUE is the
  request's HEADER; the answer carries ``Cache-Control`` and ``Vary`` as asked
- ``/hits``: the counts of ``/cached/`` targets as JSON
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes the ``/bytes/N`` endpoint sends (for checksums)."""
    reps, rest = divmod(n, len(PATTERN))
    return PATTERN * reps + PATTERN[:rest]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "testbackend"
    # Headers and body are separate writes: without TCP_NODELAY every
    # keep-alive answer would wait for a delayed ACK (about 40 ms).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.name)  # type: ignore[attr-defined]
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self):  # type: ignore[no-untyped-def]
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 65536))
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        name = self.server.name  # type: ignore[attr-defined]
        if parts[0] == "bytes":
            n = int(parts[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("X-Backend", name)
            self.end_headers()
            if self.command == "HEAD":
                return
            sent = 0
            while sent < n:
                piece = PATTERN[: min(len(PATTERN), n - sent)]
                self.wfile.write(piece)
                sent += len(piece)
        elif parts[0] == "chunked":
            n = int(parts[1])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Backend", name)
            self.end_headers()
            data = pattern_bytes(n)
            for i in range(0, n, 10000):
                piece = data[i : i + 10000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif parts[0] == "headers":
            self._answer(200, json.dumps(self.headers.items()).encode(), "application/json")
        elif parts[0] == "slow":
            time.sleep(int(parts[1]) / 1000)
            self._answer(200, f"{name} slow\n".encode())
        elif parts[0] == "status":
            self.send_response(int(parts[1]))
            self.send_header("X-Backend", name)
            if int(parts[1]) not in (204, 304):
                self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts[0] in ("login", "logout") and len(parts) == 2:
            cookie = f"SID={parts[1]}; Path=/; HttpOnly"
            if parts[0] == "logout":
                cookie += "; Max-Age=0"
            body = f"{name} {parts[0]} {parts[1]}\n".encode()
            self.send_response(200)
            self.send_header("Set-Cookie", cookie)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif parts[0] == "cached":
            self._cached()
        elif parts[0] == "hits":
            with self.server.lock:  # type: ignore[attr-defined]
                hits = dict(self.server.hits)  # type: ignore[attr-defined]
            self._answer(200, json.dumps(hits).encode(), "application/json")
        elif parts[0] == "ws" and self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            conn: socket.socket = self.connection
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            self.close_connection = True
        else:
            self._answer(200, f"{name} {self.command} {self.path}\n".encode())

    def _cached(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        server = self.server
        with server.lock:  # type: ignore[attr-defined]
            count = server.hits.get(self.path, 0) + 1  # type: ignore[attr-defined]
            server.hits[self.path] = count  # type: ignore[attr-defined]
        vary = query.get("vary", [""])[0]
        body = f"{server.name} {count} {self.path} {self.headers.get(vary, '') if vary else ''}\n".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if "cc" in query:
            self.send_header("Cache-Control", query["cc"][0])
        if vary:
            self.send_header("Vary", vary)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET
    do_DELETE = do_GET

    def do_POST(self) -> None:
        digest = hashlib.sha256()
        length = 0
        for chunk in self._read_body():
            digest.update(chunk)
            length += len(chunk)
        self._answer(200, f"{length} {digest.hexdigest()}\n".encode())

    do_PUT = do_POST


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], name: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.name = name
        self.lock = threading.Lock()
        #: /cached/ target -> requests answered.
        self.hits: dict[str, int] = {}


def main() -> None:
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = Server((host, port), name)
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
