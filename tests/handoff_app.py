"""A Twisted application that adopts handed-off connections: ``python -m tests.handoff_app PATH``.

It listens at the Unix socket PATH with :func:`nlbproxy.handoff.adopt.listen_adopting`
and answers every HTTP/1.1 request line it reads (pipelining included) with
``adopted PATH-OF-REQUEST``; ``/bytes/N`` answers N bytes of the backend's pattern.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from nlbproxy.handoff.adopt import listen_adopting
from tests.backend import pattern_bytes


class Answer(Protocol):
    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ")[1]
            if path.startswith(b"/bytes/"):
                body = pattern_bytes(int(path[7:]))
            else:
                body = b"adopted " + path
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def main() -> None:
    listen_adopting(reactor, sys.argv[1], Factory.forProtocol(Answer))
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
