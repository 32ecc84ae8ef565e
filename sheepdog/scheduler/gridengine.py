"""Grid Engine (Son of Grid Engine, SGE): every q* command sheepdog runs, and its parser.

:class:`GridEngine` runs ``qsub -terse``, ``qstat``, ``qstat -j``, ``qacct -j``,
``qdel`` and ``qconf -sconf`` on the head node through a
:class:`~sheepdog.remote.Remote`; the ``parse_*`` functions read their answers
and are pure. A parser that cannot read an answer says which pattern did not
match and shows the text.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..errors import RemoteCommandError, SheepdogError, SubmitError
from .base import (
    ArrayLimits,
    Deletion,
    Host,
    JobStatus,
    Scheduler,
    State,
    Waiting,
    describe_exit,
    format_gb,
    option_words,
    quote_all,
)
from .stubexits import stub_exit_reasons

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "DEFAULT_ARRAY_LIMITS",
    "MEMORY_LIMIT_RESOURCES",
    "MEMORY_UNITS",
    "QSTAT_COMMAND",
    "SGE_ENV_PREAMBLE",
    "AccountingRecord",
    "GridEngine",
    "QstatJob",
    "describe_failure",
    "hard_requests",
    "neutral_state",
    "parse_global_config",
    "parse_memory",
    "parse_qacct",
    "parse_qdel",
    "parse_qstat",
    "parse_qstat_j_errors",
    "parse_qsub_output",
    "parse_scheduling_info",
    "parse_time",
    "permanent_scheduling_problem",
]

logger = logging.getLogger(__name__)

#: Sourced before every remote command when ``qsub`` is not already on PATH, because a
#: non-interactive SSH session often skips the login files that set Grid Engine up.
SGE_ENV_PREAMBLE = (
    "if ! command -v qsub >/dev/null 2>&1; then "
    'for f in "${SGE_ROOT:-/nonexistent}/${SGE_CELL:-default}/common/settings.sh" '
    "/etc/profile.d/sge.sh /etc/profile.d/gridengine.sh /etc/profile.d/sgeroot.sh "
    "/opt/sge/default/common/settings.sh /usr/share/gridengine/default/common/settings.sh "
    "/var/lib/gridengine/default/common/settings.sh "
    "/usr/local/sge/default/common/settings.sh; do "
    '[ -r "$f" ] && . "$f" >/dev/null 2>&1 && break; done; fi; '
    "if ! command -v qsub >/dev/null 2>&1 && [ -r /etc/profile ]; then "
    ". /etc/profile >/dev/null 2>&1; fi; "
)

#: The jobs of the user the SSH session is logged in as: that user may come from
#: ~/.ssh/config, so it is asked on the head node, not taken from the config.
QSTAT_COMMAND = 'qstat -u "$(id -un)"'

# --- qsub ----------------------------------------------------------------------------

_QSUB_TERSE = re.compile(
    r"^\s*(?P<job_id>\d+)(?:\.(?P<first>\d+)-(?P<last>\d+):(?P<step>\d+))?\s*$", re.MULTILINE
)


def parse_qsub_output(stdout: str) -> str:
    """Return the job id from ``qsub -terse`` output (``123`` or ``123.1-10:1``)."""
    match = _QSUB_TERSE.search(stdout)
    if match is None:
        raise ValueError(
            "qsub -terse output did not match the pattern "
            f"{_QSUB_TERSE.pattern!r} (a job id, optionally '.first-last:step'): {stdout!r}"
        )
    return match.group("job_id")


# --- qstat ---------------------------------------------------------------------------

_QSTAT_LINE = re.compile(
    r"^\s*(?P<job_id>\d+)\s+(?P<prior>[\d.]+)\s+(?P<name>\S+)\s+(?P<user>\S+)\s+"
    r"(?P<state>[a-zA-Z]+)\s+(?P<date>\d\d/\d\d/\d{4}\s+\d\d:\d\d:\d\d)\s*"
    r"(?P<rest>.*)$"
)


@dataclass
class QstatJob:
    """What qstat says about one job: the Grid Engine states of its array tasks."""

    job_id: str
    states: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)

    @property
    def in_error(self) -> bool:
        """True when a task of the job is in an error state (``Eqw`` and the like)."""
        return any("E" in s for s in self.states)


def parse_qstat(text: str) -> dict[str, QstatJob]:
    """Parse plain ``qstat`` output into job id → status; header and odd lines are skipped."""
    jobs: dict[str, QstatJob] = {}
    for line in text.splitlines():
        match = _QSTAT_LINE.match(line)
        if match is None:
            continue
        status = jobs.setdefault(match["job_id"], QstatJob(match["job_id"]))
        status.states.add(match["state"])
        status.lines.append(line.strip())
    return jobs


def neutral_state(state: str) -> State:
    """Grid Engine's state letters (``qw``, ``hqw``, ``r``, ``Eqw``...) in neutral words.

    States that are neither waiting, running nor in error (``t`` transferring,
    ``s``/``S``/``T`` suspended, ``dr`` being deleted) are ``UNKNOWN``: the job is
    still listed, so it is not gone.
    """
    if "E" in state:
        return State.ERROR
    if "q" in state:
        return State.QUEUED
    if "r" in state:
        return State.RUNNING
    return State.UNKNOWN


# --- qdel ----------------------------------------------------------------------------

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


# --- qstat -j ------------------------------------------------------------------------


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


# --- qconf -sconf --------------------------------------------------------------------

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


# --- qacct ---------------------------------------------------------------------------


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
    return describe_exit(record.exit_status, where, stub_exit_reasons())


# --- the workers' limits, from the job's requests -------------------------------------

#: sge_types(5) memory_specifier: k/m/g/t count in powers of 1000, K/M/G/T of 1024.
MEMORY_UNITS: dict[str, int] = {
    "": 1,
    **{u: 1000 ** (i + 1) for i, u in enumerate("kmgt")},
    **{u: 1024 ** (i + 1) for i, u in enumerate("KMGT")},
}
_MEMORY = re.compile(r"^(0[xX][0-9a-fA-F]+|0[0-7]+|(?:0|[1-9]\d*)(?:\.\d+)?)([kKmMgGtT]?)$")
#: The hard requests that the worker takes as its address-space limit.
MEMORY_LIMIT_RESOURCES = ("mem_grab", "h_vmem")


def parse_memory(spec: str) -> int | None:
    """Return the bytes in an SGE memory specifier (2G, 500m, 0x10K, 1.5G), None for INFINITY."""
    if spec.strip().lower() == "infinity":
        return None
    match = _MEMORY.match(spec.strip())
    if not match:
        raise ValueError(f"{spec!r} is not a Grid Engine memory specifier such as 2G or 500M")
    number, unit = match.groups()
    value: float
    if number[:2] in ("0x", "0X"):
        value = int(number, 16)
    else:  # a leading 0 means octal, as in C
        value = int(number, 8) if number[0] == "0" and number.isdigit() else float(number)
    return int(value * MEMORY_UNITS[unit])


def parse_time(spec: str) -> int | None:
    """Return the seconds in an SGE time (90, 1:30, 0:0:20, 1:00:00); None for INFINITY."""
    if spec.strip().lower() == "infinity":
        return None
    if not re.match(r"^\d+(?::\d+){0,2}$", spec.strip()):
        raise ValueError(f"{spec!r} is not a Grid Engine time such as 3600 or 1:00:00")
    seconds = 0
    for part in spec.strip().split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def hard_requests(options: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Yield (name, value) of each hard ``-l`` request in raw qsub options (``#$`` lines).

    ``-soft`` and ``-hard`` hold until the next of them, across options, as across
    the job file's lines.
    """
    hard = True
    for option in options:
        words = option.split()
        for i, word in enumerate(words):
            if word in ("-hard", "-soft"):
                hard = word == "-hard"
            elif word == "-l" and hard and i + 1 < len(words):
                for item in words[i + 1].split(","):  # e.g. h_rt=1:00:00,mem_grab=2G
                    name, _, value = item.partition("=")
                    yield name, value


