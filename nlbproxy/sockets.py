# -*- test-case-name: tests.test_sockets -*-
"""Listening sockets handed from one process to another (program upgrade).

A running unit that upgrades starts the new program with its listening
sockets as inherited file descriptors, named in one environment variable::

    NLB_LISTEN_FDS=web=5,api=6,@admin=7

(listener names cannot start with ``@``; ``@admin`` is the admin API).  The
new process adopts each one with ``reactor.adoptStreamPort`` instead of
binding, so the kernel's accept queue is the same socket throughout: a
client that connects while both processes run is accepted by one of them,
never refused.  When the new one serves it writes one line to the pipe named
by ``NLB_READY_FD``; the old one then stops accepting without shutting the
socket down (:func:`release`) and drains its connections.

The same functions serve the worker supervisor, which passes SO_REUSEPORT
sockets (or one shared socket) to its workers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from typing import Any

#: The inherited listening sockets: ``NAME=FD`` pairs separated by commas.
LISTEN_FDS_ENV = "NLB_LISTEN_FDS"
#: The pipe where the new process says it serves (one line, then closed).
READY_FD_ENV = "NLB_READY_FD"
#: The name of the admin API's socket in :data:`LISTEN_FDS_ENV`.
ADMIN = "@admin"
#: What the new process writes to the ready pipe.
READY_LINE = b"ready\n"


class InheritedError(Exception):
    """The environment names inherited sockets that cannot be used."""


def format_fds(fds: Mapping[str, int]) -> str:
    """``{"web": 5}`` as the value of :data:`LISTEN_FDS_ENV`."""
    for name in fds:
        if not name or "," in name or "=" in name:
            raise ValueError(f"cannot pass a socket named {name!r}")
    return ",".join(f"{name}={fd}" for name, fd in fds.items())


def parse_fds(text: str) -> dict[str, int]:
    """The inverse of :func:`format_fds`; raises :class:`InheritedError`."""
    fds: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, equals, number = item.partition("=")
        if not equals or not name or not number.isdigit() or int(number) < 3:
            raise InheritedError(f"{LISTEN_FDS_ENV}: expected NAME=FD (FD >= 3), got {item!r}")
        if name in fds:
            raise InheritedError(f"{LISTEN_FDS_ENV}: {name!r} is given twice")
        fds[name] = int(number)
    return fds


def inherited_listeners(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The listening sockets this process inherited, by name (empty when none).

    Each fd is checked to be a listening stream socket, so that a stale
    variable fails the start with one line rather than adopting a file.
    """
    text = (os.environ if environ is None else environ).get(LISTEN_FDS_ENV, "")
    fds = parse_fds(text)
    for name, fd in fds.items():
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                kind = sock.type
        except OSError as exc:
            raise InheritedError(f"{LISTEN_FDS_ENV}: {name}={fd} is not a socket: {exc.strerror}") from None
        if kind != socket.SOCK_STREAM or not listening:
            raise InheritedError(f"{LISTEN_FDS_ENV}: {name}={fd} is not a listening stream socket")
    return fds


def adopt(reactor: Any, fd: int, factory: Any) -> Any:
    """A listening port on inherited ``fd``; the fd itself is closed (the
    reactor holds its own duplicate)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        family = sock.family
    try:
        return reactor.adoptStreamPort(fd, family, factory)
    finally:
        os.close(fd)


def pass_listeners(ports: Mapping[str, Any]) -> tuple[dict[str, str], dict[int, int]]:
    """The environment and the ``childFDs`` (child fd -> our fd, for
    ``reactor.spawnProcess``) that hand ``ports`` to a child process.

    The child gets each socket at the fd number we hold it under, so the
    environment names the same numbers on both sides.
    """
    fds = {name: port.fileno() for name, port in ports.items()}
    return {LISTEN_FDS_ENV: format_fds(fds)}, {fd: fd for fd in fds.values()}


def release(port: Any) -> Any:
    """Stops accepting on ``port`` without shutting the socket down.

    Twisted's ``stopListening`` calls ``shutdown()`` before ``close()``,
    which on Linux stops the listening socket for every process that holds
    it -- the very process it was handed to.  A plain ``close()`` only drops
    our reference.  Returns ``stopListening``'s Deferred.
    """
    port._shouldShutdown = False  # what Twisted itself sets on adopted ports
    return port.stopListening()


def take_inherited(environ: MutableMapping[str, str] | None = None) -> tuple[dict[str, int], int | None]:
    """The inherited listening sockets (:func:`inherited_listeners`) and the
    ready pipe's fd, taken out of the environment so that processes we start
    in turn do not inherit stale names.  Raises :class:`InheritedError`."""
    environ = os.environ if environ is None else environ
    fds = inherited_listeners(environ)
    environ.pop(LISTEN_FDS_ENV, None)
    ready = environ.pop(READY_FD_ENV, "")
    return fds, int(ready) if ready.isdigit() else None


def tell_ready(fd: int) -> None:
    """Tells the process that started us (on its pipe ``fd``) that we serve.

    Raises OSError when that process is gone.
    """
    try:
        os.write(fd, READY_LINE)
    finally:
        os.close(fd)


def notify_systemd(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Sends ``message`` (such as ``MAINPID=123``) to systemd's notify socket.

    An upgraded unit is started by the old process, not by systemd, which
    would count the old process's exit as the service's end (and stop the new
    one with it) unless told the new main pid; the unit file needs
    ``NotifyAccess=all`` for systemd to listen.  False without
    ``$NOTIFY_SOCKET`` or when nobody receives it.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True
