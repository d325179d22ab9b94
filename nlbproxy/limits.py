# -*- test-case-name: tests.test_config -*-
"""Named limits and timeouts, with defaults that are safe on the open internet.

Every buffer, queue, table and timeout of a balancing unit is named here once;
the config file may override each of them (the key is the lower-case name),
and the docs table in README.md mirrors this file.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- client side (per listener) -------------------------------------------
#: Request line plus headers of one request; more gets 431.  This is h11's
#: ``max_incomplete_event_size``, so it also bounds what one client can make
#: the unit hold before a request is complete.
MAX_HEADER_BYTES = 16 * KiB
#: Request target length; more gets 414 (nginx: 8k).
MAX_REQUEST_LINE = 8 * KiB
#: Request body; more gets 413.  0 means no limit.
MAX_BODY_BYTES = 100 * MiB
#: From accept, or from the end of the previous response, until a request's
#: headers are complete (slowloris defence; HAProxy ``timeout http-request``).
HEADER_TIMEOUT = 10.0
#: Idle keep-alive connection with no request started (HAProxy
#: ``timeout http-keep-alive``).
KEEPALIVE_TIMEOUT = 30.0
#: Client inactivity while a request body is read or a response is written
#: (HAProxy ``timeout client``).
CLIENT_TIMEOUT = 60.0
#: Requests served on one client connection before it is closed (nginx
#: ``keepalive_requests``); bounds the life of a connection.
MAX_REQUESTS_PER_CONNECTION = 10_000
#: Open client connections per listener; past it the listener stops accepting
#: until one closes (HAProxy ``maxconn``).
MAX_CONNECTIONS = 20_000
#: Request body bytes held for a request while its backend connection is being
#: opened; past it the client is paused.
MAX_PENDING_BODY = 64 * KiB
#: Lifetime of a TLS session (its tickets and its entry in the unit's session
#: cache); a client resumes within it, then does a full handshake.  The cache
#: holds OpenSSL's default of 20,480 sessions per listener (oldest dropped).
TLS_SESSION_TIMEOUT = 7200.0
#: With ``session_tickets = "farm"``: how long one ticket key (derived from
#: the farm's secret) is used.  Tickets of the previous period are refused
#: (one full handshake), so this also caps how long a ticket resumes.
TICKET_KEY_PERIOD = 3600.0

# --- backend side (per pool) ------------------------------------------------
#: TCP connect to a host; failing it tries another host, then answers 502
#: (refused) or 504 (timed out).
CONNECT_TIMEOUT = 5.0
#: Backend silence while a response is awaited or read; answers 504 when no
#: response byte was received yet (HAProxy ``timeout server``).
SERVER_TIMEOUT = 60.0
#: Idle keep-alive backend connections kept per host.
MAX_IDLE_PER_HOST = 64
#: All backend connections per host (busy and idle); past it requests wait in
#: a queue for a connection.
MAX_CONNS_PER_HOST = 1024
#: Requests waiting for a connection to one host; past it answers 503.
MAX_QUEUE_PER_HOST = 1024
#: How long an idle backend connection is kept; keep it below the backends'
#: own keep-alive timeout so the unit closes first.
UPSTREAM_IDLE_TIMEOUT = 15.0
#: Extra hosts tried after a connect failure or a reset before any response
#: byte (idempotent requests only for resets).
RETRIES = 2
#: Passive health: a host that failed a connect or reset a request is left
#: out for this long (nginx ``fail_timeout``).
FAIL_TIMEOUT = 10.0

# --- health (per pool) -------------------------------------------------------
#: Seconds between probes of a host without an agent (``check``, ``agent_check``).
CHECK_INTERVAL = 2.0
#: Consecutive good probes that bring a host back up.
CHECK_RISE = 2
#: Consecutive failed probes that take a host down.
CHECK_FALL = 2
#: One probe's time to answer.
CHECK_TIMEOUT = 1.0

# --- unit ---------------------------------------------------------------------
#: On SIGTERM: how long in-flight requests may take before their connections
#: are aborted.
GRACE_PERIOD = 10.0
#: Admin API request bodies.
MAX_ADMIN_BODY = 64 * KiB
#: Inactivity of an upgraded (WebSocket) connection before it is closed
#: (HAProxy ``timeout tunnel``).
TUNNEL_TIMEOUT = 3600.0
