# -*- test-case-name: tests.test_plugin -*-
"""Per-application routing plugins: the interfaces, discovery and options.

A routing plugin is an object providing :class:`IRoutingPlugin` (and
``twisted.plugin.IPlugin``) in a module of the top-level :mod:`plugins`
package.  That package is a namespace like ``twisted/plugins``: besides the
plugins shipped in the repository's ``plugins/``, every directory named
``plugins`` without an ``__init__.py`` on ``sys.path`` is scanned, so an
operator drops a module into such a directory (put its parent on
``PYTHONPATH``) and names the plugin in a route::

    [[listener.route]]
    path_prefix = "/api/"             # the usual match keys still apply
    plugin = "tenant"
    options = { header = "X-Tenant", default = "app" }

When the config file is parsed, the plugin's :meth:`IRoutingPlugin.configure`
turns the route's ``options`` into an :class:`IRequestClassifier`; a bad
option fails the start with the file and the key
(``listener[0].route[2].options.header: ...``).  For each request matching
the route's other keys the router calls the classifier's ``classify`` with a
:class:`~nlbproxy.routing.RequestView` holding the first ``body_prefix`` bytes
of the body, and it answers a :class:`~nlbproxy.routing.Decision` (a pool and
optionally an affinity key: requests with one key go to one host of the pool,
by a consistent hash), None to decline (the route's ``pool`` if it has one,
else the next routes decide), a Deferred firing either, or raises
:class:`~nlbproxy.routing.Refusal` to answer the request itself.  Anything
else -- an exception, no answer within ``limits.ROUTING_TIMEOUT``, a pool
that does not exist -- is answered 502 and counted in the listener's
``routing_failures``; the unit goes on serving.

:class:`RoutingPlugin` and :class:`Options` spare a plugin author the
plumbing: see ``plugins/tenant.py`` for a complete plugin, and
:mod:`nlbproxy.testing` for testing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Set
from types import ModuleType
from typing import Any

from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface, implementer

from nlbproxy import limits

_MISSING: Any = object()


class IRequestClassifier(Interface):
    """Routing logic of one application, configured for one route."""

    body_prefix = Attribute(
        "int: request body bytes to read before classify is called (0 for none; at most "
        "limits.MAX_PENDING_BODY).  The body reaches the host unchanged either way."
    )

    def classify(request: Any) -> Any:
        """A Decision, None to decline, or a Deferred firing either, for a RequestView.

        May raise Refusal to answer the request itself (a 4xx, a SOAP fault).
        Must not block: anything slow answers with a Deferred.
        """


class IRoutingPlugin(Interface):
    """A kind of routing logic, found by ``twisted.plugin`` and named in routes."""

    name = Attribute("str: the name routes give in ``plugin = NAME``.")
    description = Attribute("str: one line for operators.")

    def configure(options: Mapping[str, Any], pools: Set[str]) -> IRequestClassifier:
        """The classifier for one route, from its ``options`` table.

        ``pools`` are the unit's pool names; options naming a pool must be one
        of them.  Raises :class:`OptionError` (or ValueError / TypeError) for
        options it cannot use.
        """


class PluginError(Exception):
    """A plugin that cannot be used: not found, or broken."""


class UnknownPlugin(PluginError, LookupError):
    """No plugin of that name was found."""


class OptionError(ValueError):
    """A plugin option that cannot be used: where (a key, or the path of keys
    into nested tables) and why."""

    def __init__(self, key: str | Iterable[str], reason: str) -> None:
        self.key = (key,) if isinstance(key, str) else tuple(key)
        self.reason = reason
        super().__init__(f"{'.'.join(self.key)}: {reason}" if self.key else reason)


# --- discovery ---------------------------------------------------------------------


def plugin_package() -> ModuleType:
    """The top-level ``plugins`` package, with every ``plugins/`` directory on sys.path."""
    import plugins

    return plugins


def routing_plugins(package: ModuleType | None = None) -> dict[str, IRoutingPlugin]:
    """Every routing plugin in *package* (default: :func:`plugin_package`), by name.

    Two plugins of one name are an error: which one a route meant is unknown.
    """
    found: dict[str, IRoutingPlugin] = {}
    for plugin in getPlugins(IRoutingPlugin, package if package is not None else plugin_package()):
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"routing plugin {plugin!r} has no name")
        if name in found:
            raise PluginError(f"two routing plugins are named {name!r}: {found[name]!r} and {plugin!r}")
        found[name] = plugin
    return found


def find(name: str, package: ModuleType | None = None) -> IRoutingPlugin:
    """The routing plugin called *name*; raises :class:`UnknownPlugin`."""
    plugins = routing_plugins(package)
    try:
        return plugins[name]
    except KeyError:
        known = ", ".join(sorted(plugins)) or "none"
        raise UnknownPlugin(f"no routing plugin named {name!r} (found: {known})") from None


def configure(
    plugin: str | IRoutingPlugin,
    options: Mapping[str, Any],
    pools: Set[str],
    package: ModuleType | None = None,
) -> IRequestClassifier:
    """The classifier *plugin* (a name or the plugin) makes of *options*.

    Raises :class:`UnknownPlugin`, :class:`OptionError` (a ValueError or
    TypeError of the plugin's is one without a key) or :class:`PluginError`
    for a classifier the router could not use.
    """
    found = find(plugin, package) if isinstance(plugin, str) else plugin
    try:
        classifier = found.configure(options, frozenset(pools))
    except OptionError:
        raise
    except (TypeError, ValueError) as exc:
        raise OptionError((), str(exc)) from exc
    if not callable(getattr(classifier, "classify", None)):
        raise PluginError(f"plugin {found.name!r} made {classifier!r}, which has no classify()")
    prefix = getattr(classifier, "body_prefix", None)
    if type(prefix) is not int or not 0 <= prefix <= limits.MAX_PENDING_BODY:
        raise PluginError(
            f"plugin {found.name!r} asks for {prefix!r} body bytes; "
            f"an int from 0 to {limits.MAX_PENDING_BODY} (limits.MAX_PENDING_BODY) is allowed"
        )
    return classifier


# --- for plugin authors ------------------------------------------------------------


class Options:
    """A route's ``options`` table, read key by key.

    Every reader raises :class:`OptionError` naming the key; :meth:`done`
    refuses keys nobody read, so a misspelt option fails the start instead
    of being ignored.
    """

    def __init__(self, options: Mapping[str, Any], pools: Set[str]) -> None:
        self.options = options
        self.pools = pools
        self._read: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.options

    def _get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        if key in self.options:
            return self.options[key]
        if default is _MISSING:
            raise OptionError(key, "missing required option")
        return default

    def string(self, key: str, default: Any = _MISSING) -> Any:
        """A non-empty string option (or *default* when absent)."""
        value = self._get(key, default)
        if value is not default and (not isinstance(value, str) or not value):
            raise OptionError(key, f"expected a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and (type(value) is not int or not low <= value <= high):
            raise OptionError(key, f"expected an integer from {low} to {high}, got {value!r}")
        return value

    def pool(self, key: str, default: Any = _MISSING) -> Any:
        """The name of one of the unit's pools."""
        value = self.string(key, default)
        if value is not default:
            self._check_pool((key,), value)
        return value

    def pool_table(self, key: str) -> dict[str, str]:
        """A table of names to pools (``{ acme = "gold", ... }``); empty when absent."""
        table = self._get(key, {})
        if not isinstance(table, Mapping):
            raise OptionError(key, f"expected a table of names to pools, got {table!r}")
        for name, pool in table.items():
            if not isinstance(pool, str):
                raise OptionError((key, name), f"expected a pool name, got {pool!r}")
            self._check_pool((key, name), pool)
        return dict(table)

    def _check_pool(self, key: tuple[str, ...], name: str) -> None:
        if name not in self.pools:
            raise OptionError(key, f"unknown pool {name!r}")

    def done(self) -> None:
        """Refuse the options nobody read."""
        unread = sorted(set(self.options) - self._read)
        if unread:
            raise OptionError(unread[0], "unknown option")


@implementer(IPlugin, IRoutingPlugin)
class RoutingPlugin:
    """A plugin object made from a name and a factory taking :class:`Options`.

    A plugin module needs one line::

        tenant = RoutingPlugin("tenant", TenantClassifier.from_options, "Routes by tenant.")
    """

    def __init__(
        self, name: str, factory: Callable[[Options], IRequestClassifier], description: str = ""
    ) -> None:
        self.name = name
        self.factory = factory
        self.description = description
        # twisted.plugin describes a plugin in dropin.cache by its __doc__.
        self.__doc__ = description or name

    def configure(self, options: Mapping[str, Any], pools: Set[str]) -> IRequestClassifier:
        reader = Options(options, pools)
        classifier = self.factory(reader)
        reader.done()
        return classifier

    def __repr__(self) -> str:
        return f"<RoutingPlugin {self.name!r}>"
