"""End to end: a unit of two worker processes in front of real backends and agents.

One ``twistd nlbproxy`` with ``workers = 2`` (a supervisor and two workers),
two backends each with its agent, real clients (urllib, http.client, nlbctl).
The tests check that connections spread over both workers, that operator
directives and sessions announced through an agent hold whichever worker takes
a connection, that the admin API answers for the whole unit, and that a worker
killed under a steady load of GETs and POSTs (no client retries) is restarted
without any connection being refused.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realnet import Farm, Unit, agent_config, free_port, start_agent, unit_config, wait_until

SECRET = b"farm secret for the workers tests\n"
POOL = 'affinity = "session"\nsession_cookie = "SID"\nbalance = "round_robin"'


class Setup:
    def __init__(self, farm: Farm) -> None:
        (farm.tmp / "farm.key").write_bytes(SECRET)
        self.farm = farm
        self.unit = farm.unit(unit_config(
            [], pools=POOL,
            extra_unit='workers = 2\nsecret_file = "farm.key"\nhealth = "127.0.0.1:0"\ngrace_period = 5',
        ))
        health = self.unit.process.wait_for(r"health messages on udp 127\.0\.0\.1:(\d+)").group(1)
        self.endpoints: list[str] = []
        self.apis: list[str] = []
        for i in range(2):
            _, endpoint = farm.backend(f"b{i}")
            config = agent_config(f"host{i}", [f"127.0.0.1:{health}"], [("app", endpoint)], "farm.key")
            _, api = start_agent(farm, config, f"host{i}")
            self.endpoints.append(endpoint)
            self.apis.append(api)
        for worker in (0, 1):
            wait_until(lambda w=worker: self.hosts(w) and all(h["health"] == "up" for h in self.hosts(w).values())
                       and len(self.hosts(w)) == 2, what=f"both hosts up on worker {worker}")

    def state(self, worker: int | None = None) -> dict[str, Any]:
        prefix = "" if worker is None else f"/api/v1/workers/{worker}"
        return get_json(f"{self.unit.admin}{prefix}/api/v1/state")

    def hosts(self, worker: int | None = None) -> dict[str, Any]:
        try:
            return self.state(worker)["pools"]["app"]["hosts"]
        except (OSError, KeyError, ValueError):
            return {}

    def worker_requests(self) -> list[int]:
        return [w["requests"] for w in self.state()["workers"]]

    def workers(self) -> list[dict[str, Any]]:
        return self.state()["workers"]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nlbproxy.ctl", "--admin", self.unit.admin, *args],
                              capture_output=True, text=True, timeout=30)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def fetch(unit: Unit, path: str, sid: str | None = None) -> str:
    """One GET on a new connection (so the kernel picks a worker each time); the backend's name."""
    request = urllib.request.Request(unit.url() + path, headers={"Connection": "close"})
    if sid is not None:
        request.add_header("Cookie", f"SID={sid}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().split()[0].decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    farm = Farm(tmp_path_factory.mktemp("workers"))
    try:
        yield Setup(farm)
    finally:
        farm.close()


def test_connections_spread_and_metrics_sum_both_workers(setup: Setup) -> None:
    before = setup.worker_requests()
    metrics_before = _requests_metric(setup)
    names = Counter(fetch(setup.unit, f"spread{i}") for i in range(40))
    assert sum(names.values()) == 40
    after = setup.worker_requests()
    served = [a - b for a, b in zip(after, before)]
    assert sum(served) == 40
    assert all(n > 0 for n in served), served
    assert _requests_metric(setup) - metrics_before == 40
    text = _metrics(setup)
    assert "nlbproxy_worker_up{worker=\"0\"} 1" in text and "nlbproxy_worker_up{worker=\"1\"} 1" in text
    # The unit's health socket counts each agent datagram once; the relay counts a copy per worker.
    health_in = [line for line in text.splitlines() if line.startswith('nlbproxy_health_datagrams_total{direction="in"}')]
    relayed = [line for line in text.splitlines() if line.startswith("nlbproxy_health_relayed_total")]
    assert len(health_in) == 1 and len(relayed) == 1
    assert int(relayed[0].split()[1]) == 2 * int(health_in[0].split()[1]) > 0


def _metrics(setup: Setup) -> str:
    with urllib.request.urlopen(setup.unit.admin + "/metrics", timeout=10) as response:
        return response.read().decode()


def _requests_metric(setup: Setup) -> int:
    total = 0
    for line in _metrics(setup).splitlines():
        if line.startswith("nlbproxy_requests_total{") and 'code="2xx"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_session_announced_through_an_agent_holds_on_every_worker(setup: Setup) -> None:
    api, endpoint = setup.apis[1], setup.endpoints[1]
    body = json.dumps({"app": "app", "key": "w-42"}).encode()
    urllib.request.urlopen(urllib.request.Request(api + "/v1/sessions", data=body, method="POST",
                                                  headers={"Content-Type": "application/json"}), timeout=10).read()
    for worker in (0, 1):
        wait_until(lambda w=worker: setup.hosts(w)[endpoint]["sessions"] >= 1, what=f"session on worker {worker}")
    before = setup.worker_requests()
    assert Counter(fetch(setup.unit, f"s{i}", "w-42") for i in range(30)) == {"b1": 30}
    assert all(a > b for a, b in zip(setup.worker_requests(), before))


def test_drain_through_the_unit_reaches_every_worker(setup: Setup) -> None:
    drained = setup.endpoints[0]
    done = setup.ctl("drain", "app", drained)
    assert done.returncode == 0, done.stderr
    try:
        for worker in (0, 1):
            assert setup.hosts(worker)[drained]["directive"] == "draining"
        assert setup.hosts()[drained]["directive"] == "draining"
        before = setup.worker_requests()
        assert Counter(fetch(setup.unit, f"d{i}") for i in range(30)) == {"b1": 30}
        assert all(a > b for a, b in zip(setup.worker_requests(), before))
    finally:
        assert setup.ctl("activate", "app", drained).returncode == 0
    assert {fetch(setup.unit, f"a{i}") for i in range(20)} == {"b0", "b1"}


class Load:
    """Steady requests from ``threads`` clients, each on a new connection and
    never retried: GETs and POSTs (not idempotent) in turn."""

    def __init__(self, port: int, threads: int = 2) -> None:
        self.port = port
        self.results: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, me: int) -> None:
        i = 0
        while not self.stopping.is_set():
            i += 1
            outcome = self._one(f"/load/{me}/{i}", post=i % 2 == 0)
            with self.lock:
                self.results[outcome] += 1

    def _one(self, path: str, post: bool) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            if post:
                connection.request("POST", path, body=b"x" * 1000, headers={"Connection": "close"})
            else:
                connection.request("GET", path, headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            return "ok" if response.status == 200 else f"status {response.status}"
        except ConnectionRefusedError:
            return "refused"
        except Exception as exc:  # counted by kind: what the client saw
            return type(exc).__name__
        finally:
            connection.close()

    def ok(self) -> int:
        with self.lock:
            return self.results["ok"]

    def stop(self) -> Counter[str]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        return self.results


def _restart(setup: Setup, index: int, signum: int) -> Counter[str]:
    before = setup.workers()[index]
    load = Load(setup.unit.port())
    try:
        wait_until(lambda: load.ok() >= 20, what="load running")
        os.kill(before["pid"], signum)
        wait_until(lambda: (w := setup.workers()[index])["running"] and w["pid"] != before["pid"]
                   and w["requests"] > 0, timeout=30, what=f"worker {index} restarted and serving")
        ok_then = load.ok()
        wait_until(lambda: load.ok() >= ok_then + 20, what="load served after the restart")
    finally:
        results = load.stop()
    assert setup.workers()[index]["restarts"] == before["restarts"] + 1
    return results


def test_killed_worker_restarts_and_no_connection_is_refused(setup: Setup) -> None:
    drained = setup.endpoints[0]
    assert setup.ctl("drain", "app", drained).returncode == 0
    try:
        results = _restart(setup, 1, signal.SIGKILL)
        print(f"\nSIGKILL of a worker under load: {dict(results)}")
        assert results["refused"] == 0, results
        # At most the request each client had in flight on the killed worker.
        assert sum(n for k, n in results.items() if k != "ok") <= 2, results
        # The restarted worker was given the operator's directive.
        assert setup.hosts(1)[drained]["directive"] == "draining"
    finally:
        assert setup.ctl("activate", "app", drained).returncode == 0
    assert "nlbproxy_worker_restarts_total{worker=\"1\"} 1" in _metrics(setup)


def test_sigterm_of_a_worker_fails_no_request(setup: Setup) -> None:
    results = _restart(setup, 0, signal.SIGTERM)
    print(f"\nSIGTERM of a worker under load: {dict(results)}")
    assert set(results) == {"ok"}, results


def test_supervisor_stop_stops_the_workers(tmp_path: Path) -> None:
    farm = Farm(tmp_path)
    try:
        _, backend = farm.backend("b0")
        unit = farm.unit(unit_config([backend], extra_unit="workers = 2"))
        wait_until(lambda: len(get_json(unit.admin + "/api/v1/state")["workers"]) == 2
                   and fetch(unit, "x") == "b0", what="unit serving")
        pids = [w["pid"] for w in get_json(unit.admin + "/api/v1/state")["workers"]]
        unit.process.popen.send_signal(signal.SIGTERM)
        unit.process.popen.wait(30)
        wait_until(lambda: not any(_alive(pid) for pid in pids), what="workers gone")
    finally:
        farm.close()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that no longer reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    farm = Farm(tmp_path)
    try:
        _, backend = farm.backend("b0")
        unit = farm.unit(unit_config([backend], extra_unit="workers = 2"))
        wait_until(lambda: all(w["serving"] for w in get_json(unit.admin + "/api/v1/state")["workers"]),
                   what="workers serving")
        pids = [w["pid"] for w in get_json(unit.admin + "/api/v1/state")["workers"]]
        os.kill(unit.process.popen.pid, signal.SIGKILL)
        unit.process.popen.wait(10)
        # Orphans would keep the listening sockets open with nobody to restart them.
        wait_until(lambda: not any(_alive(pid) for pid in pids), what="orphaned workers gone")
    finally:
        farm.close()


def test_worker_0_shares_sessions_with_another_unit(tmp_path: Path) -> None:
    """A unit of two workers and a single-process unit, DAM peers: a session the
    application sets through one unit holds through the other, whichever worker."""
    farm = Farm(tmp_path)
    try:
        (tmp_path / "farm.key").write_bytes(SECRET)
        backends = [farm.backend(f"b{i}")[1] for i in range(3)]
        dam = [free_port(), free_port()]
        units = []
        for i, workers in enumerate((2, 1)):
            units.append(farm.unit(unit_config(
                backends, pools=POOL, name=f"u{i}",
                extra_unit=(f'workers = {workers}\nsecret_file = "farm.key"\n'
                            f'dam = "tcp:{dam[i]}:interface=127.0.0.1"\n'
                            f'peers = ["127.0.0.1:{dam[1 - i]}"]\nreplication = 1'),
            ), name=f"u{i}.toml"))
        units[0].process.wait_for(r"u0\.w0\.\d+ connected to u1")
        wait_until(lambda: all(w["serving"] for w in get_json(units[0].admin + "/api/v1/state")["workers"]),
                   what="workers serving")
        units[1].process.wait_for(r"farm known")
        for origin, other in ((1, 0), (0, 1)):
            name = _login(units[origin], f"user{origin}")
            wait_until(lambda o=other, n=name, i=origin: {fetch(units[o], f"p{k}", f"user{i}") for k in range(10)} == {n},
                       what=f"session set through unit {origin} honoured by unit {other}")
    finally:
        farm.close()


def _login(unit: Unit, user: str) -> str:
    """Logs in through ``unit``: the backend sets SID=user; returns the backend's name."""
    with urllib.request.urlopen(unit.url() + f"login/{user}", timeout=10) as response:
        assert (response.headers.get("Set-Cookie") or "").startswith(f"SID={user}")
        return response.read().split()[0].decode()
