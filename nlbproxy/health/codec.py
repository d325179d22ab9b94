# -*- test-case-name: tests.test_health_codec -*-
"""Wire format, authentication and replay defence of the health and session messages.

Sans-I/O: :class:`Codec` turns an :class:`~nlbproxy.health.messages.Envelope`
into one UDP datagram and back, :class:`ReplayGuard` refuses datagrams seen
before, and :func:`snapshot_parts` / :func:`row_change_batches` split what is
too big for one datagram (session batches are filled entry by entry with
:func:`session_entry_size` against :data:`SESSION_BATCH_ROOM`).  Everything is
in network byte order.

Datagram (every field fixed-size except the body)::

    offset  size  field
    0       4     magic    b"NLBH"
    4       1     version  u8, VERSION; any other version is dropped
    5       1     kind     u8, messages.Kind
    6       4     sender   u32, node id of the host agent or unit
    10      8     epoch    u64, the sender's boot epoch; must grow across restarts
    18      8     seq      u64, +1 per datagram within an epoch
    26      8     sent_ms  u64, sender's wall clock in milliseconds
    34      n     body     per kind, below
    34+n    16    mac      HMAC-SHA256(secret, bytes 0 .. 34+n), first 16 bytes

Bodies::

    HEARTBEAT        generation u32, checksum u32, name str, handoff str
    GOODBYE          (empty)
    ROW_CHANGE       generation u32, count u16, count x rowop
    GET_SNAPSHOT     nonce u32
    SEND_SNAPSHOT    nonce u32, generation u32, checksum u32,
                     part u16, parts u16, count u16, count x row
    POSTULATE        key, directive u8
    POSTULATE_WRONG  key, postulated u8, actual u8
    SESSION_UP       batch u32, count u16, count x session
    SESSION_DOWN     batch u32, count u16, count x (app str, key str)
    SESSION_ACK      batch u32

    str    = length u8, UTF-8 bytes (at most 255)
    key    = app str, endpoint str
    state  = health u8, load u8 (0..100), capacity u8 (0..99),
             target u8, current u8, reason str (at most 64 bytes)
    row    = key, state
    rowop  = op u8, key, state only for ADD and UPDATE (its key is the op's)
    session = app str, key str, kind u8 (messages.SessionKind, not 0),
              endpoint str

Blame is split the usual way: encoding a value out of range is our bug and
raises :class:`ValueError`; a datagram that is short, foreign, forged, stale,
or malformed is the peer's doing, so :meth:`Codec.decode` returns ``None`` and
counts the reason in :attr:`Codec.drops`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from nlbproxy.health.messages import (
    KIND_OF,
    MAX_DATAGRAM,
    VERSION,
    Directive,
    Envelope,
    Goodbye,
    GetSnapshot,
    Health,
    Heartbeat,
    Kind,
    Message,
    Op,
    Postulate,
    PostulateWrong,
    Row,
    RowChange,
    RowKey,
    RowOp,
    SendSnapshot,
    Session,
    SessionAck,
    SessionDown,
    SessionKind,
    SessionRef,
    SessionUp,
)

__all__ = [
    "DROP_REASONS",
    "HEADER_SIZE",
    "MAC_SIZE",
    "MAGIC",
    "MAX_AGE",
    "MAX_REASON",
    "MAX_SENDERS",
    "OVERHEAD",
    "REPLAY_WINDOW",
    "SENDER_AGENT_KINDS",
    "SENDER_UNIT_KINDS",
    "SESSION_BATCH_ROOM",
    "Codec",
    "ReplayGuard",
    "row_change_batches",
    "session_entry_size",
    "snapshot_parts",
    "table_checksum",
]

MAGIC = b"NLBH"
_HEADER = struct.Struct("!4sBBIQQQ")
HEADER_SIZE = _HEADER.size
MAC_SIZE = 16
#: Bytes of every datagram that are not body.
OVERHEAD = HEADER_SIZE + MAC_SIZE

#: How far a datagram's ``sent_ms`` may be from our clock, either way, in
#: seconds.  It bounds how long a captured datagram can be replayed to a unit
#: that has forgotten its sender (restart, or eviction from the ReplayGuard),
#: and it refuses peers whose clocks are skewed further than this: run NTP.
MAX_AGE = 30.0
#: Senders a :class:`ReplayGuard` remembers; the least recently seen is
#: forgotten first.  Bounds its memory against floods of forged sender ids
#: (which cannot get past the MAC, so in practice this is the fleet size).
MAX_SENDERS = 4096
#: Sequence numbers below the highest seen that may still arrive out of order.
REPLAY_WINDOW = 64
#: Longest ``Row.reason`` on the wire, in UTF-8 bytes; longer ones are cut.
MAX_REASON = 64
_MAX_STR = 255

#: Every reason :meth:`Codec.decode` may count, in the order they are checked.
DROP_REASONS = ("short", "magic", "version", "kind", "direction", "mac", "stale", "malformed")

#: What a host agent may send; a unit decodes with ``accept=SENDER_AGENT_KINDS``.
SENDER_AGENT_KINDS: frozenset[Kind] = frozenset(
    {
        Kind.HEARTBEAT,
        Kind.GOODBYE,
        Kind.ROW_CHANGE,
        Kind.SEND_SNAPSHOT,
        Kind.POSTULATE,
        Kind.SESSION_UP,
        Kind.SESSION_DOWN,
    }
)
#: What a balancing unit may send; an agent decodes with ``accept=SENDER_UNIT_KINDS``.
SENDER_UNIT_KINDS: frozenset[Kind] = frozenset({Kind.GET_SNAPSHOT, Kind.POSTULATE_WRONG, Kind.SESSION_ACK})

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_STATE_NUMBERS = struct.Struct("!BBBBB")  # health, load, capacity, target, current
_HEARTBEAT = struct.Struct("!II")  # generation, checksum
_ROW_CHANGE = struct.Struct("!IH")  # generation, count
_SEND_SNAPSHOT = struct.Struct("!IIIHHH")  # nonce, generation, checksum, part, parts, count
_DIRECTIVES = struct.Struct("!BB")  # postulated, actual
_SESSION_BATCH = struct.Struct("!IH")  # batch, count
#: Body bytes a session batch has for its entries once the envelope, the MAC
#: and the batch header are counted: what :func:`session_entry_size` of the
#: entries of one SESSION_UP or SESSION_DOWN may add up to.
SESSION_BATCH_ROOM = MAX_DATAGRAM - OVERHEAD - _SESSION_BATCH.size


class SecondsClock(Protocol):
    """Anything with ``seconds()``: a reactor, or a ``task.Clock`` in tests."""

    def seconds(self) -> float: ...


class _Malformed(ValueError):
    """The body does not parse; the datagram is dropped as "malformed"."""


# --- encoding: out-of-range values are our bug ------------------------------


def _uint(value: int, bits: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{name}={value!r} is not a u{bits}")
    return value


def _str(value: str, name: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > _MAX_STR:
        raise ValueError(f"{name} is {len(raw)} bytes of UTF-8, more than {_MAX_STR}")
    return _U8.pack(len(raw)) + raw


def _reason(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_REASON:
        # Cut before the character that straddles the limit: step back over
        # UTF-8 continuation bytes (10xxxxxx) to the start of that character.
        cut = MAX_REASON
        while cut > 0 and raw[cut] & 0xC0 == 0x80:
            cut -= 1
        raw = raw[:cut]
    return _U8.pack(len(raw)) + raw


def _key(key: RowKey) -> bytes:
    return _str(key.app, "app") + _str(key.endpoint, "endpoint")


def _state(row: Row) -> bytes:
    if _uint(row.load, 8, "load") > 100:
        raise ValueError(f"load={row.load!r} is outside 0..100")
    if _uint(row.capacity, 8, "capacity") > 99:
        raise ValueError(f"capacity={row.capacity!r} is outside 0..99")
    numbers = _STATE_NUMBERS.pack(
        Health(row.health), row.load, row.capacity, Directive(row.target), Directive(row.current)
    )
    return numbers + _reason(row.reason)


def _row(row: Row) -> bytes:
    return _key(row.key) + _state(row)


def _row_op(op: RowOp) -> bytes:
    head = _U8.pack(Op(op.op)) + _key(op.key)
    if op.op == Op.DELETE:
        if op.row is not None:
            raise ValueError("a DELETE carries no row")
        return head
    if op.row is None or op.row.key != op.key:
        raise ValueError(f"{Op(op.op).name} needs a row with the op's key")
    return head + _state(op.row)


def _session(session: Session) -> bytes:
    return (
        _str(session.app, "app")
        + _str(session.key, "session key")
        + _U8.pack(SessionKind(session.kind))
        + _str(session.endpoint, "endpoint")
    )


def _session_ref(ref: SessionRef) -> bytes:
    return _str(ref.app, "app") + _str(ref.key, "session key")


def session_entry_size(entry: Session | SessionRef) -> int:
    """Bytes ``entry`` takes in a SESSION_UP (a Session) or SESSION_DOWN (a
    SessionRef) body; ValueError if it cannot be encoded at all."""
    return len(_session(entry) if isinstance(entry, Session) else _session_ref(entry))


def _count(items: Sequence[object], name: str) -> int:
    return _uint(len(items), 16, f"number of {name}")


def _encode_heartbeat(m: Heartbeat) -> bytes:
    numbers = _HEARTBEAT.pack(_uint(m.generation, 32, "generation"), _uint(m.checksum, 32, "checksum"))
    return numbers + _str(m.name, "name") + _str(m.handoff, "handoff")


def _encode_goodbye(m: Goodbye) -> bytes:
    return b""


def _encode_row_change(m: RowChange) -> bytes:
    head = _ROW_CHANGE.pack(_uint(m.generation, 32, "generation"), _count(m.ops, "ops"))
    return head + b"".join(_row_op(op) for op in m.ops)


def _encode_get_snapshot(m: GetSnapshot) -> bytes:
    return _U32.pack(_uint(m.nonce, 32, "nonce"))


def _encode_send_snapshot(m: SendSnapshot) -> bytes:
    if not 0 <= _uint(m.part, 16, "part") < _uint(m.parts, 16, "parts"):
        raise ValueError(f"part {m.part!r} of {m.parts!r} is not a part")
    head = _SEND_SNAPSHOT.pack(
        _uint(m.nonce, 32, "nonce"),
        _uint(m.generation, 32, "generation"),
        _uint(m.checksum, 32, "checksum"),
        m.part,
        m.parts,
        _count(m.rows, "rows"),
    )
    return head + b"".join(_row(row) for row in m.rows)


def _encode_postulate(m: Postulate) -> bytes:
    return _key(m.key) + _U8.pack(Directive(m.directive))


def _encode_postulate_wrong(m: PostulateWrong) -> bytes:
    return _key(m.key) + _DIRECTIVES.pack(Directive(m.postulated), Directive(m.actual))


def _encode_session_up(m: SessionUp) -> bytes:
    head = _SESSION_BATCH.pack(_uint(m.batch, 32, "batch"), _count(m.sessions, "sessions"))
    return head + b"".join(_session(s) for s in m.sessions)


def _encode_session_down(m: SessionDown) -> bytes:
    head = _SESSION_BATCH.pack(_uint(m.batch, 32, "batch"), _count(m.sessions, "sessions"))
    return head + b"".join(_session_ref(s) for s in m.sessions)


def _encode_session_ack(m: SessionAck) -> bytes:
    return _U32.pack(_uint(m.batch, 32, "batch"))


def _body(message: Message) -> tuple[Kind, bytes]:
    kind = KIND_OF.get(type(message))
    if kind is None:
        raise TypeError(f"{message!r} is not a health message")
    return kind, _BODIES[kind][0](message)


# --- decoding: any failure is the peer's, and becomes _Malformed -------------


class _Reader:
    """Reads one body front to back; every read checks the bounds."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, n: int) -> bytes:
        end = self._at + n
        if end > len(self._data):
            raise _Malformed("body ends early")
        chunk = self._data[self._at : end]
        self._at = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size))

    def u8(self) -> int:
        return self.take(1)[0]

    def text(self, limit: int = _MAX_STR) -> str:
        n = self.u8()
        if n > limit:
            raise _Malformed(f"string of {n} bytes, more than {limit}")
        return self.take(n).decode("utf-8")

    def key(self) -> RowKey:
        return RowKey(self.text(), self.text())

    def state(self, key: RowKey) -> Row:
        health, load, capacity, target, current = self.unpack(_STATE_NUMBERS)
        if load > 100 or capacity > 99:
            raise _Malformed("load or capacity out of range")
        # Enum constructors raise ValueError for unknown codes.
        return Row(key, Health(health), load, capacity, Directive(target), Directive(current), self.text(MAX_REASON))

    def row(self) -> Row:
        return self.state(self.key())

    def row_op(self) -> RowOp:
        op = Op(self.u8())
        key = self.key()
        return RowOp(op, key, None if op == Op.DELETE else self.state(key))

    def session(self) -> Session:
        app, key = self.text(), self.text()
        # Unknown kinds, 0 included, raise ValueError: malformed.
        return Session(app, key, SessionKind(self.u8()), self.text())

    def session_ref(self) -> SessionRef:
        return SessionRef(self.text(), self.text())

    def end(self) -> None:
        if self._at != len(self._data):
            raise _Malformed("trailing bytes")


