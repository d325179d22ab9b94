# -*- test-case-name: tests.test_handoff_agent -*-
"""The agent's side of connection handoff: receive, restore, deliver.

Units connect to the agent's ``handoff`` endpoint (the channel of
:mod:`nlbproxy.handoff.wire`).  For each HANDOFF the agent finds the
``[[app]]`` the unit chose (pool and endpoint), decodes the blob, restores
the connection bound to the address the client connected to (the virtual
IP, which the operator puts on this host's ``lo``) and answers RESULT at
once: the restore is a few system calls, and every microsecond here is the
client's.  A blob that does not decode, an app that takes no handoffs, or a
restore the kernel refuses is answered with a failed RESULT (the unit resets
the client) and counted in :attr:`HandoffReceiver.stats`.

Delivery then runs in a thread of its own, so neither a slow application
nor a local server's connect holds the reactor:

- ``bridge``: connect to ``bridge_to`` (TCP, or a Unix socket), write the PROXY header if asked,
  and splice both ways (:class:`~nlbproxy.handoff.bridge.Bridge`).  When the
  bridge ends the agent sends ENDED to the unit, which deletes its route.
- ``adopt``: pass the socket to the application's Unix socket
  (:func:`~nlbproxy.handoff.adopt.send_socket`).  The agent does not see the
  end of an adopted connection; the unit's forwarder notices its FIN/RST.

A delivery that fails (no local server, no application) resets the client:
the connection already lives here and nothing else would ever answer it.

A HANDOFF from a unit on another segment carries the flow-id tunnel's
mapping (``[agent] tunnel_interface``): it is installed in the tunnel's end
(:class:`~nlbproxy.agent.tunnel.HostTunnel`) before the restore, and removed
when the handoff fails, or ``END_LINGER`` seconds after the bridge ends (the
client's last ACK of our FIN still comes through it).  (An adopted connection's end is
not seen here, so its mapping stays until the agent stops.)  An agent
without a tunnel refuses such a handoff.

When the dumped side had bytes it never sent (:attr:`ConnState.unsent`),
the agent holds the connection until the unit's COMMIT says the route is in
place: before that, the client's acknowledgements are held at the unit and
writing could block.  Connections held longer than :data:`COMMIT_TIMEOUT`
are reset.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from nlbproxy.agent.config import AgentConfig, AppConfig
from nlbproxy.agent.tunnel import HostTunnel
from nlbproxy.config import format_host_port
from nlbproxy.handoff import adopt, repair
from nlbproxy.handoff.bridge import Bridge
from nlbproxy.handoff.channel import ChannelProtocol
from nlbproxy.handoff.proxyproto import header
from nlbproxy.handoff.state import BlobError, ConnState, decode
from nlbproxy.handoff.tunnel import Mapping
from nlbproxy.handoff.wire import Commit, Ended, Handoff, Message, Result
from nlbproxy.health.messages import RowKey
from nlbproxy.limits import END_LINGER

__all__ = ["COMMIT_TIMEOUT", "MAX_BRIDGES", "HandoffReceiver", "reset"]

log = Logger()

#: Seconds a connection with never-sent bytes waits for the unit's COMMIT.
COMMIT_TIMEOUT = 5.0
#: Bridged connections at once (two threads each); more are reset.
MAX_BRIDGES = 2048
#: Seconds to connect to a bridge's local server.
BRIDGE_CONNECT_TIMEOUT = 2.0


def reset(sock: socket.socket) -> None:
    """Close with a RST (zero linger): the client learns at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def connect_server(target: tuple[str, int] | str) -> socket.socket:
    """A connection to the bridged server: TCP to (ip, port), or its Unix socket at a path."""
    if isinstance(target, tuple):
        server = socket.create_connection(target, timeout=BRIDGE_CONNECT_TIMEOUT)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the PROXY header leaves at once
        return server
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.settimeout(BRIDGE_CONNECT_TIMEOUT)
        server.connect(target)
    except OSError:
        server.close()
        raise
    return server


