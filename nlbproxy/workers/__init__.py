# -*- test-case-name: tests.test_workers -*-
"""``workers = N``: one balancing unit as N processes on one machine.

The seed scales out by adding balancing units that share health and session
knowledge; on one machine the same mechanism lets a unit use every core.
``twistd nlbproxy`` with ``workers > 1`` runs a :class:`~nlbproxy.workers.
supervisor.Supervisor` that serves no traffic itself:

* It creates every listening socket before it spawns a worker: one
  ``SO_REUSEPORT`` TCP socket per worker per listener, so the kernel spreads
  connections evenly, plus each worker's private admin socket and health
  link.  A worker adopts its sockets (``adoptStreamPort``); the supervisor
  keeps its copies open, so connections that arrive while a worker restarts
  wait in that worker's accept queue instead of being refused.
* The workers are units of one farm among themselves.  Health: the supervisor
  owns the public ``health`` UDP socket, authenticates each agent datagram and
  relays it unchanged to every worker over loopback
  (:mod:`~nlbproxy.workers.healthrelay`); what workers answer goes back
  through the supervisor, which sends it as the unit (one sender id, one
  epoch, one sequence).  Sessions: workers are DAM peers of each other on
  loopback (each process under a name of its own); worker 0 is the unit's face to other units (it listens on the
  public ``dam`` endpoint and dials ``peers``).  Affinity cookies: every worker
  gets the farm secret (or, without ``secret_file``, one the supervisor
  draws).  Directives: the supervisor serves the public admin API, fans
  operator changes out to every worker's private admin API and replays them
  to a worker that restarts (:mod:`~nlbproxy.workers.adminproxy`).
* A worker that dies is restarted with a backoff and given up on after too
  many deaths in a row (:mod:`~nlbproxy.workers.policy`); ``GET /metrics``
  and ``GET /api/v1/state`` answer for the whole unit
  (:mod:`~nlbproxy.workers.aggregate`).
* Reload and upgrade replace the workers one at a time on the same sockets
  (:mod:`~nlbproxy.workers.supervisor`).  A worker's sockets are named to its
  Unit as ``nlbfd:FD:FAMILY`` endpoints (:mod:`~nlbproxy.workers.fdendpoint`),
  its wiring comes on its stdin (:mod:`~nlbproxy.workers.worker`).
"""
