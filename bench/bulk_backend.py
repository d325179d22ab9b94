"""A small Twisted backend for bulk transfers.

    GET /bytes/N         N bytes (content-length), written by a push producer that
                         stops when the transport's buffer is full, so the backend
                         itself never holds more than a chunk or two.
    POST|PUT /upload     reads the body (content-length or chunked) without storing
                         it and answers JSON {"bytes": count, "sha256": hex}; with a
                         header "x-read-rate: BYTES_PER_SECOND" it reads no faster than
                         that (pausing its transport), to play a slow backend.

    python bench/bulk_backend.py --port 8000
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from twisted.internet import endpoints, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

CHUNK = 256 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256)


@implementer(IPushProducer)
class ByteStream:
    """Writes ``remaining`` bytes to a request while the transport accepts them."""

    def __init__(self, request: server.Request, remaining: int) -> None:
        self.request = request
        self.remaining = remaining
        self.paused = False
        self.done = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        # write() calls pauseProducing() synchronously once the buffer is full.
        self.paused = False
        view = memoryview(_PATTERN)
        while not self.paused and not self.done and self.remaining > 0:
            n = min(CHUNK, self.remaining)
            self.remaining -= n
            self.request.write(view[:n].tobytes() if n < CHUNK else _PATTERN)
        if self.remaining == 0 and not self.done:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.done = True


class Bytes(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:
        try:
            n = int(request.postpath[0])  # type: ignore[index]
        except (IndexError, ValueError, TypeError):
            request.setResponseCode(400)
            return b"GET /bytes/N\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(n).encode())
        ByteStream(request, n).start()
        return server.NOT_DONE_YET


class HashSink:
    """Stands in for Request.content: hashes and counts the body instead of storing it."""

    def __init__(self, transport: Any = None, rate: float = 0.0) -> None:
        self.sha = hashlib.sha256()
        self.count = 0
        self.transport = transport
        self.rate = rate
        self.started = reactor.seconds()
        self.paused = False

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.count += len(data)
        if self.rate and not self.paused:
            ahead = self.count / self.rate - (reactor.seconds() - self.started)
            if ahead > 0:
                self.paused = True
                self.transport.pauseProducing()
                reactor.callLater(ahead, self._resume)

    def _resume(self) -> None:
        self.paused = False
        self.transport.resumeProducing()

    def seek(self, *_: object) -> None:
        pass

    def tell(self) -> int:
        return self.count

    def read(self, *_: object) -> bytes:
        return b""

    def close(self) -> None:
        pass


class StreamingRequest(server.Request):
    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        rate = (self.requestHeaders.getRawHeaders(b"x-read-rate") or [b"0"])[0]
        self.content = HashSink(self.channel.transport, float(rate))


class Upload(resource.Resource):
    isLeaf = True

    def render_POST(self, request: server.Request) -> bytes:
        sink = request.content
        assert isinstance(sink, HashSink)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"bytes": sink.count, "sha256": sink.sha.hexdigest()}).encode()

    render_PUT = render_POST


class QuietSite(server.Site):
    requestFactory = StreamingRequest

    def log(self, request: object) -> None:
        pass  # no access log


def site() -> server.Site:
    root = resource.Resource()
    root.putChild(b"bytes", Bytes())
    root.putChild(b"upload", Upload())
    return QuietSite(root, timeout=None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    args = ap.parse_args(argv)
    endpoints.serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1") \
        .listen(site())
    reactor.run()


if __name__ == "__main__":
    main()
