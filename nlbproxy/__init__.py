"""nlbproxy: network load balancing with traffic routing (US 7,567,504) on Twisted."""

__version__ = "0.1.0"
