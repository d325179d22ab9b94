# -*- test-case-name: tests.test_unit -*-
"""The embedded demo farm: three small web servers on loopback.

``twistd -n nlbproxy --demo`` puts a balancing unit in front of them, so a
new user sees requests spread over hosts, the admin API and ``nlbctl``
working, without writing a config file.
"""

from __future__ import annotations

from typing import Any

from twisted.web import resource, server

DEMO_HOSTS = 3


class DemoBackend(resource.Resource):
    """Answers every path with the name of the backend that served it."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        path = request.path.decode("ascii", "replace")
        return f"hello from {self.name} ({request.method.decode()} {path})\n".encode()


def start_backends(reactor: Any, count: int = DEMO_HOSTS) -> list[Any]:
    """Listens ``count`` demo backends on 127.0.0.1, free ports; returns the ports."""
    ports = []
    for index in range(count):
        site = server.Site(DemoBackend(f"backend-{index + 1}"))
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        ports.append(reactor.listenTCP(0, site, interface="127.0.0.1"))
    return ports
