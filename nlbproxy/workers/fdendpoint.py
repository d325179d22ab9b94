# -*- test-case-name: tests.test_workers_config -*-
"""``nlbfd:FD:FAMILY``: a server endpoint on a listening socket this process inherited.

A worker's listeners, private admin API and DAM listen on sockets its
supervisor made and keeps open (:mod:`nlbproxy.workers.supervisor`); naming
them as an endpoint string lets the Unit and the DamService listen on them
exactly as on any other endpoint.  FAMILY is an ``AF_*`` name without the
prefix (``INET``, ``INET6``, ``UNIX``).  Listening adopts the socket and
closes the inherited descriptor (Twisted's ``AdoptedStreamServerEndpoint``).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

PREFIX = "nlbfd"


def endpoint_string(fd: int, family: str) -> str:
    return f"{PREFIX}:{fd}:{family}"


@implementer(IPlugin, IStreamServerEndpointStringParser)
class InheritedSocketParser:
    """The ``nlbfd`` endpoint type, found by ``serverFromString`` through twisted.plugin."""

    prefix = PREFIX

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> Any:
        fd = str(kwargs.get("fd", args[0] if args else ""))
        family = str(kwargs.get("family", args[1] if len(args) > 1 else "INET"))
        if not fd.isdigit() or family not in ("INET", "INET6", "UNIX"):
            raise ValueError(f"expected nlbfd:FD:INET|INET6|UNIX, got fd={fd!r} family={family!r}")
        return AdoptedStreamServerEndpoint(reactor, int(fd), getattr(socket, "AF_" + family))
