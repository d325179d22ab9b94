# -*- test-case-name: tests.test_handoff_delivery -*-
"""Bridge a restored client connection to an unmodified local server with splice(2).

The server is reached over TCP or, cheaper, its Unix socket: a download
through a loopback TCP hop costs the host about twice the CPU per GB of
the direct one, through a Unix socket about as much as direct
(``bench/handoff.py``).

Each direction is one thread doing blocking ``splice`` calls socket -> pipe ->
socket: the bytes never enter user space, and a blocked thread is the
back-pressure (a full pipe stops the read side; a full socket buffer stops
the write side).  Threads rather than the reactor because splice moves up to
a pipe's worth of bytes per call with no Python per byte, and a blocking
call per direction costs the reactor nothing (``bench/handoff.py`` compares
the bridge with a direct download).

A direction that reads end-of-file half-closes the other socket (FIN), so
HTTP clients that half-close still work; an error in either direction (a
reset) aborts both sockets, which ends the other thread.  When both threads
are done the sockets are closed and ``on_end`` is called in the reactor
thread.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["PIPE_SIZE", "Bridge"]

#: Pipe capacity per direction: the bytes one splice call can move.
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = 1031
_SPLICE_F_MOVE = 1


class Bridge:
    """Two sockets spliced together until both directions end."""

    def __init__(self, client: socket.socket, server: socket.socket, reactor: Any,
                 on_end: Callable[[Bridge], None]) -> None:
        self.client = client
        self.server = server
        self.reactor = reactor
        self.on_end = on_end
        self.moved = [0, 0]  # client -> server, server -> client
        self.error: BaseException | None = None
        self._left = 2
        self._lock = threading.Lock()
        for sock in (client, server):
            sock.setblocking(True)
            if sock.family != socket.AF_UNIX:
                # A relay forwards what it has at once: with Nagle a small write
                # (the PROXY header, a request) waits for the peer's delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        for index, (source, sink) in enumerate(((self.client, self.server), (self.server, self.client))):
            threading.Thread(target=self._pump, args=(index, source, sink), daemon=True,
                             name=f"handoff-bridge-{index}").start()

    def _pump(self, index: int, source: socket.socket, sink: socket.socket) -> None:
        read_end, write_end = os.pipe()
        try:
            try:
                fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size: the default pipe works too
            while True:
                n = os.splice(source.fileno(), write_end, PIPE_SIZE, flags=_SPLICE_F_MOVE)
                if n == 0:
                    sink.shutdown(socket.SHUT_WR)
                    break
                while n:
                    # No SPLICE_F_MORE: it corks the socket, and the last
                    # bytes of a response would wait for the 200 ms cork timer.
                    sent = os.splice(read_end, sink.fileno(), n, flags=_SPLICE_F_MOVE)
                    n -= sent
                    self.moved[index] += sent
        except OSError as exc:
            self.error = self.error or exc
            # Wake the other direction: it is blocked in a splice on one of these.
            for sock in (self.client, self.server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            os.close(read_end)
            os.close(write_end)
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self.client.close()
                self.server.close()
                self.reactor.callFromThread(self.on_end, self)
