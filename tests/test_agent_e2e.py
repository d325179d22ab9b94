"""The real ``twistd -n nlbagent --config FILE`` against a fake balancing unit.

The fake unit is a UDP socket in the test that decodes the agent's datagrams
with the real :class:`~nlbproxy.health.codec.Codec` and the same secret, and
answers as a unit would.  The agent's checked application is a real backend
(``tests/backend.py``).  Ports are picked by the kernel; processes are killed
in teardown even when a test fails; waiting is polling with deadlines.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nlbproxy.health.messages import (
    Directive,
    Envelope,
    GetSnapshot,
    Goodbye,
    Health,
    Heartbeat,
    Message,
    Postulate,
    PostulateWrong,
    RowChange,
    RowKey,
    SendSnapshot,
    node_id,
)
from tests.realnet import DEADLINE, Farm, Process, UnitSocket, wait_until

SECRET = b"\x00e2e shared secret\xff\n"


class FakeUnit(UnitSocket):
    """A balancing unit's health socket, as far as these tests need one."""

    def __init__(self, secret: bytes) -> None:
        super().__init__(secret)
        #: (monotonic arrival time, source address, envelope), in order.
        self.received: list[tuple[float, tuple[str, int], Envelope]] = []

    def drain(self) -> None:
        for source, envelope in self.receive():
            assert envelope is not None, f"undecodable datagram, drops {self.codec.drops}"
            self.received.append((time.monotonic(), source, envelope))

    def mark(self) -> int:
        self.drain()
        return len(self.received)

    def wait_for(
        self, predicate: Callable[[Message], bool], after: int = 0, what: str = "a message", timeout: float = DEADLINE
    ) -> tuple[float, tuple[str, int], Any]:
        """The first (arrival, source, envelope) after ``after`` whose message
        matches; the envelope is ``Any`` so tests read the fields they know."""
        def found() -> Any:
            self.drain()
            for item in self.received[after:]:
                if predicate(item[2].message):
                    return item
            return None

        return wait_until(found, timeout, what)



@pytest.fixture
def unit() -> Iterator[FakeUnit]:
    u = FakeUnit(SECRET)
    try:
        yield u
    finally:
        u.close()


def start_agent(farm: Farm, unit: FakeUnit, backend: str) -> tuple[Process, str]:
    """A running agent with apps "web" (checked, on ``backend``) and "api"; its API URL."""
    (farm.tmp / "health.key").write_bytes(SECRET)
    config = farm.tmp / "agent.toml"
    config.write_text(
        f'[agent]\nname = "host-e2e"\nunits = ["127.0.0.1:{unit.address[1]}"]\n'
        f'api = "tcp:0:interface=127.0.0.1"\nsecret_file = "health.key"\n\n'
        f'[[app]]\nname = "web"\nendpoint = "{backend}"\ncapacity = 30\n'
        f'check = {{ path = "/healthz", interval = 0.2, rise = 1, fall = 1, timeout = 0.5 }}\n\n'
        f'[[app]]\nname = "api"\nendpoint = "127.0.0.1:9"\n'
    )
    process = farm.start(["twistd", "-n", "--pidfile=", "nlbagent", "--config", str(config)])
    api = process.wait_for(r"agent host-e2e api on (\S+)").group(1).rstrip("/")
    process.wait_for(rf"health to 127\.0\.0\.1:{unit.address[1]}")
    return process, api


