"""Tests for nlbproxy.config: loading, validation errors and host:port parsing."""

from __future__ import annotations

import dataclasses
import operator
import os
import shutil
import tempfile
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import limits
from nlbproxy.config import (
    ConfigError,
    HeaderMatch,
    HostConfig,
    ListenerConfig,
    PoolConfig,
    RouteConfig,
    UnitConfig,
    demo_config,
    format_host_port,
    load_config,
    parse_config,
    parse_host_port,
)

PATH = "/etc/nlbproxy/unit.toml"
DELETE = object()


MINIMAL = """
[[listener]]
name = "web"
endpoint = "tcp:8080"
pool = "web"

[pool.web]
"""

FULL = r"""
[unit]
name = "edge-1"
admin = 'tcp6:9901:interface=\:\:1'
admin_token_file = "token"
workers = 1
access_log = "logs/access.log"
log_format = "json"
grace_period = 0
secret_file = "secret"

[[listener]]
name = "web"
endpoint = "tcp:8080:interface=127.0.0.1"
protocol = "http"
pool = "web"
handoff = false
max_header_bytes = 32768
max_request_line = 4096
max_body_bytes = 0
header_timeout = 5
keepalive_timeout = 7.5
client_timeout = 30
max_requests_per_connection = 100
max_connections = 500

[[listener.route]]
pool = "api"
host = "*.Example.COM"
path_regex = '^/v[0-9]+/'
method = ["get", "HEAD"]
header = { name = "X-Tenant", value = " acme\t" }
cookie = [{ name = "Beta", value = "1" }, { name = "lang" }]

[[listener.route]]
pool = "static"
path_prefix = "/static/"
method = "GET"

[[listener]]
name = "internal"
endpoint = "unix:/run/nlb.sock"
pool = "api"

[pool.web]
hosts = [
    "10.0.0.1:80",
    "[2001:DB8::1]:8080",
    { address = "Backend.Local:80", weight = 5 },
]
affinity = "cookie"
affinity_cookie = "SRV"
client_ip_timeout = 600
connect_timeout = 1
server_timeout = 20
max_idle_per_host = 0
max_conns_per_host = 10
max_queue_per_host = 0
upstream_idle_timeout = 4
retries = 0
fail_timeout = 3

[pool.api]
hosts = []
affinity = "client_ip"
client_ip_timeout = 120

[pool.static]
"""


def valid() -> dict[str, Any]:
    """A small valid document, as tomllib returns it."""
    return {
        "listener": [
            {
                "name": "web",
                "endpoint": "tcp:8080:interface=127.0.0.1",
                "pool": "web",
                "route": [
                    {
                        "pool": "static",
                        "path_prefix": "/static/",
                        "header": {"name": "X-Tenant"},
                    }
                ],
            }
        ],
        "pool": {
            "web": {
                "hosts": ["127.0.0.1:8001", {"address": "[::1]:8002", "weight": 3}]
            },
            "static": {},
        },
    }


def edited(where: tuple[str | int, ...], value: object) -> dict[str, Any]:
    """``valid()`` with the item at *where* set to *value* (removed for DELETE)."""
    data = valid()
    *parents, last = where
    target: Any = data
    for step in parents:
        target = target[step]
    if value is DELETE:
        del target[last]
    elif isinstance(target, list) and last == len(target):
        target.append(value)
    else:
        target[last] = value
    return data


LISTENER = ("listener", 0)
ROUTE = (*LISTENER, "route", 0)
WEB = ("pool", "web")
NO_INTERFACE = "admin endpoint must name an interface; use interface=127.0.0.1"

