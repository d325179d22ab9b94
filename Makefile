# The two quick-start commands (see README.md) and what CI runs.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: deps install demo test lint trial pytest

# Tests of the protocol cores that need no real reactor: they also run under trial.
TRIAL_MODULES = tests.test_config tests.test_metrics tests.test_router tests.test_headers \
	tests.test_routing tests.test_hostside tests.test_classifier tests.test_flow tests.test_admin \
	tests.test_health_codec tests.test_health_table tests.test_health_agent tests.test_agent_config \
	tests.test_health_cache tests.test_allotment tests.test_dam tests.test_session_agent tests.test_session_tracker \
	tests.test_statuspage tests.test_filtering tests.test_cache \
	tests.test_plugin tests.test_plugin_tenant tests.test_plugin_soap tests.test_testing \
	tests.test_soap tests.test_workers_policy tests.test_workers_aggregate tests.test_workers_relay tests.test_workers_config \
	tests.test_handoff_state tests.test_handoff_wire tests.test_handoff_unitside tests.test_handoff_routes \
	tests.test_handoff_fence tests.test_handoff_forwarder tests.test_handoff_tunnel tests.test_handoff_unitforwarder tests.test_handoff_channel \
	tests.test_handoff_agent_tunnel tests.test_handoff_neighbours tests.test_handoff_delivery \
	tests.test_tls_keys tests.test_tls_config tests.test_tls_pump tests.test_reload tests.test_sockets

# System packages the tests drive as real clients and servers: curl and wrk;
# Chromium and chromedriver for the status page; systemd-analyze for the unit
# files; an unmodified nginx on the handoff hosts; iproute2 for the network
# namespaces; nftables (libnftables in-process, nft as fallback) for the
# handoff fence.  One apt run installs whatever is missing.
DEB_PACKAGES = curl wrk chromium chromium-driver systemd nginx-light iproute2 procps libnftables1 nftables

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

install:
	$(PIP_INSTALL) -e '.[test]' --config-settings editable_mode=compat
	$(PYTHON) -c "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin, twisted.plugins))"
	$(PYTHON) -c "from nlbproxy.plugin import routing_plugins; routing_plugins()"

demo: install
	twistd -n --pidfile= nlbproxy --demo

lint:
	$(PYTHON) -m ruff check nlbproxy plugins tests bench twisted
	$(PYTHON) -m mypy nlbproxy plugins

pytest:
	$(PYTHON) -m pytest -q -p no:cacheprovider

# The protocol cores' tests need no real reactor and also run under trial.
trial:
	$(PYTHON) -m twisted.trial --temp-directory=/tmp/_trial_temp $(TRIAL_MODULES)

test: deps install lint trial pytest
