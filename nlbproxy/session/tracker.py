# -*- test-case-name: tests.test_session_tracker -*-
"""A balancing unit's session tracker: which host holds which session.

The knowledge lives in the unit's portion of the distributed atom manager
(:mod:`nlbproxy.session.dam`), keyed ``"POOL/SESSION"`` with the host's
"ip:port" as data.  It is fed three ways: host agents announce sessions
(session up / down over the health channel, see
:mod:`nlbproxy.session.unitside`), the router learns the application's own
session cookie from ``Set-Cookie`` when the application announces nothing,
and the router binds a session to a new host when its old host is down or
inactive ("the session moves").  ``affinity = "session"`` reads it: a local
atom answers at once; otherwise the DAM asks the units that should hold it
and the request waits for the answer (bounded by the DAM's query timeout).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from nlbproxy.classifier import Host, Pool
from nlbproxy.health.messages import SessionKind
from nlbproxy.session.dam import DAM, Atom, DamFull

log = Logger()

#: Seconds between DAM ticks (query escalation and timeouts, zombie expiry).
TICK = 0.02
#: Session keys longer than this (bytes of the cookie value) are not tracked.
MAX_SESSION_KEY = 200


def atom_key(pool: str, session: str) -> str:
    return f"{pool}/{session}"


class SessionTracker:
    """The DAM of one unit, and the operations the router and agents need."""

    def __init__(self, dam: DAM, reactor: Any, standalone: bool = True) -> None:
        """``standalone``: no DamService drives the DAM (a unit without
        peers), so the tracker ticks it and flushes what it queues."""
        self.dam = dam
        self.reactor = reactor
        self._ticker: LoopingCall | None = None
        self._flush_call: Any = None
        #: Sessions not recorded because the DAM was full.
        self.full = 0
        if standalone:
            self._ticker = LoopingCall(dam.tick)
            self._ticker.clock = reactor
            dam.wakeup = self._wake

    # -- the DAM's clockwork -------------------------------------------------------
    def _wake(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        self.dam.flush()

    def start(self) -> None:
        if self._ticker is not None:
            self._ticker.start(TICK, now=False)

    def stop(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
            self.dam.flush()

    # -- the router's side ---------------------------------------------------------
    def lookup(
        self, pool: Pool, session: str, answer: Callable[[Host | None, bool], None]
    ) -> tuple[Host | None, bool] | None:
        """Where ``session`` is: ``(host, known)`` at once, or None when the
        DAM asks the other units and ``answer(host, known)`` follows.

        ``known`` says whether any unit holds the session; ``host`` is None
        when it is unknown or its host may not take it (down, inactive).
        """
        if len(session) > MAX_SESSION_KEY:
            return None, False
        key = atom_key(pool.name, session)
        atom = self.dam.get(key)
        if atom is not None:
            return pool.bound_host(pool.by_key.get(atom.data)), True
        if not self.dam.peers:
            return None, False

        def found(atom: Atom | None) -> None:
            if atom is None:
                answer(None, False)
            else:
                answer(pool.bound_host(pool.by_key.get(atom.data)), True)

        self.dam.query(key, found)
        return None

    def bind(self, pool: Pool, session: str, host: Host) -> None:
        """``session`` is (now) on ``host``: learnt from the application's
        Set-Cookie, or moved because its old host could not take it.

        Only the application and known sessions get here, never a cookie
        value a client made up; a full table is logged and counted, never
        raised into the request.
        """
        if len(session) > MAX_SESSION_KEY:
            return
        key = atom_key(pool.name, session)
        atom = self.dam.get(key)
        if atom is None or atom.data != host.key:
            try:
                self.dam.add(key, host.key)
            except DamFull:
                self.full += 1
                if self.full == 1 or self.full % 10_000 == 0:
                    log.warn("the session table is full: {n} sessions not recorded", n=self.full)

    def forget(self, pool: str, session: str) -> bool:
        key = atom_key(pool, session)
        if self.dam.get(key) is None:
            return False
        self.dam.delete(key)
        return True

    # -- the agents' side ------------------------------------------------------------
    def session_up(self, app: str, key: str, kind: SessionKind, endpoint: str, agent_id: int) -> None:
        try:
            self.dam.add(atom_key(app, key), endpoint, kind.word)
        except DamFull:
            self.full += 1
        except ValueError as exc:  # a key the DAM cannot hold (over 255 bytes)
            log.warn("session from agent {agent} not recorded: {why}", agent=agent_id, why=exc)

    def session_down(self, app: str, key: str, agent_id: int) -> None:
        self.dam.delete(atom_key(app, key))

    # -- the operator's side ---------------------------------------------------------
    def _live(self) -> Iterator[tuple[str, str, Atom]]:
        for atom in self.dam.atoms():
            if not atom.dead:
                pool, _, session = atom.key.partition("/")
                yield pool, session, atom

    def counts(self) -> Counter[tuple[str, str]]:
        """Live sessions per (pool, host "ip:port")."""
        return Counter((pool, atom.data) for pool, _session, atom in self._live())

    def listing(self, pool: str, after: str = "", limit: int = 100) -> list[Atom]:
        """Sessions of ``pool`` in key order, after ``after``, at most ``limit``."""
        prefix = pool + "/"
        atoms = sorted(
            (atom for atom in self.dam.atoms()
             if not atom.dead and atom.key.startswith(prefix) and atom.key[len(prefix):] > after),
            key=lambda atom: atom.key,
        )
        return atoms[:limit]
