"""The agent's side of handoff, with a real ``twistd nlbagent`` on loopback
(nlbproxy.agent.handoff, nlbproxy.handoff.bridge, nlbproxy.handoff.adopt).

The test plays the unit: a client connects to a listener of the test, sends
requests, the test peeks them, dumps the connection and ships the blob to the
agent over the authenticated channel; the agent restores it and bridges it to
a real backend (``tests.backend``) or passes it to a Twisted application that
adopts it (``tests.handoff_app``).  Needs root (TCP_REPAIR).
"""

from __future__ import annotations

import hashlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nlbproxy.handoff import repair
from nlbproxy.handoff.state import encode
from nlbproxy.handoff.wire import ChannelError, Ended
from tests.backend import pattern_bytes
from tests.handoff_util import IO_TIMEOUT, UnitDriver, recv_exactly, require_root
from tests.realnet import Farm, free_port, start_agent, wait_until

SECRET = b"handoff test secret\n"
MiB = 1024 * 1024


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one content-length response."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise EOFError(f"closed after {head!r}")
        head += byte
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head, recv_exactly(sock, length)


class Rig:
    """A listener standing in for the unit's, an agent, and the channel to it."""

    def __init__(self, farm: Farm, tmp: Path, apps: str) -> None:
        (tmp / "secret.key").write_bytes(SECRET)
        self.handoff_port = free_port()
        config = (
            f'[agent]\nname = "h1"\nunits = ["127.0.0.1:{free_port(udp=True)}"]\n'
            f'api = "tcp:0:interface=127.0.0.1"\nsecret_file = "{tmp / "secret.key"}"\n'
            f'handoff = "tcp:{self.handoff_port}:interface=127.0.0.1"\n{apps}'
        )
        self.agent, _ = start_agent(farm, config, "h1")
        self.agent.wait_for(r"handoffs on ")
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.unit = UnitDriver(("127.0.0.1", self.handoff_port), SECRET)

    def connection(self, request: bytes) -> tuple[socket.socket, socket.socket]:
        """A client connection that sent ``request``, and the accepted side holding it unread."""
        client = socket.create_connection(self.listener.getsockname(), timeout=IO_TIMEOUT)
        server, _ = self.listener.accept()
        client.sendall(request)
        wait_until(lambda: len(server.recv(len(request) + 1, socket.MSG_PEEK)) == len(request), what="request")
        return client, server

    def hand_off(self, server: socket.socket, pool: str = "web", endpoint: str = "127.0.0.1:8080",
                 keep: bool = False) -> Any:
        """Dump ``server`` and ship it.  Unit and agent share one network stack
        here, so the dumped socket must be gone before the agent can restore
        the same 4-tuple; ``keep`` keeps it (for handoffs refused before the
        restore) and gives it back to the test."""
        state = repair.dump(server)
        if not keep:
            repair.close_silently(server)
        result = self.unit.handoff(pool, endpoint, encode(state))
        if result.ok:
            self.unit.commit(result.id)
        elif keep:
            repair.cancel(server)
        return result

    def close(self) -> None:
        self.unit.close()
        self.listener.close()


@pytest.fixture
def bridge_rig(farm: Farm, tmp_path: Path) -> Iterator[Rig]:
    require_root()
    _, backend = farm.backend("b1")
    rig = Rig(farm, tmp_path, f'\n[[app]]\nname = "web"\nendpoint = "127.0.0.1:8080"\ndeliver = "bridge"\n'
                              f'bridge_to = "{backend}"\n')
    try:
        yield rig
    finally:
        rig.close()


