"""Tests for nlbproxy.routers.soap (HTTP binding, envelope sniffer, faults) and
the SOAP listener's routing (nlbproxy.routing.SoapCheck, soap_* route keys)."""

from __future__ import annotations

import time
import tomllib
import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import limits
from nlbproxy.config import ConfigError, parse_config
from nlbproxy.routers.soap import (
    SOAP11_NS,
    SOAP12_NS,
    WSA_2004_NS,
    WSA_2005_NS,
    Envelope,
    EnvelopeSniffer,
    FaultCode,
    SnifferLimits,
    SoapError,
    SoapVersion,
    build_fault,
    http_binding,
    read_request,
)
from nlbproxy.routing import Decision, Refusal, RequestView, RouteTable, SoapCheck

V11, V12 = SoapVersion.SOAP11, SoapVersion.SOAP12
SOAP11_HEADERS = [(b"content-type", b"text/xml; charset=utf-8"), (b"soapaction", b'"urn:calc#add"')]
SOAP12_HEADERS = [(b"content-type", b'application/soap+xml; charset=utf-8; action="urn:calc#add"')]


def envelope(
    version: SoapVersion = V11,
    operation: str = '<m:add xmlns:m="urn:calc"><a>1</a><b>2</b></m:add>',
    header: str = "",
    prolog: str = '<?xml version="1.0" encoding="utf-8"?>\n',
) -> bytes:
    head = f"<s:Header>{header}</s:Header>" if header else ""
    return (
        f'{prolog}<s:Envelope xmlns:s="{version.namespace}">{head}'
        f"<s:Body>{operation}</s:Body></s:Envelope>"
    ).encode()


def sniff(data: bytes, bounds: SnifferLimits | None = None, expect: SoapVersion | None = None) -> Envelope:
    sniffer = EnvelopeSniffer(bounds, expect)
    return sniffer.feed(data) or sniffer.end()


def refused(data: bytes, bounds: SnifferLimits | None = None, expect: SoapVersion | None = None) -> SoapError:
    sniffer = EnvelopeSniffer(bounds, expect)
    try:
        sniffer.feed(data)
        sniffer.end()
    except SoapError as exc:
        return exc
    raise AssertionError(f"accepted {data[:80]!r}")


