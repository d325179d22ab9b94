"""End to end: session affinity with real units, agents and backends.

Sessions reach the unit two ways: the application announces them through
its host's agent (the session API), or the unit learns them from the
application's own ``Set-Cookie``.  Either way every request carrying the
session cookie goes to the session's host, until the session ends or its
host can no longer take it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections import Counter
from typing import Any

import pytest

from tests.realnet import Farm, Process, Unit, agent_config, free_port, start_agent, unit_config, wait_until

SECRET = b"farm secret for the session tests\n"
SESSION_POOL = 'affinity = "session"\nsession_cookie = "SID"\nbalance = "round_robin"'


@pytest.fixture
def farm(farm: Farm) -> Farm:
    """The shared fixture's farm, with the farm's secret file written."""
    (farm.tmp / "farm.key").write_bytes(SECRET)
    return farm


def fetch(url: str, sid: str | None = None) -> tuple[str, str]:
    """GET ``url``; returns (backend name, the Set-Cookie header or "")."""
    request = urllib.request.Request(url)
    if sid is not None:
        request.add_header("Cookie", f"other=1; SID={sid}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().split()[0].decode(), response.headers.get("Set-Cookie") or ""


def hosts(unit: Unit) -> dict[str, Any]:
    with urllib.request.urlopen(unit.admin + "/api/v1/state", timeout=10) as response:
        return json.loads(response.read())["pools"]["app"]["hosts"]


def call(url: str, method: str, body: bytes | None = None) -> Any:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def sessions_farm(farm: Farm) -> tuple[Unit, list[tuple[Process, str, str]]]:
    unit = farm.unit(unit_config(
        [], extra_unit='secret_file = "farm.key"\nhealth = "127.0.0.1:0"', pools=SESSION_POOL,
    ))
    health_port = unit.process.wait_for(r"health messages on udp 127\.0\.0\.1:(\d+)").group(1)
    members = []
    for i in range(3):
        _, endpoint = farm.backend(f"b{i}")
        config = agent_config(f"host{i}", [f"127.0.0.1:{health_port}"], [("app", endpoint)], "farm.key")
        process, api = start_agent(farm, config, f"host{i}")
        members.append((process, api, endpoint))
    wait_until(lambda: len(hosts(unit)) == 3 and all(h["health"] == "up" for h in hosts(unit).values()),
               what="agents' hosts up")
    return unit, members


def test_announced_session_goes_to_its_host_until_it_ends(farm: Farm) -> None:
    unit, members = sessions_farm(farm)
    _, api, endpoint = members[1]
    call(api + "/v1/sessions", "POST", json.dumps({"app": "app", "key": "s-123"}).encode())
    wait_until(lambda: hosts(unit)[endpoint]["sessions"] == 1, what="session known to the unit")
    assert Counter(fetch(unit.url() + f"x{i}", "s-123")[0] for i in range(30)) == {"b1": 30}
    call(api + "/v1/sessions/s-123?app=app", "DELETE")
    wait_until(lambda: hosts(unit)[endpoint]["sessions"] == 0, what="session ended")
    # Balanced again (round robin here): an unknown session binds nothing.
    assert {fetch(unit.url() + f"y{i}", "s-123")[0] for i in range(6)} == {"b0", "b1", "b2"}
    assert hosts(unit)[endpoint]["sessions"] == 0


def test_session_moves_when_its_host_goes_down(farm: Farm) -> None:
    unit, members = sessions_farm(farm)
    _, api, endpoint = members[0]
    call(api + "/v1/sessions", "POST", json.dumps({"app": "app", "key": "mover"}).encode())
    wait_until(lambda: hosts(unit)[endpoint]["sessions"] == 1, what="session known")
    call(api + "/v1/apps/app", "PUT", b'{"health": "down"}')
    wait_until(lambda: hosts(unit)[endpoint]["health"] == "down", what="host down")
    moved_to = fetch(unit.url() + "m", "mover")[0]
    assert moved_to != "b0"
    assert {fetch(unit.url() + f"m{i}", "mover")[0] for i in range(10)} == {moved_to}


def test_sessions_learnt_from_set_cookie(farm: Farm) -> None:
    backends = [farm.backend(f"b{i}")[1] for i in range(3)]
    unit = farm.unit(unit_config(backends, pools=SESSION_POOL))
    name, cookie = fetch(unit.url() + "login/u42")
    assert cookie.startswith("SID=u42")
    assert {fetch(unit.url() + f"p{i}", "u42")[0] for i in range(12)} == {name}
    ctl = [sys.executable, "-m", "nlbproxy.ctl", "--admin", unit.admin]
    listed = subprocess.run([*ctl, "sessions", "app", "--json"], capture_output=True, text=True, timeout=30)
    assert [s["key"] for s in json.loads(listed.stdout)["sessions"]] == ["u42"]
    fetch(unit.url() + "logout/u42", "u42")
    wait_until(lambda: sum(h["sessions"] for h in hosts(unit).values()) == 0, what="session forgotten")
    fetch(unit.url() + "login/u43")
    dropped = subprocess.run([*ctl, "drop-session", "app", "u43"], capture_output=True, text=True, timeout=30)
    assert dropped.returncode == 0, dropped.stderr
    assert sum(h["sessions"] for h in hosts(unit).values()) == 0


def two_units(farm: Farm) -> tuple[list[Unit], list[str], list[tuple[Process, str, str]]]:
    """Two units sharing sessions through their DAMs, three hosts with agents bound to unit 0."""
    dam_ports = [free_port(), free_port()]
    health = [free_port(udp=True), free_port(udp=True)]
    configs = []
    for i in range(2):
        configs.append(unit_config(
            [], pools=SESSION_POOL, name=f"u{i}",
            extra_unit=(f'secret_file = "farm.key"\nhealth = "127.0.0.1:{health[i]}"\n'
                        f'dam = "tcp:{dam_ports[i]}:interface=127.0.0.1"\n'
                        f'peers = ["127.0.0.1:{dam_ports[1 - i]}"]\nreplication = 1'),
        ))
    units = [farm.unit(config, name=f"u{i}.toml") for i, config in enumerate(configs)]
    for unit in units:
        unit.process.wait_for(r"farm known")
    members = []
    for i in range(3):
        _, endpoint = farm.backend(f"b{i}")
        config = agent_config(f"host{i}", [f"127.0.0.1:{p}" for p in health], [("app", endpoint)], "farm.key")
        process, api = start_agent(farm, config, f"host{i}")
        members.append((process, api, endpoint))
    for unit in units:
        wait_until(lambda unit=unit: len(hosts(unit)) == 3 and all(h["health"] == "up" for h in hosts(unit).values()),
                   what="agents' hosts up in every unit")
    return units, health, members


def test_every_unit_routes_a_session_and_none_is_lost_with_a_unit(farm: Farm) -> None:
    units, _, members = two_units(farm)
    _, api, endpoint = members[2]
    call(api + "/v1/sessions", "POST", json.dumps([{"app": "app", "key": f"k{i}"} for i in range(20)]).encode())
    for unit in units:
        wait_until(lambda unit=unit: hosts(unit)[endpoint]["sessions"] == 20, what="sessions on every unit")
        assert {fetch(unit.url() + f"s{i}", f"k{i}")[0] for i in range(20)} == {"b2"}
    # The unit the agents are bound to dies: the other keeps every session,
    # and the agents bind to it.
    units[0].process.stop()
    assert {fetch(units[1].url() + f"t{i}", f"k{i}")[0] for i in range(20)} == {"b2"}
    call(api + "/v1/sessions", "POST", json.dumps({"app": "app", "key": "late"}).encode())
    wait_until(lambda: hosts(units[1])[endpoint]["sessions"] == 21, what="new session through the other unit")
    assert fetch(units[1].url() + "late", "late")[0] == "b2"
    # The dead unit restarts: it takes its sessions back from its peer before
    # it serves, so its very first requests already go to the session's host.
    restarted = farm.unit((farm.tmp / "u0.toml").read_text(), name="u0.toml")
    restarted.process.wait_for(r"farm known")
    assert {fetch(restarted.url() + f"r{i}", f"k{i}")[0] for i in range(20)} | {
        fetch(restarted.url() + "late", "late")[0]} == {"b2"}
