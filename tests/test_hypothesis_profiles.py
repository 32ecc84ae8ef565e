"""The test harness itself: property tests are reproducible and report failures readably.

A red CI run must fail the same way on a developer's machine, and a failing property test must
end as an ordinary failure with its minimal example (once it ended as an INTERNALERROR, because
hypothesis' reporter imports libcst, whose import warns, and our warning filters made that an
error). Each check runs pytest in a subprocess with this project's own configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

FAILING = '''
from hypothesis import given, strategies as st

@given(st.integers())
def test_fails(x):
    assert x < 5
'''

RECORDING = '''
import os
from hypothesis import given, strategies as st

@given(st.lists(st.integers()) | st.text())
def test_records(value):
    with open(os.environ["RECORD_TO"], "a") as out:
        out.write(repr(value) + "\\n")
'''

CONFTEST = '''
import os
import strategies
from hypothesis import settings

strategies.register_profiles()
settings.load_profile(os.environ["SHEEPDOG_HYPOTHESIS_PROFILE"])
'''


def run_pytest(tmp_path: Path, source: str, profile: str, **env: str) -> str:
    """Run one test file under the project's pytest configuration; return its output."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_it.py").write_text(source)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-q", str(tmp_path / "test_it.py")],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(TESTS), "SHEEPDOG_HYPOTHESIS_PROFILE": profile,
             **env},
    )
    return result.stdout + result.stderr


def test_a_failing_property_is_an_ordinary_failure(tmp_path: Path) -> None:
    output = run_pytest(tmp_path, FAILING, "ci")
    assert "INTERNALERROR" not in output, output[-3000:]
    assert "1 failed" in output, output[-3000:]
    assert "x=5" in output, output[-3000:]  # the minimal example is reported


def test_the_ci_profile_draws_the_same_examples_every_run(tmp_path: Path) -> None:
    runs = []
    for attempt in range(2):
        record = tmp_path / f"run{attempt}.txt"
        output = run_pytest(tmp_path, RECORDING, "ci", RECORD_TO=str(record))
        assert "1 passed" in output, output[-3000:]
        runs.append(record.read_text())
    assert runs[0] == runs[1]
    assert len(runs[0].splitlines()) >= 100  # the profile really ran its examples


def test_the_explore_profile_draws_new_examples(tmp_path: Path) -> None:
    runs = []
    for attempt in range(2):
        record = tmp_path / f"run{attempt}.txt"
        output = run_pytest(tmp_path, RECORDING, "explore", RECORD_TO=str(record))
        assert "1 passed" in output, output[-3000:]
        runs.append(record.read_text())
    assert runs[0] != runs[1]