class HttpBindingTests(SynchronousTestCase):
    def test_soap11_action_is_the_quoted_soapaction(self) -> None:
        binding = http_binding(SOAP11_HEADERS)
        assert binding is not None
        self.assertEqual((binding.version, binding.action), (V11, "urn:calc#add"))

    def test_soap11_empty_and_unquoted_and_absent_actions(self) -> None:
        ct = (b"content-type", b"text/xml")
        self.assertEqual(http_binding([ct, (b"soapaction", b'""')]).action, "")  # type: ignore[union-attr]
        self.assertEqual(http_binding([ct, (b"soapaction", b" urn:x ")]).action, "urn:x")  # type: ignore[union-attr]
        self.assertIsNone(http_binding([ct]).action)  # type: ignore[union-attr]

    def test_soap12_action_is_the_content_type_parameter(self) -> None:
        binding = http_binding(SOAP12_HEADERS)
        assert binding is not None
        self.assertEqual((binding.version, binding.action), (V12, "urn:calc#add"))
        token = http_binding([(b"content-type", b"Application/SOAP+XML;Action=urn:x;charset=utf-8;")])
        self.assertEqual((token.version, token.action), (V12, "urn:x"))  # type: ignore[union-attr]
        self.assertIsNone(http_binding([(b"content-type", b"application/soap+xml")]).action)  # type: ignore[union-attr]

    def test_soap12_ignores_soapaction(self) -> None:
        headers = [(b"content-type", b"application/soap+xml"), (b"soapaction", b'"urn:other"')]
        self.assertIsNone(http_binding(headers).action)  # type: ignore[union-attr]

    def test_other_requests_are_not_soap(self) -> None:
        self.assertIsNone(http_binding([]))
        self.assertIsNone(http_binding([(b"content-type", b"application/json")]))
        self.assertIsNone(http_binding([(b"content-type", b"application/xml"), (b"soapaction", b'"x"')]))

    def test_ambiguous_headers_are_refused(self) -> None:
        # Two readers (this unit and the host) could pick different ones.
        cases = [
            ([(b"content-type", b"text/xml"), (b"content-type", b"application/soap+xml")], None),
            ([(b"content-type", b"text/xml"), (b"soapaction", b'"a"'), (b"soapaction", b'"b"')], V11),
            ([(b"content-type", b"application/soap+xml; action=a; action=b")], None),
            ([(b"content-type", b"application/soap+xml; action")], None),
            ([(b"content-type", b"soap")], None),
        ]
        for headers, version in cases:
            with self.assertRaises(SoapError) as caught:
                http_binding(headers)
            self.assertEqual(caught.exception.version, version, headers)

    @settings(derandomize=True, max_examples=300)
    @given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
    def test_any_quoted_action_reads_back(self, action: str) -> None:
        quoted = '"' + action.replace("\\", "\\\\").replace('"', '\\"') + '"'
        ct = b"application/soap+xml; charset=utf-8; action=" + quoted.encode()
        self.assertEqual(http_binding([(b"content-type", ct)]).action, action)  # type: ignore[union-attr]
        soap11 = [(b"content-type", b"text/xml"), (b"soapaction", quoted.encode())]
        self.assertEqual(http_binding(soap11).action, action)  # type: ignore[union-attr]

    @settings(derandomize=True, max_examples=300)
    @given(st.binary(max_size=120))
    def test_any_content_type_is_read_or_refused(self, value: bytes) -> None:
        try:
            http_binding([(b"content-type", value)])
        except SoapError as exc:
            self.assertIsNone(exc.version)


