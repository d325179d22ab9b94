# -*- test-case-name: tests.test_agent_config -*-
"""Load and validate a host agent's TOML config file (a contract).

::

    [agent]
    name = "web-7"                      # required: the host's name; its id on the wire
    units = ["10.0.0.1:9903"]           # required: the units' health addresses (IP literals)
    api = "tcp:9902:interface=127.0.0.1"  # the local HTTP API; must name an interface
    secret_file = "health.key"          # required: shared with the units, raw bytes

    [[app]]
    name = "web"                        # the pool the endpoint serves
    endpoint = "10.0.0.7:8080"          # "ip:port" as the units know the host
    capacity = 50                       # 0-99
    check = { path = "/healthz", interval = 1.0, rise = 2, fall = 2, timeout = 1.0 }

Connection handoff (the agent receives live client connections from the
units and delivers them to the application)::

    [agent]
    handoff = "tcp:9904:interface=10.0.0.7"  # where units hand connections over

    [[app]]
    deliver = "bridge"                  # or "adopt"
    bridge_to = "127.0.0.1:8080"        # bridge: the unmodified local server (or "unix:PATH", cheaper)
    proxy_protocol = true               # bridge: send a PROXY header (true = v1, "v1", "v2")
    adopt_path = "/run/web/adopt.sock"  # adopt: the application's Unix socket

Errors are
:class:`nlbproxy.config.ConfigError`, one line naming the file, the dotted key
and the reason, as for a unit's file; relative file names are relative to the
config file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from nlbproxy.config import (
    _CHECK,
    ConfigError,
    _Convert,
    _endpoint_params,
    _integer,
    _join,
    _choice,
    _endpoint,
    _ifname,
    _name,
    _Parser,
    _string,
    _table,
    format_host_port,
    parse_host_port,
    read_toml,
)
from nlbproxy.health.messages import RowKey
from nlbproxy.health.table import MAX_ROWS

__all__ = [
    "DEFAULT_API",
    "DEFAULT_CAPACITY",
    "AgentConfig",
    "AppConfig",
    "CheckConfig",
    "ConfigError",
    "load_agent_config",
    "parse_agent_config",
]

DEFAULT_API = "tcp:9902:interface=127.0.0.1"
DEFAULT_CAPACITY = 50
#: Units one agent reports to; each gets every heartbeat.
MAX_UNITS = 64


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """The agent's HTTP check of one endpoint (``check = {...}`` of an ``[[app]]``)."""

    path: str = "/healthz"
    interval: float = 1.0
    rise: int = 2  # consecutive passes that bring a failed endpoint up
    fall: int = 2  # consecutive failures that take a passing endpoint down
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class AppConfig:
    """One ``[[app]]``: an endpoint of an application on this host."""

    name: str
    host: str
    port: int
    capacity: int = DEFAULT_CAPACITY
    check: CheckConfig | None = None
    #: How handed-off connections reach the application: "bridge", "adopt",
    #: or None (the app takes no handoffs).
    deliver: str | None = None
    #: The local server bridged connections go to: (ip, port), or the path of
    #: its Unix socket (cheaper: no second TCP stack on the way).
    bridge_to: tuple[str, int] | str | None = None
    #: PROXY protocol version written first on bridged connections; 0 = none.
    proxy_protocol: int = 0
    adopt_path: str | None = None

    @property
    def endpoint(self) -> str:
        """``"ip:port"`` (``"[v6]:port"``), canonical, as units key the host."""
        return format_host_port(self.host, self.port)

    @property
    def key(self) -> RowKey:
        return RowKey(self.name, self.endpoint)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """A host agent: ``[agent]`` and its ``[[app]]`` endpoints."""

    name: str
    units: tuple[tuple[str, int], ...]
    api: str = DEFAULT_API
    secret_file: str
    secret: bytes
    apps: tuple[AppConfig, ...]
    path: str
    handoff: str | None = None
    #: The interface tunnelled handoff packets arrive on (units on another
    #: segment): the agent runs the flow-id tunnel's end there.
    tunnel_interface: str | None = None

    @property
    def udp_interface(self) -> str:
        """The address to bind the health socket to: any, of the units' family."""
        return "::" if ":" in self.units[0][0] else "0.0.0.0"


def load_agent_config(path: str) -> AgentConfig:
    """Read and validate the agent's TOML config file at ``path``."""
    return parse_agent_config(read_toml(path), path)


def parse_agent_config(data: dict[str, Any], path: str = "<config>") -> AgentConfig:
    """Validate ``data`` as ``tomllib`` returns it; ``path`` names the file in
    errors and anchors the secret file's relative name."""
    return _AgentParser(path).agent(data)


# --- converters ------------------------------------------------------------------


def _unit_address(value: object) -> tuple[str, int]:
    host, port = parse_host_port(_string(value))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address and port such as '10.0.0.1:9903', got {value!r}") from None
    if port == 0:
        raise ValueError(f"port 0 cannot be sent to, got {value!r}")
    return host, port


