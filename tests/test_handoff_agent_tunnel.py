"""The host's end of the flow-id tunnel in the agent (nlbproxy.agent.tunnel) and
the handoff receiver's use of the mapping a tunnelled HANDOFF carries
(nlbproxy.agent.handoff), with fake nftables, packet port, channel and restore.
The packet path itself runs for real in tests/test_handoff_forwarder_netns.py."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.agent.config import parse_agent_config
from nlbproxy.agent.handoff import HandoffReceiver
from nlbproxy.agent.tunnel import HostTunnel, TunnelStartError, accept_restored
from nlbproxy.handoff import repair
from nlbproxy.handoff.routes import FlowKey
from nlbproxy.handoff.state import encode
from nlbproxy.handoff.tunnel import Mapping
from nlbproxy.handoff.wire import Handoff, Result
from nlbproxy.limits import END_LINGER
from tests.test_handoff_state import state
from tests.test_handoff_unitforwarder import RecordingBackend

STATE = state(local=("10.0.0.100", 80), peer=("10.0.0.5", 40000))
MAPPING = Mapping(0x00020003, "10.0.0.2", FlowKey("10.0.0.5", 40000, "10.0.0.100", 80))


class FakePort:
    def __init__(self, reactor: Any, decapsulator: Any, ifname: str, tun_name: str) -> None:
        self.args = (decapsulator, ifname, tun_name)
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


class FakeChannel:
    connected_ = True

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


def started_tunnel(test: SynchronousTestCase, backend: RecordingBackend) -> tuple[HostTunnel, list[FakePort]]:
    ports: list[FakePort] = []
    relaxed: list[str] = []

    def port_factory(*args: Any) -> FakePort:
        ports.append(FakePort(*args))
        return ports[-1]

    def relax(name: str) -> list[str]:
        relaxed.append(name)
        return []

    tunnel = HostTunnel(MemoryReactorClock(), "eth0", backend_factory=lambda: backend, port_factory=port_factory,
                        relax=relax)
    tunnel.start()
    test.addCleanup(tunnel.stop)
    test.assertEqual(relaxed, ["nlbtun0"])
    return tunnel, ports


class HostTunnelTests(SynchronousTestCase):
    def test_start_add_remove_stop(self) -> None:
        backend = RecordingBackend()
        tunnel, [port] = started_tunnel(self, backend)
        self.assertIn("add table inet nlbagent_tunnel", backend.commands[0])
        self.assertEqual(port.args, (tunnel.decapsulator, "eth0", "nlbtun0"))
        self.assertTrue(port.running)
        tunnel.add(MAPPING)
        self.assertEqual(backend.commands[-1], "add element inet nlbagent_tunnel tunnel4 { 10.0.0.2 . 2 . 3 }\n")
        self.assertEqual(len(tunnel), 1)
        tunnel.remove(MAPPING)
        self.assertEqual(backend.commands[-1], "delete element inet nlbagent_tunnel tunnel4 { 10.0.0.2 . 2 . 3 }\n")
        self.assertEqual(len(tunnel), 0)
        tunnel.stop()
        self.assertIn("delete table inet nlbagent_tunnel", backend.commands[-1])
        self.assertFalse(port.running)

    def test_refused_mapping_is_not_installed(self) -> None:
        backend = RecordingBackend()
        tunnel, _ = started_tunnel(self, backend)
        backend.fail_on = "add element"
        self.assertRaises(OSError, tunnel.add, MAPPING)
        self.assertEqual(len(tunnel), 0)

    def test_start_failure_is_one_line_and_cleans_up(self) -> None:
        backend = RecordingBackend()

        def no_device(*args: Any) -> FakePort:
            raise OSError(19, "No such device")

        tunnel = HostTunnel(MemoryReactorClock(), "nosuch0", backend_factory=lambda: backend, port_factory=no_device,
                            relax=lambda name: [])
        error = self.assertRaises(TunnelStartError, tunnel.start)
        self.assertIn("nosuch0", str(error))
        self.assertIn("delete table inet nlbagent_tunnel", backend.commands[-1])
        self.assertRaises(RuntimeError, tunnel.add, MAPPING)


class AcceptRestoredTests(SynchronousTestCase):
    """The TUN device's sysctls, in a copy of /proc/sys/net's layout."""

    def sysctls(self, all_rp_filter: str = "0", ipv6: bool = True) -> Path:
        root = Path(tempfile.mkdtemp(prefix="nlb-sysctl-"))
        self.addCleanup(shutil.rmtree, root, True)
        for scope, value in (("all", all_rp_filter), ("nlbtun0", "1")):
            (root / "ipv4" / "conf" / scope).mkdir(parents=True)
            (root / "ipv4" / "conf" / scope / "rp_filter").write_text(value + "\n")
        if ipv6:
            (root / "ipv6" / "conf" / "nlbtun0").mkdir(parents=True)
            # A device born while default.disable_ipv6 is set drops every IPv6 packet.
            (root / "ipv6" / "conf" / "nlbtun0" / "disable_ipv6").write_text("1\n")
        return root

    def test_rp_filter_off_and_ipv6_on(self) -> None:
        root = self.sysctls()
        self.assertEqual(accept_restored("nlbtun0", str(root)), [])
        self.assertEqual((root / "ipv4/conf/nlbtun0/rp_filter").read_text(), "0\n")
        self.assertEqual((root / "ipv6/conf/nlbtun0/disable_ipv6").read_text(), "0\n")

    def test_a_kernel_without_ipv6(self) -> None:
        root = self.sysctls(ipv6=False)
        self.assertEqual(accept_restored("nlbtun0", str(root)), [])
        self.assertFalse((root / "ipv6").exists())

    def test_strict_mode_for_all_devices_is_reported(self) -> None:
        # The kernel applies the larger of all's and the device's value.
        [warning] = accept_restored("nlbtun0", str(self.sysctls(all_rp_filter="1")))
        self.assertIn("net.ipv4.conf.all.rp_filter is 1 (strict)", warning)
        self.assertEqual(accept_restored("nlbtun0", str(self.sysctls(all_rp_filter="2"))), [])

    def test_warnings_do_not_stop_the_tunnel(self) -> None:
        backend = RecordingBackend()
        tunnel = HostTunnel(MemoryReactorClock(), "eth0", backend_factory=lambda: backend, port_factory=FakePort,
                            relax=lambda name: ["strict"])
        tunnel.start()
        self.addCleanup(tunnel.stop)
        tunnel.add(MAPPING)
        self.assertEqual(len(tunnel), 1)


class ReceiverTests(SynchronousTestCase):
    """A tunnelled HANDOFF: the mapping is installed before the restore and
    removed whenever the connection ends here."""

    def setUp(self) -> None:
        config = parse_agent_config({
            "agent": {"name": "h1", "units": ["10.0.0.2:9901"], "secret_file": __file__,
                      "handoff": "tcp:9904", "tunnel_interface": "eth0"},
            "app": [{"name": "web", "endpoint": "10.1.0.3:80", "deliver": "bridge", "bridge_to": "127.0.0.1:8080"}],
        })
        self.reactor = MemoryReactorClock()
        self.backend = RecordingBackend()
        self.tunnel, _ = started_tunnel(self, self.backend)
        self.receiver = HandoffReceiver(config, self.reactor, tunnel=self.tunnel)
        self.channel = FakeChannel()
        self.restored: list[int] = []
        self.patch(repair, "restore", self.restore)

    def restore(self, s: Any) -> socket.socket:
        # What the kernel sees at restore time: is the mapping already in place?
        self.restored.append(len(self.tunnel))
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        self.addCleanup(a.close)
        return a

    def hand_off(self, mapping: Mapping | None = MAPPING) -> Any:
        self.receiver._message(self.channel, Handoff(1, "web", "10.1.0.3:80", encode(STATE), mapping))  # type: ignore[arg-type]
        return self.channel.sent[-1]

    def test_mapping_installed_before_the_restore_and_removed_at_commit_timeout(self) -> None:
        self.assertEqual(self.hand_off(), Result(1, True))
        self.assertEqual((self.restored, len(self.tunnel)), ([1], 1))
        self.reactor.advance(10)  # STATE has unsent bytes: held for a COMMIT that never comes
        self.assertEqual((self.receiver.stats["commit_timeout"], len(self.tunnel)), (1, 0))

    def test_removed_when_the_channel_is_lost(self) -> None:
        self.hand_off()
        self.receiver._lost(self.channel)  # type: ignore[arg-type]
        self.assertEqual(len(self.tunnel), 0)

    def test_removed_when_the_bridge_ends(self) -> None:
        self.hand_off()
        self.receiver._bridge_ended(self.channel, STATE, object())  # type: ignore[arg-type]
        self.assertEqual(self.channel.sent[-1].client, "10.0.0.5:40000")
        # The mapping lingers for the client's last ACK of the host's FIN.
        self.assertEqual(len(self.tunnel), 1)
        self.reactor.advance(END_LINGER)
        self.assertEqual(len(self.tunnel), 0)

    def test_a_lingering_mapping_leaves_a_newer_one_of_the_same_flow(self) -> None:
        self.hand_off()
        self.receiver._bridge_ended(self.channel, STATE, object())  # type: ignore[arg-type]
        self.reactor.advance(END_LINGER / 2)
        # The client reuses its port at once, and the same unit hands it off again (a new message).
        self.hand_off(Mapping.decode(MAPPING.encode()))
        self.reactor.advance(END_LINGER / 2)
        self.assertEqual((len(self.receiver._mappings), len(self.tunnel)), (1, 1))

    def test_stop_cancels_the_lingering(self) -> None:
        self.hand_off()
        self.receiver._bridge_ended(self.channel, STATE, object())  # type: ignore[arg-type]
        self.receiver.stop()
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.func == self.receiver._expire], [])

    def test_removed_when_the_restore_fails(self) -> None:
        def refuse(s: Any) -> socket.socket:
            raise repair.RepairError("restore refused")

        self.patch(repair, "restore", refuse)
        self.assertEqual(self.hand_off(), Result(1, False, "restore refused"))
        self.assertEqual((self.receiver.stats["restore_failed"], len(self.tunnel)), (1, 0))

    def test_refused_mapping_refuses_the_handoff(self) -> None:
        self.backend.fail_on = "add element"
        result = self.hand_off()
        self.assertFalse(result.ok)
        self.assertIn("tunnel mapping not installed", result.reason)
        self.assertEqual((self.receiver.stats["tunnel_failed"], self.restored), (1, []))

    def test_agent_without_a_tunnel_refuses(self) -> None:
        self.receiver.tunnel = None
        self.assertEqual(self.hand_off(), Result(1, False, "a tunnelled handoff, and no agent.tunnel_interface"))
        self.assertEqual((self.receiver.stats["no_tunnel"], self.restored), (1, []))

    def test_untunnelled_handoff_leaves_the_tunnel_alone(self) -> None:
        self.assertEqual(self.hand_off(None), Result(1, True))
        self.assertEqual((self.restored, len(self.tunnel)), ([0], 0))
        commands = len(self.backend.commands)
        self.reactor.advance(10)
        self.assertEqual(len(self.backend.commands), commands)