def _decode_heartbeat(r: _Reader) -> Heartbeat:
    generation, checksum = r.unpack(_HEARTBEAT)
    return Heartbeat(generation, checksum, r.text(), r.text())


def _decode_goodbye(r: _Reader) -> Goodbye:
    return Goodbye()


def _decode_row_change(r: _Reader) -> RowChange:
    generation, count = r.unpack(_ROW_CHANGE)
    return RowChange(generation, tuple(r.row_op() for _ in range(count)))


def _decode_get_snapshot(r: _Reader) -> GetSnapshot:
    (nonce,) = r.unpack(_U32)
    return GetSnapshot(nonce)


def _decode_send_snapshot(r: _Reader) -> SendSnapshot:
    nonce, generation, checksum, part, parts, count = r.unpack(_SEND_SNAPSHOT)
    if not part < parts:
        raise _Malformed(f"part {part} of {parts}")
    return SendSnapshot(nonce, generation, checksum, part, parts, tuple(r.row() for _ in range(count)))


def _decode_postulate(r: _Reader) -> Postulate:
    return Postulate(r.key(), Directive(r.u8()))


def _decode_postulate_wrong(r: _Reader) -> PostulateWrong:
    key = r.key()
    postulated, actual = r.unpack(_DIRECTIVES)
    return PostulateWrong(key, Directive(postulated), Directive(actual))


