"""The systemd unit files in ``contrib/systemd``.

Three checks: ``systemd-analyze verify`` finds nothing to say about each unit,
alone and with its handoff drop-in (``make deps`` installs systemd; without it
that test skips, except in CI where ``NLB_REQUIRE_ROOT=1`` makes it fail);
the hardening the guide promises is in the files; and each unit's
``ExecStart`` command line really starts the service.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from nlbproxy.limits import MAX_CONNECTIONS
from tests.realnet import ROOT, Farm, Unit, agent_config, free_port, unit_config, wait_until
from tests.needs import need_commands

CONTRIB = ROOT / "contrib" / "systemd"
UNITS = ("nlbproxy", "nlbagent")
INSTALLED_TWISTD = "/opt/nlbproxy/bin/twistd"


def read(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), str(path))
    return parser


def service(name: str) -> configparser.SectionProxy:
    return read(CONTRIB / f"{name}.service")["Service"]


def dropin(name: str) -> configparser.SectionProxy:
    return read(CONTRIB / "handoff" / f"{name}.conf")["Service"]


def twistd() -> str:
    path = shutil.which("twistd")
    assert path, "twistd is not on PATH (make install)"
    return path


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    need_commands("systemd-analyze")
    analyze = shutil.which("systemd-analyze")
    for name in UNITS:
        # verify checks that ExecStart's program exists: point it at this machine's twistd.
        text = (CONTRIB / f"{name}.service").read_text().replace(INSTALLED_TWISTD, twistd())
        for with_dropin in (False, True):
            where = tmp_path / f"{name}-{'handoff' if with_dropin else 'plain'}"
            where.mkdir()
            unit = where / f"{name}.service"
            unit.write_text(text)
            if with_dropin:
                # Drop-ins next to the unit file are read by verify, as from /etc/systemd/system.
                (where / f"{name}.service.d").mkdir()
                shutil.copy(CONTRIB / "handoff" / f"{name}.conf", where / f"{name}.service.d" / "handoff.conf")
            result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
            # Unknown keys and bad values are only warnings: any output at all is a finding.
            assert (result.returncode, result.stdout + result.stderr) == (0, ""), (name, with_dropin)


@pytest.mark.parametrize("name", UNITS)
def test_hardening(name: str) -> None:
    s = service(name)
    command = shlex.split(s["ExecStart"])
    assert command[0] == INSTALLED_TWISTD and command[-3] == name
    assert "--nodaemon" in command and "--pidfile=" in command
    assert s["Type"] in ("simple", "exec")
    assert s["Restart"] == "on-failure"
    if name == "nlbproxy":
        # The unit reloads on SIGHUP; its upgrade announces the new MAINPID.
        assert s["ExecReload"] == "/bin/kill -HUP $MAINPID" and s["NotifyAccess"] == "all"
    else:
        assert "ExecReload" not in s  # the agent has no reload
    assert (s["User"], s["Group"]) == ("nlbproxy", "nlbproxy")
    for key, value in (("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("SystemCallFilter", "@system-service"),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"), ("UMask", "0077")):
        assert s[key] == value, key
    assert s["LogsDirectory"] == "nlbproxy" and "/var/log/nlbproxy" in s["ReadWritePaths"].split()
    # Nothing of handoff's privilege without the drop-in.
    assert "CAP_NET_ADMIN" not in s["CapabilityBoundingSet"] + s["AmbientCapabilities"]
    assert set(s["AmbientCapabilities"].split()) <= set(s["CapabilityBoundingSet"].split())


def test_unit_limits_and_capabilities() -> None:
    s = service("nlbproxy")
    assert s["AmbientCapabilities"] == s["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    # A client and a backend descriptor per connection of one full listener, at least.
    assert int(s["LimitNOFILE"]) >= 2 * MAX_CONNECTIONS
    assert service("nlbagent")["CapabilityBoundingSet"] == ""


def test_handoff_dropins() -> None:
    unit = dropin("nlbproxy")
    assert set(unit["CapabilityBoundingSet"].split()) == {"CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert unit["AmbientCapabilities"] == unit["CapabilityBoundingSet"]
    assert set(unit["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK",
                                                           "AF_PACKET"}
    agent = dropin("nlbagent")
    assert set(agent["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert "RestrictAddressFamilies" not in agent  # no AF_PACKET on hosts


def command_line(name: str, config: Path) -> list[str]:
    """The unit's ExecStart with this machine's twistd and a test config."""
    command = shlex.split(service(name)["ExecStart"])
    assert command[-2:] == ["--config", f"/etc/nlbproxy/{'unit' if name == 'nlbproxy' else 'agent'}.toml"]
    return [twistd(), *command[1:-1], str(config)]


def test_exec_start_runs_a_unit_and_an_agent(farm: Farm, tmp_path: Path) -> None:
    secret = tmp_path / "farm.key"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    health = free_port(udp=True)
    _, backend = farm.backend("b0")
    unit_file = tmp_path / "unit.toml"
    unit_file.write_text(unit_config([backend], extra_unit=f'secret_file = "{secret}"\nhealth = "127.0.0.1:{health}"'))
    unit = Unit(farm.start(command_line("nlbproxy", unit_file)))
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text(agent_config("h0", [f"127.0.0.1:{health}"], [("app", backend)], str(secret)))
    agent = farm.start(command_line("nlbagent", agent_file))
    agent.wait_for(r"agent h0 api on ")
    # The unit hears the agent: the two ExecStart lines make a working pair.
    wait_until(lambda: "h0" in api(unit, "/api/v1/health")["agents"], what="the agent at the unit")
    assert api(unit, "/api/v1/state")["pools"]["app"]["hosts"][backend]["agent"] is True


def api(unit: Unit, path: str) -> Any:
    with urllib.request.urlopen(unit.admin + path, timeout=10) as response:
        return json.load(response)
