# -*- test-case-name: tests.test_headers -*-
"""Header rewriting between client and host (RFC 9110 section 7.6).

Sans-I/O.  h11 hands us headers as ``(lower-case name, value)`` pairs; these
functions return new lists for the other side.  Framing headers are not
copied blindly: the unit re-frames every message, so ``Transfer-Encoding`` is
reduced to ``chunked`` (the only coding h11 accepts) and ``Content-Length`` is
passed on as the single value h11 validated.  That is what makes request
smuggling through the unit impossible: the host only ever sees the framing
the unit itself used to read the request.
"""

from __future__ import annotations

from typing import Sequence

Headers = Sequence[tuple[bytes, bytes]]

#: Hop-by-hop headers (RFC 9110 section 7.6.1, plus the legacy ones every proxy drops).
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }
)

_FORWARDED_NAMES = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via"})


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-case tokens of all ``Connection`` headers."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def forwarded_for(client_ip: str) -> bytes:
    """An RFC 7239 node for ``client_ip`` (IPv6 quoted and bracketed)."""
    if ":" in client_ip:
        return f'"[{client_ip}]"'.encode()
    return client_ip.encode()


def request_headers(
    headers: Headers,
    client_ip: str,
    proto: bytes,
    via: bytes,
    default_host: bytes,
    upgrade: bytes | None,
) -> list[tuple[bytes, bytes]]:
    """Headers of a request as sent to a host.

    ``upgrade`` is the Upgrade protocol of a request being tunnelled (then
    ``Connection: upgrade`` and ``Upgrade`` are kept), else None.
    """
    # Content-Length frames the body the unit forwards as it reads it: a
    # client listing it in Connection must not make the host see a request
    # without a body (h11 would refuse to send the body at all).
    drop = connection_tokens(headers) - {b"content-length"}
    out: list[tuple[bytes, bytes]] = []
    xff = xfp = fwd = viav = None
    chunked = have_host = False
    for name, value in headers:
        if name in HOP_BY_HOP or name in drop:
            if name == b"transfer-encoding":
                chunked = True
            continue
        if name in _FORWARDED_NAMES:
            # Merge repeated headers into one, appending our hop below.
            if name == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif name == b"forwarded":
                fwd = value if fwd is None else fwd + b", " + value
            elif name == b"via":
                viav = value if viav is None else viav + b", " + value
            continue  # x-forwarded-proto is replaced by ours
        if name == b"host":
            have_host = True
        out.append((name, value))
    if not have_host:
        # An HTTP/1.0 client may omit Host; the host gets HTTP/1.1, which needs one.
        out.append((b"host", default_host))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if upgrade is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade))
    ip = client_ip.encode()
    out.append((b"x-forwarded-for", ip if xff is None else xff + b", " + ip))
    out.append((b"x-forwarded-proto", proto))
    hop = b"for=" + forwarded_for(client_ip) + b";proto=" + proto
    out.append((b"forwarded", hop if fwd is None else fwd + b", " + hop))
    out.append((b"via", via if viav is None else viav + b", " + via))
    return out


def response_headers(headers: Headers, via: bytes, upgrade: bool) -> list[tuple[bytes, bytes]]:
    """Headers of a host's response as sent to the client."""
    drop = connection_tokens(headers)
    out: list[tuple[bytes, bytes]] = []
    viav = None
    for name, value in headers:
        if name in HOP_BY_HOP or name in drop:
            if name == b"transfer-encoding":
                out.append((name, b"chunked"))
            continue
        if name == b"via":
            viav = value if viav is None else viav + b", " + value
            continue
        out.append((name, value))
    if upgrade:
        out.extend(u for u in headers if u[0] == b"upgrade")
        out.append((b"connection", b"upgrade"))
    out.append((b"via", via if viav is None else viav + b", " + via))
    return out


def upgrade_protocol(headers: Headers) -> bytes | None:
    """The Upgrade protocol a request asks for, if it asks with ``Connection: upgrade``."""
    if b"upgrade" not in connection_tokens(headers):
        return None
    for name, value in headers:
        if name == b"upgrade":
            return value
    return None
