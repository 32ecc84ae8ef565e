"""What the dashboard shows, read from the store and aggregated here, never row by row.

:func:`request_summaries` is the requests page; :func:`request_detail` one
request: its counts, a :class:`Timeline` (one mark per task for small
requests, lanes of time bins for large ones), throughput over time and its
failures grouped by error type. A request of 100,000 tasks is read in one
pass (:meth:`~sheepdog.store.Storage.task_spans`) and binned, so what reaches
the browser has a bounded size whatever the request's.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnknownRequestError
from ..hints import sheepdog_command
from ..progress import TASK_STATE_WORDS, request_state
from ..store import FailureKind, JobRecord, Storage, TaskState
from ..store.queue import LOST_KINDS, RERUN_CHOICES

__all__ = [
    "MAX_LANES",
    "MAX_TASK_MARKS",
    "TIME_BINS",
    "FailureGroup",
    "RequestDetail",
    "RequestSummary",
    "Timeline",
    "commands",
    "request_detail",
    "request_summaries",
    "request_summary",
    "timeline",
]

#: Up to this many tasks, the timeline draws one mark per task; above, it bins them.
MAX_TASK_MARKS = 2000
#: A timeline has at most this many lanes (worker, else node); the rest share "other".
MAX_LANES = 48
#: Time bins of a binned timeline and of the throughput chart.
TIME_BINS = 120
#: Failure groups shown with their traceback and output.
MAX_FAILURE_GROUPS = 10
#: The lane of tasks that finished without ever being leased (a job that never ran).
NO_NODE = "(no node)"
OTHER = "(other)"


def task_look(state: str, kind: str | None) -> str:
    """The class a task's mark gets: done, running, failed, lost, cancelled or pending."""
    if state == TaskState.ERROR and kind in LOST_KINDS:
        return "lost"
    return TASK_STATE_WORDS.get(state, state)


@dataclass(frozen=True)
class RequestSummary:
    """One line of the requests page."""

    id: int
    function: str
    scheduler: str
    state: str
    counts: dict[str, int]
    n_tasks: int
    submitted: float
    finished: float | None

    @property
    def elapsed_s(self) -> float:
        """From submission to the last result, or to now while it runs."""
        return (self.finished if self.finished is not None else time.time()) - self.submitted


def _function(settings: dict[str, Any], label: str | None) -> str:
    return str(settings.get("function") or label or "-")


def _scheduler(settings: dict[str, Any], jobs: list[JobRecord]) -> str:
    """The scheduler its jobs went to; else the one its config named."""
    used = [job.scheduler for job in jobs if job.scheduler]
    if used:
        return used[-1]
    config = settings.get("config")
    return str(config.get("scheduler", "-")) if isinstance(config, dict) else "-"


def _summary(storage: Storage, row: dict[str, Any]) -> RequestSummary:
    rid = int(row["id"])
    settings = storage.get_settings(rid)
    counts = storage.task_counts(rid)
    state = request_state(str(row["state"]), counts)
    finished = None
    if state != "running":
        finished = storage.last_finished(rid)
    return RequestSummary(
        id=rid, function=_function(settings, row["label"]),
        scheduler=_scheduler(settings, storage.get_jobs(rid)), state=state, counts=counts,
        n_tasks=int(row["n_tasks"]), submitted=float(row["created"]), finished=finished,
    )


def request_summaries(storage: Storage) -> list[RequestSummary]:
    """Every request in the database, newest first."""
    return [_summary(storage, row) for row in reversed(storage.list_requests())]


@dataclass
class Lane:
    """One row of the timeline: a worker (or a node, when workers are too many)."""

    name: str
    #: ``(start, end, look, index)`` per task, when the timeline draws tasks.
    marks: list[tuple[float, float, str, int]] = field(default_factory=list)
    #: Tasks running in each time bin, when the timeline bins.
    busy: list[int] = field(default_factory=list)
    #: Failed or lost tasks finishing in each time bin, by look, when it bins.
    failures: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Timeline:
    """Tasks by lane from lease to result, between ``start`` and ``end`` (unix times)."""

    start: float
    end: float
    lanes: list[Lane]
    binned: bool
    n_drawn: int
    #: Finished tasks per time bin, by look (done, failed, lost, cancelled): throughput.
    throughput: dict[str, list[int]]

    @property
    def bin_s(self) -> float:
        """The width of one time bin in seconds."""
        return max(self.end - self.start, 1e-9) / TIME_BINS


def _keep_busiest(sizes: Counter[str]) -> set[str]:
    """The lanes that keep their own row: all, or the busiest ``MAX_LANES - 1``."""
    if len(sizes) <= MAX_LANES:
        return set(sizes)
    return {name for name, _ in sizes.most_common(MAX_LANES - 1)}


def _bin(t: float, start: float, bin_s: float) -> int:
    return min(TIME_BINS - 1, max(0, int((t - start) / bin_s)))


