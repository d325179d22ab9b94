# -*- test-case-name: tests.test_tls -*-
"""TLS for a balancing unit: listener certificates chosen by SNI, and TLS to hosts.

Listeners.  A listener with ``certificates`` terminates TLS before its
router sees a byte: :class:`TLSServerProtocol` pumps records through an
``ssl.SSLObject`` and hands plaintext to the router, whose transport it is.
Python's ``ssl`` serves here rather than pyOpenSSL because it is linked to
the system's shared libssl, which :mod:`nlbproxy.libssl` reaches for what no
Python binding offers: ticket keys shared by the units of a farm, the session
timeout, and an id stored in each session's tickets (TLS-session affinity).
pyOpenSSL's OpenSSL (inside cryptography's wheel) is static with hidden
symbols, and building cryptography from source needs Rust crates these
machines cannot download.

Every certificate file gets its own context, built once and never changed
once it served (OpenSSL contexts are not safe to change under live
connections): the SNI callback only moves a connection to the context of the
name it asked for, and a reload builds a whole new set and swaps it in.
Connections keep the context they started with, so a reload drops none.
Every context of a listener offers the same: TLS 1.2 and 1.3 only, ECDHE
with AEAD ciphers for 1.2 (1.3 has nothing else), no compression, no
renegotiation, ALPN ``http/1.1`` only.  Sessions resume by ticket or by the
unit's session cache; OpenSSL encrypts tickets with the keys of the
listener's default context, so a client resumes whatever name it asked for.

Hosts.  A pool with ``tls`` talks TLS to its hosts with pyOpenSSL under
Twisted's ``TLSMemoryBIOProtocol``: OpenSSL checks the chain against the
pool's CA bundle during the handshake, and service-identity checks the name
(``server_name``, or else the host's IP address) before the connection is
handed to a request, so nothing is sent to a host that failed either check.
"""

from __future__ import annotations

import re
import ssl
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, ISystemHandle
from twisted.internet.protocol import connectionDone, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nlbproxy import libssl

if TYPE_CHECKING:
    from nlbproxy.config import BackendTLSConfig

log = Logger()

ALPN = b"http/1.1"
#: TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only.  TLS 1.3 suites are
#: all AEAD with forward secrecy and keep OpenSSL's defaults.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

_PEM_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----\r?\n.*?-----END \1-----", re.S
)


class CertificateError(Exception):
    """A certificate or CA file that cannot be used, with the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Certificate:
    """One listener certificate file: its chain (leaf first), key and names."""

    path: str
    chain: tuple[x509.Certificate, ...]
    key: Any
    #: Lower-case DNS names from the leaf's SAN (or its CN without a SAN);
    #: ``*.example.com`` wildcards included as written.
    names: tuple[str, ...]
    not_after: datetime

    @property
    def fingerprint(self) -> str:
        return self.chain[0].fingerprint(hashes.SHA256()).hex()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CertificateError(path, f"cannot read: {exc.strerror}") from None
    if not data.strip():
        raise CertificateError(path, "empty file")
    return data


def _load_chain(path: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(path, f"no PEM certificate could be read ({exc})") from None


def read_certificate(path: str) -> Certificate:
    """Read a PEM file holding a certificate chain (leaf first) and its private key.

    Raises :class:`CertificateError` naming ``path`` and what is wrong.
    """
    data = _read(path)
    chain = _load_chain(path, data)
    keys = list(_PEM_KEY.finditer(data))
    if not keys:
        raise CertificateError(path, "no private key (expected a PEM 'PRIVATE KEY' block after the chain)")
    if len(keys) > 1:
        raise CertificateError(path, "more than one private key")
    if keys[0].group(1) == b"ENCRYPTED PRIVATE KEY":
        raise CertificateError(path, "the private key is encrypted; the unit needs it in clear")
    try:
        key = serialization.load_pem_private_key(keys[0].group(0), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(path, f"bad private key: {exc}") from None
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise CertificateError(path, "the private key does not match the first certificate")
    names = server_names(leaf)
    if not names:
        raise CertificateError(path, "the certificate names no DNS name (no SAN dNSName, no CN)")
    not_after = leaf.not_valid_after_utc
    if not_after < datetime.now(UTC):
        log.warn("certificate {path} expired on {when}", path=path, when=not_after.isoformat())
    return Certificate(path, tuple(chain), key, names, not_after)


def server_names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a leaf certificate serves: its SAN dNSNames, else its CN."""
    try:
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = san.get_values_for_type(x509.DNSName)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(name.lower().rstrip(".") for name in names if name))


def read_ca_file(path: str) -> list[x509.Certificate]:
    """The CA certificates of a PEM bundle; raises :class:`CertificateError`."""
    return _load_chain(path, _read(path))


