"""Tests for sheepdog.progress: a tqdm bar on a terminal, throttled lines otherwise."""

from __future__ import annotations

import io
import logging

import pytest

from sheepdog.progress import Progress, ended, finished_by_workers, format_counts


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def counts(done: int = 0, error: int = 0, leased: int = 0, pending: int = 0) -> dict[str, int]:
    return {"done": done, "error": error, "cancelled": 0, "leased": leased, "pending": pending}


def test_format_counts() -> None:
    assert format_counts(counts(3, 1, 2, 4), 10) == "3/10 done, 1 failed, 2 running, 4 pending"


def test_terminal_shows_a_bar_with_failed_running_rate_and_eta() -> None:
    stream = Terminal()
    with Progress(10, verbose=True, stream=stream, label="req") as progress:
        progress.update(counts(pending=10))
        progress.update(counts(2, 1, 3, 4))
        progress.update(counts(6, 1, 3, 0))
    text = stream.getvalue()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("req:  70%")
    assert "7/10" in last
    assert "1 failed, 3 running" in last
    assert "task/s" in last
    assert "<" in last  # elapsed<ETA


def test_not_a_terminal_gives_plain_lines_at_most_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    caplog.set_level(logging.INFO, logger="sheepdog.progress")
    progress = Progress(4, verbose=True, stream=stream, every_s=3600)
    progress.update(counts(pending=4))
    progress.update(counts(1, 0, 1, 2))  # within the interval: not shown
    progress.update(counts(3, 1))  # finished: always shown
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("sheepdog: 0/4 done, 0 failed, 0 running, 4 pending")
    assert lines[1].startswith("sheepdog: 3/4 done, 1 failed, 0 running, 0 pending, ")
    assert "tasks/s" in lines[1]
    assert "\r" not in stream.getvalue()
    assert [r.getMessage() for r in caplog.records] == lines


def test_quiet_when_not_verbose_but_still_logs(caplog: pytest.LogCaptureFixture) -> None:
    for stream in (io.StringIO(), Terminal()):
        caplog.clear()
        caplog.set_level(logging.INFO, logger="sheepdog.progress")
        progress = Progress(2, verbose=False, stream=stream)
        progress.update(counts(pending=2))
        progress.update(counts(2))
        progress.close()
        progress.close()  # twice is fine
        assert stream.getvalue() == ""
        assert len(caplog.records) == 2


def test_cancelled_tasks_are_counted_apart_from_failed_ones() -> None:
    counts = {"done": 3, "error": 1, "cancelled": 2, "leased": 0, "pending": 0}
    assert format_counts(counts, 6) == "3/6 done, 1 failed, 2 cancelled, 0 running, 0 pending"
    stream = Terminal()
    with Progress(6, verbose=True, stream=stream, label="request 7") as progress:
        progress.update(counts)
    assert "1 failed, 2 cancelled, 0 running" in stream.getvalue()


def test_the_bar_says_it_waits_for_workers_until_one_starts() -> None:
    stream = Terminal()
    with Progress(50, verbose=True, stream=stream, label="request 7") as progress:
        progress.update(counts(pending=50))
        assert "waiting for workers" in stream.getvalue().replace("\r", "\n").splitlines()[-1]
        progress.update(counts(leased=4, pending=46))
    assert "waiting" not in stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("total", "state", "bar_width"),
    [(50, counts(30, 5, 8, 7), 12), (10000, counts(6200, 120, 100, 3580), 8),
     (99999, counts(62000, 1200, 100, 36699), 5)],
)
def test_the_bar_text_fits_80_columns_with_room_for_the_bar(
    total: int, state: dict[str, int], bar_width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    stream = Terminal()
    with Progress(total, verbose=True, stream=stream, label="request 123") as progress:
        progress._bar.ncols = 80  # what dynamic_ncols reads from an 80-column terminal
        progress._bar.dynamic_ncols = False
        progress.update(state)
    last = stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert len(last) <= 80
    assert last.rstrip().endswith(" running"), last  # nothing cut off
    bar = last.split("|")[1]
    assert len(bar) >= bar_width, last


def test_map_summary_names_the_first_error_and_counts_cancelled_apart() -> None:
    from sheepdog.errors import RemoteError
    from sheepdog.session import failure_summary

    def error(index: int, type_name: str, message: str, kind: str = "exception") -> RemoteError:
        return RemoteError(type_name, message, "Traceback...", request_id=4, task_index=index,
                           kind=kind)

    every = [(i, error(i, "ZeroDivisionError", "division by zero\nmore")) for i in (1, 2, 3)]
    assert failure_summary(every, 3, 4, "./sheepdog.sqlite").splitlines() == [
        "sheepdog: request 4: 3 of 3 tasks failed; task 1: ZeroDivisionError: division",
        "  by zero",
        "sheepdog: see sheepdog.get_errors(4, './sheepdog.sqlite')",
    ]
    mixed = [(1, error(1, "Cancelled", "cancelled by Ctrl-C", "cancelled")),
             (2, error(2, "KeyError", "'x'"))]
    def first_error(summary: str) -> str:
        return " ".join(" ".join(summary.splitlines()[:-1]).split())

    assert first_error(failure_summary(mixed, 5, 4, "db")) == (
        "sheepdog: request 4: 1 of 5 tasks failed and 1 was cancelled; task 2: KeyError: 'x'"
    )
    cancelled = [(1, error(1, "Cancelled", "cancelled by Ctrl-C", "cancelled"))]
    assert first_error(failure_summary(cancelled, 2, 4, "db")) == (
        "sheepdog: request 4: 1 of 2 tasks was cancelled; task 1: Cancelled: cancelled by Ctrl-C"
    )
    # A long error is folded, not cut, up to four lines of 79 columns; then it ends in "...".
    long = [(1, error(1, "ValueError", " ".join(["v" * 9] * 20) + " the end"))]
    lines = failure_summary(long, 1, 4, "db").splitlines()
    assert lines[-2].endswith("the end") and max(map(len, lines)) <= 79, lines
    longer = [(1, error(1, "ValueError", " ".join(["v" * 9] * 40) + " the end"))]
    lines = failure_summary(longer, 1, 4, "db").splitlines()
    assert len(lines) == 5 and lines[-2].endswith(" ...") and max(map(len, lines)) <= 79
    # A lost task gets the array tasks' exit status; an exception does not need it.
    lost = [(1, error(1, "LostTask", "task 1 was lost 3 times", "lost"))]
    assert "lost 3 times (the array task exited with status 7)" in " ".join(
        failure_summary(lost, 1, 4, "db", exits="the array task exited with status 7").split())
    assert "status 7" not in failure_summary(every, 3, 4, "db", exits="status 7")


def test_ended_counts_cancelled_tasks_but_workers_progress_does_not() -> None:
    """A bar fills with every task no longer open; the watcher's progress is the workers' own."""
    counts = {"pending": 4, "leased": 1, "done": 3, "error": 2, "cancelled": 5}
    assert ended(counts) == 10
    assert finished_by_workers(counts) == 5
    assert ended({}) == finished_by_workers({}) == 0