class SnifferTests(SynchronousTestCase):
    def test_version_and_operation_of_both_versions(self) -> None:
        for version in SoapVersion:
            got = sniff(envelope(version))
            self.assertEqual((got.version, got.operation), (version, "{urn:calc}add"))

    def test_operation_without_namespace_and_default_namespace(self) -> None:
        self.assertEqual(sniff(envelope(operation="<add/>")).operation, "add")
        self.assertEqual(sniff(envelope(operation='<add xmlns="urn:d"/>')).operation, "{urn:d}add")

    def test_empty_body_has_no_operation(self) -> None:
        got = sniff(envelope(operation=""))
        self.assertEqual((got.version, got.operation), (V11, None))

    def test_wsa_headers_of_both_namespaces(self) -> None:
        for ns in (WSA_2004_NS, WSA_2005_NS):
            header = (
                f'<wsa:MessageID xmlns:wsa="{ns}">uuid:1</wsa:MessageID>'
                f'<wsa:To xmlns:wsa="{ns}">\n  http://svc/calc  </wsa:To>'
                f'<wsa:Action xmlns:wsa="{ns}" s:mustUnderstand="1">urn:calc#add</wsa:Action>'
            )
            got = sniff(envelope(V11, header=header))
            self.assertEqual((got.wsa_to, got.wsa_action), ("http://svc/calc", "urn:calc#add"))
            self.assertEqual(set(got.headers), {f"{{{ns}}}To", f"{{{ns}}}Action"})

    def test_first_header_entry_of_a_name_wins_and_others_are_skipped(self) -> None:
        header = (
            f'<a:To xmlns:a="{WSA_2005_NS}">first</a:To><a:To xmlns:a="{WSA_2005_NS}">second</a:To>'
            f'<x:Other xmlns:x="urn:x"><a:To xmlns:a="{WSA_2005_NS}">nested</a:To></x:Other>'
        )
        self.assertEqual(sniff(envelope(header=header)).wsa_to, "first")

    def test_other_headers_can_be_selected(self) -> None:
        bounds = SnifferLimits(headers=frozenset({"{urn:t}Tenant"}))
        got = sniff(envelope(header='<t:Tenant xmlns:t="urn:t">acme</t:Tenant>'), bounds)
        self.assertEqual(dict(got.headers), {"{urn:t}Tenant": "acme"})

    def test_parsing_stops_at_the_operation_start_tag(self) -> None:
        # What follows the operation's start tag is the host's business: the
        # sniffer neither reads nor judges it.
        data = envelope()
        cut = data.index(b"<a>")
        sniffer = EnvelopeSniffer()
        self.assertEqual(sniffer.feed(data[:cut] + b"<<< not xml &undefined; " * 100).operation, "{urn:calc}add")

    def test_result_comes_as_soon_as_a_chunk_holds_it(self) -> None:
        data = envelope(operation='<m:add xmlns:m="urn:calc">' + "x" * 2000 + "</m:add>")
        sniffer = EnvelopeSniffer()
        got = None
        for i in range(len(data)):
            got = sniffer.feed(data[i : i + 1])
            if got is not None:
                break
        self.assertIsNotNone(got)
        self.assertLess(i, data.index(b"<m:add") + 1100)
        self.assertIs(sniffer.feed(b"more"), got)
        self.assertIs(sniffer.end(), got)

    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(
        version=st.sampled_from(list(SoapVersion)),
        ns=st.sampled_from(["urn:calc", "http://example.com/a?b=c&amp;d", ""]),
        local=st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,30}", fullmatch=True),
        to=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
        cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=8),
    )
    def test_any_split_of_a_generated_envelope_reads_the_same(
        self, version: SoapVersion, ns: str, local: str, to: str, cuts: list[int]
    ) -> None:
        escaped = to.replace("&", "&amp;").replace("<", "&lt;")
        header = f'<w:To xmlns:w="{WSA_2005_NS}">{escaped}</w:To>'
        data = envelope(version, operation=f'<op:{local} xmlns:op="{ns}"/>' if ns else f"<{local}/>",
                        header=header)
        sniffer = EnvelopeSniffer()
        got, start = None, 0
        for cut in sorted(cuts):
            got = got or sniffer.feed(data[start:cut])
            start = max(start, cut)
        got = got or sniffer.feed(data[start:]) or sniffer.end()
        ns_text = ns.replace("&amp;", "&")
        self.assertEqual(got.version, version)
        self.assertEqual(got.operation, f"{{{ns_text}}}{local}" if ns else local)
        self.assertEqual(got.wsa_to, to.replace("\r\n", "\n").replace("\r", "\n").strip())

    @settings(derandomize=True, max_examples=500, deadline=None)
    @given(st.binary(max_size=400))
    def test_any_bytes_are_read_or_refused(self, data: bytes) -> None:
        try:
            sniff(data)
        except SoapError:
            pass

    @settings(derandomize=True, max_examples=500, deadline=None)
    @given(st.data())
    def test_any_mutation_of_an_envelope_is_read_or_refused(self, data: st.DataObject) -> None:
        raw = bytearray(envelope(V12, header=f'<a:To xmlns:a="{WSA_2004_NS}">x</a:To>'))
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.sampled_from(b"<>&;!?/=\"' xX:\x00\xff"))
        try:
            got = sniff(bytes(raw))
        except SoapError as exc:
            self.assertIn(exc.version, (None, V12))
        else:
            self.assertEqual(got.version, V12)


