"""Event scripts for the HTTP router core (``nlbproxy.routers``) against fakes.

Each test is a script: the client sends X, a backend receives Y, answers Z,
the client receives W, asserting exact bytes, statuses and states.  Nothing
touches the network or real time: see :mod:`tests.fakes`.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import limits
from nlbproxy.classifier import DRAINING, INACTIVE
from nlbproxy.config import RouteConfig
from nlbproxy.routing import Decision, MaybeDecision, Refusal, RequestView, Rule
from tests.fakes import Backend, Client, Harness, parse_message, pool, route

A = "10.0.0.1:8080"
B = "10.0.0.2:8080"
C = "10.0.0.3:8080"
STATIC = "10.0.0.9:8080"
CLIENT_IP = b"192.0.2.10"


def fwd(ip: bytes = CLIENT_IP, proto: bytes = b"http", node: bytes | None = None) -> bytes:
    """The headers the unit appends to every forwarded request."""
    node = ip if node is None else node
    return (
        b"x-forwarded-for: " + ip + b"\r\n"
        b"x-forwarded-proto: " + proto + b"\r\n"
        b"forwarded: for=" + node + b";proto=" + proto + b"\r\n"
        b"via: 1.1 unit1\r\n"
    )


def get(target: bytes = b"/", host: bytes = b"example.com", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


def upstream_get(target: bytes = b"/", host: bytes = b"example.com", extra: bytes = b"", ip: bytes = CLIENT_IP) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + fwd(ip) + b"\r\n"


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body


def relayed_ok(body: bytes = b"ok", after: bytes = b"") -> bytes:
    """``ok(body)`` as the client gets it; ``after`` are headers the unit adds after Via."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        b"via: 1.1 unit1\r\n" + after + b"\r\n" + body
    )


def local(status: int, reason: bytes, body: bytes, close: bool = False) -> bytes:
    """An answer the unit makes itself."""
    return (
        b"HTTP/1.1 " + str(status).encode() + b" " + reason + b"\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"cache-control: no-store\r\n" + (b"connection: close\r\n" if close else b"") + b"\r\n" + body
    )


def roundtrip(h: Harness, client: Client, request: bytes, response: bytes = ok()) -> str:
    """Send ``request``, let whichever backend gets it answer; the backend's key."""
    client.send(request)
    backend = h.next_backend()
    backend.received()
    backend.send(response)
    return backend.key


class KeepAliveTests(SynchronousTestCase):
    def test_two_requests_reuse_one_backend_connection(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get(b"/one"))
        self.assertEqual([a.key for a in h.attempts()], [A])
        b = h.accept()
        self.assertEqual(b.received(), upstream_get(b"/one"))
        b.send(ok(b"one"))
        self.assertEqual(c.received(), relayed_ok(b"one"))
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))

        c.send(get(b"/two"))
        self.assertEqual(h.attempts(), [])
        self.assertEqual(b.received(), upstream_get(b"/two"))
        b.send(ok(b"two"))
        self.assertEqual(c.received(), relayed_ok(b"two"))
        self.assertEqual(len(h.backends), 1)
        self.assertFalse(c.closed)
        self.assertFalse(b.closed)
        self.assertEqual(h.access_log, [(b"GET", b"/one", 200), (b"GET", b"/two", 200)])

    def test_each_request_routed_on_its_own(self) -> None:
        h = Harness(
            pools=[pool("web", A), pool("static", STATIC)],
            routes=[route("static", path_prefix="/static/")],
        )
        c = h.client()
        c.send(get(b"/index.html"))
        web = h.accept()
        self.assertEqual(web.key, A)
        self.assertEqual(web.received(), upstream_get(b"/index.html"))
        web.send(ok(b"page"))
        self.assertEqual(c.received(), relayed_ok(b"page"))

        c.send(get(b"/static/logo.png"))
        static = h.accept()
        self.assertEqual(static.key, STATIC)
        self.assertEqual(web.received(), b"")
        self.assertEqual(static.received(), upstream_get(b"/static/logo.png"))
        static.send(ok(b"png"))
        self.assertEqual(c.received(), relayed_ok(b"png"))
        self.assertEqual(h.host(A).stats.requests, 1)
        self.assertEqual(h.host(STATIC, "static").stats.requests, 1)

    def test_max_requests_per_connection(self) -> None:
        h = Harness(max_requests_per_connection=2)
        c = h.client()
        roundtrip(h, c, get(b"/1"))
        self.assertEqual(c.received(), relayed_ok())
        self.assertFalse(c.closed)
        roundtrip(h, c, get(b"/2"))
        # The last answer says so.
        self.assertEqual(c.received(), relayed_ok().replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"))
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)

    def test_backend_connection_close_is_its_own_hop(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(ok(extra=b"Connection: close\r\n"))
        self.assertEqual(c.received(), relayed_ok())
        self.assertTrue(b.closed)
        self.assertFalse(b.aborted)
        self.assertFalse(c.closed)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))
        c.send(get(b"/2"))
        self.assertEqual([x.key for x in h.attempts()], [A])

    def test_ambiguous_backend_framing_is_read_by_chunks_and_not_reused(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nok\r\n0\r\n\r\n")
        # RFC 9112 section 6.3: Transfer-Encoding wins, Content-Length is dropped ...
        self.assertEqual(
            c.received(),
            b"HTTP/1.1 200 OK\r\nvia: 1.1 unit1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )
        # ... and the host is not trusted with another request on that connection.
        self.assertTrue(b.closed)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))

    def test_idle_client_half_close(self) -> None:
        h = Harness()
        c = h.client()
        roundtrip(h, c, get())
        c.shutdown_write()
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)

    def test_half_closed_client_still_gets_its_answer(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        c.shutdown_write()
        b = h.accept()
        self.assertEqual(b.received(), upstream_get())
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)


class PipeliningTests(SynchronousTestCase):
    def test_pipelined_requests_answered_in_order(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get(b"/first") + get(b"/second"))
        self.assertEqual(c.pauser_reasons, {"pipeline"})
        self.assertTrue(c.paused)
        b = h.accept()
        self.assertEqual(b.received(), upstream_get(b"/first"))

        # More bytes while paused wait in the socket, as with a real transport.
        c.send(get(b"/third"))
        self.assertEqual(b.received(), b"")

        b.send(ok(b"1"))
        self.assertEqual(b.received(), upstream_get(b"/second"))
        self.assertEqual(c.received(), relayed_ok(b"1"))
        self.assertEqual(c.pauser_reasons, {"pipeline"})
        b.send(ok(b"2"))
        self.assertEqual(c.received(), relayed_ok(b"2"))
        self.assertEqual(b.received(), upstream_get(b"/third"))
        b.send(ok(b"3"))
        self.assertEqual(c.received(), relayed_ok(b"3"))
        self.assertEqual(c.pauser_reasons, set())
        self.assertFalse(c.paused)
        self.assertEqual(len(h.backends), 1)
        self.assertEqual([t for _m, t, _s in h.access_log], [b"/first", b"/second", b"/third"])


