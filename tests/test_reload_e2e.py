"""Reload and upgrade of a real ``twistd nlbproxy`` under load.

Client threads keep sending idempotent (GET) and non-idempotent (POST with a
body, checked by its digest) requests over keep-alive connections while the
unit reloads between two configs that move routes, pools and hosts, or while
the program upgrades itself onto its own listening sockets.  Every failed
request and every refused connection is counted; the tests want none.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from tests.realnet import DEADLINE, Farm, Unit, unit_config, wait_until

#: Concurrent client threads of the load.
CLIENTS = 6
#: Requests the load must have answered between two steps of a test, so
#: that every step happens under traffic.
REQUESTS_PER_STEP = 20


class Load:
    """Client threads sending GET and POST requests until stopped."""

    def __init__(self, port: int, paths: tuple[str, ...] = ("/",)) -> None:
        self.port = port
        self.paths = paths
        self.done = 0
        self.failures: list[str] = []
        self.refused = 0
        self.backends: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE)

    def _run(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
        n = 0
        while not self._stop.is_set():
            n += 1
            path = self.paths[n % len(self.paths)]
            body = f"client {index} request {n} ".encode() * (1 + n % 50)
            post = n % 2 == 0
            try:
                if post:
                    conn.request("POST", "/sha256", body=body)
                else:
                    conn.request("GET", path)
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    raise AssertionError(f"status {response.status}: {data[:200]!r}")
                if post and data.split() != [str(len(body)).encode(), hashlib.sha256(body).hexdigest().encode()]:
                    raise AssertionError(f"wrong digest {data[:200]!r}")
                backend = response.getheader("X-Backend", "?")
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                conn.close()
                continue
            except Exception as exc:  # every other failure counts, with what it was
                with self._lock:
                    self.failures.append(f"{'POST' if post else 'GET ' + path}: {exc!r}")
                conn.close()
                continue
            with self._lock:
                self.done += 1
                self.backends[backend] = self.backends.get(backend, 0) + 1
        conn.close()

    def wait_for_more(self, count: int = REQUESTS_PER_STEP) -> None:
        """Waits until ``count`` more requests have been answered."""
        target = self.done + count
        wait_until(lambda: self.done >= target or self.failures, what=f"{count} more requests")

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} failed requests of {self.done}: {self.failures[:5]}"
        assert self.refused == 0, f"{self.refused} refused connections"
        assert self.done > 0


def admin_post(unit: Unit, path: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(unit.admin + path, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def nlbctl(unit: Unit, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nlbproxy.ctl", "--admin", unit.admin, *args],
                          capture_output=True, text=True, timeout=60)


def state(unit: Unit) -> dict[str, object]:
    with urllib.request.urlopen(unit.admin + "/api/v1/state", timeout=DEADLINE) as response:
        document: dict[str, object] = json.loads(response.read())
    return document


def two_configs(b: list[str], port: int) -> tuple[str, str]:
    """Config A: web -> app (b0, b1), /x/ -> extra (b2).  Config B: app is
    (b1, b2), extra is gone, /x/ -> other (b0), and a second listener."""
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    a = unit_config(b[:2], endpoint=endpoint, routes='[[listener.route]]\npath_prefix = "/x/"\npool = "extra"\n',
                    pools=f'[pool.extra]\nhosts = ["{b[2]}"]\n')
    b_config = unit_config(
        b[1:], endpoint=endpoint, routes='[[listener.route]]\npath_prefix = "/x/"\npool = "other"\n',
        pools=f'balance = "round_robin"\n[pool.other]\nhosts = ["{b[0]}"]\n'
              '[[listener]]\nname = "side"\nendpoint = "tcp:0:interface=127.0.0.1"\npool = "other"\n',
    )
    return a, b_config


def free_fixed_port() -> int:
    from tests.realnet import free_port

    return free_port()


def start(farm: Farm, backends: int = 3) -> tuple[list[str], int]:
    names = [farm.backend(f"b{i}")[1] for i in range(backends)]
    return names, free_fixed_port()


def test_twenty_reloads_under_load_fail_nothing(farm: Farm) -> None:
    backends, port = start(farm)
    config_a, config_b = two_configs(backends, port)
    unit = farm.unit(config_a)
    path = farm.tmp / "unit.toml"
    with Load(unit.port(), ("/", "/x/y")) as load:
        load.wait_for_more()
        for i in range(20):
            path.write_text(config_b if i % 2 == 0 else config_a)
            # Alternate the two entry points: SIGHUP and the admin API.
            if i % 2 == 0:
                code, answer = admin_post(unit, "/api/v1/reload")
                assert code == 200, answer
                assert answer["reloaded"] is True
            else:
                before = unit.process.output().count("reloaded ")
                unit.process.signal(signal.SIGHUP)
                wait_until(lambda n=before: unit.process.output().count("reloaded ") > n, what="SIGHUP reload")
            load.wait_for_more()
    load.check()
    # Config A again: pool "extra" back, "other" and the side listener gone.
    document = state(unit)
    assert set(document["pools"]) == {"app", "extra"}  # type: ignore[call-overload]
    assert set(document["listeners"]) == {"web"}  # type: ignore[call-overload]
    assert set(load.backends) == {"b0", "b1", "b2"}


def test_reload_plan_and_refusals(farm: Farm) -> None:
    backends, port = start(farm)
    config_a, config_b = two_configs(backends, port)
    unit = farm.unit(config_a)
    path = farm.tmp / "unit.toml"
    path.write_text(config_b)
    result = nlbctl(unit, "reload", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["listeners"]["added"] == ["side"]
    assert plan["pools"] == {
        "added": ["other"], "removed": ["extra"],
        "changed": {"app": {"keys": ["balance"], "hosts_added": [backends[2]], "hosts_removed": [backends[0]],
                            "hosts_changed": []}},
    }
    side = wait_until(lambda: [line for line in unit.process.output().splitlines() if "listener side on" in line])
    side_url = side[-1].split(" on ")[-1].strip()
    with urllib.request.urlopen(side_url, timeout=DEADLINE) as response:
        assert response.headers["X-Backend"] == "b0"

    # An invalid file: refused with its one-line reason, the unit keeps serving config B.
    path.write_text(config_b.replace('pool = "other"\n', 'pool = "nowhere"\n', 1))
    result = nlbctl(unit, "reload")
    assert result.returncode == 1
    assert "nowhere" in result.stderr and "HTTP 409" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    unit.process.wait_for("reload refused, the old config keeps serving")
    with urllib.request.urlopen(unit.url() + "x/", timeout=DEADLINE) as response:
        assert response.headers["X-Backend"] == "b0"

    # What needs a restart is refused with the key and why, and nothing changes.
    path.write_text(config_a.replace('name = "test"', 'name = "renamed"'))
    code, answer = admin_post(unit, "/api/v1/reload")
    assert code == 409
    assert answer["reasons"] == [  # type: ignore[comparison-overlap]
        "unit.name: needs a restart (the unit's name is its identity to agents and other units "
        "(health node id, DAM origin))"
    ]
    assert set(state(unit)["pools"]) == {"app", "other"}  # type: ignore[call-overload]

    # SIGHUP with a bad file: logged, still serving.
    path.write_text("[unit\n")
    unit.process.signal(signal.SIGHUP)
    unit.process.wait_for(r"reload refused.*invalid TOML")
    with urllib.request.urlopen(unit.url(), timeout=DEADLINE) as response:
        assert response.status == 200


def test_upgrade_under_load_refuses_no_connection(farm: Farm) -> None:
    backends, port = start(farm)
    unit = farm.unit(unit_config(backends, endpoint=f"tcp:{port}:interface=127.0.0.1"))
    old_pid = unit.process.popen.pid

    def upgraded() -> list[int]:
        return [int(pid) for pid in re.findall(r"upgrade: process (\d+) serves", unit.process.output())]

    try:
        with Load(unit.port()) as load:
            load.wait_for_more()
            code, answer = admin_post(unit, "/api/v1/upgrade")
            assert code == 202, answer
            new_pid = answer["pid"]
            assert isinstance(new_pid, int) and new_pid != old_pid
            unit.process.wait_for(rf"upgrade: process {new_pid} serves")
            # The old process drains and exits; the new one serves on the same sockets.
            wait_until(lambda: unit.process.popen.poll() is not None, what="the old process to exit")
            assert unit.process.popen.returncode == 0, unit.process.output()
            load.wait_for_more()
            # And it can upgrade in turn (SIGUSR2 this time), onto the sockets it adopted.
            before = load.done
            os.kill(new_pid, signal.SIGUSR2)
            wait_until(lambda: upgraded()[1:], what="the second upgrade")
            wait_until(lambda: not _alive(new_pid), what="the second process to exit")
            load.wait_for_more()
        load.check()
        assert load.done > before
        assert state(unit)["unit"] == "test"  # the admin socket moved too
    finally:
        # The upgraded processes are the unit's children, not the farm's:
        # whatever happened, none outlives the test.
        for pid in upgraded():
            _kill(pid)


def test_upgrade_that_fails_keeps_the_old_process(farm: Farm) -> None:
    backends, port = start(farm, 1)
    path = farm.tmp / "unit.toml"
    unit = farm.unit(unit_config(backends, endpoint=f"tcp:{port}:interface=127.0.0.1"))
    # A broken file is refused before anything starts.
    path.write_text("[unit\n")
    result = nlbctl(unit, "upgrade")
    assert result.returncode == 1 and "invalid TOML" in result.stderr, result.stderr
    # A file whose new listener cannot be bound: the new program exits, the old one goes on.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        extra = (f'[[listener]]\nname = "more"\nendpoint = "tcp:{taken.getsockname()[1]}:interface=127.0.0.1"\n'
                 'pool = "app"\n')
        path.write_text(unit_config(backends, endpoint=f"tcp:{port}:interface=127.0.0.1", pools=extra))
        result = nlbctl(unit, "upgrade")
        assert result.returncode == 0, result.stderr
        unit.process.wait_for("upgrade failed: the new program exited before it served")
    with urllib.request.urlopen(unit.url(), timeout=DEADLINE) as response:
        assert response.status == 200
    assert unit.process.popen.poll() is None
    # A file that moves a listener: reload first.
    path.write_text(unit_config(backends, endpoint="tcp:0:interface=127.0.0.1"))
    code, answer = admin_post(unit, "/api/v1/upgrade")
    assert code == 409 and "listener web: the file moves the endpoint" in str(answer["error"]), answer


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of an exited child of an exited parent is reaped by init soon.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + DEADLINE
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
