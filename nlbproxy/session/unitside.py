# -*- test-case-name: tests.test_session_agent -*-
"""A balancing unit's side of session up / session down, sans-I/O.

:class:`SessionReceiver` takes the SESSION_UP and SESSION_DOWN envelopes an
agent sent (already authenticated and replay-checked by the unit's health
socket), hands every session to the unit's callbacks -- the unit routes them
into its DAM -- and acknowledges every batch, duplicates included: the agent
retries a batch until it sees the ack, so an ack that was lost must be sent
again, but the batch must not be applied twice (a retried up crossing the
down that followed it would bring the session back).

Duplicates are recognised by (agent id, agent epoch, batch id) with a sliding
window per agent, as :class:`~nlbproxy.health.codec.ReplayGuard` does for
datagrams: the highest batch id seen and a :data:`DEDUPE_WINDOW`-bit bitmap
of the ids below it.  Batch ids are u32 and wrap, so "higher" is serial
number arithmetic (RFC 1982).  The agent keeps its unacknowledged ids within
:data:`nlbproxy.session.agentside.MAX_BATCH_SPAN` of each other, well inside
the window; an id below the window is taken for a duplicate.  A new agent
epoch (the agent restarted) starts a new window.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable

from nlbproxy.health.messages import Envelope, Message, SessionAck, SessionDown, SessionKind, SessionUp

__all__ = [
    "DEDUPE_WINDOW",
    "MAX_AGENTS",
    "OnDown",
    "OnUp",
    "SendAck",
    "SessionReceiver",
]

#: Batch ids remembered per agent, below the highest seen.
DEDUPE_WINDOW = 1024
#: Agents whose windows are remembered; the least recently heard from is
#: forgotten first (as the replay guard's MAX_SENDERS: the fleet size).
MAX_AGENTS = 4096

_U32 = 1 << 32
_HALF = 1 << 31
_MASK = (1 << DEDUPE_WINDOW) - 1

Address = tuple[str, int]
#: ``send_ack(address, SessionAck(batch))``: the unit's health socket's send.
SendAck = Callable[[Address, Message], None]
#: ``on_up(app, key, kind, endpoint, agent_id)``: the host of agent
#: ``agent_id`` holds session ``key`` of ``app`` at ``endpoint``.
OnUp = Callable[[str, str, SessionKind, str, int], None]
#: ``on_down(app, key, agent_id)``: that host no longer holds it.
OnDown = Callable[[str, str, int], None]


class _Window:
    __slots__ = ("bitmap", "epoch", "highest")

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch = epoch
        self.highest = batch
        # Bit i set: batch ``highest - i`` was applied.
        self.bitmap = 1


class SessionReceiver:
    """Applies each agent's session batches once and acknowledges each.

    ``stats`` counts "batches" (applied), "duplicates", "ups", "downs",
    "old_epoch" (batches of an agent's earlier incarnation: acknowledged,
    not applied) and "forgotten" (windows evicted past :data:`MAX_AGENTS`).
    """

    def __init__(self, send_ack: SendAck, on_up: OnUp, on_down: OnDown, max_agents: int = MAX_AGENTS) -> None:
        if max_agents < 1:
            raise ValueError(f"max_agents={max_agents!r} must be at least 1")
        self._send_ack = send_ack
        self.on_up = on_up
        self.on_down = on_down
        self._max_agents = max_agents
        self._windows: OrderedDict[int, _Window] = OrderedDict()
        self.stats: Counter[str] = Counter()

    @staticmethod
    def handles(message: Message) -> bool:
        """Whether ``message`` is one for :meth:`receive` (SESSION_UP or SESSION_DOWN)."""
        return isinstance(message, (SessionUp, SessionDown))

    def forget(self, agent_id: int) -> None:
        """Drop ``agent_id``'s window (its host was cleared for good)."""
        self._windows.pop(agent_id, None)

    def receive(self, address: Address, envelope: Envelope) -> None:
        """One SESSION_UP or SESSION_DOWN from the agent at ``address``."""
        message = envelope.message
        if not isinstance(message, (SessionUp, SessionDown)):
            # The unit's dispatcher sends only what :meth:`handles` accepts.
            raise TypeError(f"{type(message).__name__} is not a session message")
        agent = envelope.sender
        if self._fresh(agent, envelope.epoch, message.batch):
            self.stats["batches"] += 1
            if isinstance(message, SessionUp):
                self.stats["ups"] += len(message.sessions)
                for session in message.sessions:
                    self.on_up(session.app, session.key, session.kind, session.endpoint, agent)
            else:
                self.stats["downs"] += len(message.sessions)
                for ref in message.sessions:
                    self.on_down(ref.app, ref.key, agent)
        # Acknowledged after applying: a callback that raises is our bug, and
        # the agent's retry will show it again rather than hide a lost batch.
        self._send_ack(address, SessionAck(message.batch))

    def _fresh(self, agent: int, epoch: int, batch: int) -> bool:
        """Whether (agent, epoch, batch) is seen for the first time; records it."""
        window = self._windows.get(agent)
        if window is None or epoch > window.epoch:
            self._windows.pop(agent, None)
            while len(self._windows) >= self._max_agents:
                self._windows.popitem(last=False)
                self.stats["forgotten"] += 1
            self._windows[agent] = _Window(epoch, batch)
            return True
        self._windows.move_to_end(agent)
        if epoch < window.epoch:
            self.stats["old_epoch"] += 1
            return False
        ahead = (batch - window.highest) % _U32
        if 0 < ahead < _HALF:
            window.bitmap = ((window.bitmap << ahead) | 1) & _MASK if ahead < DEDUPE_WINDOW else 1
            window.highest = batch
            return True
        behind = (window.highest - batch) % _U32
        if behind >= DEDUPE_WINDOW or window.bitmap >> behind & 1:
            self.stats["duplicates"] += 1
            return False
        window.bitmap |= 1 << behind
        return True