class HeaderRewritingTests(SynchronousTestCase):
    def test_request_headers(self) -> None:
        h = Harness()
        c = h.client()
        c.send(
            b"GET /a?b=c HTTP/1.1\r\n"
            b"Host: Example.com:8080\r\n"
            b"Connection: keep-alive, X-Secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Secret: 42\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-Sum\r\n"
            b"Upgrade: h2c\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"X-Forwarded-For: 198.51.100.7\r\n"
            b"X-Forwarded-Proto: https\r\n"
            b"Forwarded: for=198.51.100.7\r\n"
            b"Via: 1.0 edge\r\n"
            b"User-Agent: script\r\n"
            b"\r\n"
        )
        b = h.accept()
        self.assertEqual(
            b.received(),
            b"GET /a?b=c HTTP/1.1\r\n"
            b"Host: Example.com:8080\r\n"
            b"User-Agent: script\r\n"
            b"x-forwarded-for: 198.51.100.7, 192.0.2.10\r\n"
            b"x-forwarded-proto: http\r\n"
            b"forwarded: for=198.51.100.7, for=192.0.2.10;proto=http\r\n"
            b"via: 1.0 edge, 1.1 unit1\r\n"
            b"\r\n",
        )

    def test_ipv6_client(self) -> None:
        h = Harness()
        c = h.client(ip="2001:db8::1")
        c.send(get())
        b = h.accept()
        self.assertEqual(
            b.received(),
            b"GET / HTTP/1.1\r\nHost: example.com\r\n"
            + fwd(b"2001:db8::1", node=b'"[2001:db8::1]"') + b"\r\n",
        )

    def test_https_listener(self) -> None:
        h = Harness(scheme=b"https")
        c = h.client()
        c.send(get())
        b = h.accept()
        self.assertEqual(
            b.received(), b"GET / HTTP/1.1\r\nHost: example.com\r\n" + fwd(proto=b"https") + b"\r\n"
        )

    def test_response_headers(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Length: 2\r\n"
            b"Connection: X-Internal\r\n"
            b"X-Internal: node-7\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Trailer: X-Sum\r\n"
            b"Via: 1.1 app\r\n"
            b"Server: app\r\n"
            b"\r\nok"
        )
        self.assertEqual(
            c.received(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: app\r\nvia: 1.1 app, 1.1 unit1\r\n\r\nok",
        )
        # The backend's Connection header was about its own hop: both stay open.
        self.assertFalse(c.closed)
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))

    def test_http10_request_without_host_gets_one(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"GET /old HTTP/1.0\r\nUser-Agent: old\r\n\r\n")
        b = h.accept()
        self.assertEqual(
            b.received(),
            b"GET /old HTTP/1.1\r\nhost: 10.0.0.1:8080\r\nUser-Agent: old\r\n" + fwd() + b"\r\n",
        )
        b.send(ok())
        self.assertEqual(
            c.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nvia: 1.1 unit1\r\nConnection: close\r\n\r\nok"
        )
        self.assertTrue(c.closed)
        # The backend connection was HTTP/1.1 and stays pooled.
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))

    def test_content_length_listed_in_connection_is_kept(self) -> None:
        # Dropping it would make the host see a request without a body, and
        # made h11 refuse to forward the body (an exception in dataReceived).
        h = Harness()
        c = h.client()
        c.send(b"POST /f HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello")
        b = h.accept()
        self.assertEqual(
            b.received(), b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" + fwd() + b"\r\nhello"
        )
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())


