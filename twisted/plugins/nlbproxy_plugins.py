"""twistd plugins of nlbproxy: ``twistd nlbproxy``."""

from twisted.application.service import ServiceMaker

nlbproxy = ServiceMaker("nlbproxy", "nlbproxy.tap", "A balancing unit (HTTP request router).", "nlbproxy")
