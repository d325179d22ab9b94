"""Session tracking (the seed patent's "session tracker"): the host agents'
session up / session down messages and the balancing units' distributed atom
manager (DAM), which shares session atoms across units.

* :mod:`nlbproxy.session.dam` -- the DAM itself, sans-I/O: atoms, conflict
  rules, replica placement, queries, zombies, resync.
* :mod:`nlbproxy.session.peering` -- the authenticated AMP transport that
  carries DAM calls between units (``[unit]`` ``dam`` and ``peers``).
"""
