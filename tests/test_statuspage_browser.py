"""The status page in headless Chromium against a real ``twistd nlbproxy``.

The browser is Debian's ``chromium`` driven by Selenium through Debian's
``chromedriver`` (both installed by ``make deps``).  Each test starts
backends and a unit, loads the page, drains a host by clicking its button
and confirming, and then checks the farm through the admin API, the unit's
log and the page.  One more test serves the page beside a scripted state
document, for what a real unit cannot show yet (handed-off connections) or
should never send (markup in names and reasons).  The browser, the driver and every process are torn down
even when a test fails.  Where Chromium is missing the tests skip, except in
CI (``NLB_REQUIRE_ROOT=1``), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.realnet import Farm, Unit, unit_config, wait_until
from tests.needs import unmet

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Without the background-networking flags Chromium phones home at start-up,
# and on a machine with no internet those connections are refused.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
DEADLINE = 30.0


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (make deps)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing:
        unmet(f"the browser test cannot run: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nlb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def api(unit: Unit, path: str, token: str | None = None) -> Any:
    request = urllib.request.Request(unit.admin + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def page_until(driver: Any, predicate: Any, what: str) -> Any:
    """Polls the page until ``predicate(driver)`` is true, ignoring elements that the
    page replaced in between (the DOM changes under us with every poll)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt() -> Any:
        try:
            return predicate(driver)
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    return wait_until(attempt, DEADLINE, what)


def host_row(driver: Any, pool: str, host: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'section[data-pool="{pool}"] tr[data-host="{host}"]')


def cells(driver: Any, pool: str, host: str) -> dict[str, str]:
    """The texts of a host's row, by column heading."""
    from selenium.webdriver.common.by import By

    section = driver.find_element(By.CSS_SELECTOR, f'section[data-pool="{pool}"]')
    headings = [th.text for th in section.find_elements(By.CSS_SELECTOR, "thead th")]
    values = [td.text for td in host_row(driver, pool, host).find_elements(By.TAG_NAME, "td")]
    return dict(zip(headings, values))


def confirm(driver: Any, pool: str, host: str, directive: str, answer: str = "confirm-yes") -> None:
    """Clicks ``directive``'s button on the host's row, then ``answer`` in the dialog."""
    from selenium.webdriver.common.by import By

    page_until(driver, lambda d: host_row(d, pool, host).find_element(
        By.CSS_SELECTOR, f'button[data-directive="{directive}"]').click() or True, f"the {directive} button")
    dialog = page_until(driver, lambda d: d.find_element(By.CSS_SELECTOR, "dialog#confirm[open]"), "the dialog")
    assert host in dialog.text and pool in dialog.text
    dialog.find_element(By.ID, answer).click()
    page_until(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "dialog#confirm[open]"), "the dialog to close")


def directive_changes(unit: Unit) -> list[str]:
    return [line for line in unit.process.lines if "directive of " in line]


