# -*- test-case-name: tests.test_handoff_delivery -*-
"""Hand a restored connection to its application: fd passing over a Unix socket.

The application listens on a Unix stream socket (``adopt_path`` of its
``[[app]]`` in the agent's config).  For each handed-off connection the
agent connects, sends one message with the connection's descriptor attached
(``SCM_RIGHTS``) and closes::

    "NLBA" | version u8 (1) | family u8 (4 or 6)

Any language can receive it (``recvmsg`` with room for one descriptor).
Twisted applications use :func:`listen_adopting`, which adopts every
received socket into the reactor with ``adoptStreamConnection`` and a
protocol of the application's factory, as if the connection had been
accepted by a port of its own: the client's request, already in the
socket's receive queue, arrives through ``dataReceived``.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["MAGIC", "AdoptingProtocol", "listen_adopting", "send_socket"]

log = Logger()

MAGIC = b"NLBA"
VERSION = 1
_MESSAGE = struct.Struct("!4sBB")
#: Seconds the agent waits for the application to take a connection.
SEND_TIMEOUT = 2.0


def send_socket(path: str, sock: socket.socket) -> None:
    """Pass ``sock``'s descriptor to the application listening at ``path``
    (blocking, bounded by :data:`SEND_TIMEOUT`); raises OSError when no
    application takes it.  The caller still closes its own copy."""
    family = 6 if sock.family == socket.AF_INET6 else 4
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.settimeout(SEND_TIMEOUT)
        unix.connect(path)
        fds = array.array("i", [sock.fileno()])
        unix.sendmsg([_MESSAGE.pack(MAGIC, VERSION, family)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        # The application closes when it has adopted the descriptor; waiting
        # for that keeps the agent from racing ahead of a slow application.
        unix.recv(1)


@implementer(IFileDescriptorReceiver)
class AdoptingProtocol(Protocol):
    """One agent connection: one message and one descriptor, adopted."""

    transport: Any

    def __init__(self, adopt: Callable[[int, int], None]) -> None:
        self.adopt = adopt
        self.fds: list[int] = []
        self.buffer = b""

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < _MESSAGE.size:
            return
        magic, version, family = _MESSAGE.unpack(self.buffer[: _MESSAGE.size])
        fds, self.fds = self.fds, []
        try:
            if magic != MAGIC or version != VERSION or family not in (4, 6) or len(fds) != 1:
                log.warn("adopt: malformed message from the agent ({n} descriptors)", n=len(fds))
                return
            self.adopt(fds[0], socket.AF_INET6 if family == 6 else socket.AF_INET)
        finally:
            for fd in fds:
                os.close(fd)  # adoptStreamConnection dup()s what it keeps
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def listen_adopting(reactor: Any, path: str, factory: Factory) -> Any:
    """Listen at the Unix socket ``path`` for connections the agent hands
    over, and run each with a protocol of ``factory``; returns the port."""

    def adopt(fd: int, family: int) -> None:
        reactor.adoptStreamConnection(fd, family, factory)

    return reactor.listenUNIX(path, Factory.forProtocol(lambda: AdoptingProtocol(adopt)))
