# -*- test-case-name: tests.test_handoff_state -*-
"""A live TCP connection's state, and its versioned binary blob (a wire format).

:class:`ConnState` is what :func:`nlbproxy.handoff.repair.dump` reads out of
a socket in repair mode and what :func:`~nlbproxy.handoff.repair.restore`
writes into a new one on the host.  It is plain data: this module neither
touches sockets nor knows the repair constants.

Sequence numbers are the kernel's ``TCP_QUEUE_SEQ`` values as read at dump
time: ``recv_seq`` is ``rcv_nxt`` (one past the last byte received, so the
receive queue holds ``recv_seq - len(recv_queue)`` .. ``recv_seq``) and
``send_seq`` is ``write_seq`` (one past the last byte the application wrote,
so the send queue starts at ``send_seq - len(send_queue)``).  The restore
needs the *start* of each queue; :attr:`ConnState.recv_queue_start` and
:attr:`ConnState.send_queue_start` compute it (mod 2**32) in one place.

``send_queue`` holds everything written but not acknowledged; its last
``unsent`` bytes were never put on the wire.  The restore puts the sent part
back in the repair queue (the host retransmits it if needed) and writes the
unsent part normally once the route is committed.

Blob
----
::

    magic "NLBH" | version u8 | family u8 | flags u8 | reserved u8 (0)
    local ip (4 or 16) | local port u16 | peer ip | peer port u16
    recv_seq u32 | send_seq u32 | mss u16 | snd_wscale u8 | rcv_wscale u8
    timestamp u32 | snd_wl1 u32 | snd_wnd u32 | max_window u32 | rcv_wnd u32 | rcv_wup u32
    sndbuf u32 | rcvbuf u32 | unsent u32
    recv_queue length u32 | bytes | send_queue length u32 | bytes

Big-endian.  ``flags`` are the negotiated options (:data:`OPT_TIMESTAMPS`,
:data:`OPT_SACK`, :data:`OPT_WSCALE`).  Decoding is strict: a wrong magic,
an unknown version, a reserved bit set, a length that does not match the
blob exactly, or a value the kernel would refuse raises :class:`BlobError`
(the agent answers the unit with it and resets nothing: the unit still holds
the client's connection state and resets the client itself).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAGIC",
    "MAX_QUEUE",
    "OPT_SACK",
    "OPT_TIMESTAMPS",
    "OPT_WSCALE",
    "VERSION",
    "BlobError",
    "ConnState",
    "Window",
    "decode",
    "encode",
    "wire_address",
]

MAGIC = b"NLBH"
VERSION = 1

#: Negotiated TCP options, the ``tcpi_options`` bits of ``TCP_INFO``.
OPT_TIMESTAMPS = 1
OPT_SACK = 2
OPT_WSCALE = 4
_OPTIONS = OPT_TIMESTAMPS | OPT_SACK | OPT_WSCALE

#: Bytes of one queue a blob may carry.  A socket's buffer is at most a few
#: MiB (``net.core.wmem_max``); anything larger is not a dump of ours.
MAX_QUEUE = 64 * 1024 * 1024
#: RFC 7323: a window scale above 14 is invalid.
MAX_WSCALE = 14

_HEAD = struct.Struct("!4sBBBB")
_PORT = struct.Struct("!H")
_BODY = struct.Struct("!IIHBBIIIIIIIII")
_LEN = struct.Struct("!I")
_FAMILY = {4: 4, 6: 16}


def wire_address(address: tuple[Any, ...]) -> tuple[str, int]:
    """A socket address as ``(ip, port)`` the way the client's packets carry it.

    A dual-stack listener (``tcp6`` on ``::``) reports its IPv4 clients with
    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.2``), yet their packets are
    IPv4: the fence, the forwarder's route and the restored socket must
    name the IPv4 address, or none of them matches the client's packets.
    """
    host, port = str(address[0]), int(address[1])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, port  # a scoped address (fe80::1%eth0) is left as it is
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), port
    return host, port


class BlobError(ValueError):
    """A handoff blob that is not a valid encoding of a :class:`ConnState`."""


@dataclass(frozen=True, slots=True)
class Window:
    """``struct tcp_repair_window``: the peer's and our advertised windows."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int


@dataclass(frozen=True, slots=True)
class ConnState:
    """One established TCP connection as seen from the side being moved."""

    local: tuple[str, int]
    peer: tuple[str, int]
    recv_seq: int
    send_seq: int
    mss: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: Window
    sndbuf: int
    rcvbuf: int
    recv_queue: bytes = b""
    send_queue: bytes = b""
    unsent: int = 0
    family: int = field(init=False)

    def __post_init__(self) -> None:
        local = ipaddress.ip_address(self.local[0])
        peer = ipaddress.ip_address(self.peer[0])
        if local.version != peer.version:
            raise ValueError(f"local {local} and peer {peer} are of different families")
        object.__setattr__(self, "family", local.version)
        if not 0 <= self.unsent <= len(self.send_queue):
            raise ValueError(f"unsent {self.unsent} outside the send queue of {len(self.send_queue)} bytes")

    @property
    def recv_queue_start(self) -> int:
        """``TCP_QUEUE_SEQ`` of the receive queue for the restore: its first byte."""
        return (self.recv_seq - len(self.recv_queue)) % 2**32

    @property
    def send_queue_start(self) -> int:
        """``TCP_QUEUE_SEQ`` of the send queue for the restore: its first byte."""
        return (self.send_seq - len(self.send_queue)) % 2**32

    @property
    def sent(self) -> bytes:
        """The part of the send queue already on the wire but not acknowledged."""
        return self.send_queue[: len(self.send_queue) - self.unsent]

    @property
    def not_sent(self) -> bytes:
        """The part of the send queue never put on the wire."""
        return self.send_queue[len(self.send_queue) - self.unsent :]


