# -*- test-case-name: tests.test_handoff_delivery -*-
"""PROXY protocol headers (HAProxy's spec, versions 1 and 2) for bridged connections.

The agent writes one before the first byte of a bridged connection so that
an unmodified server (nginx ``listen ... proxy_protocol``, HAProxy
``accept-proxy``) sees the client's address instead of the agent's.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["V2_SIGNATURE", "header", "v1", "v2"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21


def v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """``PROXY TCP4 client server cport sport\\r\\n`` (TCP6 for IPv6)."""
    family = "TCP6" if ipaddress.ip_address(client[0]).version == 6 else "TCP4"
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode()


def v2(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The binary header: signature, PROXY command, TCP over IPv4 or IPv6."""
    source = ipaddress.ip_address(client[0])
    dest = ipaddress.ip_address(server[0])
    if source.version != dest.version:
        raise ValueError("client and server addresses of different families")
    body = source.packed + dest.packed + struct.pack("!HH", client[1], server[1])
    kind = _V2_TCP6 if source.version == 6 else _V2_TCP4
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, kind, len(body)) + body


def header(version: int, client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The header of ``version`` (1 or 2); 0 means none."""
    if version == 0:
        return b""
    if version == 1:
        return v1(client, server)
    if version == 2:
        return v2(client, server)
    raise ValueError(f"PROXY protocol version {version}")
