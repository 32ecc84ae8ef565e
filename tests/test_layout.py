"""The test suite's layout: a unit run never imports the end-to-end tests' cluster code.

The ``cluster`` fixture and cluster_fixture.py live in tests/e2e/, and tests/conftest.py,
which every run loads, must not reach them (a unit run has no cluster, and needs none).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Runs pytest in this process, then says which cluster modules it imported.
PROBE = """
import sys
import pytest
code = pytest.main(sys.argv[1:])
print("cluster modules imported:", sorted(
    name for name in sys.modules if name.split(".")[0] in ("cluster_fixture", "testcontainers")
))
sys.exit(code)
"""


def test_collecting_unit_tests_imports_no_cluster_code() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_config.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "tests/test_config.py::" in output, output[-3000:]
    assert "cluster modules imported: []" in output, output[-3000:]
