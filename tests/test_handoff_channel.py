# -*- test-case-name: tests.test_handoff_channel -*-
"""The channel protocol writes each message at once, not on the reactor's next turn."""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.channel import ChannelProtocol
from nlbproxy.handoff.wire import Channel, Handoff, Message, Result

SECRET = b"s" * 32


class SocketTransport(FileDescriptor):
    """Twisted's buffered writer on one end of a real socket pair; the
    memory reactor never calls ``doWrite``, as a reactor turn would."""

    def __init__(self, sock: socket.socket, reactor: Any) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.connected = 1

    def writeSomeData(self, data: bytes) -> int:
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getPeer(self) -> str:
        return "unit"


class ImmediateWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.agent_end, self.unit_end = socket.socketpair()
        self.unit_end.setblocking(False)
        self.addCleanup(self.agent_end.close)
        self.addCleanup(self.unit_end.close)
        self.reactor = MemoryReactorClock()
        self.transport = SocketTransport(self.agent_end, self.reactor)
        self.received: list[Message] = []
        self.agent = ChannelProtocol("agent", SECRET, self.reactor, Counter(),
                                     lambda channel, message: self.received.append(message))
        self.agent.makeConnection(self.transport)
        self.unit = Channel("unit", SECRET)
        self.agent.dataReceived(self.unit.hello())
        self.transport.doWrite()  # the handshake's replies go on the reactor's turn, as before
        reply, _ = self.unit.receive(self.unit_end.recv(4096))
        self.agent.dataReceived(reply)
        self.assertTrue(self.agent.channel.ready)

    def test_message_is_in_the_socket_when_send_returns(self) -> None:
        self.agent.dataReceived(self.unit.send(Handoff(7, "web", "10.0.1.3:80", b"blob")))
        self.assertEqual(self.received, [Handoff(7, "web", "10.0.1.3:80", b"blob")])
        self.agent.send(Result(7, True))
        _, messages = self.unit.receive(self.unit_end.recv(4096))
        self.assertEqual(messages, [Result(7, True)])
        self.assertFalse(self.transport.dataBuffer or self.transport._tempDataBuffer)

    def test_a_closing_connection_is_left_to_the_reactor(self) -> None:
        self.transport.disconnecting = True
        self.agent.send(Result(7, True))
        self.assertRaises(BlockingIOError, self.unit_end.recv, 4096)
