"""Server throughput: 64 emulated workers doing the whole protocol, ours against Sheepdog 0.2.3.

Each emulated worker is a thread with one keep-alive ``http.client``
connection. Against our server it uses the worker stub's own ``Connection``
(real HMAC signing of calls, answers checked): fetch the function once, lease,
then post each batch's results with the next lease piggybacked, one round trip
per batch. Against the original it does what each of its array tasks did:
``GET /?request_id=&job_index=`` then ``POST /`` with the pickled result, HTTP
basic auth (on a keep-alive connection too, which only helps the original).

The load comes from several processes so that one GIL does not cap it. On a
2-core machine the generator and the server share the cores: the figures are a
floor for the server, not its ceiling.

    python -m benchmarks.server_throughput [--quick] [--tasks N] [--reps R]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import json
import multiprocessing
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks._original import ORIGINAL_VENV, ensure_original_venv, original_env
from benchmarks._report import ROOT, print_table, summarise, write_json

__all__ = [
    "ORIGINAL_VENV", "ensure_original_venv", "main", "run_floor", "run_original", "run_ours",
]

STUB = ROOT / "worker_stub" / "sheepdog_worker.py"
WORKERS = 64
LOAD_PROCESSES = 4
PASSWORD = "bench-password"
#: Targets against 0.2.3 in the same run (issue #17): tasks/s at one task per lease and
#: at the default batch, and server CPU per round trip at one task per lease.
RATE_TARGET_1 = 4.0
RATE_TARGET_BATCHED = 20.0
CPU_TARGET_1 = 0.5
#: The server's gunicorn settings (sheepdog.server.Server's defaults), for the floor run.
FLOOR_WORKERS = 2
FLOOR_THREADS = 4

_ORIGINAL_LAUNCHER = r"""
import json, socket, sys, time
from sheepdog import serialisation
from sheepdog.server import Server
from sheepdog.storage import Storage

dbfile, n = sys.argv[1], int(sys.argv[2])
storage = Storage(dbfile)
storage.initdb()
def double(x):
    return 2 * x
rid = storage.new_request(serialisation.serialise_function(double),
                          serialisation.serialise_namespace({}),
                          serialisation.serialise_args([(i,) for i in range(n)]))
server = Server(None, sys.argv[3], dbfile)
deadline = time.monotonic() + 30
while True:
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            server.stop()
            sys.exit("the original's server did not listen within 30 s")
        time.sleep(0.05)