# -- listeners -------------------------------------------------------------------------
@dataclass(slots=True)
class TLSStats:
    """Handshakes of one listener, counted when their connection closes."""

    full: int = 0
    resumed: int = 0
    #: Connections closed before the handshake finished: garbage, old
    #: protocol versions, no common cipher, or clients that went away.
    failed: int = 0


def farm_ticket_keys(secret: bytes, listener: str, epoch: int) -> bytes:
    """The ticket keys of ``listener`` in ``epoch``: the same on every unit
    that shares ``secret`` (the farm's ``secret_file``)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=libssl.TICKET_KEYS_SIZE, salt=b"nlbproxy tls ticket keys v1",
                info=b"%s\0%d" % (listener.encode(), epoch))
    return hkdf.derive(secret)


class _SNIMap:
    """One generation of a listener's contexts: by exact name and by wildcard parent."""

    def __init__(self, certificates: list[Certificate], contexts: list[ssl.SSLContext], pointers: list[int]) -> None:
        self.certificates = certificates
        self.contexts = contexts
        #: The contexts' SSL_CTX pointers (empty without libssl).
        self.pointers = pointers
        self.default = contexts[0]
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        # The first file naming a host wins, as the operator listed them.
        for cert, context in zip(certificates, contexts):
            for name in cert.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], context)
                else:
                    self.exact.setdefault(name, context)

    def lookup(self, name: str) -> ssl.SSLContext | None:
        context = self.exact.get(name)
        if context is None:
            _, dot, parent = name.partition(".")
            if dot:
                context = self.wildcard.get(parent)
        return context


