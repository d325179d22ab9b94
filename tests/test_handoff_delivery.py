"""PROXY protocol headers of bridged connections (nlbproxy.handoff.proxyproto), IPv4 and IPv6.

The expected bytes follow HAProxy's proxy-protocol.txt (sections 2.1 and 2.2);
tests/test_handoff_e2e.py has nginx parse both versions for both families.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.proxyproto import V2_SIGNATURE, header, v1, v2


class V1Tests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(v1(("10.0.0.2", 40000), ("10.0.0.100", 80)),
                         b"PROXY TCP4 10.0.0.2 10.0.0.100 40000 80\r\n")

    def test_ipv6(self) -> None:
        self.assertEqual(v1(("fd4e:4c42::2", 40000), ("fd4e:4c42::100", 80)),
                         b"PROXY TCP6 fd4e:4c42::2 fd4e:4c42::100 40000 80\r\n")


class V2Tests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(v2(("10.0.0.2", 40000), ("10.0.0.100", 80)),
                         V2_SIGNATURE + bytes.fromhex("2111000c" "0a000002" "0a000064" "9c40" "0050"))

    def test_ipv6(self) -> None:
        self.assertEqual(v2(("fd4e:4c42::2", 40000), ("fd4e:4c42::100", 80)),
                         V2_SIGNATURE + bytes.fromhex("21210024"
                                                      "fd4e4c42000000000000000000000002"
                                                      "fd4e4c42000000000000000000000100"
                                                      "9c40" "0050"))

    def test_mixed_families_refused(self) -> None:
        self.assertRaises(ValueError, v2, ("10.0.0.2", 40000), ("fd4e:4c42::100", 80))


class HeaderTests(SynchronousTestCase):
    def test_versions(self) -> None:
        client, server = ("fd4e:4c42::2", 1), ("fd4e:4c42::100", 80)
        self.assertEqual(header(0, client, server), b"")
        self.assertEqual(header(1, client, server), v1(client, server))
        self.assertEqual(header(2, client, server), v2(client, server))
        self.assertRaises(ValueError, header, 3, client, server)
