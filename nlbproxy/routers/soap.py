# -*- test-case-name: tests.test_soap -*-
"""SOAP 1.1 and 1.2 requests, sans-I/O: what a router reads of them, and the
faults it answers itself.

Nothing here touches a socket or the reactor; routing plugins may use every
name below as it is.

Reading a request, in two places:

- :func:`http_binding` reads the HTTP headers (lower-case ``(name, value)``
  byte pairs): ``text/xml`` with a ``SOAPAction`` header is SOAP 1.1,
  ``application/soap+xml`` with the ``action`` parameter of its
  ``Content-Type`` is SOAP 1.2.  It returns an :class:`HttpBinding`, or None
  for a request that is not SOAP at all.
- :class:`EnvelopeSniffer` reads a bounded prefix of the body incrementally
  (``feed(bytes)`` then ``end()``), and returns an :class:`Envelope` -- the
  version from the Envelope's namespace, the operation (the first child of
  ``Body`` in Clark form ``{namespace}local``) and selected ``Header``
  entries' text (WS-Addressing ``To`` and ``Action`` by default) -- as soon as
  the operation's start tag is seen; the rest of the body is never parsed.
- :func:`read_request` does both for a router that holds the body prefix:
  ``read_request(headers, prefix, complete)`` returns a :class:`SoapCall`
  (version, effective action, operation, WS-Addressing fields) or None.

A routing plugin on a ``protocol = "soap"`` listener finds the call already
read in ``view.soap`` (:class:`nlbproxy.routing.RequestView`); elsewhere it
asks for a body prefix of at least ``SnifferLimits().max_prefix`` bytes and
calls ``read_request(view.headers, view.body, view.body_complete)`` itself,
turning a :class:`SoapError` into ``Refusal(fault.status, fault.body,
fault.headers)`` with ``fault = error.fault()``.

Anything wrong raises :class:`SoapError`, which carries the fault code, a
reason and the SOAP version when it is known; ``error.fault()`` builds the
answer.  :func:`build_fault` builds a SOAP 1.1 or 1.2 Fault (a
:class:`Fault`: HTTP status, headers, body) with the status of each version's
HTTP binding: SOAP 1.1 answers every fault with 500; SOAP 1.2 answers
``env:Sender`` with 400 and every other code with 500.

The XML parser is expat, namespace-aware and hardened: a DOCTYPE, entity
declaration or processing instruction is refused the moment expat reports it,
so no entity is ever declared, let alone expanded (billion laughs, quadratic
blowup) or fetched (external entities); parameter entities are never parsed;
and the prefix bytes, element depth, attributes per element, name lengths and
header text are capped (``MAX_SOAP_*`` in :mod:`nlbproxy.limits`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn
from xml.parsers import expat

from nlbproxy import limits

Headers = Sequence[tuple[bytes, bytes]]

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
WSA_2004_NS = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
WSA_2005_NS = "http://www.w3.org/2005/08/addressing"

#: The Header entries an :class:`EnvelopeSniffer` keeps by default.
WSA_HEADERS = frozenset(
    f"{{{ns}}}{local}" for ns in (WSA_2004_NS, WSA_2005_NS) for local in ("To", "Action")
)


class SoapVersion(enum.Enum):
    SOAP11 = "1.1"
    SOAP12 = "1.2"

    @property
    def namespace(self) -> str:
        return SOAP11_NS if self is SoapVersion.SOAP11 else SOAP12_NS

    @property
    def media_type(self) -> bytes:
        return b"text/xml" if self is SoapVersion.SOAP11 else b"application/soap+xml"


_BY_NAMESPACE = {v.namespace: v for v in SoapVersion}


class FaultCode(enum.Enum):
    """Who is to blame, in SOAP 1.2 words; SOAP 1.1 says Client and Server."""

    SENDER = "Sender"
    RECEIVER = "Receiver"
    VERSION_MISMATCH = "VersionMismatch"


_SOAP11_CODES = {
    FaultCode.SENDER: "Client",
    FaultCode.RECEIVER: "Server",
    FaultCode.VERSION_MISMATCH: "VersionMismatch",
}


@dataclass(frozen=True, slots=True)
class Fault:
    """A complete answer: status, header fields (without Content-Length) and body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class SoapError(Exception):
    """A request the router will not route, with the fault that answers it."""

    def __init__(
        self, reason: str, version: SoapVersion | None = None, code: FaultCode = FaultCode.SENDER
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.version = version
        self.code = code

    def fault(self, default: SoapVersion = SoapVersion.SOAP11) -> Fault:
        """The Fault in the request's version, or in *default* when it is unknown."""
        return build_fault(self.version or default, self.code, self.reason)


# --- the HTTP binding -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HttpBinding:
    """What the HTTP headers say: the version and the action (None: not given;
    ``""``: SOAP 1.1's "the intent is the request URI")."""

    version: SoapVersion
    action: str | None


_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rb"[ \t]*(" + _TOKEN + rb"/" + _TOKEN + rb")[ \t]*")
# Unquoted values are read up to the next ';' or blank, not only as tokens:
# clients send action=urn:x (':' is no token character) and mean it.
_PARAMETER = re.compile(
    rb";[ \t]*(" + _TOKEN + rb")=(" + rb'[\x21\x23-\x3a\x3c-\x7e]+|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*")[ \t]*'
)
_OWS = re.compile(rb"[ \t]*;?[ \t]*")


