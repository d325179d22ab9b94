"""End to end: reload and upgrade of a unit of two workers, under a steady load.

The supervisor replaces the workers one at a time on the same sockets; the
load (GETs and POSTs, each on a new connection, never retried) must see no
failed request across reloads by SIGHUP and by the admin API, a program
upgrade, and refused reloads (a broken file, a change of what the supervisor
owns), after which the running config keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.realnet import Farm, free_port, wait_until
from tests.test_workers import Load, fetch, get_json

RELOADS = 20


def config(backends: list[str], extra_listener_port: int | None = None, workers: int = 2) -> str:
    hosts = ", ".join(f'"{b}"' for b in backends)
    text = (f'[unit]\nname = "rl"\nadmin = "tcp:0:interface=127.0.0.1"\nworkers = {workers}\ngrace_period = 5\n\n'
            '[[listener]]\nname = "web"\nendpoint = "tcp:0:interface=127.0.0.1"\npool = "app"\n\n')
    if extra_listener_port is not None:
        text += (f'[[listener]]\nname = "extra"\nendpoint = "tcp:{extra_listener_port}:interface=127.0.0.1"\n'
                 'pool = "app"\n\n')
    return text + f'[pool.app]\nhosts = [{hosts}]\nbalance = "round_robin"\n'


class Setup:
    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        self.backends = [farm.backend(f"b{i}")[1] for i in range(2)]
        self.path = farm.tmp / "unit.toml"
        self.unit = farm.unit(config(self.backends[:1]))
        # The listener keeps its port across reloads: the file names port 0,
        # so write the one the unit got.
        self.port = self.unit.port()
        self.write(self.backends[:1])
        wait_until(lambda: all(w["serving"] for w in self.state()["workers"]), what="workers serving")

    def write(self, backends: list[str], extra: int | None = None, workers: int = 2) -> None:
        text = config(backends, extra, workers).replace(
            'endpoint = "tcp:0:interface=127.0.0.1"', f'endpoint = "tcp:{self.port}:interface=127.0.0.1"', 1)
        self.path.write_text(text)

    def state(self) -> dict[str, Any]:
        return get_json(self.unit.admin + "/api/v1/state")

    def post(self, what: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(f"{self.unit.admin}/api/v1/{what}", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def rolled(self) -> bool:
        state = self.state()
        return bool(state["roll"].get("done")) and all(
            w["generation"] == state["generation"] and w["serving"] and not w["retiring"]
            for w in state["workers"])

    def names(self, n: int = 12, port: int | None = None) -> set[str]:
        unit = self.unit if port is None else _At(port)
        return {fetch(unit, f"n{i}") for i in range(n)}  # type: ignore[arg-type]


class _At:
    def __init__(self, port: int) -> None:
        self.port = port

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    farm = Farm(tmp_path_factory.mktemp("workers_reload"))
    try:
        yield Setup(farm)
    finally:
        farm.close()


def test_reloads_under_load_fail_no_request(setup: Setup) -> None:
    extra = free_port()
    load = Load(setup.port)
    try:
        wait_until(lambda: load.ok() >= 10, what="load running")
        for i in range(RELOADS):
            backends = setup.backends if i % 2 == 0 else setup.backends[:1]
            setup.write(backends, extra if i == 0 else None)
            if i % 2 == 0:
                setup.unit.process.signal(signal.SIGHUP)
                wait_until(lambda g=i + 1: setup.state()["generation"] == g, what=f"reload {i + 1} started")
            else:
                code, answer = setup.post("reload")
                assert (code, answer["reloaded"]) == (200, True), answer
            wait_until(setup.rolled, timeout=60, what=f"reload {i + 1} rolled")
            expected = {"b0", "b1"} if i % 2 == 0 else {"b0"}
            assert setup.names() == expected
            if i == 0:
                assert setup.names(port=extra) == {"b0", "b1"}
    finally:
        results = load.stop()
    print(f"\n{RELOADS} reloads under load: {dict(results)}")
    assert set(results) == {"ok"}, results
    # The listener the first reload added is gone with the second.
    with pytest.raises(OSError):
        fetch(_At(extra), "gone")  # type: ignore[arg-type]


def test_upgrade_replaces_every_worker_and_fails_no_request(setup: Setup) -> None:
    before = {w["pid"] for w in setup.state()["workers"]}
    load = Load(setup.port)
    try:
        wait_until(lambda: load.ok() >= 10, what="load running")
        code, answer = setup.post("upgrade")
        assert (code, answer["upgrading"]) == (202, True), answer
        wait_until(setup.rolled, timeout=60, what="upgrade rolled")
        ok = load.ok()
        wait_until(lambda: load.ok() >= ok + 10, what="load after the upgrade")
    finally:
        results = load.stop()
    assert set(results) == {"ok"}, results
    assert not before & {w["pid"] for w in setup.state()["workers"]}


def test_refused_reloads_keep_the_running_config(setup: Setup) -> None:
    generation = setup.state()["generation"]
    setup.path.write_text("[unit\nbroken")
    code, answer = setup.post("reload")
    assert code == 409 and "invalid TOML" in answer["error"], answer
    setup.unit.process.signal(signal.SIGHUP)
    setup.unit.process.wait_for(r"reload refused, the running config keeps serving: .*invalid TOML")
    setup.write(setup.backends, workers=3)
    code, answer = setup.post("reload")
    assert code == 409 and answer["reasons"] == [
        "unit.workers: changing it needs a restart of the unit (the supervisor owns it)"], answer
    assert setup.state()["generation"] == generation
    assert setup.names() == {"b0"}
    # A worker that dies now restarts on the config the supervisor accepted,
    # not on the file as it is.
    victim = setup.state()["workers"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: (w := setup.state()["workers"][1])["pid"] != victim["pid"] and w["serving"],
               what="worker restarted")
    assert setup.names() == {"b0"}
    assert Counter(w["generation"] for w in setup.state()["workers"]) == {generation: 2}
