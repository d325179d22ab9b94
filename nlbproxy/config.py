# -*- test-case-name: tests.test_config -*-
"""Load and validate a balancing unit's TOML config file.

``load_config`` reads the file, ``parse_config`` validates what ``tomllib``
made of it into frozen dataclasses.  Every problem -- an unreadable file, a
TOML syntax error, an unknown key, a wrong type, a number out of range, a
dangling pool name -- raises one ``ConfigError`` whose one-line message names
the file and the dotted key, such as
``unit.toml: listener[0].route[2].path_regex: invalid regular expression: ...``.

Each table's keys are checked against a spec that maps every allowed key to a
converter; keys left out of the file take the dataclass defaults, which for
limits and timeouts come from ``nlbproxy.limits``.  Nothing here touches the
reactor; the only I/O is reading the config file itself and the token and
secret files it names, and loading the routing plugins its routes name
(:mod:`nlbproxy.plugin`), whose options are checked here too.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nlbproxy import libssl, limits, tls


class ConfigError(Exception):
    """A config file that cannot be used, with where and why."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(path, key, reason)
        self.path = path
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.path}: {self.key}" if self.key else self.path
        return f"{where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header (or cookie) that must be present, with this value if given."""

    name: bytes
    value: bytes | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One ``[[listener.route]]``: requests matching every given key go to ``pool``.

    With ``plugin``, the matching requests are handed to that routing plugin's
    ``classifier`` (configured from ``options`` when the file is parsed, see
    :mod:`nlbproxy.plugin`); ``pool``, optional then, is where the route sends
    what the plugin declines (without it, the next routes are asked).
    """

    pool: str | None = None
    host: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    method: tuple[bytes, ...] = ()
    header: tuple[HeaderMatch, ...] = ()
    cookie: tuple[HeaderMatch, ...] = ()
    #: SOAP listeners only: the request's action (SOAP 1.1 ``SOAPAction``,
    #: SOAP 1.2 ``action`` parameter, else WS-Addressing ``Action``).
    soap_action: str | None = None
    #: SOAP listeners only: the first child of ``Body``, as ``{namespace}local``
    #: or a bare local name (any namespace).
    soap_operation: str | None = None
    plugin: str | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    #: The plugin's IRequestClassifier, built from ``options``.
    classifier: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DenyConfig:
    """One ``[[listener.deny]]``: requests matching every given key get 403."""

    name: str
    network: tuple[str, ...] = ()
    method: tuple[bytes, ...] = ()
    path_prefix: str | None = None
    path_regex: str | None = None
    header: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``rate_limit = { requests_per_second, burst }``: a token bucket per client address."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """``cache = { max_bytes, max_object_bytes, default_ttl }`` of a pool."""

    max_bytes: int = limits.CACHE_MAX_BYTES
    max_object_bytes: int = limits.CACHE_MAX_OBJECT_BYTES
    #: Freshness given to heuristically cacheable responses that state none
    #: (RFC 9111 section 4.2.2); 0: such responses are not stored.
    default_ttl: float = 0.0


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One ``[[listener]]``: an endpoint, its routes and its client-side limits."""

    name: str
    endpoint: str
    pool: str
    protocol: str = "http"
    routes: tuple[RouteConfig, ...] = ()
    handoff: bool = False
    max_header_bytes: int = limits.MAX_HEADER_BYTES
    max_request_line: int = limits.MAX_REQUEST_LINE
    max_body_bytes: int = limits.MAX_BODY_BYTES
    header_timeout: float = limits.HEADER_TIMEOUT
    keepalive_timeout: float = limits.KEEPALIVE_TIMEOUT
    client_timeout: float = limits.CLIENT_TIMEOUT
    max_requests_per_connection: int = limits.MAX_REQUESTS_PER_CONNECTION
    max_connections: int = limits.MAX_CONNECTIONS
    deny: tuple[DenyConfig, ...] = ()
    rate_limit: RateLimitConfig | None = None
    max_soap_prefix: int = limits.MAX_SOAP_PREFIX
    max_soap_depth: int = limits.MAX_SOAP_DEPTH
    max_soap_attributes: int = limits.MAX_SOAP_ATTRIBUTES
    max_soap_name: int = limits.MAX_SOAP_NAME
    max_soap_header_text: int = limits.MAX_SOAP_HEADER_TEXT
    #: PEM files (chain and key), absolute; TLS is on when there is one.  The
    #: first is served to clients without SNI or with an unknown name.
    certificates: tuple[str, ...] = ()
    #: TLS session resumption: "farm" (ticket keys from the farm's secret:
    #: resume on any unit), "unit" (this unit's tickets and session cache)
    #: or "off".
    session_tickets: str = "unit"
    tls_session_timeout: float = limits.TLS_SESSION_TIMEOUT
    ticket_key_period: float = limits.TICKET_KEY_PERIOD


@dataclass(frozen=True, slots=True)
class BackendTLSConfig:
    """``tls = { ca_file, server_name, verify }`` of a pool: TLS to its hosts."""

    #: CA bundle (PEM) the hosts' certificates must chain to; None: the system's.
    ca_file: str | None = None
    #: The name the hosts' certificates must carry (and SNI); None: each
    #: host's IP address, which its certificate must then carry.
    server_name: str | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True)
