# -*- test-case-name: tests.test_plugin_soap -*-
"""Routing plugin ``soap-operation``: SOAP calls to pools by operation or action.

Reads the request as :mod:`nlbproxy.routers.soap` does -- SOAP 1.1
(``text/xml`` with ``SOAPAction``) or 1.2 (``application/soap+xml`` with its
``action`` parameter), and the first child of ``Body`` from a bounded prefix
of the body with the hardened sniffer -- and looks the call up in its tables.
The body reaches the host unchanged.

Options:

``operations``
    A table of operation to pool.  A key in Clark form,
    ``"{urn:example:shop}PlaceOrder"``, matches that qualified name; a bare
    local name, ``"PlaceOrder"``, matches it in any namespace.  Qualified keys
    are tried first.
``actions``
    A table of SOAP action (``SOAPAction``, the 1.2 ``action`` parameter or
    WS-Addressing ``Action``) to pool, tried when no operation matched.
``default``
    The pool of SOAP calls that match neither table.
``max_prefix``
    Body bytes read to find the operation (default and maximum:
    ``limits.MAX_SOAP_PREFIX``).

Requests that are not SOAP, and SOAP calls matching nothing without a
``default``, are declined.  A malformed or hostile envelope is answered with
a SOAP Fault of the request's version (the router's own answer, no host sees
it).
"""

from __future__ import annotations

from nlbproxy import limits
from zope.interface import implementer

from nlbproxy.plugin import IRequestClassifier, OptionError, Options, RoutingPlugin
from nlbproxy.routers.soap import SnifferLimits, SoapError, read_request
from nlbproxy.routing import Decision, Refusal, RequestView


@implementer(IRequestClassifier)
class SoapOperationClassifier:
    """Routes SOAP calls by the tables of one route."""

    def __init__(
        self,
        operations: dict[str, str],
        actions: dict[str, str],
        default: str | None,
        max_prefix: int = limits.MAX_SOAP_PREFIX,
    ) -> None:
        self.qualified = {name: Decision(pool) for name, pool in operations.items() if name.startswith("{")}
        self.local = {name: Decision(pool) for name, pool in operations.items() if not name.startswith("{")}
        self.actions = {action: Decision(pool) for action, pool in actions.items()}
        self.default = Decision(default) if default is not None else None
        self.bounds = SnifferLimits(max_prefix=max_prefix)
        self.body_prefix = max_prefix

    @classmethod
    def from_options(cls, options: Options) -> SoapOperationClassifier:
        operations = options.pool_table("operations")
        for name in operations:
            if name.startswith("{") and (name.find("}") < 2 or name.endswith("}")):
                raise OptionError(("operations", name), "a qualified name is {namespace}local")
        actions = options.pool_table("actions")
        default = options.pool("default", None)
        if not operations and not actions and default is None:
            raise OptionError("operations", "give operations, actions or default: no call could be routed")
        max_prefix = options.integer("max_prefix", 1024, limits.MAX_SOAP_PREFIX, limits.MAX_SOAP_PREFIX)
        return cls(operations, actions, default, max_prefix)

    def classify(self, request: RequestView) -> Decision | None:
        # A SOAP listener (protocol = "soap") has read the call already.
        call = request.soap
        if call is None:
            try:
                call = read_request(request.headers, request.body, request.body_complete, self.bounds)
            except SoapError as error:
                fault = error.fault()
                raise Refusal(fault.status, fault.body, fault.headers) from error
        if call is None:
            return None
        operation = call.operation
        if operation is not None:
            found = self.qualified.get(operation) or self.local.get(operation.rpartition("}")[2])
            if found is not None:
                return found
        if call.action is not None:
            found = self.actions.get(call.action)
            if found is not None:
                return found
        return self.default


soap_operation = RoutingPlugin(
    "soap-operation",
    SoapOperationClassifier.from_options,
    "Routes SOAP 1.1 and 1.2 calls to pools by operation (first child of Body) or action.",
)
