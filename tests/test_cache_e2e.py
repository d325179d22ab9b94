"""End to end: the response cache and request filtering of a real ``twistd
nlbproxy`` unit, driven by curl and ``nlbctl`` against the stdlib backend
(``tests/backend.py``, whose ``/cached/`` answers count what reached it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from urllib.parse import quote

from tests.realnet import Farm, Unit, unit_config

CACHE = "cache = { max_bytes = 1048576, max_object_bytes = 65536 }\n"


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def fetch(url: str, *args: str) -> tuple[int, dict[str, str], str]:
    """One GET with curl: status, headers (lower-case names) and body."""
    out = curl("-i", *args, url).stdout  # text mode: "\r\n" reads as "\n"
    head, _, body = out.partition("\n\n")
    lines = head.split("\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def backend_hits(unit: Unit) -> dict[str, int]:
    with urllib.request.urlopen(unit.url() + "hits", timeout=10) as response:
        hits: dict[str, int] = json.loads(response.read())
    return hits


def metrics(unit: Unit) -> str:
    with urllib.request.urlopen(unit.admin + "/metrics", timeout=10) as response:
        return response.read().decode()


def cached(path: str, cc: str | None = "max-age=60", vary: str = "") -> str:
    query = []
    if cc is not None:
        query.append("cc=" + quote(cc))
    if vary:
        query.append("vary=" + vary)
    return f"cached/{path}?" + "&".join(query)


def test_cache_hit_vary_no_store_and_purge(farm: Farm) -> None:
    _, backend = farm.backend("b")
    unit = farm.unit(unit_config([backend], pools=CACHE))
    url = unit.url()

    status, headers, first = fetch(url + cached("page"))
    assert status == 200 and first.startswith("b 1 "), first
    assert "age" not in headers
    status, headers, second = fetch(url + cached("page"))
    assert (status, second) == (200, first)
    assert "age" in headers and int(headers["age"]) >= 0
    status, headers, body = fetch(url + cached("page"), "-I")
    assert status == 200 and headers["content-length"] == str(len(first)) and "age" in headers
    assert backend_hits(unit)["/" + cached("page")] == 1

    # Vary: each language is its own entry.
    lang = cached("lang", vary="Accept-Language")
    en = fetch(url + lang, "-H", "Accept-Language: en")[2]
    fr = fetch(url + lang, "-H", "Accept-Language: fr")[2]
    assert en.split()[1:] == ["1", "/" + lang, "en"] and fr.split()[1:] == ["2", "/" + lang, "fr"]
    assert fetch(url + lang, "-H", "Accept-Language: en")[2] == en
    assert fetch(url + lang, "-H", "Accept-Language: fr")[2] == fr

    # no-store, and a response without freshness, are not kept.
    for target in (cached("nostore", "no-store, max-age=60"), cached("plain", None)):
        assert fetch(url + target)[2].split()[1] == "1"
        assert fetch(url + target)[2].split()[1] == "2"

    # Out-of-band invalidation: nlbctl purge.
    ctl = [sys.executable, "-m", "nlbproxy.ctl", "--admin", unit.admin]
    purged = subprocess.run([*ctl, "purge", "app", "/cached/page", "--json"],
                            capture_output=True, text=True, timeout=30)
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"pool": "app", "prefix": "/cached/page", "purged": 1}
    assert fetch(url + cached("page"))[2].split()[1] == "2"
    assert fetch(url + lang, "-H", "Accept-Language: en")[2] == en  # not under the prefix
    assert backend_hits(unit)["/" + cached("page")] == 2

    unknown = subprocess.run([*ctl, "purge", "nope", "/"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 1 and "no pool nope" in unknown.stderr

    text = metrics(unit)
    assert re.search(r'nlbproxy_cache_lookups_total\{pool="app",result="hit"\} [1-9]', text), text
    assert re.search(r'nlbproxy_cache_stores_total\{pool="app"\} [1-9]', text), text
    assert re.search(r'nlbproxy_cache_purged_total\{pool="app"\} 1', text), text


def test_cache_keeps_connections_alive(farm: Farm) -> None:
    _, backend = farm.backend("b")
    unit = farm.unit(unit_config([backend], pools=CACHE))
    target = unit.url() + cached("ka")
    result = curl("-v", target, target, target, target)
    assert result.stderr.count("Connected to") == 1, result.stderr
    assert result.stdout.count("b 1 /cached/ka") == 4
    assert backend_hits(unit)["/cached/ka?cc=max-age%3D60"] == 1


DENY = (
    '[[listener.deny]]\nname = "admin"\npath_prefix = "/admin"\n'
    '[[listener.deny]]\nname = "neighbour"\nnetwork = ["127.0.0.2/32", "2001:db8::/32"]\n'
)


def test_deny_rules_answer_403_and_others_pass(farm: Farm) -> None:
    _, backend = farm.backend("b")
    unit = farm.unit(unit_config([backend], routes=DENY))
    url = unit.url()
    assert fetch(url + "admin/users")[0] == 403
    assert fetch(url + "%61dmin/users")[0] == 403
    assert fetch(url + "public")[0] == 200
    # The same paths from another loopback address: every path is denied.
    assert fetch(url + "public", "--interface", "127.0.0.2")[0] == 403
    assert fetch(url + "public", "--interface", "127.0.0.3")[0] == 200
    text = metrics(unit)
    assert 'nlbproxy_filter_denied_total{listener="web",rule="admin"} 2' in text, text
    assert 'nlbproxy_filter_denied_total{listener="web",rule="neighbour"} 1' in text, text


def test_burst_beyond_the_rate_limit_gets_429(farm: Farm) -> None:
    _, backend = farm.backend("b")
    # A bucket that takes 100 s to refill a token: the test cannot be slow enough to see one.
    limit = "rate_limit = { requests_per_second = 0.01, burst = 3 }\n"
    unit = farm.unit(unit_config([backend], extra_listener=limit))
    url = unit.url()
    urls = [arg for i in range(6) for arg in ("-o", "/dev/null", url + f"r{i}")]
    out = curl("-w", "%{http_code} %header{retry-after}\n", *urls).stdout
    answers = [line.split(" ") for line in out.split("\n")[:6]]
    assert [status for status, _ in answers] == ["200"] * 3 + ["429"] * 3, out
    # Retry-After: the ~100 s until the next token, whatever time the requests took.
    assert all(0 < int(retry) <= 100 for _, retry in answers[3:]), out
    # Another client address has its own bucket.
    assert fetch(url + "other", "--interface", "127.0.0.2")[0] == 200
    text = metrics(unit)
    assert 'nlbproxy_filter_rate_limited_total{listener="web"} 3' in text, text
