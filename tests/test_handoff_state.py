"""The handoff blob: round trips, strict decoding, Hypothesis (nlbproxy.handoff.state)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.handoff.state import (
    MAGIC,
    MAX_QUEUE,
    OPT_SACK,
    OPT_TIMESTAMPS,
    OPT_WSCALE,
    VERSION,
    BlobError,
    ConnState,
    Window,
    wire_address,
    decode,
    encode,
)


def state(**changes: object) -> ConnState:
    values: dict[str, object] = dict(
        local=("10.0.0.10", 80), peer=("10.0.0.2", 40000), recv_seq=1000, send_seq=5000, mss=1448,
        options=OPT_TIMESTAMPS | OPT_SACK | OPT_WSCALE, snd_wscale=7, rcv_wscale=9, timestamp=123456,
        window=Window(900, 64000, 64000, 65535, 1000), sndbuf=87040, rcvbuf=131072,
        recv_queue=b"GET / HTTP/1.1\r\n\r\n", send_queue=b"HTTP/1.1 200 OK\r\n", unsent=5,
    )
    values.update(changes)
    return ConnState(**values)  # type: ignore[arg-type]


ips4 = st.ip_addresses(v=4).map(str)
ips6 = st.ip_addresses(v=6).map(str)
ports = st.integers(1, 65535)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def states(draw: st.DrawFn) -> ConnState:
    ips = draw(st.sampled_from([ips4, ips6]))
    options = draw(st.integers(0, 7))
    wscale = options & OPT_WSCALE
    send_queue = draw(st.binary(max_size=300))
    return ConnState(
        local=(draw(ips), draw(ports)), peer=(draw(ips), draw(ports)), recv_seq=draw(u32), send_seq=draw(u32),
        mss=draw(st.integers(1, 65535)), options=options,
        snd_wscale=draw(st.integers(0, 14)) if wscale else 0, rcv_wscale=draw(st.integers(0, 14)) if wscale else 0,
        timestamp=draw(u32) if options & OPT_TIMESTAMPS else 0,
        window=Window(draw(u32), draw(u32), draw(u32), draw(u32), draw(u32)), sndbuf=draw(u32), rcvbuf=draw(u32),
        recv_queue=draw(st.binary(max_size=300)), send_queue=send_queue,
        unsent=draw(st.integers(0, len(send_queue))),
    )


class RoundTripTests(SynchronousTestCase):
    def test_v4(self) -> None:
        s = state()
        blob = encode(s)
        self.assertTrue(blob.startswith(MAGIC + bytes([VERSION, 4])))
        self.assertEqual(decode(blob), s)

    def test_v6(self) -> None:
        s = state(local=("fd00::10", 443), peer=("fd00::2", 1234))
        self.assertEqual(s.family, 6)
        self.assertEqual(decode(encode(s)), s)

    def test_empty_queues_no_options(self) -> None:
        s = state(options=0, snd_wscale=0, rcv_wscale=0, timestamp=0, recv_queue=b"", send_queue=b"", unsent=0)
        self.assertEqual(decode(encode(s)), s)

    def test_queue_starts_wrap(self) -> None:
        s = state(recv_seq=3, send_seq=1, recv_queue=b"abcde", send_queue=b"xy", unsent=0)
        self.assertEqual(s.recv_queue_start, 2**32 - 2)
        self.assertEqual(s.send_queue_start, 2**32 - 1)

    def test_sent_and_not_sent(self) -> None:
        s = state(send_queue=b"0123456789", unsent=4)
        self.assertEqual((s.sent, s.not_sent), (b"012345", b"6789"))

    @settings(max_examples=300, deadline=None)
    @given(states())
    def test_property_round_trip(self, s: ConnState) -> None:
        self.assertEqual(decode(encode(s)), s)


class WireAddressTests(SynchronousTestCase):
    def test_ipv4_mapped_becomes_ipv4(self) -> None:
        # A dual-stack socket's IPv4 peer, as getpeername() gives it.
        self.assertEqual(wire_address(("::ffff:10.0.0.2", 40000, 0, 0)), ("10.0.0.2", 40000))

    def test_others_unchanged(self) -> None:
        self.assertEqual(wire_address(("10.0.0.2", 80)), ("10.0.0.2", 80))
        self.assertEqual(wire_address(("fd4e:4c42::2", 80, 0, 0)), ("fd4e:4c42::2", 80))
        self.assertEqual(wire_address(("fe80::1%eth0", 80, 0, 2)), ("fe80::1%eth0", 80))


class RefusedStateTests(SynchronousTestCase):
    def test_mixed_families(self) -> None:
        self.assertRaises(ValueError, state, local=("fd00::1", 80))

    def test_unsent_beyond_queue(self) -> None:
        self.assertRaises(ValueError, state, send_queue=b"ab", unsent=3)

    def test_encode_out_of_range(self) -> None:
        for bad in (state(recv_seq=2**32), state(mss=0), state(snd_wscale=15), state(local=("10.0.0.1", 0))):
            self.assertRaises(ValueError, encode, bad)

    def test_encode_scale_without_option(self) -> None:
        self.assertRaises(ValueError, encode, state(options=OPT_SACK, timestamp=0))


class MalformedBlobTests(SynchronousTestCase):
    blob = encode(state())

    def assertRefused(self, blob: bytes, words: str) -> None:
        error = self.assertRaises(BlobError, decode, blob)
        self.assertIn(words, str(error))

    def test_magic(self) -> None:
        self.assertRefused(b"HTTP" + self.blob[4:], "not a handoff blob")

    def test_version(self) -> None:
        self.assertRefused(self.blob[:4] + bytes([VERSION + 1]) + self.blob[5:], "unsupported handoff blob version")

    def test_family(self) -> None:
        self.assertRefused(self.blob[:5] + b"\x05" + self.blob[6:], "unknown address family")

    def test_option_bits(self) -> None:
        self.assertRefused(self.blob[:6] + b"\x08" + self.blob[7:], "unknown option bits")
        self.assertRefused(self.blob[:7] + b"\x01" + self.blob[8:], "reserved byte")

    def test_every_truncation(self) -> None:
        for n in range(len(self.blob)):
            self.assertRaises(BlobError, decode, self.blob[:n])

    def test_trailing_bytes(self) -> None:
        self.assertRefused(self.blob + b"x", "after the end")

    def test_huge_queue_length(self) -> None:
        s = state(recv_queue=b"", send_queue=b"", unsent=0)
        blob = encode(s)
        huge = blob[:-8] + struct.pack("!I", MAX_QUEUE + 1) + blob[-4:]
        self.assertRefused(huge, "exceeds")

    def test_inconsistent_values(self) -> None:
        s = state(send_queue=b"", unsent=0)
        blob = bytearray(encode(s))
        # unsent is the u32 just before the receive queue's length.
        at = len(blob) - 4 - len(s.recv_queue) - 4 - 4
        blob[at : at + 4] = struct.pack("!I", 1)
        self.assertRefused(bytes(blob), "unsent")

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200))
    def test_property_garbage_is_blob_error(self, data: bytes) -> None:
        try:
            decode(data)
        except BlobError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(states(), st.data())
    def test_property_flipped_byte_decodes_or_refuses(self, s: ConnState, data: st.DataObject) -> None:
        blob = bytearray(encode(s))
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
        try:
            decoded = decode(bytes(blob))
        except BlobError:
            return
        self.assertEqual(decode(encode(decoded)), decoded)
