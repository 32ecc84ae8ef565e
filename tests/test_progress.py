"""Tests for sheepdog._progress: a tqdm bar on a terminal, throttled lines otherwise."""

from __future__ import annotations

import io
import logging

import pytest

from sheepdog._progress import Progress, format_counts


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
    caplog.set_level(logging.INFO, logger="sheepdog._progress")
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
        caplog.set_level(logging.INFO, logger="sheepdog._progress")
        progress = Progress(2, verbose=False, stream=stream)
        progress.update(counts(pending=2))
        progress.update(counts(2))
        progress.close()
        progress.close()  # twice is fine
        assert stream.getvalue() == ""
        assert len(caplog.records) == 2