print(json.dumps({"port": server.port, "request_id": rid, "pid": server.server.pid}), flush=True)
sys.stdin.readline()
print(json.dumps({"results": storage.count_results(rid)}), flush=True)
# multiprocessing's exit hook would wait on the Tornado child before sheepdog's hook stops it.
server.stop()
"""


def _stub() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sheepdog_worker", STUB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _double(x: int) -> int:
    return 2 * x


def _cpu_seconds(root_pid: int) -> float:
    """CPU seconds (user + system) used so far by ``root_pid`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


# -- the load generator -----------------------------------------------------------------


def _ours_worker(stub: ModuleType, target: dict[str, Any], name: str, out: list[Any]) -> None:
    conn = stub.Connection(target["url"], target["secret"], target["request_id"], retry_s=60.0)
    batch, latencies, done = target["batch"], [], 0
    hello = {"worker": name, "host": "bench", "max_tasks": batch}

    def call(method: str, endpoint: str, body: dict[str, Any] | None = None) -> Any:
        start = time.monotonic()
        answer = conn.call(method, endpoint, body)
        latencies.append(time.monotonic() - start)
        return answer

    call("GET", "function")
    answer = call("POST", "lease", hello)
    while answer["tasks"]:
        results = []
        for task in answer["tasks"]:
            value = _double(pickle.loads(base64.b64decode(task["args"])))
            results.append({
                "index": task["index"], "lease": task["lease"], "ok": True,
                "value": base64.b64encode(pickle.dumps(value)).decode("ascii"),
                "stdout": "", "stderr": "", "duration_s": 0.0,
            })
        done += len(results)
        answer = call("POST", "results", dict(hello, results=results))
    conn.close()
    out.append((latencies, done))


def _original_worker(target: dict[str, Any], indices: list[int], out: list[Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target["port"], timeout=60)
    auth = "Basic " + base64.b64encode(f"sheepdog:{PASSWORD}".encode()).decode()
    rid, latencies = target["request_id"], []
    for index in indices:
        start = time.monotonic()
        conn.request("GET", f"/?request_id={rid}&job_index={index}",
                     headers={"Authorization": auth})
        response = conn.getresponse()
        details = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"the original answered {response.status} to GET task {index}")
        latencies.append(time.monotonic() - start)
        (arg,) = pickle.loads(base64.b64decode(details["args"]))
        result = base64.b64encode(pickle.dumps(_double(arg))).decode()
        body = urllib.parse.urlencode({"result": result, "request_id": rid, "job_index": index})
        start = time.monotonic()
        conn.request("POST", "/", body=body, headers={
            "Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the original answered {response.status} to POST task {index}")
        latencies.append(time.monotonic() - start)
    conn.close()
    out.append((latencies, len(indices)))


def _floor_worker(target: dict[str, Any], rounds: int, out: list[Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target["port"], timeout=60)
    body = json.dumps({"worker": "bench:0", "host": "bench", "max_tasks": 1, "results": [{
        "index": 1, "lease": "0123456789abcdef", "ok": True, "value": "gASVAgAAAAAAAABLAi4=",
        "stdout": "", "stderr": "", "duration_s": 0.0}]}).encode()
    # The headers a signed call carries, so that gunicorn parses as much.
    headers = {"Content-Type": "application/json", "X-Sheepdog-Time": "0",
               "X-Sheepdog-Nonce": "0" * 32, "X-Sheepdog-Body-SHA256": "0" * 64,
               "X-Sheepdog-Signature": "0" * 64}
    latencies = []
    for _ in range(rounds):
        start = time.monotonic()
        conn.request("POST", "/api/v1/requests/1/results", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the floor app answered {response.status}")
        latencies.append(time.monotonic() - start)
    conn.close()
    out.append((latencies, rounds))


def _load_process(target: dict[str, Any], names: list[int], go: Any, queue: Any) -> None:
    stub = _stub() if target["kind"] == "ours" else None
    out: list[Any] = []
    threads = []
    for w in names:
        if stub is not None:
            args: tuple[Any, ...] = (stub, target, f"bench:{w}", out)
            threads.append(threading.Thread(target=_ours_worker, args=args))
        elif target["kind"] == "floor":
            rounds = len(range(w + 1, target["n_tasks"] + 1, target["workers"]))
            threads.append(threading.Thread(target=_floor_worker, args=(target, rounds, out)))
        else:
            indices = list(range(w + 1, target["n_tasks"] + 1, target["workers"]))
            threads.append(threading.Thread(target=_original_worker, args=(target, indices, out)))
    go.wait(60)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = [x for lat, _ in out for x in lat]
    queue.put({"latencies": latencies, "tasks": sum(n for _, n in out), "end": time.monotonic(),
               "threads_ok": len(out)})


def _drive(target: dict[str, Any], server_pid: int, timeout_s: float) -> dict[str, Any]:
    """Run the load processes against ``target``; return tasks/s, latencies and server CPU."""
    ctx = multiprocessing.get_context("fork")
    go, queue = ctx.Event(), ctx.Queue()
    workers = target["workers"]
    procs = [
        ctx.Process(target=_load_process,
                    args=(target, list(range(p, workers, LOAD_PROCESSES)), go, queue))
        for p in range(LOAD_PROCESSES)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let the processes set up their threads before the clock starts
    cpu_before = _cpu_seconds(server_pid)
    start = time.monotonic()
    go.set()
    reports = []
    try:
        for _ in procs:
            reports.append(queue.get(timeout=timeout_s))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    end = max(r["end"] for r in reports)
    cpu = _cpu_seconds(server_pid) - cpu_before
    tasks = sum(r["tasks"] for r in reports)
    latencies = [x for r in reports for x in r["latencies"]]
    if sum(r["threads_ok"] for r in reports) != workers:
        raise RuntimeError("some emulated workers failed; see the tracebacks above")
    return {
        "tasks": tasks,
        "seconds": round(end - start, 3),
        "tasks_per_s": round(tasks / (end - start), 1),
        "round_trips": len(latencies),
        "server_cpu_ms_per_round_trip": round(cpu * 1000 / max(1, len(latencies)), 3),
        "server_cpu_ms_per_task": round(cpu * 1000 / max(1, tasks), 3),
        **summarise(latencies),
    }


def run_ours(n_tasks: int, batch: int, workdir: Path, workers: int = WORKERS) -> dict[str, Any]:
    """One run against our gunicorn server with ``batch`` tasks per lease."""
    from sheepdog import serialisation
    from sheepdog.server import Server
    from sheepdog.storage import Storage

    dbfile = workdir / f"ours-{batch}-{time.monotonic_ns()}.sqlite"
    with Storage(dbfile) as storage:
        rid = storage.new_request(
            serialisation.serialise_function(_double), b"",
            serialisation.serialise_args(range(n_tasks)), settings={"batch": batch},
        )
        secret = storage.get_secret(rid)
    with Server(None, None, dbfile, host="127.0.0.1") as server:
        assert server.pid is not None
        target = {"kind": "ours", "url": f"http://127.0.0.1:{server.port}/", "secret": secret,
                  "request_id": rid, "batch": batch, "workers": workers, "n_tasks": n_tasks}
        figures = _drive(target, server.pid, timeout_s=600)
    with Storage(dbfile) as storage:
        counts = storage.task_counts(rid)
    if counts.get("done") != n_tasks:
        raise RuntimeError(f"our server stored {counts}, not {n_tasks} results")
    return figures


def run_floor(n_tasks: int, workers: int = WORKERS) -> dict[str, Any]:
    """One run against gunicorn serving an app that does nothing, with our server's settings."""
    sock = socket.create_server(("127.0.0.1", 0))
    fd = sock.fileno()
    command = [
        sys.executable, "-m", "gunicorn", "--bind", f"fd://{fd}", "--workers", str(FLOOR_WORKERS),
        "--threads", str(FLOOR_THREADS), "--worker-class", "gthread", "--keep-alive", "30",
        "--log-level", "warning", "--chdir", str(ROOT), "benchmarks._floor_app:app",
    ]
    server = subprocess.Popen(command, pass_fds=(fd,), start_new_session=True)
    port = sock.getsockname()[1]
    sock.close()
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until a worker answers
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("gunicorn with the floor app did not answer") from None
                time.sleep(0.05)
        target = {"kind": "floor", "port": port, "workers": workers, "n_tasks": n_tasks}
        return _drive(target, server.pid, timeout_s=600)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_original(n_tasks: int, workdir: Path, workers: int = WORKERS) -> dict[str, Any]:
    """One run against Sheepdog 0.2.3's Tornado server (one task per round trip pair)."""
    python = ensure_original_venv()
    dbfile = workdir / f"original-{time.monotonic_ns()}.sqlite"
    launcher = subprocess.Popen(
        [str(python), "-c", _ORIGINAL_LAUNCHER, str(dbfile), str(n_tasks), PASSWORD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=workdir,
        env=original_env(),
    )
    assert launcher.stdin is not None and launcher.stdout is not None
    try:
        info = json.loads(launcher.stdout.readline() or "null")
        if not info:
            raise RuntimeError("the original's launcher did not start; see its output above")
        target = {"kind": "original", "port": info["port"], "request_id": info["request_id"],
                  "workers": workers, "n_tasks": n_tasks}
        figures = _drive(target, info["pid"], timeout_s=1200)
        launcher.stdin.write("done\n")
        launcher.stdin.flush()
        stored = json.loads(launcher.stdout.readline())["results"]
        launcher.wait(30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    if stored != n_tasks:
        raise RuntimeError(f"the original stored {stored} results, not {n_tasks}")
    return figures


def _verdict(met: bool | None) -> str:
    return "met" if met else "MISSED"


def default_batch(n_tasks: int, workers: int) -> int:
    """The batch sheepdog picks by default for ``n_tasks`` over ``workers`` array tasks."""
    from sheepdog.config import Config
    from sheepdog.sizing import batch_size

    return batch_size(Config(host="bench", workers=workers), n_tasks, workers)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the table, write bench-results/server_throughput.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--reps", type=int)
    args = parser.parse_args(argv)
    n_tasks = args.tasks or (3000 if args.quick else 20_000)
    reps = args.reps or (1 if args.quick else 2)
    batch = default_batch(n_tasks, WORKERS)
    runs: dict[str, list[dict[str, Any]]] = {
        "original": [], "ours_1": [], f"ours_{batch}": [], "floor": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="sheepdog-bench-"))
    try:
        for rep in range(reps):  # alternate, so drift in the machine hits all alike
            for key in runs:
                if key == "original":
                    figures = run_original(n_tasks, workdir)
                elif key == "floor":
                    figures = run_floor(n_tasks)
                else:
                    figures = run_ours(n_tasks, int(key.split("_")[1]), workdir)
                print(f"[bench] rep {rep + 1}/{reps} {key}: {figures}", flush=True)
                runs[key].append(figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def best(key: str) -> dict[str, Any]:
        return max(runs[key], key=lambda r: r["tasks_per_s"])

    def median(key: str, figure: str) -> float:
        return float(statistics.median(r[figure] for r in runs[key]))

    base = median("original", "tasks_per_s")
    base_cpu = median("original", "server_cpu_ms_per_round_trip")
    rows, summary = [], {}
    labels = {"original": "Sheepdog 0.2.3 (Tornado)", "ours_1": "sheepdog, 1 task/lease",
              f"ours_{batch}": f"sheepdog, {batch} tasks/lease (default)",
              "floor": "gunicorn alone, an app doing nothing"}
    targets = {"original": None, "ours_1": RATE_TARGET_1, f"ours_{batch}": RATE_TARGET_BATCHED,
               "floor": None}
    # The CPU target is for one task per lease, where a round trip is one task's.
    cpu_targets = {"original": None, "ours_1": CPU_TARGET_1, f"ours_{batch}": None,
                   "floor": None}
    for key, label in labels.items():
        rate = median(key, "tasks_per_s")
        cpu = median(key, "server_cpu_ms_per_round_trip")
        b = best(key)
        ratio, cpu_ratio = rate / base, cpu / base_cpu
        target, cpu_target = targets[key], cpu_targets[key]
        met = None if target is None else ratio >= target
        cpu_met = None if cpu_target is None else cpu_ratio <= cpu_target
        rows.append([
            label, rate, b["p50_ms"], b["p99_ms"], cpu, f"{cpu_ratio:.2f}x",
            "-" if cpu_target is None else f"<= {cpu_target:g}x {_verdict(cpu_met)}",
            median(key, "server_cpu_ms_per_task"), f"{ratio:.1f}x",
            "-" if target is None else f">= {target:g}x {_verdict(met)}",
        ])
        summary[key] = {
            "label": label, "tasks_per_s": rate, "ratio": round(ratio, 2), "target": target,
            "met": met, "server_cpu_ms_per_round_trip": cpu,
            "server_cpu_ms_per_task": median(key, "server_cpu_ms_per_task"),
            "cpu_ratio": round(cpu_ratio, 3), "cpu_target": cpu_target, "cpu_met": cpu_met,
        }
    print_table(
        f"Server throughput: {n_tasks:,} tasks, {WORKERS} workers, {LOAD_PROCESSES} load "
        f"processes, {reps} rep(s), medians ({os.cpu_count()} cores shared with the load)",
        ["server", "tasks/s", "p50 ms", "p99 ms", "server CPU ms/round trip", "vs 0.2.3",
         "CPU target", "server CPU ms/task", "tasks/s vs 0.2.3", "tasks/s target"],
        rows,
    )
    data = {"quick": args.quick, "n_tasks": n_tasks, "workers": WORKERS,
            "load_processes": LOAD_PROCESSES, "batch": batch, "reps": reps,
            "summary": summary, "runs": runs}
    write_json("server_throughput", data)
    return data


if __name__ == "__main__":
    socket.setdefaulttimeout(120)
    main()
