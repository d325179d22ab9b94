# -*- test-case-name: tests.test_workers -*-
"""The sockets a supervisor creates for its workers and keeps open."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from nlbproxy import limits
from nlbproxy.config import _endpoint_params

_FAMILIES = {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6, "unix": socket.AF_UNIX}


@dataclass(frozen=True)
class Inherited:
    """A socket a worker adopts: the supervisor's socket and its family's name."""

    sock: socket.socket

    @property
    def family(self) -> str:
        return socket.AddressFamily(self.sock.family).name.removeprefix("AF_")


def listening_sockets(endpoint: str, count: int, backlog: int = limits.WORKER_BACKLOG) -> list[Inherited]:
    """``count`` listening sockets for a listener's endpoint string.

    TCP: one ``SO_REUSEPORT`` socket per worker on the same address, so the
    kernel hashes each new connection to one worker's accept queue (port 0
    binds the first one and the others to the port it got).  A unix socket
    cannot be reuseport-shared: the workers share the one socket's queue.
    """
    kind, params = _endpoint_params(endpoint)
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(params["address"])
        sock.listen(int(params.get("backlog", backlog)))
        return [Inherited(sock)] * count
    family = _FAMILIES[kind]
    interface = params.get("interface") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    port = int(params["port"])
    result: list[Inherited] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            result.append(Inherited(sock))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]
            sock.listen(int(params.get("backlog", backlog)))
            sock.setblocking(False)
    except OSError:
        for inherited in result:
            inherited.sock.close()
        raise
    return result


def loopback_stream() -> Inherited:
    """A listening TCP socket on 127.0.0.1 with a port the kernel picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return Inherited(sock)


def loopback_datagram() -> Inherited:
    """A UDP socket on 127.0.0.1 with a port the kernel picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return Inherited(sock)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a worker's DAM, which binds itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect_address(endpoint: str) -> tuple[str, int]:
    """Where a local process reaches a TCP server endpoint string."""
    kind, params = _endpoint_params(endpoint)
    interface = params.get("interface") or ""
    if interface in ("", "0.0.0.0"):
        interface = "127.0.0.1"
    elif interface == "::":
        interface = "::1"
    return interface, int(params["port"])


def bound_to(inherited: Inherited, endpoint: str) -> bool:
    """Whether ``endpoint`` names the address ``inherited`` is bound to (port 0: any port)."""
    try:
        kind, params = _endpoint_params(endpoint)
    except ValueError:
        return False
    if _FAMILIES[kind] != inherited.sock.family:
        return False
    address = inherited.sock.getsockname()
    if kind == "unix":
        return bool(address == params["address"])
    default = "::" if kind == "tcp6" else "0.0.0.0"
    interface = params.get("interface") or default
    port = int(params["port"])
    try:
        same_host = socket.inet_pton(inherited.sock.family, interface) == socket.inet_pton(
            inherited.sock.family, address[0])
    except OSError:
        return False
    return same_host and port in (0, address[1])
