"""Scale of a request: ``map_async`` of 100,000 tasks on the local cluster.

Measured in a fresh subprocess (so the peak memory is that of one call): the
time ``map_async`` takes to return, the client's peak RSS (``ru_maxrss``,
interpreter included) and tracemalloc peak, the server's peak RSS (gunicorn
master and workers, ``VmHWM`` summed) and the SQLite file's size. The
request is cancelled with ``sheepdog.cancel`` right after.

    python -m benchmarks.scale [--quick] [--tasks N] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._report import ROOT, print_table, write_json

__all__ = ["main", "measure"]

DEFAULT_CONFIG = ROOT / ".cluster" / "cluster.json"
TARGET_S = 5.0
TARGET_MB = 300.0

_CHILD = r"""
import json, os, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[4])
import sheepdog
from sheepdog.server_for import server_for
from sheepdog.config import as_config
from benchmarks.scale import _tree_peak_rss_mb, _noop

config = as_config(sys.argv[1]).replace(dbfile=sys.argv[2])
n, traced = int(sys.argv[3]), sys.argv[5] == "1"
if traced:
    tracemalloc.start()
start = time.monotonic()
request_id = sheepdog.map_async(_noop, range(n), config)
elapsed = time.monotonic() - start
traced_peak = tracemalloc.get_traced_memory()[1] / 2**20 if traced else None
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
server = server_for(config)
time.sleep(2)  # let the first workers call in, so the server has done some work
server_mb = _tree_peak_rss_mb(server.pid)
cancelled = sheepdog.cancel(request_id, config)
print(json.dumps({"seconds": round(elapsed, 3), "client_peak_rss_mb": round(rss_mb, 1),
                  "client_tracemalloc_peak_mb": traced_peak and round(traced_peak, 1),
                  "server_peak_rss_mb": round(server_mb, 1), "cancelled": cancelled,
                  "request_id": request_id}))
"""


def _noop(x: int) -> int:
    return x


def _tree_peak_rss_mb(root_pid: int | None) -> float:
    """Sum of VmHWM (peak RSS) over ``root_pid`` and its descendants, in MiB."""
    if root_pid is None:
        return float("nan")
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            pass
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


def measure(config_file: str, n: int, workdir: Path, traced: bool) -> dict[str, Any]:
    """One ``map_async`` of ``n`` tasks in a subprocess; its figures plus the file size."""
    dbfile = workdir / f"scale-{n}-{int(traced)}.sqlite"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, config_file, str(dbfile), str(n), str(ROOT),
         "1" if traced else "0"],
        capture_output=True, text=True, timeout=900, cwd=workdir,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the scale run failed (status {proc.returncode}):\n{proc.stderr}")
    figures: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in workdir.glob(f"{dbfile.name}*") if p.is_file())
    figures["sqlite_mb"] = round(size / 2**20, 1)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurement, print the table, write bench-results/scale.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    if not Path(args.config).exists():
        raise SystemExit(f"no cluster config at {args.config}: run 'ci/cluster up' first")
    with tempfile.TemporaryDirectory(prefix="sheepdog-bench-scale-") as tmp:
        plain = measure(args.config, args.tasks, Path(tmp), traced=False)
        print(f"[bench] map_async of {args.tasks:,}: {plain}", flush=True)
        traced = {} if args.quick else measure(args.config, args.tasks, Path(tmp), traced=True)
        if traced:
            print(f"[bench] with tracemalloc: {traced}", flush=True)
    ok_time = plain["seconds"] < TARGET_S
    ok_mem = plain["client_peak_rss_mb"] < TARGET_MB
    rows = [
        ["time to return (s)", plain["seconds"],
         f"< {TARGET_S:g} {'met' if ok_time else 'MISSED'}"],
        ["client peak RSS (MB)", plain["client_peak_rss_mb"],
         f"< {TARGET_MB:g} {'met' if ok_mem else 'MISSED'}"],
        ["client tracemalloc peak (MB)", traced.get("client_tracemalloc_peak_mb", "-"), "-"],
        ["server peak RSS, all processes (MB)", plain["server_peak_rss_mb"], "-"],
        ["SQLite file (MB)", plain["sqlite_mb"], "-"],
    ]
    print_table(f"Scale: map_async of {args.tasks:,} tasks", ["figure", "value", "target"], rows)
    data = {"quick": args.quick, "n_tasks": args.tasks, "plain": plain, "traced": traced,
            "met": {"time": ok_time, "memory": ok_mem}}
    write_json("scale", data)
    return data


if __name__ == "__main__":
    main()
