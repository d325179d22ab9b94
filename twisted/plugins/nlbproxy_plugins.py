"""twistd plugins of nlbproxy: ``twistd nlbproxy`` and ``twistd nlbagent``."""

from twisted.application.service import ServiceMaker

nlbproxy = ServiceMaker("nlbproxy", "nlbproxy.tap", "A balancing unit (HTTP request router).", "nlbproxy")
nlbagent = ServiceMaker("nlbagent", "nlbproxy.agent.tap", "A host agent (health, load and sessions).", "nlbagent")

# ``nlbfd:FD:FAMILY`` server endpoints: the sockets a worker inherits from its supervisor.
from nlbproxy.workers.fdendpoint import InheritedSocketParser  # noqa: E402

nlbfd = InheritedSocketParser()