class HandoffReceiver:
    """Receives handoffs for the ``[[app]]`` tables of ``config``."""

    def __init__(self, config: AgentConfig, reactor: Any,
                 send_socket: Callable[[str, socket.socket], None] = adopt.send_socket,
                 tunnel: HostTunnel | None = None) -> None:
        self.config = config
        self.tunnel = tunnel
        self.reactor = reactor
        self.send_socket = send_socket
        self.apps: dict[RowKey, AppConfig] = {app.key: app for app in config.apps}
        self.stats: Counter[str] = Counter()
        self.bridges: set[Bridge] = set()
        # (channel, handoff id) -> the connection waiting for COMMIT
        self._held: dict[tuple[ChannelProtocol, int], tuple[socket.socket, ConnState, AppConfig, Any]] = {}
        # The tunnel mappings of live connections, by (client, VIP) address.
        self._mappings: dict[tuple[Any, Any], Mapping] = {}
        # Timers of ended connections' mappings (END_LINGER).
        self._lingering: set[Any] = set()

    @property
    def held(self) -> int:
        """Restored connections waiting for the unit's COMMIT."""
        return len(self._held)

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: ChannelProtocol(
            "agent", self.config.secret, self.reactor, self.stats, self._message, on_lost=self._lost))

    # -- messages --------------------------------------------------------------------
    def _message(self, channel: ChannelProtocol, message: Message) -> None:
        if isinstance(message, Handoff):
            self._handoff(channel, message)
        elif isinstance(message, Commit):
            held = self._held.pop((channel, message.id), None)
            if held is None:
                self.stats["unknown_commit"] += 1
                return
            sock, state, app, timer = held
            timer.cancel()
            self._deliver(channel, sock, state, app)

    def _handoff(self, channel: ChannelProtocol, message: Handoff) -> None:
        app = self.apps.get(RowKey(message.pool, message.endpoint))
        if app is None or app.deliver is None:
            self._refuse(channel, message.id, "no_app", f"no app {message.pool} at {message.endpoint} takes handoffs")
            return
        try:
            state = decode(message.blob)
        except BlobError as exc:
            self._refuse(channel, message.id, "bad_blob", str(exc))
            return
        mapping = message.tunnel
        if mapping is not None:
            if self.tunnel is None:
                self._refuse(channel, message.id, "no_tunnel", "a tunnelled handoff, and no agent.tunnel_interface")
                return
            try:
                # Before the restore: the client's next packet may come right after.
                self.tunnel.add(mapping)
            except Exception as exc:
                self._refuse(channel, message.id, "tunnel_failed", f"tunnel mapping not installed: {exc}")
                return
        try:
            sock = repair.restore(state)
        except repair.RepairError as exc:
            self._untunnel(mapping)
            self._refuse(channel, message.id, "restore_failed", str(exc))
            return
        if mapping is not None:
            self._mappings[state.peer, state.local] = mapping
        self.stats["restored"] += 1
        channel.send(Result(message.id, True))
        if state.unsent:
            timer = self.reactor.callLater(COMMIT_TIMEOUT, self._commit_timed_out, channel, message.id)
            self._held[channel, message.id] = (sock, state, app, timer)
        else:
            self._deliver(channel, sock, state, app)

    def _refuse(self, channel: ChannelProtocol, id_: int, counter: str, reason: str) -> None:
        self.stats[counter] += 1
        log.warn("handoff refused: {reason}", reason=reason)
        channel.send(Result(id_, False, reason))

    def _untunnel(self, mapping: Mapping | None) -> None:
        if mapping is not None and self.tunnel is not None:
            self.tunnel.remove(mapping)

    def _gone(self, state: ConnState) -> None:
        """The connection ``state`` failed here: its tunnel mapping goes."""
        self._untunnel(self._mappings.pop((state.peer, state.local), None))

    def _ended(self, state: ConnState) -> None:
        """The connection ``state`` ended: its tunnel mapping stays
        ``END_LINGER`` seconds more, for the client's last ACK of our FIN."""
        key = (state.peer, state.local)
        mapping = self._mappings.get(key)
        if mapping is None:
            return
        call = self.reactor.callLater(END_LINGER, self._expire, key, mapping)
        self._lingering.add(call)

    def _expire(self, key: tuple[Any, Any], mapping: Mapping) -> None:
        self._lingering = {c for c in self._lingering if c.active()}
        current = self._mappings.get(key)
        if current is mapping:
            del self._mappings[key]
        elif current is not None and (current.forwarder_ip, current.flow_id) == (mapping.forwarder_ip, mapping.flow_id):
            return  # a newer handoff of the same 4-tuple uses this tunnel flow now
        self._untunnel(mapping)

    def stop(self) -> None:
        """Drops the lingering mappings' timers (the tunnel's end goes with the agent)."""
        for call in self._lingering:
            if call.active():
                call.cancel()
        self._lingering.clear()

    def _commit_timed_out(self, channel: ChannelProtocol, id_: int) -> None:
        held = self._held.pop((channel, id_), None)
        if held is not None:
            self.stats["commit_timeout"] += 1
            reset(held[0])
            self._gone(held[1])

    def _lost(self, channel: ChannelProtocol) -> None:
        for key in [key for key in self._held if key[0] is channel]:
            sock, state, _, timer = self._held.pop(key)
            timer.cancel()
            self.stats["commit_lost"] += 1
            reset(sock)
            self._gone(state)

    # -- delivery ----------------------------------------------------------------------
    def _deliver(self, channel: ChannelProtocol, sock: socket.socket, state: ConnState, app: AppConfig) -> None:
        if app.deliver == "bridge" and len(self.bridges) >= MAX_BRIDGES:
            self.stats["too_many_bridges"] += 1
            reset(sock)
            self._gone(state)
            return
        threading.Thread(target=self._deliver_thread, args=(channel, sock, state, app), daemon=True,
                         name="handoff-deliver").start()

    def _deliver_thread(self, channel: ChannelProtocol, sock: socket.socket, state: ConnState,
                        app: AppConfig) -> None:
        try:
            repair.send_unsent(sock, state)
            if app.deliver == "adopt":
                assert app.adopt_path is not None
                self.send_socket(app.adopt_path, sock)
                sock.close()
                self.reactor.callFromThread(self._adopted, state)
                return
            assert app.bridge_to is not None
            server = connect_server(app.bridge_to)
        except OSError as exc:
            reset(sock)
            self.reactor.callFromThread(self._failed, app, exc, state)
            return
        try:
            server.sendall(header(app.proxy_protocol, state.peer, state.local))
        except OSError as exc:
            server.close()
            reset(sock)
            self.reactor.callFromThread(self._failed, app, exc, state)
            return
        bridge = Bridge(sock, server, self.reactor, lambda done: self._bridge_ended(channel, state, done))
        self.reactor.callFromThread(self._bridge_started, bridge)

    def _bridge_started(self, bridge: Bridge) -> None:
        self.bridges.add(bridge)
        self.stats["bridged"] += 1
        bridge.start()

    def _adopted(self, state: ConnState) -> None:
        # The application owns the connection now, and its end is not seen
        # here: the tunnel mapping stays (until the agent stops).
        self._mappings.pop((state.peer, state.local), None)
        self.stats["adopted"] += 1

    def _failed(self, app: AppConfig, error: OSError, state: ConnState) -> None:
        self._gone(state)
        self.stats["deliver_failed"] += 1
        log.warn("handoff to {app} ({mode}) failed, client reset: {error}", app=app.name, mode=app.deliver,
                 error=error)

    def _bridge_ended(self, channel: ChannelProtocol, state: ConnState, bridge: Bridge) -> None:
        self.bridges.discard(bridge)
        self.stats["bridge_ended"] += 1
        self._ended(state)
        if channel.connected_:
            channel.send(Ended(format_host_port(*state.peer), format_host_port(*state.local)))
