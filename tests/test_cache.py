"""The result cache, without Grid Engine: real storage, real server, local workers.

The array tasks run as local processes (``scheduler="local"``);
:class:`LocalJobs` (from test_executor) counts the jobs submitted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_executor import WAIT_S, LocalJobs, local_config

import sheepdog
from sheepdog import cli
from sheepdog.storage import Storage, content_digest


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Storage]:
    with Storage(str(tmp_path / "sheepdog.sqlite")) as storage:
        yield storage


def digests(*args: bytes) -> list[str]:
    return [content_digest(a) for a in args]


def test_only_results_of_the_same_function_and_argument_are_cached(db: Storage) -> None:
    f, g = content_digest(b"F"), content_digest(b"G")
    first = db.new_request(b"F", b"", [b"a", b"b", b"c"], func_digest=f,
                           args_digests=digests(b"a", b"b", b"c"))
    db.complete(first, [{"index": 1, "ok": True, "value": b"RA"},
                        {"index": 2, "ok": False,
                         "error": {"type": "E", "message": "m", "traceback": ""}}])
    again = db.new_request(b"F", b"", [b"c", b"b", b"a"], func_digest=f,
                           args_digests=digests(b"c", b"b", b"a"))
    # Only "a" has a result: "b" failed (never cached) and "c" never finished.
    assert db.fill_from_cache(again) == 1
    assert db.task_states(again) == ["pending", "pending", "done"]
    assert db.get_results(again) == [(b"a", b"RA")]
    assert db.count_cached(again) == 1
    assert db.count_cached(first) == 0
    other = db.new_request(b"G", b"", [b"a"], func_digest=g, args_digests=digests(b"a"))
    assert db.fill_from_cache(other) == 0  # another function: nothing
    plain = db.new_request(b"F", b"", [b"a"])
    assert db.fill_from_cache(plain) == 0  # stored without digests: nothing
    with pytest.raises(ValueError, match="1 argument digests for 2 arguments"):
        db.new_request(b"F", b"", [b"a", b"b"], func_digest=f, args_digests=digests(b"a"))


def counted(x: int, log: str) -> int:
    """x * 3, noting each run in a file, so a test sees which tasks really ran."""
    with open(log, "a") as out:
        out.write(f"{x}\n")
    return x * 3


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    deployer = LocalJobs(monkeypatch)
    config = local_config(tmp_path)
    yield {"config": config, "deployer": deployer, "log": str(tmp_path / "runs.log")}
    deployer.close()


def runs(log: str) -> list[int]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return sorted(int(line) for line in f)


def test_map_with_cache_runs_only_what_is_new(
    local: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config, deployer, log = local["config"], local["deployer"], local["log"]
    args = [(x, log) for x in range(4)]
    assert sheepdog.map(counted, args, config, verbose=False, timeout_s=WAIT_S) == [0, 3, 6, 9]
    assert deployer.submitted == 1
    # Every task cached: no job at all, the same results.
    assert sheepdog.map(counted, args, config, verbose=False, timeout_s=WAIT_S,
                        cache=True) == [0, 3, 6, 9]
    assert deployer.submitted == 1
    assert runs(log) == [0, 1, 2, 3]
    # Two new arguments: one job, for them alone.
    more = [(x, log) for x in range(6)]
    rid = sheepdog.map_async(counted, more, config, cache=True)
    assert [r for _, r in sheepdog.get_results(rid, config["dbfile"], timeout_s=WAIT_S)] == [
        0, 3, 6, 9, 12, 15]
    assert deployer.submitted == 2
    assert runs(log) == [0, 1, 2, 3, 4, 5]
    capsys.readouterr()
    assert cli.main(["status", str(rid), "--dbfile", config["dbfile"]]) == 0
    assert "(4 from the cache)" in capsys.readouterr().out
    sheepdog.get_results(rid, config["dbfile"], verbose=True)  # the progress bar's line
    assert f"request {rid} (4 cached): 6/6 done" in capsys.readouterr().err
    # refresh runs everything again.
    sheepdog.map(counted, args, config, verbose=False, timeout_s=WAIT_S, cache="refresh")
    assert deployer.submitted == 3
    assert runs(log) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    with pytest.raises(ValueError, match="cache must be False, True or 'refresh', got 'yes'"):
        sheepdog.map_async(counted, args, config, cache="yes")


def test_executor_with_cache_resolves_without_submitting(local: dict[str, Any]) -> None:
    config, deployer, log = local["config"], local["deployer"], local["log"]
    with sheepdog.Executor(config) as pool:
        assert list(pool.map(counted, range(3), [log] * 3, timeout=WAIT_S)) == [0, 3, 6]
    assert deployer.submitted == 1
    with sheepdog.Executor(config, cache=True) as pool:
        assert list(pool.map(counted, range(3), [log] * 3, timeout=WAIT_S)) == [0, 3, 6]
    assert deployer.submitted == 1
    assert runs(log) == [0, 1, 2]
    with pytest.raises(ValueError, match="cache must be"):
        sheepdog.Executor(config, cache=1)