class TLSServer:
    """The certificates of one listener, and the TLS connections it accepts.

    Tickets: with ``session_tickets = "farm"`` their keys come from the
    farm's secret and the clock (:func:`farm_ticket_keys`, a new key every
    ``ticket_key_period`` seconds, set on the listener's contexts by the
    first connection of a new period), so a ticket made by one unit resumes
    on any other.  OpenSSL holds one key per context: after a change of
    period, tickets of the previous one are not accepted and their clients
    do one full handshake.  With ``"unit"`` OpenSSL's own random keys serve,
    carried over to the new contexts on a reload.
    """

    def __init__(self, listener: str, paths: tuple[str, ...], session_tickets: str = "unit",
                 session_timeout: float = 7200.0, *, secret: bytes | None = None, clock: Any = None,
                 ticket_key_period: float = 3600.0) -> None:
        self.listener = listener
        self.paths = paths
        self.session_tickets = session_tickets
        self.session_timeout = session_timeout
        self.secret = secret
        self.clock = clock
        self.ticket_key_period = ticket_key_period
        self.epoch = -1
        self.lib: libssl.LibSSL | None = None
        try:
            self.lib = libssl.libssl()
        except libssl.LibSSLUnavailable as exc:
            if session_tickets == "farm":
                raise  # the config check refuses it first, with the same reason
            log.warn("listener {name}: {why}; sessions keep OpenSSL's defaults and tls_session affinity is off",
                     name=listener, why=str(exc))
        if session_tickets == "farm" and (secret is None or clock is None):
            raise ValueError("farm ticket keys need the farm's secret and a clock")
        self.stats = TLSStats()
        #: Every context still in use (by a connection of before a reload
        #: too) and its SSL_CTX pointer.
        self._pointers: weakref.WeakKeyDictionary[ssl.SSLContext, int] = weakref.WeakKeyDictionary()
        self.contexts = self.load()
        self._set_farm_keys(self.contexts)

    def load(self, paths: tuple[str, ...] | None = None) -> _SNIMap:
        """Read every file (``paths``, else the current ones) and build its
        context; raises :class:`CertificateError`.

        What it returns serves new connections once given to :meth:`install`;
        a reload of several listeners loads them all before installing any.
        """
        certificates = [read_certificate(path) for path in (self.paths if paths is None else paths)]
        contexts = [self._context(cert) for cert in certificates]
        pointers = [self._tune(ctx) for ctx in contexts] if self.lib is not None else []
        self._pointers.update(zip(contexts, pointers))
        return _SNIMap(certificates, contexts, pointers)

    def _context(self, cert: Certificate) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
        if self.session_tickets == "off":
            ctx.options |= ssl.OP_NO_TICKET
        try:
            ctx.set_ciphers(TLS12_CIPHERS.decode())
            ctx.load_cert_chain(cert.path)
        except (ssl.SSLError, OSError) as exc:
            raise CertificateError(cert.path, f"OpenSSL refused it: {exc}") from None
        ctx.set_alpn_protocols([ALPN.decode()])
        ctx.sni_callback = self._servername
        return ctx

    def _tune(self, ctx: ssl.SSLContext) -> int:
        lib = self.lib
        assert lib is not None
        pointer = lib.context_pointer(ctx)
        if self.session_tickets == "off":
            lib.disable_session_cache(pointer)
        else:
            lib.set_session_timeout(pointer, int(self.session_timeout))
            lib.tag_sessions(pointer)
        return pointer

    def _set_farm_keys(self, contexts: _SNIMap) -> None:
        if self.session_tickets != "farm":
            return
        assert self.lib is not None and self.secret is not None
        self.epoch = int(self.clock.seconds() // self.ticket_key_period)
        keys = farm_ticket_keys(self.secret, self.listener, self.epoch)
        for pointer in contexts.pointers:
            self.lib.set_ticket_keys(pointer, keys)
            if self.lib.ticket_keys(pointer) != keys:
                raise libssl.LibSSLUnavailable("libssl did not keep the ticket keys")

    def _servername(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        if not name:
            return
        context = self.contexts.lookup(name.lower().rstrip("."))
        if context is not None and context is not ctx:
            sslobj.context = context

    def install(self, contexts: _SNIMap, paths: tuple[str, ...] | None = None) -> None:
        """Serve new connections with ``contexts`` (loaded from ``paths``, if
        they are new files); open ones keep theirs."""
        if paths is not None:
            self.paths = paths
        if self.session_tickets == "farm":
            self._set_farm_keys(contexts)
        elif self.session_tickets == "unit" and self.lib is not None:
            # Tickets already out stay good across the reload.
            keys = self.lib.ticket_keys(self.contexts.pointers[0])
            for pointer in contexts.pointers:
                self.lib.set_ticket_keys(pointer, keys)
        self.contexts = contexts
        log.info("listener {name}: certificates loaded: {files}", name=self.listener,
                 files=", ".join(f"{c.path} ({' '.join(c.names)})" for c in contexts.certificates))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"file": cert.path, "names": list(cert.names), "not_after": cert.not_after.isoformat(),
             "sha256": cert.fingerprint}
            for cert in self.contexts.certificates
        ]

    def new_connection(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        contexts = self.contexts
        if self.session_tickets == "farm" and self.clock.seconds() // self.ticket_key_period != self.epoch:
            self._set_farm_keys(contexts)
        return contexts.default.wrap_bio(incoming, outgoing, server_side=True)

    def session_tag(self, sslobj: ssl.SSLObject) -> str | None:
        """The id stored in the connection's session tickets (stable across
        resumptions, on every unit of a farm), or None."""
        lib = self.lib
        if lib is None:
            return None
        # The connection's context: the default, another one (SNI), or one
        # of before a reload.
        context_pointer = self._pointers.get(sslobj.context)
        pointer = lib.ssl_pointer(sslobj, context_pointer) if context_pointer is not None else None
        tag = lib.session_tag(pointer) if pointer is not None else None
        return tag.hex() if tag is not None else None

    def wrap(self, factory: Any) -> TLSListenerFactory:
        """``factory`` (the listener's router) behind this TLS."""
        return TLSListenerFactory(self, factory)


#: Plaintext read from OpenSSL at a time.
READ_SIZE = 64 * 1024


class TLSServerProtocol(Protocol):
    """TLS between a client's TCP connection and the listener's router.

    A thin byte pump around an ``ssl.SSLObject`` with memory BIOs: records
    in, plaintext to the router; plaintext out, records to the socket.  It
    is the router's transport: flow control, peer address and aborts go
    straight to the TCP transport, as TLS neither adds nor holds bytes a
    producer could care about.  Decrypted data is always read out whole, so
    none waits inside OpenSSL while the router is paused (h11 holds it,
    bounded as usual).  A handshake that fails (garbage, old versions, no
    common cipher) closes the connection after OpenSSL's alert, and is
    counted.

    Handshake flights and the close_notify go straight to the socket while
    nothing of ours waits in Twisted's write buffer (until the router's
    first write): most connections live only for a handshake, and Twisted's
    buffered write costs each flight an extra turn of the reactor and two
    ``epoll_ctl`` calls.  What the socket does not take at once, and
    everything after the router's first write, goes through Twisted's
    buffer, which keeps the order.
    """

    transport: Any

    def __init__(self, server: TLSServer, wrapped: Any) -> None:
        self.server = server
        self.wrapped = wrapped
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = server.new_connection(self._incoming, self._outgoing)
        self.handshaken = False
        self.disconnecting = False
        self.error: Exception | None = None
        self._pending: list[bytes] = []
        #: The socket, written directly (see above); None once Twisted's
        #: buffer may hold our bytes, or for transports without one.
        self._socket: Any = None

    # -- from the socket -------------------------------------------------------------
    def connectionMade(self) -> None:
        if ISystemHandle.providedBy(self.transport):
            self._socket = self.transport.getHandle()
        self.wrapped.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        tls = self.tls
        self._incoming.write(data)
        if not self.handshaken:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, ValueError) as exc:
                self._fail(exc)
                return
            self.handshaken = True
            self._flush()
            if self._pending:
                pending, self._pending = self._pending, []
                self.write(b"".join(pending))
        # Read while records wait in the BIO, or plaintext inside OpenSSL
        # (which reads no record ahead): reading an empty buffer only raises
        # SSLWantReadError, an exception per read event on every connection.
        incoming = self._incoming
        while not self.disconnecting and (incoming.pending or tls.pending()):
            try:
                chunk = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if not chunk:
                # The client's close_notify (Python's ssl returns no data
                # for it): it sends nothing more; answer and close.
                self.loseConnection()
                return
            self.wrapped.dataReceived(chunk)
        self._flush()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.disconnecting = True
        self._flush()  # OpenSSL's alert says why
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._socket = None
        stats = self.server.stats
        if not self.handshaken:
            stats.failed += 1
        elif self.tls.session_reused:
            stats.resumed += 1
        else:
            stats.full += 1
        wrapped, self.wrapped = self.wrapped, None
        # Without the router, nothing is left in a cycle with this protocol:
        # the connection is freed at once rather than by the collector.
        wrapped.connectionLost(reason if self.error is None else Failure(self.error))

    # -- the router's transport --------------------------------------------------------
    def _flush(self) -> None:
        data = self._outgoing.read()
        if not data:
            return
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                # Full (EAGAIN), or an error that Twisted meets and reports
                # when it writes the same bytes.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._socket = None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        if not self.handshaken:
            self._pending.append(data)
            return
        # Requests and responses keep Twisted's buffering: what one reactor
        # turn writes leaves in one send.
        self._socket = None
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self.handshaken:
            try:
                self.tls.unwrap()  # our close_notify; the client's is not awaited
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.transport.abortConnection()

    def session_tag(self) -> str | None:
        return self.server.session_tag(self.tls) if self.handshaken else None

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class TLSListenerFactory(Factory):
    """The listener's router factory, each connection behind a :class:`TLSServerProtocol`."""

    noisy = False

    def __init__(self, server: TLSServer, wrapped: Any) -> None:
        self.server = server
        self.wrapped = wrapped

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> TLSServerProtocol | None:
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        return TLSServerProtocol(self.server, protocol)


