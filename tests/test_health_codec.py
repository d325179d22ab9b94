"""The health messages' wire format, authentication, replay defence, checksum
and splitting (nlbproxy.health.codec)."""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.health.codec import (
    HEADER_SIZE,
    MAC_SIZE,
    MAX_AGE,
    MAX_SENDERS,
    OVERHEAD,
    SENDER_AGENT_KINDS,
    SENDER_UNIT_KINDS,
    SESSION_BATCH_ROOM,
    Codec,
    ReplayGuard,
    row_change_batches,
    session_entry_size,
    snapshot_parts,
    table_checksum,
)
from nlbproxy.health.messages import (
    KIND_OF,
    MAX_DATAGRAM,
    VERSION,
    Directive,
    Envelope,
    GetSnapshot,
    Goodbye,
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

SECRET = b"shared secret of the test fleet"
NOW = 1_700_000_000  # seconds on the test clock
NOW_MS = NOW * 1000
U32 = 2**32 - 1
U64 = 2**64 - 1
# 255 bytes of UTF-8 with two-byte characters in it.
LONGEST = "é" * 127 + "x"
KEY = RowKey("web", "10.0.0.1:80")


def clock(now: float = NOW) -> Clock:
    c = Clock()
    c.advance(now)
    return c


def row(
    app: str = "web",
    endpoint: str = "10.0.0.1:80",
    health: Health = Health.UP,
    load: int = 40,
    capacity: int = 10,
    target: Directive = Directive.ACTIVE,
    current: Directive = Directive.ACTIVE,
    reason: str = "",
) -> Row:
    return Row(RowKey(app, endpoint), health, load, capacity, target, current, reason)


def envelope(message: Message, sender: int = 7, epoch: int = 1, seq: int = 1, sent_ms: int = NOW_MS) -> Envelope:
    return Envelope(sender, epoch, seq, sent_ms, message)


def forge(
    kind: int,
    body: bytes,
    secret: bytes = SECRET,
    sent_ms: int = NOW_MS,
    magic: bytes = b"NLBH",
    version: int = VERSION,
) -> bytes:
    """A datagram built from the documented layout, independently of the codec."""
    header = struct.pack("!4sBBIQQQ", magic, version, kind, 7, 1, 1, sent_ms)
    return header + body + hmac.new(secret, header + body, hashlib.sha256).digest()[:16]


def text(value: str) -> bytes:
    raw = value.encode()
    return bytes([len(raw)]) + raw


# --- Hypothesis strategies ------------------------------------------------------

# At most 63 characters of at most 4 bytes: always within the 255-byte limit.
names = st.text(st.characters(codec="utf-8"), max_size=63)
# Short enough that several rows fit one datagram.
short_names = st.text(st.characters(codec="utf-8"), max_size=20)
reasons = st.text(st.characters(codec="utf-8"), max_size=16)
u16s = st.integers(0, 2**16 - 1)
u32s = st.integers(0, U32)
u64s = st.integers(0, U64)
keys = st.builds(RowKey, short_names, short_names)
rows = st.builds(
    Row,
    keys,
    st.sampled_from(Health),
    st.integers(0, 100),
    st.integers(0, 99),
    st.sampled_from(Directive),
    st.sampled_from(Directive),
    reasons,
)


@st.composite
def row_ops(draw: st.DrawFn) -> RowOp:
    op = draw(st.sampled_from(Op))
    if op == Op.DELETE:
        return RowOp(op, draw(keys), None)
    r = draw(rows)
    return RowOp(op, r.key, r)


@st.composite
def snapshots(draw: st.DrawFn) -> SendSnapshot:
    parts = draw(st.integers(1, 2**16 - 1))
    part = draw(st.integers(0, parts - 1))
    return SendSnapshot(draw(u32s), draw(u32s), draw(u32s), part, parts, tuple(draw(st.lists(rows, max_size=4))))


messages = st.one_of(
    st.builds(Heartbeat, u32s, u32s, names, names),
    st.just(Goodbye()),
    st.builds(RowChange, u32s, st.lists(row_ops(), max_size=4).map(tuple)),
    st.builds(GetSnapshot, u32s),
    snapshots(),
    st.builds(Postulate, st.builds(RowKey, names, names), st.sampled_from(Directive)),
    st.builds(PostulateWrong, st.builds(RowKey, names, names), st.sampled_from(Directive), st.sampled_from(Directive)),
    st.builds(
        SessionUp,
        u32s,
        st.lists(st.builds(Session, short_names, names, st.sampled_from(SessionKind), short_names), max_size=4).map(
            tuple
        ),
    ),
    st.builds(SessionDown, u32s, st.lists(st.builds(SessionRef, short_names, names), max_size=4).map(tuple)),
    st.builds(SessionAck, u32s),
)
envelopes = st.builds(
    Envelope,
    u32s,
    u64s,
    u64s,
    st.integers(NOW_MS - int(MAX_AGE * 1000), NOW_MS + int(MAX_AGE * 1000)),
    messages,
)


class RoundTripTests(SynchronousTestCase):
    """Every kind survives encode then decode, at the edges of its ranges."""

    def setUp(self) -> None:
        self.codec = Codec(SECRET, clock())

    def assertRoundTrip(self, message: Message, **fields: int) -> bytes:
        sent = envelope(message, **fields)
        datagram = self.codec.encode(sent)
        self.assertLessEqual(len(datagram), MAX_DATAGRAM)
        self.assertEqual(len(datagram), self.codec.encoded_size(sent))
        self.assertEqual(self.codec.decode(datagram), sent)
        self.assertEqual(self.codec.drops, Counter())
        return datagram

    def test_header_layout(self) -> None:
        datagram = self.assertRoundTrip(Goodbye(), sender=0x01020304, epoch=5, seq=6, sent_ms=NOW_MS)
        self.assertEqual(HEADER_SIZE, 34)
        self.assertEqual(MAC_SIZE, 16)
        self.assertEqual(len(datagram), OVERHEAD)
        self.assertEqual(
            datagram[:HEADER_SIZE], struct.pack("!4sBBIQQQ", b"NLBH", VERSION, 2, 0x01020304, 5, 6, NOW_MS)
        )
        self.assertEqual(datagram[HEADER_SIZE:], hmac.new(SECRET, datagram[:HEADER_SIZE], hashlib.sha256).digest()[:16])

    def test_body_layout_matches_docstring(self) -> None:
        """A datagram built by hand from the documented layout decodes."""
        body = struct.pack("!II", 3, 4) + text("host-a") + text("10.0.0.1:9000")
        got = self.codec.decode(forge(Kind.HEARTBEAT, body))
        assert got is not None
        self.assertEqual(got.message, Heartbeat(3, 4, "host-a", "10.0.0.1:9000"))
        body = struct.pack("!IH", 9, 2)
        body += bytes([Op.DELETE]) + text("web") + text("10.0.0.2:80")
        body += bytes([Op.ADD]) + text("web") + text("10.0.0.3:80") + bytes([1, 40, 10, 1, 0]) + text("slow")
        got = self.codec.decode(forge(Kind.ROW_CHANGE, body))
        assert got is not None
        self.assertEqual(
            got.message,
            RowChange(
                9,
                (
                    RowOp(Op.DELETE, RowKey("web", "10.0.0.2:80"), None),
                    RowOp(
                        Op.ADD,
                        RowKey("web", "10.0.0.3:80"),
                        row(endpoint="10.0.0.3:80", target=Directive.DRAINING, reason="slow"),
                    ),
                ),
            ),
        )

    def test_heartbeat(self) -> None:
        self.assertRoundTrip(Heartbeat(0, 0))
        self.assertRoundTrip(Heartbeat(U32, U32, LONGEST, LONGEST), sender=U32, epoch=U64, seq=U64)
        self.assertRoundTrip(Heartbeat(1, 2, "hôte-😀.example", "[::1]:9000"), sender=0, epoch=0, seq=0)

    def test_goodbye(self) -> None:
        self.assertRoundTrip(Goodbye())

    def test_row_change(self) -> None:
        full = row(LONGEST[:60], "ключ:80", Health.DOWN, 100, 99, Directive.INACTIVE, Directive.DRAINING, "é" * 32)
        self.assertRoundTrip(RowChange(0, ()))
        self.assertRoundTrip(
            RowChange(
                U32,
                (
                    RowOp(Op.ADD, full.key, full),
                    RowOp(Op.UPDATE, KEY, row(load=0, capacity=0)),
                    RowOp(Op.DELETE, RowKey("", ""), None),
                ),
            )
        )

    def test_get_snapshot(self) -> None:
        self.assertRoundTrip(GetSnapshot(0))
        self.assertRoundTrip(GetSnapshot(U32))

    def test_send_snapshot(self) -> None:
        self.assertRoundTrip(SendSnapshot(0, 0, 0, 0, 1, ()))
        self.assertRoundTrip(SendSnapshot(U32, U32, U32, 2**16 - 2, 2**16 - 1, (row(), row(LONGEST, LONGEST))))

    def test_postulate(self) -> None:
        self.assertRoundTrip(Postulate(KEY, Directive.DRAINING))
        self.assertRoundTrip(Postulate(RowKey(LONGEST, ""), Directive.INACTIVE))

    def test_postulate_wrong(self) -> None:
        self.assertRoundTrip(PostulateWrong(KEY, Directive.DRAINING, Directive.ACTIVE))
        self.assertRoundTrip(PostulateWrong(RowKey("", LONGEST), Directive.INACTIVE, Directive.INACTIVE))

    def test_session_up(self) -> None:
        self.assertRoundTrip(SessionUp(0, ()))
        self.assertRoundTrip(SessionUp(U32, (Session("web", LONGEST, SessionKind.USER, "[2001:db8::7]:443"),)))
        self.assertRoundTrip(
            SessionUp(7, tuple(Session("web", f"k{i}", kind, "10.0.0.7:8080") for i, kind in enumerate(SessionKind)))
        )

    def test_session_down(self) -> None:
        self.assertRoundTrip(SessionDown(0, ()))
        self.assertRoundTrip(SessionDown(U32, (SessionRef("web", LONGEST), SessionRef("", "x"))))

    def test_session_ack(self) -> None:
        self.assertRoundTrip(SessionAck(0))
        self.assertRoundTrip(SessionAck(U32))

    def test_session_layout_matches_docstring(self) -> None:
        body = struct.pack("!IH", 9, 1) + text("web") + text("c00kie") + bytes([2]) + text("10.0.0.7:80")
        got = self.codec.decode(forge(Kind.SESSION_UP, body))
        assert got is not None
        self.assertEqual(got.message, SessionUp(9, (Session("web", "c00kie", SessionKind.TLS_SESSION, "10.0.0.7:80"),)))
        body = struct.pack("!IH", 10, 2) + text("web") + text("a") + text("api") + text("b")
        got = self.codec.decode(forge(Kind.SESSION_DOWN, body))
        assert got is not None
        self.assertEqual(got.message, SessionDown(10, (SessionRef("web", "a"), SessionRef("api", "b"))))
        got = self.codec.decode(forge(Kind.SESSION_ACK, struct.pack("!I", 11)))
        assert got is not None
        self.assertEqual(got.message, SessionAck(11))

    def test_session_kinds_and_words(self) -> None:
        self.assertEqual([k.word for k in SessionKind], ["http-cookie", "tls-session", "client-ip", "user"])
        for kind in SessionKind:
            self.assertIs(SessionKind.from_word(kind.word), kind)
        self.assertRaises(ValueError, SessionKind.from_word, "HTTP_COOKIE")

    def test_reason_is_cut_at_a_character_boundary(self) -> None:
        exact = "r" * 64
        self.assertRoundTrip(RowChange(1, (RowOp(Op.UPDATE, KEY, row(reason=exact)),)))
        # 63 ASCII bytes then a two-byte character that straddles byte 64.
        sent = envelope(RowChange(1, (RowOp(Op.UPDATE, KEY, row(reason="r" * 63 + "é!")),)))
        got = self.codec.decode(self.codec.encode(sent))
        assert got is not None and isinstance(got.message, RowChange)
        self.assertEqual(got.message.ops[0].row, row(reason="r" * 63))
        # Four-byte characters: 64 bytes is exactly 16 of them.
        sent = envelope(SendSnapshot(1, 1, 1, 0, 1, (row(reason="😀" * 20),)))
        got = self.codec.decode(self.codec.encode(sent))
        assert got is not None and isinstance(got.message, SendSnapshot)
        self.assertEqual(got.message.rows[0].reason, "😀" * 16)

    def test_enums_come_back_as_enums(self) -> None:
        got = self.codec.decode(self.codec.encode(envelope(PostulateWrong(KEY, Directive.DRAINING, Directive.ACTIVE))))
        assert got is not None and isinstance(got.message, PostulateWrong)
        self.assertIs(got.message.postulated, Directive.DRAINING)
        self.assertIs(got.message.actual, Directive.ACTIVE)

    @settings(deadline=None, max_examples=150)
    @given(envelopes)
    def test_identity(self, sent: Envelope) -> None:
        codec = Codec(SECRET, clock())
        datagram = codec.encode(sent)
        self.assertEqual(len(datagram), codec.encoded_size(sent))
        self.assertEqual(codec.decode(datagram), sent)


class EncodeErrorTests(SynchronousTestCase):
    """Encoding what cannot be sent is our bug: ValueError, never a bad datagram."""

    def setUp(self) -> None:
        self.codec = Codec(SECRET, clock())

    def assertRefused(self, message: Message, **fields: int) -> None:
        self.assertRaises(ValueError, self.codec.encode, envelope(message, **fields))

    def test_header_ranges(self) -> None:
        self.assertRefused(Goodbye(), sender=U32 + 1)
        self.assertRefused(Goodbye(), sender=-1)
        self.assertRefused(Goodbye(), epoch=U64 + 1)
        self.assertRefused(Goodbye(), seq=U64 + 1)
        self.assertRefused(Goodbye(), sent_ms=-1)

    def test_strings(self) -> None:
        self.assertRefused(Heartbeat(1, 1, LONGEST + "x"))
        self.assertRefused(Heartbeat(1, 1, "", "é" * 128))
        self.assertRefused(Postulate(RowKey("a" * 256, ""), Directive.ACTIVE))
        self.assertRefused(Heartbeat(1, 1, "\ud800"))  # a lone surrogate has no UTF-8

    def test_numbers(self) -> None:
        self.assertRefused(Heartbeat(U32 + 1, 0))
        self.assertRefused(GetSnapshot(-1))
        self.assertRefused(RowChange(U32 + 1, ()))
        self.assertRefused(SendSnapshot(0, 0, U32 + 1, 0, 1, ()))

    def test_row_ranges(self) -> None:
        for bad in [row(load=101), row(load=-1), row(capacity=100), row(health=2), row(target=3), row(current=-1)]:  # type: ignore[arg-type]
            self.assertRefused(RowChange(1, (RowOp(Op.UPDATE, KEY, bad),)))
            self.assertRefused(SendSnapshot(1, 1, 1, 0, 1, (bad,)))

    def test_row_ops(self) -> None:
        self.assertRefused(RowChange(1, (RowOp(Op.DELETE, KEY, row()),)))
        self.assertRefused(RowChange(1, (RowOp(Op.ADD, KEY, None),)))
        self.assertRefused(RowChange(1, (RowOp(Op.UPDATE, RowKey("web", "10.0.0.9:80"), row()),)))
        self.assertRefused(RowChange(1, (RowOp(7, KEY, None),)))  # type: ignore[arg-type]

    def test_parts(self) -> None:
        self.assertRefused(SendSnapshot(0, 0, 0, 0, 0, ()))
        self.assertRefused(SendSnapshot(0, 0, 0, 1, 1, ()))
        self.assertRefused(SendSnapshot(0, 0, 0, 0, 2**16, ()))

    def test_sessions(self) -> None:
        self.assertRefused(SessionUp(U32 + 1, ()))
        self.assertRefused(SessionDown(-1, ()))
        self.assertRefused(SessionAck(U32 + 1))
        self.assertRefused(SessionUp(1, (Session("web", "k" * 256, SessionKind.HTTP_COOKIE, "h:1"),)))
        self.assertRefused(SessionUp(1, (Session("web", "k", 0, "h:1"),)))  # type: ignore[arg-type]
        self.assertRefused(SessionUp(1, (Session("web", "k", 5, "h:1"),)))  # type: ignore[arg-type]
        self.assertRefused(SessionDown(1, (SessionRef("web", "\ud800"),)))
        self.assertRaises(ValueError, session_entry_size, SessionRef("", "k" * 256))

    def test_directives(self) -> None:
        self.assertRefused(Postulate(KEY, 3))  # type: ignore[arg-type]
        self.assertRefused(PostulateWrong(KEY, Directive.ACTIVE, 9))  # type: ignore[arg-type]

    def test_too_big_for_a_datagram(self) -> None:
        big = SendSnapshot(0, 0, 0, 0, 1, tuple(row(LONGEST, LONGEST[:-1] + str(i)) for i in range(3)))
        self.assertGreater(self.codec.encoded_size(envelope(big)), MAX_DATAGRAM)
        self.assertRefused(big)

    def test_not_a_message(self) -> None:
        self.assertRaises(TypeError, self.codec.encode, envelope("hello"))  # type: ignore[arg-type]

    def test_bad_configuration(self) -> None:
        self.assertRaises(ValueError, Codec, b"", clock())
        self.assertRaises(ValueError, Codec, SECRET, clock(), max_age=0)
        self.assertRaises(ValueError, ReplayGuard, max_senders=0)


class DropTests(SynchronousTestCase):
    """Whatever a peer sends, decode returns None and counts one reason."""

    def setUp(self) -> None:
        self.clock = clock()
        self.codec = Codec(SECRET, self.clock)
        self.good = self.codec.encode(envelope(Heartbeat(1, 2, "a", "b")))

    def assertDropped(self, datagram: bytes, reason: str, accept: frozenset[Kind] | None = None) -> None:
        self.codec.drops.clear()
        self.assertIsNone(self.codec.decode(datagram, accept))
        self.assertEqual(self.codec.drops, Counter({reason: 1}))

    def test_short(self) -> None:
        self.assertDropped(b"", "short")
        self.assertDropped(self.good[: OVERHEAD - 1], "short")

    def test_magic(self) -> None:
        self.assertDropped(b"HTTP" + self.good[4:], "magic")
        self.assertDropped(forge(Kind.GOODBYE, b"", magic=b"NLBX"), "magic")

    def test_version(self) -> None:
        self.assertDropped(forge(Kind.GOODBYE, b"", version=VERSION + 1), "version")
        self.assertDropped(forge(Kind.GOODBYE, b"", version=0), "version")

    def test_kind(self) -> None:
        self.assertDropped(forge(0, b""), "kind")
        self.assertDropped(forge(max(Kind) + 1, b""), "kind")
        self.assertDropped(forge(255, b""), "kind")

    def test_wrong_key(self) -> None:
        other = Codec(b"another fleet's secret", self.clock).encode(envelope(Goodbye()))
        self.assertDropped(other, "mac")

    def test_tampered(self) -> None:
        tampered = bytearray(self.good)
        tampered[HEADER_SIZE] ^= 1  # the heartbeat's generation
        self.assertDropped(bytes(tampered), "mac")
        self.assertDropped(self.good[:-1] + bytes([self.good[-1] ^ 0x80]), "mac")
        self.assertDropped(self.good + b"\x00", "mac")

    def test_stale(self) -> None:
        limit = int(MAX_AGE * 1000)
        self.assertIsNotNone(self.codec.decode(forge(Kind.GOODBYE, b"", sent_ms=NOW_MS - limit)))
        self.assertDropped(forge(Kind.GOODBYE, b"", sent_ms=NOW_MS - limit - 1), "stale")
        self.assertDropped(forge(Kind.GOODBYE, b"", sent_ms=0), "stale")
        self.clock.advance(MAX_AGE + 0.001)
        self.assertDropped(self.good, "stale")

    def test_future(self) -> None:
        """A sender whose clock runs ahead by more than max_age is refused too."""
        limit = int(MAX_AGE * 1000)
        self.assertIsNotNone(self.codec.decode(forge(Kind.GOODBYE, b"", sent_ms=NOW_MS + limit)))
        self.assertDropped(forge(Kind.GOODBYE, b"", sent_ms=NOW_MS + limit + 1), "stale")
        self.assertDropped(forge(Kind.GOODBYE, b"", sent_ms=U64), "stale")

    def test_max_age_is_configurable(self) -> None:
        codec = Codec(SECRET, self.clock, max_age=1.0)
        self.assertIsNone(codec.decode(forge(Kind.GOODBYE, b"", sent_ms=NOW_MS - 1001)))
        self.assertEqual(codec.drops, Counter({"stale": 1}))
        self.assertIsNotNone(codec.decode(forge(Kind.GOODBYE, b"", sent_ms=NOW_MS - 1000)))

    def test_direction(self) -> None:
        self.assertEqual(
            SENDER_AGENT_KINDS,
            {
                Kind.HEARTBEAT,
                Kind.GOODBYE,
                Kind.ROW_CHANGE,
                Kind.SEND_SNAPSHOT,
                Kind.POSTULATE,
                Kind.SESSION_UP,
                Kind.SESSION_DOWN,
            },
        )
        self.assertEqual(SENDER_UNIT_KINDS, {Kind.GET_SNAPSHOT, Kind.POSTULATE_WRONG, Kind.SESSION_ACK})
        self.assertEqual(SENDER_AGENT_KINDS | SENDER_UNIT_KINDS, set(Kind))
        # An agent does not take heartbeats; a unit does not take snapshot requests.
        self.assertDropped(self.good, "direction", accept=SENDER_UNIT_KINDS)
        unit_says = self.codec.encode(envelope(GetSnapshot(5)))
        self.assertDropped(unit_says, "direction", accept=SENDER_AGENT_KINDS)
        self.assertIsNotNone(self.codec.decode(unit_says, SENDER_UNIT_KINDS))
        self.assertIsNotNone(self.codec.decode(self.good, SENDER_AGENT_KINDS))

    def test_malformed(self) -> None:
        state = bytes([1, 40, 10, 0, 0]) + text("")
        op_add = bytes([Op.ADD]) + text("web") + text("h:80")
        cases = {
            "trailing byte": (Kind.GOODBYE, b"\x00"),
            "short body": (Kind.GET_SNAPSHOT, b"\x00\x00\x00"),
            "string past the end": (Kind.HEARTBEAT, struct.pack("!II", 1, 1) + b"\x05abc" + text("")),
            "bad UTF-8": (Kind.HEARTBEAT, struct.pack("!II", 1, 1) + b"\x02\xc3\x28" + text("")),
            "count past the end": (
                Kind.ROW_CHANGE,
                struct.pack("!IH", 1, 2) + bytes([Op.DELETE]) + text("a") + text("b"),
            ),
            "unknown op": (Kind.ROW_CHANGE, struct.pack("!IH", 1, 1) + bytes([3]) + text("a") + text("b")),
            "unknown health": (Kind.ROW_CHANGE, struct.pack("!IH", 1, 1) + op_add + bytes([2]) + state[1:]),
            "load 101": (Kind.ROW_CHANGE, struct.pack("!IH", 1, 1) + op_add + bytes([1, 101]) + state[2:]),
            "capacity 100": (Kind.ROW_CHANGE, struct.pack("!IH", 1, 1) + op_add + bytes([1, 40, 100]) + state[3:]),
            "unknown target": (
                Kind.ROW_CHANGE,
                struct.pack("!IH", 1, 1) + op_add + bytes([1, 40, 10, 3, 0]) + text(""),
            ),
            "reason of 65 bytes": (Kind.ROW_CHANGE, struct.pack("!IH", 1, 1) + op_add + state[:-1] + text("r" * 65)),
            "part 1 of 1": (Kind.SEND_SNAPSHOT, struct.pack("!IIIHHH", 1, 1, 1, 1, 1, 0)),
            "no parts": (Kind.SEND_SNAPSHOT, struct.pack("!IIIHHH", 1, 1, 1, 0, 0, 0)),
            "unknown directive": (Kind.POSTULATE, text("a") + text("b") + b"\x03"),
            "missing actual": (Kind.POSTULATE_WRONG, text("a") + text("b") + b"\x01"),
            "session kind 0": (Kind.SESSION_UP, struct.pack("!IH", 1, 1) + text("a") + text("k") + b"\x00" + text("e")),
            "session kind 5": (Kind.SESSION_UP, struct.pack("!IH", 1, 1) + text("a") + text("k") + b"\x05" + text("e")),
            "session count past the end": (Kind.SESSION_DOWN, struct.pack("!IH", 1, 2) + text("a") + text("k")),
            "session without endpoint": (Kind.SESSION_UP, struct.pack("!IH", 1, 1) + text("a") + text("k") + b"\x01"),
            "short ack": (Kind.SESSION_ACK, b"\x00\x00\x01"),
            "long ack": (Kind.SESSION_ACK, b"\x00\x00\x00\x01\x00"),
        }
        for name, (kind, body) in cases.items():
            with self.subTest(name):
                self.assertDropped(forge(kind, body), "malformed")
        # The cases differ from a valid body only where the name says.
        self.assertIsNotNone(self.codec.decode(forge(Kind.ROW_CHANGE, struct.pack("!IH", 1, 1) + op_add + state)))

    def test_counts_accumulate(self) -> None:
        for _ in range(3):
            self.codec.decode(b"x")
        self.codec.decode(self.good)
        self.codec.decode(self.good, SENDER_UNIT_KINDS)
        self.assertEqual(self.codec.drops, Counter({"short": 3, "direction": 1}))

    @settings(deadline=None, max_examples=300)
    @given(st.binary(max_size=2 * MAX_DATAGRAM))
    def test_arbitrary_bytes_never_raise(self, datagram: bytes) -> None:
        codec = Codec(SECRET, clock())
        self.assertIsNone(codec.decode(datagram))
        self.assertEqual(sum(codec.drops.values()), 1)

    @settings(deadline=None, max_examples=300)
    @given(st.sampled_from(Kind), st.binary(max_size=200))
    def test_authentic_garbage_never_raises(self, kind: Kind, body: bytes) -> None:
        """Bodies signed with the right key reach the parser: it must hold up too."""
        codec = Codec(SECRET, clock())
        got = codec.decode(forge(kind, body))
        if got is None:
            self.assertEqual(codec.drops, Counter({"malformed": 1}))
        else:
            self.assertIs(KIND_OF[type(got.message)], kind)
            self.assertEqual(codec.encode(got)[HEADER_SIZE:-MAC_SIZE], body)

    @settings(deadline=None, max_examples=150)
    @given(envelopes, st.integers(min_value=0))
    def test_any_bit_flip_is_dropped(self, sent: Envelope, where: int) -> None:
        codec = Codec(SECRET, clock())
        datagram = bytearray(codec.encode(sent))
        bit = where % (len(datagram) * 8)
        datagram[bit // 8] ^= 1 << (bit % 8)
        self.assertIsNone(codec.decode(bytes(datagram)))
        self.assertEqual(sum(codec.drops.values()), 1)
        self.assertLessEqual(set(codec.drops), {"mac", "magic", "version", "kind"})


class ReplayGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.guard = ReplayGuard()

    def accepts(self, seq: int, epoch: int = 1, sender: int = 7) -> bool:
        return self.guard.accept(envelope(Goodbye(), sender=sender, epoch=epoch, seq=seq))

    def test_in_order(self) -> None:
        self.assertTrue(all(self.accepts(seq) for seq in range(200)))
        self.assertEqual(self.guard.drops, Counter())

    def test_duplicate(self) -> None:
        self.assertTrue(self.accepts(5))
        self.assertFalse(self.accepts(5))
        self.assertTrue(self.accepts(6))
        self.assertFalse(self.accepts(5))
        self.assertFalse(self.accepts(6))
        self.assertEqual(self.guard.drops, Counter({"replay": 3}))

    def test_reorder_inside_window(self) -> None:
        self.assertTrue(self.accepts(100))
        self.assertTrue(self.accepts(37))  # 100 - 63: the oldest still in the window
        self.assertTrue(self.accepts(99))
        self.assertTrue(self.accepts(50))
        for seq in (37, 99, 50, 100):
            self.assertFalse(self.accepts(seq))
        self.assertEqual(self.guard.drops, Counter({"replay": 4}))

    def test_window_slides(self) -> None:
        self.assertTrue(self.accepts(10))
        self.assertTrue(self.accepts(12))
        self.assertTrue(self.accepts(70))  # 70 - 63 = 7: 10 and 12 stay remembered
        self.assertFalse(self.accepts(10))
        self.assertFalse(self.accepts(12))
        self.assertTrue(self.accepts(11))
        self.assertTrue(self.accepts(75))  # now 11 and 10 fall out; 12 is the oldest
        self.assertFalse(self.accepts(12))
        self.assertTrue(self.accepts(13))

    def test_too_old(self) -> None:
        self.assertTrue(self.accepts(100))
        self.assertFalse(self.accepts(36))  # 100 - 64: never seen, but out of the window
        self.assertFalse(self.accepts(0))
        self.assertEqual(self.guard.drops, Counter({"replay": 2}))

    def test_big_jump_clears_window(self) -> None:
        self.assertTrue(self.accepts(1))
        self.assertTrue(self.accepts(10**12))
        self.assertTrue(self.accepts(10**12 - 1))
        self.assertFalse(self.accepts(1))

    def test_epoch_restart(self) -> None:
        """A restarted sender begins again at seq 0 in a newer epoch."""
        for seq in range(10):
            self.assertTrue(self.accepts(seq, epoch=1))
        self.assertTrue(self.accepts(0, epoch=2))
        self.assertTrue(self.accepts(1, epoch=2))
        self.assertFalse(self.accepts(1, epoch=2))
        self.assertEqual(self.guard.drops, Counter({"replay": 1}))

    def test_older_epoch(self) -> None:
        self.assertTrue(self.accepts(0, epoch=5))
        self.assertFalse(self.accepts(1000, epoch=4))
        self.assertTrue(self.accepts(1, epoch=5))
        self.assertEqual(self.guard.drops, Counter({"old_epoch": 1}))

    def test_senders_are_independent(self) -> None:
        self.assertTrue(self.accepts(5, sender=1))
        self.assertTrue(self.accepts(5, sender=2))
        self.assertFalse(self.accepts(5, sender=1))

    def test_eviction_bound(self) -> None:
        for sender in range(MAX_SENDERS + 10):
            self.assertTrue(self.accepts(100, sender=sender))
        self.assertEqual(len(self.guard), MAX_SENDERS)
        # The ten least recently seen are forgotten: their replays get through
        # (the codec's max_age still bounds them); the rest are remembered.
        self.assertNotIn(0, self.guard)
        self.assertTrue(self.accepts(100, sender=0))
        self.assertFalse(self.accepts(100, sender=MAX_SENDERS + 9))

    def test_eviction_prefers_least_recently_seen(self) -> None:
        guard = ReplayGuard(max_senders=3)
        for sender in (1, 2, 3):
            self.assertTrue(guard.accept(envelope(Goodbye(), sender=sender, seq=1)))
        self.assertTrue(guard.accept(envelope(Goodbye(), sender=1, seq=2)))  # 1 is fresh again
        self.assertTrue(guard.accept(envelope(Goodbye(), sender=4, seq=1)))
        self.assertEqual([s for s in (1, 2, 3, 4) if s in guard], [1, 3, 4])
        self.assertLessEqual(len(guard), 3)

    def test_forget(self) -> None:
        self.assertTrue(self.accepts(5))
        self.guard.forget(7)
        self.guard.forget(8)
        self.assertTrue(self.accepts(5))

    @settings(deadline=None, max_examples=100)
    @given(st.lists(st.integers(0, 200), max_size=100))
    def test_each_seq_once_within_window(self, seqs: list[int]) -> None:
        """Against a model: accept iff unseen and within 63 of the highest so far."""
        guard = ReplayGuard()
        seen: set[int] = set()
        for seq in seqs:
            expected = seq not in seen and (not seen or seq > max(seen) - 64)
            self.assertEqual(guard.accept(envelope(Goodbye(), seq=seq)), expected)
            if expected:
                seen.add(seq)


class ChecksumTests(SynchronousTestCase):
    def test_is_crc32_of_rows_sorted_by_key(self) -> None:
        table = [row("web", "b:80"), row("api", "z:80", load=3), row("web", "a:80", reason="x")]
        ordered = sorted(table, key=lambda r: (r.key.app, r.key.endpoint))
        datagram = Codec(SECRET, clock()).encode(envelope(SendSnapshot(0, 0, 0, 0, 1, tuple(ordered))))
        rows_on_wire = datagram[HEADER_SIZE + struct.calcsize("!IIIHHH") : -MAC_SIZE]
        self.assertEqual(table_checksum(table), zlib.crc32(rows_on_wire))
        self.assertEqual(table_checksum(reversed(table)), table_checksum(table))

    def test_sensitive_to_every_field(self) -> None:
        base = table_checksum([row()])
        for changed in [
            row(app="api"),
            row(endpoint="10.0.0.1:81"),
            row(health=Health.DOWN),
            row(load=41),
            row(capacity=11),
            row(target=Directive.DRAINING),
            row(current=Directive.INACTIVE),
            row(reason="why"),
        ]:
            self.assertNotEqual(table_checksum([changed]), base)

    def test_empty_table(self) -> None:
        self.assertEqual(table_checksum([]), 0)

    def test_counts_reason_as_sent(self) -> None:
        self.assertEqual(table_checksum([row(reason="r" * 64 + "dropped")]), table_checksum([row(reason="r" * 64)]))


class SplitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.codec = Codec(SECRET, clock())
        self.table = [
            row(f"application-{i % 7}-" + "a" * 200, f"10.0.{i // 256}.{i % 256}:8080", load=i % 101, reason="r" * 64)
            for i in range(300)
        ]

    def test_snapshot_of_300_long_rows(self) -> None:
        checksum = table_checksum(self.table)
        parts = snapshot_parts(nonce=42, generation=9, checksum=checksum, rows=self.table)
        self.assertGreater(len(parts), 1)
        received: list[Row] = []
        for index, part in enumerate(parts):
            self.assertEqual((part.nonce, part.generation, part.checksum), (42, 9, checksum))
            self.assertEqual((part.part, part.parts), (index, len(parts)))
            datagram = self.codec.encode(envelope(part, seq=index))
            self.assertLessEqual(len(datagram), MAX_DATAGRAM)
            got = self.codec.decode(datagram)
            assert got is not None and isinstance(got.message, SendSnapshot)
            received.extend(got.message.rows)
        self.assertEqual(received, self.table)
        self.assertEqual(table_checksum(received), checksum)

    def test_parts_are_full(self) -> None:
        """Greedy packing: a part ends only where the next row would not fit."""
        parts = snapshot_parts(1, 1, 1, self.table)
        for part, following in zip(parts, parts[1:], strict=False):
            fuller = SendSnapshot(1, 1, 1, 0, 1, (*part.rows, following.rows[0]))
            self.assertGreater(self.codec.encoded_size(envelope(fuller)), MAX_DATAGRAM)

    def test_empty_table_gives_one_part(self) -> None:
        self.assertEqual(snapshot_parts(1, 2, 0, []), [SendSnapshot(1, 2, 0, 0, 1, ())])

    def test_smaller_limit(self) -> None:
        parts = snapshot_parts(1, 1, 1, self.table[:20], limit=600)
        self.assertEqual(len(parts), 20)  # each long row needs most of 600 bytes
        for part in parts:
            self.assertLessEqual(self.codec.encoded_size(envelope(part)), 600)
        self.assertRaises(ValueError, snapshot_parts, 1, 1, 1, self.table[:1], limit=200)

    def test_row_change_batches(self) -> None:
        ops = [RowOp(Op.ADD, r.key, r) for r in self.table[:100]]
        ops += [RowOp(Op.UPDATE, r.key, r) for r in self.table[100:200]]
        ops += [RowOp(Op.DELETE, r.key, None) for r in self.table[200:]]
        batches = row_change_batches(ops, first_generation=1000)
        self.assertGreater(len(batches), 1)
        self.assertEqual([b.generation for b in batches], list(range(1000, 1000 + len(batches))))
        for batch in batches:
            self.assertGreaterEqual(len(batch.ops), 1)
            self.assertLessEqual(len(self.codec.encode(envelope(batch))), MAX_DATAGRAM)
        self.assertEqual([op for b in batches for op in b.ops], ops)

    def test_small_change_is_one_batch(self) -> None:
        op = RowOp(Op.UPDATE, KEY, row())
        self.assertEqual(row_change_batches([op], 5), [RowChange(5, (op,))])
        self.assertEqual(row_change_batches([], 5), [])

    def test_generations_wrap(self) -> None:
        ops = [RowOp(Op.DELETE, r.key, None) for r in self.table]
        batches = row_change_batches(ops, first_generation=U32)
        self.assertEqual([b.generation for b in batches[:2]], [U32, 0])
        self.assertRaises(ValueError, row_change_batches, ops, U32 + 1)

    def test_session_entries_fill_a_batch(self) -> None:
        """session_entry_size against SESSION_BATCH_ROOM is exactly what fits one datagram."""
        sessions: list[Session] = []
        used = 0
        while True:
            s = Session("web", f"{len(sessions):04d}" + "c" * 60, SessionKind.HTTP_COOKIE, "10.0.0.7:8080")
            if used + session_entry_size(s) > SESSION_BATCH_ROOM:
                break
            sessions.append(s)
            used += session_entry_size(s)
        full = SessionUp(U32, tuple(sessions))
        self.assertLessEqual(len(self.codec.encode(envelope(full))), MAX_DATAGRAM)
        fuller = SessionUp(U32, (*sessions, sessions[0]))
        self.assertGreater(self.codec.encoded_size(envelope(fuller)), MAX_DATAGRAM)
        self.assertEqual(self.codec.encoded_size(envelope(full)), OVERHEAD + 6 + used)
        refs = tuple(SessionRef("web", "k" * 255) for _ in range(SESSION_BATCH_ROOM // 260))
        self.assertEqual(sum(map(session_entry_size, refs)), 260 * len(refs))
        self.assertLessEqual(len(self.codec.encode(envelope(SessionDown(1, refs)))), MAX_DATAGRAM)

    def test_bad_ops_are_our_bug(self) -> None:
        self.assertRaises(ValueError, row_change_batches, [RowOp(Op.ADD, KEY, None)], 1)