def _decode_session_up(r: _Reader) -> SessionUp:
    batch, count = r.unpack(_SESSION_BATCH)
    return SessionUp(batch, tuple(r.session() for _ in range(count)))


def _decode_session_down(r: _Reader) -> SessionDown:
    batch, count = r.unpack(_SESSION_BATCH)
    return SessionDown(batch, tuple(r.session_ref() for _ in range(count)))


def _decode_session_ack(r: _Reader) -> SessionAck:
    (batch,) = r.unpack(_U32)
    return SessionAck(batch)


#: The body layouts, one (encoder, decoder) pair per kind.
_BODIES: dict[Kind, tuple[Callable[..., bytes], Callable[[_Reader], Message]]] = {
    Kind.HEARTBEAT: (_encode_heartbeat, _decode_heartbeat),
    Kind.GOODBYE: (_encode_goodbye, _decode_goodbye),
    Kind.ROW_CHANGE: (_encode_row_change, _decode_row_change),
    Kind.GET_SNAPSHOT: (_encode_get_snapshot, _decode_get_snapshot),
    Kind.SEND_SNAPSHOT: (_encode_send_snapshot, _decode_send_snapshot),
    Kind.POSTULATE: (_encode_postulate, _decode_postulate),
    Kind.POSTULATE_WRONG: (_encode_postulate_wrong, _decode_postulate_wrong),
    Kind.SESSION_UP: (_encode_session_up, _decode_session_up),
    Kind.SESSION_DOWN: (_encode_session_down, _decode_session_down),
    Kind.SESSION_ACK: (_encode_session_ack, _decode_session_ack),
}
_KIND_CODES = frozenset(int(k) for k in Kind)