# -- hosts ------------------------------------------------------------------------------
def _verify_error(code: int) -> str:
    text = SSL._ffi.string(SSL._lib.X509_verify_cert_error_string(code))
    return text.decode("ascii", "replace")


class BackendTLS:
    """TLS to the hosts of one pool: one client context, built once."""

    def __init__(self, config: BackendTLSConfig) -> None:
        self.config = config
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_cipher_list(TLS12_CIPHERS)
        if config.verify:
            if config.ca_file is not None:
                ctx.load_verify_locations(config.ca_file.encode())
            else:
                ctx.set_default_verify_paths()
            ctx.set_verify(SSL.VERIFY_PEER, _record_verify_error)
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        self.context = ctx

    def creator(self, host: str) -> BackendCreator:
        """The connection creator for one host (an IP address)."""
        return BackendCreator(self, host)


def _record_verify_error(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    # OpenSSL's own answer stands; we only keep its reason for the log.
    if not ok:
        protocol = conn.get_app_data()
        wrapped = getattr(protocol, "wrappedProtocol", None)
        if wrapped is not None and getattr(wrapped, "tls_error", None) is None:
            subject = cert.get_subject().CN if cert is not None else None
            wrapped.tls_error = f"certificate verify failed: {_verify_error(errno)} (depth {depth}, CN={subject})"
    return bool(ok)


@implementer(IOpenSSLClientConnectionCreator)
class BackendCreator:
    def __init__(self, backend: BackendTLS, host: str) -> None:
        self.backend = backend
        self.host = host

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.backend.context, None)
        conn.set_app_data(tlsProtocol)
        name = self.backend.config.server_name
        if name is not None:
            conn.set_tlsext_host_name(name.encode("idna"))
        conn.set_connect_state()
        return conn

    def check_identity(self, conn: SSL.Connection) -> str | None:
        """Why the host's certificate does not name what we expect, or None."""
        config = self.backend.config
        if not config.verify:
            return None
        try:
            if config.server_name is not None:
                verify_hostname(conn, config.server_name)
            else:
                verify_ip_address(conn, self.host)
        except VerificationError as exc:
            expected = config.server_name or self.host
            return f"certificate does not match {expected!r}: {exc}"
        return None
