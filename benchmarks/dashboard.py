"""How long the dashboard takes to draw a request of 100,000 tasks, and how big the page is.

A database is filled with one finished request of N tasks (default 100,000)
spread over 50 nodes of 8 workers, some failed and some lost, as a real run
leaves it (:func:`populate`), and the dashboard's pages are asked for through
Flask's test client: the request page (timeline, throughput, failures), the
live charts a running page swaps in, the progress JSON it polls, and the
requests list. Each is timed over several rounds; the figure is the median.
The target: the request page in under a second, and a page whose size does
not grow with the number of tasks.

    python -m benchmarks.dashboard [--quick] [--tasks N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._report import print_table, write_json
from sheepdog.storage import Storage

#: Nodes and workers per node of the made-up run.
NODES = 50
WORKERS_PER_NODE = 8


def populate(storage: Storage, n_tasks: int, *, fail_every: int = 97, lost_every: int = 1009,
             task_s: float = 2.0) -> int:
    """Store one finished request of ``n_tasks`` as a run on a cluster leaves it; return its id.

    It ended just now. Each worker ran its tasks one after another, ``task_s``
    seconds each; every ``fail_every``-th task raised a ValueError (with output),
    every ``lost_every``-th was lost. Written straight into the tasks' rows: a
    stand-in for a real run, for the benchmark and the dashboard's unit tests.
    """
    rid = storage.new_request(b"f", None, [b"a"] * n_tasks, settings={
        "function": "bench.simulate", "config": {"scheduler": "gridengine"}})
    workers = NODES * WORKERS_PER_NODE
    start = time.time() - (n_tasks // workers + 1) * task_s  # it finished a moment ago
    rows = []
    for idx in range(1, n_tasks + 1):
        w = (idx - 1) % workers
        host = f"node{w // WORKERS_PER_NODE:02d}"
        began = start + ((idx - 1) // workers) * task_s + (w % 7) * 0.01
        if idx % lost_every == 0:
            state, error = "error", ('{"kind": "lost", "type": "WorkerLost", "message": '
                                     f'"no heartbeat from {host}", "traceback": ""}}')
        elif idx % fail_every == 0:
            state, error = "error", ('{"kind": "exception", "type": "ValueError", "message": '
                                     f'"bad input {idx}", "traceback": "Traceback (most recent '
                                     f'call last):\\nValueError: bad input {idx}\\n"}}')
        else:
            state, error = "done", None
        rows.append((state, error, f"{host}:{1000 + w}:{w + 1}", host, began,
                     began + task_s * 0.9, f"task {idx} says hello\n" if error else None,
                     rid, idx))
    with storage._write() as conn:
        conn.execute("UPDATE requests SET created = ? WHERE id = ?", (start - 5.0, rid))
        conn.executemany(
            "UPDATE tasks SET state = ?, error = ?, worker = ?, host = ?, started = ?,"
            " finished = ?, stdout = ?, attempts = 1 WHERE request_id = ? AND idx = ?", rows)
    return rid


def _median_s(fetch: object, rounds: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds of ``fetch()``, and the page's size in bytes."""
    times = []
    cpu = []
    size = 0
    for _ in range(rounds):
        began, began_cpu = time.perf_counter(), time.process_time()
        response = fetch()  # type: ignore[operator]
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
        assert response.status_code == 200, response.status_code
        size = len(response.data)
    return statistics.median(times), statistics.median(cpu), size


def main() -> None:
    from sheepdog.dashboard.views import create_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    with tempfile.TemporaryDirectory() as tmp:
        dbfile = str(Path(tmp) / "sheepdog.sqlite")
        with Storage(dbfile) as storage:
            began = time.perf_counter()
            rid = populate(storage, args.tasks)
            fill_s = time.perf_counter() - began
        token = "t" * 32
        client = create_app(dbfile, token).test_client()
        base = {"REMOTE_ADDR": "127.0.0.1"}
        pages = {
            "request page": f"/requests/{rid}?token={token}",
            "live charts": f"/requests/{rid}/charts?token={token}",
            "progress JSON": f"/requests/{rid}/progress?token={token}",
            "requests list": f"/?token={token}",
        }
        rows = []
        figures = {}
        for name, url in pages.items():
            median_s, cpu_s, size = _median_s(
                lambda url=url: client.get(url, environ_base=base), rounds)
            rows.append([name, round(median_s * 1000, 1), round(cpu_s * 1000, 1),
                         round(size / 1024, 1)])
            figures[name] = {"median_ms": round(median_s * 1000, 1),
                             "cpu_ms": round(cpu_s * 1000, 1), "bytes": size}
    print_table(f"dashboard: one request of {args.tasks:,} tasks ({NODES} nodes x "
                f"{WORKERS_PER_NODE} workers), median of {rounds}",
                ["page", "median ms", "CPU ms", "KiB"], rows)
    write_json("dashboard", {"tasks": args.tasks, "rounds": rounds,
                             "fill_s": round(fill_s, 2), "pages": figures})


if __name__ == "__main__":
    main()