def _unquote(value: bytes) -> str:
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        value = re.sub(rb"\\(.)", rb"\1", value[1:-1])
    return value.decode("latin-1")


def parse_content_type(value: bytes) -> tuple[bytes, dict[bytes, str]]:
    """A Content-Type's lower-case media type and its parameters (RFC 9110 8.3.1).

    A parameter given twice is refused: two readers of one request could pick
    different ones.
    """
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise SoapError(f"malformed Content-Type {value.decode('latin-1')!r}")
    params: dict[bytes, str] = {}
    pos = match.end()
    while pos < len(value):
        param = _PARAMETER.match(value, pos)
        if param is None:
            tail = _OWS.fullmatch(value, pos)  # a trailing ';' is allowed
            if tail is not None:
                break
            raise SoapError(f"malformed Content-Type {value.decode('latin-1')!r}")
        name = param.group(1).lower()
        if name in params:
            raise SoapError(f"Content-Type parameter {name.decode()!r} given twice")
        params[name] = _unquote(param.group(2))
        pos = param.end()
    return match.group(1).lower(), params


def http_binding(headers: Headers) -> HttpBinding | None:
    """The SOAP version and action the request's headers declare, or None
    when its Content-Type is neither ``text/xml`` nor ``application/soap+xml``."""
    types = [value for name, value in headers if name == b"content-type"]
    if not types:
        return None
    if len(types) > 1:
        raise SoapError("several Content-Type header fields")
    media, params = parse_content_type(types[0])
    if media == b"application/soap+xml":
        return HttpBinding(SoapVersion.SOAP12, params.get(b"action"))
    if media != b"text/xml":
        return None
    actions = [value for name, value in headers if name == b"soapaction"]
    if len(actions) > 1:
        raise SoapError("several SOAPAction header fields", SoapVersion.SOAP11)
    action = _unquote(actions[0].strip(b" \t")) if actions else None
    return HttpBinding(SoapVersion.SOAP11, action)


# --- the envelope ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SnifferLimits:
    """The bounds of one :class:`EnvelopeSniffer` (defaults: ``nlbproxy.limits``)."""

    max_prefix: int = limits.MAX_SOAP_PREFIX
    max_depth: int = limits.MAX_SOAP_DEPTH
    max_attributes: int = limits.MAX_SOAP_ATTRIBUTES
    max_name: int = limits.MAX_SOAP_NAME
    max_header_text: int = limits.MAX_SOAP_HEADER_TEXT
    #: Clark names of the Header entries whose text is kept.
    headers: frozenset[str] = WSA_HEADERS


