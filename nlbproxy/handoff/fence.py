# -*- test-case-name: tests.test_handoff_fence -*-
"""Fencing handed-off flows so that the unit's kernel does not answer them.

Once the unit has closed its repair-mode socket, the client's next segment
would reach the unit's listener, which knows no such connection and answers
with a RST that kills the connection the host has just restored.  The fence is
an nftables set of flows (client address and port, VIP and port) and a rule
that drops the set's packets in a ``raw``-priority prerouting chain (-300:
before conntrack and before the socket lookup).  AF_PACKET sockets see frames
before netfilter, so the forwarder still receives every fenced packet.

The table is the unit's: :meth:`Fence.setup` replaces whatever an earlier run
left (a crashed unit's elements are stale, their routes gone with it) and
:meth:`Fence.teardown` removes it.  The unit runs in the network namespace whose
traffic it fences; both back ends act on the namespace of the calling process.

Adding and removing elements sits on the handoff's critical path, so the
preferred back end calls libnftables in-process through ctypes (about 0.16 ms
an element); the ``nft`` command (a fork and exec each time, 3-6 ms) is the
fallback when the library is missing.  The command text is the same for both
and built by pure functions here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from nlbproxy.handoff.routes import FlowKey

#: The unit's nftables table (family inet); one per unit and namespace.
DEFAULT_TABLE = "nlbproxy_fence"
#: The chain's priority: netfilter's raw priority, ahead of conntrack.
PRIORITY = -300

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")


class FenceError(Exception):
    """nftables refused a command (the message is nftables' own)."""


class FenceUnavailable(FenceError):
    """Neither libnftables nor the ``nft`` command is installed."""


class Backend(Protocol):
    name: str

    def run(self, commands: str) -> None:
        """Runs nftables commands as one transaction; FenceError on failure."""


# --- the commands (pure) -----------------------------------------------------------


def check_table_name(table: str) -> str:
    if not _NAME.match(table):
        raise ValueError(f"nftables table name {table!r} must be a letter then up to 30 of [A-Za-z0-9_]")
    return table


def setup_commands(table: str) -> str:
    """Creates the table afresh: the sets and drop rules for fenced flows (on a
    unit) and for tunnelled flows (on a host: the decapsulator takes those
    frames from its AF_PACKET socket and the kernel must not answer them).

    ``add table`` before ``delete table`` makes the delete succeed whether or not
    an earlier run left the table, all in one transaction.
    """
    check_table_name(table)
    return (
        f"add table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        f"  set flows4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}\n"
        f"  set flows6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}\n"
        f"  set tunnel4 {{ type ipv4_addr . inet_service . inet_service; }}\n"
        f"  set tunnel6 {{ type ipv6_addr . inet_service . inet_service; }}\n"
        f"  chain prerouting {{\n"
        f"    type filter hook prerouting priority {PRIORITY}; policy accept;\n"
        f"    ip saddr . tcp sport . ip daddr . tcp dport @flows4 counter drop\n"
        f"    ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 counter drop\n"
        f"    ip saddr . tcp sport . tcp dport @tunnel4 counter drop\n"
        f"    ip6 saddr . tcp sport . tcp dport @tunnel6 counter drop\n"
        f"  }}\n"
        f"}}\n"
    )


def teardown_commands(table: str) -> str:
    check_table_name(table)
    return f"add table inet {table}\ndelete table inet {table}\n"


def _element(key: FlowKey) -> tuple[str, str]:
    # FlowKey holds canonical, validated addresses and ports, so nothing
    # that reaches nftables' parser here came from a peer unchecked.
    setname = "flows6" if ":" in key.client_ip else "flows4"
    return setname, f"{key.client_ip} . {key.client_port} . {key.vip} . {key.vport}"


def tunnel_commands(verb: str, table: str, flows: Iterable[tuple[str, int]]) -> str:
    """Elements of the tunnel sets: (forwarder address, flow id) pairs."""
    if verb not in ("add", "delete"):
        raise ValueError(f"verb {verb!r}")
    check_table_name(table)
    by_set: dict[str, list[str]] = {}
    for forwarder, flow_id in flows:
        address = ipaddress.ip_address(forwarder)
        if not 0 <= flow_id < 1 << 32:
            raise ValueError(f"flow id {flow_id!r}")
        setname = f"tunnel{address.version}"
        by_set.setdefault(setname, []).append(f"{address} . {flow_id >> 16} . {flow_id & 0xFFFF}")
    return "".join(f"{verb} element inet {table} {setname} {{ {', '.join(elements)} }}\n"
                   for setname, elements in sorted(by_set.items()))


