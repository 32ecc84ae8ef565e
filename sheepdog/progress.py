"""Progress of a request for a person watching: a tqdm bar on a terminal, log lines otherwise.

Counts come from :meth:`sheepdog.storage.Storage.task_counts`. On a terminal
(and with ``verbose``) a bar on stderr shows finished tasks of the total,
failed and running tasks, the rate and the ETA. When stderr is not a
terminal, a line goes to this module's logger (INFO) at most every
``every_s`` seconds, and, with ``verbose``, the same plain line to stderr, so
a batch job's log is not flooded with carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

from .store.states import RequestState, TaskState

__all__ = [
    "TASK_STATE_WORDS",
    "Progress",
    "ended",
    "finished_by_workers",
    "format_counts",
    "request_state",
    "started",
]

logger = logging.getLogger(__name__)

#: Seconds between two log lines when stderr is not a terminal.
LOG_EVERY_S = 10.0
#: The bar keeps at least this many columns; the rate is left out before it gets narrower.
MIN_BAR_COLUMNS = 10


#: The one word for each stored task state that every display uses (status, requests,
#: results, the bar and map's summary): a leased task that its worker runs is "running"
#: (the rest of a worker's batch is "pending": :func:`started`), an error "failed" (a
#: lost task too: its kind says lost).
TASK_STATE_WORDS: dict[str, str] = {
    TaskState.PENDING: "pending",
    TaskState.LEASED: "running",
    TaskState.DONE: "done",
    TaskState.ERROR: "failed",
    TaskState.CANCELLED: "cancelled",
}


def started(counts: Mapping[str, int], running: int) -> dict[str, int]:
    """The counts as displays show them: ``leased`` only for the ``running`` tasks
    (:meth:`Storage.running_indices`), the rest of the workers' batches as pending."""
    shown = dict(counts)
    leased = shown.get(TaskState.LEASED, 0)
    shown[TaskState.LEASED] = min(leased, running)
    shown[TaskState.PENDING] = (
        shown.get(TaskState.PENDING, 0) + leased - shown[TaskState.LEASED]
    )
    return shown


def ended(counts: Mapping[str, int]) -> int:
    """How many tasks are no longer open: done, failed or cancelled (what a bar has filled)."""
    return finished_by_workers(counts) + counts.get(TaskState.CANCELLED, 0)


def finished_by_workers(counts: Mapping[str, int]) -> int:
    """How many tasks workers ran to an end, done or failed: a job's progress.

    Cancelled tasks are not counted: sheepdog ended those, not a worker, so they
    say nothing of whether the jobs get on.
    """
    return counts.get(TaskState.DONE, 0) + counts.get(TaskState.ERROR, 0)


def _cancelled(counts: Mapping[str, int]) -> str:
    n = counts.get(TaskState.CANCELLED, 0)
    return f", {n} cancelled" if n else ""


def format_counts(counts: Mapping[str, int], total: int) -> str:
    """One line such as ``40/100 done, 2 failed, 8 running, 50 pending``.

    Cancelled tasks are counted apart from failed ones, and named only when there are some.
    """
    return (
        f"{counts.get(TaskState.DONE, 0)}/{total} done, {counts.get(TaskState.ERROR, 0)} failed"
        f"{_cancelled(counts)}, {counts.get(TaskState.LEASED, 0)} running, "
        f"{counts.get(TaskState.PENDING, 0)} pending"
    )


def request_state(stored: str, counts: Mapping[str, int]) -> str:
    """A request's state in the displays' words: ``running``, ``finished`` or ``cancelled``."""
    if stored != RequestState.OPEN:
        return stored
    open_tasks = counts.get(TaskState.PENDING, 0) + counts.get(TaskState.LEASED, 0)
    return "running" if open_tasks else "finished"