_DEFAULT_LIMITS = SnifferLimits()


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the start of an envelope says."""

    version: SoapVersion
    #: The first child of Body as ``{namespace}local`` (``local`` when it has
    #: no namespace); None for an empty Body.
    operation: str | None
    #: Text of the selected Header entries that were present, by Clark name;
    #: the first entry of a name wins.
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def _wsa(self, local: str) -> str | None:
        for ns in (WSA_2005_NS, WSA_2004_NS):
            value = self.headers.get(f"{{{ns}}}{local}")
            if value is not None:
                return value
        return None

    @property
    def wsa_to(self) -> str | None:
        return self._wsa("To")

    @property
    def wsa_action(self) -> str | None:
        return self._wsa("Action")


class _Found(Exception):
    """Raised from an expat handler to stop parsing: the operation was seen."""


#: Bytes gathered before expat is called again.  expat 2.5 rescans a token
#: that a chunk cut in two from its start on every call, so a client dripping a
#: long start tag one byte per packet would cost quadratic time; whole chunks
#: bound that rescanning to MAX_SOAP_PREFIX / _CHUNK passes.
_CHUNK = 1024


_ENCODINGS = frozenset({"utf-8", "utf-16", "iso-8859-1", "us-ascii"})


def _clark(name: str) -> str:
    # expat joins namespace and local name with the separator given below.
    ns, sep, local = name.rpartition(" ")
    return f"{{{ns}}}{local}" if sep else local


class EnvelopeSniffer:
    """Reads the start of one SOAP envelope, incrementally, up to its operation.

    ``feed(data)`` returns the :class:`Envelope` once known (and on every call
    after), else None; ``end()`` says the body is complete and returns the
    Envelope or raises.  Both raise :class:`SoapError` for a malformed,
    hostile or oversize envelope; after an error every call raises it again.
    Data fed after the Envelope is known is ignored.  Results come at the
    latest when ``_CHUNK`` more bytes have been fed, or at ``end()``.

    *expect* is the version the HTTP binding declared, if any: it is the
    version errors carry until the Envelope's namespace is seen.
    """

    def __init__(self, bounds: SnifferLimits | None = None, expect: SoapVersion | None = None) -> None:
        self.bounds = bounds or _DEFAULT_LIMITS
        self.version = expect
        self._result: Envelope | None = None
        self._error: SoapError | None = None
        self._fed = 0
        self._pending: list[bytes] = []
        self._pending_len = 0
        # Where the parse is: the open elements, and what the next element may be.
        self._depth = 0
        self._envelope_ns: str | None = None
        self._header_seen = False
        self._in_body = False
        self._entry: str | None = None  # a wanted Header entry being read
        self._entry_depth = 0
        self._text: list[str] = []
        self._text_len = 0
        self._headers: dict[str, str] = {}
        self._declared = 0  # namespace declarations for the next element
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.ordered_attributes = True
        parser.XmlDeclHandler = self._declaration
        parser.StartDoctypeDeclHandler = self._refuse_dtd
        parser.EntityDeclHandler = self._refuse_entity
        parser.UnparsedEntityDeclHandler = self._refuse_entity
        parser.NotationDeclHandler = self._refuse_entity
        parser.ExternalEntityRefHandler = self._refuse_external
        parser.ProcessingInstructionHandler = self._refuse_pi
        parser.StartNamespaceDeclHandler = self._namespace
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._characters
        self._parser: Any = parser

    # -- the public calls -------------------------------------------------------

    def feed(self, data: bytes) -> Envelope | None:
        if self._error is not None:
            raise self._error
        if self._result is not None or not data:
            return self._result
        room = self.bounds.max_prefix - self._fed
        over = len(data) > room
        if over:
            data = data[:room]
        self._fed += len(data)
        self._pending.append(data)
        self._pending_len += len(data)
        if over or self._pending_len >= _CHUNK or self._fed >= self.bounds.max_prefix:
            self._parse(final=False)
            if self._result is None and self._fed >= self.bounds.max_prefix:
                self._fail(
                    f"SOAP envelope: no operation within the first {self.bounds.max_prefix} bytes"
                )
        return self._result

    def end(self) -> Envelope:
        if self._error is not None:
            raise self._error
        if self._result is None:
            self._parse(final=True)
        if self._result is None:  # expat reports a truncated document itself
            self._fail("SOAP envelope has no Body")
        return self._result

    # -- driving expat ------------------------------------------------------------

    def _parse(self, final: bool) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        try:
            self._parser.Parse(data, final)
        except _Found:
            pass
        except SoapError as exc:
            self._error = exc
            raise
        except expat.ExpatError as exc:
            self._fail(f"malformed XML: {expat.ErrorString(exc.code)} at line {exc.lineno}")
        finally:
            if self._result is not None or self._error is not None:
                self._release()

    def _release(self) -> None:
        # The parser holds bound methods of self; drop it so both are freed.
        self._parser = None

    def _fail(self, reason: str, code: FaultCode = FaultCode.SENDER) -> NoReturn:
        self._error = SoapError(reason, self.version, code)
        self._release()
        raise self._error

    # -- expat handlers -------------------------------------------------------------

    def _declaration(self, version: str, encoding: str | None, standalone: int) -> None:
        # Other encodings would go through Python's codecs (pyexpat's
        # unknown-encoding handler); the four expat knows itself suffice for
        # SOAP, which asks for UTF-8 or UTF-16.
        if encoding is not None and encoding.lower() not in _ENCODINGS:
            self._fail(f"unsupported character encoding {encoding[:40]!r}")

    def _refuse_dtd(self, *_: object) -> NoReturn:
        self._fail("SOAP envelope must not have a document type declaration")

    def _refuse_entity(self, *_: object) -> NoReturn:
        self._fail("SOAP envelope must not declare entities")

    def _refuse_external(self, *_: object) -> NoReturn:
        self._fail("SOAP envelope must not reference external entities")

    def _refuse_pi(self, *_: object) -> NoReturn:
        self._fail("SOAP envelope must not contain processing instructions")

    def _namespace(self, prefix: str | None, uri: str | None) -> None:
        self._declared += 1
        if len(uri or "") > self.bounds.max_name:
            self._fail(f"namespace name longer than {self.bounds.max_name} characters")

    def _start(self, name: str, attributes: list[str]) -> None:
        bounds = self.bounds
        self._depth += 1
        if self._depth > bounds.max_depth:
            self._fail(f"SOAP envelope nested deeper than {bounds.max_depth} elements")
        if len(attributes) // 2 + self._declared > bounds.max_attributes:
            self._fail(f"more than {bounds.max_attributes} attributes on one element")
        self._declared = 0
        if len(name) + 2 > bounds.max_name or (
            attributes and max(map(len, attributes[::2])) + 2 > bounds.max_name
        ):
            self._fail(f"name longer than {bounds.max_name} characters")
        qname = _clark(name)
        depth = self._depth
        if depth == 1:
            self._start_envelope(qname)
        elif depth == 2:
            self._start_section(qname)
        elif self._in_body:  # depth 3: the operation
            self._found(qname)
        elif depth == 3 and self._entry is None and qname in bounds.headers and qname not in self._headers:
            self._entry = qname
            self._entry_depth = depth

    def _found(self, operation: str | None) -> NoReturn:
        assert self.version is not None  # set by the Envelope's start tag
        self._result = Envelope(self.version, operation, MappingProxyType(dict(self._headers)))
        raise _Found

    def _start_envelope(self, qname: str) -> None:
        ns, _, local = qname[1:].partition("}") if qname.startswith("{") else ("", "", qname)
        version = _BY_NAMESPACE.get(ns)
        if local != "Envelope":
            self._fail(f"root element is {qname}, not a SOAP Envelope")
        if version is None:
            self._fail(
                f"unknown SOAP envelope namespace {ns!r}" if ns else "SOAP Envelope has no namespace",
                FaultCode.VERSION_MISMATCH,
            )
        self.version = version
        self._envelope_ns = ns

    def _start_section(self, qname: str) -> None:
        ns = self._envelope_ns
        if qname == f"{{{ns}}}Body":
            self._in_body = True
        elif qname != f"{{{ns}}}Header" or self._header_seen:
            self._fail(f"expected SOAP Header or Body, got {qname}")

    def _end(self, name: str) -> None:
        depth = self._depth
        self._depth -= 1
        if self._entry is not None and depth == self._entry_depth:
            self._headers[self._entry] = "".join(self._text).strip()
            self._entry = None
            self._text.clear()
            self._text_len = 0
        elif depth == 2:
            if self._in_body:  # an empty Body: no operation
                self._found(None)
            self._header_seen = True
        elif depth == 1:
            self._fail("SOAP envelope has no Body")

    def _characters(self, text: str) -> None:
        if self._entry is None:
            return
        self._text_len += len(text)
        if self._text_len > self.bounds.max_header_text:
            self._fail(f"SOAP header {self._entry} longer than {self.bounds.max_header_text} characters")
        self._text.append(text)


# --- one request ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SoapCall:
    """A SOAP request as a router sees it."""

    version: SoapVersion
    #: The HTTP binding's action when not empty, else WS-Addressing's Action,
    #: else None.
    action: str | None
    operation: str | None
    envelope: Envelope

    @property
    def operation_local(self) -> str | None:
        """The operation's local name, without its namespace."""
        op = self.operation
        return op.rpartition("}")[2] if op is not None else None


