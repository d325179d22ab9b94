"""The DAM, sans-I/O: the atom wire format, replica placement, the conflict
rules, queries and caching, zombies, membership changes and resync, limits and
memory per atom -- on an in-memory network of 2 to 5 units that delivers,
drops, duplicates and reorders calls, partitions and heals, and restarts units
with empty state; plus a Hypothesis state machine that checks convergence."""

from __future__ import annotations

import gc
import tracemalloc
from collections import deque
from itertools import combinations
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.session.dam import (
    BATCH_ATOMS,
    DAM,
    MAX_KEY,
    MAX_VALUE,
    QUERY_ESCALATE,
    QUERY_TIMEOUT,
    SYNC_BATCH,
    WIRE_VERSION,
    AddAtom,
    AddAtoms,
    Atom,
    Call,
    DamFull,
    DeleteAtom,
    QueryAtom,
    ReturnAtom,
    SyncBatch,
    SyncRequest,
    WireError,
    assigned,
    decode_atoms,
    encode_atoms,
    encode_chunks,
    holders,
    ranking,
)

H1, H2, H3 = "app/10.0.0.1:80", "app/10.0.0.2:80", "app/10.0.0.3:80"


class Net:
    """Units ``u0``.. ``u{n-1}`` joined by links that carry calls in order
    (as a TCP connection does) until cut.  The constructor settles the first
    resync; after that nothing moves until a test delivers.

    Cutting a link drops what is in flight on it, both ways, and tells both
    ends the other left (what the transport does when a connection drops);
    healing tells both it joined.  ``restart`` replaces a unit by an empty DAM.
    """

    def __init__(self, n: int, replication: int | None, clock: Clock | None = None, **options: Any) -> None:
        self.clock = clock or Clock()
        self.replication = replication
        self.options = options
        self.names = [f"u{i}" for i in range(n)]
        self.up = {frozenset(pair) for pair in combinations(self.names, 2)}
        self.queues: dict[tuple[str, str], deque[Call]] = {}
        self.lost = 0
        self.delivered = 0
        self.dams = {name: self._make(name) for name in self.names}
        for name in self.names:
            self.dams[name].set_peers(self.neighbours(name))
        self.settle()

    def _make(self, name: str) -> DAM:
        def send(peer: str, call: Call) -> None:
            if frozenset((name, peer)) in self.up:
                self.queues.setdefault((name, peer), deque()).append(call)
            else:
                self.lost += 1

        return DAM(name, self.clock, send, self.replication, **self.options)

    def __getitem__(self, name: str) -> DAM:
        return self.dams[name]

    def neighbours(self, name: str) -> set[str]:
        return {other for other in self.names if other != name and frozenset((name, other)) in self.up}

    def links(self) -> list[tuple[str, str]]:
        """Links with calls in flight, in a stable order."""
        return sorted(link for link, queue in self.queues.items() if queue)

    def deliver(self, src: str, dst: str) -> Call:
        call = self.queues[(src, dst)].popleft()
        self.delivered += 1
        self.dams[dst].receive(src, call)
        return call

    def flush(self) -> None:
        for dam in self.dams.values():
            dam.flush()

    def settle(self, limit: int = 1_000_000) -> int:
        """Deliver until nothing is in flight (round robin over the links)."""
        moved = 0
        while True:
            self.flush()
            links = self.links()
            if not links:
                return moved
            for src, dst in links:
                while self.queues[(src, dst)]:
                    self.deliver(src, dst)
                    moved += 1
            if moved > limit:
                raise AssertionError("the network does not settle")

    def sent(self, src: str, dst: str) -> list[Call]:
        return list(self.queues.get((src, dst), ()))

    def cut(self, a: str, b: str) -> None:
        self.up.discard(frozenset((a, b)))
        self.lost += len(self.queues.pop((a, b), ())) + len(self.queues.pop((b, a), ()))
        self.dams[a].set_peers(self.neighbours(a))
        self.dams[b].set_peers(self.neighbours(b))

    def heal(self, a: str, b: str) -> None:
        self.up.add(frozenset((a, b)))
        self.dams[a].set_peers(self.neighbours(a))
        self.dams[b].set_peers(self.neighbours(b))

    def heal_all(self) -> None:
        for a, b in combinations(self.names, 2):
            if frozenset((a, b)) not in self.up:
                self.heal(a, b)

    def kill(self, name: str) -> None:
        for other in self.names:
            if other != name and frozenset((name, other)) in self.up:
                self.cut(name, other)

    def restart(self, name: str) -> DAM:
        """``name`` dies and comes back empty, reconnected to everyone."""
        self.kill(name)
        self.dams[name] = self._make(name)
        for other in self.names:
            if other != name:
                self.heal(name, other)
        return self.dams[name]

    def lookup(self, name: str, key: str) -> Atom | None:
        """What ``name``'s router would use: the local atom, else a query."""
        dam = self.dams[name]
        atom = dam.get(key)
        if atom is not None:
            return atom
        answers: list[Atom | None] = []
        dam.query(key, answers.append)
        self.settle()
        if not answers:
            raise AssertionError(f"query for {key!r} on {name} did not resolve")
        return answers[0]

    def copies(self, key: str) -> set[str]:
        return {name for name, dam in self.dams.items() if dam.get(key) is not None}