# --- the codec ----------------------------------------------------------------


class Codec:
    """Encodes envelopes to authenticated datagrams and decodes them back.

    Both sides of a link hold the same ``secret`` (the ``secret_file`` of the
    config).  ``drops`` counts every refused datagram by reason (see
    :data:`DROP_REASONS`), for the metrics page.  Decoding does not defend
    against replays by itself: pass what it returns to a :class:`ReplayGuard`.
    """

    def __init__(self, secret: bytes, clock: SecondsClock, max_age: float = MAX_AGE) -> None:
        if not secret:
            raise ValueError("an empty secret authenticates nothing")
        if not max_age > 0:
            raise ValueError(f"max_age={max_age!r} must be positive")
        self._secret = bytes(secret)
        self._clock = clock
        self._max_age_ms = round(max_age * 1000)
        self.drops: Counter[str] = Counter()

    def _mac(self, signed: bytes) -> bytes:
        return hmac.new(self._secret, signed, hashlib.sha256).digest()[:MAC_SIZE]

    def _unsigned(self, envelope: Envelope) -> bytes:
        kind, body = _body(envelope.message)
        header = _HEADER.pack(
            MAGIC,
            VERSION,
            kind,
            _uint(envelope.sender, 32, "sender"),
            _uint(envelope.epoch, 64, "epoch"),
            _uint(envelope.seq, 64, "seq"),
            _uint(envelope.sent_ms, 64, "sent_ms"),
        )
        return header + body

    def encoded_size(self, envelope: Envelope) -> int:
        """Length of ``envelope``'s datagram, even past :data:`MAX_DATAGRAM`."""
        return len(self._unsigned(envelope)) + MAC_SIZE

    def encode(self, envelope: Envelope) -> bytes:
        """The datagram for ``envelope``; ValueError if a field is out of
        range or the datagram would exceed :data:`MAX_DATAGRAM`."""
        signed = self._unsigned(envelope)
        if len(signed) + MAC_SIZE > MAX_DATAGRAM:
            raise ValueError(f"datagram of {len(signed) + MAC_SIZE} bytes exceeds {MAX_DATAGRAM}")
        return signed + self._mac(signed)

    def decode(self, datagram: bytes, accept: Collection[Kind] | None = None) -> Envelope | None:
        """The envelope in ``datagram``, or None (counted in ``drops``).

        ``accept`` limits the kinds taken (:data:`SENDER_AGENT_KINDS` on a
        unit, :data:`SENDER_UNIT_KINDS` on an agent); others drop as
        "direction".  The cheap header checks come first, then the MAC, so
        nothing unauthenticated reaches the body parser.
        """
        result = self._parse(datagram, accept)
        if isinstance(result, str):
            self.drops[result] += 1
            return None
        return result

    def _parse(self, datagram: bytes, accept: Collection[Kind] | None) -> Envelope | str:
        """The envelope, or the reason to drop the datagram."""
        if len(datagram) < OVERHEAD:
            return "short"
        magic, version, kind, sender, epoch, seq, sent_ms = _HEADER.unpack_from(datagram)
        if magic != MAGIC:
            return "magic"
        if version != VERSION:
            return "version"
        if kind not in _KIND_CODES:
            return "kind"
        if accept is not None and Kind(kind) not in accept:
            return "direction"
        if not hmac.compare_digest(self._mac(datagram[:-MAC_SIZE]), datagram[-MAC_SIZE:]):
            return "mac"
        # Both directions: a clock far ahead would otherwise let a captured
        # datagram stay fresh for as long as the skew.
        if abs(round(self._clock.seconds() * 1000) - sent_ms) > self._max_age_ms:
            return "stale"
        try:
            reader = _Reader(datagram[HEADER_SIZE:-MAC_SIZE])
            message = _BODIES[Kind(kind)][1](reader)
            reader.end()
        except (ValueError, struct.error):
            return "malformed"
        return Envelope(sender, epoch, seq, sent_ms, message)