class HostConfig:
    """A backend host of a pool."""

    host: str
    port: int
    weight: int = 1

    @property
    def key(self) -> str:
        """The host as ``"ip:port"`` (``"[ip6]:port"``), as the admin API names it."""
        return format_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """An HTTP probe of a host: ``check = { path, interval, rise, fall, timeout }``."""

    path: str = "/"
    interval: float = limits.CHECK_INTERVAL
    rise: int = limits.CHECK_RISE
    fall: int = limits.CHECK_FALL
    timeout: float = limits.CHECK_TIMEOUT


@dataclass(frozen=True, slots=True)
class AgentCheckConfig:
    """HAProxy's agent-check: ``agent_check = { port, interval }``."""

    port: int
    interval: float = limits.CHECK_INTERVAL


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One ``[pool.NAME]``: the hosts of an application and its backend-side limits."""

    name: str
    hosts: tuple[HostConfig, ...] = ()
    affinity: str = "none"
    affinity_cookie: str = "NLBAFF"
    #: The application's own session cookie, for ``affinity = "session"``.
    session_cookie: str = "SESSIONID"
    client_ip_timeout: float = 600.0
    connect_timeout: float = limits.CONNECT_TIMEOUT
    server_timeout: float = limits.SERVER_TIMEOUT
    max_idle_per_host: int = limits.MAX_IDLE_PER_HOST
    max_conns_per_host: int = limits.MAX_CONNS_PER_HOST
    max_queue_per_host: int = limits.MAX_QUEUE_PER_HOST
    upstream_idle_timeout: float = limits.UPSTREAM_IDLE_TIMEOUT
    retries: int = limits.RETRIES
    fail_timeout: float = limits.FAIL_TIMEOUT
    #: How hosts are drawn: "tokens" and "percentage" follow health and
    #: load reports (nlbproxy.health.allotment); "round_robin" is smooth
    #: weighted round robin by config weight.
    balance: str = "tokens"
    check: CheckConfig | None = None
    agent_check: AgentCheckConfig | None = None
    cache: CacheConfig | None = None
    tls: BackendTLSConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitConfig:
    """A balancing unit: ``[unit]`` settings, listeners and pools."""

    name: str = "nlbproxy"
    admin: str = "tcp:9901:interface=127.0.0.1"
    admin_token_file: str | None = None
    admin_token: str | None = None
    workers: int = 1
    access_log: str | None = None
    log_format: str = "text"
    grace_period: float = limits.GRACE_PERIOD
    secret_file: str | None = None
    secret: bytes | None = None
    #: UDP address where host agents' health messages arrive; needs secret_file.
    health: tuple[str, int] | None = None
    #: Twisted endpoint where other units' DAM connections arrive; needs secret_file.
    dam: str | None = None
    #: The other units of the farm, as their ``dam`` addresses ("ip:port").
    peers: tuple[tuple[str, int], ...] = ()
    #: Extra copies of each session atom on other units; None = every unit.
    replication: int | None = 1
    #: TCP port of the host agents' ``handoff`` endpoint, on each host's address
    #: (listeners with ``handoff = true`` hand connections to it); needs secret_file.
    handoff_port: int = 9904
    #: The client-facing interface the handoff forwarder reads (None: no
    #: forwarder, handoff listeners proxy every connection).
    forwarder_in: str | None = None
    #: The host-facing interface the forwarder sends from (default: forwarder_in).
    forwarder_out: str | None = None
    #: Committed flows forwarded by an nftables netdev map (the kernel fast path).
    forwarder_fast_path: bool = False
    #: The nftables table of the fence (family inet; the fast path's is ``<name>_fast``, netdev).
    fence_table: str = "nlbproxy_fence"
    #: Hosts on another segment (CIDRs): handoffs to them use the flow-id tunnel.
    tunnel_networks: tuple[str, ...] = ()
    #: The forwarder's own address, the tunnelled packets' source (hosts' agents know it).
    tunnel_source: str | None = None
    #: The router on forwarder_out towards tunnel_networks (tunnelled frames go to its MAC).
    tunnel_gateway: str | None = None
    listeners: tuple[ListenerConfig, ...]
    pools: Mapping[str, PoolConfig]
    path: str


def read_toml(path: str) -> dict[str, Any]:
    """The TOML file at *path* as ``tomllib`` reads it.

    A file that cannot be read, or is not valid UTF-8 TOML, raises a
    ``ConfigError`` naming *path*; the unit's and the agent's loaders share it.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read config file: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from exc


def load_config(path: str) -> UnitConfig:
    """Read and validate the TOML config file at *path*."""
    return parse_config(read_toml(path), path)


def parse_config(data: dict[str, Any], path: str = "<config>") -> UnitConfig:
    """Validate *data* as ``tomllib`` returns it; *path* names the file in errors
    and anchors relative file names (the working directory for ``<config>``)."""
    return _Parser(path).unit(data)


