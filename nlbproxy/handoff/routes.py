# -*- test-case-name: tests.test_handoff_routes -*-
"""The forwarding table of handed-off connections, sans-I/O.

After a handoff the client still sends its packets to the virtual IP, which the
balancing unit owns; the unit's forwarder looks each one up here and sends it on
to the host that now holds the connection.  A route maps a flow key (client ip
and port, VIP and port) to where its packets go: the host's MAC address and the
unit's interface towards it, or a tunnel flow id (:mod:`.tunnel`).

Life of a route
---------------
``fence`` -> FENCED: the unit is dumping the socket and shipping it; the
    client's packets are *buffered* (bounded per flow and in total) because the
    host has no socket yet.
``commit`` -> COMMITTED: the host restored the connection; the buffered
    packets are handed back to be flushed in order, later ones are forwarded.
FIN or RST seen from the client -> CLOSING: packets are still forwarded (the
    client's last ACKs, a retransmitted FIN) until the host's agent reports the
    end (``delete``) or, as a backstop, a timeout passes.
``delete`` (the agent reported the end, the handoff failed, the host is gone),
    or a timeout -> DELETED: the entry leaves the table; :meth:`RouteTable.tick`
    and :meth:`RouteTable.delete` return what left so that the caller can drop
    the fence and the durable copy.

The table reads time only from the injected clock; ``tick`` must be called
periodically (the forwarder does it once a second) to run the timeouts.

Durable form
------------
:func:`to_atom` turns a route into a DAM atom's (key, data, kind) so that every
unit learns it and another unit can re-plumb the route after this one fails;
:func:`from_atom` reads it back.  The out interface is the unit's own business
and stays out of the atom: the unit that re-plumbs picks its own.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nlbproxy import limits


class SecondsClock(Protocol):
    def seconds(self) -> float: ...


class RouteError(ValueError):
    """A call that the route's state does not allow (our caller's bug or a race
    it must handle: fencing a flow twice, committing an unknown flow)."""


class TableFull(Exception):
    """The table holds :data:`limits.MAX_ROUTES` routes; the handoff must not start."""


class WireError(ValueError):
    """A durable route (DAM atom) that is not valid."""


# --- flow keys ------------------------------------------------------------------

_PORT = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A client's TCP connection to a VIP, as the client sees it.

    ``packed`` is the form the forwarder builds from a frame without parsing
    addresses: source address, destination address, source port, destination
    port, exactly as they follow each other in the IP and TCP headers.
    """

    client_ip: str
    client_port: int
    vip: str
    vport: int
    #: Computed once: the route table looks keys up by it on every call.
    packed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        client = ipaddress.ip_address(self.client_ip)
        vip = ipaddress.ip_address(self.vip)
        if client.version != vip.version:
            raise ValueError(f"client {self.client_ip} and VIP {self.vip} are of different families")
        for port in (self.client_port, self.vport):
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"port {port!r} out of range")
        # Canonical text, so that keys made from text and from packed bytes compare equal.
        object.__setattr__(self, "client_ip", str(client))
        object.__setattr__(self, "vip", str(vip))
        object.__setattr__(self, "packed", client.packed + vip.packed + _PORT.pack(self.client_port, self.vport))

    @classmethod
    def from_packed(cls, packed: bytes) -> FlowKey:
        if len(packed) == 12:
            size = 4
        elif len(packed) == 36:
            size = 16
        else:
            raise ValueError(f"a packed flow key is 12 or 36 bytes, not {len(packed)}")
        sport, dport = _PORT.unpack_from(packed, 2 * size)
        return cls(str(ipaddress.ip_address(packed[:size])), sport,
                   str(ipaddress.ip_address(packed[size:2 * size])), dport)

    def text(self) -> str:
        return f"{_hostport(self.client_ip, self.client_port)} {_hostport(self.vip, self.vport)}"

    def __str__(self) -> str:
        return self.text()


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --- routes -------------------------------------------------------------------------

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True)
class Via:
    """Where a flow's packets go: the host, and how to reach it.

    Their destination MAC becomes ``host_mac`` (the host's, or the next
    router's when tunnelling) and they leave by ``ifname``.  With ``flow_id``
    the packets are also tunnelled (:mod:`.tunnel`): ``host`` must be the
    host's IP address and ``source`` the tunnel source the host's mapping
    names (the address of the unit that handed the flow off, which a unit
    taking the flow over keeps); otherwise ``host`` just names the host for
    inventories and bulk deletes (its address, for instance "10.0.1.7").
    """

    host: str
    host_mac: str
    ifname: str = ""
    flow_id: int | None = None
    source: str | None = None
    #: ``host_mac`` as 6 bytes, computed once: the forwarder writes it into every frame.
    mac_bytes: bytes = field(init=False, repr=False, compare=False)
    #: A tunnelled flow's new source and destination addresses, packed once.
    tunnel_addresses: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        if not self.host or len(self.host.encode()) > 64 or " " in self.host:
            raise ValueError(f"host {self.host!r} must be 1 to 64 bytes without spaces")
        mac = self.host_mac.lower()
        if not _MAC.match(mac):
            raise ValueError(f"host_mac {self.host_mac!r} is not a MAC address")
        object.__setattr__(self, "host_mac", mac)
        object.__setattr__(self, "mac_bytes", bytes.fromhex(mac.replace(":", "")))
        if self.flow_id is None:
            if self.source is not None:
                raise ValueError("a tunnel source without a flow id")
            return
        if not 0 <= self.flow_id < 1 << 32:
            raise ValueError(f"flow_id {self.flow_id!r} is not a 32-bit number")
        if self.source is None:
            raise ValueError("a tunnelled flow needs its tunnel source")
        # A tunnelled packet goes from the tunnel source to the host's own address.
        source = ipaddress.ip_address(self.source)
        host = ipaddress.ip_address(self.host)
        if source.version != host.version:
            raise ValueError(f"tunnel source {self.source} and host {self.host} are of different families")
        object.__setattr__(self, "source", str(source))
        object.__setattr__(self, "tunnel_addresses", source.packed + host.packed)


