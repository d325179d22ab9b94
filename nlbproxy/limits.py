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
#: How long routing may take to decide (a plugin answering later); past it
#: the request is answered 502 and counted as a routing failure.
ROUTING_TIMEOUT = 2.0

# --- SOAP envelope sniffing (listeners with protocol = "soap") --------------
#: Body bytes a SOAP request may carry before the start tag of the first child
#: of ``Body`` (the operation); a longer envelope prefix is refused with a SOAP
#: Fault.  The router holds at most this much of one request while routing it.
MAX_SOAP_PREFIX = 64 * KiB
#: Element nesting up to and including the operation element (Envelope = 1).
MAX_SOAP_DEPTH = 32
#: Attributes plus namespace declarations on one element.
MAX_SOAP_ATTRIBUTES = 64
#: Characters of one qualified name in Clark form (``{namespace}local``).
MAX_SOAP_NAME = 1024
#: Characters of text kept from one selected header entry (WS-Addressing
#: ``To``/``Action``); longer text is refused.
MAX_SOAP_HEADER_TEXT = 4 * KiB
#: Lifetime of a TLS session (its tickets and its entry in the unit's session
#: cache); a client resumes within it, then does a full handshake.  The cache
#: holds OpenSSL's default of 20,480 sessions per listener (oldest dropped).
TLS_SESSION_TIMEOUT = 7200.0
#: With ``session_tickets = "farm"``: how long one ticket key (derived from
#: the farm's secret) is used.  Tickets of the previous period are refused
#: (one full handshake), so this also caps how long a ticket resumes.
TICKET_KEY_PERIOD = 3600.0

# --- backend side (per pool) ------------------------------------------------
#: A host's response status line and fields; larger is the host's error (502).
#: (HAProxy's tune.bufsize is 16 KiB; big cookies need more.)
MAX_RESPONSE_HEAD = 64 * KiB
#: A chunk-size line of a host's chunked body, extensions included.
MAX_CHUNK_LINE = 1 * KiB
#: The trailer section of a host's chunked body.
MAX_TRAILER_BYTES = 16 * KiB
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
#: When a reload removes a listener or an upgrade drains the old process: how
#: long an idle keep-alive connection (or one accepted with no request yet)
#: stays open for one more request, answered with ``Connection: close``.
#: Closing it at once races with the client's next request, which then fails
#: (and a POST cannot be retried safely); after this it is closed anyway.
DRAIN_IDLE_LINGER = 2.0
#: Upgrade: how long the new program may take to serve before it is stopped
#: and the old one goes on serving.
UPGRADE_TIMEOUT = 30.0
#: Admin API request bodies.
MAX_ADMIN_BODY = 64 * KiB
#: Inactivity of an upgraded (WebSocket) connection before it is closed
#: (HAProxy ``timeout tunnel``).
TUNNEL_TIMEOUT = 3600.0

# --- request filtering (per listener) ------------------------------------------
#: Client addresses (IPv6: /64 networks) whose rate-limit buckets are held per
#: listener; see :mod:`nlbproxy.filtering` for what happens past it.
RATE_LIMIT_CLIENTS = 100_000
#: Ceilings of ``rate_limit``'s keys, so that a typo cannot disable the limit.
RATE_LIMIT_MAX_RATE = 1_000_000.0
RATE_LIMIT_MAX_BURST = 1_000_000

