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
	tests.test_handoff_fence tests.test_handoff_forwarder tests.test_handoff_tunnel

# System packages the tests drive as real clients and servers; Chromium (and
# its chromedriver) for the status page, systemd-analyze for the unit files.
deps:
	@command -v curl >/dev/null && command -v wrk >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl wrk >/dev/null; }
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver && command -v systemd-analyze >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver systemd >/dev/null; }
	@# The handoff end-to-end tests drive a real, unmodified nginx on the hosts.
	@command -v nginx >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
	@# The handoff fence: libnftables in-process, the nft command as fallback and for tests.
	@command -v nft >/dev/null && ldconfig -p | grep -q libnftables.so.1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnftables1 nftables >/dev/null; }

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
