# -*- test-case-name: tests.test_handoff_repair -*-
"""Dump a live TCP connection out of a socket and restore it into another (TCP_REPAIR).

This is the only module that knows the repair socket options; the order of
the calls below is the kernel's, not a matter of taste (see
docs/handoff-recipe.md, and CRIU's ``soccr/soccr.c``, which does the same).

:func:`dump` leaves the socket in repair mode: the caller closes it with
:func:`close_silently` (no FIN, no RST), or gives it back to its
application with :func:`cancel` when the handoff is abandoned.
:func:`restore` returns an established socket out of repair mode whose
never-sent bytes (:attr:`ConnState.not_sent`) are not written yet:
:func:`send_unsent` writes them once the unit has committed the route, as
the client's acknowledgements are held at the unit until then.

Both need CAP_NET_ADMIN in the socket's network namespace.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct

from nlbproxy.handoff.state import OPT_SACK, OPT_TIMESTAMPS, OPT_WSCALE, ConnState, Window, wire_address

__all__ = [
    "RepairError",
    "cancel",
    "close_silently",
    "dump",
    "restore",
    "send_unsent",
]

# -- <linux/tcp.h>, <linux/sockios.h>: Python's socket module lacks these -------
SOL_TCP = 6
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0  # leaving repair mode sends a window probe
TCP_REPAIR_OFF_NO_WP = -1

TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

TCP_ESTABLISHED = 1

SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B

_U32 = struct.Struct("I")  # socket options are in host byte order
_INT = struct.Struct("i")
_REPAIR_OPT = struct.Struct("II")
_REPAIR_WINDOW = struct.Struct("IIIII")
#: TCP_INFO bytes read: state, ca_state, retransmits, probes, backoff, options, wscales.
_TCP_INFO_HEAD = 7

#: First chunk size when writing a queue back; halved on ENOMEM.
RESTORE_CHUNK = 1024 * 1024


class RepairError(OSError):
    """A connection that cannot be dumped or restored (the reason says why)."""


def dump(sock: socket.socket) -> ConnState:
    """Put ``sock`` in repair mode and read its connection out.

    The socket stays in repair mode (frozen: it sends nothing and drops what
    arrives).  On failure it is taken out of repair mode again and a
    :class:`RepairError` is raised, so the caller can go on using it.
    """
    try:
        # The kernel refuses repair mode to a listening or closed socket (EPERM)
        # as to a process without CAP_NET_ADMIN.
        _set(sock, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError as exc:
        raise RepairError(exc.errno, f"cannot put the socket in repair mode: {exc.strerror or exc}") from exc
    try:
        return _read(sock)
    except OSError as exc:
        cancel(sock)
        if isinstance(exc, RepairError):
            raise
        raise RepairError(exc.errno, f"cannot dump the connection: {exc.strerror or exc}") from exc


def _read(sock: socket.socket) -> ConnState:
    info = sock.getsockopt(SOL_TCP, TCP_INFO, 104)
    if info[0] != TCP_ESTABLISHED:
        raise RepairError(errno.ENOTCONN, f"connection is not established (TCP state {info[0]})")
    options = info[5] & (OPT_TIMESTAMPS | OPT_SACK | OPT_WSCALE)
    snd_wscale, rcv_wscale = (info[6] & 0xF, info[6] >> 4) if options & OPT_WSCALE else (0, 0)
    inq = _ioctl(sock, SIOCINQ)
    outq = _ioctl(sock, SIOCOUTQ)
    unsent = _ioctl(sock, SIOCOUTQNSD)
    mss = sock.getsockopt(SOL_TCP, socket.TCP_MAXSEG)
    timestamp = _get_u32(sock, TCP_TIMESTAMP) if options & OPT_TIMESTAMPS else 0
    window = Window(*_REPAIR_WINDOW.unpack(sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size)))
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    recv_seq, recv_queue = _read_queue(sock, TCP_RECV_QUEUE, inq)
    send_seq, send_queue = _read_queue(sock, TCP_SEND_QUEUE, outq)
    _set(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    # An IPv4 client of a dual-stack socket is restored into an IPv4 socket.
    local = wire_address(sock.getsockname())
    peer = wire_address(sock.getpeername())
    return ConnState(
        local=local, peer=peer, recv_seq=recv_seq, send_seq=send_seq, mss=mss, options=options,
        snd_wscale=snd_wscale, rcv_wscale=rcv_wscale, timestamp=timestamp, window=window,
        sndbuf=sndbuf, rcvbuf=rcvbuf, recv_queue=recv_queue, send_queue=send_queue, unsent=unsent,
    )


def _read_queue(sock: socket.socket, queue: int, length: int) -> tuple[int, bytes]:
    _set(sock, TCP_REPAIR_QUEUE, queue)
    seq = _get_u32(sock, TCP_QUEUE_SEQ)
    data = b""
    if length:
        # One byte more than the ioctl said proves the queue did not grow.
        data = sock.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != length:
        which = "receive" if queue == TCP_RECV_QUEUE else "send"
        raise RepairError(errno.EIO, f"{which} queue held {len(data)} bytes, the kernel said {length}")
    return seq, data


def close_silently(sock: socket.socket) -> None:
    """Close a socket in repair mode: the connection vanishes with no FIN or RST."""
    sock.close()


def cancel(sock: socket.socket) -> None:
    """Take a dumped socket out of repair mode: the connection goes on here."""
    try:
        _set(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    except OSError:
        pass
    _set(sock, TCP_REPAIR, TCP_REPAIR_OFF)


def restore(state: ConnState, bind_ip: str | None = None, *, reuse_address: bool = True) -> socket.socket:
    """A new socket holding the connection of ``state``, bound to ``bind_ip``
    (the virtual IP; default: the dumped local address) and the dumped port.

    The socket is blocking, established and out of repair mode; the
    never-sent part of the send queue is left to :func:`send_unsent`.
    """
    family = socket.AF_INET6 if state.family == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _restore(sock, state, bind_ip or state.local[0], reuse_address)
    except OSError as exc:
        sock.close()  # still in repair mode when it failed: nothing reaches the client
        if isinstance(exc, RepairError):
            raise
        raise RepairError(exc.errno, f"cannot restore the connection: {exc.strerror or exc}") from exc
    return sock


def _restore(sock: socket.socket, state: ConnState, bind_ip: str, reuse_address: bool) -> None:
    if reuse_address:
        # Before repair mode: repair forces address reuse, and setting
        # SO_REUSEADDR later overwrites that, so the bind beside the
        # application's own listener on the same address would fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _set(sock, TCP_REPAIR, TCP_REPAIR_ON)
    # Raise (never lower: that would lock the buffers' autotuning for the rest
    # of the connection) the buffers so that the queues fit; a send buffer
    # smaller than the queue makes the restore's writes block forever.
    for option, queue in ((socket.SO_SNDBUF, state.send_queue), (socket.SO_RCVBUF, state.recv_queue)):
        if 2 * len(queue) > sock.getsockopt(socket.SOL_SOCKET, option):
            sock.setsockopt(socket.SOL_SOCKET, option, 2 * len(queue))
    sock.bind((bind_ip, state.local[1]))
    # The queues' sequence numbers are those of their first bytes: writing
    # the queues back below advances them to the dumped rcv_nxt / write_seq.
    _set(sock, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    _set_u32(sock, TCP_QUEUE_SEQ, state.recv_queue_start)
    _set(sock, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    _set_u32(sock, TCP_QUEUE_SEQ, state.send_queue_start)
    _set(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    sock.connect(state.peer)  # in repair mode: no SYN, straight to ESTABLISHED
    sock.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, _options(state))
    if state.options & OPT_TIMESTAMPS:
        # Without the dumped clock the client's PAWS check drops every segment.
        _set_u32(sock, TCP_TIMESTAMP, state.timestamp)
    _write_queue(sock, TCP_RECV_QUEUE, state.recv_queue)
    _write_queue(sock, TCP_SEND_QUEUE, state.sent)
    _set(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    w = state.window
    sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.pack(
        w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup))
    _set(sock, TCP_REPAIR, TCP_REPAIR_OFF)
    # Again, now out of repair mode: else the connection's TIME_WAIT would
    # keep the application from binding its listener again.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def _options(state: ConnState) -> bytes:
    """TCP_REPAIR_OPTIONS: only what the client negotiated, the MSS always."""
    options = [_REPAIR_OPT.pack(TCPOPT_MSS, state.mss)]
    if state.options & OPT_WSCALE:
        options.append(_REPAIR_OPT.pack(TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16))
    if state.options & OPT_SACK:
        options.append(_REPAIR_OPT.pack(TCPOPT_SACK_PERM, 0))
    if state.options & OPT_TIMESTAMPS:
        options.append(_REPAIR_OPT.pack(TCPOPT_TIMESTAMP, 0))
    return b"".join(options)


def _write_queue(sock: socket.socket, queue: int, data: bytes) -> None:
    if not data:
        return
    _set(sock, TCP_REPAIR_QUEUE, queue)
    view = memoryview(data)
    chunk = RESTORE_CHUNK
    while view:
        try:
            sent = sock.send(view[:chunk])
        except OSError as exc:
            # The kernel wants each write in one skb it can allocate.
            if exc.errno != errno.ENOMEM or chunk == 1:
                raise
            chunk //= 2
            continue
        view = view[sent:]


def send_unsent(sock: socket.socket, state: ConnState) -> None:
    """Write the bytes the dumped side had queued but never sent (blocking)."""
    if state.unsent:
        sock.sendall(state.not_sent)


# -- helpers ----------------------------------------------------------------------


def _set(sock: socket.socket, option: int, value: int) -> None:
    sock.setsockopt(SOL_TCP, option, _INT.pack(value))


def _set_u32(sock: socket.socket, option: int, value: int) -> None:
    sock.setsockopt(SOL_TCP, option, _U32.pack(value))


def _get_u32(sock: socket.socket, option: int) -> int:
    (value,) = _U32.unpack(sock.getsockopt(SOL_TCP, option, _U32.size))
    return int(value)


def _ioctl(sock: socket.socket, request: int) -> int:
    (value,) = _INT.unpack(fcntl.ioctl(sock.fileno(), request, _INT.pack(0)))
    return int(value)
