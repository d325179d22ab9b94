# -*- test-case-name: tests.test_tls -*-
"""TLS for a balancing unit: listener certificates chosen by SNI, and TLS to hosts.

Listeners.  A listener with ``certificates`` terminates TLS (pyOpenSSL under
Twisted's ``TLSMemoryBIOProtocol``) before its router sees a byte.  Every
certificate file gets its own OpenSSL context, built once: pyOpenSSL refuses
to change a context after it served a connection, so the SNI callback only
switches a connection to the context of the name the client asked for, and
a reload builds a whole new set and swaps it in.  Connections keep the
context they started with, so a reload drops none of them.

Every context of a listener offers the same things: TLS 1.2 and 1.3 only,
ECDHE with AEAD ciphers for 1.2 (1.3 has nothing else), no compression, no
renegotiation, ALPN ``http/1.1`` only.  Sessions resume by ticket or by the
unit's session cache.  OpenSSL encrypts tickets with keys of the context a
connection started on (the listener's default context) and checks the
listener's session id context, so a client resumes whatever name it asked
for, on this unit, until a reload (new contexts, new keys).

Why tickets are not shared across the units of a farm: that needs the same
ticket keys in every unit (``SSL_CTX_ctrl`` with
``SSL_CTRL_SET_TLSEXT_TICKET_KEYS``, or the ticket key callback), and
neither pyOpenSSL nor cryptography binds them; their wheels link OpenSSL
statically with hidden symbols, so nothing else can reach those functions
either, and building cryptography against the system's libssl needs its
Rust crates, which this project's machines cannot download.  A client that
moves to another unit does one full handshake there.

Hosts.  A pool with ``tls`` talks TLS to its hosts: OpenSSL checks the chain
against the pool's CA bundle during the handshake, and service-identity
checks the name (``server_name``, or else the host's IP address) before the
connection is handed to a request, so nothing is sent to a host that failed
either check.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from nlbproxy.config import BackendTLSConfig

log = Logger()

#: Why ``session_tickets = "farm"`` is refused (see the module docstring).
FARM_TICKETS_UNSUPPORTED = (
    "shared ticket keys need OpenSSL's SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS), which "
    "pyOpenSSL does not bind and cryptography's statically linked OpenSSL hides; use \"unit\""
)

ALPN = b"http/1.1"
#: TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only.  TLS 1.3 suites are
#: all AEAD with forward secrecy and keep OpenSSL's defaults.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
_SERVER_OPTIONS = (
    SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1
)

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


class _SNIMap:
    """One generation of a listener's contexts: by exact name and by wildcard parent."""

    def __init__(self, certificates: list[Certificate], contexts: list[SSL.Context]) -> None:
        self.certificates = certificates
        self.default = contexts[0]
        self.exact: dict[str, SSL.Context] = {}
        self.wildcard: dict[str, SSL.Context] = {}
        # The first file naming a host wins, as the operator listed them.
        for cert, context in zip(certificates, contexts):
            for name in cert.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], context)
                else:
                    self.exact.setdefault(name, context)

    def lookup(self, name: str) -> SSL.Context | None:
        context = self.exact.get(name)
        if context is None:
            _, dot, parent = name.partition(".")
            if dot:
                context = self.wildcard.get(parent)
        return context


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> Any:
    # A client offering only h2 gets no ALPN rather than a failed handshake:
    # HTTP/1.1 is still what it will speak.
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class TLSServer:
    """The certificates of one listener, and the TLS connections it accepts."""

    def __init__(self, listener: str, paths: tuple[str, ...], session_tickets: str = "unit",
                 session_timeout: float = 7200.0) -> None:
        self.listener = listener
        self.paths = paths
        self.session_tickets = session_tickets
        self.session_timeout = session_timeout
        # Resumption checks that a session was made for the same listener;
        # every context of the listener shares the value.
        self.session_id_context = hashlib.sha256(b"nlbproxy listener " + listener.encode()).digest()[:32]
        self.stats = TLSStats()
        self.contexts = self.load()

    def load(self) -> _SNIMap:
        """Read every file and build its context; raises :class:`CertificateError`.

        What it returns serves new connections once given to :meth:`install`;
        a reload of several listeners loads them all before installing any.
        """
        certificates = [read_certificate(path) for path in self.paths]
        return _SNIMap(certificates, [self._context(cert) for cert in certificates])

    def _context(self, cert: Certificate) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        options = _SERVER_OPTIONS
        if self.session_tickets == "off":
            options |= SSL.OP_NO_TICKET
        ctx.set_options(options)
        try:
            ctx.set_cipher_list(TLS12_CIPHERS)
            ctx.use_certificate(cert.chain[0])
            for extra in cert.chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(cert.key)
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise CertificateError(cert.path, f"OpenSSL refused it: {exc}") from None
        ctx.set_session_id(self.session_id_context)
        if self.session_tickets == "off":
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        else:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
            ctx.set_timeout(int(self.session_timeout))
        ctx.set_tlsext_servername_callback(self._servername)
        ctx.set_alpn_select_callback(_select_alpn)
        return ctx

    def _servername(self, conn: SSL.Connection) -> None:
        name = conn.get_servername()
        if not name:
            return
        context = self.contexts.lookup(name.decode("ascii", "replace").lower().rstrip("."))
        if context is not None and context is not conn.get_context():
            conn.set_context(context)

    def install(self, contexts: _SNIMap) -> None:
        """Serve new connections with ``contexts``; open ones keep theirs."""
        self.contexts = contexts
        log.info("listener {name}: certificates loaded: {files}", name=self.listener,
                 files=", ".join(f"{c.path} ({' '.join(c.names)})" for c in contexts.certificates))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"file": cert.path, "names": list(cert.names), "not_after": cert.not_after.isoformat(),
             "sha256": cert.fingerprint}
            for cert in self.contexts.certificates
        ]

    # IOpenSSLServerConnectionCreator
    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.contexts.default, None)

    def wrap(self, factory: Any) -> TLSMemoryBIOFactory:
        """``factory`` (the listener's router) behind this TLS."""
        return _ListenerTLSFactory(self, factory)


class _ServerTLSProtocol(TLSMemoryBIOProtocol):
    """Counts how each connection's handshake went, once it closes."""

    factory: _ListenerTLSFactory

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        stats = self.factory.stats
        if not self._handshakeDone:
            stats.failed += 1
        elif session_reused(self.getHandle()):
            stats.resumed += 1
        else:
            stats.full += 1
        super().connectionLost(reason)


class _ListenerTLSFactory(TLSMemoryBIOFactory):
    protocol = _ServerTLSProtocol
    noisy = False

    def __init__(self, server: TLSServer, factory: Any) -> None:
        super().__init__(server, False, factory)
        self.stats = server.stats


def session_reused(conn: SSL.Connection) -> bool:
    """Whether ``conn``'s handshake resumed a session (pyOpenSSL has no method for it)."""
    return bool(SSL._lib.SSL_session_reused(conn._ssl))


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
