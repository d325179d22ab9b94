# The two quick-start commands (see README.md) and what CI runs.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: deps install demo test lint trial pytest

# Tests of the protocol cores that need no real reactor: they also run under trial.
TRIAL_MODULES = tests.test_config tests.test_metrics tests.test_router tests.test_headers \
	tests.test_routing tests.test_classifier tests.test_flow tests.test_admin \
	tests.test_health_codec tests.test_health_table tests.test_health_agent tests.test_agent_config \
	tests.test_health_cache tests.test_allotment tests.test_dam tests.test_session_agent tests.test_session_tracker \
	tests.test_tls_keys tests.test_tls_config

# System packages the tests drive as real clients and servers.
deps:
	@command -v curl >/dev/null && command -v wrk >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl wrk >/dev/null; }

install:
	$(PIP_INSTALL) -e '.[test]' --config-settings editable_mode=compat
	$(PYTHON) -c "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin, twisted.plugins))"

demo: install
	twistd -n --pidfile= nlbproxy --demo

lint:
	$(PYTHON) -m ruff check nlbproxy tests bench twisted
	$(PYTHON) -m mypy nlbproxy

pytest:
	$(PYTHON) -m pytest -q -p no:cacheprovider

# The protocol cores' tests need no real reactor and also run under trial.
trial:
	$(PYTHON) -m twisted.trial --temp-directory=/tmp/_trial_temp $(TRIAL_MODULES)

test: deps install lint trial pytest
