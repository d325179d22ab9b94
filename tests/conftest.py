"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realnet import Farm


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    """Processes of one test (backends, units, agents), all killed at its end."""
    f = Farm(tmp_path)
    try:
        yield f
    finally:
        f.close()
