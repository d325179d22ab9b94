"""What a test needs from the machine, and what happens when it is missing.

Tests that need root, network namespaces, a system package or a browser
skip on a developer's machine that lacks them, but CI (``NLB_REQUIRE_ROOT=1``,
set by ``.ci/run`` as root after ``make deps``) has everything: there a
missing need is a failure, never a silently skipped suite.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

#: Set by .ci/run: every need can be met, so an unmet one fails the test.
REQUIRED = "NLB_REQUIRE_ROOT"


def unmet(reason: str) -> NoReturn:
    """Skip the calling test for ``reason``, or fail it under CI."""
    if os.environ.get(REQUIRED) == "1":
        pytest.fail(f"{REQUIRED}=1 but {reason}")
    pytest.skip(reason)


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        unmet(f"needs root ({why})")


def need_commands(*commands: str) -> None:
    """Commands ``make deps`` installs."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        unmet(f"{', '.join(missing)} not installed (make deps)")
