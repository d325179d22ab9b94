"""A unit's session tracker over a standalone DAM (``nlbproxy.session.tracker``)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.classifier import INACTIVE, Farm
from nlbproxy.health.messages import SessionKind
from nlbproxy.session.dam import DAM
from nlbproxy.session.tracker import MAX_SESSION_KEY, SessionTracker
from tests.fakes import pool


def never(peer: str, call: object) -> None:
    raise AssertionError("a standalone DAM sent a call")


class TrackerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.farm = Farm([pool("app", "10.0.0.1:80", "10.0.0.2:80")], self.clock, b"k")
        self.pool = self.farm.pools["app"]
        self.tracker = SessionTracker(DAM("u0", self.clock, never, 1), self.clock)
        self.tracker.start()
        self.addCleanup(self.tracker.stop)

    def answer(self, host: object, known: bool) -> None:
        raise AssertionError("a standalone DAM has nobody to ask")

    def test_unknown_sessions_are_unknown(self) -> None:
        self.assertEqual(self.tracker.lookup(self.pool, "nope", self.answer), (None, False))
        self.assertEqual(self.tracker.lookup(self.pool, "x" * (MAX_SESSION_KEY + 1), self.answer), (None, False))

    def test_announced_session_and_its_end(self) -> None:
        self.tracker.session_up("app", "s1", SessionKind.HTTP_COOKIE, "10.0.0.2:80", 7)
        host = self.pool.by_key["10.0.0.2:80"]
        self.assertEqual(self.tracker.lookup(self.pool, "s1", self.answer), (host, True))
        self.assertEqual(self.tracker.counts(), {("app", "10.0.0.2:80"): 1})
        self.tracker.session_down("app", "s1", 7)
        self.assertEqual(self.tracker.lookup(self.pool, "s1", self.answer), (None, False))

    def test_known_session_on_an_inactive_host_has_no_host(self) -> None:
        self.tracker.session_up("app", "s1", SessionKind.HTTP_COOKIE, "10.0.0.1:80", 7)
        host = self.pool.by_key["10.0.0.1:80"]
        self.pool.set_directive(host, INACTIVE)
        self.assertEqual(self.tracker.lookup(self.pool, "s1", self.answer), (None, True))
        other = self.pool.by_key["10.0.0.2:80"]
        self.tracker.bind(self.pool, "s1", other)
        self.assertEqual(self.tracker.lookup(self.pool, "s1", self.answer), (other, True))

    def test_listing_pages_in_key_order(self) -> None:
        for key in ("c", "a", "b"):
            self.tracker.session_up("app", key, SessionKind.USER, "10.0.0.1:80", 7)
        self.assertEqual([a.key for a in self.tracker.listing("app", limit=2)], ["app/a", "app/b"])
        self.assertEqual([a.key for a in self.tracker.listing("app", after="b")], ["app/c"])
        self.assertTrue(self.tracker.forget("app", "a"))
        self.assertFalse(self.tracker.forget("app", "a"))

    def test_a_full_table_is_counted_not_raised(self) -> None:
        tracker = SessionTracker(DAM("u1", self.clock, never, 1, max_atoms=1), self.clock)
        host = self.pool.by_key["10.0.0.1:80"]
        tracker.bind(self.pool, "one", host)
        tracker.bind(self.pool, "two", host)
        tracker.session_up("app", "three", SessionKind.HTTP_COOKIE, "10.0.0.1:80", 7)
        self.assertEqual(tracker.full, 2)
        self.assertEqual(len(tracker.counts()), 1)
