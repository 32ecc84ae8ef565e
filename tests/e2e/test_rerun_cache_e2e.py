"""Reruns and the result cache on a real cluster.

The flag file lives in the config's ``ssh_dir``, which every node shares (it
holds the key files); the tasks read it, so it says "no" until the fix.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import sheepdog
from sheepdog import Config
from sheepdog.scheduler import open_remote

pytestmark = pytest.mark.e2e

WAIT_S = 300.0
REPO = Path(__file__).resolve().parents[2]


def flaky(x: int, flag: str) -> int:
    """Fails for odd x until the flag file (a path under the home directory) says yes."""
    import os

    with open(os.path.expanduser(flag)) as f:
        if x % 2 and f.read().strip() != "yes":
            raise RuntimeError(f"no flag for {x}")
    return x * 10


def on_head_node(config: dict[str, Any], command: str) -> None:
    with open_remote(Config.from_mapping(config)) as remote:
        result = remote.run(command, check=False, timeout_s=60)
    assert result.exit_status == 0, result.stderr


def test_rerun_failed_from_the_cli_keeps_the_earlier_errors(config: dict[str, Any]) -> None:
    ssh_dir = Config.from_mapping(config).ssh_dir
    name = f"{ssh_dir}/sheepdog-flag-{uuid.uuid4().hex[:8]}"
    flag = f"~/{name}"
    config = dict(config, retries=0)
    args = [(x, flag) for x in range(6)]
    on_head_node(config, f"echo no > ~/{shlex.quote(name)}")
    try:
        first = sheepdog.map(flaky, args, config, verbose=False, timeout_s=WAIT_S)
        assert first == [0, None, 20, None, 40, None]
        (request_id,) = [r["id"] for r in sheepdog.Storage(config["dbfile"]).list_requests()]
        on_head_node(config, f"echo yes > ~/{shlex.quote(name)}")
        done = subprocess.run(
            [sys.executable, "-m", "sheepdog", "rerun", str(request_id), "--failed", "--wait",
             "--dbfile", config["dbfile"]],
            capture_output=True, text=True, timeout=WAIT_S, check=False, cwd=REPO / "tests",
        )
        assert done.returncode == 0, done.stderr
        assert f"request {request_id}: running 3 tasks again (failed)" in done.stdout
        results = sheepdog.get_results(request_id, config["dbfile"], block=False)
        assert [r for _, r in results] == [0, 10, 20, 30, 40, 50]
        with sheepdog.Storage(config["dbfile"]) as storage:
            for index in (2, 4, 6):
                (earlier,) = storage.get_task_history(request_id, index)
                assert earlier["state"] == "error"
                assert earlier["error"]["message"] == f"no flag for {index - 1}"
            assert storage.get_task_history(request_id, 1) == []
            assert len(storage.get_jobs(request_id)) == 2
    finally:
        on_head_node(config, f"rm -f ~/{shlex.quote(name)}")


def tripled(x: int) -> int:
    return x * 3


def test_a_cached_map_submits_nothing(config: dict[str, Any]) -> None:
    assert sheepdog.map(tripled, range(4), config, verbose=False, timeout_s=WAIT_S) == [
        0, 3, 6, 9]
    assert sheepdog.map(tripled, range(4), config, verbose=False, timeout_s=WAIT_S,
                        cache=True) == [0, 3, 6, 9]
    rid = sheepdog.map_async(tripled, range(6), config, cache=True)
    results = sheepdog.get_results(rid, config["dbfile"], timeout_s=WAIT_S)
    assert [r for _, r in results] == [0, 3, 6, 9, 12, 15]
    with sheepdog.Storage(config["dbfile"]) as storage:
        first, cached, partly = (r["id"] for r in storage.list_requests())
        assert len(storage.get_jobs(first)) == 1
        assert storage.get_jobs(cached) == []  # every task from the cache: no job
        assert storage.count_cached(cached) == 4
        assert len(storage.get_jobs(partly)) == 1
        assert storage.count_cached(partly) == 4
