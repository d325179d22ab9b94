"""The host agent (``twistd nlbagent``): its config, local HTTP API, checks of
the local endpoints, measured host load, and the service that runs them
around the sans-I/O :class:`~nlbproxy.health.table.HealthTable` and
:class:`~nlbproxy.health.agent.AgentCore`."""
