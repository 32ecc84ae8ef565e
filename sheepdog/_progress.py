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

__all__ = ["Progress", "format_counts"]

logger = logging.getLogger(__name__)

#: Seconds between two log lines when stderr is not a terminal.
LOG_EVERY_S = 10.0


def _failed(counts: Mapping[str, int]) -> int:
    return counts.get("error", 0) + counts.get("cancelled", 0)


def format_counts(counts: Mapping[str, int], total: int) -> str:
    """One line such as ``40/100 done, 2 failed, 8 running, 50 pending``."""
    return (
        f"{counts.get('done', 0)}/{total} done, {_failed(counts)} failed, "
        f"{counts.get('leased', 0)} running, {counts.get('pending', 0)} pending"
    )


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

            self._bar = tqdm(
                total=total, desc=label, unit="task", file=self.stream, dynamic_ncols=True,
                smoothing=0.1, leave=True,
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
        done, failed, running = counts.get("done", 0), _failed(counts), counts.get("leased", 0)
        if self._bar is not None:
            if (done, failed, running) != self._last:
                if self._last is None:
                    # tqdm's rate and ETA must count only what finishes from now on.
                    self._bar.n = self._bar.last_print_n = self._bar.initial = done + failed
                self._bar.set_postfix_str(f"{failed} failed, {running} running", refresh=False)
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

    def _line(self, counts: Mapping[str, int], now: float) -> None:
        elapsed = now - self.start
        finished = counts.get("done", 0) + _failed(counts)
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