def data(atom: Atom | None) -> str | None:
    return None if atom is None else atom.data


# --- wire format ------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_atoms = st.builds(
    Atom,
    key=_text.filter(lambda s: 0 < len(s.encode()) <= 255),
    data=_text.filter(lambda s: 0 < len(s.encode()) <= 255),
    kind=st.sampled_from(["http-cookie", "tls-session", "tcp"]),
    origin=st.sampled_from(["u0", "unit-b", "ü"]),
    counter=st.integers(0, 2**64 - 1),
    dead=st.booleans(),
)


class WireTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        atoms = (Atom("k1", H1, "http-cookie", "u0", 5), Atom("ключ", "", "tcp", "u1", 2**64 - 1, True))
        self.assertEqual(decode_atoms(encode_atoms(atoms)), atoms)
        self.assertEqual(decode_atoms(encode_atoms(())), ())

    def test_layout(self) -> None:
        blob = encode_atoms([Atom("k", "d", "t", "o", 258, True)])
        self.assertEqual(blob, bytes([WIRE_VERSION, 0, 0, 0, 1, 1]) + (258).to_bytes(8, "big") + b"\x01\x01\x01\x01kdto")

    def test_chunks_fit_the_transport(self) -> None:
        atoms = [Atom(f"{i:0200d}", H1 * 3, "http-cookie", "u0", i) for i in range(2000)]
        blobs = encode_chunks(atoms)
        self.assertGreater(len(blobs), 1)
        self.assertTrue(all(len(blob) <= MAX_VALUE for blob in blobs))
        self.assertEqual([a for blob in blobs for a in decode_atoms(blob)], atoms)
        self.assertEqual([decode_atoms(b) for b in encode_chunks([])], [()])

    def test_an_atom_larger_than_the_limit_is_our_bug(self) -> None:
        self.assertRaises(ValueError, encode_chunks, [Atom("k" * 200, H1, "t", "o", 1)], 100)
        self.assertRaises(ValueError, encode_atoms, [Atom("k", H1, "t", "o", -1)])

    def test_malformed_blobs(self) -> None:
        good = encode_atoms([Atom("k", "d", "t", "o", 1)])
        cases = {
            "short": good[:3],
            "version": bytes([WIRE_VERSION + 1]) + good[1:],
            "count too big": good[:4] + b"\x02" + good[5:],
            "truncated": good[:-1],
            "trailing": good + b"x",
            "flags": good[:5] + b"\x02" + good[6:],
            "not utf-8": good[:-4] + b"\xff" + good[-3:],
            "empty key": encode_atoms([Atom("k", "d", "t", "o", 1)]).replace(b"\x01\x01\x01\x01k", b"\x00\x02\x01\x01k"),
            "empty data on a live atom": good.replace(b"\x01\x01\x01\x01kd", b"\x02\x00\x01\x01kd"),
            "long origin": encode_atoms([Atom("k", "d", "t", "o" * 65, 1)]),
        }
        for name, blob in cases.items():
            with self.subTest(name):
                self.assertRaises(WireError, decode_atoms, blob)

    @given(st.lists(_atoms, max_size=20))
    def test_round_trip_property(self, atoms: list[Atom]) -> None:
        self.assertEqual(decode_atoms(encode_atoms(atoms)), tuple(atoms))
        self.assertEqual([a for blob in encode_chunks(atoms, 2000) for a in decode_atoms(blob)], atoms)

    @given(st.binary(max_size=200))
    def test_garbage_is_refused_not_crashed_on(self, blob: bytes) -> None:
        try:
            decode_atoms(bytes([WIRE_VERSION]) + blob)
        except WireError:
            pass


# --- placement ---------------------------------------------------------------------


