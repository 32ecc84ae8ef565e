"""Never hang, never lose: faults injected into real maps on a real cluster (Grid Engine, Slurm).

Each test bounds its wait, so a regression shows as a failure, not a hung suite.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import is_slurm, job_listed, label_of, map_in_thread, raw_options

import sheepdog
from sheepdog.poll import poll_until
from sheepdog.server import registry
from sheepdog.server_for import server_for

pytestmark = pytest.mark.e2e


class Coordinator:
    """A tiny HTTP server on this machine that tasks ask "is this my first run?".

    Tasks run on other nodes without a shared disk, so the first-run memory lives here.
    """

    def __init__(self) -> None:
        seen: set[str] = set()
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the stdlib's name
                with lock:
                    first = self.path not in seen
                    seen.add(self.path)
                body = b"first" if first else b"again"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator()
    yield c
    c.close()


def first_run(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as reply:
        return bool(reply.read() == b"first")


def die_on_first_run(x: int, url: str) -> int:
    """Kill our own array task with SIGKILL the first time task x runs."""
    import os
    import signal
    import time

    if x % 3 == 0 and first_run(f"{url}/{x}"):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    return x * x


def test_a_worker_killed_mid_task_runs_again(
    config: dict[str, Any], coordinator: Coordinator
) -> None:
    url = f"http://{config['localhost']}:{coordinator.port}/kill"
    cfg = dict(config, lease_s=5.0, workers=3, batch=1, timeout_s=300)
    results = sheepdog.map(die_on_first_run, [(x, url) for x in range(9)], cfg, verbose=False)
    assert results == [x * x for x in range(9)]
    request_id = _last_request(cfg)
    with sheepdog.Storage(cfg["dbfile"]) as storage:
        assert storage.count_results(request_id) == 9
        assert storage.count_errors(request_id) == 0
        attempts = {i: storage.get_task(request_id, i)["attempts"] for i in range(1, 10)}
    # The killed tasks (x = 0, 3, 6 are tasks 1, 4, 7) ran a second time.
    assert all(attempts[i] >= 1 for i in (1, 4, 7)), attempts


def sleepy(x: int) -> int:
    import time

    time.sleep(1.5)
    return x + 100


def test_kill_9_of_the_server_mid_map_loses_nothing(config: dict[str, Any]) -> None:
    cfg = sheepdog.Config.from_mapping(dict(config, workers=3, timeout_s=400))
    thread, outcome = map_in_thread(sleepy, range(12), cfg)
    servers: list[sheepdog.Server] = []

    def result_in() -> bool:
        servers[:] = [server_for(cfg)]
        return _count(cfg.dbfile, "done") != 0

    assert poll_until(result_in, timeout_s=180, interval_s=0.2), (
        "no result came in before the kill"
    )
    server = servers[0]
    acknowledged = _count(cfg.dbfile, "done")
    os.killpg(server.pid, signal.SIGKILL)  # the gunicorn master and its workers
    thread.join(timeout=420)
    assert not thread.is_alive(), "map did not finish after the server was killed"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["results"] == [x + 100 for x in range(12)]
    assert acknowledged >= 1


def test_the_scheduler_rejecting_the_job_is_an_error_at_once(config: dict[str, Any]) -> None:
    cfg = dict(config, **raw_options(
        config, gridengine=["-l no_such_resource=1"], slurm=["--gres=no_such_resource:1"]
    ))
    started = time.monotonic()
    with pytest.raises(sheepdog.SubmitError) as info:
        sheepdog.map(abs, [-1], cfg)
    assert time.monotonic() - started < 60
    error = info.value
    assert error.exit_status != 0
    if is_slurm(config):
        assert "gres" in error.stderr.lower()
        assert "sbatch" in error.command
    else:
        assert "no_such_resource" in error.stderr
        assert "qsub" in error.command
    request_id = _last_request(cfg)
    ((_arg, task_error),) = sheepdog.get_errors(request_id, cfg["dbfile"])
    assert "never submitted" in task_error.message


@pytest.mark.gridengine(
    "Eqw (a job Grid Engine cannot start waits in error) has no Slurm counterpart: a Slurm job "
    "whose directory is missing runs in /tmp; Slurm's failed jobs are in test_slurm_faults.py"
)
def test_a_job_in_eqw_is_reported_with_the_reason(config: dict[str, Any]) -> None:
    cfg = dict(config, ge_opts=["-wd /nonexistent/sheepdog-test"], timeout_s=240)
    results = sheepdog.map(abs, [-1, -2], cfg, verbose=False)
    assert results == [None, None]
    errors = sheepdog.get_errors(_last_request(cfg), cfg["dbfile"])
    assert len(errors) == 2
    for _arg, error in errors:
        assert error.kind == "job_error"
        assert "error state" in error.message
        assert "/nonexistent/sheepdog-test" in error.message


def test_a_job_that_can_never_be_scheduled_is_reported(config: dict[str, Any]) -> None:
    # More memory than any node has (Grid Engine queues it); three nodes per array task from
    # a partition of two (Slurm queues it, PENDING with PartitionNodeLimit).
    cfg = dict(config, timeout_s=240, **raw_options(
        config, gridengine=["-l mem_grab=2T"], slurm=["--nodes=3"]
    ))
    reason = "PartitionNodeLimit" if is_slurm(config) else "mem_grab"
    results = sheepdog.map(abs, [-1, -2], cfg, verbose=False)
    assert results == [None, None]
    errors = sheepdog.get_errors(_last_request(cfg), cfg["dbfile"])
    assert len(errors) == 2
    for _arg, error in errors:
        assert error.kind == "unschedulable"
        assert "can never start" in error.message and reason in error.message


def test_a_task_over_its_timeout_says_so(config: dict[str, Any]) -> None:
    cfg = dict(config, task_timeout_s=2.0)
    results = sheepdog.map(sleepy_for, [0.1, 30], cfg, verbose=False)
    assert results == [0.1, None]
    ((arg, error),) = sheepdog.get_errors(_last_request(cfg), cfg["dbfile"])
    assert arg == 30
    assert error.type_name == "TaskTimeout"
    assert "timed out after 2 s" in error.message


def sleepy_for(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def allocate(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


def test_a_task_over_its_memory_limit_says_so(config: dict[str, Any]) -> None:
    cfg = dict(config, mem_gb=0.25)  # -l h_vmem=256M, --mem=256M
    results = sheepdog.map(allocate, [8, 2048], cfg, verbose=False)
    assert results == [8 * 1024 * 1024, None]
    ((arg, error),) = sheepdog.get_errors(_last_request(cfg), cfg["dbfile"])
    assert arg == 2048
    assert error.type_name == "MemoryError" or "memory" in error.message.lower()


def test_ctrl_c_cancels_the_jobs(config: dict[str, Any], tmp_path: Path) -> None:
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import json, signal, sys, time, sheepdog\n"
        # As in a terminal: a process started in the background by a non-interactive shell
        # (as CI may start this suite) inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "config = json.loads(sys.argv[1])\n"
        "def slow(x):\n"
        "    import time\n"
        "    time.sleep(60)\n"
        "sheepdog.map(slow, range(4), config, verbose=False)\n"
    )
    import json

    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        def task_started() -> bool:
            if _count(config["dbfile"], "leased") != 0:
                return True
            # A script that died will start no task: fail now, with what it printed.
            assert proc.poll() is None, proc.communicate()
            return False

        assert poll_until(task_started, timeout_s=120, interval_s=0.5), "no task started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            # Reap it and close its pipes, so nothing of this test leaks into the next one.
            leftover = proc.communicate()
            print(f"the interrupted map had to be killed; it printed: {leftover}")
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    # One line says what was cancelled and which job was deleted (issue 18).
    said = [line for line in err.splitlines() if line.startswith("sheepdog: interrupted:")]
    assert len(said) == 1, err
    assert f"cancelled 4 open tasks; deleted {label_of(config)} job" in said[0], said
    request_id = _last_request(config)
    with sheepdog.Storage(config["dbfile"]) as storage:
        counts = storage.task_counts(request_id)
        job_ids = [job.job_id for job in storage.get_jobs(request_id)]
    assert counts.get("cancelled", 0) == 4, counts
    errors = sheepdog.get_errors(request_id, config["dbfile"])
    assert all(error.kind == "cancelled" for _arg, error in errors)
    assert poll_until(lambda: not any(job_listed(config, job_id) for job_id in job_ids),
                      timeout_s=60, interval_s=1), f"a job of {job_ids} still queued after Ctrl-C"


def _last_request(config: dict[str, Any]) -> int:
    with sheepdog.Storage(config["dbfile"]) as storage:
        return max(r["id"] for r in storage.list_requests())


def _count(dbfile: str, state: str) -> int:
    if not os.path.exists(dbfile):
        return 0
    with sheepdog.Storage(dbfile) as storage:
        requests = storage.list_requests()
        if not requests:
            return 0
        return storage.task_counts(max(r["id"] for r in requests)).get(state, 0)


def _exec_nodes(cluster: dict[str, Any]) -> dict[str, Any]:
    """The Docker containers of the cluster's execution nodes, by host name.

    Found from the container that publishes the cluster's SSH port (testcontainers or
    compose alike); empty when the cluster is not made of local containers.
    """
    import docker

    engine = docker.from_env()  # type: ignore[attr-defined]
    head = None
    for container in engine.containers.list():
        for bindings in (container.ports or {}).values():
            if any(int(b["HostPort"]) == int(cluster["ssh_port"]) for b in bindings or []):
                head = container
    if head is None:
        return {}
    networks = set(head.attrs["NetworkSettings"]["Networks"])
    nodes = {}
    for container in engine.containers.list():
        if container.id == head.id:
            continue
        if networks & set(container.attrs["NetworkSettings"]["Networks"]):
            nodes[container.attrs["Config"]["Hostname"]] = container
    return nodes


def sleep_then_square(x: int) -> int:
    import time

    time.sleep(4)
    return x * x


@pytest.fixture
def cluster_to_break(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A Docker or Slurm cluster of the test's own, for a test that kills an execution node.

    A node's container started again after ``docker kill`` does not always take jobs again:
    in one CI run Grid Engine kept a job in state ``t`` on it for minutes. The tests after
    this one need both nodes, so the node is broken on a cluster that is thrown away.
    """
    import cluster_fixture

    choice = request.config.getoption("--cluster")
    start = {"docker": cluster_fixture.docker_cluster, "slurm": cluster_fixture.slurm_cluster}
    assert choice in start, (
        f"--cluster={choice}: this test kills an execution node's container, so it needs "
        "--cluster=docker or --cluster=slurm (ci/test deselects it for the native cluster)"
    )
    session_nodes = dict(cluster_fixture.DOCKER_NODES)
    dbfile = str(tmp_path / "sheepdog.sqlite")
    try:
        workdir = tmp_path / "to-break"
        workdir.mkdir()
        with start[choice](workdir) as details:
            yield dict(details, dbfile=dbfile)
    finally:
        cluster_fixture.DOCKER_NODES.update(session_nodes)
        registry.stop(dbfile)


