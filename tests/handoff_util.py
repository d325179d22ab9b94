"""Helpers of the handoff tests: root-only tests, and moving bytes with checksums."""

from __future__ import annotations

import hashlib
import socket
import threading
from typing import Any

from tests.needs import need_root

#: Seconds a blocking socket operation of a test may take before it fails.
IO_TIMEOUT = 30.0


def require_root() -> None:
    """TCP_REPAIR needs CAP_NET_ADMIN (see :mod:`tests.needs`)."""
    need_root("TCP_REPAIR needs CAP_NET_ADMIN")


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` deterministic bytes that are not all alike (so offsets matter)."""
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(min(size, 1 << 20))
        if not data:
            raise EOFError(f"connection closed with {size} bytes still expected")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def recv_digest(sock: socket.socket, size: int) -> str:
    digest = hashlib.sha256()
    while size:
        data = sock.recv(min(size, 1 << 20))
        if not data:
            raise EOFError(f"connection closed with {size} bytes still expected")
        digest.update(data)
        size -= len(data)
    return digest.hexdigest()


class Background:
    """Run ``function(*args)`` in a thread; :meth:`result` joins and re-raises."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(function, args), daemon=True)
        self.thread.start()

    def _run(self, function: Any, args: tuple[Any, ...]) -> None:
        try:
            self.value = function(*args)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def result(self, timeout: float = IO_TIMEOUT) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("background transfer did not finish")
        if self.error is not None:
            raise self.error
        return self.value


class UnitDriver:
    """The unit's end of the handoff channel over a blocking socket, for tests
    that play the unit themselves."""

    def __init__(self, address: tuple[str, int], secret: bytes) -> None:
        from nlbproxy.handoff.wire import Channel

        self.channel = Channel("unit", secret)
        self.sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        self.sock.sendall(self.channel.hello())
        while not self.channel.ready:
            self._pump()
        self.next_id = 1

    def _pump(self) -> list[Any]:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the agent closed the channel")
        reply, messages = self.channel.receive(data)
        if reply:
            self.sock.sendall(reply)
        return messages

    def handoff(self, pool: str, endpoint: str, blob: bytes) -> Any:
        """Send a HANDOFF and return the agent's RESULT."""
        from nlbproxy.handoff.wire import Handoff, Result

        id_, self.next_id = self.next_id, self.next_id + 1
        self.sock.sendall(self.channel.send(Handoff(id_, pool, endpoint, blob)))
        while True:
            for message in self._pump():
                if isinstance(message, Result) and message.id == id_:
                    return message

    def commit(self, id_: int) -> None:
        from nlbproxy.handoff.wire import Commit

        self.sock.sendall(self.channel.send(Commit(id_)))

    def receive(self) -> list[Any]:
        return self._pump()

    def close(self) -> None:
        self.sock.close()