class HostileEnvelopeTests(SynchronousTestCase):
    """Each is refused before anything is expanded, fetched or buffered."""

    def assertRefused(self, data: bytes, words: str, version: SoapVersion | None = None,
                      code: FaultCode = FaultCode.SENDER, expect: SoapVersion | None = None,
                      **bounds: int) -> None:
        started = time.monotonic()
        error = refused(data, SnifferLimits(**bounds) if bounds else None, expect)
        self.assertIn(words, error.reason)
        self.assertEqual((error.version, error.code), (version, code))
        # No expansion happened: a bomb that had been expanded takes seconds.
        self.assertLess(time.monotonic() - started, 2.0)

    def test_billion_laughs(self) -> None:
        lol = ['<!ENTITY lol0 "lol">'] + [
            f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
        ]
        bomb = f'<?xml version="1.0"?><!DOCTYPE s:Envelope [{"".join(lol)}]>'.encode() + envelope(
            operation="<m:x xmlns:m='urn:m'>&lol9;</m:x>", prolog="")
        self.assertRefused(bomb, "document type declaration", V12, expect=V12)
        self.assertRefused(bomb, "document type declaration", None)

    def test_quadratic_blowup(self) -> None:
        big = "A" * 50_000
        data = (f'<!DOCTYPE s:Envelope [<!ENTITY a "{big}">]>').encode() + envelope(
            operation="<m:x xmlns:m='urn:m'>" + "&a;" * 5000 + "</m:x>", prolog="")
        self.assertRefused(data, "document type declaration", max_prefix=1 << 20)

    def test_external_entities(self) -> None:
        for decl in ('<!ENTITY e SYSTEM "file:///etc/passwd">', '<!ENTITY % p SYSTEM "http://127.0.0.1:9/x"> %p;'):
            data = f"<!DOCTYPE s:Envelope [{decl}]>".encode() + envelope(
                operation="<m:x xmlns:m='urn:m'>&e;</m:x>", prolog="")
            self.assertRefused(data, "document type declaration", V11, expect=V11)
        self.assertRefused(b'<!DOCTYPE s:Envelope SYSTEM "http://127.0.0.1:9/evil.dtd">' + envelope(prolog=""),
                           "document type declaration")

    def test_undeclared_entity_reference(self) -> None:
        self.assertRefused(envelope(header="<h:x xmlns:h='urn:h'>&xxe;</h:x>"), "undefined entity", V11)

    def test_processing_instruction(self) -> None:
        self.assertRefused(envelope(header="<?php evil() ?>"), "processing instructions", V11)

    def test_deep_nesting(self) -> None:
        deep = "<h:n xmlns:h='urn:h'>" + "<h:n>" * 100_000
        self.assertRefused(envelope(V12, header=deep), "deeper than 32 elements", V12, max_prefix=1 << 21)
        self.assertRefused(envelope(V12, header="<h:n xmlns:h='urn:h'>" * 3), "deeper than 4", V12, max_depth=4)

    def test_oversize_envelope_prefix(self) -> None:
        padding = "<h:pad xmlns:h='urn:h'>" + "x" * (limits.MAX_SOAP_PREFIX) + "</h:pad>"
        self.assertRefused(envelope(header=padding), f"first {limits.MAX_SOAP_PREFIX} bytes", V11)
        # Fed in pieces, the limit holds as well: the error comes with the
        # chunk that reaches it, not later.
        sniffer = EnvelopeSniffer(SnifferLimits(max_prefix=4096))
        sniffer.feed(b"<s:Envelope xmlns:s='" + SOAP11_NS.encode() + b"'><s:Header>")
        fed = [sniffer.feed(b" " * 1000) for _ in range(4)]  # 4,070 bytes
        self.assertEqual(fed, [None] * 4)
        with self.assertRaises(SoapError) as caught:
            sniffer.feed(b" " * 1000)
        self.assertIn("first 4096 bytes", caught.exception.reason)
        self.assertEqual(caught.exception.version, V11)

    def test_a_big_operation_is_not_oversize(self) -> None:
        body = "<m:put xmlns:m='urn:m'>" + "x" * (4 * limits.MAX_SOAP_PREFIX) + "</m:put>"
        self.assertEqual(sniff(envelope(operation=body)).operation, "{urn:m}put")

    def test_too_many_attributes_and_namespace_declarations(self) -> None:
        attrs = " ".join(f'a{i}="1"' for i in range(65))
        self.assertRefused(envelope(header=f"<h:x xmlns:h='urn:h' {attrs}/>"), "more than 64 attributes", V11)
        decls = " ".join(f'xmlns:p{i}="urn:{i}"' for i in range(70))
        self.assertRefused(envelope(header=f"<h:x xmlns:h='urn:h' {decls}/>"), "more than 64 attributes", V11)

    def test_long_names(self) -> None:
        long = "n" * 2000
        self.assertRefused(envelope(header=f"<{long}/>"), "name longer than 1024", V11)
        self.assertRefused(envelope(header=f"<h:x xmlns:h='urn:{long}'/>"), "namespace name longer", V11)
        self.assertRefused(envelope(header=f"<h:x xmlns:h='urn:h' {long}='1'/>"), "name longer", V11)

    def test_long_selected_header_text(self) -> None:
        to = f"<a:To xmlns:a='{WSA_2005_NS}'>{'x' * 5000}</a:To>"
        self.assertRefused(envelope(header=to), "longer than 4096 characters", V11)

    def test_non_xml_and_truncated(self) -> None:
        self.assertRefused(b"hello, world", "malformed XML")
        self.assertRefused(b"", "malformed XML: no element found", V12, expect=V12)
        self.assertRefused(envelope()[:120], "malformed XML", V11)
        self.assertRefused(b"\xff\xfe\x00<", "malformed XML")

    def test_encodings(self) -> None:
        for encoding in ("xtf-8", "cp037", "utf-7"):
            self.assertRefused(envelope(prolog=f'<?xml version="1.0" encoding="{encoding}"?>'),
                               "unsupported character encoding")
        self.assertEqual(sniff(envelope(prolog='<?xml version="1.0" encoding="ISO-8859-1"?>')).version, V11)
        utf16 = envelope(prolog='<?xml version="1.0" encoding="UTF-16"?>').decode().encode("utf-16")
        self.assertEqual(sniff(utf16).operation, "{urn:calc}add")

    def test_wrong_namespace_is_a_version_mismatch(self) -> None:
        self.assertRefused(b"<s:Envelope xmlns:s='urn:other'><s:Body/></s:Envelope>", "unknown SOAP envelope namespace",
                           None, FaultCode.VERSION_MISMATCH)
        self.assertRefused(b"<Envelope><Body/></Envelope>", "has no namespace", None, FaultCode.VERSION_MISMATCH)

    def test_wrong_structure(self) -> None:
        ns = SOAP12_NS
        cases = [
            (f"<s:Body xmlns:s='{ns}'/>", "not a SOAP Envelope", None),
            (f"<s:Envelope xmlns:s='{ns}'><s:Other/><s:Body/></s:Envelope>", "expected SOAP Header or Body", V12),
            (f"<s:Envelope xmlns:s='{ns}'><s:Header/><s:Header/><s:Body/></s:Envelope>", "expected SOAP Header", V12),
            (f"<s:Envelope xmlns:s='{ns}'><s:Header/></s:Envelope>", "has no Body", V12),
            (f"<s:Envelope xmlns:s='{ns}'><Body/></s:Envelope>", "expected SOAP Header or Body, got Body", V12),
            (f"<s:Envelope xmlns:s='{ns}'><s:Body><x:op/></s:Body></s:Envelope>", "unbound prefix", V12),
        ]
        for data, words, version in cases:
            self.assertRefused(data.encode(), words, version)

    def test_an_error_is_raised_again(self) -> None:
        sniffer = EnvelopeSniffer()
        with self.assertRaises(SoapError) as first:
            sniffer.feed(b"<!DOCTYPE x>" + b" " * 2000)
        with self.assertRaises(SoapError) as again:
            sniffer.end()
        self.assertIs(again.exception, first.exception)