# --- response cache (per pool) -----------------------------------------------
#: Bytes of responses (bodies, headers and bookkeeping) a pool's cache holds;
#: the least recently used go first.
CACHE_MAX_BYTES = 64 * MiB
#: The largest response kept; a bigger one streams through and is not kept.
CACHE_MAX_OBJECT_BYTES = 1 * MiB
#: Variants (``Vary``) kept per URL; past it the least recently used goes.
CACHE_MAX_VARIANTS = 16
#: What one entry costs beyond its body and headers (objects, keys).
CACHE_ENTRY_OVERHEAD = 512
# --- handoff forwarder (routes of handed-off connections) ------------------------
#: Forwarding routes (handed-off connections) one unit keeps; past it a new
#: handoff is refused (the request is proxied instead).
MAX_ROUTES = 262_144
#: Client packets held for one fenced flow between fence and commit (the
#: recipe saw 1-3 in practice); past either bound a packet is dropped and
#: counted, and the client's TCP retransmits it.
FENCE_MAX_PACKETS = 64
FENCE_MAX_BYTES = 256 * KiB
#: Bytes held for all fenced flows together.
FENCE_TOTAL_BYTES = 32 * MiB
#: A flow fenced this long without a commit is dropped from the table (the
#: handoff failed; the unit resets the client).
FENCE_TIMEOUT = 5.0
#: After the client's FIN, the route lives this long unless the host's agent
#: reports the end first (a backstop: the client's last ACKs and a retransmitted
#: FIN still need it).
CLOSING_TIMEOUT = 60.0
#: After the client's RST, the route lives this long.
RESET_TIMEOUT = 5.0
#: After the host's agent reports a handed-off connection's end, its route
#: (at the unit) and its tunnel mapping (at the host) stay this long: the host
#: may still be waiting for the client's last ACK of its FIN (LAST_ACK), and
#: without them that ACK would reach the unit's kernel, which resets the client.
END_LINGER = 2.0
#: A committed route without a client packet for this long is deleted.
ROUTE_IDLE_TIMEOUT = 3600.0
#: The forwarder's AF_PACKET receive buffer: bursts beyond it are dropped by
#: the kernel (the client retransmits).
FORWARDER_RCVBUF = 4 * MiB
#: The forwarder's send buffer per out interface.
FORWARDER_SNDBUF = 4 * MiB
#: Frames read per wake-up before the reactor serves other sockets.
FORWARDER_BATCH = 64
#: How often a unit's forwarder looks for dead hosts (their routes are
#: deleted, so their clients get a RST) and for failed peers (their routes
#: are taken over from the DAM).
FORWARDER_WATCH_INTERVAL = 0.5
#: Seconds a host's MAC address, read from the unit's neighbour table at a
#: fence, is reused for the next fences to that host (a neighbour dump
#: costs about 70 us of the handoff's critical path).
FORWARDER_MAC_TTL = 1.0
#: Seconds one read of the kernel's neighbour table (an rtnetlink dump,
#: nlbproxy.handoff.neighbours) may block; the kernel answers at once.
NEIGHBOUR_DUMP_TIMEOUT = 1.0
#: Bytes of a neighbour dump read before giving up (about 80 an entry).
NEIGHBOUR_DUMP_MAX_BYTES = 16 * MiB
#: The receive buffer of one datagram of the dump (the kernel fills up to 32 KiB).
NEIGHBOUR_RECV_BUFFER = 64 * 1024
#: Hosts whose MAC address the forwarder remembers (past it, it forgets all).
FORWARDER_MAC_ENTRIES = 4096
#: Routes listed in the admin API's state document (the counts cover all).
ADMIN_ROUTE_ROWS = 100

# --- workers (nlbproxy.workers) ---------------------------------------------
#: Most worker processes one unit runs (``workers`` in ``[unit]``).
MAX_WORKERS = 64
#: A worker that dies is restarted after this delay, doubled for each death
#: in a row (a worker that ran WORKER_STABLE_AFTER seconds starts from 0).
WORKER_RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
#: A worker that ran this long before dying counts as stable again.
WORKER_STABLE_AFTER = 30.0
#: A worker that dies this many times in a row (each time before it was
#: stable) is given up on; the unit stops when no worker is left.
WORKER_MAX_RESTARTS = 10
#: Seconds the supervisor waits for a worker's private admin API (fan-out
#: of directives, aggregation of state and metrics).
WORKER_ADMIN_TIMEOUT = 5.0
#: How long the supervisor waits, beyond the grace period, for workers to
#: exit after SIGTERM before it kills them.
WORKER_STOP_MARGIN = 5.0
#: Listen backlog of each worker's listening socket (the supervisor keeps it
#: open, so connections queue here while a worker restarts).
WORKER_BACKLOG = 1024
#: A worker started by a reload or an upgrade that does not serve within this
#: many seconds is killed and the old worker kept.
WORKER_START_TIMEOUT = 30.0
#: A directive replayed to a restarted worker for a host it does not know yet
#: (its agent was not heard yet) is retried this many times, this far apart.
WORKER_REPLAY_TRIES = 20
WORKER_REPLAY_INTERVAL = 0.5
#: A worker stopping gracefully stops accepting, then waits this long before
#: it closes connections that carry no request yet (one accepted a moment
#: before would otherwise be closed under a client about to send).
WORKER_STOP_LINGER = 0.5