# --- the scheduler -------------------------------------------------------------------


class GridEngine(Scheduler):
    """Son of Grid Engine on a head node reached over SSH (a :class:`~sheepdog.remote.Remote`)."""

    name: ClassVar[str] = "gridengine"
    label: ClassVar[str] = "Grid Engine"
    array_index_var: ClassVar[str] = "SGE_TASK_ID"
    #: Sourced before every command on the head node (see :data:`SGE_ENV_PREAMBLE`).
    preamble: ClassVar[str] = SGE_ENV_PREAMBLE

    options_label: ClassVar[str] = "qsub"
    #: Options sheepdog sets itself; a second one in the raw options would conflict.
    reserved_options: ClassVar[dict[str, str]] = {
        "-t": "the array range is set by sheepdog from the number of tasks and workers "
              "(array_size)",
        "-S": "the interpreter is set by sheepdog from the `shell` option",
    }

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._array_limits: ArrayLimits | None = None

    @classmethod
    def directives(
        cls, shell: str, array_size: int, options: Sequence[str], *, max_running: int | None = None
    ) -> list[str]:
        """``#$ -S shell``, ``#$ -t 1-N`` and one ``#$`` line per raw qsub option.

        ``max_running`` is not written here: it is ``-tc``, one of the resource options.
        """
        return [
            f"#$ -S {shlex.quote(shell)}",
            f"#$ -t 1-{array_size}",
            *(f"#$ {opt}" for opt in options),
        ]

    @classmethod
    def resource_options(cls, config: Config) -> list[str]:
        """``-l <mem_resource>=``, ``-l h_rt=``, ``-q``, ``-pe`` and ``-tc`` for the typed keys."""
        opts: list[str] = []
        if config.mem_gb is not None:
            opts.append(f"-l {config.mem_resource}={format_gb(config.mem_gb)}")
        if config.h_rt is not None:
            opts.append(f"-l h_rt={config.h_rt}")
        if config.queue is not None:
            opts.append(f"-q {config.queue}")
        if config.pe is not None:
            opts.append(f"-pe {config.pe[0]} {config.pe[1]}")
        if config.max_running is not None:
            opts.append(f"-tc {config.max_running}")
        return opts

    @classmethod
    def memory_limit_bytes(cls, options: Sequence[str]) -> int | None:
        """The smallest hard ``mem_grab`` or ``h_vmem`` request of the options, in bytes.

        None when there is none (``INFINITY`` and 0 are none); ValueError for a value that
        is not a memory specifier. ``mem_free`` and the like are no limit.
        """
        limits = [parse_memory(value) for name, value in hard_requests(options)
                  if name in MEMORY_LIMIT_RESOURCES]
        return min((n for n in limits if n), default=None)

    @classmethod
    def run_limit_s(cls, options: Sequence[str]) -> int | None:
        """The smallest hard ``h_rt`` request of the options in seconds; None when none.

        ValueError for a value that is not a Grid Engine time.
        """
        limits = [parse_time(value) for name, value in hard_requests(options) if name == "h_rt"]
        return min((n for n in limits if n is not None), default=None)

    @classmethod
    def reserved_option(cls, word: str) -> str | None:
        """Why sheepdog sets ``-t`` or ``-S`` itself (a whole word: ``-tc`` is fine)."""
        return cls.reserved_options.get(word)

    def submit(
        self, job_path: str, *, name: str, array_size: int, workdir: str | None = None,
        split: bool = False, max_running: int | None = None, raw_options: Sequence[str] = (),
    ) -> str:
        """``qsub -terse`` the job file from its directory; return the Grid Engine job id."""
        directory = job_path.rsplit("/", 1)[0] or "/"
        args: list[str] = []
        if workdir is not None:
            # Quoted on the command line, not in a #$ line: a home directory with spaces
            # cannot break it. qsub's command line wins over the job file's #$ lines, so
            # what the raw options set is left out.
            given = option_words(raw_options)
            for flag, given_as in (("-wd", ("-wd", "-cwd")), ("-o", ("-o",)), ("-e", ("-e",))):
                if not given.intersection(given_as):
                    args += [flag, workdir]
        args += ["-N", name]
        if split:
            # qsub's own -t wins over the job file's #$ -t: the last job may be smaller.
            args += ["-t", f"1-{array_size}"]
        command = (
            f"cd {shlex.quote(directory)} && qsub -terse {quote_all(args)} "
            f"{shlex.quote(job_path)}"
        )
        result = self.host.run(command, error=SubmitError)
        try:
            return parse_qsub_output(result.stdout)
        except ValueError as exc:
            raise SubmitError(
                command, result.exit_status, result.stdout, f"{result.stderr}\n{exc}",
                host=self.host.host,
            ) from exc

    def delete(self, targets: Sequence[str]) -> Deletion:
        """``qdel`` jobs by id or name; say which went and whether qdel may have failed."""
        command = f"qdel {quote_all(targets)}"
        try:
            result = self.host.run(command, check=False, timeout_s=30)
        except SheepdogError as exc:
            logger.warning("%s failed: %s", command, exc)
            return Deletion([], str(exc), self.label)
        deleted, other = parse_qdel(result.stdout + "\n" + result.stderr)
        if other and result.exit_status != 0:
            return Deletion(deleted, f"{command} exited with status {result.exit_status}: "
                            + "; ".join(other), self.label)
        return Deletion(deleted, None, self.label)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus] | None:
        """``qstat`` for the login user's jobs; None when qstat fails (the state is unknown)."""
        result = self.host.run(QSTAT_COMMAND, check=False, timeout_s=60)
        if result.exit_status != 0:
            # "unable to contact qmaster" and the like: the jobs' state is unknown, and
            # reading that as "no jobs" would expire and resubmit running work.
            said = " ".join((result.stderr or result.stdout).split())[:300]
            logger.warning(
                "the cluster did not answer %s (exit status %d: %s); nothing "
                "is expired or resubmitted until it answers",
                QSTAT_COMMAND, result.exit_status, said or "no output",
            )
            return None
        listing = parse_qstat(result.stdout)
        return {
            job: JobStatus(job, {neutral_state(s) for s in listing[job].states},
                           set(listing[job].states), listing[job].lines)
            for job in job_ids if job in listing
        }

    def accounting(self, job_id: str) -> str:
        """Why the job's array tasks ended badly, from ``qacct -j`` ("" if it cannot say)."""
        result = self.host.run(f"qacct -j {shlex.quote(job_id)}", check=False, timeout_s=30)
        if result.exit_status != 0:
            return ""
        reasons: list[str] = []
        for record in parse_qacct(result.stdout):
            why = describe_failure(record)
            if why and why not in reasons:
                reasons.append(why)
        return "; ".join(reasons[:3])

    def why_waiting(self, job_id: str) -> Waiting:
        """The scheduling info of ``qstat -j``, and the reason it can never start, if any."""
        details = self.host.run(f"qstat -j {shlex.quote(job_id)}", check=False)
        reasons = parse_scheduling_info(details.stdout)
        return Waiting(reasons, permanent_scheduling_problem(reasons))

    def error_reasons(self, job_id: str) -> list[str]:
        """The ``error reason`` lines of ``qstat -j`` for a job in Eqw."""
        details = self.host.run(f"qstat -j {shlex.quote(job_id)}", check=False)
        return parse_qstat_j_errors(details.stdout + details.stderr)

    def array_limits(self) -> ArrayLimits:
        """The cluster's ``max_aj_tasks`` and ``max_aj_instances``, read once per scheduler.

        Where ``qconf -sconf`` fails or says something else, Grid Engine's defaults are
        used, with a warning that shows the command and its answer: a site that hides its
        configuration can still submit, and qsub itself refuses a job over the real limit.
        """
        if self._array_limits is None:
            try:
                result = self.host.run("qconf -sconf")
                self._array_limits = parse_global_config(result.stdout)
            except (RemoteCommandError, ValueError) as exc:
                logger.warning(
                    "could not read the array job limits (%s); assuming Grid Engine's "
                    "defaults, max_aj_tasks %d and max_aj_instances %d",
                    exc, DEFAULT_ARRAY_LIMITS.max_tasks, DEFAULT_ARRAY_LIMITS.max_instances,
                )
                self._array_limits = DEFAULT_ARRAY_LIMITS
        return self._array_limits