def demo_config(
    listen_port: int, backend_ports: list[int], admin_port: int
) -> UnitConfig:
    """The config of the embedded demo farm: backends on 127.0.0.1, ``/static/``
    routed to a pool of the first backend alone."""
    hosts = [format_host_port("127.0.0.1", port) for port in backend_ports]
    listener = {
        "name": "web",
        "endpoint": f"tcp:{listen_port}:interface=127.0.0.1",
        "pool": "demo",
        "route": [{"path_prefix": "/static/", "pool": "static"}],
    }
    return parse_config(
        {
            "unit": {
                "admin": f"tcp:{admin_port}:interface=127.0.0.1",
                "access_log": "-",
            },
            "listener": [listener],
            "pool": {"demo": {"hosts": hosts}, "static": {"hosts": hosts[:1]}},
        },
        "<demo>",
    )


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``"127.0.0.1:80"``, ``"[::1]:80"`` or ``"localhost:80"``.

    IP literals come back in their canonical form and names in lower case, so
    equal addresses compare equal.  Raises ``ValueError``.
    """
    host, colon, port = text.rpartition(":")
    if not colon or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"expected 'host:port' with a port 0-65535, got {text!r}")
    try:
        if host.startswith("[") and host.endswith("]"):
            host = str(ipaddress.IPv6Address(host[1:-1]))
        elif re.fullmatch(r"[0-9.]+", host):
            host = str(ipaddress.IPv4Address(host))
        elif _HOSTNAME.fullmatch(host):
            host = host.lower()
        elif ":" in host:
            raise ValueError(
                f"IPv6 addresses need brackets, as in '[::1]:80', got {text!r}"
            )
        else:
            raise ValueError(f"expected an IP address or a host name, got {host!r}")
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"invalid IP address in {text!r}: {exc}") from None
    return host, int(port)


def format_host_port(host: str, port: int) -> str:
    """The inverse of ``parse_host_port``: brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- converters: check one value and return what is stored; a wrong type
# raises TypeError, a wrong value ValueError --------------------------------

_Convert = Callable[[Any], Any]

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_TYPES = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "float",
    list: "array",
    dict: "table",
}

# Positional fields of the Twisted server endpoints a unit may listen on.
_ENDPOINT_ARGS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
}


def _expected(what: str, value: object) -> str:
    return f"expected {what}, got {_TOML_TYPES.get(type(value), type(value).__name__)}"


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(_expected("a string", value))
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(_expected("a boolean", value))
    return value


