"""The workers' memory and run-time limits, read by each scheduler's class from its options.

The job file passes them to the worker stub's ``Client`` (``mem_limit_bytes``,
``run_limit_s``); the options are the job file's directive lines, raw options and
what the typed resources stand for alike.
"""

from __future__ import annotations

import pytest

from sheepdog.config import Config
from sheepdog.scheduler.gridengine import GridEngine, parse_memory, parse_time
from sheepdog.scheduler.local import LocalScheduler
from sheepdog.scheduler.slurm import Slurm, parse_slurm_memory, parse_slurm_time, slurm_time

GiB, MiB = 1024**3, 1024**2


# ---- Grid Engine: memory ----


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1024", 1024),
        ("2G", 2 * GiB),
        ("2g", 2 * 10**9),
        ("500M", 500 * MiB),
        ("500m", 500 * 10**6),
        ("4k", 4000),
        ("4K", 4096),
        ("1T", 1024**4),
        ("1t", 10**12),
        ("1.5G", int(1.5 * GiB)),
        ("0x10K", 16 * 1024),
        ("010", 8),
        ("0", 0),
        (" 3M ", 3 * MiB),
        ("INFINITY", None),
        ("infinity", None),
    ],
)
def test_parse_memory(spec: str, expected: int | None) -> None:
    assert parse_memory(spec) == expected


@pytest.mark.parametrize("spec", ["", "2GB", "-1G", "G", "1e9", "2 G", "0x", "09"])
def test_parse_memory_rejects_nonsense(spec: str) -> None:
    with pytest.raises(ValueError, match="memory specifier"):
        parse_memory(spec)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["-l mem_grab=2G"], 2 * GiB),
        (["-l h_vmem=500M"], 500 * MiB),
        (["-l h_rt=1:00:00,mem_grab=2G"], 2 * GiB),
        (["-l h_rt=1:00:00,mem_grab=2G,h_vmem=1G"], 1 * GiB),
        (["-l h_vmem=3G", "-cwd -l mem_grab=1500M -r y"], 1500 * MiB),
        (["-soft -l h_vmem=1G -hard -l mem_grab=2G"], 2 * GiB),
        (["-soft -l h_vmem=1G"], None),
        (["-soft", "-l h_vmem=1G"], None),  # -soft holds across lines, as in the job file
        (["-l h_vmem=INFINITY"], None),
        (["-l h_vmem=0"], None),
        (["-l s_vmem=1G,mem_free=1G,virtual_free=1G"], None),
        (["-l"], None),
        ([], None),
    ],
)
def test_grid_engine_memory_limit(options: list[str], expected: int | None) -> None:
    assert GridEngine.memory_limit_bytes(options) == expected
    assert LocalScheduler.memory_limit_bytes(options) == expected  # its job files are SGE's


def test_grid_engine_memory_limit_bad_specifier_is_an_error() -> None:
    with pytest.raises(ValueError, match="'2GB'"):
        GridEngine.memory_limit_bytes(["-l h_vmem=2GB"])


# ---- Grid Engine: run time ----


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("20", 20), ("0:0:20", 20), ("1:30", 90), ("1:00:00", 3600), (" 2:0:5 ", 7205),
     ("INFINITY", None)],
)
def test_parse_time(spec: str, expected: int | None) -> None:
    assert parse_time(spec) == expected


@pytest.mark.parametrize("spec", ["", "1h", "1:2:3:4", "-5", "1.5"])
def test_parse_time_rejects_nonsense(spec: str) -> None:
    with pytest.raises(ValueError, match="not a Grid Engine time"):
        parse_time(spec)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["-l h_rt=0:0:20"], 20),
        (["-l mem_grab=2G,h_rt=1:00:00"], 3600),
        (["-l h_rt=600", "-l h_rt=0:5:0"], 300),  # the smaller wins
        (["-soft -l h_rt=60"], None),  # a soft request is no limit
        (["-l s_rt=60"], None),
        (["-l h_rt=INFINITY"], None),
        ([], None),
    ],
)
def test_grid_engine_run_limit(options: list[str], expected: int | None) -> None:
    assert GridEngine.run_limit_s(options) == expected
    assert LocalScheduler.run_limit_s(options) == expected


