# -*- test-case-name: tests.test_headers -*-
"""Header rewriting between client and host (RFC 9110 section 7.6).

Sans-I/O.  Headers travel as h11 stores them, ``(raw name, lower-case
name, value)`` triples: the functions here read the triples of one side and
return the triples for the other, which :func:`wrap` turns into an h11
``Headers`` without a second validation pass (the values came out of h11's
parser or from us), and the names keep the casing the peer sent.  Framing headers are not
copied blindly: the unit re-frames every message, so ``Transfer-Encoding`` is
reduced to ``chunked`` (the only coding h11 accepts) and ``Content-Length`` is
passed on as the single value h11 validated.  That is what makes request
smuggling through the unit impossible: the host only ever sees the framing
the unit itself used to read the request.

Each function walks the headers once: this runs twice per request, and
h11's ``Headers`` is a Sequence whose iteration costs a call per item, so
:func:`fields` reads its backing list directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from h11._headers import Headers as _H11Headers

from nlbproxy.cookies import parse_set_cookie

Field = tuple[bytes, bytes, bytes]
Fields = Iterable[Field]

#: Hop-by-hop headers (RFC 9110 section 7.6.1, plus the legacy ones every proxy drops).
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)

#: Headers a ``Connection`` header may not remove: the unit needs them to
#: frame and address the message it sends on.
PROTECTED = frozenset({b"content-length", b"host"})


def fields(headers: Any) -> list[Field]:
    """The ``(raw name, name, value)`` triples behind an h11 ``Headers``."""
    return headers._full_items


def wrap(items: list[Field]) -> Any:
    """h11 ``Headers`` over ``items``, taken as already valid."""
    return _H11Headers(items)


def pairs(items: Fields) -> list[tuple[bytes, bytes]]:
    """``(lower-case name, value)`` pairs, as the routing rules read them."""
    return [(name, value) for _raw, name, value in items]


def connection_tokens(headers: Fields) -> frozenset[bytes]:
    """Lower-case tokens of all ``Connection`` headers."""
    tokens: set[bytes] = set()
    for _raw, name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def _without(out: list[Field], tokens: set[bytes]) -> list[Field]:
    """``out`` less the headers a ``Connection`` header named (hop-by-hop by name)."""
    named = tokens - HOP_BY_HOP - PROTECTED - {b"close"}
    if not named:
        return out
    return [item for item in out if item[1] not in named]


def forwarded_for(client_ip: str) -> bytes:
    """An RFC 7239 node for ``client_ip`` (IPv6 quoted and bracketed)."""
    if ":" in client_ip:
        return f'"[{client_ip}]"'.encode()
    return client_ip.encode()


def request_headers(
    headers: Fields,
    client_ip: str,
    proto: bytes,
    via: bytes,
    default_host: bytes,
    upgrade: bytes | None,
) -> list[Field]:
    """Headers of a request as sent to a host.

    ``upgrade`` is the Upgrade protocol of a request being tunnelled (then
    ``Connection: upgrade`` and ``Upgrade`` are kept), else None.
    """
    out: list[Field] = []
    tokens: set[bytes] = set()
    xff = fwd = viav = None
    chunked = have_host = False
    for item in headers:
        _raw, name, value = item
        if name in HOP_BY_HOP:
            if name == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
            elif name == b"transfer-encoding":
                chunked = True
            continue
        if name == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
        elif name == b"forwarded":
            fwd = value if fwd is None else fwd + b", " + value
        elif name == b"via":
            viav = value if viav is None else viav + b", " + value
        elif name == b"x-forwarded-proto":
            pass  # replaced by ours
        elif name == b"host":
            # RFC 9110 section 7.2: Host goes first.
            have_host = True
            out.insert(0, item)
        else:
            out.append(item)
    if tokens:
        out = _without(out, tokens)
    if not have_host:
        # An HTTP/1.0 client may omit Host; the host gets HTTP/1.1, which needs one.
        out.insert(0, (b"host", b"host", default_host))
    if chunked:
        out.append((b"transfer-encoding", b"transfer-encoding", b"chunked"))
    if upgrade is not None:
        out.append((b"connection", b"connection", b"upgrade"))
        out.append((b"upgrade", b"upgrade", upgrade))
    ip = client_ip.encode()
    out.append((b"x-forwarded-for", b"x-forwarded-for", ip if xff is None else xff + b", " + ip))
    out.append((b"x-forwarded-proto", b"x-forwarded-proto", proto))
    hop = b"for=" + forwarded_for(client_ip) + b";proto=" + proto
    out.append((b"forwarded", b"forwarded", hop if fwd is None else fwd + b", " + hop))
    out.append((b"via", b"via", via if viav is None else viav + b", " + via))
    return out


def response_headers(headers: Fields, via: bytes, upgrade: bool) -> tuple[list[Field], bool]:
    """Headers of a host's response as sent to the client, and whether the
    host framed it ambiguously.

    A response with both ``Content-Length`` and ``Transfer-Encoding`` is read
    by its Transfer-Encoding (h11 does); RFC 9112 section 6.3 has an
    intermediary drop the Content-Length before passing it on, and a host
    that sends such a response is not trusted with another request on that
    connection (the caller closes it).
    """
    out: list[Field] = []
    tokens: set[bytes] = set()
    upgrades: list[Field] = []
    viav = None
    chunked = length = False
    for item in headers:
        raw, name, value = item
        if name in HOP_BY_HOP:
            if name == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
            elif name == b"transfer-encoding":
                chunked = True
                out.append((raw, name, b"chunked"))
            elif name == b"upgrade":
                upgrades.append(item)
            continue
        if name == b"via":
            viav = value if viav is None else viav + b", " + value
            continue
        if name == b"content-length":
            length = True
        out.append(item)
    ambiguous = chunked and length
    if ambiguous:
        out = [item for item in out if item[1] != b"content-length"]
    if tokens:
        out = _without(out, tokens)
    if upgrade:
        out.extend(upgrades)
        out.append((b"connection", b"connection", b"upgrade"))
    out.append((b"via", b"via", via if viav is None else viav + b", " + via))
    return out, ambiguous


def upgrade_protocol(headers: Fields) -> bytes | None:
    """The Upgrade protocol a request asks for, if it asks with ``Connection: upgrade``."""
    if b"upgrade" not in connection_tokens(headers):
        return None
    for _raw, name, value in headers:
        if name == b"upgrade":
            return value
    return None


def set_cookie(headers: Fields, name: bytes) -> tuple[bytes, bool] | None:
    """The value a response sets for cookie ``name``, and whether it deletes
    it (see :func:`nlbproxy.cookies.parse_set_cookie`); the last
    ``Set-Cookie`` for the name wins."""
    wanted = name.decode("latin-1")
    found: tuple[bytes, bool] | None = None
    for _raw, field, value in headers:
        if field == b"set-cookie":
            cookie_name, cookie, cleared = parse_set_cookie(value)
            if cookie_name == wanted:
                found = (cookie.encode("latin-1"), cleared)
    return found
