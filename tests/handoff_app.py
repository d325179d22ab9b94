"""A Twisted application that adopts handed-off connections:
``python -m tests.handoff_app PATH [IP:PORT]``.

It listens at the Unix socket PATH with :func:`nlbproxy.handoff.adopt.listen_adopting`
and answers every HTTP/1.1 request line it reads (pipelining included) with
``adopted PATH-OF-REQUEST``; ``/bytes/N`` answers N bytes of the backend's pattern.
With IP:PORT it also listens there for connections proxied to it the usual
way, and answers them ``direct PATH-OF-REQUEST``.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from nlbproxy.handoff.adopt import listen_adopting
from tests.backend import pattern_bytes


class Answer(Protocol):
    def __init__(self, how: bytes = b"adopted") -> None:
        self.buffer = b""
        self.how = how

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ")[1]
            if path.startswith(b"/bytes/"):
                body = pattern_bytes(int(path[7:]))
            else:
                body = self.how + b" " + path
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def main() -> None:
    listen_adopting(reactor, sys.argv[1], Factory.forProtocol(Answer))
    if len(sys.argv) > 2:
        ip, port = sys.argv[2].rsplit(":", 1)
        reactor.listenTCP(int(port), Factory.forProtocol(lambda: Answer(b"direct")), interface=ip)  # type: ignore[attr-defined]
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
