"""The fence: nftables commands (pure) and, in a namespace, both back ends dropping a flow."""

from __future__ import annotations

import re
import time

import pytest
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.fence import (
    Fence, FenceError, element_commands, setup_commands, teardown_commands, tunnel_commands,
)
from nlbproxy.handoff.routes import FlowKey
from tests.netns import Node, Topology, require_netns, require_tools, wait_for

KEY = FlowKey("10.0.0.5", 40000, "10.0.0.100", 80)
KEY6 = FlowKey("2001:db8::5", 1, "2001:db8::100", 443)


class RecordingBackend:
    name = "recording"

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.fail = False

    def run(self, commands: str) -> None:
        if self.fail:
            raise FenceError("Error: Could not process rule: No such file or directory")
        self.commands.append(commands)


class CommandTests(SynchronousTestCase):
    def test_setup_is_one_transaction_that_replaces(self) -> None:
        text = setup_commands("t1")
        self.assertTrue(text.startswith("add table inet t1\ndelete table inet t1\n"))
        self.assertIn("priority -300", text)
        self.assertIn("ip saddr . tcp sport . ip daddr . tcp dport @flows4 counter drop", text)
        self.assertEqual(teardown_commands("t1"), "add table inet t1\ndelete table inet t1\n")

    def test_elements_grouped_by_family(self) -> None:
        self.assertEqual(element_commands("add", "t", [KEY, KEY6, FlowKey("10.0.0.6", 2, "10.0.0.100", 80)]),
                         "add element inet t flows4 { 10.0.0.5 . 40000 . 10.0.0.100 . 80, "
                         "10.0.0.6 . 2 . 10.0.0.100 . 80 }\n"
                         "add element inet t flows6 { 2001:db8::5 . 1 . 2001:db8::100 . 443 }\n")

    def test_tunnel_elements(self) -> None:
        self.assertEqual(tunnel_commands("add", "t", [("10.0.0.2", 0x00020003), ("2001:db8::2", 0x00010001)]),
                         "add element inet t tunnel4 { 10.0.0.2 . 2 . 3 }\n"
                         "add element inet t tunnel6 { 2001:db8::2 . 1 . 1 }\n")
        self.assertRaises(ValueError, tunnel_commands, "add", "t", [("10.0.0.2", 1 << 32)])
        self.assertRaises(ValueError, tunnel_commands, "add", "t", [("nope", 1)])
        self.assertIn("ip saddr . tcp sport . tcp dport @tunnel4 counter drop", setup_commands("t"))

    def test_names_checked(self) -> None:
        for bad in ["", "1t", "t;flush ruleset", "a" * 32]:
            self.assertRaises(ValueError, setup_commands, bad)
        self.assertRaises(ValueError, element_commands, "flush", "t", [KEY])

    def test_fence_tracks_keys(self) -> None:
        backend = RecordingBackend()
        fence = Fence(backend, "t")
        fence.setup()
        fence.add(KEY, KEY)
        fence.add(KEY)  # already fenced: no command
        self.assertEqual(len(backend.commands), 2)
        self.assertIn(KEY, fence)
        fence.remove(KEY6)  # never fenced: no command
        fence.remove(KEY)
        self.assertEqual(len(backend.commands), 3)
        self.assertEqual((len(fence), fence.stats["added"], fence.stats["removed"]), (0, 1, 1))

    def test_failure_fences_nothing(self) -> None:
        backend = RecordingBackend()
        fence = Fence(backend, "t")
        backend.fail = True
        self.assertRaises(FenceError, fence.add, KEY)
        self.assertNotIn(KEY, fence)
        self.assertEqual(fence.stats["add_failed"], 1)


SERVER = """
import socket
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.0.0.100", 80)); srv.listen(4)

def pending():
    import select
    return select.select([conn], [], [], 0)[0] != []
"""
CLIENT = """
import socket
c = socket.create_connection(("10.0.0.100", 80), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
"""


def dropped(node: Node) -> int:
    listing = node.run(["nft", "list", "table", "inet", "nlbtest"]).stdout
    match = re.search(r"@flows4 counter packets (\d+)", listing)
    assert match is not None, listing
    return int(match.group(1))


@pytest.mark.parametrize("backend", ["libnftables", "nft"])
def test_fence_drops_flow_in_namespace(backend: str) -> None:
    require_netns()
    require_tools("nft")
    with Topology() as topo:
        unit = topo.add_node("unit", "10.0.0.100")
        client = topo.add_node("client", "10.0.0.5")
        srv = unit.worker()
        srv.exec(SERVER)
        srv.exec("from nlbproxy.handoff.fence import Fence, LibNftables, NftCommand\n"
                 "from nlbproxy.handoff.routes import FlowKey\n"
                 f"fence = Fence({'LibNftables' if backend == 'libnftables' else 'NftCommand'}(), 'nlbtest')\n"
                 "fence.setup()\n")
        cli = client.worker()
        cli.exec(CLIENT)
        srv.exec("conn, peer = srv.accept(); conn.settimeout(10)")
        port = cli.eval("c.getsockname()[1]")
        cli.exec("c.sendall(b'a')")
        assert srv.eval("conn.recv(10).decode()") == "a"

        srv.exec(f"fence.add(FlowKey('10.0.0.5', {port}, '10.0.0.100', 80))")
        cli.exec("c.sendall(b'b')")
        # The drop rule counts what it drops: wait until the segment (or its
        # retransmission) hit it, then check the socket got nothing.
        wait_for(lambda: dropped(unit) > 0, what="a drop")
        assert srv.eval("pending()") is False

        started = time.monotonic()
        srv.exec(f"fence.remove(FlowKey('10.0.0.5', {port}, '10.0.0.100', 80))")
        # The client's TCP retransmits; the segment now reaches the socket.
        assert srv.eval("conn.recv(10).decode()") == "b"
        assert time.monotonic() - started < 10
        srv.exec("fence.teardown()")
        assert "nlbtest" not in unit.run(["nft", "list", "tables"]).stdout
