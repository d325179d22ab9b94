# -*- test-case-name: tests.test_handoff_unitforwarder -*-
"""The forwarder of a unit's handoff listeners, as ``[unit] forwarder_*`` sets it up.

:class:`UnitForwarder` owns what a ``twistd nlbproxy`` unit needs for the
packet path of its handed-off connections: the route table, the AF_PACKET
port on ``forwarder_in``, the nftables fence (created at start, deleted at
stop), the optional kernel fast path, and a :class:`ForwarderPlumbing` whose
routes are durable in the unit's DAM.  It is the ``Plumbing`` the unit side
calls (fence, commit, unfence, ended).

Twice a second it also looks at the farm and the DAM:

- a host that health says is down (its agent went silent or reports it
  down, or its probe fails) loses its routes: the fence goes with them, and
  the client's next packets of those flows reach this unit's kernel, which
  owns the VIP and answers with a RST -- the connection ends instead of
  hanging on a dead host;
- a peer unit that left the DAM (it failed) leaves route atoms behind: this
  unit takes its flows over (:meth:`ForwarderPlumbing.replumb`), so that when
  the clients' traffic moves here their packets still reach their hosts;
- after a restart, once the DAM has resynced, this unit takes back the flows
  of its earlier run that a peer carried meanwhile: the clients' traffic
  may come back (a preempting VRRP master).

:class:`HandoffReport` is the admin API's view of both halves (the handoff
counters and the forwarder): the ``handoff`` section of ``/api/v1/state``,
each host's ``handed_off`` and the ``/metrics`` lines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from nlbproxy import limits
from nlbproxy.handoff.fence import Fence, open_backend
from nlbproxy.handoff.forwarder import (
    Forwarder, ForwarderPlumbing, KernelPath, PacketPort, interface_mac, neighbour_mac, open_packet_socket,
)
from nlbproxy.handoff.routes import ATOM_KIND, FlowKey, RouteTable, State, WireError, atom_key, flow_of
from nlbproxy.handoff.tunnel import Mapping as TunnelMapping, TunnelPlan
from nlbproxy.metrics import PrometheusWriter

log = Logger()


class ForwarderStartError(Exception):
    """The forwarder could not be set up (no such interface, no nftables, not root)."""


def hosts_by_address(farm: Any) -> dict[str, list[Any]]:
    """The farm's hosts by IP address (one address may serve several pools)."""
    out: dict[str, list[Any]] = {}
    for pool in farm.pools.values():
        for host in pool.hosts:
            out.setdefault(host.host, []).append(host)
    return out


def dead_hosts(routed: Iterable[str], farm: Any) -> list[str]:
    """The addresses among ``routed`` that health says are down: every farm
    host at that address is reported down by its agent (or its agent is
    gone) or fails its probe.  Passive health (a refused proxied request)
    does not count: it says nothing about connections already on the host."""
    hosts = hosts_by_address(farm)
    out = []
    for address in sorted(set(routed)):
        entries = hosts.get(address)
        if entries and not any(h.agent_up and h.probe_up for h in entries):
            out.append(address)
    return out