class PlacementTests(SynchronousTestCase):
    units = ["u0", "u1", "u2", "u3", "u4"]

    def test_ranking_is_the_same_whatever_the_order(self) -> None:
        for i in range(50):
            order = ranking(f"key{i}", self.units)
            self.assertEqual(ranking(f"key{i}", reversed(self.units)), order)
            self.assertEqual(sorted(order), self.units)

    def test_ranking_spreads_keys(self) -> None:
        firsts = [ranking(f"key{i}", self.units)[0] for i in range(5000)]
        for unit in self.units:
            self.assertLess(abs(firsts.count(unit) / 5000 - 0.2), 0.03)

    def test_holders_by_level(self) -> None:
        for replication, placed in ((0, 0), (1, 2), (2, 3), (4, 5), (9, 5), (None, 5)):
            for i in range(30):
                key = f"k{i}"
                chosen = assigned(key, self.units, replication)
                self.assertEqual(len(chosen), placed)
                self.assertEqual(holders(key, "u3", self.units, replication), chosen | {"u3"})
                if replication not in (0, None):
                    self.assertEqual(chosen, set(ranking(key, self.units)[: replication + 1]))

    def test_every_version_of_a_key_goes_to_the_same_units(self) -> None:
        for i in range(30):
            key = f"k{i}"
            core = assigned(key, self.units, 1)
            for origin in self.units:
                self.assertEqual(holders(key, origin, self.units, 1) - {origin}, core - {origin})
            # The origin down: its copy is gone, the assigned ones remain.
            self.assertEqual(holders(key, "u3", [u for u in self.units if u != "u3"], 1),
                             assigned(key, [u for u in self.units if u != "u3"], 1))

    def test_a_leaving_unit_moves_only_its_own_keys(self) -> None:
        moved = 0
        rest = [u for u in self.units if u != "u2"]
        for i in range(300):
            before = assigned(f"k{i}", self.units, 1)
            after = assigned(f"k{i}", rest, 1)
            if "u2" not in before:
                self.assertEqual(before, after)
            else:
                moved += 1
                self.assertEqual(len(before & after), 1)
        self.assertGreater(moved, 0)

    def test_replication_levels_place_the_right_number_of_copies(self) -> None:
        """N + 1 copies on the units the key hashes to (none for 0, all for
        full), plus the origin's own where it is not one of them."""
        for replication, placed in ((0, 0), (1, 2), (2, 3), (None, 5)):
            net = Net(5, replication)
            keys = [f"k{i}" for i in range(40)]
            for i, key in enumerate(keys):
                net[f"u{i % 5}"].add(key, H1)
            net.settle()
            for i, key in enumerate(keys):
                with self.subTest(replication=replication, key=key):
                    origin = f"u{i % 5}"
                    core = assigned(key, net.names, replication)
                    self.assertEqual(len(core), placed)
                    self.assertEqual(net.copies(key), core | {origin})


# --- conflict rules ------------------------------------------------------------------


