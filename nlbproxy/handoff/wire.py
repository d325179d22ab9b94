# -*- test-case-name: tests.test_handoff_wire -*-
"""The handoff channel between a unit and a host's agent: framing, handshake, messages.

Sans-I/O: :class:`Channel` takes the bytes a TCP connection received and
returns the messages they carried; its ``send`` returns the bytes to write.
:mod:`nlbproxy.handoff.channel` does the I/O.

Why not AMP like the DAM: a handoff carries the connection's queues (the
client's unread request, unacknowledged response bytes), which can be
megabytes, and AMP caps a value at 64 KiB.  So this is a length-prefixed
framing of its own, authenticated frame by frame.

Frames
------
::

    type u8 | length u32 | payload (length bytes) | mac (32 bytes, after the handshake)

Handshake (no mac; an HMAC-SHA256 challenge/response by the farm's shared
secret, with a role label so one side's proof cannot be reflected as the
other's, and fresh challenges so a recorded handshake cannot be replayed)::

    unit  -> HELLO   version u8 | challenge cU (16)
    agent -> WELCOME challenge cA (16) | HMAC(secret, "nlbh agent" cU cA)
    unit  -> PROVE   HMAC(secret, "nlbh unit" cU cA)

After it every frame's mac is ``HMAC(key, direction counter type length
payload)`` with ``key = HMAC(secret, "nlbh key" cU cA)``, the direction
(b"u" from the unit, b"a" from the agent) and a per-direction frame counter,
so frames cannot be forged, replayed, reordered or reflected.  (The payload
is not encrypted: the channel belongs on the farm's private network.)

Messages after the handshake
----------------------------
- HANDOFF (unit -> agent): ``id u32 | pool | endpoint | blob``, pool and
  endpoint (the host as the unit knows it, "ip:port") each as ``u16 length |
  utf-8``; the blob is :func:`nlbproxy.handoff.state.encode`'s.
- RESULT (agent -> unit): ``id u32 | ok u8 | reason`` (utf-8, the rest).
- COMMIT (unit -> agent): ``id u32``; the unit committed the forwarding
  route, so the agent may write the connection's never-sent bytes.
- ENDED (agent -> unit): ``client | vip``, each ``u16 length | "ip:port"``:
  a handed-off connection ended; the unit deletes its route.

Anything else -- an unknown type, a frame too long, a bad mac, a message out
of turn, a malformed payload -- raises :class:`ChannelError`; the I/O layer
drops the connection and counts the reason (:attr:`ChannelError.reason`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from nlbproxy.handoff.tunnel import Mapping, TunnelError

__all__ = [
    "CHALLENGE_SIZE",
    "MAC_SIZE",
    "MAX_FRAME",
    "VERSION",
    "Channel",
    "ChannelError",
    "Commit",
    "Ended",
    "Handoff",
    "Message",
    "Result",
]

VERSION = 1
CHALLENGE_SIZE = 16
MAC_SIZE = 32
#: Largest frame payload: a blob with two full queues and then some.  Socket
#: buffers are a few MiB at most (``net.core.wmem_max``).
MAX_FRAME = 48 * 1024 * 1024
_MAX_HANDSHAKE = 1 + CHALLENGE_SIZE + MAC_SIZE
#: Largest pool name / endpoint / reason / address text in a message.
MAX_TEXT = 1024

_HEADER = struct.Struct("!BI")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_COUNTER = struct.Struct("!Q")

HELLO, WELCOME, PROVE, HANDOFF, RESULT, COMMIT, ENDED, HANDOFF_TUNNEL = range(1, 9)


class ChannelError(Exception):
    """The peer broke the protocol; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Handoff:
    id: int
    pool: str
    endpoint: str
    blob: bytes
    #: The flow-id tunnel's entry for this connection, when the unit reaches
    #: the host through the tunnel; None for a host on the unit's segment.
    tunnel: Mapping | None = None


@dataclass(frozen=True, slots=True)
class Result:
    id: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Commit:
    id: int


@dataclass(frozen=True, slots=True)
class Ended:
    client: str
    vip: str


Message = Handoff | Result | Commit | Ended

#: Which messages each side may send once the handshake is done.
_SENDS = {"unit": (Handoff, Commit), "agent": (Result, Ended)}


def _proof(secret: bytes, label: bytes, c_unit: bytes, c_agent: bytes) -> bytes:
    return hmac.new(secret, b"nlbh " + label + c_unit + c_agent, hashlib.sha256).digest()


