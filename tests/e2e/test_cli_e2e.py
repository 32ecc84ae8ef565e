"""Every ``sheepdog`` CLI command against requests run on a real cluster (Grid Engine, Slurm)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import hold_option, release_once_served, scheduler_of

import sheepdog
from sheepdog.config import as_config
from sheepdog.scheduler import scheduler_class
from sheepdog.server_for import server_for

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
WAIT_S = 300.0


def shout(x: int) -> int:
    print(f"shouting {x}")
    if x == 3:
        raise ValueError("three is too loud")
    return x * 10


def slow(x: int) -> int:
    time.sleep(x)
    return x


def cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``sheepdog`` in a new process, where this module imports as ``test_cli_e2e``
    (from tests/e2e, with the cluster fixture beside it)."""
    done = subprocess.run(
        [sys.executable, "-m", "sheepdog", *argv], capture_output=True, text=True,
        timeout=WAIT_S, check=False, cwd=HERE,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def config_file(config: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return str(path)


def test_read_commands(config: dict[str, Any]) -> None:
    db = config["dbfile"]
    rid = sheepdog.map_async(shout, [1, 2, 3], config)
    out = cli("status", str(rid), "--wait", "--timeout", str(WAIT_S), "--dbfile", db).stdout
    # One vocabulary: `requests` calls this request "finished" too (status said "open").
    assert f"request {rid}: finished, 2/3 done, 1 failed, 0 running, 0 pending" in out
    assert "array tasks" in out
    out = cli("requests", "--dbfile", db).stdout
    assert [line.split()[3:9] for line in out.splitlines()[1:]] == [
        ["finished", "3", "2", "1", "0", "0"]
    ]
    out = cli("results", str(rid), "--json", "--dbfile", db).stdout
    assert [row["result"] for row in json.loads(out)] == [10, 20, None]
    out = cli("errors", str(rid), "--dbfile", db).stdout
    assert "ValueError: three is too loud" in out
    assert "Remote traceback" in out
    assert ", in shout\n" in out  # the frame of the user's function, on the worker
    out = cli("logs", str(rid), "2", "--stream", "stdout", "--dbfile", db).stdout
    assert out == "shouting 2\n"


def test_cancel(config: dict[str, Any], config_file: str) -> None:
    rid = sheepdog.map_async(slow, [60] * 4, config)
    done = cli("cancel", str(rid), "--config", config_file)
    assert "cancelled 4 open tasks" in done.stdout
    counts = cli("status", str(rid), "--dbfile", config["dbfile"]).stdout
    assert "0/4 done, 0 failed, 4 cancelled" in counts  # cancelled apart from failed


def test_serve_restarts_the_server_on_the_submitted_port(config: dict[str, Any]) -> None:
    db = config["dbfile"]
    held = [*config.get("scheduler_opts", []), hold_option(config)]
    rid = sheepdog.map_async(slow, [1] * 6, dict(config, workers=2, batch=1,
                                                  scheduler_opts=held))
    server = server_for(as_config(config))
    port = server.port
    server.stop()  # the user's Python is gone; the jobs still call back to this port
    # Held until serve's server answers: a fast cluster could otherwise finish the tasks first
    # (ci-run6, Slurm: "nothing to serve").
    releasing = release_once_served(config, db, rid, WAIT_S)
    done = cli("serve", "--dbfile", db, "--timeout", str(WAIT_S))
    releasing.join(timeout=WAIT_S)
    assert f"serving requests {rid} on port {port}" in done.stdout
    assert [r for _, r in sheepdog.get_results(rid, db, block=False)] == [1] * 6


def test_worker_stub_and_jobfile(config: dict[str, Any], config_file: str) -> None:
    assert cli("worker-stub").stdout.startswith('"""sheepdog worker stub')
    done = cli("jobfile", "test_cli_e2e:shout", "--args", "[1, 2]", "--config", config_file)
    # The cluster's scheduler's own directives: `#$ -t 1-2` or `#SBATCH --array=1-2`.
    directives = scheduler_class(scheduler_of(config)).directives(config["shell"], 2, [])
    assert set(directives) <= set(done.stdout.splitlines()), done.stdout
    assert "2 tasks" in done.stderr
