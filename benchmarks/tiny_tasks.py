"""Tiny tasks: 10,000 no-op tasks, sheepdog's defaults against dask-jobqueue's ``SGECluster``.

Both run on the same Grid Engine cluster with the same number of slots, in the
same run, each timed from before it touches the cluster (dask: creating the
``SGECluster``; sheepdog: calling ``map``) until every result is back; imports
are outside the clock. dask-jobqueue calls ``qsub`` where it runs, so this
needs the NATIVE cluster (``ci/cluster up --native``): its side runs on this
host as the cluster user (``runuser``) from ``.venv-dask``, a virtualenv of
its own made with the system Python so that the cluster user can read it.

On Slurm (a config with ``"scheduler": "slurm"``, such as ``.cluster/slurm.json``) only
sheepdog's side runs, with the same defaults, and its figure goes to ``tiny_tasks_slurm.json``:
dask-jobqueue's SLURMCluster would call ``sbatch`` on this host, which the Docker Slurm cluster
does not offer. ``--alone`` runs sheepdog's side only on a Grid Engine cluster (the Docker one,
``docker-tiny`` in ``ci/bench``: 100,000 tasks, against issue #25's target of 20 s), to
``tiny_tasks_docker.json``.

    python -m benchmarks.tiny_tasks [--quick] [--tasks N] [--config FILE] [--alone]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._report import ROOT, print_table, write_json

__all__ = ["DASK_VENV", "ensure_dask_venv", "main", "run_dask", "run_sheepdog"]

DASK_VENV = ROOT / ".venv-dask"
NATIVE_CONFIG = ROOT / ".cluster" / "native.json"
SYSTEM_PYTHON = "/usr/bin/python3"
#: Issue #25: a map of 100,000 tiny tasks, end to end on the Docker cluster, in under 20 s.
SCALE_TASKS = 100_000
SCALE_TARGET_S = 20.0

_DASK_SIDE = r"""
import json, sys, time
from dask_jobqueue import SGECluster
from distributed import Client, wait

n, slots, logdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def noop(x):
    return x

start = time.monotonic()
cluster = SGECluster(cores=1, processes=1, memory="1GB", walltime="01:00:00",
                     log_directory=logdir, local_directory=logdir, python=sys.executable,
                     job_extra_directives=["-S /bin/bash"], death_timeout=120,
                     scheduler_options={"dashboard_address": None})
cluster.scale(jobs=slots)
client = Client(cluster)
futures = client.map(noop, range(n), pure=False)
wait(futures, timeout=1200)  # bounded: raises if the workers never start
results = client.gather(futures)
elapsed = time.monotonic() - start
assert results == list(range(n)), "dask returned wrong results"
close_start = time.monotonic()
client.close()
cluster.close()
print(json.dumps({"seconds": round(elapsed, 3),
                  "close_s": round(time.monotonic() - close_start, 3)}), flush=True)
"""


def _noop(x: int) -> int:
    return x


def ensure_dask_venv() -> Path:
    """Create ``.venv-dask`` (system Python, readable by the cluster user); return its python."""
    python = DASK_VENV / "bin" / "python"
    check = [str(python), "-c", "import dask_jobqueue, distributed"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"[bench] installing dask-jobqueue and distributed into {DASK_VENV}", flush=True)
    # The system Python, not ours: ours may live under a home the cluster user cannot read.
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--clear", str(DASK_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "dask-jobqueue", "distributed"], check=True)
    subprocess.run(check, check=True)
    return python


def total_slots(config: Any) -> int:
    """The cluster's total slots, from ``qstat -g c`` on the head node."""
    from sheepdog.scheduler import open_remote

    with open_remote(config) as remote:
        out = remote.run("qstat -g c").stdout
    lines = out.splitlines()
    try:
        column = lines[0].split().index("TOTAL") - 1  # "CLUSTER QUEUE" is two words
        totals = [int(line.split()[column]) for line in lines[2:] if line.split()]
    except (IndexError, ValueError):
        totals = []
    if not sum(totals):
        raise RuntimeError(f"cannot read the slot count from qstat -g c:\n{out}")
    return sum(totals)


def slurm_cpus(config: Any) -> int:
    """The Slurm cluster's total CPUs: each node's once, though it is in several partitions."""
    from sheepdog.scheduler import open_remote

    with open_remote(config) as remote:
        out = remote.run("sinfo -h -N -o '%N %c'").stdout
    try:
        cpus = {node: int(count.rstrip("+")) for node, count in map(str.split, out.splitlines())}
    except ValueError:
        cpus = {}
    if not cpus:
        raise RuntimeError(f"cannot read nodes and CPUs from sinfo -h -N -o '%N %c':\n{out}")
    return sum(cpus.values())