def test_an_execution_node_stopped_mid_map(cluster_to_break: dict[str, Any]) -> None:
    config = cluster_to_break
    nodes = _exec_nodes(config)
    assert len(nodes) >= 2, f"expected two execution node containers, found {sorted(nodes)}"
    cfg = sheepdog.Config.from_mapping(
        dict(config, workers=4, batch=1, lease_s=5.0, timeout_s=400)
    )
    thread, outcome = map_in_thread(sleep_then_square, range(12), cfg)
    found: list[tuple[int, str]] = []  # (request id, host of a leased task)

    def leased_on_a_node() -> bool:
        if not os.path.exists(cfg.dbfile):
            return False
        with sheepdog.Storage(cfg.dbfile) as storage:
            requests = storage.list_requests()
            if not requests:
                return False
            rid = max(r["id"] for r in requests)
            for i in range(1, 13):
                task = storage.get_task(rid, i)
                if task["state"] == "leased" and task["host"] in nodes:
                    found.append((rid, task["host"]))
                    return True
        return False

    assert poll_until(leased_on_a_node, timeout_s=180, interval_s=0.2), (
        "no task ever ran on an execution node"
    )
    rid, victim = found[0]
    nodes[victim].kill()
    thread.join(timeout=420)
    assert not thread.is_alive(), "map did not finish after an execution node died"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["results"] == [x * x for x in range(12)]
    with sheepdog.Storage(cfg.dbfile) as storage:
        assert storage.count_results(rid) == 12
        hosts = {storage.get_task(rid, i)["host"] for i in range(1, 13)}
    assert hosts - {victim}, "nothing ran elsewhere"