def test_grid_engine_limits_of_the_typed_resources_and_raw_options() -> None:
    config = Config(host="h", mem_gb=2, h_rt="1:00:00", ge_opts=("-l mem_grab=1500M",))
    options = config.job_options(GridEngine)
    assert GridEngine.memory_limit_bytes(options) == 1500 * MiB  # the raw option's is smaller
    assert GridEngine.run_limit_s(options) == 3600
    # mem_free is what a node has free, not a limit: the worker sets none for it.
    free = Config(host="h", mem_gb=2, mem_resource="mem_free")
    assert GridEngine.memory_limit_bytes(free.job_options(GridEngine)) is None


# ---- Slurm ----


@pytest.mark.parametrize(
    ("h_rt", "time"),
    [("3600", "1:00:00"), ("90", "0:01:30"), ("1:30:00", "1:30:00"), ("0:0:20", "0:00:20"),
     ("90000", "1-01:00:00"), ("48:00:00", "2-00:00:00")],
)
def test_slurm_reads_its_time_of_an_h_rt_back_to_the_same_seconds(h_rt: str, time: str) -> None:
    assert slurm_time(h_rt) == time
    assert parse_slurm_time(time) == parse_time(h_rt)


def test_slurm_limits_from_sbatch_options() -> None:
    options = ["--mem=2G", "--time=1:30:00", "-t 45", "--mem 3000"]
    assert Slurm.memory_limit_bytes(options) == 2 * GiB  # the smaller
    assert Slurm.run_limit_s(options) == 45 * 60  # a bare number is minutes
    assert Slurm.run_limit_s(["-t45"]) == 45 * 60
    assert parse_slurm_memory("0") is None  # all of the node's memory
    assert parse_slurm_time("UNLIMITED") is None
    assert Slurm.run_limit_s(["--time=UNLIMITED"]) is None
    assert parse_slurm_time("2-12") == (2 * 24 + 12) * 3600
    assert parse_slurm_time("1:30") == 90
    with pytest.raises(ValueError, match="Slurm memory size"):
        parse_slurm_memory("2GB")
    with pytest.raises(ValueError, match="Slurm time"):
        parse_slurm_time("1h")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--mem-per-cpu=1G"], 1024**3),  # one CPU per task unless asked
        (["--mem-per-cpu=1G --cpus-per-task=4"], 4 * 1024**3),
        (["--cpus-per-task 3", "--mem-per-cpu 500"], 3 * 500 * 1024**2),  # any order, MB alone
        (["-c4", "--mem-per-cpu=256M"], 1024**3),
        (["-c 2 --mem-per-cpu=1G"], 2 * 1024**3),
        (["--mem-per-cpu=1G", "--cpus-per-task=4", "--cpus-per-task=2"], 2 * 1024**3),
        (["--mem=3G", "--mem-per-cpu=1G", "-c 4"], 3 * 1024**3),  # the smaller
        (["--mem-per-cpu=0", "-c 4"], None),  # all of the node's memory
        (["--cpus-per-task=4"], None),
        (["--mem-per-gpu=1G"], None),  # not read: a GPU count is not in the job file
    ],
)
def test_slurm_memory_is_mem_per_cpu_times_cpus_per_task(
    options: list[str], expected: int | None
) -> None:
    assert Slurm.memory_limit_bytes(options) == expected


def test_slurm_limits_of_the_typed_resources_and_raw_options() -> None:
    config = Config(host="h", scheduler="slurm", mem_gb=2, h_rt="3600", pe=("smp", 4),
                    scheduler_opts=("--mem-per-cpu=256M",))
    options = config.job_options(Slurm)
    assert Slurm.memory_limit_bytes(options) == 1024**3  # 256M times the pe's 4 CPUs
    assert Slurm.run_limit_s(options) == 3600


@pytest.mark.parametrize("cpus", ["0", "-1", "two", "1.5", ""])
def test_a_bad_cpus_per_task_is_an_error_naming_it(cpus: str) -> None:
    with pytest.raises(ValueError, match=f"{cpus!r} is not a Slurm --cpus-per-task such as 4"):
        Slurm.memory_limit_bytes(["--mem-per-cpu=1G", f"--cpus-per-task={cpus}"])
