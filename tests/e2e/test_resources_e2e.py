"""Each typed resource option appears in the job file and is accepted by qsub."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

import sheepdog
from sheepdog.config import as_config
from sheepdog.job_file import job_file_name
from sheepdog.scheduler import open_remote
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e

#: The parallel environment the test cluster must define (see docker/sge-setup).
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


@pytest.mark.parametrize(
    ("options", "directive"),
    [
        ({"mem_gb": 1}, "#$ -l h_vmem=1G"),
        ({"mem_gb": 0.5, "mem_resource": "h_vmem"}, "#$ -l h_vmem=512M"),
        ({"h_rt": "0:10:00"}, "#$ -l h_rt=0:10:00"),
        ({"queue": "all.q"}, "#$ -q all.q"),
        ({"max_running": 2}, "#$ -tc 2"),
        ({"pe": [PE_NAME, 1]}, f"#$ -pe {PE_NAME} 1"),
    ],
    ids=["mem_gb", "mem_gb_mb", "h_rt", "queue", "max_running", "pe"],
)
def test_resource_option_in_job_file_and_accepted(
    config: dict[str, Any], options: dict[str, Any], directive: str
) -> None:
    cfg = dict(config, **options)
    request_id = sheepdog.map_async(one, [1, 2, 3], cfg)
    results = sheepdog.get_results(request_id, cfg["dbfile"], timeout_s=300)
    assert [r for _, r in results] == [2, 3, 4], sheepdog.get_errors(request_id, cfg["dbfile"])
    assert directive in _deployed_job_file(cfg, request_id).splitlines()
