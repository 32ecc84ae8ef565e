"""The Executor, tiny tasks, prologue and captured output on a real cluster."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import as_completed
from typing import Any

import pytest

import sheepdog
from sheepdog.errors import RemoteError

pytestmark = pytest.mark.e2e

WAIT_S = 300.0


def square(x: int) -> int:
    return x * x


def noop(x: int) -> int:
    return x


def explode(x: int) -> int:
    inner_helper_that_raises(x)
    return x


def inner_helper_that_raises(x: int) -> None:
    raise KeyError(f"missing {x}")


def chatty(x: int) -> str:
    print(f"stdout of task {x}")
    print(f"stderr of task {x}", file=sys.stderr)
    return os.environ.get("SHEEPDOG_PROLOGUE_VAR", "<unset>")


def test_executor_with_as_completed(config: dict[str, Any]) -> None:
    with sheepdog.Executor(config) as pool:
        futures = {pool.submit(square, i): i for i in range(30)}
        got = {futures[f]: f.result() for f in as_completed(futures, timeout=WAIT_S)}
        mapped = list(pool.map(square, range(5), timeout=WAIT_S))
        kw = pool.submit(divmod, 17, 5).result(WAIT_S)
    assert got == {i: i * i for i in range(30)}
    assert mapped == [0, 1, 4, 9, 16]
    assert kw == (3, 2)
    # 30 quick submits: one request; then the map's; then divmod's.
    assert len(pool.request_ids) == 3


def test_executor_kwargs_run_without_sheepdog_on_the_worker(config: dict[str, Any]) -> None:
    with sheepdog.Executor(config) as pool:
        future = pool.submit(sorted, [3, 1, 2], reverse=True)
        assert future.result(WAIT_S) == [3, 2, 1]


def test_remote_error_carries_the_remote_traceback(config: dict[str, Any]) -> None:
    with sheepdog.Executor(config) as pool:
        future = pool.submit(explode, 4)
        with pytest.raises(RemoteError) as info:
            future.result(WAIT_S)
    error = info.value
    assert error.type_name == "KeyError"
    assert "missing 4" in error.message
    assert "inner_helper_that_raises" in error.traceback
    assert error.host  # the execution node's name
    assert "Remote traceback" in str(error)


def test_map_errors_raise(config: dict[str, Any]) -> None:
    with pytest.raises(sheepdog.TaskFailedError) as info:
        sheepdog.map(explode, [1, 2], config, verbose=False, errors="raise")
    assert len(info.value.errors) == 2
    assert all("inner_helper_that_raises" in e.traceback for e in info.value.errors)
    assert sheepdog.map(explode, [1], config, verbose=False) == [None]


def test_ten_thousand_noop_tasks(config: dict[str, Any]) -> None:
    start = time.monotonic()
    results = sheepdog.map(noop, range(10_000), config, verbose=False)
    seconds = time.monotonic() - start
    assert results == list(range(10_000))
    print(f"\n10,000 no-op tasks with default settings: {seconds:.1f} s")


@pytest.mark.slow
def test_five_hundred_tasks_one_per_array_task(config: dict[str, Any]) -> None:
    start = time.monotonic()
    results = sheepdog.map(noop, range(500), dict(config, workers=500, batch=1), verbose=False)
    seconds = time.monotonic() - start
    assert results == list(range(500))
    print(f"\n500 tasks, one per array task (workers=500, batch=1): {seconds:.1f} s")


def test_prologue_sets_an_environment_variable_the_task_reads(config: dict[str, Any]) -> None:
    cfg = dict(config, prologue=["SHEEPDOG_PROLOGUE_VAR='set by the prologue'",
                                 "export SHEEPDOG_PROLOGUE_VAR"])
    assert sheepdog.map(chatty, [1, 2], cfg, verbose=False) == ["set by the prologue"] * 2


def test_captured_output_comes_back(config: dict[str, Any]) -> None:
    request_id = sheepdog.map_async(chatty, [5, 6], config)
    assert [r for _, r in sheepdog.get_results(request_id, config["dbfile"], timeout_s=WAIT_S)] \
        == ["<unset>", "<unset>"]
    assert sheepdog.get_output(request_id, 2, config["dbfile"]) == (
        "stdout of task 6\n", "stderr of task 6\n"
    )
