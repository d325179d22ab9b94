"""The ``soap-operation`` routing plugin, tested with :mod:`nlbproxy.testing`.

Runs under trial and pytest.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import limits
from nlbproxy.plugin import OptionError
from nlbproxy.routers.soap import Envelope, SnifferLimits, SoapCall, SoapVersion
from nlbproxy.routing import Decision, RequestView, RouteTable
from nlbproxy.config import RouteConfig
from nlbproxy.testing import FakeFarm, RoutingAssertions, assert_refuses, assert_routes, configure, request
from tests.fakes import Harness, pool

SHOP = "urn:example:shop"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"


def envelope(operation: str, ns: str = SOAP11, namespace: str = SHOP, header: str = "", padding: int = 0) -> bytes:
    pad = f"<!--{'x' * padding}-->" if padding else ""
    return (
        f'<?xml version="1.0"?><e:Envelope xmlns:e="{ns}"><e:Header>{header}</e:Header>{pad}'
        f'<e:Body><m:{operation} xmlns:m="{namespace}"><m:id>7</m:id></m:{operation}></e:Body></e:Envelope>'
    ).encode()


def soap11(operation: str, action: str = '""', **kw: object) -> RequestView:
    body = envelope(operation, **kw)  # type: ignore[arg-type]
    return request("POST", "/shop", {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": action}, body=body)


def soap12(operation: str, action: str | None = None) -> RequestView:
    ctype = "application/soap+xml; charset=utf-8" + (f'; action="{action}"' if action else "")
    return request("POST", "/shop", {"Content-Type": ctype}, body=envelope(operation, SOAP12))


OPTIONS = {
    "operations": {f"{{{SHOP}}}PlaceOrder": "orders", "GetQuote": "quotes"},
    "actions": {"urn:example:shop/Refund": "orders"},
}


class SoapOperationTests(RoutingAssertions, SynchronousTestCase):
    def setUp(self) -> None:
        self.farm = FakeFarm({"app": ["10.0.0.1:80"], "orders": ["10.0.0.2:80"], "quotes": ["10.0.0.3:80"]})
        self.classifier = self.farm.configure("soap-operation", OPTIONS)

    def test_by_qualified_operation_in_both_versions(self) -> None:
        self.assertRoutes(self.classifier, soap11("PlaceOrder"), pool="orders", affinity_key=None)
        self.assertRoutes(self.classifier, soap12("PlaceOrder"), pool="orders", host="10.0.0.2:80", farm=self.farm)
        # Same local name, another namespace: not this operation.
        self.assertDeclines(self.classifier, soap11("PlaceOrder", namespace="urn:other"))

    def test_by_local_name_in_any_namespace(self) -> None:
        self.assertRoutes(self.classifier, soap11("GetQuote"), pool="quotes")
        self.assertRoutes(self.classifier, soap11("GetQuote", namespace="urn:other"), pool="quotes")

    def test_by_action_when_no_operation_matches(self) -> None:
        self.assertRoutes(self.classifier, soap11("Refund", action='"urn:example:shop/Refund"'), pool="orders")
        self.assertRoutes(self.classifier, soap12("Refund", action="urn:example:shop/Refund"), pool="orders")
        wsa = f'<a:Action xmlns:a="{WSA}">urn:example:shop/Refund</a:Action>'
        self.assertRoutes(self.classifier, soap11("Refund", header=wsa), pool="orders")
        self.assertDeclines(self.classifier, soap11("Refund", action='"urn:example:shop/Other"'))

    def test_a_default_pool(self) -> None:
        classifier = self.farm.configure("soap-operation", {**OPTIONS, "default": "app"})
        self.assertRoutes(classifier, soap11("Unknown"), pool="app")
        self.assertRoutes(classifier, soap11("GetQuote"), pool="quotes")

    def test_requests_that_are_not_soap_are_declined(self) -> None:
        self.assertDeclines(self.classifier, request("GET", "/shop"))
        self.assertDeclines(self.classifier, request("POST", "/shop", {"Content-Type": "application/json"}, body=b"{}"))

    def test_the_operation_is_read_from_the_prefix_only(self) -> None:
        self.assertEqual(self.classifier.body_prefix, limits.MAX_SOAP_PREFIX)
        # The operation's start tag inside the prefix: routed although the
        # body goes on past it (the router hands the plugin the prefix alone).
        long_body = soap11("PlaceOrder")
        long_body.body += b" " * (2 * limits.MAX_SOAP_PREFIX)
        self.assertRoutes(self.classifier, long_body, pool="orders")
        # The operation past the prefix: a SOAP 1.1 fault, no host sees it.
        late = soap11("PlaceOrder", padding=limits.MAX_SOAP_PREFIX)
        refusal = self.assertRefuses(self.classifier, late, 500)
        self.assertIn(b"faultcode", refusal.body)
        self.assertIn((b"content-type", b"text/xml; charset=utf-8"), refusal.headers)

    def test_a_smaller_prefix(self) -> None:
        classifier = self.farm.configure("soap-operation", {**OPTIONS, "max_prefix": 1024})
        self.assertEqual(classifier.body_prefix, 1024)
        self.assertRoutes(classifier, soap11("GetQuote"), pool="quotes")
        self.assertRefuses(classifier, soap11("GetQuote", padding=2000), 500)

    def test_hostile_envelopes_get_a_fault_of_their_version(self) -> None:
        bomb = (
            b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
            b'<e:Envelope xmlns:e="' + SOAP11.encode() + b'"><e:Body>&lol2;</e:Body></e:Envelope>'
        )
        bombed = request("POST", "/shop", {"Content-Type": "text/xml", "SOAPAction": '""'}, body=bomb)
        self.assertIn(b"faultcode", self.assertRefuses(self.classifier, bombed, 500).body)
        broken = request("POST", "/", {"Content-Type": "application/soap+xml"}, body=b"<not-closed")
        refusal = self.assertRefuses(self.classifier, broken, 400)
        self.assertIn(SOAP12.encode(), refusal.body)

    def test_bad_options(self) -> None:
        cases = [
            ({}, ("operations",), "give operations, actions or default: no call could be routed"),
            ({"operations": {"{urn:x}": "orders"}}, ("operations", "{urn:x}"), "a qualified name is {namespace}local"),
            ({"operations": {"Op": "lead"}}, ("operations", "Op"), "unknown pool 'lead'"),
            ({"actions": {"urn:a": 3}}, ("actions", "urn:a"), "expected a pool name, got 3"),
            ({"default": "app", "max_prefix": 10}, ("max_prefix",), "expected an integer from 1024 to 65536, got 10"),
            ({"default": "app", "operation": {}}, ("operation",), "unknown option"),
        ]
        for options, key, reason in cases:
            with self.assertRaises(OptionError) as caught:
                self.farm.configure("soap-operation", options)
            self.assertEqual((caught.exception.key, caught.exception.reason), (key, reason))


class SoapRouterTests(SynchronousTestCase):
    """The plugin in the router core: the envelope reaches the host unchanged."""

    def test_routed_by_operation_and_relayed_whole(self) -> None:
        classifier = configure("soap-operation", OPTIONS, {"app", "orders", "quotes"})
        h = Harness(
            pools=[pool("app", "10.0.0.1:80"), pool("orders", "10.0.0.2:80"), pool("quotes", "10.0.0.3:80")],
            routes=[RouteConfig(plugin="soap-operation", classifier=classifier)],
        )
        body = envelope("PlaceOrder")
        c = h.client()
        head = b"POST /shop HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nSOAPAction: \"\"\r\nContent-Length: %d\r\n\r\n"
        c.send(head % len(body) + body[:50])
        self.assertEqual(h.attempts(), [])  # still reading up to the operation
        c.send(body[50:])
        b = h.next_backend()
        self.assertEqual(b.key, "10.0.0.2:80")
        self.assertTrue(b.received().endswith(b"\r\n\r\n" + body))


def test_soap_operation_with_plain_assertions() -> None:
    f = FakeFarm({"orders": ["10.0.0.2:80"], "quotes": ["10.0.0.3:80"]})
    classifier = f.configure("soap-operation", OPTIONS)
    assert_routes(classifier, soap12("GetQuote"), pool="quotes", host="10.0.0.3:80", farm=f)
    assert assert_refuses(classifier, request("POST", "/", {"Content-Type": "text/xml", "SOAPAction": "x"}, body=b"<a")).status == 500


class SoapListenerTests(SynchronousTestCase):
    """On a ``protocol = "soap"`` listener the call is read once, before the rules."""

    def test_the_plugin_uses_the_call_the_listener_read(self) -> None:
        classifier = configure("soap-operation", OPTIONS, {"app", "orders", "quotes"})
        table = RouteTable([RouteConfig(plugin="soap-operation", classifier=classifier)], "app", SnifferLimits())
        self.assertEqual(table.decide(soap11("PlaceOrder")), Decision("orders"))
        # The listener's read is the one used: a call it made of the body.
        view = soap11("PlaceOrder")
        view.soap = SoapCall(SoapVersion.SOAP11, None, f"{{{SHOP}}}GetQuote", Envelope(SoapVersion.SOAP11, None))
        self.assertEqual(classifier.classify(view), Decision("quotes"))

    def test_the_routes_soap_keys_select_what_the_plugin_sees(self) -> None:
        classifier = configure("soap-operation", {"default": "orders"}, {"app", "orders"})
        route = RouteConfig(plugin="soap-operation", classifier=classifier, soap_operation="PlaceOrder")
        table = RouteTable([route], "app", SnifferLimits())
        self.assertEqual(table.decide(soap12("PlaceOrder")), Decision("orders"))
        self.assertEqual(table.decide(soap12("GetQuote")), Decision("app"))
