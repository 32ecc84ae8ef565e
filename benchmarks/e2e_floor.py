"""End to end against the floor: ``sheepdog.map`` of N trivial tasks against a raw array job.

Both sides run on the local cluster (``ci/cluster up``; ``.cluster/cluster.json``),
in the same run, alternating. sheepdog uses one task per array task
(``workers=N, batch=1, tasks_per_worker=1``). The floor opens its own SSH
connection, copies a trivial Python script, submits it as an array job and polls on the same
schedule as sheepdog's wait (0.2 s growing by 1.5x to 2 s) until the job has
left: ``qsub -t 1-N`` and ``qstat -j`` on Grid Engine, ``sbatch --array=1-N`` and ``squeue -j``
on Slurm (a config with ``"scheduler": "slurm"``; its figures go to ``e2e_floor_slurm.json``).
Both timings include opening the SSH connection.

    python -m benchmarks.e2e_floor [--quick] [--sizes 10,100] [--reps R] [--config FILE]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._report import ROOT, print_table, write_json

__all__ = ["main", "run_floor", "run_sheepdog"]

DEFAULT_CONFIG = ROOT / ".cluster" / "cluster.json"
FLOOR_SCRIPT = "import os\nprint('task', os.environ.get({variable!r}))\n"
TARGET_RATIO = 1.15


def _noop(x: int) -> int:
    return x


def run_sheepdog(config: Any, n: int, dbfile: Path) -> float:
    """Seconds for ``sheepdog.map`` of ``n`` trivial tasks, one per array task."""
    import sheepdog

    cfg = config.replace(workers=n, batch=1, tasks_per_worker=1, dbfile=str(dbfile))
    start = time.monotonic()
    results = sheepdog.map(_noop, range(n), cfg, verbose=False, timeout_s=600)
    elapsed = time.monotonic() - start
    if results != list(range(n)):
        raise RuntimeError(f"sheepdog.map returned wrong results for N={n}")
    return elapsed


def run_floor(config: Any, n: int, poll_s: float = 0.2, max_poll_s: float = 2.0) -> float:
    """Seconds to submit a trivial Python script as n array tasks and see the job leave."""
    if config.scheduler == "slurm":
        return run_slurm_floor(config, n, poll_s, max_poll_s)
    from sheepdog.scheduler import open_remote
    from sheepdog.scheduler.gridengine import parse_qsub_output

    start = time.monotonic()
    with open_remote(config) as remote:
        jobdir = remote.absolute(".sheepdog-bench")
        script = f"{jobdir}/floor.py"
        q = shlex.quote
        remote.run(f"mkdir -p {q(jobdir)}")
        remote.run(f"cat > {q(script)}", stdin=FLOOR_SCRIPT.format(variable="SGE_TASK_ID").encode())
        out = remote.run(
            f"cd {q(jobdir)} && qsub -terse -t 1-{n} -S {q(config.shell)} -wd {q(jobdir)}"
            f" -o {q(jobdir)} -e {q(jobdir)} {q(script)}"
        ).stdout
        job_id = parse_qsub_output(out).split(".")[0]
        interval, deadline = poll_s, time.monotonic() + 600
        while remote.run(f"qstat -j {job_id}", check=False).exit_status == 0:
            if time.monotonic() > deadline:
                remote.run(f"qdel {job_id}", check=False)
                raise RuntimeError(f"the floor job {job_id} (N={n}) did not finish in 600 s")
            time.sleep(interval)
            interval = min(max_poll_s, interval * 1.5)
        elapsed = time.monotonic() - start
        remote.run(f"rm -f {q(jobdir)}/floor.py.[oe]{job_id}.*", check=False)
    return elapsed


def _slurm_job_left(remote: Any, job_id: str) -> bool:
    """True once ``squeue -j`` no longer lists the job as pending, running or completing.

    squeue lists only those states by default; a job slurmctld has forgotten is an error
    naming the job id. Any other failure is not read as "gone".
    """
    result = remote.run(f"squeue -h -j {job_id} -o %T", check=False)
    if result.exit_status == 0:
        return not result.stdout.strip()
    return "Invalid job id" in result.stderr


def run_slurm_floor(config: Any, n: int, poll_s: float = 0.2, max_poll_s: float = 2.0) -> float:
    """Seconds to ``sbatch --array=1-n`` a trivial Python script and see it leave squeue."""
    from sheepdog.scheduler import open_remote

    start = time.monotonic()
    with open_remote(config) as remote:
        jobdir = remote.absolute(".sheepdog-bench")
        script = f"{jobdir}/floor.py"
        q = shlex.quote
        text = f"#!{config.shell}\n" + FLOOR_SCRIPT.format(variable="SLURM_ARRAY_TASK_ID")
        remote.run(f"mkdir -p {q(jobdir)}")
        remote.run(f"cat > {q(script)}", stdin=text.encode())
        out = remote.run(
            f"sbatch --parsable --array=1-{n} --chdir={q(jobdir)}"
            f" --output={q(jobdir)}/floor.%A.%a --error={q(jobdir)}/floor.%A.%a {q(script)}"
        ).stdout
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise RuntimeError(f"sbatch --parsable printed {out!r}, not a job id")
        interval, deadline = poll_s, time.monotonic() + 600
        while not _slurm_job_left(remote, job_id):
            if time.monotonic() > deadline:
                remote.run(f"scancel {job_id}", check=False)
                raise RuntimeError(f"the floor job {job_id} (N={n}) did not finish in 600 s")
            time.sleep(interval)
            interval = min(max_poll_s, interval * 1.5)
        elapsed = time.monotonic() - start
        remote.run(f"rm -f {q(jobdir)}/floor.{job_id}.*", check=False)
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the table, write bench-results/e2e_floor.json."""
    from sheepdog.config import as_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [10, 100] if args.quick else [10, 100, 1000])
    reps = args.reps or (1 if args.quick else 2)
    if not Path(args.config).exists():
        raise SystemExit(f"no cluster config at {args.config}: run 'ci/cluster up' first")
    config = as_config(args.config)
    runs: dict[int, dict[str, list[float]]] = {n: {"floor": [], "sheepdog": []} for n in sizes}
    with tempfile.TemporaryDirectory(prefix="sheepdog-bench-e2e-") as tmp:
        for rep in range(reps):
            for n in sizes:
                # Alternate which goes first, so a warm scheduler favours neither.
                order = ("floor", "sheepdog") if rep % 2 == 0 else ("sheepdog", "floor")
                for side in order:
                    if side == "floor":
                        seconds = run_floor(config, n)
                    else:
                        seconds = run_sheepdog(config, n, Path(tmp) / f"e2e-{n}-{rep}.sqlite")
                    runs[n][side].append(round(seconds, 3))
                    print(f"[bench] rep {rep + 1}/{reps} N={n} {side}: {seconds:.2f} s", flush=True)
    slurm = config.scheduler == "slurm"
    rows, summary = [], {}
    for n in sizes:
        floor = statistics.median(runs[n]["floor"])
        ours = statistics.median(runs[n]["sheepdog"])
        ratio = ours / floor
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        rows.append([n, floor, ours, f"{ratio:.2f}x", f"<= {TARGET_RATIO}x {verdict}"])
        summary[str(n)] = {"floor_s": floor, "sheepdog_s": ours, "ratio": round(ratio, 3),
                           "met": ratio <= TARGET_RATIO}
    print_table(
        f"End to end on the local {'Slurm' if slurm else 'Grid Engine'} cluster "
        f"({config.host}:{config.ssh_port}), median of {reps}",
        ["N", "raw sbatch --array s" if slurm else "raw qsub -t s", "sheepdog.map s", "ratio",
         "target"], rows,
    )
    data = {"quick": args.quick, "scheduler": config.scheduler, "sizes": sizes, "reps": reps,
            "summary": summary, "runs": runs}
    write_json("e2e_floor_slurm" if slurm else "e2e_floor", data)
    return data


if __name__ == "__main__":
    main()
