"""Listening sockets handed to another process: the environment's format,
checks of what was inherited, adoption and the ready pipe."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import sockets


class _Port:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._shouldShutdown = True
        self.stopped = False

    def fileno(self) -> int:
        return self._fd

    def stopListening(self) -> None:
        self.stopped = True


class _Reactor:
    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, Any]] = []

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> str:
        os.fstat(fd)  # still open while the reactor takes its copy
        self.adopted.append((fd, family, factory))
        return "port"


class FormatTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        fds = {"web": 5, "api": 6, sockets.ADMIN: 7}
        text = sockets.format_fds(fds)
        self.assertEqual(text, "web=5,api=6,@admin=7")
        self.assertEqual(sockets.parse_fds(text), fds)
        self.assertEqual(sockets.parse_fds(""), {})

    def test_malformed(self) -> None:
        for text, reason in (
            ("web", "expected NAME=FD (FD >= 3), got 'web'"),
            ("web=x", "expected NAME=FD (FD >= 3), got 'web=x'"),
            ("web=1", "expected NAME=FD (FD >= 3), got 'web=1'"),
            ("=5", "expected NAME=FD (FD >= 3), got '=5'"),
            ("web=5,web=6", "'web' is given twice"),
        ):
            with self.assertRaises(sockets.InheritedError) as caught:
                sockets.parse_fds(text)
            self.assertEqual(str(caught.exception), f"NLB_LISTEN_FDS: {reason}")
        with self.assertRaises(ValueError):
            sockets.format_fds({"a,b": 5})


class InheritedTests(SynchronousTestCase):
    def test_only_listening_stream_sockets(self) -> None:
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        self.addCleanup(listening.close)
        fd = listening.fileno()
        self.assertEqual(sockets.inherited_listeners({"NLB_LISTEN_FDS": f"web={fd}"}), {"web": fd})
        self.assertEqual(sockets.inherited_listeners({}), {})

        unbound = socket.socket()
        self.addCleanup(unbound.close)
        with self.assertRaises(sockets.InheritedError) as caught:
            sockets.inherited_listeners({"NLB_LISTEN_FDS": f"web={unbound.fileno()}"})
        self.assertIn("is not a listening stream socket", str(caught.exception))

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        with self.assertRaises(sockets.InheritedError) as caught:
            sockets.inherited_listeners({"NLB_LISTEN_FDS": f"web={r}"})
        self.assertIn(f"web={r} is not a socket", str(caught.exception))

    def test_adopt_closes_our_copy(self) -> None:
        listening = socket.socket(socket.AF_INET6)
        listening.bind(("::1", 0))
        listening.listen()
        self.addCleanup(listening.close)
        fd = os.dup(listening.fileno())
        reactor = _Reactor()
        self.assertEqual(sockets.adopt(reactor, fd, "factory"), "port")
        self.assertEqual(reactor.adopted, [(fd, socket.AF_INET6, "factory")])
        with self.assertRaises(OSError):
            os.fstat(fd)


class HandOverTests(SynchronousTestCase):
    def test_pass_listeners(self) -> None:
        env, child_fds = sockets.pass_listeners({"web": _Port(8), sockets.ADMIN: _Port(9)})
        self.assertEqual(env, {"NLB_LISTEN_FDS": "web=8,@admin=9"})
        self.assertEqual(child_fds, {8: 8, 9: 9})

    def test_release_does_not_shut_the_socket_down(self) -> None:
        port = _Port(8)
        sockets.release(port)
        self.assertEqual((port._shouldShutdown, port.stopped), (False, True))

    def test_tell_ready(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        sockets.tell_ready(w)
        self.assertEqual(os.read(r, 100), sockets.READY_LINE)
        self.assertEqual(os.read(r, 100), b"")  # closed after the line

    def test_take_inherited_empties_the_environment(self) -> None:
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        self.addCleanup(listening.close)
        environ = {"NLB_LISTEN_FDS": f"web={listening.fileno()}", "NLB_READY_FD": "9", "HOME": "/root"}
        self.assertEqual(sockets.take_inherited(environ), ({"web": listening.fileno()}, 9))
        self.assertEqual(environ, {"HOME": "/root"})
        self.assertEqual(sockets.take_inherited(environ), ({}, None))


class SystemdTests(SynchronousTestCase):
    def test_notify(self) -> None:
        directory = tempfile.mkdtemp(prefix="nlb-notify-")  # short: AF_UNIX paths are limited
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "notify")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        self.addCleanup(receiver.close)
        self.assertTrue(sockets.notify_systemd("MAINPID=123", {"NOTIFY_SOCKET": path}))
        self.assertEqual(receiver.recv(100), b"MAINPID=123")
        self.assertFalse(sockets.notify_systemd("MAINPID=123", {}))
        self.assertFalse(sockets.notify_systemd("MAINPID=123", {"NOTIFY_SOCKET": path + ".gone"}))