class BodyTests(SynchronousTestCase):
    def test_chunked_request_body_streamed(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        b = h.accept()
        # The body held while connecting goes out at once, then the rest as it comes.
        self.assertEqual(
            b.received(),
            b"POST /up HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n" + fwd() + b"\r\n5\r\nhello\r\n",
        )
        c.send(b"6\r\n world\r\n")
        self.assertEqual(b.received(), b"6\r\n world\r\n")
        c.send(b"0\r\nX-Trailer: t\r\n\r\n")
        self.assertEqual(b.received(), b"0\r\n\r\n")
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())
        self.assertEqual(h.host(A).stats.bytes_out, 11)

    def test_content_length_body_streamed(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        b = h.accept()
        self.assertEqual(
            b.received(), b"PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" + fwd() + b"\r\nhello"
        )
        c.send(b"wor")
        self.assertEqual(b.received(), b"wor")
        c.send(b"ld")
        self.assertEqual(b.received(), b"ld")
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())

    def test_chunked_response_relayed(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.assertEqual(
            c.received(), b"HTTP/1.1 200 OK\r\nvia: 1.1 unit1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        b.send(b"2\r\nde\r\n0\r\n\r\n")
        self.assertEqual(c.received(), b"2\r\nde\r\n0\r\n\r\n")
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))

    def test_read_until_close_response_becomes_chunked(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello")
        self.assertEqual(
            c.received(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nvia: 1.1 unit1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        b.send(b" world")
        self.assertEqual(c.received(), b"6\r\n world\r\n")
        b.shutdown_write()
        self.assertEqual(c.received(), b"0\r\n\r\n")
        self.assertFalse(c.closed)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))

    def test_read_until_close_http11_response_not_pooled(self) -> None:
        # h11 would start a next cycle on this connection: it must not be
        # released to the idle list once its host closed it.
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\n\r\nhello")
        b.shutdown_write()
        self.assertEqual(
            c.received(),
            b"HTTP/1.1 200 OK\r\nvia: 1.1 unit1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))
        c.send(get(b"/next"))
        self.assertEqual([a.key for a in h.attempts()], [A])

    def test_trailers_relayed_to_http11_client(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Sum: 7\r\n\r\n")
        self.assertEqual(
            c.received(),
            b"HTTP/1.1 200 OK\r\nvia: 1.1 unit1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\nX-Sum: 7\r\n\r\n",
        )

    def test_trailers_dropped_for_http10_client(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Sum: 7\r\n\r\n")
        self.assertEqual(c.received(), b"HTTP/1.1 200 OK\r\nvia: 1.1 unit1\r\nConnection: close\r\n\r\nhi")
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))

    def test_head_response_has_no_body(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"HEAD /big HTTP/1.1\r\nHost: x\r\n\r\n")
        b = h.accept()
        self.assertEqual(b.received(), b"HEAD /big HTTP/1.1\r\nHost: x\r\n" + fwd() + b"\r\n")
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        self.assertEqual(c.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nvia: 1.1 unit1\r\n\r\n")
        # Complete: the next request reuses the backend connection.
        c.send(get())
        self.assertEqual(b.received(), upstream_get(host=b"example.com"))
        self.assertEqual(h.attempts(), [])

    def test_204_and_304(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"DELETE /x HTTP/1.1\r\nHost: x\r\n\r\n")
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(c.received(), b"HTTP/1.1 204 No Content\r\nvia: 1.1 unit1\r\n\r\n")
        c.send(get(extra=b'If-None-Match: "v1"\r\n'))
        self.assertEqual(b.received(), upstream_get(extra=b'If-None-Match: "v1"\r\n'))
        b.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n')
        self.assertEqual(
            c.received(),
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\nvia: 1.1 unit1\r\n\r\n',
        )
        self.assertFalse(c.closed)
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))
        self.assertEqual([s for _m, _t, s in h.access_log], [204, 304])

    def test_expect_100_continue_relayed(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"POST /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        b = h.accept()
        self.assertEqual(
            b.received(),
            b"POST /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n" + fwd() + b"\r\n",
        )
        b.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(c.received(), b"HTTP/1.1 100 Continue\r\nvia: 1.1 unit1\r\n\r\n")
        c.send(b"hello")
        self.assertEqual(b.received(), b"hello")
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())

    def test_no_1xx_to_http10_client(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"POST /f HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(c.received(), b"")
        c.send(b"hello")
        self.assertEqual(b.received(), b"hello")
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok(after=b"Connection: close\r\n"))

    def test_early_hints_lose_hop_by_hop_headers(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\n"
            + ok()
        )
        self.assertEqual(
            c.received(),
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nvia: 1.1 unit1\r\n\r\n" + relayed_ok(),
        )

    def test_early_response_drops_rest_of_body(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        self.assertEqual(c.received(), b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nvia: 1.1 unit1\r\n\r\nno")
        # The host stopped reading the body mid-way: its connection cannot be reused.
        self.assertTrue(b.closed)
        c.send(b"world")
        self.assertEqual(c.received(), b"")
        roundtrip(h, c, get())
        self.assertEqual(c.received(), relayed_ok())


class UpgradeTests(SynchronousTestCase):
    REQUEST = (
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )

    def tunnel(self, h: Harness) -> tuple[Client, Backend]:
        c = h.client()
        c.send(self.REQUEST + b"early")
        self.assertEqual(c.pauser_reasons, {"pipeline"})
        b = h.accept()
        self.assertEqual(
            b.received(),
            b"GET /chat HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nconnection: upgrade\r\nupgrade: websocket\r\n" + fwd() + b"\r\n",
        )
        b.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello"
        )
        self.assertEqual(
            c.received(),
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
            b"Upgrade: websocket\r\nconnection: upgrade\r\nvia: 1.1 unit1\r\n\r\nhello",
        )
        self.assertEqual(b.received(), b"early")
        self.assertEqual(c.pauser_reasons, set())
        return c, b

    def test_websocket_tunnel(self) -> None:
        h = Harness()
        c, b = self.tunnel(h)
        c.send(b"\x81\x05ping!")
        self.assertEqual(b.received(), b"\x81\x05ping!")
        b.send(b"\x81\x05pong!")
        self.assertEqual(c.received(), b"\x81\x05pong!")
        b.close()
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)
        self.assertEqual(h.access_log, [(b"GET", b"/chat", 101)])

    def test_client_closing_tunnel_closes_backend_gracefully(self) -> None:
        h = Harness()
        c, b = self.tunnel(h)
        c.send(b"bye")
        c.close()
        self.assertEqual(b.received(), b"bye")
        self.assertTrue(b.closed)
        self.assertFalse(b.aborted)
        self.assertEqual(h.access_log, [(b"GET", b"/chat", 101)])

    def test_half_close_passes_through_tunnel(self) -> None:
        h = Harness()
        c, b = self.tunnel(h)
        c.shutdown_write()
        self.assertTrue(b.transport.write_closed)
        self.assertFalse(c.closed)

    def test_tunnel_outlives_server_timeout(self) -> None:
        # Before: the backend's server_timeout fired in the tunnel and re-sent
        # the upgrade request to another host while the client was tunnelling.
        h = Harness(pools=[pool("web", A, B, server_timeout=5.0)])
        c, b = self.tunnel(h)
        for _ in range(4):
            h.advance(4)
            c.send(b"x")
        h.advance(30)
        self.assertEqual(h.attempts(), [])
        self.assertFalse(b.closed)
        self.assertFalse(c.closed)
        self.assertEqual(h.health(A), "up")
        self.assertEqual(b.received(), b"xxxx")

    def test_tunnel_timeout_counts_both_directions(self) -> None:
        h = Harness()
        c, b = self.tunnel(h)
        h.advance(limits.TUNNEL_TIMEOUT - 1)
        b.send(b"server push")
        h.advance(limits.TUNNEL_TIMEOUT - 1)
        self.assertFalse(c.closed)
        self.assertEqual(c.received(), b"server push")
        h.advance(1)
        self.assertTrue(c.closed)
        self.assertTrue(b.closed)

    def test_upgrade_refused_is_a_normal_response(self) -> None:
        h = Harness()
        c = h.client()
        c.send(self.REQUEST)
        b = h.accept()
        b.received()
        b.send(ok(b"no"))
        self.assertEqual(c.received(), relayed_ok(b"no"))
        self.assertEqual(c.pauser_reasons, set())
        roundtrip(h, c, get())
        self.assertEqual(c.received(), relayed_ok())


class SmugglingTests(SynchronousTestCase):
    def assertRejected(self, request: bytes, status: int, reason: bytes, body: bytes) -> None:
        h = Harness()
        c = h.client()
        c.send(request)
        self.assertEqual(c.received(), local(status, reason, body, close=True))
        self.assertTrue(c.closed)
        self.assertEqual(h.attempts(), [])
        self.assertEqual(h.listener.stats.rejected, {status: 1})

    def test_content_length_and_transfer_encoding(self) -> None:
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
            400, b"Bad Request", b"both Content-Length and Transfer-Encoding\n",
        )

    def test_conflicting_content_length(self) -> None:
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400, b"Bad Request", b"conflicting Content-Length headers\n",
        )
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!",
            400, b"Bad Request", b"conflicting Content-Length headers\n",
        )

    def test_invalid_content_length(self) -> None:
        for value in (b"abc", b"-1", b"+5", b"0x10"):
            self.assertRejected(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n",
                400, b"Bad Request", b"bad Content-Length\n",
            )

    def test_transfer_encoding_other_than_chunked(self) -> None:
        for value in (b"gzip", b"gzip, chunked", b"identity"):
            self.assertRejected(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + value + b"\r\n\r\n",
                501, b"Not Implemented", b"Only Transfer-Encoding: chunked is supported\n",
            )

    def test_connect_refused(self) -> None:
        self.assertRejected(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            405, b"Method Not Allowed", b"CONNECT is not supported\n",
        )


