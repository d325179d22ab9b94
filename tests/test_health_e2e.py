"""End to end: balancing units, host agents and backends as real processes.

The unit learns its hosts from the agents (its config lists none), routes by
what they report (health, load, directives), ages out an agent that is
killed, and drops forged health datagrams.  Timing targets are measured by
``bench/health.py``; these tests check behaviour with generous deadlines.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections import Counter
from typing import Any

import pytest

from tests.realnet import Farm, Process, Unit, agent_config, start_agent, unit_config, wait_until

SECRET = b"farm secret for the e2e tests\n"


@pytest.fixture
def farm(farm: Farm) -> Farm:
    """The shared fixture's farm, with the farm's secret file written."""
    (farm.tmp / "farm.key").write_bytes(SECRET)
    return farm


def state(unit: Unit) -> dict[str, Any]:
    with urllib.request.urlopen(unit.admin + "/api/v1/state", timeout=10) as response:
        return json.loads(response.read())


def hosts(unit: Unit) -> dict[str, Any]:
    return state(unit)["pools"]["app"]["hosts"]


def put(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def served_by(unit: Unit, n: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for i in range(n):
        with urllib.request.urlopen(unit.url() + f"r{i}", timeout=10) as response:
            names[response.read().split()[0].decode()] += 1
    return names


def farm_with_agents(farm: Farm, n: int = 3) -> tuple[Unit, list[tuple[Process, str, str]]]:
    """A unit whose pool "app" lists no host, and ``n`` hosts each with its agent.

    Returns the unit and, per host, (agent process, agent API URL, "ip:port").
    """
    unit = farm.unit(unit_config(
        [], extra_unit='secret_file = "farm.key"\nhealth = "127.0.0.1:0"',
    ))
    health_port = unit.process.wait_for(r"health messages on udp 127\.0\.0\.1:(\d+)").group(1)
    members = []
    for i in range(n):
        _, endpoint = farm.backend(f"b{i}")
        config = agent_config(f"host{i}", [f"127.0.0.1:{health_port}"], [("app", endpoint)], "farm.key")
        process, api = start_agent(farm, config, f"host{i}")
        members.append((process, api, endpoint))
    wait_until(lambda: len(hosts(unit)) == n and all(h["health"] == "up" for h in hosts(unit).values()),
               what="agents' hosts up in the unit")
    return unit, members


def test_hosts_announced_by_agents_join_the_pool(farm: Farm) -> None:
    unit, members = farm_with_agents(farm)
    seen = hosts(unit)
    for _, _, endpoint in members:
        assert seen[endpoint]["agent"] is True
        assert seen[endpoint]["capacity"] == 50
    # Equal reported loads (the measured CPU of a busy test machine would
    # otherwise decide the spread).
    for _, api, _ in members:
        put(api + "/v1/apps/app", b'{"load": 10}')
    wait_until(lambda: {h["load"] for h in hosts(unit).values()} == {10}, what="loads reported")
    assert set(served_by(unit, 60)) == {"b0", "b1", "b2"}


def test_app_reported_down_leaves_and_comes_back(farm: Farm) -> None:
    unit, members = farm_with_agents(farm)
    _, api, endpoint = members[0]
    put(api + "/v1/apps/app", b'{"health": "down", "reason": "disk full"}')
    wait_until(lambda: hosts(unit)[endpoint]["health"] == "down", what="host down")
    assert "disk full" in hosts(unit)[endpoint]["health_reason"]
    assert "b0" not in served_by(unit, 30)
    put(api + "/v1/apps/app", b'{"health": "up"}')
    wait_until(lambda: hosts(unit)[endpoint]["health"] == "up", what="host up again")


def test_drain_from_the_agent_api(farm: Farm) -> None:
    unit, members = farm_with_agents(farm)
    _, api, endpoint = members[1]
    put(api + "/v1/apps/app/directive", b"draining")
    wait_until(lambda: hosts(unit)[endpoint]["directive"] == "draining", what="host draining")
    assert hosts(unit)[endpoint]["directive_reason"].startswith("agent")
    assert "b1" not in served_by(unit, 30)


def test_killed_agent_ages_out(farm: Farm) -> None:
    unit, members = farm_with_agents(farm)
    process, _, endpoint = members[2]
    process.stop()  # SIGKILL: no goodbye
    wait_until(lambda: hosts(unit)[endpoint]["health"] == "down", what="silent host aged out")
    assert "silent" in hosts(unit)[endpoint]["health_reason"]


def test_load_aware_spread(farm: Farm) -> None:
    unit, members = farm_with_agents(farm)
    loads = dict(zip((endpoint for _, _, endpoint in members), (90, 10, 10), strict=True))
    for (_, api, endpoint) in members:
        put(api + "/v1/apps/app", json.dumps({"load": loads[endpoint]}).encode())
    wait_until(lambda: {k: h["load"] for k, h in hosts(unit).items()} == loads, what="loads reported")
    counts = served_by(unit, 300)
    assert counts["b0"] < 0.15 * 300, counts


def test_forged_datagrams_are_dropped_and_counted(farm: Farm) -> None:
    unit, _ = farm_with_agents(farm, n=1)
    port = int(unit.process.wait_for(r"health messages on udp 127\.0\.0\.1:(\d+)").group(1))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"NLBH garbage", ("127.0.0.1", port))
        sock.sendto(b"x" * 200, ("127.0.0.1", port))

    def dropped() -> dict[str, int]:
        with urllib.request.urlopen(unit.admin + "/api/v1/health", timeout=10) as response:
            return json.loads(response.read())["dropped"]

    wait_until(lambda: sum(dropped().values()) >= 2, what="drops counted")
    metrics = urllib.request.urlopen(unit.admin + "/metrics", timeout=10).read().decode()
    assert "nlbproxy_health_dropped_total" in metrics
    assert all(h["health"] == "up" for h in hosts(unit).values())


def test_probe_takes_a_dead_host_out(farm: Farm) -> None:
    backends = [farm.backend(f"p{i}") for i in range(2)]
    unit = farm.unit(unit_config(
        [b for _, b in backends],
        pools='check = { path = "/healthz", interval = 0.2, rise = 1, fall = 1, timeout = 0.5 }',
    ))
    dead_process, dead = backends[0]
    dead_process.stop()
    wait_until(lambda: hosts(unit)[dead]["health"] == "down", what="probe marks host down")
    assert hosts(unit)[dead]["health_reason"].startswith("probe")