# --- replay defence ------------------------------------------------------------


class _Window:
    __slots__ = ("bitmap", "epoch", "highest")

    def __init__(self, epoch: int, seq: int) -> None:
        self.epoch = epoch
        self.highest = seq
        # Bit i set: seq ``highest - i`` was accepted.
        self.bitmap = 1


_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1


class ReplayGuard:
    """Accepts each (sender, epoch, seq) once, tolerating reordering.

    Per sender it keeps the epoch, the highest seq seen and a
    :data:`REPLAY_WINDOW`-bit bitmap of the seqs just below it (the IPsec
    anti-replay window, RFC 4303 section 3.4.3).  A newer epoch means the
    sender restarted and replaces its state; an older epoch is refused.  Feed
    it only envelopes the :class:`Codec` authenticated.  ``drops`` counts
    refusals as "replay" (seen, or below the window) and "old_epoch".
    """

    def __init__(self, max_senders: int = MAX_SENDERS) -> None:
        if max_senders < 1:
            raise ValueError(f"max_senders={max_senders!r} must be at least 1")
        self._max_senders = max_senders
        # Least recently accepted first, so eviction pops from the front.
        self._windows: OrderedDict[int, _Window] = OrderedDict()
        self.drops: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._windows)

    def __contains__(self, sender: object) -> bool:
        return sender in self._windows

    def forget(self, sender: int) -> None:
        """Drop ``sender``'s state (after a goodbye or aging out)."""
        self._windows.pop(sender, None)

    def accept(self, envelope: Envelope) -> bool:
        window = self._windows.get(envelope.sender)
        if window is None or envelope.epoch > window.epoch:
            self._remember(envelope)
            return True
        if envelope.epoch < window.epoch:
            self.drops["old_epoch"] += 1
            return False
        seq = envelope.seq
        if seq > window.highest:
            shift = seq - window.highest
            window.bitmap = ((window.bitmap << shift) | 1) & _WINDOW_MASK if shift < REPLAY_WINDOW else 1
            window.highest = seq
        else:
            behind = window.highest - seq
            if behind >= REPLAY_WINDOW or window.bitmap >> behind & 1:
                self.drops["replay"] += 1
                return False
            window.bitmap |= 1 << behind
        self._windows.move_to_end(envelope.sender)
        return True

    def _remember(self, envelope: Envelope) -> None:
        self._windows.pop(envelope.sender, None)
        while len(self._windows) >= self._max_senders:
            self._windows.popitem(last=False)
        self._windows[envelope.sender] = _Window(envelope.epoch, envelope.seq)


