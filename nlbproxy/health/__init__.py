"""Health and load: the host agent's table, the seven-message protocol, the
units' consolidated cache, allotments, and probes for hosts without an agent
(the seed patent's "health and load handler")."""