def put(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rows_of(message: Message) -> dict[RowKey, Any]:
    if isinstance(message, RowChange):
        return {op.key: op.row for op in message.ops}
    if isinstance(message, SendSnapshot):
        return {row.key: row for row in message.rows}
    return {}


def test_twistd_lists_the_agent_plugin() -> None:
    out = subprocess.run(["twistd", "--help"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\s+nlbagent\s", out, re.M), out


def test_bad_config_fails_with_one_line(farm: Farm) -> None:
    path = farm.tmp / "bad.toml"
    path.write_text('[agent]\nname = "h"\nunits = ["127.0.0.1:1"]\nsecret_file = "k"\nhandoff = "x"\n'
                    '[[app]]\nname = "a"\nendpoint = "127.0.0.1:2"\n')
    proc = subprocess.run(["twistd", "-n", "--pidfile=", "nlbagent", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert f"{path}: agent.handoff: expected a 'tcp:', 'tcp6:' or 'unix:' endpoint, got 'x'" in proc.stderr + proc.stdout


def test_agent_talks_to_a_unit(farm: Farm, unit: FakeUnit) -> None:
    backend_process, backend = farm.backend("app")
    agent, api = start_agent(farm, unit, backend)
    web, other = RowKey("web", backend), RowKey("api", "127.0.0.1:9")

    # Heartbeats: named first, then every 0.25 s.
    first = unit.wait_for(lambda m: isinstance(m, Heartbeat), what="a heartbeat")
    assert first[2].message.name == "host-e2e"
    assert first[2].sender == node_id("host-e2e")
    agent_address = first[1]
    mark = unit.mark()
    unit.wait_for(lambda m: isinstance(m, Heartbeat), after=mark + 3, what="four more heartbeats")
    beats = [t for t, _, e in unit.received[mark:] if isinstance(e.message, Heartbeat)]
    assert 0.1 < (beats[-1] - beats[0]) / (len(beats) - 1) < 0.5, beats

    # The check of the backend passes: the web row comes up.
    unit.wait_for(lambda m: rows_of(m).get(web) is not None and rows_of(m)[web].health == Health.UP,
                  what="web up after its first check")

    # A snapshot on request, to the asking address, matching the heartbeats.
    mark = unit.mark()
    unit.send(agent_address, GetSnapshot(77))
    _, _, envelope = unit.wait_for(lambda m: isinstance(m, SendSnapshot), after=mark, what="a snapshot")
    snapshot = envelope.message
    assert (snapshot.nonce, snapshot.part, snapshot.parts) == (77, 0, 1)
    rows = rows_of(snapshot)
    assert set(rows) == {web, other}
    assert (rows[web].capacity, rows[other].capacity) == (30, 50)
    _, _, beat = unit.wait_for(lambda m: isinstance(m, Heartbeat), after=unit.mark(), what="a heartbeat")
    if beat.message.generation == snapshot.generation:
        assert beat.message.checksum == snapshot.checksum

    # The application reports down: a row change within 0.5 s.
    mark = unit.mark()
    started = time.monotonic()
    code, answer = put(f"{api}/v1/apps/api", b'{"health": "down", "reason": "e2e"}')
    assert code == 200 and answer["rows"][0]["health"] == "down"
    arrived, _, envelope = unit.wait_for(
        lambda m: rows_of(m).get(other) is not None and rows_of(m)[other].health == Health.DOWN,
        after=mark, what="a row change with api down")
    assert arrived - started < 0.5
    assert envelope.message.ops[0].row.reason == "app down: e2e"

    # The operator drains web; the unit disagrees once, then the cycle completes.
    mark = unit.mark()
    code, _ = put(f"{api}/v1/apps/web/directive", b"draining")
    assert code == 200
    unit.wait_for(lambda m: isinstance(m, Postulate) and m.key == web, after=mark, what="a postulate")
    unit.send(agent_address, PostulateWrong(web, Directive.DRAINING, Directive.ACTIVE))
    mark = unit.mark()
    unit.wait_for(lambda m: isinstance(m, Postulate) and m.key == web, after=mark, what="a second postulate")
    unit.wait_for(lambda m: rows_of(m).get(web) is not None and rows_of(m)[web].current == Directive.DRAINING,
                  after=mark, what="draining made current")

    # The backend dies: the agent's check takes web down on its own.
    mark = unit.mark()
    backend_process.stop()
    _, _, envelope = unit.wait_for(
        lambda m: rows_of(m).get(web) is not None and rows_of(m)[web].health == Health.DOWN,
        after=mark, what="web down after its backend died")
    assert "check failed" in rows_of(envelope.message)[web].reason

    # SIGTERM: goodbye, and a clean exit.
    mark = unit.mark()
    agent.signal(signal.SIGTERM)
    unit.wait_for(lambda m: isinstance(m, Goodbye), after=mark, what="a goodbye")
    # twistd re-raises the signal that stopped it, as init systems expect.
    assert agent.popen.wait(DEADLINE) in (0, -signal.SIGTERM), agent.output()
    assert "Traceback" not in agent.output(), agent.output()