def _endpoint_address(value: object) -> tuple[str, int]:
    host, port = parse_host_port(_string(value))
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to, got {value!r}")
    return host, port


def _bridge_target(value: object) -> tuple[str, int] | str:
    """``"ip:port"``, or ``"unix:PATH"`` for a server's Unix socket."""
    text = _string(value)
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError("expected a Unix socket's path after 'unix:'")
        return path  # relative to the config file, as other file names (AgentParser.app)
    return _endpoint_address(text)


def _api_endpoint(value: object) -> str:
    text = _string(value)
    kind, params = _endpoint_params(text)
    if kind != "unix" and not params.get("interface"):
        raise ValueError("api endpoint must name an interface; use interface=127.0.0.1")
    return text


def _proxy_protocol(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if value in ("v1", "v2"):
        return int(str(value)[1])
    raise ValueError(f"expected true, false, 'v1' or 'v2', got {value!r}")


def _apps(value: object) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise TypeError("expected at least one [[app]] table")
    return value


_TOP: dict[str, _Convert] = {"agent": _table, "app": _apps}

_AGENT: dict[str, _Convert] = {
    "name": _name,
    "units": lambda value: value,  # checked one by one below
    "api": _api_endpoint,
    "secret_file": _string,
    "handoff": _endpoint,
    "tunnel_interface": _ifname,
}

_APP: dict[str, _Convert] = {
    "name": _name,
    "endpoint": _endpoint_address,
    "capacity": _integer(0, 99),
    "check": _table,
    "deliver": _choice("adopt", "bridge"),
    "bridge_to": _bridge_target,
    "proxy_protocol": _proxy_protocol,
    "adopt_path": _string,
}


class _AgentParser(_Parser):
    def agent(self, data: dict[str, Any]) -> AgentConfig:
        top = self.table(data, "", _TOP, required=("agent", "app"))
        agent = self.table(top["agent"], "agent", _AGENT, required=("name", "units", "secret_file"))
        agent["units"] = self.units(agent["units"])
        agent["secret_file"], agent["secret"] = self.read("agent.secret_file", agent["secret_file"])

        apps: dict[RowKey, AppConfig] = {}
        for i, value in enumerate(top["app"]):
            where = f"app[{i}]"
            app = self.app(value, where)
            if app.key in apps:
                raise self.error(f"{where}.endpoint", f"duplicate endpoint {app.endpoint!r} of app {app.name!r}")
            apps[app.key] = app
        if len(apps) > MAX_ROWS:
            raise self.error("app", f"at most {MAX_ROWS} [[app]] tables, got {len(apps)}")
        if any(app.deliver for app in apps.values()) and "handoff" not in agent:
            raise self.error("agent.handoff", "required when an [[app]] has deliver")
        if "tunnel_interface" in agent and "handoff" not in agent:
            raise self.error("agent.tunnel_interface", "the tunnel carries handed-off connections: set agent.handoff")
        return AgentConfig(**agent, apps=tuple(apps.values()), path=self.path)

    def units(self, value: object) -> tuple[tuple[str, int], ...]:
        if not isinstance(value, list) or not value:
            raise self.error("agent.units", "expected a non-empty array of 'ip:port' strings")
        if len(value) > MAX_UNITS:
            raise self.error("agent.units", f"at most {MAX_UNITS} units, got {len(value)}")
        units: list[tuple[str, int]] = []
        for i, item in enumerate(value):
            address = self.convert(f"agent.units[{i}]", _unit_address, item)
            if address in units:
                raise self.error(f"agent.units[{i}]", f"duplicate unit {format_host_port(*address)!r}")
            units.append(address)
        if len({":" in host for host, _ in units}) > 1:
            # One socket sends to every unit, and it has one address family.
            raise self.error("agent.units", "mixes IPv4 and IPv6 addresses; use one family")
        return tuple(units)

    def app(self, value: object, where: str) -> AppConfig:
        app = self.table(value, where, _APP, required=("name", "endpoint"))
        host, port = app.pop("endpoint")
        if "check" in app:
            app["check"] = CheckConfig(**self.table(app["check"], _join(where, "check"), _CHECK))
        deliver = app.get("deliver")
        needs = {"bridge": "bridge_to", "adopt": "adopt_path"}
        if deliver is not None and needs[deliver] not in app:
            raise self.error(_join(where, needs[deliver]), f"required with deliver = {deliver!r}")
        for key, mode in (("bridge_to", "bridge"), ("proxy_protocol", "bridge"), ("adopt_path", "adopt")):
            if key in app and deliver != mode:
                raise self.error(_join(where, key), f"only with deliver = {mode!r}")
        if "adopt_path" in app:
            app["adopt_path"] = self.resolve(app["adopt_path"])
        if isinstance(app.get("bridge_to"), str):
            app["bridge_to"] = self.resolve(app["bridge_to"])
        return AppConfig(host=host, port=port, **app)