class ReadRequestTests(SynchronousTestCase):
    def test_soap11_and_soap12_calls(self) -> None:
        call = read_request(SOAP11_HEADERS, envelope(V11), True)
        assert call is not None
        self.assertEqual((call.version, call.action, call.operation, call.operation_local),
                         (V11, "urn:calc#add", "{urn:calc}add", "add"))
        call = read_request(SOAP12_HEADERS, envelope(V12), True)
        assert call is not None
        self.assertEqual((call.version, call.action), (V12, "urn:calc#add"))

    def test_not_soap(self) -> None:
        self.assertIsNone(read_request([(b"content-type", b"application/json")], b"{}", True))

    def test_wsa_action_stands_in_for_an_empty_http_action(self) -> None:
        header = f"<a:Action xmlns:a='{WSA_2005_NS}'>urn:calc#sub</a:Action>"
        for action in (b'""', None):
            headers = [(b"content-type", b"text/xml")] + ([(b"soapaction", action)] if action else [])
            call = read_request(headers, envelope(header=header), True)
            self.assertEqual(call.action, "urn:calc#sub")  # type: ignore[union-attr]
        self.assertIsNone(read_request([(b"content-type", b"text/xml")], envelope(), True).action)  # type: ignore[union-attr]

    def test_contradicting_actions_are_refused(self) -> None:
        header = f"<a:Action xmlns:a='{WSA_2005_NS}'>urn:calc#sub</a:Action>"
        with self.assertRaises(SoapError) as caught:
            read_request(SOAP12_HEADERS, envelope(V12, header=header), True)
        self.assertEqual((caught.exception.version, caught.exception.code), (V12, FaultCode.SENDER))

    def test_envelope_of_another_version_than_the_binding(self) -> None:
        with self.assertRaises(SoapError) as caught:
            read_request(SOAP11_HEADERS, envelope(V12), True)
        self.assertEqual((caught.exception.version, caught.exception.code), (V12, FaultCode.VERSION_MISMATCH))

    def test_errors_before_the_envelope_carry_the_binding_version(self) -> None:
        with self.assertRaises(SoapError) as caught:
            read_request(SOAP12_HEADERS, b"not xml", True)
        self.assertEqual(caught.exception.version, V12)

    def test_a_prefix_shorter_than_the_limit_must_be_the_whole_body(self) -> None:
        with self.assertRaises(ValueError):
            read_request(SOAP11_HEADERS, envelope()[:50], False)
        with self.assertRaises(SoapError):
            read_request(SOAP11_HEADERS, envelope()[:50], True)


