"""Every code example of the documentation runs, on a real Grid Engine, and prints what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def expected_lines(source: str) -> list[str]:
    """The ``# prints: ...`` lines of an example, in order."""
    return [
        line.split("# prints:", 1)[1].strip()
        for line in source.splitlines()
        if line.strip().startswith("# prints:")
    ]


@pytest.mark.parametrize(
    "example",
    sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")),
)
def test_example(example: str, config: dict[str, Any], tmp_path: Path) -> None:
    source = (EXAMPLES / example).read_text()
    expected = expected_lines(source)
    assert expected, f"{example} says nothing about what it prints"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    env = {**os.environ, "SHEEPDOG_CONFIG": str(config_file)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / example)],
        cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, f"{example} failed:\n{done.stdout}\n{done.stderr}"
    printed = [line.strip() for line in done.stdout.splitlines()]
    position = 0
    for line in expected:
        assert line in printed[position:], (
            f"{example} should print {line!r}; it printed:\n{done.stdout}\n{done.stderr}"
        )
        position = printed.index(line, position) + 1


def test_every_example_is_in_the_docs() -> None:
    docs = "".join(p.read_text() for p in EXAMPLES.parent.glob("*.rst"))
    for example in EXAMPLES.glob("*.py"):
        if not example.name.startswith("_"):
            assert f"examples/{example.name}" in docs, f"{example.name} is not shown in the docs"


def test_readme_examples(config: dict[str, Any], tmp_path: Path) -> None:
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    section = readme.split("## Ten lines", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2, "the README's ten lines and its Executor example"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(dict(config, dbfile="./sheepdog.sqlite")))
    code = "\n".join(blocks).replace('".cluster/cluster.json"', repr(str(config_file)))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[0] == "[2, 3, 4]"
    assert lines[1] == "[((3, 4), 7), ((5, 'x'), None)]"
    assert lines[2].startswith("TypeError: unsupported operand")
    assert "Remote traceback" in done.stdout
    assert lines[-1] == str(sum(2 * i for i in range(100)))