class ConflictTests(SynchronousTestCase):
    def test_add_then_later_delete_on_another_unit_wins(self) -> None:
        net = Net(3, 1)
        net.clock.advance(1)
        net["u0"].add("k", H1)
        net.clock.advance(1)
        net["u1"].delete("k")  # u1 has not seen the add: only the clock orders them
        net.settle()
        for name in net.names:
            self.assertIsNone(net.lookup(name, "k"))
            self.assertTrue(net[name].entry("k").dead)

    def test_delete_then_later_add_on_another_unit_wins(self) -> None:
        net = Net(3, 1)
        net.clock.advance(1)
        net["u1"].delete("k")
        net.clock.advance(1)
        net["u0"].add("k", H2)
        net.settle()
        for name in net.names:
            self.assertEqual(data(net.lookup(name, "k")), H2)

    def test_concurrent_writes_order_by_counter_then_unit_name(self) -> None:
        net = Net(2, 1)  # the clock stands still: versions are pure Lamport
        add = net["u0"].add("k", H1)
        zombie = net["u1"].delete("k")
        self.assertEqual(add.version, (1, "u0"))
        self.assertEqual(zombie.version, (1, "u1"))
        net.settle()
        self.assertIsNone(net.lookup("u0", "k"))
        self.assertIsNone(net.lookup("u1", "k"))

    def test_a_delete_that_saw_the_add_wins_even_against_the_clock(self) -> None:
        net = Net(2, 1)
        net.clock.advance(10)
        net["u0"].add("k", H1)
        net.settle()
        net.clock.advance(-5)  # u1's clock is behind; Lamport order still puts it after
        zombie = net["u1"].delete("k")
        self.assertGreater(zombie.version, net["u0"].entry("k").version)
        net.settle()
        self.assertIsNone(net["u0"].get("k"))

    def test_zombie_blocks_an_older_add_that_arrives_late(self) -> None:
        net = Net(3, None)
        net.clock.advance(1)
        net["u0"].add("k", H1)
        net.clock.advance(1)
        net["u1"].delete("k")
        # u2 sees the delete first, then the older add.
        net.deliver("u1", "u2")
        self.assertTrue(net["u2"].entry("k").dead)
        net.deliver("u0", "u2")
        self.assertIsNone(net["u2"].get("k"))
        self.assertEqual(net["u2"].stats["stale"], 1)
        net.settle()
        for name in net.names:
            self.assertIsNone(net.lookup(name, "k"))

    def test_zombies_live_for_the_dead_time_then_go(self) -> None:
        net = Net(2, 1, zombie_time=30.0, zombie_times={"tcp": 240.0})
        net.clock.advance(100)
        net["u0"].add("cookie", H1)
        net["u0"].add("conn", H1, kind="tcp")
        net.settle()
        net["u0"].delete("cookie")
        net["u0"].delete("conn")
        net.settle()
        for dam in net.dams.values():
            self.assertEqual((len(dam), dam.zombies), (2, 2))
        net.clock.advance(29.9)
        for dam in net.dams.values():
            dam.tick()
            self.assertEqual(len(dam), 2)
        net.clock.advance(0.2)
        for dam in net.dams.values():
            dam.tick()
            self.assertEqual((len(dam), dam.zombies), (1, 1))
            self.assertEqual(dam.entry("conn").kind, "tcp")
        net.clock.advance(240)
        for dam in net.dams.values():
            dam.tick()
            self.assertEqual((len(dam), dam.zombies), (0, 0))
            self.assertEqual(dam.stats["zombies_expired"], 2)

    def test_an_expired_zombie_arriving_late_is_not_stored(self) -> None:
        net = Net(2, 1, zombie_time=1.0)
        net["u0"].delete("k")
        net.clock.advance(5)
        net.settle()
        self.assertIsNone(net["u1"].entry("k"))
        self.assertEqual(net["u1"].stats["expired_on_arrival"], 1)

    def test_an_add_after_the_delete_revives_the_key(self) -> None:
        net = Net(3, 1)
        net["u0"].add("k", H1)
        net.settle()
        net["u2"].query("k", lambda atom: None)
        net.settle()
        net["u0"].delete("k")
        net.settle()
        net["u1"].add("k", H2)
        net.settle()
        for name in net.names:
            self.assertEqual(data(net.lookup(name, "k")), H2)

    def test_two_units_that_disagree_converge_to_the_higher_version(self) -> None:
        net = Net(3, 1)
        net.cut("u0", "u1")
        net.cut("u0", "u2")
        net.clock.advance(1)
        net["u0"].add("k", H1)
        net.clock.advance(1)
        winner = net["u1"].add("k", H2)
        net.settle()
        self.assertEqual(data(net["u0"].get("k")), H1)
        net.heal_all()
        net.settle()
        for name in net.names:
            atom = net.lookup(name, "k")
            self.assertEqual(atom, winner)

    def test_host_failure_and_fail_back(self) -> None:
        """A host going down changes nothing in the DAM; a re-announcement on
        another host is a later write and wins everywhere, caches included; a
        late announcement from the first host cannot undo it; a newer one can."""
        net = Net(4, 1)
        net.clock.advance(1)
        first = net["u0"].add("k", H1)
        net.settle()
        outsider = next(n for n in net.names if n not in net["u0"].holders("k"))
        self.assertEqual(data(net.lookup(outsider, "k")), H1)  # now cached there
        self.assertEqual(net[outsider].stats["cached"], 1)
        # H1 fails: the router moves the session; the application re-announces it on H2.
        net.clock.advance(1)
        net["u3" if outsider != "u3" else "u2"].add("k", H2)
        net.settle()
        for name in net.names:
            self.assertEqual(data(net[name].get("k")) or data(net.lookup(name, "k")), H2, name)
        self.assertEqual(data(net[outsider].get("k")), H2)  # the cache was refreshed
        # A retried announcement from H1's agent, older than the move, arrives late.
        for name in net.names:
            net[name].receive("u0", AddAtom(first))
            self.assertEqual(data(net[name].get("k")) or data(net.lookup(name, "k")), H2)
        # H1 fails back and the application moves the session back: newer, so it wins.
        net.clock.advance(1)
        net["u1"].add("k", H1)
        net.settle()
        for name in net.names:
            self.assertEqual(data(net.lookup(name, "k")), H1)


    def test_a_sender_of_an_older_atom_gets_the_newer_one_back(self) -> None:
        net = Net(2, 1)
        net.clock.advance(1)
        old = net["u0"].add("k", H1)
        net.clock.advance(1)
        net["u1"].add("k", H2)
        net.settle()
        self.assertEqual(net["u1"].stats["corrected"], 1)  # u0's add arrived after u1's own
        sent: list[tuple[str, Call]] = []
        net["u1"].send = lambda peer, call: sent.append((peer, call))
        net["u1"].receive("u0", AddAtom(old))
        self.assertEqual(sent, [("u0", AddAtom(net["u1"].entry("k"), refresh=True))])  # type: ignore[arg-type]
        self.assertEqual(net["u1"].stats["corrected"], 2)

    def test_a_refresh_only_updates_a_unit_that_has_the_key(self) -> None:
        dam = DAM("u0", Clock(), lambda peer, call: None, 1)
        dam.receive("u1", AddAtom(Atom("k", H1, "http-cookie", "u1", 5), refresh=True))
        self.assertIsNone(dam.entry("k"))
        self.assertEqual(dam.stats["refresh_skipped"], 1)


# --- queries and caching ----------------------------------------------------------------


class QueryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Net(4, 1)
        self.net["u0"].add("k", H1)
        self.net.settle()
        self.outsider = next(n for n in self.net.names if n not in self.net["u0"].holders("k"))

    def test_query_finds_an_atom_held_elsewhere_and_caches_it(self) -> None:
        dam = self.net[self.outsider]
        self.assertIsNone(dam.get("k"))
        got: list[Atom | None] = []
        dam.query("k", got.append)
        self.assertEqual(got, [])
        self.net.settle()
        self.assertEqual(data(got[0]), H1)
        self.assertEqual(data(dam.get("k")), H1)
        self.assertEqual((dam.stats["cached"], dam.stats["query_hit"]), (1, 1))
        dam.query("k", got.append)  # now local
        self.assertEqual(len(got), 2)
        self.assertEqual(dam.stats["query_local"], 1)

    def test_first_choice_is_the_keys_ranking(self) -> None:
        dam = self.net[self.outsider]
        dam.query("k", lambda atom: None)
        asked = {dst for (src, dst) in self.net.links() if src == self.outsider}
        self.assertEqual(asked, assigned("k", self.net.names, 1) - {self.outsider})

    def test_waiters_share_one_query(self) -> None:
        dam = self.net[self.outsider]
        got: list[Atom | None] = []
        for _ in range(5):
            dam.query("k", got.append)
        queries = [c for (src, dst) in self.net.links() if src == self.outsider for c in self.net.sent(src, dst)]
        self.assertTrue(all(isinstance(c, QueryAtom) for c in queries))
        self.assertEqual(len({c.qid for c in queries if isinstance(c, QueryAtom)}), 1)
        self.net.settle()
        self.assertEqual([data(a) for a in got], [H1] * 5)
        self.assertEqual(dam.stats["query_shared"], 4)

    def test_not_found_anywhere_resolves_none_after_everyone_answered(self) -> None:
        dam = self.net["u1"]
        got: list[Atom | None] = []
        dam.query("nope", got.append)
        first = {dst for (src, dst) in self.net.links() if src == "u1"}
        self.assertEqual(first, assigned("nope", self.net.names, 1) - {"u1"})
        self.net.settle()  # the assigned units say no, then everyone else is asked
        self.assertEqual(got, [None])
        self.assertEqual(dam.stats["query_miss"], 1)
        self.assertEqual(dam.stats["recv_ReturnAtom"], 3)

    def test_silent_first_choice_escalates_then_times_out(self) -> None:
        dam = self.net[self.outsider]
        got: list[Atom | None] = []
        dam.query("k", got.append)
        first = {dst for (src, dst) in self.net.links() if src == self.outsider}
        self.net.clock.advance(QUERY_ESCALATE)
        dam.tick()
        everyone = {dst for (src, dst) in self.net.links() if src == self.outsider}
        self.assertEqual(everyone, set(self.net.names) - {self.outsider})
        self.assertLess(len(first), len(everyone))
        self.assertEqual(dam.stats["query_escalated"], 1)
        self.net.clock.advance(QUERY_TIMEOUT)
        dam.tick()
        self.assertEqual(got, [None])
        self.assertEqual(dam.stats["query_timeout"], 1)
        self.net.settle()  # the late answers change nothing
        self.assertEqual(got, [None])
        self.assertGreater(dam.stats["late_return"], 0)

    def test_a_peer_that_leaves_counts_as_not_found(self) -> None:
        dam = self.net["u1"]
        got: list[Atom | None] = []
        dam.query("nope", got.append)
        for other in ("u0", "u2", "u3"):
            self.net.cut("u1", other)
        self.assertEqual(got, [None])

    def test_alone_or_overloaded_resolves_none_at_once(self) -> None:
        net = Net(1, 1)
        got: list[Atom | None] = []
        net["u0"].query("k", got.append)
        self.assertEqual(got, [None])
        net = Net(2, 1, max_pending_queries=2)
        for key in ("a", "b", "c"):
            net["u0"].query(key, got.append)
        self.assertEqual(got, [None, None])
        self.assertEqual(net["u0"].stats["query_overflow"], 1)

    def test_a_callback_may_query_again(self) -> None:
        dam = self.net[self.outsider]
        got: list[Atom | None] = []
        dam.query("k", lambda atom: dam.query("k", got.append))
        self.net.settle()
        self.assertEqual(data(got[0]), H1)

    def test_an_answer_for_another_key_is_dropped(self) -> None:
        dam = self.net[self.outsider]
        got: list[Atom | None] = []
        dam.query("k", got.append)
        [(src, dst), *_] = [(s, d) for (s, d) in self.net.links() if s == self.outsider]
        qid = self.net.sent(src, dst)[0].qid  # type: ignore[union-attr]
        dam.receive(dst, ReturnAtom(qid, Atom("other", H2, "http-cookie", dst, 99)))
        self.assertEqual(dam.stats["drop_malformed"], 1)
        self.assertIsNone(dam.entry("other"))


# --- membership, resync, re-replication ---------------------------------------------------


