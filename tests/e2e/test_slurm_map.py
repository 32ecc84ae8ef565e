"""sheepdog.map on a real Slurm cluster: the quickstart, typed resources, a job that can never run.

Run with ``--cluster=slurm`` (the Slurm Docker cluster, docker/slurm/): the cluster's config
says ``"scheduler": "slurm"``. The whole end-to-end suite runs on Slurm too; these are the
first checks of the Slurm scheduler itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import sheepdog

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]


def add(a: int, b: int) -> int:
    return a + b


def test_the_quickstart_runs_on_slurm(config: dict[str, Any]) -> None:
    assert config["scheduler"] == "slurm"
    assert sheepdog.map(lambda a, b: a + b, [(1, 1), (1, 2), (2, 2)], config) == [2, 3, 4]
    with sheepdog.Storage(config["dbfile"]) as storage:
        (job,) = storage.get_jobs(_last_request(config))
    assert job.scheduler == "slurm"


def test_auto_finds_slurm_on_the_login_node(config: dict[str, Any]) -> None:
    # A config without the scheduler key, as every config before Slurm support.
    cfg = {key: value for key, value in config.items() if key != "scheduler"}
    assert sheepdog.Config.from_mapping(cfg).scheduler == "auto"
    assert sheepdog.map(add, [(1, 1), (1, 2), (2, 2)], cfg, verbose=False) == [2, 3, 4]
    with sheepdog.Storage(cfg["dbfile"]) as storage:
        (job,) = storage.get_jobs(_last_request(cfg))
    assert job.scheduler == "slurm"


def test_the_slurm_quickstart_of_the_docs_runs_as_shown(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/schedulers.rst's quickstart, with .cluster/slurm.json as ci/cluster up writes it."""
    from test_docs_blocks import block

    (tmp_path / ".cluster").mkdir()
    (tmp_path / ".cluster" / "slurm.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code = "\n".join(block("schedulers.rst", "import sheepdog").lines)
    exec(compile(code, "schedulers.rst", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == "[2, 3, 4]\n"


def what_slurm_gave(_: int) -> dict[str, Any]:
    """The task's own limits and what Slurm says about the job it runs in."""
    import os
    import resource
    import subprocess

    job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    record = subprocess.run(
        ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30,
        check=True,
    ).stdout
    fields = dict(word.split("=", 1) for word in record.split() if "=" in word)
    return {
        "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0],
        "mem_per_node_mb": os.environ.get("SLURM_MEM_PER_NODE"),
        "mem_per_cpu_mb": os.environ.get("SLURM_MEM_PER_CPU"),
        "partition": os.environ.get("SLURM_JOB_PARTITION"),
        "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
        "time_limit": fields.get("TimeLimit"),
        "array_task_throttle": fields.get("ArrayTaskThrottle"),
    }


def test_typed_resources_reach_slurm_and_the_worker(config: dict[str, Any]) -> None:
    cfg = dict(config, mem_gb=0.5, h_rt="600", queue="main", pe=("smp", 2), max_running=2,
               workers=2, timeout_s=240)
    results = sheepdog.map(what_slurm_gave, [1, 2], cfg, verbose=False)
    for got in results:
        assert got == {
            "rlimit_as": 512 * 1024**2,  # the stub's limit, from the job's own --mem
            "mem_per_node_mb": "512",
            "mem_per_cpu_mb": None,
            "partition": "main",
            "cpus_per_task": "2",
            "time_limit": "00:10:00",
            "array_task_throttle": "2",
        }, results


def test_the_worker_limits_itself_to_mem_per_cpu_times_its_cpus(config: dict[str, Any]) -> None:
    cfg = dict(config, scheduler_opts=["--mem-per-cpu=192M"], pe=("smp", 2), workers=1,
               timeout_s=240)
    (got,) = sheepdog.map(what_slurm_gave, [1], cfg, verbose=False)
    assert (got["rlimit_as"], got["mem_per_cpu_mb"], got["mem_per_node_mb"],
            got["cpus_per_task"]) == (2 * 192 * 1024**2, "192", None, "2"), got


def test_a_job_that_can_never_run_fails_fast_with_slurms_reason(config: dict[str, Any]) -> None:
    # Three nodes per array task from a partition of two: Slurm takes the job (its
    # EnforcePartLimits is NO, the default) and keeps it PENDING with PartitionNodeLimit.
    cfg = dict(config, scheduler_opts=["--nodes=3"], timeout_s=240)
    started = time.monotonic()
    results = sheepdog.map(abs, [-1, -2], cfg, verbose=False)
    assert results == [None, None]
    assert time.monotonic() - started < 120
    errors = sheepdog.get_errors(_last_request(cfg), cfg["dbfile"])
    assert len(errors) == 2
    for _arg, error in errors:
        assert error.kind == "unschedulable"
        assert "Slurm can never start job" in error.message
        assert "PartitionNodeLimit" in error.message


def test_a_request_slurm_refuses_fails_at_once_with_sbatchs_words(
    config: dict[str, Any],
) -> None:
    cfg = dict(config, mem_gb=1000)  # more than any node has
    started = time.monotonic()
    with pytest.raises(sheepdog.SubmitError) as info:
        sheepdog.map(abs, [-1], cfg)
    assert time.monotonic() - started < 60
    assert "sbatch" in info.value.command and "--parsable" in info.value.command
    assert "Memory specification can not be satisfied" in info.value.stderr


def _last_request(config: dict[str, Any]) -> int:
    with sheepdog.Storage(config["dbfile"]) as storage:
        return max(r["id"] for r in storage.list_requests())