# (where, value, expected key, expected reason)
ERRORS: list[tuple[tuple[str | int, ...], object, str, str]] = [
    # unknown keys, at every level
    (("bogus",), 1, "bogus", "unknown key"),
    (("unit",), {"bogus": 1}, "unit.bogus", "unknown key"),
    ((*LISTENER, "bogus"), 1, "listener[0].bogus", "unknown key"),
    ((*ROUTE, "bogus"), 1, "listener[0].route[0].bogus", "unknown key"),
    (
        (*ROUTE, "header", "bogus"),
        1,
        "listener[0].route[0].header.bogus",
        "unknown key",
    ),
    ((*WEB, "bogus"), 1, "pool.web.bogus", "unknown key"),
    ((*WEB, "hosts", 1, "bogus"), 1, "pool.web.hosts[1].bogus", "unknown key"),
    ((*WEB, "a.b"), 1, 'pool.web."a.b"', "unknown key"),
    # wrong types
    (("unit",), 1, "unit", "expected a table, got integer"),
    (("listener",), {}, "listener", "expected an array, got table"),
    ((*LISTENER,), "web", "listener[0]", "expected a table, got string"),
    (WEB, [], "pool.web", "expected a table, got array"),
    (
        (*LISTENER, "max_body_bytes"),
        True,
        "listener[0].max_body_bytes",
        "expected an integer, got boolean",
    ),
    (
        (*LISTENER, "max_connections"),
        1.5,
        "listener[0].max_connections",
        "expected an integer, got float",
    ),
    (
        (*LISTENER, "header_timeout"),
        "10s",
        "listener[0].header_timeout",
        "expected a number of seconds, got string",
    ),
    (
        (*LISTENER, "header_timeout"),
        False,
        "listener[0].header_timeout",
        "expected a number of seconds, got boolean",
    ),
    (
        (*LISTENER, "handoff"),
        "no",
        "listener[0].handoff",
        "expected a boolean, got string",
    ),
    ((*LISTENER, "name"), 7, "listener[0].name", "expected a string, got integer"),
    (
        (*ROUTE, "method"),
        ["GET", 1],
        "listener[0].route[0].method",
        "expected a method or a non-empty array of methods, got array",
    ),
    (
        (*ROUTE, "cookie"),
        "beta",
        "listener[0].route[0].cookie",
        "expected a table or a non-empty array of tables, got string",
    ),
    ((*WEB, "hosts", 0), 8001, "pool.web.hosts[0]", "expected a string, got integer"),
    # out of range
    (
        (*LISTENER, "max_header_bytes"),
        1023,
        "listener[0].max_header_bytes",
        "must be >= 1024, got 1023",
    ),
    (
        (*LISTENER, "max_request_line"),
        255,
        "listener[0].max_request_line",
        "must be >= 256, got 255",
    ),
    (
        (*LISTENER, "max_body_bytes"),
        -1,
        "listener[0].max_body_bytes",
        "must be >= 0, got -1",
    ),
    (
        (*LISTENER, "keepalive_timeout"),
        0,
        "listener[0].keepalive_timeout",
        "must be finite and > 0, got 0",
    ),
    (
        (*LISTENER, "client_timeout"),
        float("inf"),
        "listener[0].client_timeout",
        "must be finite and > 0, got inf",
    ),
    (
        (*LISTENER, "max_requests_per_connection"),
        0,
        "listener[0].max_requests_per_connection",
        "must be >= 1, got 0",
    ),
    ((*WEB, "retries"), 11, "pool.web.retries", "must be between 0 and 10, got 11"),
    (
        (*WEB, "max_conns_per_host"),
        0,
        "pool.web.max_conns_per_host",
        "must be >= 1, got 0",
    ),
    (
        (*WEB, "fail_timeout"),
        -1.0,
        "pool.web.fail_timeout",
        "must be finite and > 0, got -1.0",
    ),
    (
        (*WEB, "hosts", 1, "weight"),
        257,
        "pool.web.hosts[1].weight",
        "must be between 1 and 256, got 257",
    ),
    (
        (*WEB, "hosts", 1, "weight"),
        0,
        "pool.web.hosts[1].weight",
        "must be between 1 and 256, got 0",
    ),
    (
        ("unit",),
        {"grace_period": -1},
        "unit.grace_period",
        "must be finite and >= 0, got -1",
    ),
    (("unit",), {"workers": 0}, "unit.workers", "must be between 1 and 64, got 0"),
    (("unit",), {"workers": "many"}, "unit.workers", "expected an integer or \"auto\", got 'many'"),
    (
        (*WEB, "hosts", 0),
        "127.0.0.1:0",
        "pool.web.hosts[0]",
        "port 0 cannot be connected to, got '127.0.0.1:0'",
    ),
    # missing required keys
    (("listener",), DELETE, "listener", "missing required key"),
    (("pool",), DELETE, "pool", "missing required key"),
    ((*LISTENER, "name"), DELETE, "listener[0].name", "missing required key"),
    ((*LISTENER, "endpoint"), DELETE, "listener[0].endpoint", "missing required key"),
    ((*LISTENER, "pool"), DELETE, "listener[0].pool", "missing required key"),
    ((*ROUTE, "pool"), DELETE, "listener[0].route[0].pool", "missing required key"),
    (
        (*ROUTE, "header", "name"),
        DELETE,
        "listener[0].route[0].header.name",
        "missing required key",
    ),
    (
        (*WEB, "hosts", 1, "address"),
        DELETE,
        "pool.web.hosts[1].address",
        "missing required key",
    ),
    (("listener",), [], "listener", "at least one [[listener]] table is required"),
    (("pool",), {}, "pool", "at least one [pool.NAME] table is required"),
    # references and duplicates
    ((*LISTENER, "pool"), "api", "listener[0].pool", "unknown pool 'api'"),
    ((*ROUTE, "pool"), "api", "listener[0].route[0].pool", "unknown pool 'api'"),
    (
        ("listener", 1),
        {"name": "web", "endpoint": "tcp:8081", "pool": "web"},
        "listener[1].name",
        "duplicate listener name 'web'",
    ),
    (
        (*WEB, "hosts", 2),
        "[0:0::1]:8002",
        "pool.web.hosts[2]",
        "duplicate host '[::1]:8002'",
    ),
    # names and matches
    (
        (*LISTENER, "name"),
        "web 1",
        "listener[0].name",
        "expected a name of letters, digits, '_', '.' and '-', got 'web 1'",
    ),
    (
        ("pool", "we b"),
        {},
        'pool."we b"',
        "expected a name of letters, digits, '_', '.' and '-', got 'we b'",
    ),
    (
        ROUTE,
        {"pool": "static"},
        "listener[0].route[0]",
        "route matches everything; use the listener's pool",
    ),
    (
        (*ROUTE, "path_regex"),
        "(",
        "listener[0].route[0].path_regex",
        "invalid regular expression: missing ), unterminated subpattern at position 0",
    ),
    (
        (*ROUTE, "path_prefix"),
        "static/",
        "listener[0].route[0].path_prefix",
        "must start with '/', got 'static/'",
    ),
    (
        (*ROUTE, "host"),
        "example.com:80",
        "listener[0].route[0].host",
        "expected a host like 'example.com' or '*.example.com' (no port), got 'example.com:80'",
    ),
    (
        (*ROUTE, "method"),
        "GET /",
        "listener[0].route[0].method",
        "expected an HTTP method, got 'GET /'",
    ),
    (
        (*ROUTE, "header"),
        [{"name": "X-A"}, {"name": "X B"}],
        "listener[0].route[0].header[1].name",
        "expected an HTTP token, got 'X B'",
    ),
    (
        (*ROUTE, "header"),
        {"name": "X-A", "value": "a\nb"},
        "listener[0].route[0].header.value",
        "expected printable ASCII, got 'a\\nb'",
    ),
    (
        (*WEB, "affinity_cookie"),
        "a;b",
        "pool.web.affinity_cookie",
        "expected an HTTP token, got 'a;b'",
    ),
    (
        ("unit",),
        {"log_format": "xml"},
        "unit.log_format",
        "expected one of 'text', 'json', got 'xml'",
    ),
    (
        (*WEB, "hosts", 0),
        "::1:80",
        "pool.web.hosts[0]",
        "IPv6 addresses need brackets, as in '[::1]:80', got '::1:80'",
    ),
    # endpoints
    (
        (*LISTENER, "endpoint"),
        "ssl:443",
        "listener[0].endpoint",
        "expected a 'tcp:', 'tcp6:' or 'unix:' endpoint, got 'ssl:443'",
    ),
    (
        (*LISTENER, "endpoint"),
        "tcp:http",
        "listener[0].endpoint",
        "port must be an integer 0-65535, got 'tcp:http'",
    ),
    (
        (*LISTENER, "endpoint"),
        r"tcp6:65536:interface=\:\:1",
        "listener[0].endpoint",
        r"port must be an integer 0-65535, got 'tcp6:65536:interface=\\:\\:1'",
    ),
    (
        (*LISTENER, "endpoint"),
        "unix:",
        "listener[0].endpoint",
        "unix endpoint needs a socket path, got 'unix:'",
    ),
    (("unit",), {"admin": "tcp:9901"}, "unit.admin", NO_INTERFACE),
    (("unit",), {"admin": "tcp6:port=9901:interface="}, "unit.admin", NO_INTERFACE),
    # features of a later release
    (
        (*LISTENER, "protocol"),
        "ftp",
        "listener[0].protocol",
        "expected one of 'http', 'soap', got 'ftp'",
    ),
    (
        (*LISTENER, "handoff"),
        True,
        "listener[0].handoff",
        "handoffs go to authenticated agents: set unit.secret_file",
    ),
    (("unit",), {"handoff_port": 0}, "unit.handoff_port", "must be between 1 and 65535, got 0"),
    (
        ("unit",),
        {"forwarder_in": "eth0"},
        "unit.forwarder_in",
        "the forwarder serves handoff listeners: no listener has handoff = true",
    ),
    (
        ("unit",),
        {"forwarder_in": "eth 0"},
        "unit.forwarder_in",
        "expected a network interface name (1-15 of A-Z a-z 0-9 _ . -), got 'eth 0'",
    ),
    (
        ("unit",),
        {"forwarder_out": "a-very-long-interface"},
        "unit.forwarder_out",
        "expected a network interface name (1-15 of A-Z a-z 0-9 _ . -), got 'a-very-long-interface'",
    ),
    (("unit",), {"forwarder_fast_path": "yes"}, "unit.forwarder_fast_path", "expected a boolean, got string"),
    (
        ("unit",),
        {"fence_table": "nlb-fence"},
        "unit.fence_table",
        "expected an nftables table name (a letter, then up to 25 of A-Z a-z 0-9 _), got 'nlb-fence'",
    ),
    (
        (*WEB, "affinity"),
        "sticky",
        "pool.web.affinity",
        "expected one of 'none', 'cookie', 'client_ip', 'session', 'tls_session', got 'sticky'",
    ),
    (
        ("unit",),
        {"dam": "tcp:9800"},
        "unit.dam",
        "units authenticate each other: set unit.secret_file too",
    ),
    (
        ("unit",),
        {"peers": ["127.0.0.1:9800"]},
        "unit.peers",
        "peers need unit.dam, the endpoint they connect to",
    ),
    (
        ("unit",),
        {"replication": "all"},
        "unit.replication",
        'expected an integer or "full", got string',
    ),
    (
        (*WEB, "check"),
        {"path": "healthz"},
        "pool.web.check.path",
        "must start with '/', got 'healthz'",
    ),
    (
        (*WEB, "check"),
        {"path": "/healthz", "every": 2.0},
        "pool.web.check.every",
        "unknown key",
    ),
    (
        (*WEB, "agent_check"),
        {"interval": 2.0},
        "pool.web.agent_check.port",
        "missing required key",
    ),
    (
        (*WEB, "balance"),
        "leastconn",
        "pool.web.balance",
        "expected one of 'tokens', 'percentage', 'round_robin', got 'leastconn'",
    ),
    (
        ("unit",),
        {"health": "127.0.0.1:9900"},
        "unit.health",
        "agents' messages are authenticated: set unit.secret_file too",
    ),
]