class LimitTests(SynchronousTestCase):
    def test_headers_over_max_header_bytes_incomplete(self) -> None:
        h = Harness(max_header_bytes=2048)
        c = h.client()
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000)
        self.assertEqual(c.received(), local(431, b"Request Header Fields Too Large", b"Receive buffer too long\n", True))
        self.assertTrue(c.closed)
        self.assertEqual(h.attempts(), [])

    def test_headers_over_max_header_bytes_in_one_read(self) -> None:
        h = Harness(max_header_bytes=2048)
        c = h.client()
        c.send(get(extra=b"X-Big: " + b"a" * 3000 + b"\r\n"))
        status, headers, _body = parse_message(c.received())
        self.assertEqual(status, 431)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(c.closed)
        self.assertEqual(h.attempts(), [])

    def test_target_over_max_request_line(self) -> None:
        h = Harness(max_request_line=256)
        c = h.client()
        c.send(get(b"/" + b"a" * 256))
        self.assertEqual(c.received(), local(414, b"URI Too Long", b"request target too long\n", close=True))
        self.assertTrue(c.closed)
        self.assertEqual(h.attempts(), [])

    def test_target_at_max_request_line_passes(self) -> None:
        h = Harness(max_request_line=256)
        c = h.client()
        target = b"/" + b"a" * 255
        c.send(get(target))
        self.assertEqual(h.accept().received(), upstream_get(target))

    def test_content_length_over_max_body_bytes(self) -> None:
        h = Harness(max_body_bytes=1000)
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        self.assertEqual(c.received(), local(413, b"Content Too Large", b"request body too large\n", close=True))
        self.assertTrue(c.closed)
        self.assertEqual(h.attempts(), [])

    def test_chunked_body_over_max_body_bytes(self) -> None:
        h = Harness(max_body_bytes=10)
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n")
        b = h.accept()
        self.assertEqual(
            b.received(),
            b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n" + fwd() + b"\r\n6\r\nhello \r\n",
        )
        c.send(b"5\r\nworld\r\n")
        self.assertEqual(c.received(), local(413, b"Content Too Large", b"request body too large\n", close=True))
        self.assertTrue(c.closed)
        # The host saw part of a body: its connection is dropped, not reused.
        self.assertEqual(b.received(), b"")
        self.assertTrue(b.aborted)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))
        self.assertEqual(h.host(A).active_requests, 0)

    def test_chunked_body_over_max_body_bytes_while_connecting(self) -> None:
        h = Harness(max_body_bytes=10)
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n")
        self.assertEqual(c.received(), local(413, b"Content Too Large", b"request body too large\n", close=True))
        self.assertTrue(c.closed)
        # The connection being opened is kept for later requests.
        b = h.accept()
        self.assertEqual(b.received(), b"")
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))
        self.assertEqual(h.host(A).active_requests, 0)

    def test_malformed_request_line(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"HELLO\r\n\r\n")
        status, headers, body = parse_message(c.received())
        self.assertEqual((status, headers[b"connection"]), (400, [b"close"]))
        self.assertTrue(body.startswith(b"illegal request line"))
        self.assertTrue(c.closed)
        self.assertEqual(h.attempts(), [])

    def test_pending_body_limit_pauses_client(self) -> None:
        h = Harness()
        c = h.client()
        size = limits.MAX_PENDING_BODY + 1
        c.send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(size + 1).encode() + b"\r\n\r\n")
        c.send(b"a" * size)
        self.assertEqual(c.pauser_reasons, {"connecting"})
        self.assertTrue(c.paused)
        b = h.accept()
        self.assertEqual(c.pauser_reasons, set())
        self.assertTrue(b.received().endswith(b"\r\n\r\n" + b"a" * size))
        c.send(b"z")
        self.assertEqual(b.received(), b"z")


