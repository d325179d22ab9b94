"""End to end: SOAP through a real ``twistd nlbproxy`` unit.

Servers: spyne SOAP 1.1 and SOAP 1.2 services (``tests/soapapps.py``) as
backend processes on loopback.  Client: zeep, with its WSDL fetched through
the unit (a GET, routed without reading any envelope); hostile envelopes go
out over plain ``http.client``, since no SOAP library would send them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
import zeep
import zeep.exceptions

from nlbproxy import limits
from nlbproxy.routers.soap import SOAP11_NS, SOAP12_NS
from tests.realnet import Farm

NS = "urn:nlb:calc"
CONTENT_TYPE = {"11": "text/xml; charset=utf-8", "12": "application/soap+xml; charset=utf-8"}
ENVELOPE_NS = {"11": SOAP11_NS, "12": SOAP12_NS}


def soap_backend(farm: Farm, version: str, name: str) -> str:
    process = farm.start([sys.executable, "-m", "tests.soapapps", version, name])
    port = process.wait_for(r"^ready (\d+)").group(1)
    return f"127.0.0.1:{port}"


def soap_unit(farm: Farm, pools: dict[str, list[str]], routes: str = "") -> Any:
    """A unit with one SOAP listener "soap" whose default pool is "calc"."""
    text = (
        '[unit]\nname = "soap-test"\nadmin = "tcp:0:interface=127.0.0.1"\n'
        '[[listener]]\nname = "soap"\nendpoint = "tcp:0:interface=127.0.0.1"\nprotocol = "soap"\n'
        f'pool = "calc"\n{routes}\n'
    )
    for pool, hosts in pools.items():
        text += f'[pool.{pool}]\nhosts = [{", ".join(json.dumps(h) for h in hosts)}]\n'
    return farm.unit(text)


def client(unit: Any) -> Any:
    """A zeep client whose WSDL and calls all go through the unit."""
    wsdl = zeep.Client(unit.url("soap") + "?wsdl")
    return wsdl.create_service(f"{{{NS}}}Calc", unit.url("soap"))


def state(unit: Any) -> dict[str, Any]:
    with urllib.request.urlopen(unit.admin + "/api/v1/state", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def post(unit: Any, body: bytes, content_type: str, soapaction: str | None = None) -> tuple[int, str, bytes]:
    """One raw POST through the unit: status, content type, body."""
    conn = http.client.HTTPConnection("127.0.0.1", unit.port("soap"), timeout=10)
    headers = {"Content-Type": content_type}
    if soapaction is not None:
        headers["SOAPAction"] = soapaction
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def fault_of(body: bytes) -> tuple[str, str]:
    """The code and reason of a Fault body (the unit's own output)."""
    root = ET.fromstring(body)
    if root.tag == f"{{{SOAP11_NS}}}Envelope":
        fault = root.find(f".//{{{SOAP11_NS}}}Fault")
        assert fault is not None
        return fault.findtext("faultcode") or "", fault.findtext("faultstring") or ""
    env = f"{{{SOAP12_NS}}}"
    return (root.findtext(f".//{env}Code/{env}Value") or "", root.findtext(f".//{env}Reason/{env}Text") or "")


def envelope(version: str, operation: str = f'<m:whoami xmlns:m="{NS}"/>', header: str = "",
             prolog: str = "") -> bytes:
    head = f"<s:Header>{header}</s:Header>" if header else ""
    return (f'{prolog}<s:Envelope xmlns:s="{ENVELOPE_NS[version]}">{head}'
            f"<s:Body>{operation}</s:Body></s:Envelope>").encode()


@pytest.fixture(params=["11", "12"], ids=["soap11", "soap12"])
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_routes_by_action_and_by_operation(farm: Farm, version: str) -> None:
    default, adds, subs = (soap_backend(farm, version, name) for name in ("default", "adder", "subber"))
    # SOAP 1.1 carries the action in SOAPAction, SOAP 1.2 in the action
    # parameter of its Content-Type: the one key reads both.
    unit = soap_unit(
        farm, {"calc": [default], "adds": [adds], "subs": [subs]},
        '[[listener.route]]\nsoap_action = "add"\npool = "adds"\n'
        f'[[listener.route]]\nsoap_operation = "{{{NS}}}sub"\npool = "subs"\n',
    )
    calc = client(unit)
    for _ in range(3):
        assert calc.add(2, 3) == "adder 5"
        assert calc.sub(2, 3) == "subber -1"
        assert calc.whoami() == "default"


def test_the_body_reaches_the_host_unchanged(farm: Farm, version: str) -> None:
    unit = soap_unit(farm, {"calc": [soap_backend(farm, version, "only")]})
    # Longer than the prefix the unit reads before routing: the rest streams.
    text = "".join(chr(0x41 + i % 26) for i in range(3 * limits.MAX_SOAP_PREFIX))
    body = envelope(version, f'<m:digest xmlns:m="{NS}"><m:text>{text}</m:text></m:digest>',
                    prolog='<?xml version="1.0" encoding="utf-8"?>\n')
    status, ctype, answer = post(unit, body, CONTENT_TYPE[version] + ('; action="digest"' if version == "12" else ""),
                                 '"digest"' if version == "11" else None)
    assert status == 200, answer
    assert f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode() in answer
    length, _ = client(unit).digest("x" * 100_000).split()
    assert int(length) > 100_000


def test_service_faults_are_answers_not_host_failures(farm: Farm, version: str) -> None:
    hosts = [soap_backend(farm, version, f"h{i}") for i in range(2)]
    unit = soap_unit(farm, {"calc": hosts})
    calc = client(unit)
    faults = 40
    for i in range(faults):
        with pytest.raises(zeep.exceptions.Fault) as caught:
            calc.fail(f"no {i}")
        assert caught.value.message.endswith(f": no {i}")
    status, ctype, body = post(unit, envelope(version, f'<m:fail xmlns:m="{NS}"><m:reason>raw</m:reason></m:fail>'),
                               CONTENT_TYPE[version], '"fail"' if version == "11" else None)
    assert (status, ctype.split(";")[0]) == (500, CONTENT_TYPE[version].split(";")[0])
    assert fault_of(body)[1].endswith(": raw")
    hosts_state = state(unit)["pools"]["calc"]["hosts"]
    assert {host: h["health"] for host, h in hosts_state.items()} == dict.fromkeys(hosts, "up")
    # Each fault was answered once by one host: none was retried elsewhere.
    # (spyne's WSDL names the address it was first fetched from: the unit.)
    direct = [zeep.Client(f"http://{host}/?wsdl").create_service(f"{{{NS}}}Calc", f"http://{host}/")
              for host in hosts]
    served = sum(int(service.failures()) for service in direct)
    assert served == faults + 1
    assert all(h["requests"] > 0 for h in hosts_state.values())
    assert calc.add(1, 1).endswith(" 2")


HOSTILE = {
    "not xml": (b"this is not XML at all", "malformed XML"),
    "truncated": (b"<s:Envelope xmlns:s='%(ns)s'><s:Body>", "malformed XML"),
    "wrong namespace": (b"<s:Envelope xmlns:s='urn:not-soap'><s:Body/></s:Envelope>", "unknown SOAP envelope"),
    "billion laughs": (
        b'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY a "aaaaaaaaaa">'
        + b"".join(b'<!ENTITY %c "%s">' % (98 + i, (b"&%c;" % (97 + i)) * 10) for i in range(9))
        + b"]><s:Envelope xmlns:s='%(ns)s'><s:Body><m:x xmlns:m='urn:m'>&j;</m:x></s:Body></s:Envelope>",
        "document type declaration",
    ),
    "quadratic blowup": (
        b'<!DOCTYPE s:Envelope [<!ENTITY a "' + b"A" * 30_000 + b'">]>'
        b"<s:Envelope xmlns:s='%(ns)s'><s:Body><m:x xmlns:m='urn:m'>" + b"&a;" * 1000 + b"</m:x></s:Body></s:Envelope>",
        "document type declaration",
    ),
    "external entity": (
        b'<!DOCTYPE s:Envelope [<!ENTITY e SYSTEM "http://127.0.0.1:%(trap)d/x">]>'
        b"<s:Envelope xmlns:s='%(ns)s'><s:Body><m:x xmlns:m='urn:m'>&e;</m:x></s:Body></s:Envelope>",
        "document type declaration",
    ),
    "deep nesting": (
        b"<s:Envelope xmlns:s='%(ns)s'><s:Header>" + b"<h:n xmlns:h='urn:h'>" * 5000 + b"</s:Header>",
        "deeper than",
    ),
    "oversize envelope": (
        b"<s:Envelope xmlns:s='%(ns)s'><s:Header><h:pad xmlns:h='urn:h'>"
        + b"p" * (limits.MAX_SOAP_PREFIX + 1000) + b"</h:pad></s:Header><s:Body/></s:Envelope>",
        "no operation within the first",
    ),
}


@pytest.fixture
def trap() -> Iterator[tuple[int, list[Any]]]:
    """A loopback port that records every connection made to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    hits: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                hits.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], hits
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        for conn in hits:
            conn.close()


def test_malformed_and_hostile_envelopes_get_a_fault_of_their_version(
    farm: Farm, version: str, trap: tuple[int, list[Any]]
) -> None:
    hosts = [soap_backend(farm, version, "h")]
    unit = soap_unit(farm, {"calc": hosts})
    calc = client(unit)
    assert calc.whoami() == "h"
    before = state(unit)["pools"]["calc"]["hosts"][hosts[0]]["requests"]
    port, hits = trap
    expected_code = {"11": "soap:Client", "12": "env:Sender"}[version]
    for what, (template, words) in HOSTILE.items():
        body = template % {b"ns": ENVELOPE_NS[version].encode(), b"trap": port}
        status, ctype, answer = post(unit, body, CONTENT_TYPE[version], '""' if version == "11" else None)
        code, reason = fault_of(answer)
        if what == "wrong namespace":
            assert code.endswith("VersionMismatch"), (what, answer)
        else:
            assert code == expected_code, (what, answer)
        assert (status, ctype) == ({"11": 500, "12": 400 if what != "wrong namespace" else 500}[version],
                                   CONTENT_TYPE[version]), (what, answer)
        assert words in reason, (what, reason)
        # The unit goes on serving others.
        assert calc.whoami() == "h", what
    # None of them reached the host, and nothing was fetched.
    after = state(unit)["pools"]["calc"]["hosts"][hosts[0]]["requests"]
    assert after - before == len(HOSTILE)  # the whoami calls only
    assert hits == []


def test_a_version_mismatch_between_binding_and_envelope(farm: Farm) -> None:
    unit = soap_unit(farm, {"calc": [soap_backend(farm, "12", "h")]})
    status, ctype, answer = post(unit, envelope("12"), CONTENT_TYPE["11"], '"whoami"')
    assert (status, ctype) == (500, CONTENT_TYPE["12"])
    assert fault_of(answer)[0] == "env:VersionMismatch"


def test_a_client_waiting_for_100_continue_gets_it(farm: Farm) -> None:
    # Many SOAP stacks send "Expect: 100-continue"; the unit must read the
    # envelope before it picks a host, so it gives the go-ahead itself.
    unit = soap_unit(farm, {"calc": [soap_backend(farm, "11", "h")]})
    body = farm.tmp / "call.xml"
    body.write_bytes(envelope("11"))
    result = subprocess.run(
        ["curl", "-sS", "-v", "--expect100-timeout", "30", "-H", "Content-Type: text/xml",
         "-H", 'SOAPAction: "whoami"', "-H", "Expect: 100-continue", "--data-binary", f"@{body}",
         unit.url("soap")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "< HTTP/1.1 100 Continue" in result.stderr
    assert ">h</" in result.stdout
