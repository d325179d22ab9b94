# -*- test-case-name: tests.test_agent_e2e -*-
"""``twistd nlbagent --config FILE``: options and service maker of a host agent."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from nlbproxy.agent.config import ConfigError, load_agent_config


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "Run a host agent: report the health and load of local applications to the balancing units."
    optParameters = [["config", "c", None, "The agent's TOML config file."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self["agent_config"] = load_agent_config(self["config"])
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor  # the process's reactor, chosen by twistd
    from nlbproxy.agent.service import AgentService

    return AgentService(options["agent_config"], reactor)