class State(enum.Enum):
    FENCED = "fenced"
    COMMITTED = "committed"
    CLOSING = "closing"
    DELETED = "deleted"


class Verdict(enum.Enum):
    """What the forwarder does with one client packet."""

    FORWARD = "forward"
    BUFFERED = "buffered"
    DROP = "drop"
    #: Not a handed-off flow: the unit's own traffic, left to its kernel.
    PASS = "pass"


#: Why the forwarder dropped a packet; each is a counter ``drop_<reason>``.
DROP_REASONS = ("buffer_full", "malformed", "send_error", "no_interface", "no_tunnel", "rx_overflow")

# TCP flag bits the table cares about.
FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10


class Route:
    """One flow's entry.  Mutable, owned by its table; read it, do not change it."""

    __slots__ = ("buffer", "buffered_bytes", "bytes", "deadline", "ended", "key", "offloaded", "packed",
                 "packets", "pending_close", "since", "state", "via")

    def __init__(self, key: FlowKey, via: Via, now: float) -> None:
        self.key = key
        self.packed = key.packed
        self.via = via
        self.state = State.FENCED
        self.since = now
        #: When a timeout ends this route: the fence, closing or idle deadline.
        self.deadline = now + limits.FENCE_TIMEOUT
        self.buffer: list[bytes] = []
        self.buffered_bytes = 0
        self.packets = 0
        self.bytes = 0
        #: FIN/RST flags seen while fenced, applied at commit.
        self.pending_close = 0
        #: The unit's kernel forwards this flow (the forwarder's fast path);
        #: the forwarder only watches its FIN/RST.
        self.offloaded = False
        #: The host's agent reported the end: the route only lingers (:meth:`RouteTable.end`).
        self.ended = False

    def row(self) -> dict[str, Any]:
        return {
            "client": _hostport(self.key.client_ip, self.key.client_port),
            "vip": _hostport(self.key.vip, self.key.vport),
            "host": self.via.host,
            "host_mac": self.via.host_mac,
            "ifname": self.via.ifname,
            "flow_id": self.via.flow_id,
            "state": self.state.value,
            "since": self.since,
            "packets": self.packets,
            "bytes": self.bytes,
            "buffered": len(self.buffer),
            "offloaded": self.offloaded,
        }


