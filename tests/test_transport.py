"""Write-through to Twisted TCP transports (``nlbproxy.transport``)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.transport import write


class FakeSocket:
    def __init__(self, accept: int | Exception) -> None:
        self.accept = accept
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if isinstance(self.accept, Exception):
            raise self.accept
        self.sent.append(data[: self.accept])
        return min(self.accept, len(data))


class FakeTCPTransport:
    """The attributes of twisted.internet.tcp.Connection that write() reads."""

    TLS = False

    def __init__(self, sock: FakeSocket) -> None:
        self.socket = sock
        self._tempDataBuffer: list[bytes] = []
        self.dataBuffer = b""
        self.offset = 0
        self.connected = True
        self.disconnecting = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self._tempDataBuffer.append(data)


class WriteThroughTests(SynchronousTestCase):
    def test_sends_at_once_when_nothing_is_queued(self) -> None:
        t = FakeTCPTransport(FakeSocket(100))
        write(t, b"hello")
        self.assertEqual(t.socket.sent, [b"hello"])
        self.assertEqual(t.written, [])

    def test_queues_what_the_kernel_refused(self) -> None:
        t = FakeTCPTransport(FakeSocket(3))
        write(t, b"hello")
        self.assertEqual(t.socket.sent, [b"hel"])
        self.assertEqual(t.written, [b"lo"])
        # Now something is queued: the next write must queue behind it.
        write(t, b"!")
        self.assertEqual(t.socket.sent, [b"hel"])
        self.assertEqual(t.written, [b"lo", b"!"])

    def test_would_block_queues_everything(self) -> None:
        t = FakeTCPTransport(FakeSocket(BlockingIOError()))
        write(t, b"hello")
        self.assertEqual(t.written, [b"hello"])

    def test_socket_error_is_left_to_twisted(self) -> None:
        t = FakeTCPTransport(FakeSocket(ConnectionResetError()))
        write(t, b"hello")
        self.assertEqual(t.written, [b"hello"])

    def test_unsent_buffer_keeps_order(self) -> None:
        t = FakeTCPTransport(FakeSocket(100))
        t.dataBuffer = b"older"
        t.offset = 2
        write(t, b"new")
        self.assertEqual(t.socket.sent, [])
        self.assertEqual(t.written, [b"new"])

    def test_closing_or_tls_or_other_transports_use_write(self) -> None:
        closing = FakeTCPTransport(FakeSocket(100))
        closing.disconnecting = True
        tls = FakeTCPTransport(FakeSocket(100))
        tls.TLS = True  # type: ignore[misc]
        for t in (closing, tls):
            write(t, b"x")
            self.assertEqual((t.socket.sent, t.written), ([], [b"x"]))

        class Plain:
            def __init__(self) -> None:
                self.written: list[Any] = []

            def write(self, data: bytes) -> None:
                self.written.append(data)

        plain = Plain()
        write(plain, b"y")
        self.assertEqual(plain.written, [b"y"])