class UnitForwarder:
    """The forwarder, fence and fast path of one unit (see the module doc).

    Nothing touches the system before :meth:`start`.  ``dam`` is the unit's
    DAM (routes are written to it, and a departed peer's are read from it).
    """

    def __init__(self, reactor: Any, farm: Any, dam: Any, in_ifname: str, out_ifname: str | None = None, *,
                 fast_path: bool = False, fence_table: str = "nlbproxy_fence",
                 backend_factory: Callable[[], Any] = open_backend,
                 opener: Callable[[str, bool], Any] = open_packet_socket,
                 mac_of: Callable[[str], bytes] = interface_mac,
                 resolve_mac: Callable[[str], str] = neighbour_mac,
                 watch_interval: float = limits.FORWARDER_WATCH_INTERVAL,
                 tunnel: TunnelPlan | None = None) -> None:
        self.reactor = reactor
        self.farm = farm
        self.dam = dam
        self.in_ifname = in_ifname
        self.out_ifname = out_ifname or in_ifname
        self.fast_path = fast_path
        self.fence_table = fence_table
        self.tunnel = tunnel
        self.table = RouteTable(reactor)
        self.plumbing: ForwarderPlumbing | None = None
        self.port: PacketPort | None = None
        self.kernel: KernelPath | None = None
        self.stats: Counter[str] = Counter()
        self._backend_factory = backend_factory
        self._opener = opener
        self._mac_of = mac_of
        self._resolve_mac = resolve_mac
        self._backend: Any = None
        self._fence: Fence | None = None
        self._peers: frozenset[str] = frozenset()
        #: Routes taken over from failed peers, watched for their atom's end.
        self._taken: set[FlowKey] = set()
        #: The peers whose resync :meth:`take_back_own` has looked at.
        self._synced_with: frozenset[str] = frozenset()
        self._watch = LoopingCall(self.watch)
        self._watch.clock = reactor
        self._watch_interval = watch_interval

    # --- life -------------------------------------------------------------------------

    def start(self) -> None:
        """Creates the fence (and fast path) tables and opens the sockets;
        :class:`ForwarderStartError` with one line when that fails."""
        for ifname in dict.fromkeys((self.in_ifname, self.out_ifname)):
            try:
                mac = self._mac_of(ifname)
            except OSError as e:
                raise ForwarderStartError(f"forwarder interface {ifname}: {e.strerror or e}") from e
        out_mac = mac
        try:
            self._backend = self._backend_factory()
            self._fence = Fence(self._backend, self.fence_table)
            self._fence.setup()
            if self.fast_path:
                self.kernel = KernelPath(self._backend, self.in_ifname, self.out_ifname, out_mac.hex(":"),
                                         table=f"{self.fence_table}_fast")
                self.kernel.setup()
            forwarder = Forwarder(self.table, {self.out_ifname: out_mac})
            self.port = PacketPort(self.reactor, forwarder, self.in_ifname, opener=self._opener,
                                   kernel=self.kernel)
            self.port.start()
        except Exception as e:
            self.stop()
            raise ForwarderStartError(f"forwarder on {self.in_ifname}: {e}") from e
        self.plumbing = ForwarderPlumbing(self.port, self._fence, self.out_ifname, self._resolve_mac, dam=self.dam,
                                          tunnel=self.tunnel)
        self._peers = frozenset(self.dam.peers) if self.dam is not None else frozenset()
        self._watch.start(self._watch_interval, now=False)
        log.info("handoff forwarder on {rx} -> {tx} (fence table {table}{fast})", rx=self.in_ifname,
                 tx=self.out_ifname, table=self.fence_table, fast=", kernel fast path" if self.kernel else "")

    def stop(self) -> None:
        """Closes the sockets and deletes the tables; the handed-off flows'
        packets then reach this unit's kernel (which resets them)."""
        if self._watch.running:
            self._watch.stop()
        if self.port is not None:
            self.port.stop()
        for name, undo in (("fast path", self.kernel), ("fence", self._fence)):
            if undo is None:
                continue
            try:
                undo.teardown()
            except Exception as e:
                log.warn("forwarder {name} table not deleted: {e}", name=name, e=e)
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()
        self._backend = None
        self.plumbing = None

    # --- the unit side's Plumbing ------------------------------------------------------

    def _need(self) -> ForwarderPlumbing:
        if self.plumbing is None:
            raise RuntimeError("the forwarder is not running")
        return self.plumbing

    def fence(self, flow: Any, host: Any) -> TunnelMapping | None:
        return self._need().fence(flow, host)

    def commit(self, flow: Any) -> None:
        self._need().commit(flow)

    def unfence(self, flow: Any) -> None:
        self._need().unfence(flow)

    def ended(self, flow: Any) -> None:
        if self.plumbing is not None:
            self.plumbing.ended(flow)

    # --- the watch ----------------------------------------------------------------------

    def watch(self) -> None:
        """Drops the routes of dead hosts and takes over departed peers' routes."""
        if self.plumbing is None or self.port is None:
            return
        self.take_over_departed()
        self.take_back_own()
        self.drop_ended_elsewhere()
        for address in dead_hosts((r.via.host for r in self.table.routes()), self.farm):
            count = self.port.delete_host(address, "host_down")
            self.stats["host_down_routes"] += count
            log.warn("host {host} is down: {n} handed-off connections to it end (their clients get a RST)",
                     host=address, n=count)

    def take_over_departed(self) -> int:
        """Replumbs the live route atoms whose origin is a peer that left the
        DAM since the last look; returns how many were taken over."""
        if self.dam is None or self.plumbing is None:
            return 0
        peers = frozenset(self.dam.peers)
        left, self._peers = self._peers - peers, peers
        if not left:
            return 0
        atoms = [(a.key, a.data) for a in self.dam.atoms()
                 if not a.dead and a.kind == ATOM_KIND and a.origin in left]
        taken, refused = self._adopt(atoms)
        self.stats["taken_over"] += taken
        if atoms:
            log.info("peer {peers} left: took over {taken} of its handed-off connections ({refused} refused)",
                     peers=", ".join(sorted(left)), taken=taken, refused=refused)
        return taken

    def take_back_own(self) -> int:
        """Replumbs the live route atoms this unit wrote in an earlier run
        (it failed, a peer carried its flows, and now the clients' traffic
        may come back here, as a VIP does to a preempting VRRP master).
        Runs once the DAM has resynced with a peer it had not looked at;
        returns how many routes were taken back."""
        if self.dam is None or self.plumbing is None or not self.dam.resync_done:
            return 0
        peers = frozenset(self.dam.peers)
        if peers <= self._synced_with:
            return 0
        self._synced_with = peers
        me = self.dam.me
        atoms = [(a.key, a.data) for a in self.dam.atoms()
                 if not a.dead and a.kind == ATOM_KIND and a.origin == me and not self._routed(a.key)]
        if not atoms:
            return 0
        taken, refused = self._adopt(atoms)
        self.stats["taken_back"] += taken
        log.info("took back {taken} handed-off connections of this unit's earlier run ({refused} refused)",
                 taken=taken, refused=refused)
        return taken

    def _routed(self, atom_key_: str) -> bool:
        try:
            return flow_of(atom_key_) in self.table
        except WireError:
            return False

    def _adopt(self, atoms: list[tuple[str, str]]) -> tuple[int, int]:
        """Replumbs ``atoms`` and watches the routes they became for their
        atom's deletion by another unit; returns (taken, refused)."""
        assert self.plumbing is not None
        taken, refused = self.plumbing.replumb(atoms)
        for key, _ in atoms:
            if self._routed(key):
                self._taken.add(flow_of(key))
        return taken, refused

    def drop_ended_elsewhere(self) -> int:
        """Deletes taken-over routes whose atom was deleted (the unit thought
        failed was only cut off, and its host's agent reported the end to
        it); returns how many."""
        if self.dam is None or self.port is None:
            return 0
        gone = 0
        for key in list(self._taken):
            if key not in self.table:
                self._taken.discard(key)
            elif self.dam.get(atom_key(key)) is None:
                self._taken.discard(key)
                self.port.delete(key, "ended_elsewhere")
                gone += 1
        return gone

    # --- views ------------------------------------------------------------------------

    def handed_off(self) -> Counter[str]:
        """Live handed-off connections (committed or closing routes whose end
        the agent has not reported) by host address."""
        return Counter(r.via.host for r in self.table.routes()
                       if r.state in (State.COMMITTED, State.CLOSING) and not r.ended)

    def state(self, limit: int = limits.ADMIN_ROUTE_ROWS) -> dict[str, Any]:
        metrics = self.port.forwarder.metrics() if self.port is not None else {}
        plumbing = dict(self.plumbing.stats) if self.plumbing is not None else {}
        return {
            "running": self.port is not None,
            "in": self.in_ifname,
            "out": self.out_ifname,
            "fast_path": self.kernel is not None and self.kernel.active,
            "fence_table": self.fence_table,
            "metrics": metrics,
            "plumbing": {**plumbing, **self.stats},
            "inventory": self.table.inventory(limit),
        }

    def write_metrics(self, w: PrometheusWriter) -> None:
        stats = self.table.stats
        w.add("nlbproxy_forwarder_packets_total", "counter",
              "Client packets the forwarder sent on to hosts.", stats["packets"])
        w.add("nlbproxy_forwarder_bytes_total", "counter",
              "Bytes of the client packets the forwarder sent on to hosts.", stats["bytes"])
        w.add("nlbproxy_forwarder_buffered_packets_total", "counter",
              "Client packets held between fence and commit.", stats["buffered_packets"])
        for name, count in sorted(stats.items()):
            if name.startswith("drop_"):
                w.add("nlbproxy_forwarder_dropped_total", "counter",
                      "Client packets the forwarder dropped, by reason.", count, reason=name[len("drop_"):])
            elif name.startswith("deleted_"):
                w.add("nlbproxy_forwarder_routes_deleted_total", "counter",
                      "Routes that left the forwarder's table, by reason.", count, reason=name[len("deleted_"):])
        if self.port is not None:
            fstats = self.port.forwarder.stats
            for what in ("rx_frames", "passed", "malformed"):
                w.add(f"nlbproxy_forwarder_{what}_total", "counter",
                      "Frames the forwarder read (rx_frames), left to the kernel (passed) or found malformed.",
                      fstats[what])
            w.add("nlbproxy_forwarder_too_big_total", "counter",
                  "ICMP 'too big' messages about handed-off flows sent on to their hosts.", fstats["too_big"])
        by_state = Counter(r.state.value for r in self.table.routes())
        for state in (State.FENCED, State.COMMITTED, State.CLOSING):
            w.add("nlbproxy_forwarder_routes", "gauge", "Routes in the forwarder's table, by state.",
                  by_state[state.value], state=state.value)
        w.add("nlbproxy_forwarder_buffered_bytes", "gauge", "Bytes held in fence buffers.",
              self.table.buffered_bytes)
        w.add("nlbproxy_forwarder_taken_over_total", "counter",
              "Routes taken over from a failed peer unit's DAM atoms.", self.stats["taken_over"])