def test_bridge_pipelined_and_large_both_ways(bridge_rig: Rig) -> None:
    rig = bridge_rig
    pipelined = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n"
    client, server = rig.connection(pipelined)
    result = rig.hand_off(server)
    assert result.ok, result
    assert read_response(client)[1] == b"b1 GET /first\n"
    assert read_response(client)[1] == b"b1 GET /second\n"

    size = 8 * MiB
    client.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
    assert hashlib.sha256(read_response(client)[1]).digest() == hashlib.sha256(pattern_bytes(size)).digest()

    upload = pattern_bytes(6 * MiB)[::-1]
    client.sendall(b"POST /sha256 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(upload) + upload)
    assert read_response(client)[1].split() == [b"%d" % len(upload), hashlib.sha256(upload).hexdigest().encode()]

    # The end of the bridged connection is reported to the unit (route deletion).
    client.close()
    ended = wait_until(lambda: [m for m in rig.unit.receive() if isinstance(m, Ended)], what="ENDED")
    assert ended[0].vip == f"127.0.0.1:{rig.listener.getsockname()[1]}"


def test_refusals_leave_the_connection_with_the_unit(bridge_rig: Rig) -> None:
    rig = bridge_rig
    client, server = rig.connection(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    result = rig.hand_off(server, pool="other", keep=True)
    assert not result.ok and "no app other" in result.reason
    bad = rig.unit.handoff("web", "127.0.0.1:8080", b"NLBH\x09garbage")
    assert not bad.ok and "version" in bad.reason
    # The dump was cancelled: the unit still serves the client itself.
    assert server.recv(100).startswith(b"GET /x")
    server.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert client.recv(100).startswith(b"HTTP/1.1 204")


def test_wrong_secret_is_dropped(bridge_rig: Rig) -> None:
    # The unit sees that the agent's proof is wrong (the agent would drop its PROVE too).
    with pytest.raises(ChannelError, match="bad_proof"):
        UnitDriver(("127.0.0.1", bridge_rig.handoff_port), b"not the secret")


def test_bridge_to_a_dead_server_resets_the_client(farm: Farm, tmp_path: Path) -> None:
    require_root()
    rig = Rig(farm, tmp_path, f'\n[[app]]\nname = "web"\nendpoint = "127.0.0.1:8080"\ndeliver = "bridge"\n'
                              f'bridge_to = "127.0.0.1:{free_port()}"\n')
    try:
        client, server = rig.connection(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert rig.hand_off(server).ok
        with pytest.raises(ConnectionResetError):
            client.recv(100)
    finally:
        rig.close()


def test_proxy_protocol_header(farm: Farm, tmp_path: Path) -> None:
    require_root()
    server_side = socket.socket()
    server_side.bind(("127.0.0.1", 0))
    server_side.listen(1)
    rig = Rig(farm, tmp_path, f'\n[[app]]\nname = "web"\nendpoint = "127.0.0.1:8080"\ndeliver = "bridge"\n'
                              f'bridge_to = "127.0.0.1:{server_side.getsockname()[1]}"\nproxy_protocol = true\n')
    try:
        client, server = rig.connection(b"hello")
        assert rig.hand_off(server).ok
        local, _ = server_side.accept()
        local.settimeout(IO_TIMEOUT)
        cport = client.getsockname()[1]
        vport = rig.listener.getsockname()[1]
        expected = b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\nhello" % (cport, vport)
        assert recv_exactly(local, len(expected)) == expected
        local.close()
    finally:
        server_side.close()
        rig.close()


def test_adopt_by_a_twisted_application(farm: Farm, tmp_path: Path) -> None:
    require_root()
    path = tmp_path / "adopt.sock"
    app = farm.start([sys.executable, "-m", "tests.handoff_app", str(path)])
    app.wait_for("^ready")
    rig = Rig(farm, tmp_path, f'\n[[app]]\nname = "web"\nendpoint = "127.0.0.1:8080"\ndeliver = "adopt"\n'
                              f'adopt_path = "{path}"\n')
    try:
        client, server = rig.connection(b"GET /one HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n\r\n")
        assert rig.hand_off(server).ok
        assert read_response(client)[1] == b"adopted /one"
        assert read_response(client)[1] == b"adopted /two"
        client.sendall(b"GET /bytes/3000000 HTTP/1.1\r\n\r\n")
        assert read_response(client)[1] == pattern_bytes(3000000)
    finally:
        rig.close()


def test_unit_without_forwarder_proxies_handoff_listeners(farm: Farm, tmp_path: Path) -> None:
    """``twistd nlbproxy`` with ``handoff = true`` but no forwarder plumbed in
    falls back to proxying every connection (peeked bytes included)."""
    import urllib.request

    from tests.realnet import unit_config

    (tmp_path / "secret.key").write_bytes(SECRET)
    _, backend = farm.backend("b1")
    unit = farm.unit(unit_config([backend], extra_unit=f'secret_file = "{tmp_path / "secret.key"}"',
                                 extra_listener="handoff = true"))
    with urllib.request.urlopen(unit.url() + "x", timeout=IO_TIMEOUT) as answer:
        assert answer.read() == b"b1 GET /x\n"
    unit.process.wait_for("no forwarder")