def timeline(storage: Storage, request_id: int, now: float | None = None) -> Timeline:
    """Lay out a request's tasks by lane, from lease to result (to ``now`` while running).

    A lane is a worker, or a node when there are more than ``MAX_LANES``
    workers; beyond that many nodes the least busy share one. A task that
    finished unleased is a point in the ``(no node)`` lane; pending tasks are
    not drawn. Up to ``MAX_TASK_MARKS`` tasks each get a mark; above, SQLite
    counts them per lane and time bin and the lanes hold those counts.
    """
    now = time.time() if now is None else now
    n_drawn, start, end, workers, _ = storage.span_extent(request_id, now=now)
    end = max(end, start + 1.0)
    by_worker = workers <= MAX_LANES
    binned = n_drawn > MAX_TASK_MARKS
    result = Timeline(start, end, [], binned, n_drawn, {})
    bin_s = result.bin_s
    # (lane, begin bin or time, end bin or time, look, index or count)
    items: list[tuple[str, float, float, str, int]] = []
    if binned:
        for where, b, e, state, kind, n in storage.span_bins(
                request_id, by_worker=by_worker, start=start, bin_s=bin_s, bins=TIME_BINS,
                now=now):
            items.append((where or NO_NODE, b, e, task_look(state, kind), n))
    else:
        for idx, state, host, worker, begin, finish, kind in storage.task_spans(
                request_id, now=now):
            where = (worker or host) if by_worker else host
            items.append((where or NO_NODE, begin, finish, task_look(state, kind), idx))
    sizes: Counter[str] = Counter()
    for where, *_, n in items:
        sizes[where] += n if binned else 1
    keep = _keep_busiest(sizes)
    lanes: dict[str, Lane] = {}
    throughput = result.throughput
    for name, begin, finish, look, n in items:
        name = name if name in keep else OTHER
        lane = lanes.get(name)
        if lane is None:
            lane = lanes[name] = Lane(name, busy=[0] * (TIME_BINS + 1) if binned else [])
        finished = look not in ("running", "pending")
        if not binned:
            lane.marks.append((begin, finish, look, n))
            if finished:
                throughput.setdefault(look, [0] * TIME_BINS)[_bin(finish, start, bin_s)] += 1
            continue
        b, e = int(begin), int(finish)
        if finished:
            throughput.setdefault(look, [0] * TIME_BINS)[e] += n
        # A difference array: +n where the tasks start, -n after they end; summed below.
        lane.busy[b] += n
        lane.busy[e + 1] -= n
        if look in ("failed", "lost", "cancelled"):
            lane.failures.setdefault(look, [0] * TIME_BINS)[e] += n
    for lane in lanes.values():
        if binned:
            running = 0
            sums = []
            for delta in lane.busy[:TIME_BINS]:
                running += delta
                sums.append(running)
            lane.busy = sums
    result.lanes = sorted(lanes.values(),
                          key=lambda lane: (lane.name in (NO_NODE, OTHER), lane.name))
    return result


@dataclass(frozen=True)
class FailureGroup:
    """Failed tasks of one kind and error type, with one of them shown in full."""

    kind: str
    type: str
    count: int
    indices: list[int]
    example: int
    message: str
    traceback: str
    stdout: str
    stderr: str


def _failure_groups(storage: Storage, request_id: int) -> list[FailureGroup]:
    groups = []
    for kind, error_type, count, indices in storage.error_groups(request_id)[
            :MAX_FAILURE_GROUPS]:
        task = storage.get_task(request_id, indices[0])
        error = task["error"] or {}
        groups.append(FailureGroup(
            kind=kind, type=error_type, count=count, indices=indices, example=indices[0],
            message=str(error.get("message") or ""), traceback=str(error.get("traceback") or ""),
            stdout=task.get("stdout") or "", stderr=task.get("stderr") or "",
        ))
    return groups


@dataclass(frozen=True)
class RequestDetail:
    """Everything the page of one request shows."""

    summary: RequestSummary
    timeline: Timeline
    failures: list[FailureGroup]
    commands: list[tuple[str, str]]


def commands(summary: RequestSummary, dbfile: str,
             failures: list[FailureGroup]) -> list[tuple[str, str]]:
    """``(what it does, command)`` for the request: rerun what failed, attach, read errors."""
    rid = summary.id
    out = []
    kinds = {"lost" if g.kind in LOST_KINDS
             else "cancelled" if g.kind == FailureKind.CANCELLED else "failed"
             for g in failures}
    for which in RERUN_CHOICES:
        if which in kinds:
            out.append((f"run the {which} tasks again",
                        sheepdog_command("rerun", rid, f"--{which}", "--wait", dbfile=dbfile)))
    if kinds:
        out.append(("print every failure", sheepdog_command("errors", rid, dbfile=dbfile)))
    out.append(("watch it from a terminal", sheepdog_command("attach", rid, dbfile=dbfile)))
    out.append(("print its results", sheepdog_command("results", rid, dbfile=dbfile)))
    return out


def request_summary(storage: Storage, request_id: int) -> RequestSummary:
    """One request's line of the requests page; UnknownRequestError if there is none."""
    row = next((r for r in storage.list_requests() if r["id"] == request_id), None)
    if row is None:
        raise UnknownRequestError(request_id, storage.dbfile)
    return _summary(storage, row)


def request_detail(storage: Storage, request_id: int) -> RequestDetail:
    """One request's summary, timeline, failures and commands."""
    summary = request_summary(storage, request_id)
    failures = _failure_groups(storage, request_id)
    return RequestDetail(
        summary=summary,
        timeline=timeline(storage, request_id),
        failures=failures,
        commands=commands(summary, storage.dbfile, failures),
    )