class FailureTests(SynchronousTestCase):
    def test_connect_refused_retried_on_other_host(self) -> None:
        h = Harness(pools=[pool("web", A, B, fail_timeout=10.0)])
        c = h.client()
        c.send(get())
        self.assertEqual([a.key for a in h.attempts()], [A])
        h.refuse()
        self.assertEqual([a.key for a in h.attempts()], [B])
        b = h.accept()
        self.assertEqual(b.received(), upstream_get())
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())
        self.assertEqual(h.health(A), "down")
        self.assertTrue(h.host(A).down_reason.startswith("connect_refused: "))
        self.assertEqual(h.host(A).stats.errors["connect_refused"], 1)
        self.assertEqual(h.host(A).stats.retries, 1)

        # While A is down every request goes to B.
        h.advance(9.9)
        self.assertEqual(h.health(A), "down")
        self.assertEqual(roundtrip(h, h.client(), get()), B)
        h.advance(0.1)
        self.assertEqual(h.health(A), "up")
        self.assertEqual(h.host(A).active_requests, 0)
        # Back in the rotation.
        keys = {roundtrip(h, h.client(), get()) for _ in range(2)}
        self.assertEqual(keys, {A, B})

    def test_connect_refused_retry_keeps_request_body(self) -> None:
        h = Harness(pools=[pool("web", A, B)])
        c = h.client()
        c.send(b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        h.refuse()
        c.send(b"world")
        b = h.accept()
        self.assertEqual(b.key, B)
        self.assertEqual(
            b.received(), b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" + fwd() + b"\r\nhelloworld"
        )
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())

    def test_all_hosts_refuse(self) -> None:
        h = Harness(pools=[pool("web", A, B)])
        c = h.client()
        c.send(get())
        h.refuse()
        h.refuse()
        self.assertEqual(h.attempts(), [])
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"connect_refused\n"))
        # The request was read whole: the connection stays usable.
        self.assertFalse(c.closed)
        self.assertEqual((h.health(A), h.health(B)), ("down", "down"))
        self.assertEqual(h.access_log, [(b"GET", b"/", 502)])

    def test_pipelined_request_after_local_error(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get(b"/1") + get(b"/2"))
        h.refuse()
        # /2 is read in turn, and finds no host up.
        self.assertEqual(
            c.received(),
            local(502, b"Bad Gateway", b"connect_refused\n")
            + local(503, b"Service Unavailable", b"no host available\n"),
        )
        self.assertFalse(c.closed)
        self.assertEqual(h.attempts(), [])
        self.assertEqual(
            h.access_log, [(b"GET", b"/1", 502), (b"GET", b"/2", 503)]
        )

    def test_retries_limit(self) -> None:
        h = Harness(pools=[pool("web", A, B, C, retries=1)])
        c = h.client()
        c.send(get())
        h.refuse()
        h.refuse()
        self.assertEqual(h.attempts(), [])
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"connect_refused\n"))
        self.assertEqual(h.health(C), "up")

    def test_connect_timeout(self) -> None:
        h = Harness(pools=[pool("web", A, connect_timeout=3.0)])
        c = h.client()
        c.send(get())
        self.assertEqual(h.attempts()[0].timeout, 3.0)
        h.time_out()
        self.assertEqual(c.received(), local(504, b"Gateway Timeout", b"connect_timeout\n"))
        self.assertEqual(h.health(A), "down")

    def test_reset_before_response_retried_for_get(self) -> None:
        h = Harness(pools=[pool("web", A, B)])
        c = h.client()
        c.send(get())
        a = h.accept()
        self.assertEqual(a.received(), upstream_get())
        a.reset()
        self.assertEqual([x.key for x in h.attempts()], [B])
        b = h.accept()
        self.assertEqual(b.received(), upstream_get())
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())
        self.assertEqual(h.health(A), "down")
        self.assertEqual(h.host(A).stats.errors["reset"], 1)

    def test_reset_of_reused_connection_retried_on_same_host(self) -> None:
        # The keep-alive race: the host closed an idle connection as we reused it.
        h = Harness(pools=[pool("web", A, B)])
        c = h.client()
        self.assertEqual(roundtrip(h, c, get()), A)
        c.received()
        h.pool("web").set_directive(h.host(B), DRAINING, "test")
        c.send(get(b"/2"))
        a = h.backends[0]
        self.assertEqual(a.received(), upstream_get(b"/2"))
        a.reset()
        self.assertEqual([x.key for x in h.attempts()], [A])
        self.assertEqual(h.health(A), "up")
        fresh = h.accept()
        self.assertEqual(fresh.received(), upstream_get(b"/2"))
        fresh.send(ok())
        self.assertEqual(c.received(), relayed_ok())

    def test_reset_after_request_body_not_retried(self) -> None:
        h = Harness(pools=[pool("web", A, B)])
        c = h.client()
        c.send(b"POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        a = h.accept()
        self.assertEqual(a.received(), b"POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" + fwd() + b"\r\nhello")
        a.reset()
        self.assertEqual(h.attempts(), [])
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"reset\n"))
        self.assertEqual(h.access_log, [(b"POST", b"/order", 502)])

    def test_post_without_body_not_retried_after_reset(self) -> None:
        h = Harness(pools=[pool("web", A, B)])
        c = h.client()
        c.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        h.accept().reset()
        self.assertEqual(h.attempts(), [])
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"reset\n"))

    def test_server_timeout(self) -> None:
        h = Harness(pools=[pool("web", A, server_timeout=5.0)])
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        h.advance(4.9)
        self.assertEqual(c.received(), b"")
        h.advance(0.1)
        self.assertEqual(c.received(), local(504, b"Gateway Timeout", b"timeout\n"))
        self.assertTrue(b.aborted)
        self.assertEqual(h.health(A), "down")
        self.assertFalse(c.closed)

    def test_server_timeout_counts_from_last_byte(self) -> None:
        h = Harness(pools=[pool("web", A, server_timeout=5.0)])
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        h.advance(4)
        b.send(b"c")
        h.advance(4)
        self.assertFalse(b.closed)
        h.advance(1)
        # Too late for a clean answer: the client sees a cut connection.
        self.assertTrue(c.aborted)
        self.assertTrue(b.aborted)

    def test_reset_mid_response_aborts_client(self) -> None:
        h = Harness(pools=[pool("web", A, B)])
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.assertEqual(c.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nvia: 1.1 unit1\r\n\r\nhello")
        b.reset()
        self.assertTrue(c.closed)
        self.assertTrue(c.aborted)
        self.assertEqual(h.attempts(), [])
        self.assertEqual(h.access_log, [(b"GET", b"/", 200)])
        self.assertEqual(h.host(A).active_requests, 0)

    def test_malformed_response(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 2xx What\r\n\r\n")
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"bad_response\n"))
        # The connection is useless now: it must not linger, counted as open.
        self.assertTrue(b.aborted)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))
        self.assertEqual(h.host(A).stats.errors["bad_response"], 1)

    def test_unsolicited_bytes_on_idle_connection(self) -> None:
        h = Harness()
        c = h.client()
        roundtrip(h, c, get())
        b = h.backends[0]
        b.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(b.aborted)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))

    def test_no_active_hosts(self) -> None:
        h = Harness(pools=[pool("web", A, B)])
        web = h.pool("web")
        web.set_directive(h.host(A), INACTIVE, "test")
        web.set_directive(h.host(B), DRAINING, "test")
        c = h.client()
        c.send(get())
        # A bodiless request answered early keeps its connection.
        self.assertEqual(c.received(), local(503, b"Service Unavailable", b"no host available\n"))
        self.assertFalse(c.closed)
        self.assertEqual(h.attempts(), [])
        self.assertEqual(h.access_log, [(b"GET", b"/", 503)])

    def test_queue_when_host_connections_full(self) -> None:
        h = Harness(pools=[pool("web", A, max_conns_per_host=1, max_queue_per_host=1, connect_timeout=2.0)])
        first, second, third = h.client(), h.client(), h.client()
        first.send(get(b"/1"))
        second.send(get(b"/2"))
        third.send(get(b"/3"))
        self.assertEqual(third.received(), local(503, b"Service Unavailable", b"queue_full\n"))
        self.assertFalse(third.closed)
        self.assertEqual(len(h.attempts()), 1)
        b = h.accept()
        self.assertEqual(b.received(), upstream_get(b"/1"))
        b.send(ok(b"1"))
        self.assertEqual(first.received(), relayed_ok(b"1"))
        self.assertEqual(b.received(), upstream_get(b"/2"))
        b.send(ok(b"2"))
        self.assertEqual(second.received(), relayed_ok(b"2"))

    def test_queue_timeout(self) -> None:
        h = Harness(pools=[pool("web", A, max_conns_per_host=1, connect_timeout=2.0, retries=0)])
        first, second = h.client(), h.client()
        first.send(get(b"/1"))
        second.send(get(b"/2"))
        h.advance(2)
        self.assertEqual(second.received(), local(503, b"Service Unavailable", b"queue_timeout\n"))
        b = h.accept()
        self.assertEqual(b.received(), upstream_get(b"/1"))