def _table(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(_expected("a table", value))
    return value


def _array(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(_expected("an array", value))
    return value


def _tables(value: object) -> dict[str, Any] | list[Any]:
    if isinstance(value, dict) or (isinstance(value, list) and value):
        return value
    raise TypeError(_expected("a table or a non-empty array of tables", value))


def _integer(low: int, high: int | None = None) -> _Convert:
    def convert(value: object) -> int:
        if type(value) is not int:  # bool is an int subclass, but not a number here
            raise TypeError(_expected("an integer", value))
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise ValueError(f"must be {bounds}, got {value}")
        return value

    return convert


def _seconds(*, zero_ok: bool = False) -> _Convert:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(_expected("a number of seconds", value))
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            raise ValueError(
                f"must be finite and {'>=' if zero_ok else '>'} 0, got {value}"
            )
        return float(value)

    return convert


def _choice(*options: str) -> _Convert:
    def convert(value: object) -> str:
        text = _string(value)
        if text not in options:
            raise ValueError(
                f"expected one of {', '.join(map(repr, options))}, got {text!r}"
            )
        return text

    return convert


def _workers(value: object) -> int:
    """``workers``: a count of processes, or ``"auto"`` for one per core."""
    if value == "auto":
        return min(limits.MAX_WORKERS, max(1, os.cpu_count() or 1))
    if isinstance(value, str):
        raise ValueError(f"expected an integer or \"auto\", got {value!r}")
    return int(_integer(1, limits.MAX_WORKERS)(value))


def _pattern(regex: re.Pattern[str], what: str) -> _Convert:
    def convert(value: object) -> str:
        text = _string(value)
        if not regex.fullmatch(text):
            raise ValueError(f"expected {what}, got {text!r}")
        return text

    return convert


_name = _pattern(_NAME, "a name of letters, digits, '_', '.' and '-'")
_token = _pattern(_TOKEN, "an HTTP token")


def _field_value(value: object) -> bytes:
    text = _string(value)
    if not _FIELD_VALUE.fullmatch(text):
        raise ValueError(f"expected printable ASCII, got {text!r}")
    return text.strip(" \t").encode("ascii")


def _host_pattern(value: object) -> str:
    host = _string(value).lower()
    if not _HOSTNAME.fullmatch(host.removeprefix("*.")):
        raise ValueError(
            f"expected a host like 'example.com' or '*.example.com' (no port), got {value!r}"
        )
    return host


def _path_prefix(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text


def _regex(value: object) -> str:
    text = _string(value)
    try:
        re.compile(text.encode())  # paths are matched as bytes
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    return text


def _methods(value: object) -> tuple[bytes, ...]:
    methods = [value] if isinstance(value, str) else value
    if not (
        isinstance(methods, list)
        and methods
        and all(isinstance(m, str) for m in methods)
    ):
        raise TypeError(_expected("a method or a non-empty array of methods", value))
    for method in methods:
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"expected an HTTP method, got {method!r}")
    return tuple(method.upper().encode("ascii") for method in methods)


def _networks(value: object) -> tuple[str, ...]:
    """CIDRs (``"10.0.0.0/8"``, ``"2001:db8::/32"``) or addresses, in canonical form."""
    items = [value] if isinstance(value, str) else value
    if not (isinstance(items, list) and items and all(isinstance(i, str) for i in items)):
        raise TypeError(_expected("a network or a non-empty array of networks", value))
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ValueError(f"expected a network such as '10.0.0.0/8', got {item!r}: {exc}") from None
    return tuple(networks)


def _header_matches(value: object) -> list[Any]:
    """A header name, a ``{ name, value }`` table, or an array of either."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, (str, dict)) for i in items):
        raise TypeError(_expected("a header name, a table or a non-empty array of them", value))
    return [{"name": i} if isinstance(i, str) else i for i in items]


def _rate(value: object) -> float:
    rate = _seconds()(value)  # a positive finite number
    if rate > limits.RATE_LIMIT_MAX_RATE:
        raise ValueError(f"must be at most {limits.RATE_LIMIT_MAX_RATE}, got {value}")
    return rate


def _replication(value: object) -> int | None:
    """Extra copies of each session atom, 0-16, or "full" (None: every unit)."""
    if value == "full":
        return None
    if type(value) is not int:
        raise TypeError(_expected('an integer or "full"', value))
    return _integer(0, 16)(value)


def _ip(value: object) -> str:
    """An IP address (no port), in canonical form."""
    text = _string(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected an IP address such as '10.0.0.2', got {text!r}") from None


def _not_unicast(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` cannot be a unicast peer's address, or None."""
    if address.is_unspecified:
        return "is unspecified"
    if address.is_multicast:
        return "is a multicast address"
    if address.is_loopback:
        return "is a loopback address"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return "is IPv4-mapped: write the IPv4 address"
    return None


def _client_families(endpoint: str) -> frozenset[int]:
    """The IP versions of the clients a TCP server endpoint accepts.

    Twisted listens on IPv6 when the interface is an IPv6 address, whatever
    the kind (``tcp`` or ``tcp6``), and a socket on ``::`` takes IPv4 clients
    too (as IPv4-mapped addresses).  Other kinds: none known.
    """
    kind, params = _endpoint_params(endpoint)
    if kind not in ("tcp", "tcp6"):
        return frozenset()
    interface = params.get("interface") or ("::" if kind == "tcp6" else "0.0.0.0")
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return frozenset()
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return frozenset({4})
        return frozenset({4, 6}) if address.is_unspecified else frozenset({6})
    return frozenset({4})


def _address(value: object) -> tuple[str, int]:
    host, port = parse_host_port(_string(value))
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to, got {value!r}")
    return host, port


def _endpoint_params(text: str) -> tuple[str, dict[str, str]]:
    """Split a Twisted server endpoint string (``\\`` escapes) into its kind and
    named fields; check the kind, and the port of TCP endpoints."""
    fields = [[""]]
    for token in re.findall(r"\\.|[:=]|[^\\:=]+", text):
        if token == ":":
            fields.append([""])
        elif token == "=":
            fields[-1].append("")
        else:
            fields[-1][-1] += token.removeprefix("\\")
    kind, *rest = fields
    names = _ENDPOINT_ARGS.get(kind[0]) if len(kind) == 1 else None
    if names is None:
        raise ValueError(
            f"expected a 'tcp:', 'tcp6:' or 'unix:' endpoint, got {text!r}"
        )
    params = dict(zip(names, (f[0] for f in rest if len(f) == 1)))
    params.update((f[0], f[1]) for f in rest if len(f) > 1)
    if kind[0] == "unix":
        if not params.get("address"):
            raise ValueError(f"unix endpoint needs a socket path, got {text!r}")
    elif (
        not re.fullmatch(r"[0-9]{1,5}", params.get("port", ""))
        or int(params["port"]) > 65535
    ):
        raise ValueError(f"port must be an integer 0-65535, got {text!r}")
    return kind[0], params


def _endpoint(value: object) -> str:
    text = _string(value)
    _endpoint_params(text)
    return text


def _admin_endpoint(value: object) -> str:
    text = _string(value)
    kind, params = _endpoint_params(text)
    if kind != "unix" and not params.get("interface"):
        raise ValueError(
            "admin endpoint must name an interface; use interface=127.0.0.1"
        )
    return text


def _soap_action(value: object) -> str:
    text = _string(value)
    if not _FIELD_VALUE.fullmatch(text):
        raise ValueError(f"expected printable ASCII, got {text!r}")
    return text


# An XML name without a colon (XML Namespaces 1.0 NCName), ASCII and beyond.
_NCNAME = re.compile(r"[^\W\d.-][\w.-]*")


def _soap_operation(value: object) -> str:
    text = _string(value)
    ns, brace, local = text[1:].partition("}") if text.startswith("{") else ("", "", text)
    if text.startswith("{") and not (brace and ns):
        raise ValueError(f"expected '{{namespace}}local' or 'local', got {text!r}")
    if not _NCNAME.fullmatch(local):
        raise ValueError(f"expected an XML local name after the namespace, got {local!r}")
    return text


_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_NFT_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,25}")


def _ifname(value: object) -> str:
    text = _string(value)
    if not _IFNAME.fullmatch(text) or text in (".", ".."):
        raise ValueError(f"expected a network interface name (1-15 of A-Z a-z 0-9 _ . -), got {text!r}")
    return text


def _nft_table(value: object) -> str:
    text = _string(value)
    if not _NFT_TABLE.fullmatch(text):
        raise ValueError(f"expected an nftables table name (a letter, then up to 25 of A-Z a-z 0-9 _), got {text!r}")
    return text


# --- the tables and their keys ------------------------------------------------

_TOP: dict[str, _Convert] = {"unit": _table, "listener": _array, "pool": _table}

_UNIT: dict[str, _Convert] = {
    "name": _name,
    "admin": _admin_endpoint,
    "admin_token_file": _string,
    "workers": _workers,
    "access_log": _string,
    "log_format": _choice("text", "json"),
    "grace_period": _seconds(zero_ok=True),
    "secret_file": _string,
    "health": lambda value: parse_host_port(_string(value)),
    "dam": _endpoint,
    "peers": lambda value: tuple(_address(item) for item in _array(value)),
    "replication": _replication,
    "handoff_port": _integer(1, 65535),
    "forwarder_in": _ifname,
    "forwarder_out": _ifname,
    "forwarder_fast_path": _boolean,
    "fence_table": _nft_table,
    "tunnel_networks": _networks,
    "tunnel_source": lambda value: _ip(value),
    "tunnel_gateway": lambda value: _ip(value),
}

_LISTENER: dict[str, _Convert] = {
    "name": _name,
    "endpoint": _endpoint,
    "protocol": _choice("http", "soap"),
    "pool": _string,
    "route": _array,
    "handoff": _boolean,
    "max_header_bytes": _integer(1024),
    "max_request_line": _integer(256),
    "max_body_bytes": _integer(0),
    "header_timeout": _seconds(),
    "keepalive_timeout": _seconds(),
    "client_timeout": _seconds(),
    "max_requests_per_connection": _integer(1),
    "max_connections": _integer(1),
    "deny": _array,
    "rate_limit": _table,
    # Envelope, Body and the operation are 3 levels; a name needs room for a
    # namespace URI.
    "max_soap_prefix": _integer(256, 16 * limits.MiB),
    "max_soap_depth": _integer(3, 1000),
    "max_soap_attributes": _integer(1, 10_000),
    "max_soap_name": _integer(64, 64 * limits.KiB),
    "max_soap_header_text": _integer(0, limits.MiB),
    "certificates": lambda value: tuple(_string(item) for item in _array(value)),
    "session_tickets": _choice("unit", "farm", "off"),
    "tls_session_timeout": _seconds(),
    "ticket_key_period": _seconds(),
}

_ROUTE: dict[str, _Convert] = {
    "pool": _string,
    "host": _host_pattern,
    "path_prefix": _path_prefix,
    "path_regex": _regex,
    "method": _methods,
    "header": _tables,
    "cookie": _tables,
    "soap_action": _soap_action,
    "soap_operation": _soap_operation,
    "plugin": _name,
    "options": _table,
}

_MATCH: dict[str, _Convert] = {"name": _token, "value": _field_value}

_DENY: dict[str, _Convert] = {
    "name": _name,
    "network": _networks,
    "method": _methods,
    "path_prefix": _path_prefix,
    "path_regex": _regex,
    "header": _header_matches,
}

_RATE_LIMIT: dict[str, _Convert] = {
    "requests_per_second": _rate,
    "burst": _integer(1, limits.RATE_LIMIT_MAX_BURST),
}

_CACHE: dict[str, _Convert] = {
    "max_bytes": _integer(1),
    "max_object_bytes": _integer(1),
    "default_ttl": _seconds(zero_ok=True),
}

_POOL: dict[str, _Convert] = {
    "hosts": _array,
    "affinity": _choice("none", "cookie", "client_ip", "session", "tls_session"),
    "session_cookie": _token,
    "affinity_cookie": _token,
    "client_ip_timeout": _seconds(),
    "connect_timeout": _seconds(),
    "server_timeout": _seconds(),
    "max_idle_per_host": _integer(0),
    "max_conns_per_host": _integer(1),
    "max_queue_per_host": _integer(0),
    "upstream_idle_timeout": _seconds(),
    "retries": _integer(0, 10),
    "fail_timeout": _seconds(),
    "balance": _choice("tokens", "percentage", "round_robin"),
    "check": _table,
    "agent_check": _table,
    "cache": _table,
    "tls": _table,
}

_BACKEND_TLS: dict[str, _Convert] = {
    "ca_file": _string,
    "server_name": lambda value: _pattern(_HOSTNAME, "a DNS name")(value).lower(),
    "verify": _boolean,
}

_CHECK: dict[str, _Convert] = {
    "path": _path_prefix,
    "interval": _seconds(),
    "rise": _integer(1, 100),
    "fall": _integer(1, 100),
    "timeout": _seconds(),
}

_AGENT_CHECK: dict[str, _Convert] = {"port": _integer(1, 65535), "interval": _seconds()}

_HOST: dict[str, _Convert] = {"address": _address, "weight": _integer(1, 256)}


def _join(where: str, key: str) -> str:
    """The dotted path of *key* in the table at *where*, quoted as TOML would."""
    segment = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{where}.{segment}" if where else segment


class _Parser:
    """Builds the dataclasses of one config document, naming its file in errors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pools: dict[str, PoolConfig] = {}
        self.secret: bytes | None = None

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def convert(self, key: str, convert: _Convert, value: object) -> Any:
        try:
            return convert(value)
        except (TypeError, ValueError) as exc:
            raise self.error(key, str(exc)) from exc

    def table(
        self,
        value: object,
        where: str,
        spec: Mapping[str, _Convert],
        required: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Check the table at *where* against *spec*; return its converted items."""
        table = self.convert(where, _table, value)
        for key in table:
            if key not in spec:
                raise self.error(_join(where, key), "unknown key")
        for key in required:
            if key not in table:
                raise self.error(_join(where, key), "missing required key")
        return {
            key: self.convert(_join(where, key), spec[key], item)
            for key, item in table.items()
        }

    def resolve(self, name: str) -> str:
        return os.path.abspath(os.path.join(os.path.dirname(self.path), name))

    def read(self, key: str, name: str) -> tuple[str, bytes]:
        """Resolve the file named at *key* and read it; it must not be empty."""
        file = self.resolve(name)
        try:
            content = Path(file).read_bytes()
        except OSError as exc:
            raise self.error(key, f"cannot read {file!r}: {exc.strerror}") from exc
        if not content.strip():
            raise self.error(key, f"{file!r} is empty")
        return file, content

    def unit(self, data: dict[str, Any]) -> UnitConfig:
        top = self.table(data, "", _TOP, required=("listener", "pool"))
        unit = self.table(top.get("unit", {}), "unit", _UNIT)
        if "admin_token_file" in unit:
            unit["admin_token_file"], token = self.read(
                "unit.admin_token_file", unit["admin_token_file"]
            )
            if not token.isascii():
                raise self.error(
                    "unit.admin_token_file", "the admin token must be ASCII"
                )
            unit["admin_token"] = token.strip().decode("ascii")
        if "secret_file" in unit:
            unit["secret_file"], unit["secret"] = self.read(
                "unit.secret_file", unit["secret_file"]
            )
            self.secret = unit["secret"]
        if unit.get("access_log", "-") != "-":
            unit["access_log"] = self.resolve(unit["access_log"])
        if "health" in unit and "secret" not in unit:
            raise self.error("unit.health", "agents' messages are authenticated: set unit.secret_file too")
        if "dam" in unit and "secret" not in unit:
            raise self.error("unit.dam", "units authenticate each other: set unit.secret_file too")
        if unit.get("peers") and "dam" not in unit:
            raise self.error("unit.peers", "peers need unit.dam, the endpoint they connect to")

        for name, pool in top["pool"].items():
            where = _join("pool", name)
            self.convert(where, _name, name)
            self.pools[name] = self.pool(name, pool, where)
        if not self.pools:
            raise self.error("pool", "at least one [pool.NAME] table is required")

        listeners: dict[str, ListenerConfig] = {}
        for i, listener in enumerate(top["listener"]):
            config = self.listener(listener, f"listener[{i}]")
            if config.name in listeners:
                raise self.error(
                    f"listener[{i}].name", f"duplicate listener name {config.name!r}"
                )
            listeners[config.name] = config
        if not listeners:
            raise self.error("listener", "at least one [[listener]] table is required")
        for i, config in enumerate(listeners.values()):
            if config.handoff and "secret" not in unit:
                raise self.error(f"listener[{i}].handoff", "handoffs go to authenticated agents: set unit.secret_file")
        self.check_tunnel(unit, listeners)
        for key in ("forwarder_in", "forwarder_out", "forwarder_fast_path", "fence_table", "tunnel_networks"):
            if key in unit and not any(config.handoff for config in listeners.values()):
                raise self.error(f"unit.{key}", "the forwarder serves handoff listeners: no listener has handoff = true")
            if key != "forwarder_in" and key in unit and "forwarder_in" not in unit:
                raise self.error(f"unit.{key}", "set unit.forwarder_in, the client-facing interface, too")
        if unit.get("workers", 1) > 1:
            self.check_workers(unit, listeners)

        return UnitConfig(
            **unit,
            listeners=tuple(listeners.values()),
            pools=MappingProxyType(self.pools),
            path=self.path,
        )

    def check_tunnel(self, unit: dict[str, Any], listeners: dict[str, ListenerConfig]) -> None:
        """tunnel_networks, tunnel_source and tunnel_gateway go together, of one
        family, and only handoff listeners of that family send to hosts in
        tunnel_networks: the tunnel rewrites a packet's addresses to the
        source's and the host's, which an IPv4 packet cannot carry when they
        are IPv6 (or the other way round)."""
        keys = ("tunnel_networks", "tunnel_source", "tunnel_gateway")
        given = [key for key in keys if key in unit]
        if not given:
            return
        for key in keys:
            if key not in unit:
                raise self.error(f"unit.{key}", f"the flow-id tunnel needs it with unit.{given[0]}")
        source = ipaddress.ip_address(unit["tunnel_source"])
        version = source.version
        # The source is where hosts' agents know a flow from, and it crosses a
        # router: it must be a routable unicast address of one family.
        reason = _not_unicast(source) or ("is link-local: it does not cross the router to the hosts"
                                          if source.is_link_local else None)
        if reason:
            raise self.error("unit.tunnel_source", f"{source} {reason}")
        gateway = ipaddress.ip_address(unit["tunnel_gateway"])
        if gateway.version != version:
            raise self.error("unit.tunnel_gateway", f"must be an IPv{version} address like unit.tunnel_source")
        reason = _not_unicast(gateway)
        if reason:
            raise self.error("unit.tunnel_gateway", f"{gateway} {reason}")
        if isinstance(gateway, ipaddress.IPv6Address) and gateway.is_link_local:
            # A router is often known by its link-local address only (a route
            # learnt from its advertisements), and that address names a
            # neighbour on one link: the one the tunnelled frames leave by.
            out = unit.get("forwarder_out") or unit.get("forwarder_in")
            if gateway.scope_id is None and out is not None:
                unit["tunnel_gateway"] = f"{gateway}%{out}"
            elif gateway.scope_id is not None and out is not None and gateway.scope_id != out:
                raise self.error("unit.tunnel_gateway", f"a link-local gateway is on the forwarder's way out, {out}, "
                                 f"not {gateway.scope_id}")
        elif isinstance(gateway, ipaddress.IPv6Address) and gateway.scope_id is not None:
            raise self.error("unit.tunnel_gateway", f"{gateway}: only a link-local address has a zone")
        networks = [ipaddress.ip_network(n) for n in unit["tunnel_networks"]]
        for network in networks:
            if network.version != version:
                raise self.error("unit.tunnel_networks",
                                 f"{network} is not IPv{version}, the family of unit.tunnel_source")
        for i, listener in enumerate(listeners.values()):
            if not listener.handoff:
                continue
            other = _client_families(listener.endpoint) - {version}
            if not other:
                continue
            for name in dict.fromkeys([listener.pool, *(r.pool for r in listener.routes if r.pool)]):
                for host in self.pools[name].hosts if name in self.pools else ():
                    try:
                        address = ipaddress.ip_address(host.host)
                    except ValueError:
                        continue  # a name: the unit resolves it, and its family is known then only
                    if any(address in n for n in networks if n.version == address.version):
                        raise self.error(f"listener[{i}].endpoint",
                                         f"takes IPv{min(other)} clients, and pool {name}'s host {host.key} is reached "
                                         f"through the IPv{version} flow-id tunnel (unit.tunnel_networks), which "
                                         f"carries IPv{version} connections only: give the listener an "
                                         f"IPv{version} address of its own")

    def check_workers(self, unit: dict[str, Any], listeners: dict[str, ListenerConfig]) -> None:
        """What a unit of several worker processes cannot do (nlbproxy.workers)."""
        for i, config in enumerate(listeners.values()):
            if config.handoff:
                # The forwarder and the handoff fence are per process.
                raise self.error(f"listener[{i}].handoff", "handoff needs a single process: set unit.workers = 1")
        if "dam" in unit:
            kind, params = _endpoint_params(unit["dam"])
            if kind == "unix" or params.get("port") == "0":
                # The other workers dial the unit's own dam address.
                raise self.error("unit.dam", "with workers > 1 the dam endpoint needs a TCP port other than 0")

    def check_pool(self, where: str, name: str) -> None:
        if name not in self.pools:
            raise self.error(_join(where, "pool"), f"unknown pool {name!r}")

    def listener(self, value: object, where: str) -> ListenerConfig:
        listener = self.table(
            value, where, _LISTENER, required=("name", "endpoint", "pool")
        )
        self.check_pool(where, listener["pool"])
        routes = listener.pop("route", [])
        listener["routes"] = tuple(
            self.route(route, f"{where}.route[{i}]") for i, route in enumerate(routes)
        )
        listener["deny"] = tuple(
            self.deny(rule, f"{where}.deny[{i}]", i) for i, rule in enumerate(listener.get("deny", []))
        )
        if "rate_limit" in listener:
            listener["rate_limit"] = self.rate_limit(listener["rate_limit"], _join(where, "rate_limit"))
        if listener.get("protocol", "http") != "soap":
            for i, route in enumerate(listener["routes"]):
                for key in ("soap_action", "soap_operation"):
                    if getattr(route, key) is not None:
                        raise self.error(
                            f"{where}.route[{i}].{key}", 'needs the listener\'s protocol = "soap"'
                        )
        if "certificates" in listener:
            listener["certificates"] = self.certificates(listener["certificates"], _join(where, "certificates"))
        elif listener.keys() & {"session_tickets", "tls_session_timeout", "ticket_key_period"}:
            raise self.error(_join(where, "certificates"), "TLS settings need certificates")
        if listener.get("session_tickets") == "farm":
            if self.secret is None:
                raise self.error(_join(where, "session_tickets"),
                                 "farm ticket keys come from the farm's secret: set unit.secret_file too")
            try:
                libssl.libssl()
            except libssl.LibSSLUnavailable as exc:
                # Never a unit that silently does not share its tickets.
                raise self.error(_join(where, "session_tickets"), f"cannot share ticket keys here: {exc}") from None
        if listener.get("handoff") and "certificates" in listener:
            # The handoff moves a TCP connection; TLS state cannot move with it.
            raise self.error(_join(where, "handoff"), "a listener that terminates TLS cannot hand off connections")
        return ListenerConfig(**listener)

    def deny(self, value: object, where: str, index: int) -> DenyConfig:
        rule = self.table(value, where, _DENY)
        if rule.keys() <= {"name"}:
            raise self.error(where, "a deny rule needs at least one of network, method, path_prefix, "
                                    "path_regex, header")
        if "header" in rule:
            rule["header"] = tuple(
                self.match(item, f"{where}.header[{i}]", True) for i, item in enumerate(rule["header"])
            )
        rule.setdefault("name", f"deny{index}")
        return DenyConfig(**rule)

    def rate_limit(self, value: object, where: str) -> RateLimitConfig:
        table = self.table(value, where, _RATE_LIMIT, required=("requests_per_second",))
        rate = table["requests_per_second"]
        return RateLimitConfig(rate, table.get("burst", max(1, math.ceil(rate))))

    def certificates(self, names: tuple[str, ...], where: str) -> tuple[str, ...]:
        """Resolve and check every certificate file now, so a bad one stops the start."""
        if not names:
            raise self.error(where, "expected at least one PEM file")
        files = []
        for i, name in enumerate(names):
            file = self.resolve(name)
            try:
                tls.read_certificate(file)
            except tls.CertificateError as exc:
                raise self.error(f"{where}[{i}]", str(exc)) from exc
            files.append(file)
        return tuple(files)

    def route(self, value: object, where: str) -> RouteConfig:
        # A plugin's route may leave the pool to the plugin.
        with_plugin = isinstance(value, dict) and "plugin" in value
        route = self.table(value, where, _ROUTE, required=() if with_plugin else ("pool",))
        if route.keys() == {"pool"}:
            raise self.error(where, "route matches everything; use the listener's pool")
        if "pool" in route:
            self.check_pool(where, route["pool"])
        if "plugin" in route:
            route["classifier"] = self.plugin(route["plugin"], route.setdefault("options", {}), where)
            route["options"] = MappingProxyType(route["options"])
        elif "options" in route:
            raise self.error(_join(where, "options"), "options are for a plugin: set plugin too")
        for kind in ("header", "cookie"):
            if kind in route:
                route[kind] = self.matches(
                    route[kind], _join(where, kind), lower=kind == "header"
                )
        return RouteConfig(**route)

    def plugin(self, name: str, options: dict[str, Any], where: str) -> Any:
        """The classifier routing plugin *name* makes of *options* (see :mod:`nlbproxy.plugin`)."""
        # Imported here: plugins import routing, which imports this module.
        from nlbproxy import plugin

        try:
            return plugin.configure(name, options, frozenset(self.pools))
        except plugin.PluginError as exc:
            raise self.error(_join(where, "plugin"), str(exc)) from exc
        except plugin.OptionError as exc:
            key = _join(where, "options")
            for part in exc.key:
                key = _join(key, part)
            raise self.error(key, exc.reason) from exc

    def matches(
        self, value: dict[str, Any] | list[Any], where: str, *, lower: bool
    ) -> tuple[HeaderMatch, ...]:
        """One table or an array of them; header names are case-insensitive, cookie names are not."""
        if isinstance(value, dict):
            return (self.match(value, where, lower),)
        return tuple(
            self.match(item, f"{where}[{i}]", lower) for i, item in enumerate(value)
        )

    def match(self, value: object, where: str, lower: bool) -> HeaderMatch:
        match = self.table(value, where, _MATCH, required=("name",))
        name = match["name"].encode("ascii")
        return HeaderMatch(name.lower() if lower else name, match.get("value"))

    def pool(self, name: str, value: object, where: str) -> PoolConfig:
        pool = self.table(value, where, _POOL)
        hosts: dict[str, HostConfig] = {}
        for i, entry in enumerate(pool.pop("hosts", [])):
            key = f"{where}.hosts[{i}]"
            host = self.host(entry, key)
            if host.key in hosts:
                raise self.error(key, f"duplicate host {host.key!r}")
            hosts[host.key] = host
        if "check" in pool:
            pool["check"] = CheckConfig(**self.table(pool["check"], _join(where, "check"), _CHECK))
        if "agent_check" in pool:
            agent_check = self.table(pool["agent_check"], _join(where, "agent_check"), _AGENT_CHECK, ("port",))
            pool["agent_check"] = AgentCheckConfig(**agent_check)
        if "cache" in pool:
            pool["cache"] = self.cache(pool["cache"], _join(where, "cache"))
        if "tls" in pool:
            pool["tls"] = self.backend_tls(pool["tls"], _join(where, "tls"))
        return PoolConfig(name, tuple(hosts.values()), **pool)

    def cache(self, value: object, where: str) -> CacheConfig:
        cache = CacheConfig(**self.table(value, where, _CACHE))
        if cache.max_object_bytes > cache.max_bytes:
            raise self.error(_join(where, "max_object_bytes"),
                             f"must not exceed max_bytes ({cache.max_bytes}), got {cache.max_object_bytes}")
        return cache

    def backend_tls(self, value: object, where: str) -> BackendTLSConfig:
        config = self.table(value, where, _BACKEND_TLS)
        if "ca_file" in config:
            file = config["ca_file"] = self.resolve(config["ca_file"])
            try:
                tls.read_ca_file(file)
            except tls.CertificateError as exc:
                raise self.error(_join(where, "ca_file"), str(exc)) from exc
        return BackendTLSConfig(**config)

    def host(self, entry: object, key: str) -> HostConfig:
        """An ``"ip:port"`` string or an ``{ address, weight }`` table."""
        if isinstance(entry, dict):
            host = self.table(entry, key, _HOST, required=("address",))
            return HostConfig(*host.pop("address"), **host)
        return HostConfig(*self.convert(key, _address, entry))
