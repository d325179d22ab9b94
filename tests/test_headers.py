"""Header rewriting between client and host (``nlbproxy.routers.headers``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.routers import headers as H
from nlbproxy.routers.headers import HOP_BY_HOP, forwarded_for

# The functions under test take and return h11's (raw, name, value) triples;
# most tests here speak in (name, value) pairs, so these adapt both ways.


def _triples(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes, bytes]]:
    return [(name, name, value) for name, value in pairs]


def request_headers(headers: list[tuple[bytes, bytes]], *args: object) -> list[tuple[bytes, bytes]]:
    return H.pairs(H.request_headers(_triples(headers), *args))  # type: ignore[arg-type]


def response_headers(headers: list[tuple[bytes, bytes]], via: bytes, upgrade: bool) -> list[tuple[bytes, bytes]]:
    return H.pairs(H.response_headers(_triples(headers), via, upgrade)[0])


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    return H.connection_tokens(_triples(headers))


def upgrade_protocol(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    return H.upgrade_protocol(_triples(headers))

VIA = b"1.1 unit1"


def rq(headers: list[tuple[bytes, bytes]], ip: str = "192.0.2.10", upgrade: bytes | None = None) -> list[tuple[bytes, bytes]]:
    return request_headers(headers, ip, b"http", VIA, b"10.0.0.1:80", upgrade)


OURS = [
    (b"x-forwarded-for", b"192.0.2.10"),
    (b"x-forwarded-proto", b"http"),
    (b"forwarded", b"for=192.0.2.10;proto=http"),
    (b"via", VIA),
]


class ConnectionTokensTests(SynchronousTestCase):
    def test_tokens(self) -> None:
        headers = [(b"connection", b"Keep-Alive, X-A ,x-b"), (b"host", b"h"), (b"connection", b"close")]
        self.assertEqual(connection_tokens(headers), frozenset({b"keep-alive", b"x-a", b"x-b", b"close"}))
        self.assertEqual(connection_tokens([]), frozenset())


class ForwardedForTests(SynchronousTestCase):
    def test_nodes(self) -> None:
        self.assertEqual(forwarded_for("192.0.2.10"), b"192.0.2.10")
        self.assertEqual(forwarded_for("2001:db8::1"), b'"[2001:db8::1]"')
        self.assertEqual(forwarded_for("::ffff:192.0.2.1"), b'"[::ffff:192.0.2.1]"')


class RequestHeadersTests(SynchronousTestCase):
    def test_plain_request(self) -> None:
        self.assertEqual(rq([(b"host", b"example.com"), (b"accept", b"*/*")]),
                         [(b"host", b"example.com"), (b"accept", b"*/*")] + OURS)

    def test_hop_by_hop_removed(self) -> None:
        headers = [(name, b"x") for name in sorted(HOP_BY_HOP) if name not in (b"connection", b"transfer-encoding")]
        headers += [(b"connection", b"keep-alive, X-Private"), (b"x-private", b"secret"), (b"host", b"h")]
        self.assertEqual(rq(headers), [(b"host", b"h")] + OURS)

    def test_forwarding_headers_appended(self) -> None:
        headers = [
            (b"host", b"h"),
            (b"x-forwarded-for", b"198.51.100.1"),
            (b"x-forwarded-for", b"198.51.100.2, 198.51.100.3"),
            (b"x-forwarded-proto", b"https"),
            (b"forwarded", b"for=198.51.100.1"),
            (b"via", b"1.0 a"),
            (b"via", b"1.1 b"),
        ]
        self.assertEqual(
            rq(headers, ip="2001:db8::7"),
            [
                (b"host", b"h"),
                (b"x-forwarded-for", b"198.51.100.1, 198.51.100.2, 198.51.100.3, 2001:db8::7"),
                (b"x-forwarded-proto", b"http"),
                (b"forwarded", b'for=198.51.100.1, for="[2001:db8::7]";proto=http'),
                (b"via", b"1.0 a, 1.1 b, 1.1 unit1"),
            ],
        )

    def test_missing_host_added(self) -> None:
        self.assertEqual(rq([(b"accept", b"*/*")]), [(b"host", b"10.0.0.1:80"), (b"accept", b"*/*")] + OURS)

    def test_host_goes_first(self) -> None:
        self.assertEqual(rq([(b"accept", b"*/*"), (b"host", b"h")]), [(b"host", b"h"), (b"accept", b"*/*")] + OURS)

    def test_framing(self) -> None:
        self.assertEqual(
            rq([(b"host", b"h"), (b"transfer-encoding", b"chunked")]),
            [(b"host", b"h"), (b"transfer-encoding", b"chunked")] + OURS,
        )
        self.assertEqual(
            rq([(b"host", b"h"), (b"content-length", b"5")]), [(b"host", b"h"), (b"content-length", b"5")] + OURS
        )

    def test_content_length_survives_connection_token(self) -> None:
        headers = [(b"host", b"h"), (b"connection", b"content-length, x-a"), (b"content-length", b"5"), (b"x-a", b"1")]
        self.assertEqual(rq(headers), [(b"host", b"h"), (b"content-length", b"5")] + OURS)

    def test_upgrade_kept_for_tunnel(self) -> None:
        headers = [(b"host", b"h"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
        self.assertEqual(
            rq(headers, upgrade=b"websocket"),
            [(b"host", b"h"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")] + OURS,
        )

    @settings(derandomize=True, max_examples=300)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(sorted(HOP_BY_HOP) + [b"host", b"x-a", b"x-forwarded-for", b"via", b"forwarded", b"accept"]),
                st.sampled_from([b"", b"x", b"x-a", b"keep-alive, x-a", b"chunked", b"1.2.3.4"]),
            ),
            max_size=12,
        )
    )
    def test_property_no_hop_by_hop_and_one_of_each(self, headers: list[tuple[bytes, bytes]]) -> None:
        out = rq(headers)
        names = [name for name, _ in out]
        dropped = (HOP_BY_HOP | connection_tokens(headers)) - {b"transfer-encoding", b"host"}
        self.assertFalse(dropped & set(names), out)
        for name in (b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via"):
            self.assertEqual(names.count(name), 1, out)
        self.assertGreaterEqual(names.count(b"host"), 1)
        self.assertEqual(out[-1], (b"via", dict(out)[b"via"]))
        self.assertTrue(dict(out)[b"via"].endswith(VIA))
        self.assertTrue(dict(out)[b"x-forwarded-for"].endswith(b"192.0.2.10"))
        if any(name == b"transfer-encoding" for name, _ in headers):
            self.assertEqual([v for n, v in out if n == b"transfer-encoding"], [b"chunked"])


class ResponseHeadersTests(SynchronousTestCase):
    def test_response(self) -> None:
        headers = [
            (b"content-type", b"text/html"),
            (b"connection", b"close, X-Node"),
            (b"x-node", b"7"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"via", b"1.1 app"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ]
        self.assertEqual(
            response_headers(headers, VIA, False),
            [
                (b"content-type", b"text/html"),
                (b"transfer-encoding", b"chunked"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
                (b"via", b"1.1 app, 1.1 unit1"),
            ],
        )

    def test_switching_protocols(self) -> None:
        headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", b"k")]
        self.assertEqual(
            response_headers(headers, VIA, True),
            [(b"sec-websocket-accept", b"k"), (b"upgrade", b"websocket"), (b"connection", b"upgrade"), (b"via", VIA)],
        )


class UpgradeProtocolTests(SynchronousTestCase):
    def test_upgrade_protocol(self) -> None:
        self.assertEqual(upgrade_protocol([(b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"websocket")]), b"websocket")
        self.assertIsNone(upgrade_protocol([(b"upgrade", b"websocket")]))
        self.assertIsNone(upgrade_protocol([(b"connection", b"upgrade")]))
        self.assertIsNone(upgrade_protocol([]))


class RawCasingTests(SynchronousTestCase):
    def test_names_keep_the_casing_the_peer_sent(self) -> None:
        out = H.request_headers(
            [(b"Content-Type", b"content-type", b"text/plain"), (b"X-Custom-ID", b"x-custom-id", b"7")],
            "192.0.2.10", b"http", VIA, b"10.0.0.1:80", None,
        )
        self.assertEqual(out[1:3], [(b"Content-Type", b"content-type", b"text/plain"),
                                    (b"X-Custom-ID", b"x-custom-id", b"7")])
        back = H.response_headers([(b"ETag", b"etag", b'"x"'), (b"Connection", b"connection", b"ETag")], VIA, False)
        self.assertEqual(back, ([(b"via", b"via", VIA)], False))

    def test_ambiguous_framing_drops_content_length(self) -> None:
        out, ambiguous = H.response_headers(
            [(b"Content-Length", b"content-length", b"5"),
             (b"Transfer-Encoding", b"transfer-encoding", b"chunked")], VIA, False)
        self.assertTrue(ambiguous)
        self.assertEqual(out, [(b"Transfer-Encoding", b"transfer-encoding", b"chunked"), (b"via", b"via", VIA)])


class SetCookieTests(SynchronousTestCase):
    def sc(self, *values: bytes) -> tuple[bytes, bool] | None:
        return H.set_cookie([(b"Set-Cookie", b"set-cookie", v) for v in values], b"JSESSIONID")

    def test_value_and_deletion(self) -> None:
        self.assertEqual(self.sc(b"JSESSIONID=abc; Path=/; HttpOnly"), (b"abc", False))
        self.assertEqual(self.sc(b'JSESSIONID="q"'), (b"q", False))
        self.assertEqual(self.sc(b"JSESSIONID=abc; Max-Age=0"), (b"abc", True))
        self.assertEqual(self.sc(b"JSESSIONID=; Path=/"), (b"", True))
        self.assertEqual(self.sc(b"JSESSIONID=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT"), (b"x", True))
        self.assertEqual(self.sc(b"JSESSIONID=x; Max-Age=bogus"), (b"x", False))

    def test_other_cookies_and_last_wins(self) -> None:
        self.assertIsNone(self.sc(b"OTHER=1", b"JSESSIONIDX=2"))
        self.assertEqual(self.sc(b"JSESSIONID=a", b"OTHER=1", b"JSESSIONID=b"), (b"b", False))

    @given(st.binary(max_size=200))
    @settings(max_examples=200, deadline=None)
    def test_never_raises(self, value: bytes) -> None:
        self.sc(value)
