"""The host agent's TOML config file (a contract): what it accepts, its
defaults, and one-line errors naming file, key and reason."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.agent import tap
from nlbproxy.agent.config import (
    DEFAULT_API,
    AgentConfig,
    CheckConfig,
    ConfigError,
    load_agent_config,
    parse_agent_config,
)
from nlbproxy.config import ConfigError as UnitConfigError
from nlbproxy.health.messages import RowKey

GOOD = """
[agent]
name = "web-7"
units = ["10.0.0.1:9903", "10.0.0.2:9903"]
secret_file = "health.key"

[[app]]
name = "web"
endpoint = "10.0.0.7:8080"
capacity = 70
check = { path = "/hz", interval = 2, rise = 3 }

[[app]]
name = "api"
endpoint = "10.0.0.7:9000"
"""


class AgentConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        (self.dir / "health.key").write_bytes(b"s3cret\n")

    def write(self, text: str) -> str:
        path = self.dir / "agent.toml"
        path.write_text(text)
        return str(path)

    def load(self, text: str) -> AgentConfig:
        return load_agent_config(self.write(text))

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(str(self.dir / "agent.toml") + ": "), message)
        return message.split(": ", 1)[1]

    def test_good_file_and_defaults(self) -> None:
        config = self.load(GOOD)
        self.assertEqual(config.name, "web-7")
        self.assertEqual(config.units, (("10.0.0.1", 9903), ("10.0.0.2", 9903)))
        self.assertEqual(config.api, DEFAULT_API)
        self.assertEqual(config.secret, b"s3cret\n")  # raw bytes, like the unit's
        self.assertEqual(config.secret_file, str(self.dir / "health.key"))
        web, api = config.apps
        self.assertEqual((web.key, web.capacity), (RowKey("web", "10.0.0.7:8080"), 70))
        self.assertEqual(web.check, CheckConfig(path="/hz", interval=2.0, rise=3, fall=2, timeout=1.0))
        self.assertEqual((api.capacity, api.check), (50, None))
        self.assertEqual(config.udp_interface, "0.0.0.0")
        self.assertIs(ConfigError, UnitConfigError)

    def test_ipv6_units_and_endpoints_are_canonical(self) -> None:
        config = self.load(GOOD.replace('"10.0.0.1:9903", "10.0.0.2:9903"', '"[0:0::1]:9903"')
                           .replace('"10.0.0.7:8080"', '"[2001:DB8::7]:8080"'))
        self.assertEqual(config.units, (("::1", 9903),))
        self.assertEqual(config.udp_interface, "::")
        self.assertEqual(config.apps[0].endpoint, "[2001:db8::7]:8080")

    def test_handoff(self) -> None:
        text = GOOD.replace("[agent]\n", '[agent]\nhandoff = "tcp:9904:interface=10.0.0.7"\n').replace(
            "capacity = 70", 'deliver = "bridge"\nbridge_to = "127.0.0.1:8080"\nproxy_protocol = "v2"'
        ).replace('endpoint = "10.0.0.7:9000"', 'endpoint = "10.0.0.7:9000"\ndeliver = "adopt"\nadopt_path = "api.sock"')
        config = load_agent_config(self.write(text))
        self.assertEqual(config.handoff, "tcp:9904:interface=10.0.0.7")
        web, api = config.apps
        self.assertEqual((web.deliver, web.bridge_to, web.proxy_protocol), ("bridge", ("127.0.0.1", 8080), 2))
        self.assertEqual((api.deliver, api.adopt_path), ("adopt", str(self.dir / "api.sock")))
        plain = load_agent_config(self.write(GOOD))
        self.assertEqual((plain.handoff, plain.apps[0].deliver, plain.apps[0].proxy_protocol), (None, None, 0))
        unix = load_agent_config(self.write(text.replace('bridge_to = "127.0.0.1:8080"', 'bridge_to = "unix:web.sock"')))
        self.assertEqual(unix.apps[0].bridge_to, str(self.dir / "web.sock"))  # a path, relative to the file
        absolute = load_agent_config(self.write(text.replace('bridge_to = "127.0.0.1:8080"',
                                                             'bridge_to = "unix:/run/web.sock"')))
        self.assertEqual(absolute.apps[0].bridge_to, "/run/web.sock")
        tunnelled = load_agent_config(self.write(text.replace("[agent]\n", '[agent]\ntunnel_interface = "eth0"\n')))
        self.assertEqual((tunnelled.tunnel_interface, plain.tunnel_interface), ("eth0", None))

    def test_errors_name_the_key(self) -> None:
        cases = {
            GOOD.replace('name = "web-7"\n', ""): "agent.name: missing required key",
            GOOD.replace("units = [", "unitz = ["): "agent.unitz: unknown key",
            GOOD.replace('"10.0.0.1:9903", "10.0.0.2:9903"', ""): "agent.units: expected a non-empty array",
            GOOD.replace('"10.0.0.2:9903"', '"unit.example:9903"'): "agent.units[1]: expected an IP address",
            GOOD.replace('"10.0.0.2:9903"', '"10.0.0.1:9903"'): "agent.units[1]: duplicate unit",
            GOOD.replace('"10.0.0.2:9903"', '"[::1]:9903"'): "agent.units: mixes IPv4 and IPv6",
            GOOD.replace('"10.0.0.2:9903"', '"10.0.0.2:0"'): "agent.units[1]: port 0",
            GOOD.replace('secret_file = "health.key"', 'secret_file = "nope.key"'): "agent.secret_file: cannot read",
            GOOD.replace('secret_file = "health.key"', ""): "agent.secret_file: missing required key",
            GOOD.replace('[agent]\n', '[agent]\napi = "tcp:9902"\n'): "agent.api: api endpoint must name an interface",
            GOOD.replace('[agent]\n', '[agent]\napi = "ssl:9902"\n'): "agent.api: expected a 'tcp:'",
            GOOD.replace('[agent]\n', '[agent]\nhandoff = "udp:9910"\n'): "agent.handoff: expected a 'tcp:'",
            GOOD.replace("capacity = 70", "capacity = 100"): "app[0].capacity: must be between 0 and 99",
            GOOD.replace("capacity = 70", 'deliver = "adopt"'): "app[0].adopt_path: required with deliver = 'adopt'",
            GOOD.replace("capacity = 70", 'deliver = "bridge"'): "app[0].bridge_to: required with deliver = 'bridge'",
            GOOD.replace("capacity = 70", 'deliver = "teleport"'): "app[0].deliver: expected one of",
            GOOD.replace("[agent]\n", '[agent]\nhandoff = "tcp:9904"\n').replace(
                "capacity = 70", 'deliver = "bridge"\nbridge_to = "unix:"'):
                "app[0].bridge_to: expected a Unix socket's path after 'unix:'",
            GOOD.replace("capacity = 70", 'bridge_to = "127.0.0.1:80"'): "app[0].bridge_to: only with deliver = 'bridge'",
            GOOD.replace("capacity = 70", 'deliver = "bridge"\nbridge_to = "127.0.0.1:80"'):
                "agent.handoff: required when an [[app]] has deliver",
            GOOD.replace("[agent]\n", '[agent]\nhandoff = "tcp:9904"\n').replace(
                "capacity = 70", 'deliver = "bridge"\nbridge_to = "127.0.0.1:80"\nproxy_protocol = 3'):
                "app[0].proxy_protocol: expected true, false, 'v1' or 'v2'",
            GOOD.replace('[agent]\n', '[agent]\ntunnel_interface = "eth0"\n'):
                "agent.tunnel_interface: the tunnel carries handed-off connections: set agent.handoff",
            GOOD.replace('[agent]\n', '[agent]\nhandoff = "tcp:9904"\ntunnel_interface = "eth 0"\n'):
                "agent.tunnel_interface: expected a network interface name",
            GOOD.replace("capacity = 70", 'colour = "red"'): "app[0].colour: unknown key",
            GOOD.replace('path = "/hz"', 'path = "hz"'): "app[0].check.path: must start with '/'",
            GOOD.replace("rise = 3", "rise = 0"): "app[0].check.rise: must be between 1 and 100",
            GOOD.replace("interval = 2", "interval = -1"): "app[0].check.interval: must be finite and > 0",
            GOOD.replace("rise = 3", "timeout = 0"): "app[0].check.timeout: must be finite and > 0",
            GOOD.replace("rise = 3", "method = 'GET'"): "app[0].check.method: unknown key",
            GOOD.replace('"10.0.0.7:9000"', '"10.0.0.7:8080"').replace('name = "api"', 'name = "web"'):
                "app[1].endpoint: duplicate endpoint",
            GOOD.replace('endpoint = "10.0.0.7:9000"', 'endpoint = "10.0.0.7"'): "app[1].endpoint: expected 'host:port'",
            GOOD.replace('name = "api"\n', ""): "app[1].name: missing required key",
            GOOD.split("[[app]]")[0]: "app: missing required key",
            GOOD + "\n[extra]\n": "extra: unknown key",
        }
        for text, expected in cases.items():
            with self.subTest(expected=expected):
                self.assertIn(expected, self.error(text))

    def test_unreadable_and_invalid_files(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_agent_config(str(self.dir / "missing.toml"))
        self.assertIn("cannot read config file", str(caught.exception))
        self.assertIn("invalid TOML", self.error("[agent\n"))

    def test_empty_secret_file(self) -> None:
        (self.dir / "health.key").write_bytes(b"  \n")
        self.assertIn("is empty", self.error(GOOD))

    def test_parse_without_a_file_resolves_against_the_working_directory(self) -> None:
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        data = {"agent": {"name": "h", "units": ["127.0.0.1:1"], "secret_file": "health.key"},
                "app": [{"name": "a", "endpoint": "127.0.0.1:2"}]}
        self.assertEqual(parse_agent_config(data).secret, b"s3cret\n")

    def test_tap_options(self) -> None:
        options = tap.Options()
        options.parseOptions(["--config", self.write(GOOD)])
        self.assertEqual(options["agent_config"].name, "web-7")
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", self.write(GOOD.replace("capacity = 70", "capacity = -1"))])
        self.assertIn("app[0].capacity", str(caught.exception))
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, [])
