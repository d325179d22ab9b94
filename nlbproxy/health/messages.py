# -*- test-case-name: tests.test_health_messages -*-
"""The messages between host agents and balancing units, as frozen values:
the seven of the seed's health "message protocol" and the three of its
session tracking (session up, session down, and the unit's acknowledgement).
Their wire format, authentication and replay defence live in
:mod:`nlbproxy.health.codec`.

Agents send HEARTBEAT, GOODBYE, ROW_CHANGE, SEND_SNAPSHOT, POSTULATE,
SESSION_UP and SESSION_DOWN; units send GET_SNAPSHOT, POSTULATE_WRONG and
SESSION_ACK.  Every message travels in an :class:`Envelope` naming its sender
(a host id or a unit id), the sender's boot epoch and a per-epoch sequence
number.  The session messages ride the same authenticated, replay-guarded
channel; their reliability (retry until acknowledged, failover to another
unit) is :mod:`nlbproxy.session.agentside`'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum

#: Wire format version; a datagram of another version is dropped and counted.
VERSION = 1
#: Largest datagram either side sends: fits an Ethernet MTU without fragments.
MAX_DATAGRAM = 1400


class Health(IntEnum):
    DOWN = 0
    UP = 1


class Directive(IntEnum):
    ACTIVE = 0
    DRAINING = 1
    INACTIVE = 2

    @property
    def word(self) -> str:
        return self.name.lower()


class Op(IntEnum):
    """Row change operations."""

    ADD = 0
    UPDATE = 1
    DELETE = 2


def node_id(name: str) -> int:
    """The 32-bit id of a host agent or unit, derived from its configured name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


@dataclass(frozen=True, slots=True)
class RowKey:
    """An application endpoint: the pool it serves and "ip:port" as units know it."""

    app: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a host's health-and-load table."""

    key: RowKey
    health: Health
    load: int  # 0..100, smoothed
    capacity: int  # 0..99, from config
    target: Directive  # what the agent wants units to do
    current: Directive  # what every unit confirmed
    reason: str = ""  # why health/directive are what they are (<= 64 bytes UTF-8)


@dataclass(frozen=True, slots=True)
class RowOp:
    op: Op
    key: RowKey
    row: Row | None  # None for DELETE


# --- the seven messages ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """I am alive; my table is at ``generation`` with ``checksum``."""

    generation: int  # u32, bumped on every table change
    checksum: int  # u32, CRC32 of the table's canonical encoding
    name: str = ""  # host name, sent every few heartbeats
    handoff: str = ""  # the agent's handoff endpoint, if any


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Clean shutdown: clear me now."""


@dataclass(frozen=True, slots=True)
class RowChange:
    """Rows changed; after applying ``ops`` the table is at ``generation``."""

    generation: int
    ops: tuple[RowOp, ...]


@dataclass(frozen=True, slots=True)
class GetSnapshot:
    """A unit asks for a host's whole table."""

    nonce: int  # u32, echoed in the snapshot parts


@dataclass(frozen=True, slots=True)
class SendSnapshot:
    """Part ``part`` of ``parts`` of a host's table at ``generation``."""

    nonce: int
    generation: int
    checksum: int
    part: int  # 0-based
    parts: int
    rows: tuple[Row, ...]


@dataclass(frozen=True, slots=True)
class Postulate:
    """The agent claims every unit now runs ``key`` under ``directive``."""

    key: RowKey
    directive: Directive


@dataclass(frozen=True, slots=True)
class PostulateWrong:
    """A unit disagrees: it has ``actual`` for ``key``, not ``postulated``."""

    key: RowKey
    postulated: Directive
    actual: Directive


# --- session tracking (the seed's session up / session down) -------------------------


class SessionKind(IntEnum):
    """What a session key identifies (the seed's session "type").  0 is not a kind."""

    HTTP_COOKIE = 1  # the value of the application's session cookie
    TLS_SESSION = 2  # a TLS session id (hex) or ticket digest
    CLIENT_IP = 3  # the client's IP address
    USER = 4  # an application-defined user or tenant name

    @property
    def word(self) -> str:
        """``"http-cookie"``, ``"tls-session"``, ``"client-ip"``, ``"user"``: the API's spelling."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_word(cls, word: str) -> SessionKind:
        """The kind spelled ``word``; ValueError for anything else."""
        for kind in cls:
            if kind.word == word:
                return kind
        raise ValueError(f"unknown session kind {word!r}")


@dataclass(frozen=True, slots=True)
class Session:
    """One session a host holds: ``key`` of application ``app``, served at ``endpoint``."""

    app: str
    key: str  # e.g. the session cookie's value; at most 255 bytes of UTF-8
    kind: SessionKind
    endpoint: str  # "ip:port" as the units know the host (the app's RowKey.endpoint)


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A session named for its end: the application and the key."""

    app: str
    key: str


@dataclass(frozen=True, slots=True)
class SessionUp:
    """Batch ``batch`` of sessions the host now holds.

    An empty batch is a keepalive: the unit acknowledges it like any other.
    """

    batch: int  # u32, per agent epoch; the unit acknowledges it and dedupes by it
    sessions: tuple[Session, ...]


@dataclass(frozen=True, slots=True)
class SessionDown:
    """Batch ``batch`` of sessions the host no longer holds."""

    batch: int
    sessions: tuple[SessionRef, ...]


@dataclass(frozen=True, slots=True)
class SessionAck:
    """A unit has applied (or had already applied) the agent's batch ``batch``."""

    batch: int


Message = (
    Heartbeat
    | Goodbye
    | RowChange
    | GetSnapshot
    | SendSnapshot
    | Postulate
    | PostulateWrong
    | SessionUp
    | SessionDown
    | SessionAck
)


class Kind(IntEnum):
    """Message type codes on the wire."""

    HEARTBEAT = 1
    GOODBYE = 2
    ROW_CHANGE = 3
    GET_SNAPSHOT = 4
    SEND_SNAPSHOT = 5
    POSTULATE = 6
    POSTULATE_WRONG = 7
    SESSION_UP = 8
    SESSION_DOWN = 9
    SESSION_ACK = 10


KIND_OF: dict[type, Kind] = {
    Heartbeat: Kind.HEARTBEAT,
    Goodbye: Kind.GOODBYE,
    RowChange: Kind.ROW_CHANGE,
    GetSnapshot: Kind.GET_SNAPSHOT,
    SendSnapshot: Kind.SEND_SNAPSHOT,
    Postulate: Kind.POSTULATE,
    PostulateWrong: Kind.POSTULATE_WRONG,
    SessionUp: Kind.SESSION_UP,
    SessionDown: Kind.SESSION_DOWN,
    SessionAck: Kind.SESSION_ACK,
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who sent a message, and where it stands in the sender's stream."""

    sender: int  # u32 node id (host agent or unit)
    epoch: int  # u64, the sender's boot epoch (changes on restart)
    seq: int  # u64, increases by one per datagram within an epoch
    sent_ms: int  # u64, the sender's wall clock at sending, for freshness
    message: Message = field(default_factory=Goodbye)