@dataclass(frozen=True, slots=True)
class Deleted:
    """A route that left the table, and why ("ended", "aborted", "fence_timeout",
    "closing_timeout", "idle_timeout", "host_gone", "reused")."""

    route: Route
    reason: str


class RouteTable:
    """Flow key -> route, with the fence buffers and the timeouts."""

    def __init__(
        self,
        clock: SecondsClock,
        *,
        max_routes: int = limits.MAX_ROUTES,
        fence_max_packets: int = limits.FENCE_MAX_PACKETS,
        fence_max_bytes: int = limits.FENCE_MAX_BYTES,
        fence_total_bytes: int = limits.FENCE_TOTAL_BYTES,
        fence_timeout: float = limits.FENCE_TIMEOUT,
        closing_timeout: float = limits.CLOSING_TIMEOUT,
        reset_timeout: float = limits.RESET_TIMEOUT,
        idle_timeout: float = limits.ROUTE_IDLE_TIMEOUT,
        end_linger: float = limits.END_LINGER,
    ) -> None:
        self._clock = clock
        self.max_routes = max_routes
        self.fence_max_packets = fence_max_packets
        self.fence_max_bytes = fence_max_bytes
        self.fence_total_bytes = fence_total_bytes
        self.fence_timeout = fence_timeout
        self.closing_timeout = closing_timeout
        self.reset_timeout = reset_timeout
        self.idle_timeout = idle_timeout
        self.end_linger = end_linger
        self._routes: dict[bytes, Route] = {}
        # The FENCED ones, kept apart: the forwarder's socket filter names them.
        self._fenced: dict[bytes, FlowKey] = {}
        # Routes past the fence that the kernel's fast path does not carry
        # (not offloaded yet, or its offload failed): Python forwards their
        # frames, so the socket filter must let them through too.
        self._in_python: dict[bytes, FlowKey] = {}
        #: Bytes held in all fence buffers.
        self.buffered_bytes = 0
        #: Packets, bytes, drops by reason and state changes, for metrics.
        self.stats: Counter[str] = Counter()
        #: Routes that left the table while a packet was handled (a closing
        #: flow's 4-tuple reused by a new SYN); the forwarder drains this after
        #: each batch so that the fence is lifted at once, and tick() returns them too.
        self.removed: list[Deleted] = []

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, key: FlowKey) -> bool:
        return key.packed in self._routes

    def get(self, key: FlowKey) -> Route | None:
        return self._routes.get(key.packed)

    def lookup(self, packed: bytes) -> Route | None:
        return self._routes.get(packed)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    # --- the classifier's and the agent's calls ---------------------------------

    def fence(self, key: FlowKey, via: Via) -> Route:
        """Starts holding ``key``'s packets for a handoff to ``via``.

        :class:`RouteError` when the flow already has a route (a new connection
        cannot reuse a live 4-tuple), :class:`TableFull` at ``max_routes``.
        """
        packed = key.packed
        if packed in self._routes:
            raise RouteError(f"{key} already has a route ({self._routes[packed].state.value})")
        if len(self._routes) >= self.max_routes:
            self.stats["fence_table_full"] += 1
            raise TableFull(f"{len(self._routes)} routes")
        now = self._clock.seconds()
        route = Route(key, via, now)
        route.deadline = now + self.fence_timeout
        self._routes[packed] = route
        self._fenced[packed] = key
        self.stats["fenced"] += 1
        return route

    def fenced_keys(self) -> list[FlowKey]:
        return list(self._fenced.values())

    def python_keys(self) -> list[FlowKey]:
        """The flows whose frames Python must see: fenced ones, and those past
        the fence that are not offloaded to a fast path."""
        return [*self._fenced.values(), *self._in_python.values()]

    def commit(self, key: FlowKey) -> list[bytes]:
        """The host holds the connection: returns the buffered packets, in
        arrival order, for the caller to send before any later packet."""
        route = self._need(key, "commit")
        if route.state is not State.FENCED:
            raise RouteError(f"cannot commit {key}: it is {route.state.value}")
        route.state = State.COMMITTED
        self._fenced.pop(route.packed, None)
        self._in_python[route.packed] = key
        route.deadline = self._clock.seconds() + self.idle_timeout
        held, route.buffer = route.buffer, []
        self.buffered_bytes -= route.buffered_bytes
        route.buffered_bytes = 0
        self.stats["committed"] += 1
        self.stats["flushed_packets"] += len(held)
        for frame in held:
            route.packets += 1
            route.bytes += len(frame)
            self.stats["packets"] += 1
            self.stats["bytes"] += len(frame)
        if route.pending_close:
            self._close_if(route, route.pending_close)
        return held

    def restore(self, key: FlowKey, via: Via, state: State = State.COMMITTED) -> Route:
        """Re-plumbs a route read from the DAM (another unit handed the flow
        off).  A FENCED route is restored as fenced: its handoff may still
        commit; an existing route for the key is replaced."""
        if state is State.DELETED:
            raise RouteError("cannot restore a deleted route")
        packed = key.packed
        old = self._routes.get(packed)
        if old is not None:
            self._drop(old)
        elif len(self._routes) >= self.max_routes:
            self.stats["restore_table_full"] += 1
            raise TableFull(f"{len(self._routes)} routes")
        now = self._clock.seconds()
        route = Route(key, via, now)
        route.state = state
        route.deadline = now + {
            State.FENCED: self.fence_timeout,
            State.COMMITTED: self.idle_timeout,
            State.CLOSING: self.closing_timeout,
        }[state]
        self._routes[packed] = route
        if state is State.FENCED:
            self._fenced[packed] = key
        else:
            self._in_python[packed] = key
        self.stats["restored"] += 1
        return route

    def offload(self, key: FlowKey) -> Route:
        """The unit's kernel now forwards ``key`` (committed routes only).  Its
        packets are no longer seen one by one, so no idle timeout applies:
        the agent's report, the client's FIN/RST or the host's loss ends it."""
        route = self._need(key, "offload")
        if route.state is not State.COMMITTED:
            raise RouteError(f"cannot offload {key}: it is {route.state.value}")
        route.offloaded = True
        self._in_python.pop(route.packed, None)
        route.deadline = float("inf")
        self.stats["offloaded"] += 1
        return route

    def delete(self, key: FlowKey, reason: str = "ended") -> Deleted | None:
        """Removes ``key``'s route (the agent reported the end, or the handoff
        was aborted: buffered packets are discarded).  None if it had none."""
        route = self._routes.get(key.packed)
        if route is None:
            self.stats["delete_unknown"] += 1
            return None
        self._drop(route)
        self.stats[f"deleted_{reason}"] += 1
        return Deleted(route, reason)

    def end(self, key: FlowKey) -> Deleted | None:
        """The host's agent reported ``key``'s end.  A committed route lingers
        ``end_linger`` seconds more, closing, for the client's last ACK of the
        host's FIN (then :meth:`tick` deletes it, reason "ended"); one never
        committed goes at once.  Returns what was deleted now, if anything."""
        route = self._routes.get(key.packed)
        if route is None:
            self.stats["delete_unknown"] += 1
            return None
        if route.state is State.FENCED:
            return self.delete(key, "ended")
        if not route.ended:
            route.ended = True
            if route.state is State.COMMITTED:
                route.state = State.CLOSING
                self.stats["closing"] += 1
            route.deadline = min(route.deadline, self._clock.seconds() + self.end_linger)
        return None

    def delete_host(self, host: str, reason: str = "host_gone") -> list[Deleted]:
        """Removes every route to ``host`` (its agent is gone)."""
        gone = [r for r in self._routes.values() if r.via.host == host]
        out = []
        for route in gone:
            self._drop(route)
            self.stats[f"deleted_{reason}"] += 1
            out.append(Deleted(route, reason))
        return out

    # --- the forwarder's calls --------------------------------------------------------

    def packet(self, packed: bytes, frame: bytes | bytearray | memoryview, flags: int) -> tuple[Verdict, Route | None]:
        """One client packet of flow ``packed`` (see :attr:`FlowKey.packed`)
        with TCP ``flags``: forward it (to the returned route's ``via``),
        or it was buffered, or dropped (counted by reason), or it is not a
        handed-off flow's (PASS)."""
        route = self._routes.get(packed)
        if route is None:
            return Verdict.PASS, None
        state = route.state
        size = len(frame)
        if state is State.FENCED:
            if (len(route.buffer) >= self.fence_max_packets
                    or route.buffered_bytes + size > self.fence_max_bytes
                    or self.buffered_bytes + size > self.fence_total_bytes):
                self.stats["drop_buffer_full"] += 1
                return Verdict.DROP, route
            # The caller's buffer is reused for the next frame: keep a copy.
            route.buffer.append(bytes(frame))
            route.buffered_bytes += size
            self.buffered_bytes += size
            self.stats["buffered_packets"] += 1
            self._close_if(route, flags)
            return Verdict.BUFFERED, route
        if state is State.CLOSING and flags & (SYN | ACK) == SYN:
            # A bare SYN on a closing flow is a new connection reusing the
            # 4-tuple: it belongs to the unit's listener, not to the old host.
            self._drop(route)
            self.stats["deleted_reused"] += 1
            self.removed.append(Deleted(route, "reused"))
            return Verdict.PASS, None
        if route.offloaded:
            # The kernel forwarded it; only its flags matter here.
            self.stats["offloaded_seen"] += 1
            self._close_if(route, flags)
            return Verdict.FORWARD, route
        route.packets += 1
        route.bytes += size
        self.stats["packets"] += 1
        self.stats["bytes"] += size
        if state is State.COMMITTED:
            route.deadline = self._clock.seconds() + self.idle_timeout
        self._close_if(route, flags)
        return Verdict.FORWARD, route

    def count_drop(self, reason: str, count: int = 1) -> None:
        """The forwarder's own drops (send errors, receive buffer overflows)."""
        self.stats[f"drop_{reason}"] += count

    def _close_if(self, route: Route, flags: int) -> None:
        if not flags & (FIN | RST):
            return
        now = self._clock.seconds()
        timeout = self.reset_timeout if flags & RST else self.closing_timeout
        if route.state is State.FENCED:
            # The fence's deadline stays; the close is applied at commit.
            route.pending_close |= flags & (FIN | RST)
            return
        if route.state is State.COMMITTED:
            route.state = State.CLOSING
            route.deadline = now + timeout
            self.stats["closing"] += 1
        elif flags & RST:
            route.deadline = min(route.deadline, now + timeout)

    def tick(self) -> list[Deleted]:
        """Runs the timeouts; returns the routes that left the table."""
        now = self._clock.seconds()
        expired = [r for r in self._routes.values() if r.deadline <= now]
        out, self.removed = self.removed, []
        for route in expired:
            reason = "ended" if route.ended else {
                State.FENCED: "fence_timeout",
                State.COMMITTED: "idle_timeout",
                State.CLOSING: "closing_timeout",
            }[route.state]
            self._drop(route)
            self.stats[f"deleted_{reason}"] += 1
            out.append(Deleted(route, reason))
        return out

    def _drop(self, route: Route) -> None:
        del self._routes[route.packed]
        self._fenced.pop(route.packed, None)
        self._in_python.pop(route.packed, None)
        self.buffered_bytes -= route.buffered_bytes
        route.buffered_bytes = 0
        route.buffer = []
        route.state = State.DELETED

    def _need(self, key: FlowKey, what: str) -> Route:
        route = self._routes.get(key.packed)
        if route is None:
            raise RouteError(f"cannot {what} {key}: no route")
        return route

    # --- inventory ----------------------------------------------------------------------

    def inventory(self, limit: int | None = None) -> dict[str, Any]:
        """The admin API's view: counts by state, and up to ``limit`` rows."""
        by_state: Counter[str] = Counter(r.state.value for r in self._routes.values())
        rows: list[dict[str, Any]] = []
        for route in self._routes.values():
            if limit is not None and len(rows) >= limit:
                break
            rows.append(route.row())
        return {
            "routes": len(self._routes),
            "by_state": dict(by_state),
            "buffered_bytes": self.buffered_bytes,
            "stats": dict(self.stats),
            "rows": rows,
        }


