"""TLS to hosts: pools with ``tls`` against Python's own TLS server (tests/tls_backend.py).

A host whose certificate chains to the pool's CA and names what the pool
expects answers through the unit; an expired certificate, a wrong name or an
unknown CA is a 502 with the reason in the unit's log and a counted error,
never a plain-text retry.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.certs import CA
from tests.realnet import Farm, Unit, unit_config


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "pki")


def tls_backend(farm: Farm, name: str, pem: Path) -> str:
    process = farm.start([sys.executable, "-m", "tests.tls_backend", "127.0.0.1", "0", name, str(pem)])
    port = process.wait_for(r"^ready (\d+)").group(1)
    return f"127.0.0.1:{port}"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def state(unit: Unit) -> dict:
    with urllib.request.urlopen(unit.admin + "/api/v1/state", timeout=10) as response:
        return json.loads(response.read())


def pool_unit(farm: Farm, backend: str, tls: str) -> Unit:
    return farm.unit(unit_config([backend], pools=f"tls = {tls}\n"))


def test_verified_backend_answers_and_its_connection_is_reused(farm: Farm, ca: CA) -> None:
    backend = tls_backend(farm, "secure", ca.issue("backend.pem", dns=["backend.test"]))
    unit = pool_unit(farm, backend, f'{{ ca_file = "{ca.file}", server_name = "backend.test" }}')
    for i in range(3):
        status, body = get(unit.url() + f"r{i}")
        assert (status, body) == (200, f"secure GET /r{i}\n")
    host = state(unit)["pools"]["app"]["hosts"][backend]
    # Three requests, one after the other: one kept-alive TLS connection.
    assert host["connections"] == {"open": 1, "idle": 1}, host


def test_without_server_name_the_certificate_must_carry_the_host_ip(farm: Farm, ca: CA) -> None:
    good = tls_backend(farm, "by-ip", ca.issue("ip.pem", dns=["backend.test"], ips=["127.0.0.1"]))
    unit = pool_unit(farm, good, f'{{ ca_file = "{ca.file}" }}')
    assert get(unit.url()) == (200, "by-ip GET /\n")
    named_only = tls_backend(farm, "named", ca.issue("named.pem", dns=["backend.test"]))
    unit = pool_unit(farm, named_only, f'{{ ca_file = "{ca.file}" }}')
    status, body = get(unit.url())
    assert (status, body) == (502, "tls_verify\n")
    unit.process.wait_for(r"tls_verify from .*certificate does not match '127\.0\.0\.1'")


@pytest.mark.parametrize("case", ["expired", "wrong_name", "unknown_ca"])
def test_a_backend_failing_verification_is_a_502_with_the_reason(farm: Farm, ca: CA, case: str) -> None:
    if case == "expired":
        pem, reason = ca.issue("old.pem", dns=["backend.test"], expired=True), "certificate has expired"
    elif case == "wrong_name":
        pem, reason = ca.issue("other.pem", dns=["other.test"]), "certificate does not match 'backend.test'"
    else:
        pem, reason = CA(ca.directory / "rogue", "rogue CA").issue("rogue.pem", dns=["backend.test"]), "(self-signed certificate in certificate chain|unable to get local issuer)"
    backend = tls_backend(farm, "bad", pem)
    unit = pool_unit(farm, backend, f'{{ ca_file = "{ca.file}", server_name = "backend.test" }}')
    for _ in range(2):
        assert get(unit.url() + "secret") == (502, "tls_verify\n")
    unit.process.wait_for(rf"answering 502 after tls_verify from .*{reason}")
    host = state(unit)["pools"]["app"]["hosts"][backend]
    assert host["connections"]["open"] == 0


def test_verify_false_encrypts_without_checking(farm: Farm, ca: CA) -> None:
    backend = tls_backend(farm, "lax", CA(ca.directory / "rogue").issue("rogue.pem", dns=["x.test"], expired=True))
    unit = pool_unit(farm, backend, "{ verify = false }")
    assert get(unit.url()) == (200, "lax GET /\n")


def test_a_plain_http_backend_behind_a_tls_pool_is_a_502(farm: Farm, ca: CA) -> None:
    _, plain = farm.backend("plain")
    unit = pool_unit(farm, plain, f'{{ ca_file = "{ca.file}", server_name = "backend.test" }}')
    status, body = get(unit.url())
    assert (status, body) == (502, "tls_handshake\n")