class ConfigTestCase(SynchronousTestCase):
    def assertConfigError(
        self, error: ConfigError, path: str, key: str, reason: str
    ) -> None:
        """*error* names *path*, *key* and *reason*, on one line."""
        self.assertEqual((error.path, error.key, error.reason), (path, key, reason))
        where = f"{path}: {key}" if key else path
        self.assertEqual(str(error), f"{where}: {reason}")
        self.assertNotIn("\n", str(error))


class ValidationTests(ConfigTestCase):
    """parse_config accepts valid documents and names the key of every error."""

    def test_valid(self) -> None:
        config = parse_config(valid(), PATH)
        self.assertEqual(config.path, PATH)
        self.assertEqual(
            config.listeners,
            (
                ListenerConfig(
                    "web",
                    "tcp:8080:interface=127.0.0.1",
                    "web",
                    routes=(
                        RouteConfig(
                            "static",
                            path_prefix="/static/",
                            header=(HeaderMatch(b"x-tenant"),),
                        ),
                    ),
                ),
            ),
        )
        self.assertEqual(
            dict(config.pools),
            {
                "web": PoolConfig(
                    "web", (HostConfig("127.0.0.1", 8001), HostConfig("::1", 8002, 3))
                ),
                "static": PoolConfig("static"),
            },
        )

    def test_defaults(self) -> None:
        """Keys left out take the defaults of nlbproxy.limits."""
        config = parse_config(valid(), PATH)
        listener, pool = config.listeners[0], config.pools["static"]
        self.assertEqual(
            (config.name, config.admin, config.workers, config.log_format),
            ("nlbproxy", "tcp:9901:interface=127.0.0.1", 1, "text"),
        )
        self.assertEqual(config.grace_period, limits.GRACE_PERIOD)
        self.assertIsNone(config.access_log)
        self.assertIsNone(config.admin_token)
        self.assertIsNone(config.secret)
        self.assertEqual(listener.protocol, "http")
        self.assertFalse(listener.handoff)
        self.assertEqual(listener.max_header_bytes, limits.MAX_HEADER_BYTES)
        self.assertEqual(listener.header_timeout, limits.HEADER_TIMEOUT)
        self.assertEqual(pool.hosts, ())
        self.assertEqual((pool.affinity, pool.affinity_cookie), ("none", "NLBAFF"))
        self.assertEqual(pool.retries, limits.RETRIES)
        self.assertEqual(pool.connect_timeout, limits.CONNECT_TIMEOUT)

    def test_errors(self) -> None:
        for where, value, key, reason in ERRORS:
            with self.subTest(key=key, value=value):
                error = self.assertRaises(
                    ConfigError, parse_config, edited(where, value), PATH
                )
                self.assertConfigError(error, PATH, key, reason)

    def test_default_path(self) -> None:
        """Without a path, errors name ``<config>``."""
        error = self.assertRaises(ConfigError, parse_config, edited(("bogus",), 1))
        self.assertEqual(str(error), "<config>: bogus: unknown key")

    def test_ipv6_hosts(self) -> None:
        """IPv6 hosts are stored without brackets in canonical form; their key has brackets."""
        config = parse_config(
            edited((*WEB, "hosts"), ["[2001:DB8:0::1]:80", "[::ffff:7f00:1]:81"]), PATH
        )
        hosts = config.pools["web"].hosts
        self.assertEqual(
            [(h.host, h.port) for h in hosts],
            [("2001:db8::1", 80), ("::ffff:7f00:1", 81)],
        )
        self.assertEqual(
            [h.key for h in hosts], ["[2001:db8::1]:80", "[::ffff:7f00:1]:81"]
        )

    def test_weights(self) -> None:
        """Hosts given as tables carry a weight; strings weigh 1."""
        hosts = [
            "10.0.0.1:80",
            {"address": "10.0.0.2:80", "weight": 256},
            {"address": "Backend.Local:80"},
        ]
        config = parse_config(edited((*WEB, "hosts"), hosts), PATH)
        self.assertEqual(
            config.pools["web"].hosts,
            (
                HostConfig("10.0.0.1", 80),
                HostConfig("10.0.0.2", 80, 256),
                HostConfig("backend.local", 80),
            ),
        )

    def test_endpoints(self) -> None:
        """Escaped colons, keyword ports and unix sockets are valid endpoints."""
        for endpoint in (
            r"tcp6:8080:interface=\:\:1",
            "tcp:port=0",
            "unix:/run/nlb.sock",
        ):
            with self.subTest(endpoint=endpoint):
                config = parse_config(edited((*LISTENER, "endpoint"), endpoint), PATH)
                self.assertEqual(config.listeners[0].endpoint, endpoint)
        for admin in ("tcp:9901:127.0.0.1", "unix:/run/nlb-admin.sock"):
            with self.subTest(admin=admin):
                self.assertEqual(
                    parse_config(edited(("unit",), {"admin": admin}), PATH).admin, admin
                )

    def test_frozen(self) -> None:
        config = parse_config(valid(), PATH)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, config, "name", "x")
        self.assertRaises(
            TypeError, operator.setitem, config.pools, "x", config.pools["web"]
        )