def build_forwarder(config: Any, reactor: Any, farm: Any, dam: Any) -> UnitForwarder | None:
    """The unit's forwarder from its ``[unit]`` config; None without ``forwarder_in``."""
    if config.forwarder_in is None:
        return None
    tunnel = None
    if config.tunnel_networks:
        version = 6 if ":" in config.tunnel_source else 4
        tunnel = TunnelPlan(config.tunnel_networks, {version: config.tunnel_source},
                            {version: config.tunnel_gateway})
    return UnitForwarder(reactor, farm, dam, config.forwarder_in, config.forwarder_out,
                         fast_path=config.forwarder_fast_path, fence_table=config.fence_table, tunnel=tunnel)


class HandoffReport:
    """The admin API's view of a unit's handoffs: ``unit`` is the
    :class:`~nlbproxy.handoff.unitside.HandoffUnit`, ``forwarder`` its
    :class:`UnitForwarder` (None: handoff listeners without a forwarder)."""

    def __init__(self, unit: Any, forwarder: UnitForwarder | None) -> None:
        self.unit = unit
        self.forwarder = forwarder

    def handed_off(self) -> Mapping[str, int]:
        return self.forwarder.handed_off() if self.forwarder is not None else {}

    def state(self) -> dict[str, Any]:
        stats = self.unit.stats
        recent = sorted(stats.recent)
        return {
            "handed_off": stats.handed_off,
            "fell_back": dict(stats.fell_back),
            "failed": dict(stats.failed),
            "ended": stats.ended,
            "latency_median": recent[len(recent) // 2] if recent else None,
            "live": sum(self.handed_off().values()),
            "forwarder": self.forwarder.state() if self.forwarder is not None else None,
        }

    def write_metrics(self, w: PrometheusWriter) -> None:
        self.unit.stats.write_metrics(w)
        if self.forwarder is not None:
            self.forwarder.write_metrics(w)
