"""Read Grid Engine's answers: qstat listings, qstat -j details, qacct records.

Pure parsing functions; the commands themselves run through a Deployer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "AccountingRecord",
    "DEFAULT_ARRAY_LIMITS",
    "ArrayLimits",
    "JobStatus",
    "describe_failure",
    "parse_global_config",
    "parse_qacct",
    "parse_qdel",
    "parse_qstat",
    "parse_qstat_j_errors",
    "parse_scheduling_info",
    "permanent_scheduling_problem",
]

_QSTAT_LINE = re.compile(
    r"^\s*(?P<job_id>\d+)\s+(?P<prior>[\d.]+)\s+(?P<name>\S+)\s+(?P<user>\S+)\s+"
    r"(?P<state>[a-zA-Z]+)\s+(?P<date>\d\d/\d\d/\d{4}\s+\d\d:\d\d:\d\d)\s*"
    r"(?P<rest>.*)$"
)


@dataclass
class JobStatus:
    """What qstat says about one job: the states of its array tasks."""

    job_id: str
    states: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)

    @property
    def in_error(self) -> bool:
        """True when a task of the job is in an error state (``Eqw`` and the like)."""
        return any("E" in s for s in self.states)


def parse_qstat(text: str) -> dict[str, JobStatus]:
    """Parse plain ``qstat`` output into job id → status; header and odd lines are skipped."""
    jobs: dict[str, JobStatus] = {}
    for line in text.splitlines():
        match = _QSTAT_LINE.match(line)
        if match is None:
            continue
        status = jobs.setdefault(match["job_id"], JobStatus(match["job_id"]))
        status.states.add(match["state"])
        status.lines.append(line.strip())
    return jobs


#: What qdel says for a job it deleted or will delete (``sheep has deleted job 44``,
#: ``sheep has registered the job 44 for deletion``, ``job 44 is already in deletion``,
#: and the same for array tasks, ``job-array task 44.1``).
_QDEL_DELETED = re.compile(
    r"(?:has deleted job|has registered the job|job)(?:-array task)?\s+(?P<job_id>\d+)"
    r"(?:\.\S+)?(?:\s+for deletion|\s+is already in deletion)?"
)
_QDEL_GONE = re.compile(r"does not exist|do not exist")


def parse_qdel(text: str) -> tuple[list[str], list[str]]:
    """Split qdel's output into (job ids it deleted, lines that are neither that nor "gone").

    A job that does not exist is fine for a caller that wants it gone; any other
    line (``unable to contact qmaster``, ``denied``) means qdel may have failed.
    """
    deleted: list[str] = []
    other: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        match = _QDEL_DELETED.search(stripped)
        done = "delet" in stripped and "denied" not in stripped
        if match is not None and done:
            if match["job_id"] not in deleted:
                deleted.append(match["job_id"])
        elif not _QDEL_GONE.search(stripped):
            other.append(stripped)
    return deleted, other


def parse_qstat_j_errors(text: str) -> list[str]:
    """The error lines of ``qstat -j ID`` (``error reason N: ...``), deduplicated in order."""
    seen: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if re.match(r"^(error reason|error)\s*\d*\s*:", stripped):
            reason = stripped.split(":", 1)[1].strip()
            if reason and reason not in seen:
                seen.append(reason)
    return seen


def parse_scheduling_info(text: str) -> list[str]:
    """The scheduler's reasons from ``qstat -j ID`` (``scheduling info:`` and what follows)."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("scheduling info:"):
            inside = True
            line = line.split(":", 1)[1]
        elif inside and line and not line[0].isspace():
            break  # the next field
        if inside and line.strip() and line.strip() not in lines:
            lines.append(line.strip())
    return lines


#: Scheduler reasons that no amount of waiting cures.
_PERMANENT = (
    "unknown resource",
    "does not exist",
    "no suitable queue",
    # A fixed (f) host, queue or global value smaller than the request; "hc:"/"qc:" would be
    # a consumable that frees up later.
    "offers only hf:",
    "offers only qf:",
    "offers only gf:",
    # The cluster queue's own (fixed) configuration cannot meet the request.
    "because of cluster queue",
)


def permanent_scheduling_problem(reasons: list[str]) -> str | None:
    """The reason a queued job can never run, if the scheduler's reasons say so."""
    cannot = [r for r in reasons if "cannot run" in r or "no suitable queue" in r]
    if cannot and all(any(p in r for p in _PERMANENT) for r in cannot):
        return "; ".join(cannot[:3])
    return None


@dataclass(frozen=True)
class ArrayLimits:
    """The cluster's limits on one array job, from its global configuration (0: no limit)."""

    #: ``max_aj_tasks``: how many array tasks one job may have.
    max_tasks: int
    #: ``max_aj_instances``: how many of one job's array tasks may run at once.
    max_instances: int

    @property
    def per_job(self) -> int:
        """How many array tasks to put in one job (0: any number).

        Beyond ``max_aj_instances`` the extra tasks of one job only wait; another job runs
        them at once, so a request for more workers is split at the smaller limit.
        """
        limits = [n for n in (self.max_tasks, self.max_instances) if n > 0]
        return min(limits) if limits else 0


