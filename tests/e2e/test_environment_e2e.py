"""The environment on the nodes, on a real cluster: doctor --check and the map-time warning.

The cluster's nodes run a Python with the standard library only: Flask, installed
here, is missing there. For a version that differs, the map's prologue puts a
stand-in ``flask`` package of version 0.0.1 on the workers' ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import flask
import pytest
from cluster_fixture import REPO

import sheepdog
from sheepdog.environment import local_versions

pytestmark = pytest.mark.e2e

WAIT_S = 300.0
FLASK = local_versions(["flask"])["flask"][1]


def uses_flask(x: int) -> str:
    return f"{flask.__name__}{x}"


def test_doctor_check_finds_a_module_missing_on_the_node(
    config: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "sheepdog", "doctor", str(path), "--timeout", str(WAIT_S),
         "--check", "flask,json"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=WAIT_S + 120, check=False,
    )
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    flat = " ".join(out.split())
    assert "FAIL module flask flask: missing on" in flat, out
    assert f"No module named 'flask'); {FLASK} here" in flat, out
    assert f"fix: install flask=={FLASK} for the workers' Python" in flat, out
    assert any(line.startswith("ok    module json") for line in lines), out
    assert lines[-1].endswith("fix and run it again"), out


def test_a_map_warns_once_of_a_module_version_that_differs_on_the_nodes(
    config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    prologue = [
        "D=$(mktemp -d)",
        "mkdir \"$D/flask\"",
        "echo '__version__ = \"0.0.1\"' > \"$D/flask/__init__.py\"",
        "PYTHONPATH=$D",
        "export PYTHONPATH",
    ]
    with caplog.at_level(logging.WARNING, logger="sheepdog"):
        results = sheepdog.map(uses_flask, range(6), dict(config, prologue=prologue),
                               timeout_s=WAIT_S)
    assert results == [f"flask{i}" for i in range(6)]
    said = [r.getMessage() for r in caplog.records if "modules differ" in r.getMessage()]
    assert len(said) == 1, said
    assert "flask: 0.0.1 on " in said[0] and f", {FLASK} here" in said[0], said[0]