def _rate(per_s: float) -> str:
    """A rate in at most four digits: 1480, 95.3, 2.95."""
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 10 else f"{per_s:.2f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Shows how far a request has got; call :meth:`update` with task counts, then :meth:`close`."""

    def __init__(
        self,
        total: int,
        *,
        verbose: bool = True,
        label: str = "sheepdog",
        stream: IO[str] | None = None,
        every_s: float = LOG_EVERY_S,
    ) -> None:
        self.total = total
        self.verbose = verbose
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.start = time.monotonic()
        self._last: tuple[int, int, int] | None = None
        self._last_line_at: float | None = None
        self._last_line: str | None = None
        self._bar: Any = None
        self._initial: int | None = None  # finished before we started watching: not in the rate
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        if verbose and self.tty:
            from tqdm import tqdm  # type: ignore[import-untyped]  # only a terminal needs it

            # tqdm's default without the brackets, and our own short postfix (the rate,
            # then the counts): at 80 columns the text is never cut and the bar keeps room.
            self._bar = tqdm(
                total=total, desc=label, unit="task", file=self.stream, dynamic_ncols=True,
                smoothing=0.1, leave=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {elapsed}<{remaining}{postfix}",
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, counts: Mapping[str, int]) -> None:
        """Show the new counts (nothing happens when they did not change)."""
        done, running = counts.get(TaskState.DONE, 0), counts.get(TaskState.LEASED, 0)
        failed = ended(counts) - done
        if self._bar is not None:
            if (done, failed, running) != self._last:
                if self._last is None:
                    # tqdm's rate and ETA must count only what finishes from now on.
                    self._bar.n = self._bar.last_print_n = self._bar.initial = done + failed
                self._bar.set_postfix_str(self._bar_text(counts), refresh=False)
                if done + failed > self._bar.n:
                    self._bar.update(done + failed - self._bar.n)
                else:
                    self._bar.refresh()
        else:
            now = time.monotonic()
            finished = done + failed >= self.total
            due = self._last_line_at is None or now - self._last_line_at >= self.every_s
            if (done, failed, running) != self._last and (due or finished):
                self._line(counts, now)
        self._last = (done, failed, running)

    def _columns(self) -> int:
        """The terminal's width as tqdm sees it."""
        dynamic = getattr(self._bar, "dynamic_ncols", None)
        if callable(dynamic):
            shape = dynamic(self._bar.fp)  # (columns, rows) in newer tqdm, columns in older
            columns = shape[0] if isinstance(shape, tuple) else shape
            return int(columns or 80)
        return int(self._bar.ncols or 80)

    def _bar_text(self, counts: Mapping[str, int]) -> str:
        """The rate and the counts after the bar, without the rate where it would not fit."""
        counted = self._postfix(counts)
        elapsed = time.monotonic() - self.start
        finished = ended(counts) - self._bar.initial
        rate = f"{_rate(finished / elapsed)}task/s" if finished > 0 and elapsed > 0 else "?task/s"
        digits = len(str(self.total))
        # label: 100%|<bar>| N/N 00:00<00:00, rate, counts
        fixed = len(self.label) + 7 + 2 + 2 * digits + 1 + 12 + 2 + len(rate) + 2 + len(counted)
        if self._columns() - fixed < MIN_BAR_COLUMNS:
            return counted
        return f"{rate}, {counted}"

    @staticmethod
    def _postfix(counts: Mapping[str, int]) -> str:
        """What the bar adds after the rate: failed, cancelled and running tasks, kept short."""
        if not ended(counts) and not counts.get(TaskState.LEASED, 0):
            return "waiting for workers"
        failed = counts.get(TaskState.ERROR, 0)
        return (
            (f"{failed} failed, " if failed else "")
            + (f"{counts[TaskState.CANCELLED]} cancelled, "
               if counts.get(TaskState.CANCELLED) else "")
            + f"{counts.get(TaskState.LEASED, 0)} running"
        )

    def _line(self, counts: Mapping[str, int], now: float) -> None:
        elapsed = now - self.start
        finished = ended(counts)
        line = f"{self.label}: {format_counts(counts, self.total)}"
        if self._initial is None:
            self._initial = finished
        if finished > self._initial and elapsed > 0:
            rate = (finished - self._initial) / elapsed
            line += f", {rate:.3g} tasks/s"
            if finished < self.total:
                line += f", ETA {_duration((self.total - finished) / rate)}"
        line += f", elapsed {_duration(elapsed)}"
        if line == self._last_line:
            return
        self._last_line, self._last_line_at = line, now
        logger.info("%s", line)
        if self.verbose:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