class MembershipTests(SynchronousTestCase):
    def fill(self, net: Net, n: int = 60, writers: list[str] | None = None) -> list[str]:
        """``n`` keys written round robin by ``writers`` (every unit by default)."""
        writers = writers or net.names
        keys = [f"k{i}" for i in range(n)]
        self.origin: dict[str, str] = {}
        for i, key in enumerate(keys):
            net.clock.advance(0.001)
            self.origin[key] = writers[i % len(writers)]
            net[self.origin[key]].add(key, (H1, H2, H3)[i % 3])
        net.settle()
        return keys

    def holders(self, net: Net, key: str) -> frozenset[str]:
        return holders(key, self.origin[key], net.names, net.replication)

    def test_killing_a_unit_loses_no_atom(self) -> None:
        for replication in (1, 2):
            net = Net(4, replication)
            keys = self.fill(net)
            for victim in ("u2", "u0"):  # one, then another once re-replicated
                net.kill(victim)
                net.settle()
                alive = [n for n in net.names if n not in ("u2", "u0")[: 1 + (victim == "u0")]]
                for key in keys:
                    with self.subTest(replication=replication, victim=victim, key=key):
                        copies = net.copies(key) & set(alive)
                        self.assertGreaterEqual(len(copies), min(replication + 1, len(alive)))
                        for name in alive:
                            self.assertIsNotNone(net.lookup(name, key))

    def test_replication_zero_loses_the_dead_units_atoms(self) -> None:
        net = Net(3, 0)
        net["u0"].add("k", H1)
        net.settle()
        net.kill("u0")
        self.assertIsNone(net.lookup("u1", "k"))

    def test_restart_resyncs_before_serving(self) -> None:
        net = Net(4, 1)
        keys = self.fill(net)
        resynced: list[bool] = []
        dam = net.restart("u1")
        dam.on_resync = lambda: resynced.append(True)
        self.assertEqual(len(dam), 0)
        self.assertFalse(dam.resync_done)
        self.assertEqual(dam.pending_sync, {"u0", "u2", "u3"})
        net.settle()
        self.assertTrue(dam.resync_done)
        self.assertEqual(resynced, [True])
        everything = [a for d in net.dams.values() for a in d.atoms()]
        for key in keys:
            # Every unit the key is assigned to has it, u1 included; u1's
            # own copies of keys not assigned to it are not needed.
            core = assigned(key, net.names, 1)
            self.assertLessEqual(core, net.copies(key))
            self.assertEqual("u1" in core, dam.get(key) is not None)
        # The last SyncBatch carried each peer's clock: u1's next write
        # outranks everything written before, its own earlier writes too.
        self.assertGreater(dam.add("k0", H3).version, max(a.version for a in everything))

    def test_sync_batches_are_bounded(self) -> None:
        net = Net(2, None)
        for i in range(SYNC_BATCH * 2 + 5):
            net["u0"].add(f"k{i}", H1)
        net.settle()
        net.restart("u1")
        net.deliver("u1", "u0")  # u1's SyncRequest
        batches = [c for c in net.sent("u0", "u1") if isinstance(c, SyncBatch)]
        self.assertEqual([len(b.atoms) for b in batches], [SYNC_BATCH, SYNC_BATCH, 5])
        self.assertEqual([b.last for b in batches], [False, False, True])

    def test_a_new_unit_gets_exactly_its_share(self) -> None:
        net = Net(4, 1)
        net.kill("u3")
        keys = self.fill(net, writers=["u0", "u1", "u2"])
        net.heal_all()
        net.settle()
        for key in keys:
            self.assertEqual("u3" in self.holders(net, key), net["u3"].get(key) is not None)
            self.assertEqual(self.holders(net, key), net.copies(key))

    def test_a_join_drops_caches_after_handing_them_over(self) -> None:
        net = Net(4, 1)
        net["u0"].add("k", H1)
        net.settle()
        outsider = next(n for n in net.names if n not in net["u0"].holders("k"))
        net.lookup(outsider, "k")
        self.assertIsNotNone(net[outsider].get("k"))
        other = next(n for n in net.names if n != outsider)
        net.cut(outsider, other)
        net.heal(outsider, other)
        self.assertIsNone(net[outsider].get("k"))
        self.assertEqual(net[outsider].stats["cache_dropped"], 1)
        self.assertEqual(data(net.lookup(outsider, "k")), H1)

    def test_an_atom_pushed_to_a_unit_not_assigned_its_key_is_passed_on(self) -> None:
        net = Net(4, 1)
        key = next(f"k{i}" for i in range(100) if assigned(f"k{i}", net.names, 1) == {"u0", "u1"})
        atom = Atom(key, H1, "http-cookie", "u9", 7)
        net["u3"].receive("u2", AddAtom(atom))  # u2 thought u3 was assigned the key
        self.assertIsNone(net["u3"].entry(key))
        self.assertEqual(net["u3"].stats["forwarded"], 1)
        net.settle()
        self.assertEqual(net.copies(key), assigned(key, net.names, 1))

    def test_an_answer_to_a_query_in_flight_across_a_join_is_used_not_cached(self) -> None:
        net = Net(3, 1)
        net["u0"].add("k", H1)
        net.settle()
        outsider = next(n for n in net.names if n not in net["u0"].holders("k"))
        other = next(n for n in net.names if n not in ("u0", outsider))
        got: list[Atom | None] = []
        net[outsider].query("k", got.append)
        net.cut(outsider, other)
        net.heal(outsider, other)  # a join while the query is out
        net.settle()
        self.assertEqual(data(got[0]), H1)
        self.assertIsNone(net[outsider].get("k"))
        self.assertEqual(net[outsider].stats["not_cached"], 1)

    def test_sync_request_from_a_peer_not_yet_live(self) -> None:
        net = Net(1, 1)
        net["u0"].add("k", H1)
        net.settle()
        sent: list[tuple[str, Call]] = []
        net["u0"].send = lambda peer, call: sent.append((peer, call))
        net["u0"].receive("u9", SyncRequest())
        self.assertEqual(sent, [("u9", SyncBatch((net["u0"].entry("k"),), True, 1))])  # type: ignore[arg-type]
        self.assertEqual(net["u0"].peers, frozenset())


