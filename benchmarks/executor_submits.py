"""N ``Executor.submit`` calls end to end, with real stub workers as local processes.

No Grid Engine: ``scheduler="local"`` starts each array task of the job file
as a local process with ``SGE_TASK_ID`` set, as SGE would, against the real
gunicorn server and database. Reports the time of the
submit loop, the time until every future is resolved, and how many finished
rows (and result bytes) the Executor read: once each, not N²/2.

    python -m benchmarks.executor_submits [--quick] [--tasks N] [--workers W]

--quick: 10,000 submits instead of 100,000. In ``ci/bench`` as ``executor``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

from benchmarks._report import print_table, write_json
from sheepdog.executor import Executor
from sheepdog.storage import Storage

WORKER_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def increment(x: int) -> int:
    return x + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 submits")
    parser.add_argument("--tasks", type=int, default=None, help="default 100,000")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.tasks is None:
        args.tasks = 10_000 if args.quick else 100_000
    read = {"rows": 0, "bytes": 0}
    real_since = Storage.finished_since

    def counting_since(self: Storage, request_id: int, after: int = 0) -> Any:
        mark, rows = real_since(self, request_id, after)
        read["rows"] += len(rows)
        read["bytes"] += sum(len(r or b"") for _, _, r, _ in rows)
        return mark, rows

    Storage.finished_since = counting_since  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        config = {"scheduler": "local", "ssh_dir": f"{tmp}/jobs", "dbfile": f"{tmp}/db.sqlite",
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
    rate = args.tasks / total_s
    print_table(
        f"Executor: {args.tasks:,} submits, {args.workers} local workers, {requests} requests",
        ["figure", "value"],
        [["submit loop (s)", round(submitted_s, 2)], ["all resolved (s)", round(total_s, 2)],
         ["tasks/s", round(rate)], ["finished rows read", read["rows"]],
         ["result bytes read", read["bytes"]],
         ["rows read per task (target 1)", round(read["rows"] / args.tasks, 3)]],
    )
    write_json("executor_submits", {
        "quick": args.quick, "n_tasks": args.tasks, "workers": args.workers,
        "requests": requests, "submit_loop_s": submitted_s, "resolved_s": total_s,
        "tasks_per_s": rate, "finished_rows_read": read["rows"],
        "result_bytes_read": read["bytes"], "met": read["rows"] == args.tasks,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
