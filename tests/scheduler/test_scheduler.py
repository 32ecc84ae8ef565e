"""The scheduler seam: the ``scheduler`` key, neutral states, and the local scheduler itself.

The local scheduler runs real processes here; Grid Engine's parsers are in
test_gridengine.py and its commands run against a real cluster in tests/e2e.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sheepdog import poll as poll_module
from sheepdog.config import Config
from sheepdog.errors import ConfigError
from sheepdog.job_file import job_file
from sheepdog.poll import poll_until
from sheepdog.scheduler import (
    SCHEDULER_NAMES,
    SCHEDULERS,
    GridEngine,
    LocalHost,
    LocalScheduler,
    State,
    open_scheduler,
)
from sheepdog.scheduler import local as local_module
from sheepdog.scheduler.gridengine import neutral_state

WAIT_S = 60.0


def test_the_scheduler_key_names_the_valid_values() -> None:
    with pytest.raises(ConfigError, match="'auto', 'gridengine', 'slurm', 'local'") as info:
        Config(host="h", scheduler="pbs")
    assert info.value.key == "scheduler" and "'pbs'" in str(info.value)
    assert set(SCHEDULERS) | {"auto"} == set(SCHEDULER_NAMES)


def test_old_configs_ask_the_head_node_and_local_needs_no_host() -> None:
    # No scheduler key: "auto", which finds Grid Engine on a Grid Engine head node (see
    # test_slurm.py for the detection itself).
    assert Config.from_mapping({"host": "fear"}).scheduler == "auto"
    with pytest.raises(ConfigError, match="host"):
        Config()
    local = Config(scheduler="local")
    assert local.host == "" and local.as_dict()["scheduler"] == "local"
    assert isinstance(open_scheduler(local), LocalScheduler)
    assert isinstance(open_scheduler(Config(host="h", scheduler="gridengine")), GridEngine)


@pytest.mark.parametrize(
    ("native", "neutral"),
    [("qw", State.QUEUED), ("hqw", State.QUEUED), ("Rq", State.QUEUED), ("r", State.RUNNING),
     ("Rr", State.RUNNING), ("Eqw", State.ERROR), ("t", State.UNKNOWN), ("s", State.UNKNOWN),
     ("S", State.UNKNOWN), ("T", State.UNKNOWN)],
)
def test_grid_engine_states_in_neutral_words(native: str, neutral: State) -> None:
    assert neutral_state(native) is neutral


def test_the_job_file_takes_the_schedulers_directives_and_index_variable() -> None:
    class Other(GridEngine):
        array_index_var = "OTHER_TASK_ID"

        @classmethod
        def directives(
            cls, shell: str, array_size: int, options: object, *, max_running: int | None = None
        ) -> list[str]:
            return [f"#OTHER --array=1-{array_size}"]

    text = job_file("http://h:1/", "/k/key", 3, 5, "/usr/bin/python3", [], scheduler=Other)
    assert text.splitlines()[:2] == ["#!/usr/bin/python3", "#OTHER --array=1-5"]
    assert 'int(os.environ.get("OTHER_TASK_ID", "1"))' in text


def _script(folder: Path, body: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o700)
    return str(path)


def test_a_local_job_runs_each_array_task_with_its_index(tmp_path: Path) -> None:
    scheduler = LocalScheduler(LocalHost(), str(tmp_path))
    job = _script(tmp_path, 'echo "task $SGE_TASK_ID of job $JOB_ID"; exit 42')
    job_id = scheduler.submit(job, name="job.sh", array_size=2)
    assert poll_until(lambda: scheduler.status([job_id]) == {}, timeout_s=WAIT_S)
    for task in (1, 2):
        out = (tmp_path / f"job.sh.o{job_id}.{task}").read_text()
        assert out == f"task {task} of job {job_id}\n"
    assert scheduler.accounting(job_id) == "the array task exited with status 42 on localhost"
    assert stat.S_IMODE(os.stat(tmp_path / f".local-job-{job_id}.json").st_mode) == 0o600


def test_a_running_local_job_is_listed_and_deleted_by_name(tmp_path: Path) -> None:
    scheduler = LocalScheduler(LocalHost(), str(tmp_path))
    job = _script(tmp_path, "exec sleep 600")
    job_id = scheduler.submit(job, name="sleepy", array_size=2)
    listed = scheduler.status([job_id, "12345"])
    assert list(listed) == [job_id] and listed[job_id].running
    deletion = scheduler.delete(["sleepy"])
    assert deletion.job_ids == [job_id] and deletion.error is None
    assert deletion.describe() == f"deleted local job {job_id}"
    assert scheduler.status([job_id]) == {}
    assert "SIGTERM" in scheduler.accounting(job_id)


def test_another_process_sees_a_local_job_from_its_state_file(tmp_path: Path) -> None:
    started = LocalScheduler(LocalHost(), str(tmp_path))
    job_id = started.submit(_script(tmp_path, "exec sleep 600"), name="x", array_size=1)
    popen = local_module._STARTED.pop(job_id)  # as if another process had started it
    try:
        other = LocalScheduler(LocalHost(), str(tmp_path))
        assert other.status([job_id])[job_id].running
        assert other.delete([job_id]).job_ids == [job_id]
        assert other.status([job_id]) == {}
    finally:
        for proc in popen.procs:
            proc.kill()
            proc.wait()


def test_poll_until_is_bounded_and_grows_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(round(seconds, 6))
        clock[0] += seconds

    monkeypatch.setattr(poll_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(poll_module.time, "sleep", sleep)
    assert poll_until(lambda: False, timeout_s=1.0, interval_s=0.1, max_interval_s=0.3) is False
    assert pauses == [0.1, 0.15, 0.225, 0.3, 0.225]  # the last pause ends at the deadline
    assert clock[0] == pytest.approx(1.0)
    answers = iter([False, False, True])
    assert poll_until(lambda: next(answers), timeout_s=None, interval_s=0.1) is True
    assert poll_until(lambda: True, timeout_s=0) is True
