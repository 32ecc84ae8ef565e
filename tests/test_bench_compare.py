"""benchmarks/compare.py: which figures compare, which way is better, and the verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.compare import better_if, compare, figures


def test_figures_are_every_number_but_the_machine() -> None:
    data = {
        "benchmark": "x",
        "machine": {"cores": 2},
        "resolved_s": 1.5,
        "ok": True,
        "rows": [{"name": "ours", "tasks_per_s": 10}, {"p50_ms": 3}],
        "note": "text",
    }
    assert dict(figures(data)) == {
        "resolved_s": 1.5, "rows[ours].tasks_per_s": 10.0, "rows[1].p50_ms": 3.0,
    }


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        ("tasks_per_s", "higher"),
        ("rows[ours].mb_s", "higher"),
        ("resolved_s", "lower"),
        ("p99_ms", "lower"),
        ("server_cpu_per_round_trip_ms", "lower"),
        ("finished_rows_read", "lower"),
        ("n_tasks", None),
        ("workers", None),
    ],
)
def test_which_way_is_better_comes_from_the_name(name: str, direction: str | None) -> None:
    assert better_if(name) == direction


def _write(directory: Path, name: str, data: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")


def test_compare_gives_ratios_and_verdicts_beyond_the_tolerance(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old, "bench", {"tasks_per_s": 100, "resolved_s": 2.0, "p50_ms": 10, "n_tasks": 5})
    _write(new, "bench", {"tasks_per_s": 80, "resolved_s": 1.0, "p50_ms": 10.5, "n_tasks": 5})
    _write(new, "only_new", {"tasks_per_s": 1})
    rows = {r["figure"]: r for r in compare(old, new)}
    assert set(rows) == {"tasks_per_s", "resolved_s", "p50_ms", "n_tasks"}
    assert rows["tasks_per_s"]["ratio"] == 0.8
    assert rows["tasks_per_s"]["verdict"] == "worse"
    assert rows["resolved_s"]["verdict"] == "better"
    assert rows["p50_ms"]["verdict"] == "same"
    assert rows["n_tasks"]["verdict"] == ""