def encode(state: ConnState) -> bytes:
    """The blob of ``state``; values out of their field's range raise ValueError."""
    _check(state)
    try:
        parts = [
            _HEAD.pack(MAGIC, VERSION, state.family, state.options, 0),
            ipaddress.ip_address(state.local[0]).packed,
            _PORT.pack(state.local[1]),
            ipaddress.ip_address(state.peer[0]).packed,
            _PORT.pack(state.peer[1]),
            _BODY.pack(
                state.recv_seq, state.send_seq, state.mss, state.snd_wscale, state.rcv_wscale,
                state.timestamp, state.window.snd_wl1, state.window.snd_wnd, state.window.max_window,
                state.window.rcv_wnd, state.window.rcv_wup, state.sndbuf, state.rcvbuf, state.unsent,
            ),
            _LEN.pack(len(state.recv_queue)),
            state.recv_queue,
            _LEN.pack(len(state.send_queue)),
            state.send_queue,
        ]
    except struct.error as exc:
        raise ValueError(f"connection state does not fit the blob: {exc}") from None
    return b"".join(parts)


def decode(blob: bytes) -> ConnState:
    """The :class:`ConnState` of ``blob``; anything malformed raises :class:`BlobError`."""
    view = memoryview(blob)
    reader = _Reader(view)
    magic, version, family, options, reserved = reader.unpack(_HEAD)
    if magic != MAGIC:
        raise BlobError(f"not a handoff blob (magic {bytes(magic)!r})")
    if version != VERSION:
        raise BlobError(f"unsupported handoff blob version {version} (this side speaks {VERSION})")
    if family not in _FAMILY:
        raise BlobError(f"unknown address family {family}")
    if options & ~_OPTIONS or reserved:
        raise BlobError(f"unknown option bits {options:#x} / reserved byte {reserved:#x}")
    size = _FAMILY[family]
    local = (str(ipaddress.ip_address(reader.take(size))), reader.unpack(_PORT)[0])
    peer = (str(ipaddress.ip_address(reader.take(size))), reader.unpack(_PORT)[0])
    (recv_seq, send_seq, mss, snd_wscale, rcv_wscale, timestamp, wl1, snd_wnd, max_window, rcv_wnd,
     rcv_wup, sndbuf, rcvbuf, unsent) = reader.unpack(_BODY)
    recv_queue = reader.chunk()
    send_queue = reader.chunk()
    if reader.left:
        raise BlobError(f"{reader.left} bytes after the end of the handoff blob")
    try:
        state = ConnState(
            local=local, peer=peer, recv_seq=recv_seq, send_seq=send_seq, mss=mss, options=options,
            snd_wscale=snd_wscale, rcv_wscale=rcv_wscale, timestamp=timestamp,
            window=Window(wl1, snd_wnd, max_window, rcv_wnd, rcv_wup), sndbuf=sndbuf, rcvbuf=rcvbuf,
            recv_queue=recv_queue, send_queue=send_queue, unsent=unsent,
        )
        _check(state)
    except ValueError as exc:
        raise BlobError(str(exc)) from None
    return state


def _check(state: ConnState) -> None:
    """What the kernel would refuse, refused here with a reason."""
    if not state.local[1] or not state.peer[1]:
        raise ValueError("port 0 in a connection's address")
    if not 1 <= state.mss <= 65535:
        raise ValueError(f"mss {state.mss} out of range")
    if state.options & OPT_WSCALE and max(state.snd_wscale, state.rcv_wscale) > MAX_WSCALE:
        raise ValueError(f"window scale above {MAX_WSCALE}")
    if not state.options & OPT_WSCALE and (state.snd_wscale or state.rcv_wscale):
        raise ValueError("window scales without the window scale option")
    if not state.options & OPT_TIMESTAMPS and state.timestamp:
        raise ValueError("a timestamp without the timestamp option")
    for name, queue in (("receive", state.recv_queue), ("send", state.send_queue)):
        if len(queue) > MAX_QUEUE:
            raise ValueError(f"{name} queue of {len(queue)} bytes exceeds {MAX_QUEUE}")


class _Reader:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.view) - self.at

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise BlobError(f"handoff blob truncated: {n} bytes wanted at offset {self.at}, {self.left} left")
        data = bytes(self.view[self.at : self.at + n])
        self.at += n
        return data

    def unpack(self, shape: struct.Struct) -> tuple[Any, ...]:
        return shape.unpack(self.take(shape.size))

    def chunk(self) -> bytes:
        (length,) = self.unpack(_LEN)
        if length > MAX_QUEUE:
            raise BlobError(f"queue of {length} bytes exceeds {MAX_QUEUE}")
        return self.take(length)