def element_commands(verb: str, table: str, keys: Iterable[FlowKey]) -> str:
    """``add element`` / ``delete element`` commands for ``keys``, one per set."""
    if verb not in ("add", "delete"):
        raise ValueError(f"verb {verb!r}")
    check_table_name(table)
    by_set: dict[str, list[str]] = {}
    for key in keys:
        setname, element = _element(key)
        by_set.setdefault(setname, []).append(element)
    return "".join(f"{verb} element inet {table} {setname} {{ {', '.join(elements)} }}\n"
                   for setname, elements in sorted(by_set.items()))


# --- back ends ---------------------------------------------------------------------------


class LibNftables:
    """libnftables through ctypes: one context, commands parsed and sent in-process."""

    name = "libnftables"

    def __init__(self, path: str | None = None) -> None:
        found = path or ctypes.util.find_library("nftables")
        if found is None:
            raise FenceUnavailable("libnftables is not installed (Debian: libnftables1)")
        lib = ctypes.CDLL(found)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise FenceError("nft_ctx_new failed")
        # Buffered, so that errors come back as text instead of going to stderr.
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib = lib
        self._ctx: int | None = ctx

    def run(self, commands: str) -> None:
        if self._ctx is None:
            raise FenceError("libnftables context is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        if rc != 0:
            error = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            raise FenceError(error.decode(errors="replace").strip() or f"nftables returned {rc}")

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


class NftCommand:
    """The ``nft`` command, one process per call (the slow fallback)."""

    name = "nft"

    def __init__(self, path: str | None = None) -> None:
        found = path or shutil.which("nft")
        if found is None:
            raise FenceUnavailable("the nft command is not installed (Debian: nftables)")
        self._path = found

    def run(self, commands: str) -> None:
        done = subprocess.run([self._path, "-f", "-"], input=commands, capture_output=True, text=True)
        if done.returncode != 0:
            raise FenceError(done.stderr.strip() or f"nft exited {done.returncode}")

    def close(self) -> None:
        pass


def open_backend(prefer: str = "libnftables") -> LibNftables | NftCommand:
    """The library when installed, else the command; FenceUnavailable if neither."""
    makers: list[type[LibNftables] | type[NftCommand]] = [LibNftables, NftCommand]
    if prefer != "libnftables":
        makers.reverse()
    reasons = []
    for maker in makers:
        try:
            return maker()
        except FenceUnavailable as e:
            reasons.append(str(e))
    raise FenceUnavailable("; ".join(reasons))


# --- the fence -------------------------------------------------------------------------


class Fence:
    """The unit's set of fenced flows, mirrored in nftables.

    The set of keys is kept here too: ``remove`` of a flow that is not fenced is
    a no-op instead of an nftables error (routes are deleted from several
    places: the agent's report, a timeout, an aborted handoff).
    """

    def __init__(self, backend: Backend, table: str = DEFAULT_TABLE) -> None:
        self.backend = backend
        self.table = check_table_name(table)
        self._keys: set[FlowKey] = set()
        self.active = False
        self.stats: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: FlowKey) -> bool:
        return key in self._keys

    def setup(self) -> None:
        self.backend.run(setup_commands(self.table))
        self._keys.clear()
        self.active = True

    def teardown(self) -> None:
        if self.active:
            self.backend.run(teardown_commands(self.table))
            self.active = False
        self._keys.clear()

    def add(self, *keys: FlowKey) -> None:
        """Fences ``keys`` (one transaction); FenceError leaves none of them fenced."""
        new = [k for k in dict.fromkeys(keys) if k not in self._keys]
        if not new:
            return
        try:
            self.backend.run(element_commands("add", self.table, new))
        except FenceError:
            self.stats["add_failed"] += 1
            raise
        self._keys.update(new)
        self.stats["added"] += len(new)

    def remove(self, *keys: FlowKey) -> None:
        gone = [k for k in dict.fromkeys(keys) if k in self._keys]
        if not gone:
            return
        try:
            self.backend.run(element_commands("delete", self.table, gone))
        except FenceError:
            self.stats["remove_failed"] += 1
            raise
        self._keys.difference_update(gone)
        self.stats["removed"] += len(gone)

    def keys(self) -> frozenset[FlowKey]:
        return frozenset(self._keys)

    def add_tunnel(self, forwarder: str, flow_id: int) -> None:
        """On a host: the kernel drops tunnelled frames of this flow (the
        decapsulator reads them from its AF_PACKET socket)."""
        self.backend.run(tunnel_commands("add", self.table, [(forwarder, flow_id)]))
        self.stats["tunnels_added"] += 1

    def remove_tunnel(self, forwarder: str, flow_id: int) -> None:
        self.backend.run(tunnel_commands("delete", self.table, [(forwarder, flow_id)]))
        self.stats["tunnels_removed"] += 1
