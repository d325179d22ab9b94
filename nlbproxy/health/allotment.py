# -*- test-case-name: tests.test_allotment -*-
"""Allotments: how a pool's next host is drawn from health and load.

The classifier keeps one allotment per pool and calls
``draw(hosts, exclude)`` for every new client (or request) that no affinity
binds.  Only *eligible* hosts are drawn: directive ``active`` and up (agent,
probe and passive health all agree, :meth:`Host.is_up`).  ``exclude`` holds
hosts this request already failed on.  A draw returns None only when no
eligible host is left outside ``exclude``.

Three kinds, chosen per pool (``balance`` in the pool's config):

``tokens`` (:class:`TokenAllotment`, the default)
    The seed's token allotment.  A refill hands each eligible host tokens in
    proportion to its spare capacity, ``capacity * (100 - load)``, shuffles
    them with this unit's own RNG and deals them out one per draw.  Every
    unit shuffles differently, so a farm of units does not send its next
    requests to the same host in step (herding).
``percentage`` (:class:`PercentageAllotment`)
    The seed's percentage allotment: a share per eligible host from spare
    capacity, held for ``duration`` seconds, drawn by weighted random.
``round_robin`` (:class:`RoundRobin`)
    nginx's smooth weighted round robin by configured weight, blind to load.

Spare capacity: a host at load 100 (or capacity 0) has none and is not
drawn while another candidate has some; when every candidate has none they
share evenly, because an overloaded host still beats refusing the client.

How a token allotment notices change: it compares a *signature* of the pool
on every draw (each host's identity, eligibility, load and capacity; one
cheap pass over the pool, no more than round robin's own pass), or, when the
caller passes ``version`` (the classifier's ``Pool.version``, bumped on every
membership, health, load or directive change), just that number.  A changed
pool refills at once; :meth:`~TokenAllotment.invalidate` forces a refill;
and no deal outlives ``max_age``, which also bounds how late a host whose
passive-failure timeout merely expired (no version bump) gets tokens again.
Whatever the bookkeeping, a token is only dealt to a host that is eligible
and not excluded at the moment of the draw.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    # Imported for types only: the classifier imports this module.
    from nlbproxy.classifier import Host

__all__ = [
    "ACTIVE",
    "DURATION",
    "KINDS",
    "MAX_AGE",
    "TOKENS",
    "Allotment",
    "PercentageAllotment",
    "RoundRobin",
    "TokenAllotment",
    "eligible",
    "make_allotment",
    "smooth_weighted_round_robin",
    "spare",
]

#: The classifier's ``ACTIVE`` directive, repeated here so that the
#: classifier may import this module without a cycle.
ACTIVE = "active"
#: Tokens dealt per refill, shared among eligible hosts by spare capacity.
#: A hundred makes a share a percentage; every host with spare capacity gets
#: at least one, so a big pool deals more.
TOKENS = 100
#: Seconds a token deal or a set of percentages may be used before it is
#: recomputed, whatever else happened.
MAX_AGE = 2.0
#: Seconds a percentage allotment holds its shares while only loads change.
DURATION = 1.0
#: The kinds :func:`make_allotment` builds, as named in a pool's ``balance``.
KINDS = ("tokens", "percentage", "round_robin")


class Clock(Protocol):
    def seconds(self) -> float: ...


class Allotment(Protocol):
    """What the classifier calls, whatever the kind."""

    def draw(self, hosts: Sequence[Host], exclude: Container[Host] = (), version: int | None = None) -> Host | None:
        """The next host of ``hosts`` for a new client; None if none may take it."""
        ...

    def invalidate(self) -> None:
        """Forget what was computed from the pool; the next draw starts afresh."""
        ...


def eligible(host: Host, now: float) -> bool:
    """May ``host`` take new clients?"""
    return host.directive == ACTIVE and host.is_up(now)


def spare(host: Host) -> int:
    """Spare capacity: ``capacity * (100 - load)``, never negative."""
    return max(0, host.capacity) * max(0, 100 - host.load)


def smooth_weighted_round_robin(hosts: Sequence[Host], exclude: Container[Host], now: float) -> Host | None:
    """nginx's smooth weighted round robin over eligible hosts not in ``exclude``.

    Each draw adds every candidate's weight to its ``current_weight``, picks
    the largest and takes the round's total weight off the winner; weights 5,
    1, 1 give a a b a c a a.  The state lives on the hosts.
    """
    best: Host | None = None
    total = 0
    for host in hosts:
        if not eligible(host, now) or host in exclude:
            continue
        host.current_weight += host.weight
        total += host.weight
        if best is None or host.current_weight > best.current_weight:
            best = host
    if best is not None:
        best.current_weight -= total
    return best


def _fallback(rng: random.Random, hosts: Sequence[Host], exclude: Container[Host], now: float) -> Host | None:
    """An even draw among eligible hosts outside ``exclude`` (none has spare capacity)."""
    candidates = [host for host in hosts if host not in exclude and eligible(host, now)]
    return rng.choice(candidates) if candidates else None


class RoundRobin:
    """:func:`smooth_weighted_round_robin` as an allotment (ignores load)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def draw(self, hosts: Sequence[Host], exclude: Container[Host] = (), version: int | None = None) -> Host | None:
        return smooth_weighted_round_robin(hosts, exclude, self.clock.seconds())

    def invalidate(self) -> None:
        """Nothing to forget: the round's state lives on the hosts."""