class FaultTests(SynchronousTestCase):
    def parse(self, body: bytes) -> ET.Element:
        return ET.fromstring(body)  # our own output: no DTD, safe to parse

    def test_soap11_faults_are_500_text_xml(self) -> None:
        for code, name in [(FaultCode.SENDER, "soap:Client"), (FaultCode.RECEIVER, "soap:Server"),
                           (FaultCode.VERSION_MISMATCH, "soap:VersionMismatch")]:
            fault = build_fault(V11, code, "bad <input> & more")
            self.assertEqual(fault.status, 500)
            self.assertEqual(fault.headers, ((b"content-type", b"text/xml; charset=utf-8"),))
            root = self.parse(fault.body)
            self.assertEqual(root.tag, f"{{{SOAP11_NS}}}Envelope")
            self.assertEqual(root.findtext(f".//{{{SOAP11_NS}}}Fault/faultcode"), name)
            self.assertEqual(root.findtext(f".//{{{SOAP11_NS}}}Fault/faultstring"), "bad <input> & more")

    def test_soap12_sender_is_400_and_others_500(self) -> None:
        for code, status in [(FaultCode.SENDER, 400), (FaultCode.RECEIVER, 500), (FaultCode.VERSION_MISMATCH, 500)]:
            fault = build_fault(V12, code, "why")
            self.assertEqual(fault.status, status)
            self.assertEqual(fault.headers, ((b"content-type", b"application/soap+xml; charset=utf-8"),))
            root = self.parse(fault.body)
            env = f"{{{SOAP12_NS}}}"
            self.assertEqual(root.findtext(f".//{env}Code/{env}Value"), f"env:{code.value}")
            text = root.find(f".//{env}Reason/{env}Text")
            assert text is not None
            self.assertEqual((text.text, text.get("{http://www.w3.org/XML/1998/namespace}lang")), ("why", "en"))
            upgrade = root.findall(f"{env}Header/{env}Upgrade/{env}SupportedEnvelope")
            self.assertEqual(len(upgrade), 2 if code is FaultCode.VERSION_MISMATCH else 0)

    def test_a_fault_is_an_envelope_the_sniffer_reads(self) -> None:
        for version in SoapVersion:
            got = sniff(build_fault(version, FaultCode.SENDER, "x").body)
            self.assertEqual((got.version, got.operation), (version, f"{{{version.namespace}}}Fault"))

    def test_soap_error_builds_its_fault(self) -> None:
        self.assertEqual(SoapError("x", V12).fault().status, 400)
        self.assertEqual(SoapError("x").fault().headers[0][1], b"text/xml; charset=utf-8")
        self.assertEqual(SoapError("x").fault(V12).status, 400)

    @settings(derandomize=True, max_examples=300)
    @given(st.sampled_from(list(SoapVersion)), st.text(max_size=100))
    def test_any_reason_is_escaped(self, version: SoapVersion, reason: str) -> None:
        root = self.parse(build_fault(version, FaultCode.SENDER, reason).body)
        text = "".join(root.itertext())
        legal = "".join(c if c in "\t\n\r" or 0x20 <= ord(c) <= 0xD7FF or 0xE000 <= ord(c) <= 0xFFFD
                        or ord(c) >= 0x10000 else "\ufffd" for c in reason)
        # XML parsers normalise line ends; the reason is otherwise kept whole.
        self.assertIn(legal.replace("\r\n", "\n").replace("\r", "\n"), text)


