"""Real processes on loopback for end-to-end tests: backends and balancing units.

Every process started here is registered with the caller's cleanup list and
killed even when the test fails; readiness is polled from the process's own
output with a deadline, never waited for with a sleep.  Ports are picked by
the kernel (port 0) and read back from what the process prints.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from nlbproxy.health.codec import SENDER_AGENT_KINDS, Codec
from nlbproxy.health.messages import Envelope, node_id

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0


def wait_until(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Polls ``predicate`` until it returns something true, or fails after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Process:
    """A child process whose output is collected line by line."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.args = args
        self.popen = subprocess.Popen(
            args, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                self._reader.join(2)
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                raise AssertionError(f"{self.args[:3]} exited {self.popen.returncode}:\n{self.output()}")
            return None

        return wait_until(found, timeout, f"{pattern!r} from {self.args[:3]}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGKILL)
        self.popen.wait(10)
        self._reader.join(2)


class Farm:
    """Backends and units of one test; ``close()`` kills them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[Process] = []

    def start(self, args: list[str]) -> Process:
        process = Process(args)
        self.processes.append(process)
        return process

    def backend(self, name: str, host: str = "127.0.0.1") -> tuple[Process, str]:
        """A stdlib HTTP/1.1 backend (tests/backend.py); returns it and its "ip:port"."""
        process = self.start([sys.executable, "-m", "tests.backend", host, "0", name])
        port = process.wait_for(r"^ready (\d+)").group(1)
        return process, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    def unit(self, config: str, name: str = "unit.toml") -> Unit:
        path = self.tmp / name
        path.write_text(config)
        process = self.start(["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(path)])
        return Unit(process)

    def close(self) -> None:
        for process in self.processes:
            process.stop()


class Unit:
    """A running ``twistd nlbproxy``, with the URLs it printed."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.admin = process.wait_for(r"admin API on (\S+)").group(1).rstrip("/")
        self.urls = dict(re.findall(r"listener (\S+) on (\S+)", process.output()))

    def url(self, listener: str = "web") -> str:
        return self.urls[listener]

    def port(self, listener: str = "web") -> int:
        return int(self.urls[listener].rstrip("/").rsplit(":", 1)[1])


def unit_config(backends: list[str], *, extra_unit: str = "", extra_listener: str = "",
                routes: str = "", pools: str = "", endpoint: str = "tcp:0:interface=127.0.0.1",
                name: str = "test") -> str:
    """A unit config with one listener "web" in front of pool "app"."""
    hosts = ", ".join(f'"{b}"' for b in backends)
    return (
        f'[unit]\nname = "{name}"\nadmin = "tcp:0:interface=127.0.0.1"\n{extra_unit}\n'
        f'[[listener]]\nname = "web"\nendpoint = "{endpoint}"\npool = "app"\n{extra_listener}\n'
        f"{routes}\n"
        f"[pool.app]\nhosts = [{hosts}]\n{pools}\n"
    )


def agent_config(name: str, units: list[str], apps: list[tuple[str, str]], secret_file: str,
                 check: str = "") -> str:
    """An agent config: ``apps`` are (pool, "ip:port") pairs; ``check`` an inline table or ""."""
    unit_list = ", ".join(f'"{u}"' for u in units)
    text = (f'[agent]\nname = "{name}"\nunits = [{unit_list}]\napi = "tcp:0:interface=127.0.0.1"\n'
            f'secret_file = "{secret_file}"\n')
    for app, endpoint in apps:
        text += f'\n[[app]]\nname = "{app}"\nendpoint = "{endpoint}"\ncapacity = 50\n'
        if check:
            text += f"check = {check}\n"
    return text


def start_agent(farm: Farm, config: str, name: str) -> tuple[Process, str]:
    """A running ``twistd nlbagent``; returns it and its API URL."""
    path = farm.tmp / f"{name}.toml"
    path.write_text(config)
    process = farm.start(["twistd", "-n", "--pidfile=", "nlbagent", "--config", str(path)])
    api = process.wait_for(rf"agent {name} api on (\S+)").group(1).rstrip("/")
    return process, api


def free_port(udp: bool = False) -> int:
    """A port the kernel has just handed out, for configs that must name a
    peer's port before that peer runs (a restarted unit keeps its ports)."""
    with socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WallClock:
    def seconds(self) -> float:
        return time.time()


class UnitSocket:
    """A balancing unit's health socket in a test: the real codec over a
    loopback UDP socket, so agents are tested against the wire format itself."""

    def __init__(self, secret: bytes, name: str = "fake-unit") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.codec = Codec(secret, WallClock())
        self.id = node_id(name)
        self.epoch = int(time.time() * 1000)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, address: tuple[str, int], message: Any) -> None:
        self.seq += 1
        envelope = Envelope(self.id, self.epoch, self.seq, int(time.time() * 1000), message)
        self.sock.sendto(self.codec.encode(envelope), address)

    def receive(self) -> list[tuple[tuple[str, int], Any]]:
        """Every datagram waiting, as (source, envelope or None if dropped)."""
        out = []
        while True:
            try:
                datagram, source = self.sock.recvfrom(65536)
            except BlockingIOError:
                return out
            out.append((source, self.codec.decode(datagram, SENDER_AGENT_KINDS)))