class TokenAllotment:
    """Tokens per eligible host in proportion to spare capacity, shuffled by
    this unit's ``rng`` and dealt one per draw (see the module's docstring for
    when a deal is refilled)."""

    def __init__(self, rng: random.Random, clock: Clock, tokens: int = TOKENS, max_age: float = MAX_AGE) -> None:
        if tokens < 1:
            raise ValueError(f"tokens={tokens!r} must be at least 1")
        if not max_age > 0:
            raise ValueError(f"max_age={max_age!r} must be positive")
        self.rng = rng
        self.clock = clock
        self.tokens = tokens
        self.max_age = max_age
        #: Refills so far (for tests and metrics).
        self.refills = 0
        # Dealt from the end; a deal is a list of hosts, one entry per token.
        self._deck: list[Host] = []
        self._dealt_at = 0.0
        self._signature: object = None

    def invalidate(self) -> None:
        self._signature = None
        self._deck = []

    def shares(self, hosts: Sequence[Host], now: float) -> dict[Host, int]:
        """Tokens each eligible host gets in a refill now."""
        candidates = [host for host in hosts if eligible(host, now)]
        spares = [spare(host) for host in candidates]
        total = sum(spares)
        if total == 0:
            even = max(1, self.tokens // len(candidates)) if candidates else 0
            return dict.fromkeys(candidates, even)
        return {
            host: max(1, round(self.tokens * room / total))
            for host, room in zip(candidates, spares, strict=True)
            if room > 0
        }

    def _refill(self, hosts: Sequence[Host], now: float, signature: object) -> None:
        deck = [host for host, count in self.shares(hosts, now).items() for _ in range(count)]
        self.rng.shuffle(deck)
        self._deck = deck
        self._dealt_at = now
        self._signature = signature
        self.refills += 1

    def _signature_of(self, hosts: Sequence[Host], now: float, version: int | None) -> object:
        if version is not None:
            return (id(hosts), len(hosts), version)
        return tuple((id(host), eligible(host, now), host.load, host.capacity) for host in hosts)

    def draw(self, hosts: Sequence[Host], exclude: Container[Host] = (), version: int | None = None) -> Host | None:
        now = self.clock.seconds()
        signature = self._signature_of(hosts, now, version)
        fresh = not self._deck or signature != self._signature or now - self._dealt_at >= self.max_age
        if fresh:
            self._refill(hosts, now, signature)
        host = self._deal(exclude, now)
        if host is None and not fresh:
            # What was left belonged to excluded (or since failed) hosts:
            # deal afresh rather than refuse a client another host could take.
            self._refill(hosts, now, signature)
            host = self._deal(exclude, now)
        if host is None:
            host = _fallback(self.rng, hosts, exclude, now)
        return host

    def _deal(self, exclude: Container[Host], now: float) -> Host | None:
        """Pops the last token of a host that may take this client; tokens of
        excluded hosts stay for later draws."""
        deck = self._deck
        for index in range(len(deck) - 1, -1, -1):
            host = deck[index]
            if host in exclude:
                continue
            if not eligible(host, now):
                del deck[index]
                continue
            del deck[index]
            return host
        return None


class PercentageAllotment:
    """A percentage per eligible host from spare capacity, held for
    ``duration`` seconds, drawn by weighted random with this unit's ``rng``.

    Eligibility is checked on every draw and a change in the set of eligible
    hosts recomputes the percentages at once; changes of load alone wait for
    the timer, which is the point of this kind: shares move in steps.
    ``version`` is accepted for the common interface and not used.
    """

    def __init__(self, rng: random.Random, clock: Clock, duration: float = DURATION) -> None:
        if not duration > 0:
            raise ValueError(f"duration={duration!r} must be positive")
        self.rng = rng
        self.clock = clock
        self.duration = duration
        self._percent: dict[Host, float] = {}
        self._members: tuple[int, ...] = ()
        self._computed_at = 0.0
        #: Recomputations so far (for tests and metrics).
        self.computed = 0

    def invalidate(self) -> None:
        self._percent = {}
        self._members = ()

    def percentages(self) -> dict[Host, float]:
        """The shares in force, in percent (they add up to 100)."""
        return dict(self._percent)

    def _compute(self, candidates: Sequence[Host], now: float) -> None:
        spares = [spare(host) for host in candidates]
        total = sum(spares)
        if total == 0:
            self._percent = dict.fromkeys(candidates, 100.0 / len(candidates)) if candidates else {}
        else:
            self._percent = {
                host: 100.0 * room / total for host, room in zip(candidates, spares, strict=True)
            }
        self._members = tuple(id(host) for host in candidates)
        self._computed_at = now
        self.computed += 1

    def draw(self, hosts: Sequence[Host], exclude: Container[Host] = (), version: int | None = None) -> Host | None:
        now = self.clock.seconds()
        candidates = [host for host in hosts if eligible(host, now)]
        members = tuple(id(host) for host in candidates)
        if members != self._members or now - self._computed_at >= self.duration or not self._percent:
            self._compute(candidates, now)
        weighted = [host for host in candidates if host not in exclude]
        bounds: list[float] = []
        total = 0.0
        for host in weighted:
            total += self._percent.get(host, 0.0)
            bounds.append(total)
        if total <= 0:
            return _fallback(self.rng, weighted, (), now)
        # The float sum may fall a hair short of the last bound; clamp.
        index = bisect.bisect_right(bounds, self.rng.random() * total)
        return weighted[min(index, len(weighted) - 1)]


def make_allotment(kind: str, rng: random.Random, clock: Clock) -> Allotment:
    """The allotment named by a pool's ``balance``: one of :data:`KINDS`."""
    if kind == "tokens":
        return TokenAllotment(rng, clock)
    if kind == "percentage":
        return PercentageAllotment(rng, clock)
    if kind == "round_robin":
        return RoundRobin(clock)
    raise ValueError(f"unknown allotment {kind!r}; expected one of {', '.join(KINDS)}")