def soap_config(routes: str) -> object:
    text = (
        '[[listener]]\nname = "soap"\nendpoint = "tcp:0"\nprotocol = "soap"\npool = "app"\n'
        f'{routes}\n[pool.app]\n[pool.add]\n[pool.sub]\n'
    )
    return parse_config(tomllib.loads(text), "unit.toml")


class SoapRoutingTests(SynchronousTestCase):
    def table(self) -> RouteTable:
        config = soap_config(
            '[[listener.route]]\nsoap_action = "urn:calc#add"\npool = "add"\n'
            '[[listener.route]]\nsoap_operation = "{urn:calc}sub"\npool = "sub"\n'
            '[[listener.route]]\nsoap_operation = "mul"\npath_prefix = "/calc"\npool = "sub"\n'
        )
        return RouteTable.for_listener(config.listeners[0])  # type: ignore[attr-defined]

    def decide(self, headers: list[tuple[bytes, bytes]], body: bytes, method: bytes = b"POST",
               target: bytes = b"/calc") -> object:
        return self.table().decide(RequestView(method, target, headers, body=body, body_complete=True))

    def test_the_soap_check_comes_first_and_wants_the_prefix(self) -> None:
        table = self.table()
        self.assertIsInstance(table.rules[0], SoapCheck)
        self.assertEqual(table.body_prefix, limits.MAX_SOAP_PREFIX)
        self.assertEqual(RouteTable([], "app", SnifferLimits()).body_prefix, limits.MAX_SOAP_PREFIX)
        self.assertEqual(RouteTable([], "app").rules, ())

    def test_routes_by_action_and_operation(self) -> None:
        self.assertEqual(self.decide(SOAP11_HEADERS, envelope(V11)), Decision("add"))
        self.assertEqual(self.decide(SOAP12_HEADERS, envelope(V12)), Decision("add"))
        sub = envelope(operation="<c:sub xmlns:c='urn:calc'/>")
        self.assertEqual(self.decide([(b"content-type", b"text/xml")], sub), Decision("sub"))
        other_ns = envelope(operation="<c:sub xmlns:c='urn:other'/>")
        self.assertEqual(self.decide([(b"content-type", b"text/xml")], other_ns), Decision("app"))
        mul = envelope(V12, operation="<c:mul xmlns:c='urn:any'/>")
        self.assertEqual(self.decide([(b"content-type", b"application/soap+xml")], mul), Decision("sub"))
        self.assertEqual(self.decide([(b"content-type", b"application/soap+xml")], mul, target=b"/x"), Decision("app"))

    def test_a_view_keeps_the_call(self) -> None:
        view = RequestView(b"POST", b"/", SOAP12_HEADERS, body=envelope(V12), body_complete=True)
        self.assertEqual(RouteTable([], "app", SnifferLimits()).decide(view), Decision("app"))
        self.assertEqual(view.soap.operation, "{urn:calc}add")  # type: ignore[union-attr]

    def test_malformed_envelopes_are_refused_with_a_fault_of_their_version(self) -> None:
        for headers, version, status in [(SOAP11_HEADERS, SOAP11_NS, 500), (SOAP12_HEADERS, SOAP12_NS, 400)]:
            with self.assertRaises(Refusal) as caught:
                self.decide(headers, b"<!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>")
            refusal = caught.exception
            self.assertEqual(refusal.status, status)
            self.assertIn(version.encode(), refusal.body)
            self.assertIn(b"document type declaration", refusal.body)

    def test_other_methods_and_content_types_are_not_read(self) -> None:
        self.assertEqual(self.decide(SOAP11_HEADERS, b"", method=b"GET", target=b"/calc?wsdl"), Decision("app"))
        self.assertEqual(self.decide([(b"content-type", b"application/json")], b"{"), Decision("app"))


