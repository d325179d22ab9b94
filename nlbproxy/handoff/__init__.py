"""Live TCP connection handoff: the connection's state and its blob, the
TCP_REPAIR dump and restore, the unit-to-agent channel, and delivery to the
host's application (see docs/handoff-recipe.md for the kernel facts)."""