def main_alone(config: Any, n: int, quick: bool, name: str, where: str) -> dict[str, Any]:
    """sheepdog's side alone on ``where``: print its row, write ``bench-results/<name>.json``."""
    slots = slurm_cpus(config) if config.scheduler == "slurm" else total_slots(config)
    with tempfile.TemporaryDirectory(prefix="sheepdog-bench-tiny-") as tmp:
        ours = run_sheepdog(config, n, Path(tmp) / "tiny.sqlite")
    print(f"[bench] sheepdog on {where}, {n:,} tasks: {ours:.2f} s", flush=True)
    rows: list[list[Any]] = [["sheepdog.map (defaults)", ours, n / ours]]
    headers = ["tool", "seconds", "tasks/s"]
    data = {"quick": quick, "cluster": where, "n_tasks": n, "slots": slots,
            "sheepdog_s": round(ours, 3)}
    if n >= SCALE_TASKS:
        met = ours < SCALE_TARGET_S
        headers.append("target")
        rows[0].append(f"< {SCALE_TARGET_S:g} s: {'met' if met else 'MISSED'}")
        data.update(target_s=SCALE_TARGET_S, met=met)
    print_table(f"Tiny tasks on {where}: {n:,} no-ops on {slots} slots", headers, rows)
    write_json(name, data)
    return data


def run_sheepdog(config: Any, n: int, dbfile: Path) -> float:
    """Seconds for ``sheepdog.map`` of ``n`` no-op tasks with the default settings."""
    import sheepdog

    start = time.monotonic()
    results = sheepdog.map(_noop, range(n), config.replace(dbfile=str(dbfile)), verbose=False,
                           timeout_s=1800)
    elapsed = time.monotonic() - start
    if results != list(range(n)):
        raise RuntimeError("sheepdog.map returned wrong results")
    return elapsed


def run_dask(config: Any, n: int, slots: int) -> dict[str, Any]:
    """Run the dask-jobqueue side as the cluster user; return its seconds and close time."""
    python = ensure_dask_venv()
    workdir = Path(tempfile.mkdtemp(prefix="sheepdog-bench-dask-"))
    try:
        os.chmod(workdir, 0o777)
        script = workdir / "dask_side.py"
        script.write_text(_DASK_SIDE, encoding="utf-8")
        os.chmod(script, 0o644)
        user = config.ssh_user
        command = [str(python), str(script), str(n), str(slots), str(workdir)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", user, "--", "env", f"HOME=/home/{user}", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                              cwd=workdir)
        if proc.returncode != 0:
            raise RuntimeError(
                f"the dask-jobqueue side failed (status {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        figures: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return figures
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the table, write bench-results/tiny_tasks.json."""
    from sheepdog.config import as_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--config", default=str(NATIVE_CONFIG))
    parser.add_argument("--alone", action="store_true",
                        help="sheepdog's side only (a Docker cluster: dask-jobqueue would need "
                        "qsub on this host), written to tiny_tasks_docker.json")
    args = parser.parse_args(argv)
    n = args.tasks or (2000 if args.quick else 10_000)
    if not Path(args.config).exists():
        raise SystemExit(f"no native cluster config at {args.config}: "
                         "run 'ci/cluster up --native' first")
    config = as_config(args.config)
    if config.scheduler == "slurm":
        return main_alone(config, n, args.quick, "tiny_tasks_slurm", "Slurm")
    if args.alone:
        return main_alone(config, n, args.quick, "tiny_tasks_docker", "the Docker cluster")
    slots = total_slots(config)
    with tempfile.TemporaryDirectory(prefix="sheepdog-bench-tiny-") as tmp:
        dask = run_dask(config, n, slots)
        print(f"[bench] dask-jobqueue, {n:,} tasks on {slots} slots: {dask}", flush=True)
        ours = run_sheepdog(config, n, Path(tmp) / "tiny.sqlite")
        print(f"[bench] sheepdog, {n:,} tasks: {ours:.2f} s", flush=True)
    ratio = dask["seconds"] / ours
    met = ours < dask["seconds"]
    print_table(
        f"Tiny tasks: {n:,} no-ops on {slots} slots, cluster start included",
        ["tool", "seconds", "tasks/s", "speed-up", "target"],
        [["dask-jobqueue SGECluster", dask["seconds"], n / dask["seconds"], "1.0x", "-"],
         ["sheepdog.map (defaults)", ours, n / ours, f"{ratio:.1f}x",
          f"faster: {'met' if met else 'MISSED'}"]],
    )
    data = {"quick": args.quick, "n_tasks": n, "slots": slots, "dask": dask,
            "sheepdog_s": round(ours, 3), "speedup": round(ratio, 2), "met": met}
    write_json("tiny_tasks", data)
    return data


if __name__ == "__main__":
    main()