# --- batching and limits ------------------------------------------------------------------


class BatchingTests(SynchronousTestCase):
    def test_without_wakeup_each_write_goes_at_once(self) -> None:
        net = Net(2, 1)
        atom = net["u0"].add("k", H1)
        zombie = net["u0"].delete("k")
        self.assertEqual(net.sent("u0", "u1"), [AddAtom(atom), DeleteAtom("k", zombie.version, "http-cookie")])

    def test_with_wakeup_a_burst_is_one_batch_per_peer(self) -> None:
        net = Net(3, None)
        wakeups: list[str] = []
        net["u0"].wakeup = lambda: wakeups.append("wake")
        atoms = [net["u0"].add(f"k{i}", H1) for i in range(100)]
        self.assertEqual(wakeups, ["wake"])
        self.assertEqual(net.links(), [])
        net["u0"].flush()
        for peer in ("u1", "u2"):
            self.assertEqual(net.sent("u0", peer), [AddAtoms(tuple(atoms))])
        net.settle()
        self.assertEqual(len(net["u2"]), 100)

    def test_a_full_outbox_does_not_wait(self) -> None:
        net = Net(2, 1)
        net["u0"].wakeup = lambda: None
        for i in range(BATCH_ATOMS + 1):
            net["u0"].add(f"k{i}", H1)
        [batch] = net.sent("u0", "u1")
        self.assertEqual(len(batch.atoms), BATCH_ATOMS)  # type: ignore[union-attr]


class LimitTests(SynchronousTestCase):
    def test_bad_arguments_are_the_callers_bug(self) -> None:
        dam = DAM("u0", Clock(), lambda peer, call: None, 1)
        for args in (("", H1), ("k" * (MAX_KEY + 1), H1), ("k", ""), ("k", H1, "")):
            self.assertRaises(ValueError, dam.add, *args)
        self.assertRaises(ValueError, DAM, "", Clock(), lambda p, c: None, 1)
        self.assertRaises(ValueError, DAM, "u0", Clock(), lambda p, c: None, -1)
        self.assertRaises(TypeError, dam.receive, "u1", "not a call")

    def test_a_full_table(self) -> None:
        net = Net(2, 1, max_atoms=2)
        net["u0"].add("a", H1)
        net["u0"].add("b", H1)
        self.assertRaises(DamFull, net["u0"].add, "c", H1)
        net["u0"].add("a", H2)  # an existing key still updates
        net["u1"].receive("u0", AddAtom(Atom("z", H1, "http-cookie", "u0", 99)))
        net.settle()
        self.assertEqual(len(net["u1"]), 2)
        self.assertEqual(net["u1"].stats["drop_table_full"], 1)

    def test_a_version_from_the_far_future_is_refused(self) -> None:
        dam = DAM("u0", Clock(), lambda peer, call: None, 1, max_skew=10)
        dam.receive("u1", AddAtom(Atom("k", H1, "http-cookie", "u1", 11_000_000)))
        self.assertIsNone(dam.get("k"))
        self.assertEqual(dam.stats["drop_future"], 1)
        dam.receive("u1", AddAtom(Atom("k", H1, "http-cookie", "u1", 9_000_000)))
        self.assertEqual(dam.add("j", H1).counter, 9_000_001)  # Lamport: after what it saw

    def test_memory_per_atom(self) -> None:
        """100k atoms with 32-character keys, as added and as received, key
        strings included: under 300 bytes each."""
        n = 100_000
        hosts = [f"app/10.0.{i // 250}.{i % 250}:8080" for i in range(50)]
        for path in ("added", "received"):
            with self.subTest(path):
                clock = Clock()
                clock.advance(1_700_000_000)
                dam = DAM("unit-a", clock, lambda peer, call: None, 1)
                blob = b""
                if path == "received":
                    blob = encode_atoms(Atom(f"{i:032x}", hosts[i % 50], "http-cookie", "unit-b", 10**15 + i)
                                        for i in range(n))
                gc.collect()
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    if path == "added":
                        for i in range(n):
                            dam.add(f"{i:032x}", hosts[i % 50])
                    else:
                        dam.receive("unit-b", AddAtoms(decode_atoms(blob)))
                        blob = b""
                    gc.collect()
                    per_atom = (tracemalloc.get_traced_memory()[0] - base) / n
                finally:
                    tracemalloc.stop()
                self.assertEqual(len(dam), n)
                self.assertLess(per_atom, 300, f"{per_atom:.0f} bytes per atom")


# --- convergence, by Hypothesis ---------------------------------------------------------------

KEYS = [f"k{i}" for i in range(5)]
HOSTS = [H1, H2, H3]