#: Grid Engine's defaults for ``max_aj_tasks`` and ``max_aj_instances`` (sge_conf(5)).
DEFAULT_ARRAY_LIMITS = ArrayLimits(75_000, 2_000)

_CONF_LINE = re.compile(r"^(?P<key>max_aj_tasks|max_aj_instances)\s+(?P<value>\d+)\s*$", re.M)


def parse_global_config(text: str) -> ArrayLimits:
    """Read ``max_aj_tasks`` and ``max_aj_instances`` from ``qconf -sconf`` output.

    Raises ValueError naming the pattern and the keys that did not match.
    """
    found = {m["key"]: int(m["value"]) for m in _CONF_LINE.finditer(text)}
    missing = [k for k in ("max_aj_tasks", "max_aj_instances") if k not in found]
    if missing:
        raise ValueError(
            f"qconf -sconf output has no line matching {_CONF_LINE.pattern!r} for "
            f"{', '.join(missing)}: {text[:2000]!r}"
        )
    return ArrayLimits(found["max_aj_tasks"], found["max_aj_instances"])


@dataclass
class AccountingRecord:
    """One array task's record from ``qacct -j``."""

    job_id: str
    task_id: int | None
    hostname: str
    exit_status: int | None
    failed: str
    maxvmem: str
    ru_wallclock: str
    fields: dict[str, str]


def parse_qacct(text: str) -> list[AccountingRecord]:
    """Parse ``qacct -j ID`` output: one record per array task, separated by '=' lines."""
    records: list[AccountingRecord] = []
    current: dict[str, str] = {}

    def flush() -> None:
        if not current:
            return
        task = current.get("taskid", "")
        exit_text = current.get("exit_status", "").split()[0] if current.get("exit_status") else ""
        records.append(
            AccountingRecord(
                job_id=current.get("jobnumber", ""),
                task_id=int(task) if task.isdigit() else None,
                hostname=current.get("hostname", ""),
                exit_status=int(exit_text) if exit_text.lstrip("-").isdigit() else None,
                failed=current.get("failed", "0"),
                maxvmem=current.get("maxvmem", ""),
                ru_wallclock=current.get("ru_wallclock", ""),
                fields=dict(current),
            )
        )
        current.clear()

    for line in text.splitlines():
        if line.startswith("====="):
            flush()
            continue
        parts = line.split(None, 1)
        if len(parts) == 2:
            current[parts[0]] = parts[1].strip()
        elif len(parts) == 1:
            current[parts[0]] = ""
    flush()
    return records


def describe_failure(record: AccountingRecord) -> str | None:
    """Say in words why an array task ended badly, or None if it ended well."""
    failed_code = record.failed.split(":", 1)[0].strip()
    failed_text = record.failed.split(":", 1)[1].strip() if ":" in record.failed else ""
    where = f" on {record.hostname}" if record.hostname else ""
    if failed_code not in ("", "0"):
        lowered = failed_text.lower()
        # qacct writes ru_wallclock as "21" or, in newer versions, "21s".
        wallclock = record.ru_wallclock.rstrip("s").strip() or "?"
        usage = f"maxvmem {record.maxvmem or '?'}, wall clock {wallclock} s"
        time_limit = "h_rt" in lowered or "s_rt" in lowered
        mem_limit = "h_vmem" in lowered or "s_vmem" in lowered
        if time_limit and not mem_limit:
            return f"killed by Grid Engine for exceeding its run time limit (h_rt){where}"
        if mem_limit and not time_limit:
            return f"killed by Grid Engine for exceeding its memory limit (h_vmem; {usage}){where}"
        return f"Grid Engine reports failure {failed_code}: {failed_text} ({usage}){where}"
    if record.exit_status not in (None, 0):
        status = record.exit_status
        if status > 128:
            signal = status - 128
            names = {9: "SIGKILL", 15: "SIGTERM", 6: "SIGABRT", 11: "SIGSEGV"}
            hint = ""
            if signal == 9:
                hint = " (killed: often an exceeded memory or time limit, or qdel)"
            return f"the array task died with signal {names.get(signal, signal)}{hint}{where}"
        why = _stub_exit_reasons().get(status)
        if why:
            return f"the worker exited with status {status}{where}: {why}"
        return f"the array task exited with status {status}{where}"
    return None


def _stub_exit_reasons() -> dict[int, str]:
    """What the worker stub's exit statuses mean (they are defined in the stub itself)."""
    from .client import stub

    return {
        stub.EXIT_PROTOCOL: "it could not talk to the server (see the job's .e file)",
        stub.EXIT_AUTH: "the server and the worker did not accept each other's signatures",
        stub.EXIT_VERSION: "the function cannot be loaded on that node's Python",
        stub.EXIT_STUCK: "a task overran task_timeout_s where it could not be interrupted",
        stub.EXIT_SECRET: (
            "it cannot read the request's secret file, which sheepdog writes beside the job "
            "file in ssh_dir on the head node: the execution nodes must see ssh_dir at the "
            "same path (a shared file system); see the job's .e file"
        ),
    }
