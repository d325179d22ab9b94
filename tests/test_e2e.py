"""End to end: ``twistd nlbproxy`` on loopback with real clients and real servers.

Clients: curl, Python's http.client, raw sockets (pipelining, upgrade) and
wrk.  Servers: the stdlib backend in ``tests/backend.py``.  Each test builds
its own farm and tears it down, even on failure.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.backend import pattern_bytes
from tests.realnet import Farm, unit_config, wait_until
from tests.needs import need_commands


def three_backends(farm: Farm) -> list[str]:
    return [farm.backend(f"b{i}")[1] for i in range(3)]


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=timeout)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_twistd_lists_the_plugin() -> None:
    out = subprocess.run(["twistd", "--help"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\s+nlbproxy\s", out, re.M), out


def test_bad_config_fails_with_one_line(farm: Farm) -> None:
    path = farm.tmp / "bad.toml"
    path.write_text('[[listener]]\nname = "web"\nendpoint = "tcp:0"\npool = "nope"\nbogus = 1\n[pool.app]\n')
    proc = subprocess.run(["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert f"{path}: listener[0]" in proc.stderr + proc.stdout


def test_curl_keepalive_spreads_over_hosts(farm: Farm) -> None:
    unit = farm.unit(unit_config(three_backends(farm), pools='balance = "round_robin"'))
    url = unit.url()
    result = curl("-v", *[url + f"n{i}" for i in range(6)])
    assert result.returncode == 0, result.stderr
    names = re.findall(r"^(b\d) GET /n\d$", result.stdout, re.M)
    assert len(names) == 6 and set(names) == {"b0", "b1", "b2"}
    # One client connection carried all six requests.
    assert result.stderr.count("Connected to") == 1


def test_two_requests_on_one_connection_go_to_two_pools(farm: Farm) -> None:
    (_, a), (_, s) = farm.backend("app"), farm.backend("static")
    config = unit_config(
        [a],
        routes='[[listener.route]]\npath_prefix = "/static/"\npool = "static"\n',
        pools=f'[pool.static]\nhosts = ["{s}"]\n',
    )
    unit = farm.unit(config)
    conn = http.client.HTTPConnection("127.0.0.1", unit.port(), timeout=10)
    conn.request("GET", "/static/logo.png")
    first = conn.getresponse().read()
    conn.request("GET", "/index.html")
    second = conn.getresponse().read()
    assert first == b"static GET /static/logo.png\n"
    assert second == b"app GET /index.html\n"
    conn.close()


def test_forwarding_headers(farm: Farm) -> None:
    _, b = farm.backend("b")
    unit = farm.unit(unit_config([b]))
    conn = http.client.HTTPConnection("127.0.0.1", unit.port(), timeout=10)
    conn.request("GET", "/headers", headers={"X-Forwarded-For": "203.0.113.9", "Connection": "keep-alive, X-Secret", "X-Secret": "s"})
    response = conn.getresponse()
    seen = {k.lower(): v for k, v in json.loads(response.read())}
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["forwarded"] == "for=127.0.0.1;proto=http"
    assert seen["via"] == "1.1 test"
    assert "x-secret" not in seen and "connection" not in seen
    assert response.getheader("Via").endswith("1.1 test")


def test_pipelined_requests_answered_in_order(farm: Farm) -> None:
    unit = farm.unit(unit_config(three_backends(farm)))
    with socket.create_connection(("127.0.0.1", unit.port()), timeout=10) as sock:
        sock.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
        data = b""
        while data.count(b"GET /p") < 5:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    order = re.findall(rb"GET /p(\d)", data)
    assert order == [b"0", b"1", b"2", b"3", b"4"]


def test_large_download_and_upload(farm: Farm) -> None:
    _, b = farm.backend("b")
    unit = farm.unit(unit_config([b], extra_listener="max_body_bytes = 0"))
    size = 64 * 1024 * 1024
    out = farm.tmp / "down"
    result = curl("-o", str(out), unit.url() + f"bytes/{size}")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    chunked = curl("-o", str(out), unit.url() + f"chunked/{size // 8}")
    assert chunked.returncode == 0 and out.stat().st_size == size // 8
    upload = farm.tmp / "up"
    upload.write_bytes(pattern_bytes(size // 2))
    expected = f"{size // 2} {hashlib.sha256(upload.read_bytes()).hexdigest()}"
    # content-length upload, then chunked upload (curl -T - sends chunked from stdin)
    assert curl("--data-binary", f"@{upload}", unit.url() + "sha256").stdout.strip() == expected
    with upload.open("rb") as stdin:
        piped = subprocess.run(["curl", "-sS", "-T", "-", unit.url() + "sha256"], stdin=stdin,
                               capture_output=True, text=True, timeout=60)
    assert piped.stdout.strip() == expected


def test_websocket_upgrade_is_tunnelled(farm: Farm) -> None:
    _, b = farm.backend("b")
    unit = farm.unit(unit_config([b]))
    with socket.create_connection(("127.0.0.1", unit.port()), timeout=10) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"upgrade: websocket" in head.lower()
        sock.sendall(b"ping-frame")
        echoed = b""
        while len(echoed) < 10:
            echoed += sock.recv(4096)
        assert echoed == b"ping-frame"


def test_dead_host_is_retried_then_marked_down(farm: Farm) -> None:
    procs = [farm.backend(f"b{i}") for i in range(3)]
    unit = farm.unit(unit_config([b for _, b in procs]))
    procs[0][0].stop()
    statuses = [get(unit.url() + f"r{i}")[0] for i in range(30)]
    assert statuses == [200] * 30
    state = json.loads(urllib.request.urlopen(unit.admin + "/api/v1/state", timeout=10).read())
    assert state["pools"]["app"]["hosts"][procs[0][1]]["health"] == "down"
    for proc, _ in procs[1:]:
        proc.stop()
    assert get(unit.url())[0] == 502


def test_malformed_requests(farm: Farm) -> None:
    _, b = farm.backend("b")
    unit = farm.unit(unit_config([b], extra_listener="max_header_bytes = 2048"))

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", unit.port()), timeout=10) as sock:
            sock.sendall(data)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    assert raw(b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    assert raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nab").startswith(b"HTTP/1.1 400 ")
    # The unit still serves.
    assert get(unit.url())[0] == 200


def test_nlbctl_drain_and_activate(farm: Farm) -> None:
    backends = three_backends(farm)
    unit = farm.unit(unit_config(backends))
    ctl = [sys.executable, "-m", "nlbproxy.ctl", "--admin", unit.admin]
    drained = subprocess.run([*ctl, "drain", "app", backends[0]], capture_output=True, text=True, timeout=30)
    assert drained.returncode == 0, drained.stderr
    names = {get(unit.url() + f"d{i}")[1].split()[0] for i in range(30)}
    assert names == {"b1", "b2"}
    state = subprocess.run([*ctl, "state", "--json"], capture_output=True, text=True, timeout=30)
    assert json.loads(state.stdout)["pools"]["app"]["hosts"][backends[0]]["directive"] == "draining"
    subprocess.run([*ctl, "activate", "app", backends[0]], check=True, capture_output=True, timeout=30)
    names = {get(unit.url() + f"a{i}")[1].split()[0] for i in range(30)}
    assert names == {"b0", "b1", "b2"}


def test_metrics_are_prometheus_text(farm: Farm) -> None:
    _, b = farm.backend("b")
    unit = farm.unit(unit_config([b]))
    for _ in range(3):
        get(unit.url())
    text = urllib.request.urlopen(unit.admin + "/metrics", timeout=10).read().decode()
    assert re.search(rf'nlbproxy_requests_total{{pool="app",host="{re.escape(b)}",code="2xx"}} 3', text), text


def test_sigterm_finishes_in_flight_requests(farm: Farm) -> None:
    _, b = farm.backend("b")
    unit = farm.unit(unit_config([b]))
    conn = http.client.HTTPConnection("127.0.0.1", unit.port(), timeout=10)
    conn.request("GET", "/slow/700")
    wait_until(lambda: json.loads(urllib.request.urlopen(unit.admin + "/api/v1/state", timeout=5).read())
               ["pools"]["app"]["hosts"][b]["active_requests"] == 1, what="request in flight")
    unit.process.signal(signal.SIGTERM)
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"b slow\n"
    # twistd re-raises the signal that stopped it, as init systems expect.
    assert unit.process.popen.wait(15) in (0, -signal.SIGTERM)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", unit.port()), timeout=2)


def test_ipv6_listener_and_backend(farm: Farm) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.fail("IPv6 loopback is not available on this machine; CI must provide it")
    _, b = farm.backend("v6", host="::1")
    unit = farm.unit(unit_config([b], endpoint="tcp6:0:interface=\\\\:\\\\:1"))
    port = unit.port()
    result = curl("-g", f"http://[::1]:{port}/x")
    assert result.stdout == "v6 GET /x\n", result.stderr


def test_wrk_load_has_no_errors(farm: Farm) -> None:
    need_commands("wrk")
    unit = farm.unit(unit_config(three_backends(farm)))
    result = subprocess.run(["wrk", "-t1", "-c8", "-d2s", unit.url()], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Non-2xx" not in result.stdout and "Socket errors" not in result.stdout, result.stdout
    requests = int(re.search(r"(\d+) requests in", result.stdout).group(1))  # type: ignore[union-attr]
    assert requests > 100


def test_json_logs_carry_access_fields(farm: Farm) -> None:
    _, b = farm.backend("b")
    path = farm.tmp / "unit.toml"
    path.write_text(unit_config([b], extra_unit='access_log = "-"'))
    process = farm.start(["twistd", "-n", "--pidfile=", "--logger=nlbproxy.logs.json_observer",
                          "nlbproxy", "--config", str(path)])
    started = json.loads(process.wait_for(r"listener \{name\} on \{url\}").string)
    assert get(started["url"] + "j")[0] == 200
    line = process.wait_for(r'"access":').string
    event = json.loads(line)
    assert event["access"]["target"] == "/j" and event["access"]["status"] == 200
    assert event["access"]["pool"] == "app" and event["access"]["host"] == b