class ClientGoneTests(SynchronousTestCase):
    def test_client_gone_while_connecting(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        c.close()
        self.assertEqual(h.access_log, [(b"GET", b"/", 499)])
        b = h.accept()
        # The new connection is kept for the next request.
        self.assertEqual(b.received(), b"")
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))
        self.assertEqual(h.host(A).active_requests, 0)
        self.assertEqual(h.listener.connections, set())

    def test_client_gone_mid_response(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        c.reset()
        self.assertTrue(b.aborted)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))
        self.assertEqual(h.host(A).active_requests, 0)

    def test_client_gone_while_queued(self) -> None:
        h = Harness(pools=[pool("web", A, max_conns_per_host=1)])
        first, second = h.client(), h.client()
        first.send(get(b"/1"))
        second.send(get(b"/2"))
        second.close()
        b = h.accept()
        self.assertEqual(b.received(), upstream_get(b"/1"))
        b.send(ok())
        self.assertEqual(first.received(), relayed_ok())
        self.assertEqual(b.received(), b"")
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))
        self.assertEqual(h.host(A).active_requests, 0)

    def test_malformed_chunk_mid_body(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
        b = h.accept()
        b.received()
        c.send(b"zz\r\n")
        status, headers, _body = parse_message(c.received())
        self.assertEqual((status, headers[b"connection"]), (400, [b"close"]))
        self.assertTrue(c.closed)
        self.assertTrue(b.aborted)
        self.assertEqual(h.listener.stats.rejected, {400: 1})
        self.assertEqual(h.host(A).active_requests, 0)

    def test_idle_backend_connection_expires(self) -> None:
        h = Harness(pools=[pool("web", A, upstream_idle_timeout=15.0)])
        c = h.client()
        roundtrip(h, c, get())
        b = h.backends[0]
        h.advance(14.9)
        self.assertFalse(b.closed)
        h.advance(0.1)
        self.assertTrue(b.closed)
        self.assertFalse(b.aborted)
        self.assertEqual(h.upstreams.counts(h.host(A)), (0, 0))


class AffinityTests(SynchronousTestCase):
    def cookie_of(self, h: Harness, key: str) -> bytes:
        return b"NLBAFF=" + h.host(key).affinity_token.encode()

    def test_cookie_affinity(self) -> None:
        h = Harness(pools=[pool("web", A, B, affinity="cookie")])
        web = h.pool("web")
        c = h.client()
        self.assertEqual(roundtrip(h, c, get()), A)
        cookie_a = self.cookie_of(h, A)
        self.assertEqual(c.received(), relayed_ok(after=b"set-cookie: " + cookie_a + b"; Path=/; HttpOnly; SameSite=Lax\r\n"))

        with_a = get(extra=b"Cookie: theme=dark; " + cookie_a + b"\r\n")
        # Round robin would pick B now; the cookie wins, and no new cookie is set.
        self.assertEqual(roundtrip(h, h.client(), with_a), A)
        c2 = h.client()
        self.assertEqual(roundtrip(h, c2, with_a), A)
        self.assertEqual(c2.received(), relayed_ok())

        web.set_directive(h.host(A), DRAINING, "test")
        c3 = h.client()
        self.assertEqual(roundtrip(h, c3, with_a), A)
        self.assertEqual(c3.received(), relayed_ok())
        self.assertEqual(roundtrip(h, h.client(), get()), B)

        web.set_directive(h.host(A), INACTIVE, "test")
        c4 = h.client()
        self.assertEqual(roundtrip(h, c4, with_a), B)
        cookie_b = self.cookie_of(h, B)
        self.assertEqual(c4.received(), relayed_ok(after=b"set-cookie: " + cookie_b + b"; Path=/; HttpOnly; SameSite=Lax\r\n"))

        web.set_directive(h.host(A), "active", "test")
        web.mark_failed(h.host(A), "test")
        c5 = h.client()
        self.assertEqual(roundtrip(h, c5, with_a), B)
        self.assertEqual(c5.received(), relayed_ok(after=b"set-cookie: " + cookie_b + b"; Path=/; HttpOnly; SameSite=Lax\r\n"))

    def test_forged_cookie_is_ignored(self) -> None:
        h = Harness(pools=[pool("web", A, B, affinity="cookie")])
        c = h.client()
        self.assertEqual(roundtrip(h, c, get(extra=b"Cookie: NLBAFF=10.0.0.2:8080\r\n")), A)
        self.assertIn(b"set-cookie: " + self.cookie_of(h, A), c.received())

    def test_cookie_secure_on_https(self) -> None:
        h = Harness(pools=[pool("web", A, affinity="cookie", affinity_cookie="SRV")], scheme=b"https")
        c = h.client()
        roundtrip(h, c, get())
        token = h.host(A).affinity_token.encode()
        self.assertEqual(
            c.received(), relayed_ok(after=b"set-cookie: SRV=" + token + b"; Path=/; HttpOnly; SameSite=Lax; Secure\r\n")
        )

    def test_client_ip_affinity(self) -> None:
        h = Harness(pools=[pool("web", A, B, affinity="client_ip")])
        web = h.pool("web")
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), A)
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), A)
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.2"), get()), B)
        web.set_directive(h.host(A), DRAINING, "test")
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), A)
        web.set_directive(h.host(A), INACTIVE, "test")
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), B)
        # The new host is remembered.
        web.set_directive(h.host(A), "active", "test")
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), B)
        web.mark_failed(h.host(B), "test")
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), A)

    def test_client_ip_affinity_expires(self) -> None:
        h = Harness(pools=[pool("web", A, B, affinity="client_ip", client_ip_timeout=60.0)])
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), A)
        h.advance(61)
        # Forgotten: round robin picks B next.
        self.assertEqual(roundtrip(h, h.client(ip="198.51.100.1"), get()), B)

    def test_draining_host_gets_no_new_requests(self) -> None:
        h = Harness(pools=[pool("web", A, B, C)])
        h.pool("web").set_directive(h.host(A), DRAINING, "test")
        keys = [roundtrip(h, h.client(), get()) for _ in range(4)]
        self.assertEqual(keys, [B, C, B, C])

    def test_weighted_round_robin(self) -> None:
        h = Harness(pools=[pool("web", (A, 5), (B, 1), (C, 1))])
        keys = [roundtrip(h, h.client(), get()) for _ in range(7)]
        self.assertEqual(keys, [A, A, B, A, C, A, A])
        self.assertEqual(len(h.backends), 3)