class Channel:
    """One end (``role`` "unit" or "agent") of a handoff channel.

    The unit end starts the handshake: send :meth:`hello` first.  Feed what
    arrives to :meth:`receive`; it returns the bytes to answer with (the
    handshake's) and the messages that arrived.  :attr:`ready` turns true
    when both sides proved the secret.
    """

    def __init__(self, role: str, secret: bytes, random: Callable[[int], bytes] = os.urandom) -> None:
        if role not in _SENDS:
            raise ValueError(f"role must be 'unit' or 'agent', got {role!r}")
        self.role = role
        self.secret = secret
        self.random = random
        self.ready = False
        self._buffer = bytearray()
        self._mine = random(CHALLENGE_SIZE)
        self._theirs = b""
        self._key = b""
        self._sent = 0
        self._received = 0
        # What the next incoming handshake frame must be (0 once ready).
        self._expect = WELCOME if role == "unit" else HELLO

    # -- the handshake ------------------------------------------------------------
    def hello(self) -> bytes:
        if self.role != "unit":
            raise RuntimeError("only the unit end says hello")
        return self._frame(HELLO, bytes([VERSION]) + self._mine, mac=False)

    def _handshake(self, kind: int, payload: bytes) -> bytes:
        if kind != self._expect:
            raise ChannelError("out_of_turn", f"frame type {kind} during the handshake")
        if kind == HELLO:
            if len(payload) != 1 + CHALLENGE_SIZE:
                raise ChannelError("malformed", "hello of the wrong size")
            if payload[0] != VERSION:
                raise ChannelError("version", f"peer speaks version {payload[0]}, this side {VERSION}")
            self._theirs = payload[1:]
            self._expect = PROVE
            return self._frame(WELCOME, self._mine + _proof(self.secret, b"agent", self._theirs, self._mine), mac=False)
        if kind == WELCOME:
            if len(payload) != CHALLENGE_SIZE + MAC_SIZE:
                raise ChannelError("malformed", "welcome of the wrong size")
            self._theirs = payload[:CHALLENGE_SIZE]
            if not hmac.compare_digest(payload[CHALLENGE_SIZE:], _proof(self.secret, b"agent", self._mine, self._theirs)):
                raise ChannelError("bad_proof", "the agent does not hold the farm's secret")
            self._become_ready(self._mine, self._theirs)
            return self._frame(PROVE, _proof(self.secret, b"unit", self._mine, self._theirs), mac=False)
        # PROVE
        if len(payload) != MAC_SIZE or not hmac.compare_digest(
            payload, _proof(self.secret, b"unit", self._theirs, self._mine)
        ):
            raise ChannelError("bad_proof", "the unit does not hold the farm's secret")
        self._become_ready(self._theirs, self._mine)
        return b""

    def _become_ready(self, c_unit: bytes, c_agent: bytes) -> None:
        self._key = hmac.new(self.secret, b"nlbh key" + c_unit + c_agent, hashlib.sha256).digest()
        self._expect = 0
        self.ready = True

    # -- messages -----------------------------------------------------------------
    def send(self, message: Message) -> bytes:
        """The bytes of ``message`` (after the handshake only)."""
        if not self.ready:
            raise RuntimeError("the handshake is not complete")
        if not isinstance(message, _SENDS[self.role]):
            raise RuntimeError(f"the {self.role} end does not send {type(message).__name__}")
        kind, payload = _encode(message)
        return self._frame(kind, payload, mac=True)

    def receive(self, data: bytes) -> tuple[bytes, list[Message]]:
        """Bytes to write back and the messages complete so far; raises
        :class:`ChannelError` on anything malformed or unauthenticated."""
        self._buffer += data
        reply = bytearray()
        messages: list[Message] = []
        while len(self._buffer) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buffer)
            # Before the handshake only its small frames are allowed: an
            # unauthenticated peer must not make this side buffer a blob.
            if length > (MAX_FRAME if self.ready else _MAX_HANDSHAKE):
                raise ChannelError("too_long", f"frame of {length} bytes")
            total = _HEADER.size + length + (MAC_SIZE if self.ready else 0)
            if len(self._buffer) < total:
                break
            frame = bytes(self._buffer[:total])
            del self._buffer[:total]
            payload = frame[_HEADER.size : _HEADER.size + length]
            if not self.ready:
                reply += self._handshake(kind, payload)
                continue
            expected = self._mac(self._received, frame[: _HEADER.size + length], incoming=True)
            if not hmac.compare_digest(frame[-MAC_SIZE:], expected):
                raise ChannelError("bad_mac", f"frame {self._received} failed authentication")
            self._received += 1
            message = _decode(kind, payload)
            if isinstance(message, _SENDS[self.role]):
                raise ChannelError("out_of_turn", f"{type(message).__name__} sent to the {self.role} end")
            messages.append(message)
        return bytes(reply), messages

    def _frame(self, kind: int, payload: bytes, mac: bool) -> bytes:
        head = _HEADER.pack(kind, len(payload)) + payload
        if not mac:
            return head
        tag = self._mac(self._sent, head, incoming=False)
        self._sent += 1
        return head + tag

    def _mac(self, counter: int, head: bytes, incoming: bool) -> bytes:
        from_unit = (self.role == "unit") != incoming
        direction = b"u" if from_unit else b"a"
        return hmac.new(self._key, direction + _COUNTER.pack(counter) + head, hashlib.sha256).digest()


