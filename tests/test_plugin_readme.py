"""The README's "Routing plugins" section works as written.

Its example plugin is dropped into a ``plugins/`` directory outside the
repository and its example test suite is run there under pytest and trial,
as a plugin author would; its route examples parse.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from nlbproxy.config import parse_config
from nlbproxy.plugin import IRequestClassifier
from tests.realnet import ROOT

README = (ROOT / "README.md").read_text()


def example(name: str) -> str:
    match = re.search(rf"<!-- readme-example: {re.escape(name)} -->\n```python\n(.*?)```", README, re.S)
    assert match, f"no example {name} in README.md"
    return match.group(1)


def test_the_example_plugin_and_its_tests(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "region.py").write_text(example("plugins/region.py"))
    (tmp_path / "test_region.py").write_text(example("test_region.py"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", str(ROOT))]))
    runs = {
        "pytest": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_region.py"],
        "trial": [sys.executable, "-m", "twisted.trial", "test_region"],
    }
    passed = {"pytest": r"\b3 passed\b", "trial": r"PASSED \(successes=2\)"}
    for runner, args in runs.items():
        result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (runner, result.stdout, result.stderr)
        assert re.search(passed[runner], result.stdout), (runner, result.stdout)


def test_the_route_examples_parse() -> None:
    section = README[README.index("## Routing plugins"):README.index("### Writing a routing plugin")]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block
    data = tomllib.loads(
        '[[listener]]\nname = "web"\nendpoint = "tcp:0"\npool = "app"\n'
        + block.group(1)
        + "".join(f'[pool.{name}]\nhosts = ["127.0.0.1:1"]\n' for name in ("app", "gold", "orders", "quotes"))
    )
    routes = parse_config(data, "README.md").listeners[0].routes
    assert [route.plugin for route in routes] == ["tenant", "soap-operation"]
    assert all(IRequestClassifier.providedBy(route.classifier) for route in routes)
