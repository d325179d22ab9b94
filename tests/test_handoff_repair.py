"""TCP_REPAIR dump and restore of a live connection on loopback (nlbproxy.handoff.repair).

The server side of a connection is dumped while it holds unread request bytes
and unsent response bytes, closed silently, restored in a new socket bound
beside the still-listening server socket, and the conversation goes on with
large transfers both ways, checked by digest.  Needs root (TCP_REPAIR).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import pytest

from nlbproxy.handoff import repair
from nlbproxy.handoff.state import OPT_TIMESTAMPS, OPT_WSCALE, decode, encode
from tests.handoff_util import IO_TIMEOUT, Background, pattern, recv_digest, recv_exactly, require_root

MiB = 1024 * 1024


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """(listener, client, accepted server side) on loopback of the param's family."""
    require_root()
    family, host = request.param
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(8)
    client = socket.socket(family, socket.SOCK_STREAM)
    # A small client receive buffer fills fast, so the server is left with
    # bytes it could not even send.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.settimeout(IO_TIMEOUT)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    server.settimeout(IO_TIMEOUT)
    try:
        yield listener, client, server
    finally:
        for sock in (listener, client, server):
            sock.close()


FAMILIES = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]


def peek_exactly(sock: socket.socket, size: int) -> bytes:
    while True:
        data = sock.recv(size, socket.MSG_PEEK)
        if len(data) >= size or not data:
            return data


def fill_send_queue(sock: socket.socket, data: bytes) -> int:
    """Write ``data`` without blocking until the kernel takes no more; bytes written."""
    sock.setblocking(False)
    written = 0
    try:
        while written < len(data):
            written += sock.send(data[written : written + 256 * 1024])
    except BlockingIOError:
        pass
    sock.settimeout(IO_TIMEOUT)
    return written


@pytest.mark.parametrize("pair", FAMILIES, indirect=True, ids=["v4", "v6"])
def test_connection_moves_with_both_queues(pair: tuple[socket.socket, socket.socket, socket.socket]) -> None:
    listener, client, server = pair
    request = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
    client.sendall(request)
    assert peek_exactly(server, len(request)) == request

    response = pattern(16 * MiB, seed=1)
    written = fill_send_queue(server, response)
    assert 0 < written < len(response)

    state = repair.dump(server)
    assert state.local == server.getsockname()[:2] and state.peer == client.getsockname()[:2]
    assert state.recv_queue == request
    assert state.send_queue == response[written - len(state.send_queue) : written]
    assert state.unsent > 0, "the client's full window should have held bytes back"
    assert state.options & OPT_TIMESTAMPS and state.options & OPT_WSCALE
    repair.close_silently(server)

    # The blob is what travels; restore from the decoded copy.
    moved = repair.restore(decode(encode(state)))
    moved.settimeout(IO_TIMEOUT)
    try:
        assert moved.getsockname()[:2] == listener.getsockname()[:2]
        # The client reads everything the old socket had written, in order,
        # while the new socket finishes the unsent part and the rest.
        reader = Background(recv_digest, client, len(response))
        repair.send_unsent(moved, state)
        moved.sendall(response[written:])
        assert reader.result() == hashlib.sha256(response).hexdigest()

        # The request the old socket only peeked is still there to be read.
        assert recv_exactly(moved, len(request)) == request

        # The conversation goes on, both ways at once.
        upload, download = pattern(24 * MiB, seed=2), pattern(24 * MiB, seed=3)
        receiving = Background(recv_digest, moved, len(upload))
        downloading = Background(recv_digest, client, len(download))
        sending = Background(client.sendall, upload)
        moved.sendall(download)
        sending.result()
        assert receiving.result() == hashlib.sha256(upload).hexdigest()
        assert downloading.result() == hashlib.sha256(download).hexdigest()

        # And ends cleanly: FIN both ways.
        moved.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        client.shutdown(socket.SHUT_WR)
        assert moved.recv(1) == b""
    finally:
        moved.close()


@pytest.mark.parametrize("pair", FAMILIES[:1], indirect=True, ids=["v4"])
def test_idle_connection_moves(pair: tuple[socket.socket, socket.socket, socket.socket]) -> None:
    _, client, server = pair
    state = repair.dump(server)
    assert (state.recv_queue, state.send_queue, state.unsent) == (b"", b"", 0)
    repair.close_silently(server)
    moved = repair.restore(state)
    moved.settimeout(IO_TIMEOUT)
    try:
        client.sendall(b"ping")
        assert recv_exactly(moved, 4) == b"ping"
        moved.sendall(b"pong")
        assert recv_exactly(client, 4) == b"pong"
    finally:
        moved.close()


@pytest.mark.parametrize("pair", FAMILIES[:1], indirect=True, ids=["v4"])
def test_cancelled_dump_leaves_connection_usable(pair: tuple[socket.socket, socket.socket, socket.socket]) -> None:
    _, client, server = pair
    client.sendall(b"abc")
    assert peek_exactly(server, 3) == b"abc"
    repair.dump(server)
    repair.cancel(server)
    assert recv_exactly(server, 3) == b"abc"
    server.sendall(b"xyz")
    assert recv_exactly(client, 3) == b"xyz"


def test_ipv4_client_of_a_dual_stack_socket_moves_as_ipv4() -> None:
    """A ``tcp6`` listener on ``::`` sees IPv4 clients as ::ffff:a.b.c.d: the
    dump names the IPv4 addresses and the restore makes an IPv4 socket."""
    require_root()
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    restored = None
    try:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::ffff:127.0.0.1", 0))  # dual-stack, and loopback only
        listener.listen(8)
        client.settimeout(IO_TIMEOUT)
        client.connect(("127.0.0.1", listener.getsockname()[1]))
        server, _ = listener.accept()
        assert server.getpeername()[0] == "::ffff:127.0.0.1"
        client.sendall(b"unread request")
        assert peek_exactly(server, 14) == b"unread request"
        state = decode(encode(repair.dump(server)))
        assert (state.family, state.local, state.peer) == (
            4, ("127.0.0.1", listener.getsockname()[1]), client.getsockname())
        repair.close_silently(server)
        restored = repair.restore(state)
        restored.settimeout(IO_TIMEOUT)
        assert restored.family == socket.AF_INET
        assert recv_exactly(restored, 14) == b"unread request"
        restored.sendall(b"answer")
        assert recv_exactly(client, 6) == b"answer"
    finally:
        for sock in (listener, client, restored):
            if sock is not None:
                sock.close()


def test_dump_refuses_a_socket_that_is_not_established() -> None:
    require_root()
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with pytest.raises(repair.RepairError, match="repair mode"):
            repair.dump(listener)
        # Out of repair mode again: it still accepts.
        client = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
        listener.accept()[0].close()
        client.close()
    finally:
        listener.close()


@pytest.mark.parametrize("pair", FAMILIES[:1], indirect=True, ids=["v4"])
def test_restore_to_an_address_not_here_fails_cleanly(pair: tuple[socket.socket, socket.socket, socket.socket]) -> None:
    _, client, server = pair
    state = repair.dump(server)
    with pytest.raises(repair.RepairError, match="cannot restore"):
        repair.restore(state, bind_ip="192.0.2.1")
    repair.cancel(server)
    server.sendall(b"still here")
    assert recv_exactly(client, 10) == b"still here"