class FileTests(ConfigTestCase):
    """load_config reads files; file names in a config are relative to it."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, name: str, content: str | bytes) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        return path

    def test_full_file(self) -> None:
        """Every key of a full file lands in its field."""
        self.write("token", "s3cret-token\n")
        self.write("secret", b"\x00key\n")
        path = self.write("unit.toml", FULL)
        self.assertEqual(
            load_config(path),
            UnitConfig(
                name="edge-1",
                admin=r"tcp6:9901:interface=\:\:1",
                admin_token_file=os.path.join(self.dir, "token"),
                admin_token="s3cret-token",
                workers=1,
                access_log=os.path.join(self.dir, "logs", "access.log"),
                log_format="json",
                grace_period=0.0,
                secret_file=os.path.join(self.dir, "secret"),
                secret=b"\x00key\n",
                listeners=(
                    ListenerConfig(
                        name="web",
                        endpoint="tcp:8080:interface=127.0.0.1",
                        pool="web",
                        protocol="http",
                        routes=(
                            RouteConfig(
                                pool="api",
                                host="*.example.com",
                                path_regex="^/v[0-9]+/",
                                method=(b"GET", b"HEAD"),
                                header=(HeaderMatch(b"x-tenant", b"acme"),),
                                cookie=(
                                    HeaderMatch(b"Beta", b"1"),
                                    HeaderMatch(b"lang"),
                                ),
                            ),
                            RouteConfig(
                                pool="static", path_prefix="/static/", method=(b"GET",)
                            ),
                        ),
                        handoff=False,
                        max_header_bytes=32768,
                        max_request_line=4096,
                        max_body_bytes=0,
                        header_timeout=5.0,
                        keepalive_timeout=7.5,
                        client_timeout=30.0,
                        max_requests_per_connection=100,
                        max_connections=500,
                    ),
                    ListenerConfig("internal", "unix:/run/nlb.sock", "api"),
                ),
                pools={
                    "web": PoolConfig(
                        name="web",
                        hosts=(
                            HostConfig("10.0.0.1", 80),
                            HostConfig("2001:db8::1", 8080),
                            HostConfig("backend.local", 80, weight=5),
                        ),
                        affinity="cookie",
                        affinity_cookie="SRV",
                        client_ip_timeout=600.0,
                        connect_timeout=1.0,
                        server_timeout=20.0,
                        max_idle_per_host=0,
                        max_conns_per_host=10,
                        max_queue_per_host=0,
                        upstream_idle_timeout=4.0,
                        retries=0,
                        fail_timeout=3.0,
                    ),
                    "api": PoolConfig(
                        "api", affinity="client_ip", client_ip_timeout=120.0
                    ),
                    "static": PoolConfig("static"),
                },
                path=path,
            ),
        )

    def test_relative_paths(self) -> None:
        """Relative file names resolve against the config file's directory, not the cwd."""
        self.write("keys/token", "t\n")
        path = self.write(
            "etc/unit.toml",
            '[unit]\nadmin_token_file = "../keys/token"\naccess_log = "access.log"\n'
            + MINIMAL,
        )
        config = load_config(path)
        self.assertEqual(
            config.admin_token_file, os.path.join(self.dir, "keys", "token")
        )
        self.assertEqual(config.access_log, os.path.join(self.dir, "etc", "access.log"))

    def test_absolute_paths_and_stdout(self) -> None:
        token = self.write("token", "t")
        path = self.write(
            "unit.toml",
            f'[unit]\nadmin_token_file = "{token}"\naccess_log = "-"\n' + MINIMAL,
        )
        config = load_config(path)
        self.assertEqual((config.admin_token_file, config.access_log), (token, "-"))

    def test_file_errors(self) -> None:
        """Token and secret files must exist and hold something; tokens are ASCII."""
        self.write("empty", " \n")
        self.write("utf8", "tökén")
        missing = os.path.join(self.dir, "missing")
        cases = [
            (
                "secret_file",
                "missing",
                f"cannot read {missing!r}: No such file or directory",
            ),
            (
                "admin_token_file",
                "missing",
                f"cannot read {missing!r}: No such file or directory",
            ),
            (
                "admin_token_file",
                "empty",
                f"{os.path.join(self.dir, 'empty')!r} is empty",
            ),
            ("admin_token_file", "utf8", "the admin token must be ASCII"),
        ]
        for key, name, reason in cases:
            with self.subTest(key=key, name=name):
                path = self.write("unit.toml", f'[unit]\n{key} = "{name}"\n' + MINIMAL)
                error = self.assertRaises(ConfigError, load_config, path)
                self.assertConfigError(error, path, f"unit.{key}", reason)

    def test_forwarder_keys(self) -> None:
        """The forwarder's keys serve handoff listeners and start from forwarder_in."""
        self.write("secret", b"key\n")
        handoff = MINIMAL.replace('pool = "web"\n', 'pool = "web"\nhandoff = true\n', 1)
        path = self.write("unit.toml", '[unit]\nsecret_file = "secret"\nforwarder_in = "eth0"\n'
                          'forwarder_out = "veth.1"\nforwarder_fast_path = true\nfence_table = "nlb_u1"\n' + handoff)
        config = load_config(path)
        self.assertEqual((config.forwarder_in, config.forwarder_out, config.forwarder_fast_path, config.fence_table),
                         ("eth0", "veth.1", True, "nlb_u1"))
        defaults = load_config(self.write("unit.toml", '[unit]\nsecret_file = "secret"\n' + handoff))
        self.assertEqual((defaults.forwarder_in, defaults.forwarder_out, defaults.forwarder_fast_path,
                          defaults.fence_table), (None, None, False, "nlbproxy_fence"))
        for key, value in (("forwarder_out", '"eth1"'), ("forwarder_fast_path", "true"), ("fence_table", '"t"')):
            with self.subTest(key=key):
                path = self.write("unit.toml", f'[unit]\nsecret_file = "secret"\n{key} = {value}\n' + handoff)
                error = self.assertRaises(ConfigError, load_config, path)
                self.assertConfigError(error, path, f"unit.{key}",
                                       "set unit.forwarder_in, the client-facing interface, too")

    def test_tunnel_keys(self) -> None:
        """Hosts in tunnel_networks are reached by the flow-id tunnel; source and gateway go with it."""
        self.write("secret", b"key\n")
        handoff = MINIMAL.replace('pool = "web"\n', 'pool = "web"\nhandoff = true\n', 1)
        head = '[unit]\nsecret_file = "secret"\nforwarder_in = "eth0"\n'
        tunnel = 'tunnel_networks = ["10.2.0.0/16", "10.3.0.9"]\ntunnel_source = "10.0.0.2"\ntunnel_gateway = "10.0.0.1"\n'
        config = load_config(self.write("unit.toml", head + tunnel + handoff))
        self.assertEqual((config.tunnel_networks, config.tunnel_source, config.tunnel_gateway),
                         (("10.2.0.0/16", "10.3.0.9/32"), "10.0.0.2", "10.0.0.1"))
        defaults = load_config(self.write("unit.toml", head + handoff))
        self.assertEqual((defaults.tunnel_networks, defaults.tunnel_source, defaults.tunnel_gateway), ((), None, None))
        cases = [
            ('tunnel_networks = ["10.2.0.0/16"]\ntunnel_source = "10.0.0.2"\n', "unit.tunnel_gateway",
             "the flow-id tunnel needs it with unit.tunnel_networks"),
            ('tunnel_source = "10.0.0.2"\n', "unit.tunnel_networks",
             "the flow-id tunnel needs it with unit.tunnel_source"),
            (tunnel.replace('"10.0.0.1"', '"fe80::1"'), "unit.tunnel_gateway",
             "must be an IPv4 address like unit.tunnel_source"),
            (tunnel.replace('"10.3.0.9"', '"2001:db8::/32"'), "unit.tunnel_networks",
             "2001:db8::/32 is not IPv4, the family of unit.tunnel_source"),
            (tunnel.replace('"10.0.0.2"', '"unit-a"'), "unit.tunnel_source",
             "expected an IP address such as '10.0.0.2', got 'unit-a'"),
            (tunnel.replace('"10.2.0.0/16"', '"10.2.0.0/40"'), "unit.tunnel_networks",
             "expected a network such as '10.0.0.0/8', got '10.2.0.0/40': '10.2.0.0/40' does not appear to be an"
             " IPv4 or IPv6 network"),
        ]
        for text, key, reason in cases:
            with self.subTest(key=key, reason=reason):
                path = self.write("unit.toml", head + text + handoff)
                error = self.assertRaises(ConfigError, load_config, path)
                self.assertConfigError(error, path, key, reason)
        path = self.write("unit.toml", '[unit]\nsecret_file = "secret"\n' + tunnel + handoff)
        self.assertConfigError(self.assertRaises(ConfigError, load_config, path), path, "unit.tunnel_networks",
                               "set unit.forwarder_in, the client-facing interface, too")

    def test_ipv6_tunnel(self) -> None:
        """An IPv6 tunnel: its source and gateway checked, a link-local gateway
        on the forwarder's way out, and only IPv6 clients handed to its hosts."""
        self.write("secret", b"key\n")
        head = '[unit]\nsecret_file = "secret"\nforwarder_in = "eth0"\n'
        tunnel = ('tunnel_networks = ["fd4e:4c44::/64"]\ntunnel_source = "fd4e:4c42::2"\n'
                  'tunnel_gateway = "fd4e:4c42::1"\n')
        listener = ("\n[[listener]]\nname = \"vip\"\nendpoint = 'tcp6:80:interface=fd4e\\:4c42\\:\\:100'\n"
                    'pool = "h1"\nhandoff = true\n\n[pool.h1]\nhosts = ["[fd4e:4c44::3]:8080", "10.1.0.3:8080"]\n')
        config = load_config(self.write("unit.toml", head + tunnel + listener))
        self.assertEqual((config.tunnel_networks, config.tunnel_source, config.tunnel_gateway),
                         (("fd4e:4c44::/64",), "fd4e:4c42::2", "fd4e:4c42::1"))
        # The router known by its link-local address: the neighbour on the forwarder's way out.
        linklocal = tunnel.replace('"fd4e:4c42::1"', '"fe80::1"')
        config = load_config(self.write("unit.toml", head + linklocal + listener))
        self.assertEqual(config.tunnel_gateway, "fe80::1%eth0")
        config = load_config(self.write("unit.toml", head + 'forwarder_out = "eth1"\n' + linklocal + listener))
        self.assertEqual(config.tunnel_gateway, "fe80::1%eth1")
        config = load_config(self.write("unit.toml", head + linklocal.replace("fe80::1", "fe80::1%eth0") + listener))
        self.assertEqual(config.tunnel_gateway, "fe80::1%eth0")
        # An IPv4 host in the pool is not in the IPv6 tunnel's networks: an IPv4 listener may send to it.
        v4 = listener.replace("'tcp6:80:interface=fd4e\\:4c42\\:\\:100'", '"tcp:80:interface=10.0.0.100"')
        load_config(self.write("unit.toml", head + tunnel + v4.replace('"[fd4e:4c44::3]:8080", ', "")))
        refused = "carries IPv6 connections only: give the listener an IPv6 address of its own"
        cases = [
            (tunnel.replace('"fd4e:4c42::2"', '"fe80::2"') + listener, "unit.tunnel_source",
             "fe80::2 is link-local: it does not cross the router to the hosts"),
            (tunnel.replace('"fd4e:4c42::2"', '"::"') + listener, "unit.tunnel_source", ":: is unspecified"),
            (tunnel.replace('"fd4e:4c42::2"', '"::ffff:10.0.0.2"') + listener, "unit.tunnel_source",
             "::ffff:a00:2 is IPv4-mapped: write the IPv4 address"),
            (tunnel.replace('"fd4e:4c42::1"', '"ff02::2"') + listener, "unit.tunnel_gateway",
             "ff02::2 is a multicast address"),
            (tunnel.replace('"fd4e:4c42::1"', '"fd4e:4c42::1%eth0"') + listener, "unit.tunnel_gateway",
             "fd4e:4c42::1%eth0: only a link-local address has a zone"),
            (tunnel.replace('"fd4e:4c42::1"', '"fe80::1%eth1"') + listener, "unit.tunnel_gateway",
             "a link-local gateway is on the forwarder's way out, eth0, not eth1"),
            (tunnel.replace('"fd4e:4c42::1"', '"10.0.0.1"') + listener, "unit.tunnel_gateway",
             "must be an IPv6 address like unit.tunnel_source"),
            # Mixed families: an IPv4 VIP, or a dual-stack one, cannot use an IPv6 tunnel.
            (tunnel + v4, "listener[0].endpoint",
             "takes IPv4 clients, and pool h1's host [fd4e:4c44::3]:8080 is reached through the IPv6 flow-id "
             "tunnel (unit.tunnel_networks), which " + refused),
            (tunnel + listener.replace("fd4e\\:4c42\\:\\:100", "\\:\\:"), "listener[0].endpoint",
             "takes IPv4 clients, and pool h1's host [fd4e:4c44::3]:8080 is reached through the IPv6 flow-id "
             "tunnel (unit.tunnel_networks), which " + refused),
            (tunnel + v4.replace('"tcp:80:interface=10.0.0.100"', '"tcp:80"'), "listener[0].endpoint",
             "takes IPv4 clients, and pool h1's host [fd4e:4c44::3]:8080 is reached through the IPv6 flow-id "
             "tunnel (unit.tunnel_networks), which " + refused),
        ]
        for text, key, reason in cases:
            with self.subTest(key=key, reason=reason):
                path = self.write("unit.toml", head + text)
                error = self.assertRaises(ConfigError, load_config, path)
                self.assertConfigError(error, path, key, reason)
        # Without forwarder_in, that is what the error names.
        path = self.write("unit.toml", '[unit]\nsecret_file = "secret"\n' + linklocal.replace("fe80::1", "fe80::1%eth1")
                          + listener)
        self.assertConfigError(self.assertRaises(ConfigError, load_config, path), path, "unit.tunnel_networks",
                               "set unit.forwarder_in, the client-facing interface, too")
        # And the other way round: an IPv6 VIP cannot use an IPv4 tunnel.
        v4tunnel = 'tunnel_networks = ["10.1.0.0/24"]\ntunnel_source = "10.0.0.2"\ntunnel_gateway = "10.0.0.1"\n'
        path = self.write("unit.toml", head + v4tunnel + listener)
        self.assertConfigError(self.assertRaises(ConfigError, load_config, path), path, "listener[0].endpoint",
                               "takes IPv6 clients, and pool h1's host 10.1.0.3:8080 is reached through the IPv4 "
                               "flow-id tunnel (unit.tunnel_networks), which carries IPv4 connections only: give "
                               "the listener an IPv4 address of its own")

    def test_syntax_error(self) -> None:
        path = self.write("unit.toml", "[unit]\nname = \n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertConfigError(
            error, path, "", "invalid TOML: Invalid value (at line 2, column 8)"
        )

    def test_not_utf8(self) -> None:
        path = self.write("unit.toml", b'[unit]\nname = "\xff"\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(error.key, "")
        self.assertTrue(str(error).startswith(f"{path}: invalid TOML: "), str(error))

    def test_missing_file(self) -> None:
        path = os.path.join(self.dir, "nope.toml")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertConfigError(
            error, path, "", "cannot read config file: No such file or directory"
        )

    def test_error_names_file(self) -> None:
        path = self.write("unit.toml", MINIMAL + "[pool.web.hosts]\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertConfigError(
            error, path, "pool.web.hosts", "expected an array, got table"
        )


class HostPortTests(SynchronousTestCase):
    def test_parse(self) -> None:
        cases = {
            "127.0.0.1:80": ("127.0.0.1", 80),
            "[::1]:80": ("::1", 80),
            "[2001:DB8::0:1]:65535": ("2001:db8::1", 65535),
            "LocalHost:0": ("localhost", 0),
            "my_service.internal:8080": ("my_service.internal", 8080),
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(parse_host_port(text), expected)

    def test_parse_invalid(self) -> None:
        for text in (
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:65536",
            "127.0.0.1:+80",
            ":80",
            "::1:80",
            "[::1:80",
            "[127.0.0.1]:80",
            "256.0.0.1:80",
            "010.0.0.1:80",
            "80:80",
            "-bad-.example:80",
            "a b:80",
        ):
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_host_port, text)

    def test_format(self) -> None:
        self.assertEqual(format_host_port("10.0.0.1", 80), "10.0.0.1:80")
        self.assertEqual(format_host_port("::1", 80), "[::1]:80")
        self.assertEqual(HostConfig("fe80::1", 8080).key, "[fe80::1]:8080")

    @given(st.ip_addresses(), st.integers(0, 65535))
    def test_round_trip(self, address: Any, port: int) -> None:
        host = str(address)
        self.assertEqual(parse_host_port(format_host_port(host, port)), (host, port))


class DemoConfigTests(SynchronousTestCase):
    def test_demo(self) -> None:
        config = demo_config(8080, [8001, 8002, 8003], 9901)
        self.assertEqual(config.admin, "tcp:9901:interface=127.0.0.1")
        self.assertEqual(config.access_log, "-")
        self.assertEqual(
            config.listeners,
            (
                ListenerConfig(
                    "web",
                    "tcp:8080:interface=127.0.0.1",
                    "demo",
                    routes=(RouteConfig("static", path_prefix="/static/"),),
                ),
            ),
        )
        self.assertEqual(
            [h.key for h in config.pools["demo"].hosts],
            ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"],
        )
        self.assertEqual(
            [h.key for h in config.pools["static"].hosts], ["127.0.0.1:8001"]
        )
