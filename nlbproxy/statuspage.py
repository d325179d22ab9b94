# -*- test-case-name: tests.test_statuspage -*-
"""The status page the admin endpoint serves at ``/`` and ``/status``.

The page is one self-contained HTML document: its style and script are
inline and it loads nothing else, so it works on a unit cut off from the
internet and leaves nothing for a third party to tamper with.  It carries no
farm data at all.  Its script polls ``GET /api/v1/state`` (with the bearer
token when the admin API wants one) and fills the tables from the answer, and
it changes a directive with ``PUT /api/v1/pools/POOL/hosts/HOST/directive``
after the operator confirms.  Because the page itself is inert, it is served
without the token; everything it shows comes through the token-guarded API.

The Content-Security-Policy allows exactly the inline style and script of this
page, by their SHA-256 hashes, plus requests to the admin endpoint itself;
anything injected into the page (were an escaping bug to let it in) would not
run.  The script only ever inserts data with ``textContent``.

The host columns read these fields of the state document: ``health`` and
``health_reason``, ``directive`` and ``directive_reason``, ``load``,
``capacity``, ``active_requests``, ``requests`` (a counter: the page shows its
rate between two polls), ``latency`` (``p50``, ``p90``, ``p99`` in seconds),
``sessions``, ``connections`` (``open``, ``idle``), and ``handed_off`` (a
counter of connections handed off to the host) whose column appears only
when some host of the pool has it.
"""

from __future__ import annotations

import base64
import hashlib

from nlbproxy.metrics import LATENCY_BUCKETS

__all__ = ["CONTENT_TYPE", "HEADERS", "PAGE", "PATHS", "POLL_SECONDS"]

#: How often the page asks for the state document.
POLL_SECONDS = 1.5

#: The paths (as segments of the admin endpoint) the page is served at.
PATHS: tuple[tuple[str, ...], ...] = (("",), ("status",))

CONTENT_TYPE = b"text/html; charset=utf-8"

STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --dim: #6e7781; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1rem 2rem; }
header { display: flex; align-items: baseline; gap: 1rem; }
h1 { font-size: 1.4rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .4rem; }
h2 small { font-weight: normal; color: var(--dim); }
#status, #notice { color: var(--dim); margin: 0; }
#status.error, #notice.error { color: var(--bad); }
table { border-collapse: collapse; min-width: 60%; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #8884; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.health, td.directive { text-align: left; }
th { font-weight: 600; }
td.host { font-family: ui-monospace, monospace; }
.up { color: var(--ok); }
.down { color: var(--bad); }
.draining { color: var(--warn); }
.inactive { color: var(--dim); }
.reason { color: var(--dim); font-size: .9em; }
td.health, td.directive { white-space: normal; max-width: 24rem; }
td.actions button { margin-left: .3rem; }
form#login, dialog { border: 1px solid #8888; border-radius: .4rem; padding: 1rem; }
dialog::backdrop { background: #0006; }
"""

SCRIPT = r"""
"use strict";
(() => {
  const POLL_MS = @POLL_MS@;
  const TOP_BUCKET = "@TOP_BUCKET@";
  const TOKEN_KEY = "nlbproxy.admin-token";
  const VERBS = {draining: "Drain", active: "Activate", inactive: "Deactivate"};
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let timer = null;
  let last = null;      // the previous poll: {at: ms, counts: Map(key -> requests)}
  let pending = null;   // the change waiting for confirmation: {pool, host, directive}
  const pools = new Map();  // pool name -> {section, tbody, handoff, rows: Map(host -> tr)}

  class Unauthorized extends Error {}

  async function call(method, path, body) {
    const headers = {Accept: "application/json"};
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, {method, headers, body, cache: "no-store", credentials: "omit"});
    if (response.status === 401) throw new Unauthorized("the admin API wants a bearer token");
    const doc = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(doc.error || `${response.status} ${response.statusText}`);
    return doc;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function say(text, error, where = "status") {
    $(where).textContent = text;
    $(where).className = error ? "error" : "";
  }

  const number = (n) => (typeof n === "number" ? String(n) : "\u2014");

  function seconds(value, count) {
    if (!count) return "\u2014";
    if (value === null) return `> ${TOP_BUCKET} s`;  // above the largest bucket
    return value < 1 ? `\u2264 ${+(value * 1000).toPrecision(3)} ms` : `\u2264 ${value} s`;
  }

  // Each cell is [text, class, reason]: a reason is shown in smaller text after the value.
  function hostCells(key, host, rate, handoff) {
    const latency = host.latency || {};
    const conns = host.connections || {};
    const cells = [
      [key, "host"],
      [host.health, "health " + host.health, host.health_reason],
      [host.directive, "directive " + host.directive, host.directive_reason],
      [number(host.load)],
      [number(host.capacity)],
      [number(host.active_requests)],
      [rate === null ? "\u2014" : rate.toFixed(1)],
      [seconds(latency.p50, latency.count)],
      [seconds(latency.p90, latency.count)],
      [seconds(latency.p99, latency.count)],
      [number(host.sessions)],
      [`${number(conns.open)} / ${number(conns.idle)}`],
    ];
    if (handoff) cells.push([number(host.handed_off)]);
    return cells;
  }

  const HEADINGS = ["Host", "Health", "Directive", "Load", "Capacity", "Active", "Req/s",
                    "p50", "p90", "p99", "Sessions", "Conns open / idle"];

  function poolView(name, pool, handoff) {
    let view = pools.get(name);
    if (view && view.handoff === handoff) return view;
    const section = element("section");
    section.dataset.pool = name;
    const title = element("h2", name + " ");
    title.append(element("small", `affinity: ${pool.affinity}`));
    const table = element("table");
    const head = table.createTHead().insertRow();
    for (const heading of HEADINGS.concat(handoff ? ["Handed off"] : [], [""])) {
      head.append(element("th", heading));
    }
    section.append(title, table);
    const next = {section, tbody: table.createTBody(), handoff, rows: new Map()};
    if (view) view.section.replaceWith(section); else $("pools").append(section);
    pools.set(name, next);
    return next;
  }

  function hostRow(view, pool, key) {
    let row = view.rows.get(key);
    if (row) return row;
    row = view.tbody.insertRow();
    row.dataset.host = key;
    const columns = HEADINGS.length + (view.handoff ? 1 : 0);
    for (let i = 0; i < columns; i++) row.insertCell();
    const actions = row.insertCell();
    actions.className = "actions";
    for (const [directive, verb] of Object.entries(VERBS)) {
      const button = element("button", verb);
      button.type = "button";
      Object.assign(button.dataset, {pool, host: key, directive});
      actions.append(button);
    }
    view.rows.set(key, row);
    return row;
  }

  function render(state, now) {
    $("unit").textContent = state.unit;
    document.title = `nlbproxy ${state.unit}`;
    const dt = last ? (now - last.at) / 1000 : 0;
    const rate = (id, count) =>
      dt > 0 && last.counts.has(id) ? Math.max(0, count - last.counts.get(id)) / dt : null;
    const counts = new Map();
    for (const [name, pool] of Object.entries(state.pools)) {
      const hosts = Object.entries(pool.hosts);
      const view = poolView(name, pool, hosts.some(([, host]) => "handed_off" in host));
      for (const [key, host] of hosts) {
        const id = `host\n${name}\n${key}`;
        counts.set(id, host.requests);
        const row = hostRow(view, name, key);
        hostCells(key, host, rate(id, host.requests), view.handoff).forEach(([text, cls, reason], i) => {
          const cell = row.cells[i];
          cell.textContent = text;
          cell.className = cls || "";
          if (reason) cell.append(" ", element("span", `(${reason})`, "reason"));
        });
        for (const button of row.cells[row.cells.length - 1].children) {
          button.disabled = button.dataset.directive === host.directive;
        }
      }
      for (const [key, row] of view.rows) {
        if (!(key in pool.hosts)) { row.remove(); view.rows.delete(key); }
      }
    }
    for (const [name, view] of pools) {
      if (!(name in state.pools)) { view.section.remove(); pools.delete(name); }
    }
    const listeners = $("listeners").tBodies[0];
    listeners.replaceChildren();
    for (const [name, l] of Object.entries(state.listeners || {})) {
      const id = `listener\n${name}`;
      counts.set(id, l.requests);
      const r = rate(id, l.requests);
      const rejected = Object.values(l.rejected || {}).reduce((a, b) => a + b, 0);
      const row = listeners.insertRow();
      row.insertCell().textContent = name;
      for (const value of [l.open_connections, r === null ? null : +r.toFixed(1), rejected, l.routing_failures]) {
        row.insertCell().textContent = number(value);
      }
    }
    last = {at: now, counts};
  }

  function askToken(reason) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("login-reason").textContent = reason;
    $("login").hidden = false;
    $("token").focus();
  }

  // A poll started by a directive change may overlap the timer's: whichever
  // ends last sets the one timer, so there is never more than one loop.
  async function poll() {
    try {
      const state = await call("GET", "/api/v1/state");
      render(state, performance.now());
      say(`updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      if (error instanceof Unauthorized) {
        askToken(token ? "The token was refused; enter it again." : "The admin API wants its token.");
        say("waiting for the token", true);
        return;  // polling resumes when a token is entered
      }
      say(`cannot read the state: ${error.message}`, true);
    }
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login").hidden = true;
    poll();
  });

  $("pools").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-directive]");
    if (!button) return;
    pending = {...button.dataset};
    $("confirm-text").textContent =
      `${VERBS[pending.directive]} host ${pending.host} of pool ${pending.pool}?`;
    $("confirm").showModal();
  });

  $("confirm-no").addEventListener("click", () => $("confirm").close());
  $("confirm").addEventListener("close", () => { pending = null; });
  $("confirm-yes").addEventListener("click", async () => {
    const change = pending;
    $("confirm").close();
    if (!change) return;
    const path = `/api/v1/pools/${encodeURIComponent(change.pool)}/hosts/` +
      `${encodeURIComponent(change.host)}/directive`;
    try {
      await call("PUT", path, change.directive);
      say(`${VERBS[change.directive]}: ${change.host} of ${change.pool} done`, false, "notice");
    } catch (error) {
      if (error instanceof Unauthorized) { askToken("The token was refused; enter it again."); return; }
      say(`${VERBS[change.directive]}: ${change.host} of ${change.pool} failed: ${error.message}`, true, "notice");
    }
    poll();
  });

  poll();
})();
""".replace("@POLL_MS@", str(int(POLL_SECONDS * 1000))).replace("@TOP_BUCKET@", repr(LATENCY_BUCKETS[-1]))

BODY = """
<header><h1>nlbproxy <span id="unit"></span></h1><p id="status" role="status">connecting</p>
  <p id="notice" role="status"></p></header>
<form id="login" hidden>
  <p id="login-reason"></p>
  <label>Admin token <input id="token" type="password" autocomplete="off" required></label>
  <button type="submit">Use token</button>
</form>
<dialog id="confirm">
  <p id="confirm-text"></p>
  <button id="confirm-yes" type="button">Confirm</button>
  <button id="confirm-no" type="button" autofocus>Cancel</button>
</dialog>
<main id="pools"></main>
<section>
  <h2>Listeners</h2>
  <table id="listeners">
    <thead><tr><th>Listener</th><th>Open connections</th><th>Req/s</th><th>Rejected</th>
      <th>Routing failures</th></tr></thead>
    <tbody></tbody>
  </table>
</section>
"""


def _hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>nlbproxy status</title>\n"
    f"<style>{STYLE}</style>\n</head>\n<body>{BODY}<script>{SCRIPT}</script>\n</body>\n</html>\n"
).encode()

#: What may run and connect: this page's own style and script (by hash) and
#: requests to the admin endpoint itself; no frames, forms, images or plugins.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    f"script-src {_hash(SCRIPT)}",
    f"style-src {_hash(STYLE)}",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

#: Headers sent with the page besides its type.
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode("ascii")),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
)
