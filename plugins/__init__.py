# -*- test-case-name: tests.test_plugin -*-
"""Routing plugins of nlbproxy (see :mod:`nlbproxy.plugin`).

Like ``twisted/plugins``, this package also spans every directory named
``plugins`` that has no ``__init__.py`` on ``sys.path``: operators drop their
own plugin modules there.  ``twisted.plugin`` writes a ``dropin.cache`` in
each such directory it may write to.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
