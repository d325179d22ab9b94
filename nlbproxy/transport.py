# -*- test-case-name: tests.test_transport -*-
"""Write-through for Twisted's TCP transports.

``FileDescriptor.write`` never sends at once: it queues the bytes, registers
the socket for writability and sends on the next reactor turn, then
unregisters it.  For a relay that writes a request head and a response per
exchange that is four ``epoll_ctl`` calls and two extra reactor turns per
request.  asyncio's transports instead try ``send()`` at once when nothing is
queued, and queue only what the kernel did not take; :func:`write` does the
same on Twisted.  Ordering is kept because it only sends directly while
Twisted's own buffer is empty, and back-pressure is unchanged because
whatever the kernel refuses goes through ``transport.write`` and counts
against the transport's buffer as before.

Anything that is not a plain, connected TCP transport (TLS, test transports,
a transport being closed) simply gets ``transport.write``.
"""

from __future__ import annotations

from typing import Any


def write(transport: Any, data: bytes) -> None:
    """Writes ``data`` to ``transport``, sending at once when nothing is queued."""
    if (
        getattr(transport, "TLS", True)
        or transport._tempDataBuffer
        or len(transport.dataBuffer) > transport.offset
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let Twisted meet the error on its own write and report it through
        # connectionLost as usual.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


class Output:
    """Writes to one transport, batched while corked.

    An exchange often produces several writes in one go -- a response head,
    its body and h11's end-of-message bytes out of one backend read -- and
    with write-through each would be its own ``send()``.  The relay corks
    the output while it handles one read and uncorks at the end, so each
    read from one side costs at most one ``send()`` to the other.
    """

    __slots__ = ("_pending", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is not None:
            self._pending.append(data)
        else:
            write(self.transport, data)

    def cork(self) -> bool:
        """Start batching; True if this call corked (and so must uncork)."""
        if self._pending is not None:
            return False
        self._pending = []
        return True

    def uncork(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            write(self.transport, pending[0] if len(pending) == 1 else b"".join(pending))