class DamMachine(RuleBasedStateMachine):
    """Random adds, deletes, queries, clock steps and network events on 2-5
    units; at each ``check`` the network heals and settles, and then every
    unit must answer every key with the highest-version write."""

    net: Net

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, tuple[tuple[int, str], str | None]] = {}
        self.history: list[Atom] = []
        self.net = Net(2, 1)

    @initialize(n=st.integers(2, 5), replication=st.sampled_from([1, 2, None]))
    def setup(self, n: int, replication: int | None) -> None:
        self.net = Net(n, replication, zombie_time=1e6)

    def unit(self, i: int) -> str:
        return self.net.names[i % len(self.net.names)]

    def record(self, atom: Atom) -> None:
        self.history.append(atom)
        old = self.model.get(atom.key)
        if old is None or atom.version > old[0]:
            self.model[atom.key] = (atom.version, None if atom.dead else atom.data)

    @rule(i=st.integers(0, 4), key=st.sampled_from(KEYS), host=st.sampled_from(HOSTS))
    def add(self, i: int, key: str, host: str) -> None:
        self.record(self.net[self.unit(i)].add(key, host))

    @rule(i=st.integers(0, 4), key=st.sampled_from(KEYS))
    def delete(self, i: int, key: str) -> None:
        self.record(self.net[self.unit(i)].delete(key))

    @precondition(lambda self: bool(self.history))
    @rule(i=st.integers(0, 4), j=st.integers(0, 4), k=st.integers(0, 1000))
    def replay(self, i: int, j: int, k: int) -> None:
        """A write from the past arrives again (a retried announcement, a
        duplicate on a link): it must change nothing the model does not."""
        if self.unit(i) != self.unit(j):
            atom = self.history[k % len(self.history)]
            self.net[self.unit(i)].receive(self.unit(j), AddAtom(atom))

    @rule(i=st.integers(0, 4), key=st.sampled_from(KEYS))
    def query(self, i: int, key: str) -> None:
        self.net[self.unit(i)].query(key, lambda atom: None)

    @rule(dt=st.sampled_from([0.0, 0.000001, 0.001, 0.1]))
    def advance(self, dt: float) -> None:
        self.net.clock.advance(dt)
        for dam in self.net.dams.values():
            dam.tick()

    @rule(j=st.integers(0, 100), count=st.integers(1, 5))
    def deliver(self, j: int, count: int) -> None:
        links = self.net.links()
        if links:
            src, dst = links[j % len(links)]
            for _ in range(min(count, len(self.net.queues[(src, dst)]))):
                self.net.deliver(src, dst)

    @rule(j=st.integers(0, 100))
    def duplicate(self, j: int) -> None:
        links = self.net.links()
        if links:
            queue = self.net.queues[links[j % len(links)]]
            queue.appendleft(queue[0])

    @rule(j=st.integers(0, 100))
    def reorder(self, j: int) -> None:
        links = self.net.links()
        if links:
            queue = self.net.queues[links[j % len(links)]]
            if len(queue) > 1:
                queue[0], queue[1] = queue[1], queue[0]

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def cut(self, a: int, b: int) -> None:
        if self.unit(a) != self.unit(b):
            self.net.cut(self.unit(a), self.unit(b))

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def heal(self, a: int, b: int) -> None:
        if self.unit(a) != self.unit(b):
            self.net.heal(self.unit(a), self.unit(b))

    @rule(i=st.integers(0, 4))
    def restart(self, i: int) -> None:
        # A unit dies with its replicas delivered (replication >= 1 then keeps
        # every write elsewhere) and comes back empty.
        self.net.heal_all()
        self.net.settle()
        self.net.restart(self.unit(i))
        # It resyncs before it serves (DamService.whenReady): its own writes
        # come back first, so its next write has a higher version.
        self.net.settle()
        assert self.net[self.unit(i)].resync_done

    @precondition(lambda self: bool(self.model))
    @rule()
    def check(self) -> None:
        self.net.heal_all()
        self.net.settle()
        for key, (_, expected) in sorted(self.model.items()):
            for name in self.net.names:
                got = data(self.net.lookup(name, key))
                assert got == expected, f"{name} has {key} -> {got!r}, the last write was {expected!r}"

    def teardown(self) -> None:
        if self.model:
            self.check()


class TestDamConvergence(DamMachine.TestCase):  # type: ignore[name-defined,misc]
    """The state machine, as a unittest case that trial also collects."""

    settings = settings(
        max_examples=300, stateful_step_count=50, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

    def test_convergence(self) -> None:
        self.runTest()


class ReplayWhileQueryingTests(SynchronousTestCase):
    """Found by the state machine: a replayed old add reaching a unit while it
    queried the key was taken as the query's answer and cached for good."""

    def test_a_push_does_not_answer_a_query(self) -> None:
        machine = DamMachine()
        machine.setup(n=4, replication=1)
        machine.add(host="app/10.0.0.1:80", i=0, key="k2")
        machine.add(host="app/10.0.0.2:80", i=0, key="k2")
        machine.restart(i=0)
        machine.query(i=2, key="k2")
        machine.add(host="app/10.0.0.1:80", i=0, key="k0")
        machine.replay(i=2, j=0, k=0)
        machine.check()