class SoapConfigTests(SynchronousTestCase):
    def test_soap_keys_are_kept(self) -> None:
        config = soap_config('[[listener.route]]\nsoap_action = ""\nsoap_operation = "{urn:a}b"\npool = "add"\n')
        route = config.listeners[0].routes[0]  # type: ignore[attr-defined]
        self.assertEqual((route.soap_action, route.soap_operation), ("", "{urn:a}b"))

    def test_bad_soap_keys(self) -> None:
        for key, value, reason in [
            ("soap_operation", '"{urn:a}"', "expected an XML local name"),
            ("soap_operation", '"{}b"', "expected '{namespace}local'"),
            ("soap_operation", '"a:b"', "expected an XML local name"),
            ("soap_action", '"caf\\u00e9"', "expected printable ASCII"),
            ("soap_action", "1", "expected a string"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                soap_config(f'[[listener.route]]\n{key} = {value}\npool = "add"\n')
            self.assertEqual(caught.exception.key, f"listener[0].route[0].{key}")
            self.assertIn(reason, caught.exception.reason)

    def test_listener_soap_limits(self) -> None:
        config = parse_config(tomllib.loads(
            '[[listener]]\nname = "soap"\nendpoint = "tcp:0"\nprotocol = "soap"\npool = "app"\n'
            'max_soap_prefix = 1024\nmax_soap_depth = 5\n[pool.app]\n'), "unit.toml")
        table = RouteTable.for_listener(config.listeners[0])
        self.assertEqual(table.body_prefix, 1024)
        deep = envelope(header="<h:a xmlns:h='urn:h'><h:b><h:c><h:d/></h:c></h:b></h:a>")
        with self.assertRaises(Refusal) as caught:
            table.decide(RequestView(b"POST", b"/", SOAP11_HEADERS, body=deep, body_complete=True))
        self.assertIn(b"deeper than 5 elements", caught.exception.body)
        with self.assertRaises(ConfigError) as bad:
            parse_config(tomllib.loads(
                '[[listener]]\nname = "s"\nendpoint = "tcp:0"\npool = "app"\nmax_soap_depth = 2\n[pool.app]\n'))
        self.assertEqual(bad.exception.key, "listener[0].max_soap_depth")

    def test_soap_keys_need_a_soap_listener(self) -> None:
        text = ('[[listener]]\nname = "web"\nendpoint = "tcp:0"\npool = "app"\n'
                '[[listener.route]]\nsoap_action = "x"\npool = "app"\n[pool.app]\n')
        with self.assertRaises(ConfigError) as caught:
            parse_config(tomllib.loads(text), "unit.toml")
        self.assertEqual(str(caught.exception),
                         'unit.toml: listener[0].route[0].soap_action: needs the listener\'s protocol = "soap"')
