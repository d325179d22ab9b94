# -*- test-case-name: tests.test_plugin_tenant -*-
"""Routing plugin ``tenant``: one tenant, one host.

Reads the tenant from a request header and sends the request to the
tenant's pool with the tenant as the affinity key, so a consistent hash over
the pool's hosts (weighted rendezvous hashing, see
:meth:`nlbproxy.classifier.Pool.host_for_key`) keeps each tenant on one host
while tenants spread over all of them; a host that goes down or stops being
active moves only its own tenants.

Options:

``header`` (required)
    The header naming the tenant, such as ``"X-Tenant"``.
``pools``
    A table of tenant to pool, for tenants with a pool of their own.
``default``
    The pool of every other tenant, and of requests without the header
    (those go by the pool's usual balancing, without a key).

A tenant with no pool, or a request without the header and no ``default``,
is declined (the route's ``pool`` or the next routes take it).  A request
naming two different tenants is refused with 400: the host could read the
other one.
"""

from __future__ import annotations

from zope.interface import implementer

from nlbproxy.plugin import IRequestClassifier, OptionError, Options, RoutingPlugin
from nlbproxy.routing import Decision, Refusal, RequestView, header_values

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@implementer(IRequestClassifier)
class TenantClassifier:
    """Routes by the tenant named in one header."""

    body_prefix = 0

    def __init__(self, header: str, pools: dict[str, str], default: str | None) -> None:
        self.header = header.lower().encode("ascii")
        self.pools = {tenant.encode("utf-8"): pool for tenant, pool in pools.items()}
        self.default = default
        self._untenanted = Decision(default) if default is not None else None

    @classmethod
    def from_options(cls, options: Options) -> TenantClassifier:
        header = options.string("header")
        if not set(header) <= _TOKEN_CHARS:
            raise OptionError("header", f"{header!r} is not a header name")
        pools = options.pool_table("pools")
        default = options.pool("default", None)
        if not pools and default is None:
            raise OptionError("default", "give default, pools or both: no tenant could be routed")
        return cls(header, pools, default)

    def classify(self, request: RequestView) -> Decision | None:
        tenants = set(filter(None, header_values(request.headers, self.header)))
        if not tenants:
            return self._untenanted
        if len(tenants) > 1:
            raise Refusal(400, b"the request names more than one tenant\n")
        tenant = tenants.pop()
        pool = self.pools.get(tenant, self.default)
        return Decision(pool, tenant) if pool is not None else None


tenant = RoutingPlugin(
    "tenant", TenantClassifier.from_options, "Routes by a tenant header; each tenant sticks to one host."
)
