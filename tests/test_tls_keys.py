"""The TLS pieces without a reactor: certificate files, SNI maps, ticket keys
through the process's libssl, and the TLS protocol driven by an in-memory client.

``SynchronousTestCase``: runs under trial and pytest.
"""

from __future__ import annotations

import ssl

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import libssl
from nlbproxy.tls import CertificateError, TLSServer, TLSServerProtocol, farm_ticket_keys, read_certificate
from tests.certs import CA, temp_dir


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: object = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = reason


class CertificateFiles(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = CA(temp_dir(self))

    def test_names_come_from_the_san(self) -> None:
        cert = read_certificate(str(self.ca.issue("a.pem", dns=["A.test", "*.wild.test"], cn="ignored.test")))
        self.assertEqual(cert.names, ("a.test", "*.wild.test"))
        self.assertEqual(len(cert.chain), 2)

    def test_without_a_san_the_cn_names_it(self) -> None:
        cert = read_certificate(str(self.ca.issue("cn.pem", cn="cn.test")))
        self.assertEqual(cert.names, ("cn.test",))

    def test_every_problem_names_the_file_and_the_reason(self) -> None:
        good = self.ca.issue("good.pem", dns=["a.test"]).read_bytes()
        certs, _, key = good.partition(b"-----BEGIN PRIVATE KEY-----")
        other_key = self.ca.issue("other.pem", dns=["b.test"]).read_bytes().partition(b"-----BEGIN PRIVATE KEY-----")[2]
        cases = {
            "missing.pem": (None, "cannot read: No such file or directory"),
            "empty.pem": (b"\n", "empty file"),
            "nocert.pem": (b"-----BEGIN PRIVATE KEY-----" + key, "no PEM certificate could be read"),
            "nokey.pem": (certs, "no private key"),
            "twokeys.pem": (good + good.partition(b"-----END CERTIFICATE-----\n")[2].partition(
                b"-----END CERTIFICATE-----\n")[2], "more than one private key"),
            "encrypted.pem": (certs + b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                              "the private key is encrypted"),
            "badkey.pem": (certs + b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "bad private key"),
            "mismatch.pem": (certs + b"-----BEGIN PRIVATE KEY-----" + other_key,
                             "the private key does not match the first certificate"),
        }
        for name, (content, reason) in cases.items():
            path = self.ca.directory / name
            if content is not None:
                path.write_bytes(content)
            with self.assertRaises(CertificateError, msg=name) as caught:
                read_certificate(str(path))
            self.assertEqual(caught.exception.path, str(path))
            self.assertIn(reason, caught.exception.reason, name)
            self.assertTrue(str(caught.exception).startswith(f"{path}: "))


class SNI(SynchronousTestCase):
    def test_exact_names_wildcards_and_the_first_file_wins(self) -> None:
        ca = CA(temp_dir(self))
        paths = (str(ca.issue("a.pem", dns=["a.test", "*.w.test"])), str(ca.issue("b.pem", dns=["a.test", "b.test"])))
        server = TLSServer("web", paths)
        first, second = server.contexts.contexts
        lookup = server.contexts.lookup
        self.assertIs(server.contexts.default, first)
        self.assertIs(lookup("a.test"), first)
        self.assertIs(lookup("b.test"), second)
        self.assertIs(lookup("x.w.test"), first)
        self.assertIsNone(lookup("w.test"))
        self.assertIsNone(lookup("y.x.w.test"))
        self.assertIsNone(lookup("c.test"))


class TicketKeys(SynchronousTestCase):
    def setUp(self) -> None:
        ca = CA(temp_dir(self))
        self.paths = (str(ca.issue("a.pem", dns=["a.test"])), str(ca.issue("b.pem", dns=["b.test"])))
        self.lib = libssl.libssl()

    def keys(self, server: TLSServer) -> set[bytes]:
        return {self.lib.ticket_keys(p) for p in server.contexts.pointers}

    def test_farm_keys_depend_on_secret_listener_and_epoch_only(self) -> None:
        keys = farm_ticket_keys(b"s", "web", 7)
        self.assertEqual(len(keys), libssl.TICKET_KEYS_SIZE)
        self.assertEqual(keys, farm_ticket_keys(b"s", "web", 7))
        others = {farm_ticket_keys(b"t", "web", 7), farm_ticket_keys(b"s", "api", 7), farm_ticket_keys(b"s", "web", 8)}
        self.assertEqual(len(others | {keys}), 4)

    def test_the_pointer_is_confirmed_by_libssl(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        pointer = self.lib.context_pointer(ctx)
        self.lib.set_ticket_keys(pointer, bytes(range(80)))
        self.assertEqual(self.lib.ticket_keys(pointer), bytes(range(80)))
        with self.assertRaises(libssl.LibSSLUnavailable):
            self.lib.context_pointer(object())  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            self.lib.set_ticket_keys(pointer, b"short")

    def test_farm_keys_follow_the_clock(self) -> None:
        clock = Clock()
        clock.advance(10 * 3600 + 5)
        server = TLSServer("web", self.paths, "farm", secret=b"farm", clock=clock, ticket_key_period=3600)
        self.assertEqual(self.keys(server), {farm_ticket_keys(b"farm", "web", 10)})
        clock.advance(3600)
        server.new_connection(ssl.MemoryBIO(), ssl.MemoryBIO())
        self.assertEqual(self.keys(server), {farm_ticket_keys(b"farm", "web", 11)})
        # A reload installs the period's keys in the new contexts.
        server.install(server.load())
        self.assertEqual(self.keys(server), {farm_ticket_keys(b"farm", "web", 11)})

    def test_unit_keys_survive_a_reload(self) -> None:
        server = TLSServer("web", self.paths)
        before = self.lib.ticket_keys(server.contexts.pointers[0])
        server.install(server.load())
        self.assertEqual(self.keys(server), {before})


class Protocol_(SynchronousTestCase):
    """The TLS protocol between an in-memory client and a recording router."""

    def setUp(self) -> None:
        self.ca = CA(temp_dir(self))
        self.server = TLSServer("web", (str(self.ca.issue("a.pem", dns=["a.test"])),))
        self.router = Recorder()
        self.protocol = TLSServerProtocol(self.server, self.router)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def client(self) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        """A client whose ClientHello is written (in ``outgoing``)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = ssl.create_default_context(cafile=str(self.ca.file))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        client = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
        with self.assertRaises(ssl.SSLWantReadError):
            client.do_handshake()  # the ClientHello, waiting in outgoing
        return client, incoming, outgoing

    def pump(self, client: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        for _ in range(10):
            data = outgoing.read()
            if data:
                self.protocol.dataReceived(data)
            answer = self.transport.value()
            self.transport.clear()
            if answer:
                incoming.write(answer)
            if not data and not answer:
                return
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                pass

    def test_a_handshake_then_data_both_ways(self) -> None:
        client, incoming, outgoing = self.client()
        self.pump(client, incoming, outgoing)
        self.assertTrue(self.protocol.handshaken)
        self.assertEqual(client.selected_alpn_protocol(), "http/1.1")
        self.assertEqual(client.version(), "TLSv1.3")
        client.write(b"GET / HTTP/1.1\r\n\r\n")
        self.pump(client, incoming, outgoing)
        self.assertEqual(self.router.data, b"GET / HTTP/1.1\r\n\r\n")
        self.protocol.write(b"HTTP/1.1 200 OK\r\n\r\n")
        incoming.write(self.transport.value())
        self.assertEqual(client.read(100), b"HTTP/1.1 200 OK\r\n\r\n")
        tag = self.protocol.session_tag()
        self.assertIsNotNone(tag)
        # A reload does not lose the tag of a connection made before it.
        self.server.install(self.server.load())
        self.assertEqual(self.protocol.session_tag(), tag)
        self.protocol.loseConnection()
        self.assertTrue(self.transport.disconnecting)

    def test_records_arriving_with_the_finished_or_in_pieces_are_all_read(self) -> None:
        # The protocol reads only while records wait: the client's Finished,
        # two requests and its close_notify in one segment all get through,
        # and a record cut in two is read once whole.
        client, incoming, outgoing = self.client()
        self.protocol.dataReceived(outgoing.read())  # ClientHello
        incoming.write(self.transport.value())
        self.transport.clear()
        client.do_handshake()
        client.write(b"GET /1 HTTP/1.1\r\n\r\n")
        client.write(b"GET /2 HTTP/1.1\r\n\r\n")
        with self.assertRaises(ssl.SSLWantReadError):
            client.unwrap()
        self.protocol.dataReceived(outgoing.read())
        self.assertTrue(self.protocol.handshaken)
        self.assertEqual(self.router.data, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_a_record_cut_in_two_is_read_once_whole(self) -> None:
        client, incoming, outgoing = self.client()
        self.pump(client, incoming, outgoing)
        client.write(b"GET / HTTP/1.1\r\n\r\n")
        record = outgoing.read()
        self.protocol.dataReceived(record[:7])
        self.assertEqual(self.router.data, b"")
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(record[7:])
        self.assertEqual(self.router.data, b"GET / HTTP/1.1\r\n\r\n")

    def test_the_clients_close_notify_closes(self) -> None:
        client, incoming, outgoing = self.client()
        self.pump(client, incoming, outgoing)
        with self.assertRaises(ssl.SSLWantReadError):
            client.unwrap()
        self.protocol.dataReceived(outgoing.read())
        self.assertTrue(self.transport.disconnecting)
        incoming.write(self.transport.value())
        client.unwrap()  # our close_notify came back

    def test_garbage_closes_and_counts(self) -> None:
        self.protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.router.data, b"")
        self.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(self.server.stats.failed, 1)
        self.assertIsInstance(self.router.lost.value, ssl.SSLError)  # type: ignore[attr-defined]
