"""N ``Executor.submit`` calls end to end, with real stub workers as local processes.

No Grid Engine: the one stand-in is a deployer that starts each array task of
the job file as ``python3 <job file>`` with ``SGE_TASK_ID`` set, as SGE would,
against the real gunicorn server and database. Reports the time of the
submit loop, the time until every future is resolved, and how many finished
rows (and result bytes) the Executor read: once each, not N²/2.

    python -m benchmarks.executor_submits [--tasks N] [--workers W]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import sheepdog.executor
from sheepdog.executor import Executor
from sheepdog.job_file import key_file_name
from sheepdog.storage import Storage

WORKER_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


class LocalDeployer:
    """Runs a job's array tasks as local processes instead of SSH and qsub."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: dict[int, Path] = {}

    def absolute(self, directory: str) -> str:
        return str(self.workdir / directory)

    def deploy(self, jobfile: str, request_id: int, directory: str, *, secret: str) -> str:
        path = self.workdir / f"job_{request_id}.py"
        path.write_text(jobfile, encoding="utf-8")
        folder = Path(self.absolute(directory))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / key_file_name(request_id, secret)).write_text(secret + "\n")
        self.files[request_id] = path
        return str(path)

    def submit(self, request_id: int, directory: str, *, secret: str, qsub_args: Any = ()) -> str:
        path = self.files[request_id]
        match = re.search(r"^#\$ -t 1-(\d+)$", path.read_text(encoding="utf-8"), re.M)
        assert match is not None
        for task in range(1, int(match.group(1)) + 1):
            self.procs.append(subprocess.Popen(
                [WORKER_PYTHON, str(path)], cwd=self.workdir,
                env={"PATH": "/usr/bin:/bin", "SGE_TASK_ID": str(task)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        return str(1000 + request_id)

    def run(self, command: str, **_: Any) -> Any:
        raise sheepdog.SheepdogError(f"no Grid Engine here: {command}")

    def close(self) -> None:
        for proc in self.procs:
            proc.wait(timeout=600)


def increment(x: int) -> int:
    return x + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    read = {"rows": 0, "bytes": 0}
    real_since = Storage.finished_since

    def counting_since(self: Storage, request_id: int, after: int = 0) -> Any:
        mark, rows = real_since(self, request_id, after)
        read["rows"] += len(rows)
        read["bytes"] += sum(len(r or b"") for _, _, r, _ in rows)
        return mark, rows

    Storage.finished_since = counting_since  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        deployer = LocalDeployer(Path(tmp))
        sheepdog.executor.open_deployer = lambda config: deployer  # type: ignore[assignment]
        config = {"host": "local.invalid", "dbfile": f"{tmp}/db.sqlite",
                  "localhost": "127.0.0.1", "shell": WORKER_PYTHON, "workers": args.workers}
        start = time.monotonic()
        with Executor(config) as pool:
            futures = [pool.submit(increment, i) for i in range(args.tasks)]
            submitted_s = time.monotonic() - start
            done, _ = wait(futures, timeout=3600)
            total_s = time.monotonic() - start
            assert len(done) == args.tasks
            assert sum(f.result() for f in futures) == args.tasks * (args.tasks + 1) // 2
            requests = len(pool.request_ids)
        deployer.close()
    print(f"{args.tasks} submits, {args.workers} local workers, {requests} requests: "
          f"submit loop {submitted_s:.1f} s, all resolved {total_s:.1f} s "
          f"({args.tasks / total_s:.0f} tasks/s); finished rows read {read['rows']}, "
          f"result bytes read {read['bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