class TimeoutTests(SynchronousTestCase):
    def test_header_timeout_beats_slowloris(self) -> None:
        h = Harness(header_timeout=10.0)
        c = h.client()
        c.send(b"GET / HTTP/1.1\r\n")
        for i in range(9):
            h.advance(1)
            c.send(b"X-Drip-" + str(i).encode() + b": a\r\n")
        h.advance(0.9)
        self.assertFalse(c.closed)
        h.advance(0.1)
        self.assertEqual(
            c.received(), local(408, b"Request Timeout", b"request headers not received in time\n", close=True)
        )
        self.assertTrue(c.closed)
        self.assertEqual(h.attempts(), [])

    def test_silent_connection_closed_without_answer(self) -> None:
        h = Harness(header_timeout=10.0)
        c = h.client()
        h.advance(10)
        self.assertEqual(c.received(), b"")
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)

    def test_header_timeout_restarts_for_next_request(self) -> None:
        h = Harness(header_timeout=10.0, keepalive_timeout=30.0)
        c = h.client()
        h.advance(9)
        roundtrip(h, c, get())
        self.assertEqual(c.received(), relayed_ok())
        h.advance(20)
        c.send(b"GET / HTTP/1.1\r\n")
        h.advance(9.9)
        self.assertFalse(c.closed)
        h.advance(0.1)
        self.assertEqual(
            c.received(), local(408, b"Request Timeout", b"request headers not received in time\n", close=True)
        )

    def test_keepalive_timeout(self) -> None:
        h = Harness(keepalive_timeout=5.0)
        c = h.client()
        roundtrip(h, c, get())
        self.assertEqual(c.received(), relayed_ok())
        h.advance(4.9)
        self.assertFalse(c.closed)
        h.advance(0.1)
        self.assertEqual(c.received(), b"")
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)
        # The backend connection is not the client's: it stays pooled.
        self.assertEqual(h.upstreams.counts(h.host(A)), (1, 1))

    def test_no_timeout_while_waiting_for_the_host(self) -> None:
        h = Harness(header_timeout=1.0, client_timeout=2.0, keepalive_timeout=3.0)
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        h.advance(30)
        self.assertFalse(c.closed)
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())

    def test_client_timeout_on_client_not_reading(self) -> None:
        h = Harness(client_timeout=7.0)
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        c.stop_reading()
        self.assertTrue(b.paused)
        h.advance(6.9)
        self.assertFalse(c.closed)
        h.advance(0.1)
        self.assertTrue(c.aborted)
        self.assertTrue(b.aborted)
        self.assertEqual(h.host(A).active_requests, 0)

    def test_client_timeout_on_slow_body(self) -> None:
        h = Harness(client_timeout=7.0)
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        b = h.accept()
        b.received()
        h.advance(5)
        c.send(b"cd")
        h.advance(6.9)
        self.assertFalse(c.closed)
        h.advance(0.1)
        self.assertEqual(
            c.received(), local(408, b"Request Timeout", b"request body not received in time\n", close=True)
        )
        self.assertTrue(b.aborted)

    def test_reading_resumed_cancels_client_timeout(self) -> None:
        h = Harness(client_timeout=7.0)
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
        c.stop_reading()
        h.advance(5)
        c.start_reading()
        h.advance(30)
        self.assertFalse(c.closed)
        b.send(b"_rest")
        b.send(b"!")
        self.assertEqual(c.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nvia: 1.1 unit1\r\n\r\npart_rest!")


class BackPressureTests(SynchronousTestCase):
    def test_full_client_pauses_backend(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        c.stop_reading()
        self.assertTrue(b.paused)
        self.assertEqual(b.pauser_reasons, {"backpressure"})
        b.send(b"def")  # waits in the backend socket
        self.assertEqual(c.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nvia: 1.1 unit1\r\n\r\nabc")
        c.start_reading()
        self.assertFalse(b.paused)
        self.assertEqual(c.received(), b"def")
        self.assertEqual(b.transport.flow, ["pause", "resume"])

    def test_full_backend_pauses_client_body(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        b = h.accept()
        b.received()
        b.stop_reading()
        self.assertTrue(c.paused)
        self.assertEqual(c.pauser_reasons, {"backpressure"})
        c.send(b"abc")  # waits in the client socket
        self.assertEqual(b.received(), b"")
        b.start_reading()
        self.assertFalse(c.paused)
        self.assertEqual(b.received(), b"abc")
        self.assertEqual(c.transport.flow, ["pause", "resume"])

    def test_socket_buffer_fills_and_drains(self) -> None:
        h = Harness()
        c = h.client()
        c.fill_after(100)
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + b"x" * 150)
        self.assertTrue(b.paused)
        b.send(b"y" * 150)
        self.assertEqual(
            c.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\nvia: 1.1 unit1\r\n\r\n" + b"x" * 150
        )
        self.assertFalse(b.paused)
        self.assertEqual(c.received(), b"y" * 150)

    def test_backend_pooled_while_client_full_is_not_left_paused(self) -> None:
        # The whole response arrives in one read while the client's socket is
        # full; the connection goes back to the pool and must read again.
        h = Harness()
        c = h.client()
        c.fill_after(10)
        c.send(get(b"/1"))
        b = h.accept()
        b.received()
        b.send(ok(b"0123456789"))
        self.assertEqual(b.pauser_reasons, set())
        self.assertFalse(b.paused)
        self.assertEqual(c.received(), relayed_ok(b"0123456789"))
        other = h.client()
        other.send(get(b"/2"))
        self.assertEqual(b.received(), upstream_get(b"/2"))
        b.send(ok())
        self.assertEqual(other.received(), relayed_ok())

    def test_client_not_left_paused_after_body_to_full_backend(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
        b = h.accept()
        b.received()
        b.fill_after(5)
        c.send(b"a" * 20)
        self.assertEqual(c.pauser_reasons, set())
        self.assertFalse(c.paused)
        self.assertEqual(b.received(), b"a" * 20)
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())
        roundtrip(h, c, get(b"/next"))
        self.assertEqual(c.received(), relayed_ok())

    def test_early_response_resumes_client_paused_by_backend(self) -> None:
        h = Harness()
        c = h.client()
        c.send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
        b = h.accept()
        b.received()
        b.stop_reading()
        self.assertEqual(c.pauser_reasons, {"backpressure"})
        b.send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(c.received(), b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nvia: 1.1 unit1\r\n\r\n")
        # The rest of the body is read and dropped, then the connection serves on.
        self.assertEqual(c.pauser_reasons, set())
        c.send(b"a" * 20)
        roundtrip(h, c, get(b"/next"))
        self.assertEqual(c.received(), relayed_ok())


class ConnectionLimitTests(SynchronousTestCase):
    def test_max_connections(self) -> None:
        h = Harness(max_connections=2)
        first = h.client()
        h.client()
        self.assertIsNone(h.factory.buildProtocol(None))
        self.assertEqual(h.listener.stats.rejected, {503: 1})
        self.assertEqual(h.listener.stats.open_connections, 2)
        first.close()
        self.assertEqual(h.listener.stats.open_connections, 1)
        self.assertIsNotNone(h.client())


class GracefulTests(SynchronousTestCase):
    def test_close_idle(self) -> None:
        h = Harness()
        idle = h.client()
        roundtrip(h, idle, get())
        self.assertEqual(idle.received(), relayed_ok())
        fresh = h.client()
        busy = h.client()
        busy.send(get(b"/slow"))
        b = h.next_backend()
        self.assertEqual(b.received(), upstream_get(b"/slow"))

        h.listener.close_idle()
        h.flush()
        self.assertTrue(idle.closed)
        self.assertTrue(fresh.closed)
        self.assertFalse(busy.closed)
        self.assertIsNone(h.factory.buildProtocol(None))

        b.send(ok())
        self.assertEqual(busy.received(), relayed_ok(after=b"connection: close\r\n"))
        self.assertTrue(busy.closed)
        self.assertFalse(busy.aborted)
        self.assertEqual(h.listener.connections, set())

    def test_abort_all(self) -> None:
        h = Harness()
        idle, busy = h.client(), h.client()
        busy.send(get())
        b = h.accept()
        h.listener.abort_all()
        h.flush()
        self.assertTrue(idle.aborted)
        self.assertTrue(busy.aborted)
        self.assertTrue(b.aborted)
        self.assertEqual(h.listener.connections, set())
        self.assertEqual(h.access_log, [(b"GET", b"/", 499)])

    def test_close_idle_after_response_started(self) -> None:
        h = Harness()
        c = h.client()
        c.send(get())
        b = h.accept()
        b.received()
        b.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        h.listener.close_idle()
        self.assertFalse(c.closed)
        b.send(b"cd")
        self.assertEqual(c.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nvia: 1.1 unit1\r\n\r\nabcd")
        self.assertTrue(c.closed)
        self.assertFalse(c.aborted)


class _BodyRule(Rule):
    """A rule that reads the body prefix, the way SOAP rules and plugins do."""

    body_prefix = 8

    def __init__(self, answer: Callable[[RequestView], MaybeDecision]) -> None:
        super().__init__(RouteConfig(pool="unused"))
        self.answer = answer
        self.views: list[RequestView] = []

    def decide(self, view: RequestView) -> MaybeDecision:
        self.views.append(view)
        return self.answer(view)


def _with_rule(h: Harness, rule: Rule) -> None:
    table = h.listener.routes
    table.rules = (rule, *table.rules)
    table.body_prefix = max(table.body_prefix, rule.body_prefix)


def post(body: bytes, target: bytes = b"/") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: example.com\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


class RoutingHookTests(SynchronousTestCase):
    """Rules that look into the body, answer later, refuse, fail or hash a key."""

    def harness(self) -> Harness:
        return Harness(pools=[pool("web", A), pool("orders", B, C)], routes=[route("web", path_prefix="/x/")])

    def test_body_prefix_is_held_then_streamed_unchanged(self) -> None:
        h = self.harness()
        rule = _BodyRule(lambda v: Decision("orders") if v.body.startswith(b"order") else None)
        _with_rule(h, rule)
        c = h.client()
        c.send(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 20\r\n\r\norde")
        self.assertEqual(h.attempts(), [])  # 4 of the 8 bytes the rule wants
        c.send(b"r-12345678901234")
        b = h.next_backend()
        self.assertIn(b.key, (B, C))
        upstream = b.received()
        self.assertTrue(upstream.endswith(b"\r\n\r\norder-12345678901234"), upstream)
        self.assertEqual(rule.views[0].body, b"order-12")
        self.assertFalse(rule.views[0].body_complete)
        b.send(ok())
        self.assertEqual(c.received(), relayed_ok())

    def test_a_body_shorter_than_the_prefix_is_decided_at_its_end(self) -> None:
        h = self.harness()
        rule = _BodyRule(lambda v: Decision("orders"))
        _with_rule(h, rule)
        c = h.client()
        c.send(post(b"abc"))
        b = h.next_backend()
        self.assertTrue(b.received().endswith(b"\r\n\r\nabc"))
        self.assertEqual((rule.views[0].body, rule.views[0].body_complete), (b"abc", True))

    def test_bodiless_requests_are_decided_at_once(self) -> None:
        h = self.harness()
        rule = _BodyRule(lambda v: None)
        _with_rule(h, rule)
        c = h.client()
        self.assertEqual(roundtrip(h, c, get(b"/x/1")), A)
        self.assertEqual(rule.views[0].body, b"")

    def test_a_later_decision(self) -> None:
        h = self.harness()
        answer: Deferred[Decision | None] = Deferred()
        _with_rule(h, _BodyRule(lambda v: answer))
        c = h.client()
        c.send(get(b"/"))
        self.assertEqual(h.attempts(), [])
        answer.callback(Decision("orders"))
        self.assertIn(roundtrip_pending(h, c), (B, C))

    def test_a_refusal_is_answered_with_its_headers(self) -> None:
        h = self.harness()
        fault = b"<fault/>"
        _with_rule(h, _BodyRule(lambda v: _raise(Refusal(400, fault, [(b"content-type", b"text/xml")]))))
        c = h.client()
        c.send(post(b"junk"))
        status, headers, body = parse_message(c.received())
        self.assertEqual((status, headers[b"content-type"], body), (400, [b"text/xml"], fault))
        self.assertEqual(h.attempts(), [])
        self.assertFalse(c.closed)  # the whole body was read: the connection lives on
        self.assertEqual(h.access_log, [(b"POST", b"/", 400)])
        # Refused before the body's end: the rest is not read, the connection closes.
        c.send(post(b"not xml at all"))
        status, headers, body = parse_message(c.received())
        self.assertEqual((status, headers[b"connection"]), (400, [b"close"]))
        self.assertTrue(c.closed)

    def test_a_raising_rule_is_a_counted_502_and_the_unit_goes_on(self) -> None:
        h = self.harness()
        _with_rule(h, _BodyRule(lambda v: _raise(RuntimeError("plugin bug")) if v.path == b"/bad" else None))
        c = h.client()
        c.send(get(b"/bad"))
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"routing failed\n"))
        self.assertEqual(h.listener.stats.routing_failures, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(roundtrip(h, c, get(b"/x/ok")), A)

    def test_a_routing_timeout_is_a_counted_502(self) -> None:
        h = self.harness()
        _with_rule(h, _BodyRule(lambda v: Deferred()))
        c = h.client()
        c.send(get(b"/"))
        h.advance(limits.ROUTING_TIMEOUT)
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"routing timed out\n"))
        self.assertEqual(h.listener.stats.routing_failures, 1)
        self.flushLoggedErrors()

    def test_an_unknown_pool_is_a_counted_502(self) -> None:
        h = self.harness()
        _with_rule(h, _BodyRule(lambda v: Decision("nope")))
        c = h.client()
        c.send(get(b"/"))
        self.assertEqual(c.received(), local(502, b"Bad Gateway", b"routing chose an unknown pool\n"))
        self.assertEqual(h.listener.stats.routing_failures, 1)
        self.flushLoggedErrors()

    def test_a_client_gone_while_routing_waits(self) -> None:
        h = self.harness()
        answer: Deferred[Decision | None] = Deferred()
        _with_rule(h, _BodyRule(lambda v: answer))
        c = h.client()
        c.send(get(b"/"))
        c.close()
        self.assertEqual(h.access_log, [(b"GET", b"/", 499)])
        self.assertEqual(h.attempts(), [])
        self.assertEqual(h.listener.stats.routing_failures, 0)

    def test_an_affinity_key_keeps_its_host_and_fails_over(self) -> None:
        h = self.harness()
        _with_rule(h, _BodyRule(lambda v: Decision("orders", v.path)))
        c = h.client()
        first = {roundtrip(h, c, get(b"/tenant-%d" % i)) for i in range(3) for _ in range(3)}
        hosts = [roundtrip(h, c, get(b"/tenant-7")) for _ in range(5)]
        self.assertEqual(len(set(hosts)), 1)
        self.assertTrue(first <= {B, C})
        h.pool("orders").set_directive(h.host(hosts[0], "orders"), INACTIVE)
        other = roundtrip(h, c, get(b"/tenant-7"))
        self.assertNotEqual(other, hosts[0])


def _raise(exc: Exception) -> MaybeDecision:
    raise exc


def roundtrip_pending(h: Harness, client: Client, response: bytes = ok()) -> str:
    """The request was sent already: let its backend answer; the backend's key."""
    backend = h.next_backend()
    backend.received()
    backend.send(response)
    client.received()
    return backend.key
