"""Each typed resource option appears in the job file and is accepted by qsub or sbatch."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
from cluster_fixture import scheduler_of

import sheepdog
from sheepdog.config import as_config
from sheepdog.job_file import job_file_name
from sheepdog.scheduler import open_remote
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e

#: The parallel environment the Grid Engine test cluster must define (see docker/sge-setup);
#: on Slurm, its slots are CPUs per task.
PE_NAME = "smp"


def one(x: int) -> int:
    return x + 1


def _deployed_job_file(config: dict[str, Any], request_id: int) -> str:
    cfg = as_config(config)
    with Storage(cfg.dbfile) as storage:
        name = job_file_name(request_id, storage.get_secret(request_id))
    with open_remote(cfg) as remote:
        path = remote.absolute(cfg.ssh_dir) + "/" + name
        return remote.run(f"cat {shlex.quote(path)}").stdout


#: Each typed resource option and the directive it becomes, by scheduler. The partition
#: "main" and the parallel environment PE_NAME are the test clusters' (docker/slurm, sge-setup).
CASES: dict[str, dict[str, tuple[dict[str, Any], str]]] = {
    "mem_gb": {
        "gridengine": ({"mem_gb": 1}, "#$ -l h_vmem=1G"),
        "slurm": ({"mem_gb": 1}, "#SBATCH --mem=1G"),
    },
    "mem_gb_mb": {
        "gridengine": ({"mem_gb": 0.5, "mem_resource": "h_vmem"}, "#$ -l h_vmem=512M"),
        "slurm": ({"mem_gb": 0.5}, "#SBATCH --mem=512M"),
    },
    "h_rt": {
        "gridengine": ({"h_rt": "0:10:00"}, "#$ -l h_rt=0:10:00"),
        "slurm": ({"h_rt": "0:10:00"}, "#SBATCH --time=0:10:00"),
    },
    "queue": {
        "gridengine": ({"queue": "all.q"}, "#$ -q all.q"),
        "slurm": ({"queue": "main"}, "#SBATCH --partition=main"),
    },
    "max_running": {
        "gridengine": ({"max_running": 2}, "#$ -tc 2"),
        "slurm": ({"max_running": 2}, "#SBATCH --array=1-3%2"),
    },
    "pe": {
        "gridengine": ({"pe": [PE_NAME, 1]}, f"#$ -pe {PE_NAME} 1"),
        "slurm": ({"pe": [PE_NAME, 1]}, "#SBATCH --cpus-per-task=1"),
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resource_option_in_job_file_and_accepted(config: dict[str, Any], case: str) -> None:
    options, directive = CASES[case][scheduler_of(config)]
    cfg = dict(config, **options)
    request_id = sheepdog.map_async(one, [1, 2, 3], cfg)
    results = sheepdog.get_results(request_id, cfg["dbfile"], timeout_s=300)
    assert [r for _, r in results] == [2, 3, 4], sheepdog.get_errors(request_id, cfg["dbfile"])
    assert directive in _deployed_job_file(cfg, request_id).splitlines()