def read_request(
    headers: Headers, body: bytes, complete: bool, bounds: SnifferLimits | None = None
) -> SoapCall | None:
    """The SOAP call in a request whose first body bytes are *body* (all of
    it when *complete*), or None when the request is not SOAP.

    *body* must hold at least ``bounds.max_prefix`` bytes unless *complete*.
    Raises :class:`SoapError` for a request to refuse: a malformed or hostile
    envelope, an envelope of another version than its Content-Type declares,
    or an HTTP action that contradicts the envelope's ``wsa:Action`` (a
    router and a host could otherwise act on different actions).
    """
    binding = http_binding(headers)
    if binding is None:
        return None
    sniffer = EnvelopeSniffer(bounds, binding.version)
    envelope = sniffer.feed(body)
    if envelope is None:
        if not complete:
            raise ValueError(f"{len(body)} body bytes are less than the SOAP prefix limit")
        envelope = sniffer.end()
    if envelope.version is not binding.version:
        raise SoapError(
            f"SOAP {envelope.version.value} envelope sent as {binding.version.media_type.decode()}",
            envelope.version,
            FaultCode.VERSION_MISMATCH,
        )
    wsa_action = envelope.wsa_action
    action = binding.action or wsa_action or None
    if binding.action and wsa_action and binding.action != wsa_action:
        raise SoapError(
            f"SOAP action {binding.action!r} differs from wsa:Action {wsa_action!r}", envelope.version
        )
    return SoapCall(envelope.version, action, envelope.operation, envelope)


