"""The top-level API on a real cluster: every example of the original's quickstart."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import raw_options

import sheepdog
from sheepdog.poll import poll_until
from sheepdog.server_for import server_for

pytestmark = pytest.mark.e2e

constant = 12


def g(x: int) -> int:
    return x * 2


def f_ns(a: int, b: int) -> int:
    return a + g(b) + constant


def add(a: int, b: int) -> int:
    return a + b


def test_synchronous_map(config: dict[str, Any]) -> None:
    assert sheepdog.map(add, [(1, 1), (1, 2), (2, 2)], config) == [2, 3, 4]


def test_lambda_and_single_arguments(config: dict[str, Any]) -> None:
    assert sheepdog.map(lambda x: x * x, range(5), config, verbose=False) == [0, 1, 4, 9, 16]


def test_asynchronous_map_with_polling(config: dict[str, Any]) -> None:
    request_id = sheepdog.map_async(add, [(1, 1), (1, 2), (2, 2)], config)
    assert isinstance(request_id, int)
    results: list[tuple[Any, Any]] = []

    def all_in() -> bool:
        results[:] = sheepdog.get_results(request_id, config["dbfile"], block=False)
        return all(r is not None for _, r in results)

    assert poll_until(all_in, timeout_s=180, interval_s=0.5), (
        f"no results after 180 s: {results}"
    )
    assert results == [((1, 1), 2), ((1, 2), 3), ((2, 2), 4)]


def test_namespace_explicit_and_automatic(config: dict[str, Any]) -> None:
    args = [(1, 2), (2, 3), (3, 4)]
    namespace = {"constant": constant, "g": g}
    assert sheepdog.map(f_ns, args, config, ns=namespace) == [17, 20, 23]
    assert sheepdog.map(f_ns, args, config) == [17, 20, 23]


def uses_math(x: float) -> float:
    return mth.sqrt(x)  # type: ignore[name-defined] # noqa: F821 - made global by imports_math


def imports_math(x: float) -> float:
    import math as mth

    global mth  # noqa: F811 - the original's documented order
    return uses_math(x)


def test_imports_idiom_with_global(config: dict[str, Any]) -> None:
    assert sheepdog.map(imports_math, [4.0, 9.0], config) == [2.0, 3.0]


def inverse(x: float) -> float:
    return 1 / x


def test_errors_come_back_as_none_with_traceback(
    config: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    results = sheepdog.map(inverse, [1.0, 0.0, 4.0], config)
    assert results == [1.0, None, 0.25]
    assert "get_errors" in capsys.readouterr().out
    request_id = max(r["id"] for r in sheepdog.Storage(config["dbfile"]).list_requests())
    errors = sheepdog.get_errors(request_id, config["dbfile"])
    assert len(errors) == 1
    arg, error = errors[0]
    assert arg == 0.0
    assert isinstance(error, sheepdog.RemoteError)
    assert error.type_name == "ZeroDivisionError"
    assert "1 / x" in error.traceback and "ZeroDivisionError" in error.traceback
    assert error.task_index == 2
    assert error.host


def test_errors_raise_option(config: dict[str, Any]) -> None:
    with pytest.raises(sheepdog.TaskFailedError) as info:
        sheepdog.map(inverse, [0.0, 2.0], config, errors="raise")
    assert info.value.errors[0].type_name == "ZeroDivisionError"


def test_results_from_another_process(config: dict[str, Any]) -> None:
    request_id = sheepdog.map_async(add, [(5, 5), (6, 6)], config)
    code = (
        "import json, sys, sheepdog\n"
        f"res = sheepdog.get_results({request_id}, {config['dbfile']!r}, timeout_s=180)\n"
        "print(json.dumps(res))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True
    )
    assert json.loads(out.stdout) == [[[5, 5], 10], [[6, 6], 12]]


def slow_square(x: int) -> int:
    import time

    time.sleep(3)
    return x * x


def test_restart_the_server(config: dict[str, Any]) -> None:
    """The original's recipe: the server dies with tasks pending; a new one finishes them."""
    cfg = dict(config, port=None, workers=2)
    request_id = sheepdog.map_async(slow_square, range(6), cfg)
    server = server_for(sheepdog.Config.from_mapping(cfg))
    port = server.port
    with sheepdog.Storage(cfg["dbfile"]) as storage:
        assert poll_until(lambda: storage.count_results(request_id) != 0, timeout_s=120,
                          interval_s=0.2), "no result before the kill"
        os.killpg(server.pid, signal.SIGKILL)  # gunicorn master and workers, as kill -9 would
        assert poll_until(lambda: not server.alive, timeout_s=30, interval_s=0.05), (
            "the killed server is still running"
        )
        assert storage.count_results(request_id) < 6
    restarted = sheepdog.Server(port, None, cfg["dbfile"])
    try:
        results = sheepdog.get_results(request_id, cfg["dbfile"], timeout_s=240)
    finally:
        restarted.stop()
    assert results == [(x, x * x) for x in range(6)]


def allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    return len(block)


def test_mem_grab_is_enforced(config: dict[str, Any]) -> None:
    # The worker's memory limit comes from the job's own request, on either scheduler.
    cfg = dict(config, **raw_options(
        config, gridengine=["-l mem_grab=300M"], slurm=["--mem=300M"]
    ))
    results = sheepdog.map(allocate, [10, 1000], cfg)
    assert results[0] == 10 * 1024 * 1024
    assert results[1] is None
    request_id = max(r["id"] for r in sheepdog.Storage(cfg["dbfile"]).list_requests())
    (arg, error), = sheepdog.get_errors(request_id, cfg["dbfile"])
    assert arg == 1000 and error.type_name == "MemoryError"


def test_two_hundred_tasks(config: dict[str, Any]) -> None:
    assert sheepdog.map(math.factorial, range(200), config, verbose=False) == [
        math.factorial(i) for i in range(200)
    ]


def test_two_maps_at_once_do_not_mix(config: dict[str, Any]) -> None:
    out: dict[str, list[Any]] = {}

    def run(name: str, k: int) -> None:
        out[name] = sheepdog.map(lambda x: (k, x * k), range(20), config, verbose=False)

    threads = [threading.Thread(target=run, args=(n, k)) for n, k in (("a", 3), ("b", 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert out["a"] == [(3, x * 3) for x in range(20)]
    assert out["b"] == [(7, x * 7) for x in range(20)]


def test_maps_one_after_another(config: dict[str, Any]) -> None:
    for k in range(3):
        assert sheepdog.map(lambda x, k=k: x + k, [1, 2], config, verbose=False) == [1 + k, 2 + k]


def test_cluster_json_is_a_valid_config(cluster: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster))
    assert sheepdog.Config.from_file(path).host == cluster["host"]
