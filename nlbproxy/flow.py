# -*- test-case-name: tests.test_flow -*-
"""Flow control and deadlines shared by every relay in the unit.

:class:`Pauser` is the one place that owns "paused" for a transport: reading
stops while any reason holds and resumes when the last one is gone, so that
back-pressure from the other side, a pipelined request waiting its turn and a
backend still connecting never step on each other.

:class:`Deadline` is a cheap restartable timeout: moving it later only stores
a number, and the reactor is touched when it must fire sooner than planned.
The relay pushes it forward on every chunk it moves, so a per-chunk
``DelayedCall.reset`` would cost more than the chunk itself.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer, IReactorTime


@implementer(IPushProducer)
class Pauser:
    """Pauses a transport for a set of named reasons."""

    __slots__ = ("transport", "reasons", "on_backpressure")

    def __init__(self, transport: Any) -> None:
        #: The transport to pause; may be set later (once connected).
        self.transport = transport
        self.reasons: set[str] = set()
        #: Told True when the consumer we feed is full, False when it drained;
        #: lets the other side time out a peer that stopped reading.
        self.on_backpressure: Callable[[bool], None] | None = None

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    # IPushProducer, for registering with the other side's transport as the
    # "consumer is full" reason.
    def pauseProducing(self) -> None:
        self.pause("backpressure")
        if self.on_backpressure is not None:
            self.on_backpressure(True)

    def resumeProducing(self) -> None:
        self.resume("backpressure")
        if self.on_backpressure is not None:
            self.on_backpressure(False)

    def stopProducing(self) -> None:
        pass


def _stopped() -> None:
    pass


class Deadline:
    """Calls ``callback`` once ``delay`` seconds after the last :meth:`set`.

    At most one ``DelayedCall`` is pending per deadline.  Moving the deadline
    later, or disarming it, only stores a number: the pending call fires at
    its old time, sees what changed, and re-arms for the rest or drops
    itself.  Moving it sooner cancels and schedules anew, because Twisted's
    ``DelayedCall.reset`` to an earlier time searches the reactor's whole
    heap of calls, which is one per connection.
    """

    __slots__ = ("_call", "_callback", "_clock", "_when")

    def __init__(self, clock: IReactorTime, callback: Callable[[], object]) -> None:
        self._clock = clock
        self._callback = callback
        self._when: float | None = None
        self._call: Any = None

    def set(self, delay: float) -> None:
        when = self._clock.seconds() + delay
        self._when = when
        call = self._call
        if call is None:
            self._call = self._clock.callLater(delay, self._fire)
        elif call.getTime() > when:
            call.cancel()
            self._call = self._clock.callLater(delay, self._fire)

    def cancel(self) -> None:
        """Disarm; a pending call stays until its time and then does nothing."""
        self._when = None

    def stop(self) -> None:
        """Disarm for good and drop the pending call and the callback (the
        owner is going away: its bound method here would make the owner a
        reference cycle, freed only by the garbage collector)."""
        self._when = None
        self._callback = _stopped
        if self._call is not None:
            self._call.cancel()
            self._call = None

    @property
    def armed(self) -> bool:
        return self._when is not None

    def _fire(self) -> None:
        self._call = None
        when = self._when
        if when is None:
            return
        remaining = when - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._fire)
            return
        self._when = None
        self._callback()
