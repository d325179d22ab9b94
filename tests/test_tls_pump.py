# -*- test-case-name: tests.test_tls_pump -*-
"""The listener's TLS pump (:class:`nlbproxy.tls.TLSServerProtocol`) on a fake reactor.

A real ``ssl`` client over memory BIOs talks to the real pump and router
(``tests/fakes.py`` harness): what the pump writes to the socket and when,
and what is left of a connection once it closed.  The end-to-end tests with
real sockets and real clients are in ``tests/test_tls.py``.
"""

from __future__ import annotations

import gc
import ssl
import tempfile
import weakref
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import ISystemHandle
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nlbproxy.tls import TLSServer, TLSServerProtocol
from tests.certs import CA
from tests.fakes import FakeTransport, Harness, _address


class FakeSocket:
    """The socket under a :class:`SocketTransport`: what is sent to it goes
    on the wire in order with what the transport writes."""

    def __init__(self, transport: SocketTransport) -> None:
        self.transport = transport
        #: Bytes it takes before it is full (EAGAIN); None: never full.
        self.room: int | None = None
        #: What it took, one entry per send.
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.room is not None:
            if self.room == 0:
                raise BlockingIOError(11, "Resource temporarily unavailable")
            data = data[: self.room]
            self.room -= len(data)
        self.sent.append(bytes(data))
        self.transport.io.write(data)
        return len(data)


@implementer(ISystemHandle)
class SocketTransport(FakeTransport):
    """A fake TCP transport that hands out its socket, as Twisted's does."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.socket = FakeSocket(self)
        #: What went through Twisted's (buffered) write, one entry per call.
        self.buffered: list[bytes] = []

    def getHandle(self) -> FakeSocket:
        return self.socket

    def write(self, data: bytes) -> None:
        self.buffered.append(data)
        super().write(data)


class TLSClient:
    """A client connection through the pump: an ``ssl`` client over memory BIOs."""

    def __init__(self, harness: Harness, server: TLSServer, version: ssl.TLSVersion,
                 session: ssl.SSLSession | None = None) -> None:
        self.harness = harness
        factory = server.wrap(harness.factory)
        peer = _address("192.0.2.10", 50000)
        protocol = factory.buildProtocol(peer)
        assert isinstance(protocol, TLSServerProtocol)
        self.protocol: TLSServerProtocol | None = protocol
        self.transport = SocketTransport(harness.reactor, peer, _address("203.0.113.1", 443))
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="pump.test", session=session)
        #: The unit's close_notify came.
        self.notified = False

    def _to_server(self) -> None:
        data = self.outgoing.read()
        if data:
            self.transport.receive(data)
            self.harness.flush()

    def _from_server(self) -> None:
        self.incoming.write(self.transport.drain())

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._to_server()
                self._from_server()
                continue
            self._to_server()
            self._from_server()
            return
        raise AssertionError("the handshake did not finish")

    def request(self, data: bytes) -> bytes:
        self.tls.write(data)
        self._to_server()
        return self.read()

    def read(self) -> bytes:
        self._from_server()
        out = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return out
            except ssl.SSLZeroReturnError:
                self.notified = True
                return out
            if not chunk:
                return out
            out += chunk

    def close_notify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._to_server()


class PumpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nlbproxy-tls-pump-"))
        self.pem = CA(self.dir / "pki").issue("pump.pem", dns=["pump.test"])
        self.server = TLSServer("test", (str(self.pem),))
        self.harness = Harness(scheme=b"https")

    def tearDown(self) -> None:
        for path in sorted(self.dir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        self.dir.rmdir()

    def client(self, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
               session: ssl.SSLSession | None = None) -> TLSClient:
        return TLSClient(self.harness, self.server, version, session)

    def closed_by_unit(self, client: TLSClient) -> None:
        client.close_notify()
        self.harness.advance(0)
        self.assertIsNotNone(client.transport.lost)
        self.assertEqual(client.read(), b"")

    def test_handshake_and_close_notify(self) -> None:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            client = self.client(version)
            client.handshake()
            self.closed_by_unit(client)
            self.assertTrue(client.notified)
        self.assertEqual((self.server.stats.full, self.server.stats.resumed, self.server.stats.failed), (2, 0, 0))

    def test_a_closed_connection_is_freed_without_the_collector(self) -> None:
        # Pump and router refer to each other while the connection lives;
        # once it is lost nothing may keep a cycle, or every connection
        # would wait for a garbage collection (measured: 10-20 us each).
        client = self.client()
        client.handshake()
        assert client.protocol is not None
        router: Any = weakref.ref(client.protocol.wrapped)
        pump = weakref.ref(client.protocol)
        client.protocol = None
        self.closed_by_unit(client)
        gc.disable()
        try:
            client.transport.protocol = None
            self.assertIsNone(router())
            self.assertIsNone(pump())
        finally:
            gc.enable()

    def test_handshake_and_close_go_straight_to_the_socket(self) -> None:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            client = self.client(version)
            client.handshake()
            self.closed_by_unit(client)
            self.assertTrue(client.notified)
            # Server flight(s), (1.3) tickets, close_notify: sends, and
            # nothing through Twisted's buffered write.
            self.assertGreaterEqual(len(client.transport.socket.sent), 2)
            self.assertEqual(client.transport.buffered, [])

    def test_responses_keep_twisted_buffering(self) -> None:
        client = self.client()
        client.handshake()
        sent = len(client.transport.socket.sent)
        answer = client.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(answer, b"")  # no answer before the host answers
        backend = self.harness.next_backend()
        backend.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        answer = client.read()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nok"), answer)
        # After the router's first write, the close_notify too is buffered
        # behind what may still wait there.
        self.closed_by_unit(client)
        self.assertEqual(len(client.transport.socket.sent), sent)
        self.assertGreaterEqual(len(client.transport.buffered), 2)
        self.assertTrue(client.notified)

    def test_what_the_socket_does_not_take_is_buffered_in_order(self) -> None:
        for room in (0, 100):
            client = self.client()
            client.transport.socket.room = room
            client.handshake()
            # The rest of the flight went to Twisted's buffer, and so did
            # everything after it.
            self.assertEqual(sum(map(len, client.transport.socket.sent)), room)
            self.assertNotEqual(client.transport.buffered, [])
            client.transport.socket.room = None
            self.closed_by_unit(client)
            self.assertTrue(client.notified)
            self.assertEqual(sum(map(len, client.transport.socket.sent)), room)