def browser_errors(driver: Any) -> list[str]:
    """What the page logged as errors (a CSP violation or a script error shows here);
    the browser's own request for /favicon.ico, which the admin API answers 404, is not one."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_drain_from_the_page(farm: Farm, browser: Any) -> None:
    backends = [farm.backend(f"b{i}")[1] for i in range(2)]
    unit = farm.unit(unit_config(backends))
    browser.get(unit.admin + "/")
    page_until(browser, lambda d: all(host_row(d, "app", b) for b in backends), "both hosts on the page")
    assert browser.title == "nlbproxy test"
    assert cells(browser, "app", backends[0])["Directive"].startswith("active")
    assert "Handed off" not in cells(browser, "app", backends[0])

    # Traffic between two polls shows as a rate and as percentiles.
    for i in range(20):
        get(unit.url() + f"r{i}")
    page_until(browser, lambda d: any(float(cells(d, "app", b)["Req/s"].replace("\u2014", "0")) > 0
                                      for b in backends), "a request rate")
    page_until(browser, lambda d: all(cells(d, "app", b)["p99"].startswith("\u2264") for b in backends
                                      if api(unit, "/api/v1/state")["pools"]["app"]["hosts"][b]["requests"]),
               "percentiles of the hosts that answered")

    # A cancelled confirmation changes nothing; a confirmed one drains.
    confirm(browser, "app", backends[1], "inactive", answer="confirm-no")
    confirm(browser, "app", backends[0], "draining")
    hosts = wait_until(lambda: (h := api(unit, "/api/v1/state")["pools"]["app"]["hosts"])
                       and h[backends[0]]["directive"] == "draining" and h, DEADLINE, "the drain")
    assert hosts[backends[0]]["directive_reason"] == "operator"
    assert hosts[backends[1]]["directive"] == "active"
    page_until(browser, lambda d: cells(d, "app", backends[0])["Directive"] == "draining (operator)",
               "the page to show the drain")
    assert browser.find_element("id", "notice").text == f"Drain: {backends[0]} of app done"
    changes = directive_changes(unit)
    assert len(changes) == 1 and backends[0] in changes[0] and "draining" in changes[0], changes
    drain = host_row(browser, "app", backends[0]).find_element("css selector", 'button[data-directive="draining"]')
    assert not drain.is_enabled()

    # And back, from the page again.
    confirm(browser, "app", backends[0], "active")
    wait_until(lambda: api(unit, "/api/v1/state")["pools"]["app"]["hosts"][backends[0]]["directive"] == "active",
               DEADLINE, "the activation")
    page_until(browser, lambda d: cells(d, "app", backends[0])["Directive"].startswith("active"), "active again")
    assert browser_errors(browser) == []


def test_token_protected_admin_api(farm: Farm, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    token = "t0ken-for-the-page"
    token_file = tmp_path / "admin.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    backends = [farm.backend(f"b{i}")[1] for i in range(2)]
    unit = farm.unit(unit_config(backends, extra_unit=f'admin_token_file = "{token_file}"'))
    browser.get(unit.admin + "/status")

    # The page asks for the token and shows nothing of the farm before it has it.
    login = page_until(browser, lambda d: (form := d.find_element(By.ID, "login")).is_displayed() and form,
                       "the token form")
    assert not browser.find_elements(By.CSS_SELECTOR, "tr[data-host]")
    assert all(b not in browser.page_source for b in backends)

    login.find_element(By.ID, "token").send_keys("wrong")
    login.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    page_until(browser, lambda d: "refused" in d.find_element(By.ID, "login-reason").text, "the refusal")
    login.find_element(By.ID, "token").send_keys(token)
    login.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    page_until(browser, lambda d: all(host_row(d, "app", b) for b in backends), "both hosts on the page")
    assert not browser.find_element(By.ID, "login").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('nlbproxy.admin-token')") == token

    # The token outlives a reload of the page (it is asked for once per session).
    browser.refresh()
    page_until(browser, lambda d: all(host_row(d, "app", b) for b in backends), "the hosts after a reload")
    assert not browser.find_element(By.ID, "login").is_displayed()

    confirm(browser, "app", backends[1], "draining")
    wait_until(lambda: api(unit, "/api/v1/state", token)["pools"]["app"]["hosts"][backends[1]]["directive"]
               == "draining", DEADLINE, "the drain")
    page_until(browser, lambda d: cells(d, "app", backends[1])["Directive"] == "draining (operator)",
               "the page to show the drain")
    # The console holds the two refusals (no token, then the wrong one) and nothing else.
    errors = browser_errors(browser)
    assert errors and all("401" in e for e in errors), errors


class ScriptedAdmin:
    """The status page served beside a state document the test writes, for what a
    real unit cannot be made to show yet (the handoff column) or should never
    send (markup in names and reasons).  Directive changes are recorded."""

    def __init__(self, document: dict[str, Any]) -> None:
        from nlbproxy import statuspage

        self.document = document
        self.puts: list[tuple[str, str]] = []
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def answer(self, body: bytes, ctype: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name.decode(), value.decode())
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/":
                    self.answer(statuspage.PAGE, statuspage.CONTENT_TYPE.decode(), statuspage.HEADERS)
                else:
                    self.answer(json.dumps(admin.document).encode(), "application/json")

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                admin.puts.append((urllib.parse.unquote(self.path), body))
                self.answer(b"{}", "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def scripted_host(**fields: Any) -> dict[str, Any]:
    host = {"health": "up", "health_reason": "", "directive": "active", "directive_reason": "config",
            "load": 10, "capacity": 50, "active_requests": 0, "requests": 0, "sessions": 0,
            "connections": {"open": 0, "idle": 0}, "latency": {"count": 0, "p50": None, "p90": None, "p99": None}}
    host.update(fields)
    return host


def test_markup_stays_text_and_handoff_column_follows_the_field(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    pool = "<b>app</b>"
    evil = "<img src=x onerror=\"document.title='pwned'\">"
    hosts = {"10.0.0.9:80": scripted_host(health="down", health_reason=evil, handed_off=7,
                                          latency={"count": 10, "p50": 0.001, "p90": None, "p99": None}),
             "10.0.0.10:80": scripted_host(handed_off=0)}
    admin = ScriptedAdmin({"unit": evil, "pools": {pool: {"affinity": "none", "hosts": hosts}}, "listeners": {}})
    try:
        browser.get(admin.url)
        page_until(browser, lambda d: host_row(d, pool, "10.0.0.9:80"), "the host")
        row = cells(browser, pool, "10.0.0.9:80")
        assert row["Health"] == f"down ({evil})"
        assert row["Handed off"] == "7"
        assert (row["p50"], row["p90"]) == ("\u2264 1 ms", "> 10.0 s")
        assert browser.find_element(By.CSS_SELECTOR, f'section[data-pool="{pool}"] h2').text.startswith(pool)
        assert browser.find_element(By.ID, "unit").text == evil
        assert not browser.find_elements(By.CSS_SELECTOR, "img, main b")
        assert browser.title == f"nlbproxy {evil}"

        # The column goes with the field; a host gone from the document leaves the page.
        del hosts["10.0.0.10:80"]
        del hosts["10.0.0.9:80"]["handed_off"]
        page_until(browser, lambda d: "Handed off" not in cells(d, pool, "10.0.0.9:80"), "the column to go")
        assert len(browser.find_elements(By.CSS_SELECTOR, "tr[data-host]")) == 1

        # The directive's path is percent-encoded: the pool's name arrives whole.
        confirm(browser, pool, "10.0.0.9:80", "inactive")
        wait_until(lambda: admin.puts, DEADLINE, "the PUT")
        assert admin.puts == [(f"/api/v1/pools/{pool}/hosts/10.0.0.9:80/directive", "inactive")]
        assert browser_errors(browser) == []
    finally:
        admin.close()
