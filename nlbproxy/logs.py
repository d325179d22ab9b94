# -*- test-case-name: tests.test_e2e -*-
"""Structured logs: ``twistd --logger=nlbproxy.logs.json_observer ...``.

Every twisted.logger event of the unit becomes one JSON object per line on
standard output, fields included (an access-log event carries its request in
``access``), ready for a log shipper.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer() -> ILogObserver:
    """The observer factory twistd's ``--logger`` option names."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
