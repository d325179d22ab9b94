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