# --- table checksum and splitting -------------------------------------------------


def table_checksum(rows: Iterable[Row]) -> int:
    """CRC32 of the rows' wire encoding, sorted by (app, endpoint).

    The agent puts it in heartbeats; a unit compares it with the same sum over
    its cached copy and asks for a snapshot when they differ.  Reasons count
    as cut to :data:`MAX_REASON` bytes, as they travel.
    """
    crc = 0
    for row in sorted(rows, key=lambda r: (r.key.app, r.key.endpoint)):
        crc = zlib.crc32(_row(row), crc)
    return crc


def _pack(items: Sequence[object], sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy split of item indexes into groups whose sizes fit ``budget``."""
    groups: list[list[int]] = [[]]
    used = 0
    for index, size in enumerate(sizes):
        if size > budget:
            raise ValueError(f"{items[index]!r} alone needs {size} bytes, more than {budget}")
        if used + size > budget or len(groups[-1]) == 0xFFFF:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


def snapshot_parts(
    nonce: int, generation: int, checksum: int, rows: Iterable[Row], limit: int = MAX_DATAGRAM
) -> list[SendSnapshot]:
    """The SendSnapshot messages that carry ``rows`` in order, each within
    ``limit`` bytes once enveloped.  An empty table still gives one part.
    Each part needs its own envelope (its own seq)."""
    table = tuple(rows)
    empty = _encode_send_snapshot(SendSnapshot(nonce, generation, checksum, 0, 1, ()))
    groups = _pack(table, [len(_row(row)) for row in table], limit - OVERHEAD - len(empty))
    _uint(len(groups), 16, "number of parts")
    return [
        SendSnapshot(nonce, generation, checksum, part, len(groups), tuple(table[i] for i in group))
        for part, group in enumerate(groups)
    ]


def row_change_batches(ops: Sequence[RowOp], first_generation: int, limit: int = MAX_DATAGRAM) -> list[RowChange]:
    """RowChange messages carrying ``ops`` in order, each within ``limit``
    bytes once enveloped.

    Each datagram is one generation step: the batches are at
    ``first_generation``, ``first_generation + 1``, ... (wrapping at 2**32),
    so after sending them the table's generation is that of the last batch.
    No ops give no batches.
    """
    _uint(first_generation, 32, "first_generation")
    if not ops:
        return []
    empty = _encode_row_change(RowChange(first_generation, ()))
    groups = _pack(ops, [len(_row_op(op)) for op in ops], limit - OVERHEAD - len(empty))
    return [
        RowChange((first_generation + step) & 0xFFFFFFFF, tuple(ops[i] for i in group))
        for step, group in enumerate(groups)
    ]