# --- faults --------------------------------------------------------------------------

# Characters XML 1.0 cannot carry at all (section 2.2), replaced in reasons.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    text = _NOT_XML.sub("\ufffd", text)
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def build_fault(version: SoapVersion, code: FaultCode, reason: str, lang: str = "en") -> Fault:
    """A SOAP Fault answer, as each version's HTTP binding has it sent."""
    text = _xml_text(reason)
    if version is SoapVersion.SOAP11:
        status = 500  # SOAP 1.1 section 6.2: every fault is a 500
        body = (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            f'<soap:Envelope xmlns:soap="{SOAP11_NS}"><soap:Body><soap:Fault>'
            f"<faultcode>soap:{_SOAP11_CODES[code]}</faultcode>"
            f"<faultstring>{text}</faultstring>"
            "</soap:Fault></soap:Body></soap:Envelope>\n"
        )
    else:
        # SOAP 1.2 part 2, 7.5.2.2: Sender faults are 400, all others 500.
        status = 400 if code is FaultCode.SENDER else 500
        header = ""
        if code is FaultCode.VERSION_MISMATCH:
            # Part 1, 5.4.7: say which envelopes this node understands.
            header = (
                "<env:Header><env:Upgrade>"
                f'<env:SupportedEnvelope qname="v12:Envelope" xmlns:v12="{SOAP12_NS}"/>'
                f'<env:SupportedEnvelope qname="v11:Envelope" xmlns:v11="{SOAP11_NS}"/>'
                "</env:Upgrade></env:Header>"
            )
        body = (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            f'<env:Envelope xmlns:env="{SOAP12_NS}">{header}<env:Body><env:Fault>'
            f"<env:Code><env:Value>env:{code.value}</env:Value></env:Code>"
            f'<env:Reason><env:Text xml:lang="{_xml_text(lang)}">{text}</env:Text></env:Reason>'
            "</env:Fault></env:Body></env:Envelope>\n"
        )
    content_type = version.media_type + b"; charset=utf-8"
    return Fault(status, ((b"content-type", content_type),), body.encode("utf-8"))