# --- durable form (DAM atoms) -------------------------------------------------------

#: The DAM kind of route atoms.
ATOM_KIND = "tcp-route"
#: Version of the route atom's data.  Version 1 (no tunnel source) is still
#: read, so units can be upgraded one by one; any other is refused.
ATOM_VERSION = 2
# Keys start with a word and a space: no cookie value (the DAM's other keys)
# may hold a space, so route keys never collide with session keys.
_KEY_PREFIX = "route "
#: Fields of a route atom's data by its version.
_ATOM_FIELDS = {"1": 5, str(ATOM_VERSION): 6}
_STATE_CODES = {State.FENCED: "f", State.COMMITTED: "c", State.CLOSING: "x"}
_CODE_STATES = {v: k for k, v in _STATE_CODES.items()}


def atom_key(key: FlowKey) -> str:
    return _KEY_PREFIX + key.text()


def to_atom(route: Route) -> tuple[str, str, str]:
    """``(key, data, kind)`` for ``DAM.add``.

    data is ``"2 <state> <host> <mac> <flow id or -> <tunnel source or ->"``:
    version, f/c/x, the host's name and MAC address, the tunnel flow id and
    the tunnel source it comes from.
    """
    if route.state is State.DELETED:
        raise RouteError("a deleted route has no durable form")
    via = route.via
    flow = "-" if via.flow_id is None else str(via.flow_id)
    source = via.source or "-"
    data = f"{ATOM_VERSION} {_STATE_CODES[route.state]} {via.host} {via.host_mac} {flow} {source}"
    return atom_key(route.key), data, ATOM_KIND


_HOSTPORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([0-9]{1,5})$")


def _parse_hostport(text: str) -> tuple[str, int]:
    match = _HOSTPORT.match(text)
    if match is None:
        raise WireError(f"{text!r} is not ip:port")
    ip = match.group(1) or match.group(2)
    if match.group(1) and ":" not in ip:
        raise WireError(f"{text!r}: brackets are for IPv6 only")
    return ip, int(match.group(3))


def is_route_atom(key: str) -> bool:
    return key.startswith(_KEY_PREFIX)


def flow_of(key: str) -> FlowKey:
    """The flow a route atom's key names; :class:`WireError` if malformed."""
    if not isinstance(key, str) or not key.startswith(_KEY_PREFIX):
        raise WireError(f"{key!r} is not a route key")
    parts = key[len(_KEY_PREFIX):].split(" ")
    if len(parts) != 2:
        raise WireError(f"{key!r}: expected 'client vip'")
    try:
        client_ip, client_port = _parse_hostport(parts[0])
        vip, vport = _parse_hostport(parts[1])
        return FlowKey(client_ip, client_port, vip, vport)
    except ValueError as e:
        raise WireError(f"bad route key {key!r}: {e}") from None


def from_atom(key: str, data: str, ifname: str = "") -> tuple[FlowKey, Via, State]:
    """Reads a route atom back; ``ifname`` is the reading unit's interface
    towards the host.  :class:`WireError` for anything malformed."""
    flow_key = flow_of(key)
    if not isinstance(data, str):
        raise WireError("route data is not text")
    fields = data.split(" ")
    expected = _ATOM_FIELDS.get(fields[0])
    if expected is None:
        raise WireError(f"route data version {fields[0]!r} is not one of {', '.join(_ATOM_FIELDS)}")
    if len(fields) != expected:
        raise WireError(f"route data {data!r}: expected {expected} fields")
    code, host, mac, flow = fields[1:5]
    source = fields[5] if expected > 5 and fields[5] != "-" else None
    state = _CODE_STATES.get(code)
    if state is None:
        raise WireError(f"route state {code!r} unknown")
    if flow == "-":
        flow_id = None
    elif flow.isdigit() and flow.isascii() and len(flow) <= 10:
        flow_id = int(flow)
    else:
        raise WireError(f"tunnel flow id {flow!r} is not a number")
    try:
        via = Via(host, mac, ifname, flow_id, source)
    except ValueError as e:
        raise WireError(f"bad route data {data!r}: {e}") from None
    return flow_key, via, state


def replumb(table: RouteTable, atoms: Iterable[tuple[str, str]], ifname: str) -> tuple[int, int]:
    """Restores every route atom of ``(key, data)`` pairs into ``table`` (the
    takeover of another unit's flows); returns (restored, malformed)."""
    restored = bad = 0
    for key, data in atoms:
        if not is_route_atom(key):
            continue
        try:
            flow_key, via, state = from_atom(key, data, ifname)
            table.restore(flow_key, via, state)
        except (WireError, TableFull):
            bad += 1
            table.stats["replumb_failed"] += 1
            continue
        restored += 1
    return restored, bad
