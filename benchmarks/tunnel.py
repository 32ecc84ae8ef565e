"""Tunnel against direct: the same maps with connect="tunnel" and connect="direct", in one run.

Two workloads, each timed from calling ``map`` until every result is back: 10,000
tiny tasks (sheepdog's defaults: batched leases), and 100 tasks with one task per
array task (``workers=100, tasks_per_worker=1``: a fresh worker, and so a fresh
connection through the relay, per task). The modes alternate (direct, tunnel, direct,
tunnel...) so that a drift of the machine's load hits both. Target: tunnel <= 1.5x
direct for the tiny tasks.

Needs a cluster whose execution nodes can reach this machine (direct must work):
``--config FILE`` (default .cluster/native.json, as ci/bench), or ``--docker`` to start
a Docker Grid Engine cluster with testcontainers for the run.

    python -m benchmarks.tunnel [--quick] [--config FILE | --docker] [--tasks N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._report import ROOT, print_table, write_json

__all__ = ["main"]

DEFAULT_CONFIG = ROOT / ".cluster" / "native.json"
#: The issue's target: the tunnel costs at most half again as much for tiny tasks.
TARGET_RATIO = 1.5
MODES = ("direct", "tunnel")


def noop(x: int) -> int:
    return x


@contextlib.contextmanager
def _cluster(args: argparse.Namespace, tmp: Path) -> Iterator[dict[str, Any]]:
    if not args.docker:
        if not Path(args.config).exists():
            raise SystemExit(f"no cluster config at {args.config}: run 'ci/cluster up' first")
        yield json.loads(Path(args.config).read_text())
        return
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import cluster_fixture

    with cluster_fixture.docker_cluster(tmp / "cluster") as details:
        yield details


def _time_map(cluster: dict[str, Any], db: Path, mode: str, n: int, **keys: Any) -> float:
    import sheepdog

    config = dict(cluster, dbfile=str(db), connect=mode, timeout_s=1800, **keys)
    start = time.monotonic()
    results = sheepdog.map(noop, range(n), config, verbose=False)
    elapsed = time.monotonic() - start
    assert results == list(range(n)), f"{mode}: wrong results"
    return round(elapsed, 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both workloads in both modes, print the table, write bench-results/tunnel.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition each")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--arrays", type=int, default=100,
                        help="tasks of the one-task-per-array-task workload")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--docker", action="store_true",
                        help="start a Docker Grid Engine cluster for the run")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else 3
    times: dict[str, dict[str, list[float]]] = {"tiny": {m: [] for m in MODES},
                                                 "per_array_task": {m: [] for m in MODES}}
    with tempfile.TemporaryDirectory(prefix="sheepdog-bench-tunnel-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "cluster").mkdir()
        with _cluster(args, tmp) as cluster:
            # A first map warms the head node's and the workers' caches for both modes.
            _time_map(cluster, tmp / "warm.sqlite", "direct", 10)
            for rep in range(reps):
                for mode in MODES:
                    db = tmp / f"{mode}-{rep}.sqlite"
                    seconds = _time_map(cluster, db, mode, args.tasks)
                    times["tiny"][mode].append(seconds)
                    print(f"[bench] {args.tasks:,} tiny tasks, {mode}: {seconds} s", flush=True)
                    seconds = _time_map(cluster, db, mode, args.arrays, workers=args.arrays,
                                        tasks_per_worker=1)
                    times["per_array_task"][mode].append(seconds)
                    print(f"[bench] {args.arrays} array tasks of one task, {mode}: {seconds} s",
                          flush=True)
    best = {w: {m: min(v) for m, v in by_mode.items()} for w, by_mode in times.items()}
    ratios = {w: round(b["tunnel"] / b["direct"], 2) for w, b in best.items()}
    met = ratios["tiny"] <= TARGET_RATIO
    rows = [
        [f"{args.tasks:,} tiny tasks (s)", best["tiny"]["direct"], best["tiny"]["tunnel"],
         ratios["tiny"], f"<= {TARGET_RATIO:g}x {'met' if met else 'MISSED'}"],
        [f"{args.arrays} array tasks, one task each (s)", best["per_array_task"]["direct"],
         best["per_array_task"]["tunnel"], ratios["per_array_task"], "-"],
    ]
    print_table(f"Tunnel against direct (best of {reps})",
                ["workload", "direct", "tunnel", "ratio", "target"], rows)
    data = {"quick": args.quick, "n_tasks": args.tasks, "n_arrays": args.arrays,
            "cluster": "docker" if args.docker else args.config, "times_s": times,
            "best_s": best, "ratios": ratios, "met": met}
    write_json("tunnel", data)
    return data


if __name__ == "__main__":
    main()
