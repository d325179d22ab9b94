"""TLS end to end: ``twistd nlbproxy`` terminating TLS, with real clients.

Clients: curl with ``--resolve`` (SNI, ALPN), Python's ``ssl`` (served
certificate, resumption, refused protocol versions), raw sockets (garbage
records).  Certificates are made per test by ``tests/certs.py``.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.certs import CA, leaf_names
from tests.realnet import Farm, Unit, free_port, unit_config, wait_until


def tls_unit(farm: Farm, ca: CA, certs: list[Path], backend: str | None = None, extra: str = "",
             name: str = "unit.toml", unit_name: str = "test") -> Unit:
    if backend is None:
        backend = farm.backend("b0")[1]
    files = ", ".join(f'"{c}"' for c in certs)
    return farm.unit(unit_config([backend], extra_listener=f"certificates = [{files}]\n{extra}", name=unit_name),
                     name)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "pki")


def standard_certs(ca: CA) -> list[Path]:
    return [
        ca.issue("a.pem", dns=["a.test", "www.a.test"]),
        ca.issue("b.pem", dns=["b.test"]),
        ca.issue("wild.pem", dns=["*.wild.test"]),
    ]


def client_context(ca: CA, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.file))
    for attr, version in versions.items():
        setattr(ctx, attr, version)
    return ctx


def served(unit: Unit, ca: CA, server_name: str | None) -> list[str]:
    """The SAN names of the certificate the unit serves for ``server_name`` (None: no SNI)."""
    ctx = client_context(ca)
    ctx.check_hostname = False
    with (socket.create_connection(("127.0.0.1", unit.port()), timeout=10) as raw,
          ctx.wrap_socket(raw, server_hostname=server_name) as tls):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return leaf_names(der)


def https_get(port: int, ctx: ssl.SSLContext, host: str, path: str = "/",
              session: ssl.SSLSession | None = None) -> tuple[str, ssl.SSLSession | None, bool]:
    """One request on a new connection; the body, the session to resume, whether this one resumed."""
    with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
          ctx.wrap_socket(raw, server_hostname=host, session=session) as tls):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        # TLS 1.3 tickets come after the handshake: read before asking.
        return data.decode(), tls.session, tls.session_reused


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


def admin_json(unit: Unit, path: str, method: str = "GET") -> dict:
    request = urllib.request.Request(unit.admin + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_sni_picks_the_certificate_and_the_default_serves_the_rest(farm: Farm, ca: CA) -> None:
    unit = tls_unit(farm, ca, standard_certs(ca))
    assert unit.url().startswith("https://")
    assert served(unit, ca, "a.test") == ["a.test", "www.a.test"]
    assert served(unit, ca, "www.a.test") == ["a.test", "www.a.test"]
    assert served(unit, ca, "b.test") == ["b.test"]
    assert served(unit, ca, "x.wild.test") == ["*.wild.test"]
    assert served(unit, ca, "B.Test") == ["b.test"]  # names are case-insensitive
    # Unknown names, a wildcard's own parent, deeper names and no SNI at all
    # get the first certificate.
    for name in ("unknown.test", "wild.test", "a.b.wild.test", None):
        assert served(unit, ca, name) == ["a.test", "www.a.test"], name


def test_curl_resolve_alpn_and_forwarded_proto(farm: Farm, ca: CA) -> None:
    unit = tls_unit(farm, ca, standard_certs(ca))
    port = unit.port()
    for name in ("a.test", "b.test", "x.wild.test"):
        result = curl("-v", "--cacert", str(ca.file), "--resolve", f"{name}:{port}:127.0.0.1",
                      f"https://{name}:{port}/headers")
        assert result.returncode == 0, result.stderr
        assert "ALPN: server accepted http/1.1" in result.stderr, result.stderr
        headers = {k.lower(): v for k, v in json.loads(result.stdout)}
        assert headers["x-forwarded-proto"] == "https"
        assert headers["host"] == f"{name}:{port}"
    # A name no certificate carries: curl gets the default one and refuses it.
    result = curl("--cacert", str(ca.file), "--resolve", f"other.test:{port}:127.0.0.1",
                  f"https://other.test:{port}/")
    assert result.returncode == 60, result.stderr  # peer certificate cannot be authenticated
    # A client offering only h2 still gets HTTP/1.1 (no ALPN, no failure).
    ctx = client_context(ca)
    ctx.set_alpn_protocols(["h2"])
    with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
          ctx.wrap_socket(raw, server_hostname="a.test") as tls):
        assert tls.selected_alpn_protocol() is None
        tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sessions_resume_on_the_unit(farm: Farm, ca: CA, version: ssl.TLSVersion) -> None:
    unit = tls_unit(farm, ca, standard_certs(ca))
    ctx = client_context(ca, minimum_version=version, maximum_version=version)
    body, session, reused = https_get(unit.port(), ctx, "a.test")
    assert body.startswith("HTTP/1.1 200") and not reused
    assert session is not None
    for name in ("a.test", "b.test"):
        # One listener, one session id context: a session resumes whatever
        # certificate the client's SNI picks.
        body, _, reused = https_get(unit.port(), ctx, name, session=session)
        assert body.startswith("HTTP/1.1 200") and reused, name
    counts = admin_json(unit, "/api/v1/certificates")["listeners"]["web"]["handshakes"]
    wait_until(lambda: admin_json(unit, "/api/v1/certificates")["listeners"]["web"]["handshakes"]["resumed"] == 2,
               what=f"two resumed handshakes counted ({counts})")


def test_sessions_do_not_resume_with_tickets_off(farm: Farm, ca: CA) -> None:
    unit = tls_unit(farm, ca, standard_certs(ca), extra='session_tickets = "off"\n')
    ctx = client_context(ca)
    _, session, _ = https_get(unit.port(), ctx, "a.test")
    body, _, reused = https_get(unit.port(), ctx, "a.test", session=session)
    assert body.startswith("HTTP/1.1 200") and not reused


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_protocol_versions_are_refused(farm: Farm, ca: CA, version: ssl.TLSVersion) -> None:
    unit = tls_unit(farm, ca, standard_certs(ca))
    ctx = client_context(ca, minimum_version=version, maximum_version=version)
    # Let the client offer the old version at all (OpenSSL 3 forbids it at
    # its default security level), so the refusal is the unit's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (socket.create_connection(("127.0.0.1", unit.port()), timeout=10) as raw,
          pytest.raises(ssl.SSLError) as error):
        ctx.wrap_socket(raw, server_hostname="a.test")
    reason = (error.value.reason or "").upper()
    assert "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason, error.value
    wait_until(lambda: admin_json(unit, "/api/v1/certificates")["listeners"]["web"]["handshakes"]["failed"] >= 1,
               what="the failed handshake counted")
    # A TLS 1.2 client with only CBC (non-AEAD) suites finds nothing in common.
    ctx = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    with socket.create_connection(("127.0.0.1", unit.port()), timeout=10) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="a.test")


def test_garbage_records_close_the_connection_and_others_are_served(farm: Farm, ca: CA) -> None:
    # A record announced longer than what follows (the third junk) leaves
    # OpenSSL waiting for the rest: the handshake deadline (header_timeout)
    # closes it.  Short here, and well inside the client's own timeout.
    unit = tls_unit(farm, ca, standard_certs(ca), extra="header_timeout = 2\n")
    for junk in (
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",  # plain HTTP to a TLS port
        b"\x16\x03\x01\x00\x10" + b"\xff" * 16,  # a handshake record of nonsense
        b"\x17\x03\x03\x40\x00" + b"\x00" * 64,  # application data before any handshake
        bytes(range(256)) * 4,
    ):
        with socket.create_connection(("127.0.0.1", unit.port()), timeout=10) as raw:
            raw.sendall(junk)
            received = b""
            try:
                while chunk := raw.recv(65536):  # the unit closes: recv returns b""
                    received += chunk
            except ConnectionResetError:
                pass  # closed with our junk unread: the kernel resets
            # At most a TLS alert record comes back, never HTTP.
            assert not received or received[0] == 0x15, received[:20]
        body, _, _ = https_get(unit.port(), client_context(ca), "b.test")
        assert body.startswith("HTTP/1.1 200")
    wait_until(lambda: admin_json(unit, "/api/v1/certificates")["listeners"]["web"]["handshakes"]["failed"] >= 4,
               what="four failed handshakes counted")
    with urllib.request.urlopen(unit.admin + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'nlbproxy_tls_handshakes_total{listener="web",kind="failed"} 4' in metrics, metrics


def test_reload_keeps_open_connections_and_refuses_a_bad_file(farm: Farm, ca: CA) -> None:
    certs = standard_certs(ca)
    unit = tls_unit(farm, ca, certs)
    ctx = client_context(ca)
    old = http.client.HTTPSConnection("127.0.0.1", unit.port(), context=ctx, timeout=10)
    ctx.check_hostname = False
    old.request("GET", "/first", headers={"Host": "a.test"})
    assert old.getresponse().read().endswith(b"GET /first\n")
    old_cert = old.sock.getpeercert(binary_form=True)

    # The operator renews a.pem with one more name and reloads.
    ca.issue("a.pem", dns=["a.test", "www.a.test", "new.test"])
    ctl = [sys.executable, "-m", "nlbproxy.ctl", "--admin", unit.admin]
    result = subprocess.run([*ctl, "reload-certs"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "new.test" in result.stdout
    assert served(unit, ca, "new.test") == ["a.test", "www.a.test", "new.test"]
    # The connection made before the reload goes on with its session.
    old.request("GET", "/second", headers={"Host": "a.test"})
    assert old.getresponse().read().endswith(b"GET /second\n")
    assert old.sock.getpeercert(binary_form=True) == old_cert

    # A broken file: the reload is refused with the file and the reason,
    # and the certificates in use stay.
    certs[1].write_text("not a certificate\n")
    result = subprocess.run([*ctl, "reload-certs"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert str(certs[1]) in result.stderr and "no PEM certificate" in result.stderr, result.stderr
    assert served(unit, ca, "b.test") == ["b.test"]
    ca.issue("b.pem", dns=["b.test"], with_key=False)
    result = subprocess.run([*ctl, "reload-certs"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "no private key" in result.stderr, result.stderr
    assert served(unit, ca, "new.test") == ["a.test", "www.a.test", "new.test"]
    old.request("GET", "/third", headers={"Host": "a.test"})
    assert old.getresponse().read().endswith(b"GET /third\n")
    old.close()


def test_a_bad_certificate_stops_the_start_with_file_key_and_reason(farm: Farm, ca: CA) -> None:
    good = ca.issue("good.pem", dns=["a.test"])
    other = CA(ca.directory / "other")
    mismatched = ca.directory / "mismatch.pem"
    # Leaf of one file, key of another.
    leaf = good.read_bytes().split(b"-----BEGIN PRIVATE KEY-----")[0]
    key = other.issue("x.pem", dns=["x.test"]).read_bytes().split(b"-----END CERTIFICATE-----\n")[-1]
    mismatched.write_bytes(leaf + key)
    config = farm.tmp / "bad.toml"
    config.write_text(unit_config(["127.0.0.1:9"], extra_listener=f'certificates = ["{good}", "{mismatched}"]\n'))
    proc = subprocess.run(["twistd", "-n", "--pidfile=", "nlbproxy", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{config}: listener[0].certificates[1]: {mismatched}: the private key does not match" in out, out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_farm_tickets_resume_on_another_unit(farm: Farm, ca: CA, version: ssl.TLSVersion) -> None:
    secret = farm.tmp / "secret"
    secret.write_bytes(b"farm secret shared by both units\n")
    backend = farm.backend("b0")[1]
    certs = standard_certs(ca)
    files = ", ".join(f'"{c}"' for c in certs)
    units = [
        farm.unit(unit_config([backend], extra_unit=f'secret_file = "{secret}"', name=f"u{i}",
                              extra_listener=f'certificates = [{files}]\nsession_tickets = "farm"\n'), f"u{i}.toml")
        for i in range(2)
    ]
    ctx = client_context(ca, minimum_version=version, maximum_version=version)
    body, session, reused = https_get(units[0].port(), ctx, "a.test")
    assert body.startswith("HTTP/1.1 200") and not reused
    for unit in (units[1], units[0], units[1]):
        body, session, reused = https_get(unit.port(), ctx, "b.test", session=session)
        assert body.startswith("HTTP/1.1 200") and reused, unit.url()
    for unit in units:
        assert "sessions keep OpenSSL's defaults" not in unit.process.output()


def test_unit_tickets_do_not_resume_on_another_unit(farm: Farm, ca: CA) -> None:
    backend = farm.backend("b0")[1]
    units = [tls_unit(farm, ca, standard_certs(ca), backend, name=f"u{i}.toml", unit_name=f"u{i}") for i in range(2)]
    ctx = client_context(ca)
    _, session, _ = https_get(units[0].port(), ctx, "a.test")
    _, _, reused = https_get(units[1].port(), ctx, "a.test", session=session)
    assert not reused
    _, _, reused = https_get(units[0].port(), ctx, "a.test", session=session)
    assert reused


def test_reload_keeps_tickets_good(farm: Farm, ca: CA) -> None:
    unit = tls_unit(farm, ca, standard_certs(ca))
    ctx = client_context(ca)
    _, session, _ = https_get(unit.port(), ctx, "a.test")
    admin_json(unit, "/api/v1/certificates/reload", "POST")
    _, _, reused = https_get(unit.port(), ctx, "a.test", session=session)
    assert reused


def backend_of(body: str) -> str:
    return body.split("\r\n\r\n", 1)[1].split()[0]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_session_affinity_holds_across_resumption_and_units(farm: Farm, ca: CA, version: ssl.TLSVersion) -> None:
    secret = farm.tmp / "secret"
    secret.write_bytes(b"farm secret shared by both units\n")
    backends = [farm.backend(f"b{i}")[1] for i in range(3)]
    files = ", ".join(f'"{c}"' for c in standard_certs(ca))
    dam_ports = [free_port(), free_port()]
    units = []
    for i in range(2):
        config = unit_config(
            backends, name=f"u{i}", pools='balance = "round_robin"\naffinity = "tls_session"\n',
            extra_listener=f'certificates = [{files}]\nsession_tickets = "farm"\n',
            extra_unit=(f'secret_file = "{secret}"\ndam = "tcp:{dam_ports[i]}:interface=127.0.0.1"\n'
                        f'peers = ["127.0.0.1:{dam_ports[1 - i]}"]\nreplication = 1'))
        units.append(farm.unit(config, f"u{i}.toml"))
    for unit in units:
        unit.process.wait_for(r"farm known")
    seen = set()
    for client in range(3):
        ctx = client_context(ca, minimum_version=version, maximum_version=version)
        body, session, reused = https_get(units[0].port(), ctx, "a.test")
        assert not reused
        host = backend_of(body)
        seen.add(host)
        for i in range(6):
            body, session, reused = https_get(units[i % 2].port(), ctx, "a.test", session=session)
            assert reused and backend_of(body) == host, (client, i, body)
    # Three new TLS sessions, round robin: three hosts.
    assert seen == {"b0", "b1", "b2"}