# -- payloads ------------------------------------------------------------------------


def _text(value: str) -> bytes:
    data = value.encode()
    if len(data) > MAX_TEXT:
        raise ValueError(f"text of {len(data)} bytes exceeds {MAX_TEXT}")
    return _U16.pack(len(data)) + data


def _encode(message: Message) -> tuple[int, bytes]:
    if isinstance(message, Handoff) and message.tunnel is not None:
        mapping = message.tunnel.encode()
        return HANDOFF_TUNNEL, (_U32.pack(message.id) + _text(message.pool) + _text(message.endpoint)
                                + _U16.pack(len(mapping)) + mapping + message.blob)
    if isinstance(message, Handoff):
        return HANDOFF, _U32.pack(message.id) + _text(message.pool) + _text(message.endpoint) + message.blob
    if isinstance(message, Result):
        reason = message.reason.encode()[:MAX_TEXT].decode(errors="ignore").encode()
        return RESULT, _U32.pack(message.id) + bytes([message.ok]) + reason
    if isinstance(message, Commit):
        return COMMIT, _U32.pack(message.id)
    return ENDED, _text(message.client) + _text(message.vip)


class _Cursor:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.payload):
            raise ChannelError("malformed", "message truncated")
        data = self.payload[self.at : self.at + n]
        self.at += n
        return data

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def text(self) -> str:
        (length,) = _U16.unpack(self.take(2))
        if length > MAX_TEXT:
            raise ChannelError("malformed", f"text of {length} bytes")
        try:
            return self.take(length).decode()
        except UnicodeDecodeError:
            raise ChannelError("malformed", "text is not UTF-8") from None

    def rest(self) -> bytes:
        data = self.payload[self.at :]
        self.at = len(self.payload)
        return data

    def end(self) -> None:
        if self.at != len(self.payload):
            raise ChannelError("malformed", f"{len(self.payload) - self.at} bytes after the message")


def _decode(kind: int, payload: bytes) -> Message:
    cursor = _Cursor(payload)
    message: Message
    if kind == HANDOFF:
        message = Handoff(cursor.u32(), cursor.text(), cursor.text(), cursor.rest())
    elif kind == HANDOFF_TUNNEL:
        id_, pool, endpoint = cursor.u32(), cursor.text(), cursor.text()
        (length,) = _U16.unpack(cursor.take(2))
        try:
            mapping = Mapping.decode(cursor.take(length))
        except TunnelError as e:
            raise ChannelError("malformed", f"tunnel mapping: {e}") from None
        message = Handoff(id_, pool, endpoint, cursor.rest(), mapping)
    elif kind == RESULT:
        id_ = cursor.u32()
        ok = cursor.take(1)[0]
        if ok > 1:
            raise ChannelError("malformed", f"result flag {ok}")
        data = cursor.rest()
        if len(data) > MAX_TEXT:
            raise ChannelError("malformed", f"reason of {len(data)} bytes")
        try:
            reason = data.decode()
        except UnicodeDecodeError:
            raise ChannelError("malformed", "reason is not UTF-8") from None
        message = Result(id_, bool(ok), reason)
    elif kind == COMMIT:
        message = Commit(cursor.u32())
    elif kind == ENDED:
        message = Ended(cursor.text(), cursor.text())
    else:
        raise ChannelError("unknown_type", f"frame type {kind}")
    cursor.end()
    return message
