"""Slurm: every command sheepdog runs on a Slurm login node, and its parser.

:class:`Slurm` runs ``sbatch --parsable``, ``squeue`` (by job id, never by user),
``scontrol show job``, ``sacct`` (where slurmdbd keeps accounting), ``scancel``
and ``scontrol show config`` on the login node through a
:class:`~sheepdog.remote.Remote`; the ``parse_*`` functions read their answers
and are pure. A parser that cannot read an answer says which pattern did not
match and shows the text.

How the config's keys map to Slurm (see ``docs/schedulers.rst``): ``mem_gb`` is
``--mem`` (per node, which is per array task here), ``h_rt`` is ``--time``,
``queue`` is ``--partition``, ``pe`` slots are ``--cpus-per-task``, and
``max_running`` is the ``%`` throttle of ``--array``.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError, RemoteCommandError, SheepdogError, SubmitError
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
from .gridengine import MEMORY_UNITS, parse_time
from .stubexits import stub_exit_reasons

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "DEFAULT_MAX_ARRAY_SIZE",
    "PERMANENT_REASONS",
    "SLURM_ENV_PREAMBLE",
    "SLURM_LONG_OPTIONS",
    "SLURM_SHORT_OPTIONS",
    "JobRecord",
    "Slurm",
    "SlurmConfig",
    "SqueueRow",
    "describe_record",
    "neutral_state",
    "parse_sacct",
    "parse_sbatch_output",
    "parse_scontrol_config",
    "parse_scontrol_jobs",
    "parse_slurm_cpus",
    "parse_slurm_memory",
    "parse_slurm_time",
    "parse_squeue",
    "permanent_reason",
    "slurm_requests",
    "slurm_time",
]

logger = logging.getLogger(__name__)

#: Sourced before every command on the login node when ``sbatch`` is not already on PATH:
#: a non-interactive SSH session often skips the login files that put Slurm there.
SLURM_ENV_PREAMBLE = (
    "if ! command -v sbatch >/dev/null 2>&1 && [ -r /etc/profile ]; then "
    ". /etc/profile >/dev/null 2>&1; fi; "
)

#: What squeue answers (exit status 1, nothing on stdout) when the one job id it was asked
#: about is one slurmctld no longer knows: the job left the queue (and MinJobAge) long ago.
#: Only exactly this answer means "gone"; any other failure leaves the state unknown.
INVALID_JOB_ID = re.compile(r"^(?:slurm_load_jobs error: )?Invalid job id specified$")

#: slurmdbd hears of a job's end from slurmctld a moment after squeue stops listing it (its
#: agent queue runs behind under load): sacct, asked about a job that left the queue, is asked
#: again while it still shows a task unended, for at most this long, once a second.
SACCT_SETTLE_S = 15.0

#: Slurm's default MaxArraySize (slurm.conf(5)): array indices 0 .. 1000.
DEFAULT_MAX_ARRAY_SIZE = 1001

#: The login user, asked on the login node (it may come from ~/.ssh/config).
_ME = '"$(id -un)"'

# --- sbatch --------------------------------------------------------------------------

_SBATCH_PARSABLE = re.compile(r"^\s*(?P<job_id>\d+)(?:;(?P<cluster>\S+))?\s*$", re.MULTILINE)


def parse_sbatch_output(stdout: str) -> str:
    """Return the job id from ``sbatch --parsable`` output (``123`` or ``123;cluster``)."""
    match = _SBATCH_PARSABLE.search(stdout)
    if match is None:
        raise ValueError(
            "sbatch --parsable output did not match the pattern "
            f"{_SBATCH_PARSABLE.pattern!r} (a job id, optionally ';cluster'): {stdout!r}"
        )
    return match.group("job_id")


def slurm_time(h_rt: str) -> str:
    """The ``--time`` value for an ``h_rt`` of seconds or ``H:MM:SS``: ``[D-]H:MM:SS``.

    Slurm reads a plain number as minutes, so seconds are never passed as they are.
    Slurm keeps time limits in whole minutes and rounds a part minute up.
    """
    # Grid Engine's job files give the workers their h_rt with it: one reading of its times.
    seconds = parse_time(h_rt)
    if seconds is None:  # INFINITY, which the config's h_rt does not accept
        raise ValueError(f"h_rt {h_rt!r} sets no time limit")
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


# --- the workers' limits, from the job's requests -------------------------------------

#: The sbatch options the worker's limits come from, by their long names; short ones take
#: their value in the next word or glued on ("-t 10", "-t10").
SLURM_SHORT_OPTIONS = {"-t": "--time", "-c": "--cpus-per-task"}
SLURM_LONG_OPTIONS = ("--mem", "--mem-per-cpu", "--time", "--cpus-per-task")


def slurm_requests(options: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Yield (long name, value) of each of SLURM_LONG_OPTIONS in raw sbatch options."""
    for option in options:
        words = option.split()
        for i, word in enumerate(words):
            name, eq, value = word.partition("=")
            if name in SLURM_SHORT_OPTIONS or name in SLURM_LONG_OPTIONS:
                if not eq:  # "--mem 2G", "-t 10"
                    value = words[i + 1] if i + 1 < len(words) else ""
                yield SLURM_SHORT_OPTIONS.get(name, name), value
            elif word[:2] in SLURM_SHORT_OPTIONS:
                yield SLURM_SHORT_OPTIONS[word[:2]], word[2:]  # "-t10", "-c4"


def parse_slurm_memory(spec: str) -> int | None:
    """Return the bytes in a Slurm --mem value (2G, 500, 1536M); None for 0 (the whole node)."""
    match = re.match(r"^(\d+)([kKmMgGtT]?)$", spec.strip())
    if not match:
        raise ValueError(f"{spec!r} is not a Slurm memory size such as 2G or 500M")
    number, unit = int(match.group(1)), (match.group(2) or "M").upper()
    return number * MEMORY_UNITS[unit] or None  # Slurm's units are powers of 1024; MB alone


def parse_slurm_time(spec: str) -> int | None:
    """Return the seconds in a Slurm --time (30, 1:30, 1:00:00, 2-0, 2-12:00:00); None if none."""
    text = spec.strip()
    if text.upper() in ("INFINITE", "UNLIMITED"):
        return None
    match = re.match(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$", text)
    if not match:
        raise ValueError(f"{spec!r} is not a Slurm time such as 30, 1:00:00 or 2-12:00:00")
    days, first, second, third = match.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 3:  # hours:minutes:seconds
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    if len(parts) == 2:  # minutes:seconds
        return parts[0] * 60 + parts[1]
    return parts[0] * 60  # minutes


def parse_slurm_cpus(spec: str) -> int:
    """Return the number in a Slurm --cpus-per-task value (a whole number from 1)."""
    if not re.match(r"^[1-9]\d*$", spec.strip()):
        raise ValueError(f"{spec!r} is not a Slurm --cpus-per-task such as 4")
    return int(spec)


# --- squeue --------------------------------------------------------------------------

#: The squeue format sheepdog asks for: array job id, task index (or a pending range such as
#: ``3-20%2``), state, reason.
SQUEUE_FORMAT = "%F|%K|%T|%r"
_SQUEUE_LINE = re.compile(
    r"^(?P<job_id>\d+)\|(?P<task>[^|]*)\|(?P<state>[A-Z_]+)\|(?P<reason>.*)$"
)


@dataclass(frozen=True)
class SqueueRow:
    """One line of ``squeue --format='%F|%K|%T|%r'``: an array task or a range of them."""

    job_id: str
    task: str
    state: str
    reason: str
    line: str


def parse_squeue(text: str) -> list[SqueueRow]:
    """Parse squeue's lines in :data:`SQUEUE_FORMAT`; a line that does not match raises.

    sheepdog chose the format, so an odd line means the answer is not what it seems
    (an error message on stdout, a wrapper's banner): ValueError names the pattern and
    shows the line.
    """
    rows: list[SqueueRow] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _SQUEUE_LINE.match(line.strip())
        if match is None:
            raise ValueError(
                f"a squeue line did not match the pattern {_SQUEUE_LINE.pattern!r} "
                f"(format {SQUEUE_FORMAT!r}): {line!r}"
            )
        rows.append(SqueueRow(match["job_id"], match["task"], match["state"],
                              match["reason"].strip(), line.strip()))
    return rows


_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}
#: Held after the job failed (slurm.conf's SPECIAL_EXIT): like Grid Engine's Eqw, it waits
#: for someone to release it.
_ERROR = {"SPECIAL_EXIT"}
#: States after which an array task never runs again: it has left the queue.
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT",
})


def neutral_state(state: str) -> State:
    """Slurm's job states (``PENDING``, ``RUNNING``...) in neutral words.

    Suspended or stopped tasks (``SUSPENDED``, ``STOPPED``) and states this module does
    not know are ``UNKNOWN``: the job is still listed, so it is not gone.
    """
    if state in _QUEUED:
        return State.QUEUED
    if state in _RUNNING:
        return State.RUNNING
    if state in _ERROR:
        return State.ERROR
    if state in FINAL_STATES:
        return State.DONE
    return State.UNKNOWN


def job_statuses(rows: Sequence[SqueueRow]) -> dict[str, JobStatus]:
    """The jobs with an array task that has not ended, and their tasks' states."""
    jobs: dict[str, JobStatus] = {}
    for row in rows:
        state = neutral_state(row.state)
        if state is State.DONE:
            continue
        status = jobs.setdefault(row.job_id, JobStatus(row.job_id))
        status.states.add(state)
        status.native.add(row.state)
        status.lines.append(row.line)
    return jobs


#: PENDING reasons that no amount of waiting cures: the job asks for more than its partition
#: allows or offers, for something that does not exist, or waits on a job that failed.
#: Not among them: ``PartitionDown``/``PartitionInactive`` and ``ReqNodeNotAvail`` while it
#: is young, which maintenance (a reservation, drained nodes) causes and lifts again.
PERMANENT_REASONS = frozenset({
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "DependencyNeverSatisfied",
    "InvalidAccount",
    "InvalidQOS",
    "QOSJobLimit",
    "AccountNotAllowed",
    "QOSNotAllowed",
})
#: ``ReqNodeNotAvail`` (the nodes the job needs are down, drained or reserved) counts as
#: permanent once it has stood this long: a maintenance reservation usually ends sooner.
REQ_NODE_NOT_AVAIL_PATIENCE_S = 1800.0


def permanent_reason(reasons: Sequence[str], req_node_waited_s: float = 0.0) -> str | None:
    """The reason a pending job can never start, if Slurm's reasons say so.

    ``req_node_waited_s`` is how long the job has waited with ``ReqNodeNotAvail``.
    """
    cannot = []
    for reason in reasons:
        code = reason.split(",", 1)[0].strip()
        if code in PERMANENT_REASONS or (
            code == "ReqNodeNotAvail" and req_node_waited_s >= REQ_NODE_NOT_AVAIL_PATIENCE_S
        ):
            cannot.append(reason)
    if cannot and len(cannot) == len(reasons):
        return "; ".join(cannot[:3])
    return None


# --- scontrol show job / sacct -------------------------------------------------------

_KEY_VALUE = re.compile(r"(?:^|\s)(?P<key>[A-Za-z][\w:/]*)=(?P<value>\S*)")


@dataclass(frozen=True)
class JobRecord:
    """What Slurm keeps about one array task that ran (or tried to)."""

    job_id: str
    task_id: str
    state: str
    reason: str
    #: The script's exit status and the signal that ended it (``ExitCode=3:0``).
    exit_status: int | None
    signal: int | None
    host: str
    time_limit: str = ""


def _exit_code(text: str) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if match is None:
        return None, None
    return int(match[1]), int(match[2])


def parse_scontrol_jobs(text: str) -> list[JobRecord]:
    """Parse ``scontrol -o show job ID``: one array task per line of ``Key=Value`` fields.

    Raises ValueError naming the pattern when a non-empty line has no ``JobId=`` or
    ``JobState=``.
    """
    records: list[JobRecord] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = {m["key"]: m["value"] for m in _KEY_VALUE.finditer(line)}
        if "JobId" not in fields or "JobState" not in fields:
            raise ValueError(
                f"a 'scontrol -o show job' line has no JobId= or JobState= (fields matched by "
                f"{_KEY_VALUE.pattern!r}): {line[:500]!r}"
            )
        status, signal = _exit_code(fields.get("ExitCode", ""))
        host = fields.get("BatchHost") or fields.get("NodeList", "")
        records.append(JobRecord(
            job_id=fields.get("ArrayJobId") or fields["JobId"],
            task_id=fields.get("ArrayTaskId", ""),
            state=fields["JobState"],
            reason=fields.get("Reason", ""),
            exit_status=status, signal=signal,
            host="" if host in ("(null)", "None") else host,
            time_limit=fields.get("TimeLimit", ""),
        ))
    return records


#: ``sacct --noheader --parsable2 --allocations --format=`` these fields.
SACCT_FORMAT = "JobID,State,ExitCode,Reason,NodeList,Timelimit"
_SACCT_LINE = re.compile(
    r"^(?P<job_id>\d+)(?:_(?P<task>\d+|\[[^\]]*\]))?(?:\.\S+)?\|(?P<state>[A-Z_]+)"
    r"(?: by \d+)?\+?\|(?P<exit>[^|]*)\|(?P<reason>[^|]*)\|(?P<nodes>[^|]*)\|(?P<limit>[^|]*)$"
)


def parse_sacct(text: str) -> list[JobRecord]:
    """Parse ``sacct -n -P -X --format=`` :data:`SACCT_FORMAT`; an odd line raises ValueError."""
    records: list[JobRecord] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _SACCT_LINE.match(line.strip())
        if match is None:
            raise ValueError(
                f"a sacct line did not match the pattern {_SACCT_LINE.pattern!r} "
                f"(format {SACCT_FORMAT!r}): {line!r}"
            )
        status, signal = _exit_code(match["exit"])
        nodes = match["nodes"]
        records.append(JobRecord(
            job_id=match["job_id"], task_id=match["task"] or "", state=match["state"],
            reason=match["reason"], exit_status=status, signal=signal,
            host="" if nodes in ("None assigned", "(null)") else nodes,
            time_limit=match["limit"],
        ))
    return records


def describe_record(record: JobRecord) -> str | None:
    """Say in words why an array task ended badly, or None if it ended well (or has not)."""
    where = f" on {record.host}" if record.host else ""
    because = (
        f" ({record.reason})" if record.reason and record.reason not in ("None", "(null)")
        else ""
    )
    state = record.state
    if state == "TIMEOUT":
        limit = f" --time {record.time_limit}" if record.time_limit else ""
        return f"killed by Slurm for exceeding its run time limit ({state}{limit}){where}"
    if state == "OUT_OF_MEMORY":
        return ("killed by Slurm for exceeding its memory limit (--mem or --mem-per-cpu; "
                f"{state}){where}")
    if state == "NODE_FAIL":
        return f"Slurm lost its node{where} ({state}){because}"
    if state == "BOOT_FAIL":
        return f"its node{where} failed to boot ({state}){because}"
    if state == "PREEMPTED":
        return f"preempted by Slurm: a job of higher priority took its resources{where}"
    if state == "DEADLINE":
        return f"Slurm ended it at its deadline ({state}){where}"
    if state == "CANCELLED":
        return f"cancelled (scancel, or an administrator){where}{because}"
    if state == "FAILED" or (state == "COMPLETED" and record.exit_status):
        status = 128 + record.signal if record.signal else record.exit_status
        why = describe_exit(status, where, stub_exit_reasons())
        if why is None:
            return f"Slurm reports {state}{because}{where}"
        # NonZeroExitCode only repeats the status; another reason is Slurm's own word on it.
        said = record.reason not in ("", "None", "(null)", "NonZeroExitCode")
        return f"{why} (Slurm: {state}, {record.reason})" if said else why
    return None


# --- scontrol show config ------------------------------------------------------------

_CONFIG_LINE = re.compile(r"^(?P<key>[A-Za-z]\w*)\s*=\s*(?P<value>.*?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class SlurmConfig:
    """What sheepdog reads from ``scontrol show config``."""

    #: MaxArraySize: array indices run from 0 to this - 1.
    max_array_size: int
    #: Whether slurmdbd keeps accounting (``accounting_storage/slurmdbd``), so sacct answers.
    accounting: bool

    @property
    def array_limits(self) -> ArrayLimits:
        """Array tasks per job: indices start at 1 here, so MaxArraySize - 1 of them."""
        return ArrayLimits(max(1, self.max_array_size - 1), 0)


def parse_scontrol_config(text: str) -> SlurmConfig:
    """Read MaxArraySize and AccountingStorageType from ``scontrol show config``.

    Raises ValueError naming the pattern when MaxArraySize is missing or not a number.
    """
    found = {m["key"]: m["value"] for m in _CONFIG_LINE.finditer(text)}
    size = found.get("MaxArraySize", "")
    if not size.isdigit():
        raise ValueError(
            f"scontrol show config has no line matching {_CONFIG_LINE.pattern!r} with a "
            f"number for MaxArraySize: {text[:2000]!r}"
        )
    storage = found.get("AccountingStorageType", "")
    return SlurmConfig(int(size), storage.endswith("slurmdbd"))


# --- the scheduler -------------------------------------------------------------------

#: Long options sheepdog sets itself, and why a raw option must not set them too.
_RESERVED_LONG = {
    "--array": "the array range (and max_running's % throttle) is set by sheepdog from the "
               "number of tasks and workers",
    "--job-name": "sheepdog names each request's jobs, to find and cancel them by name",
    "--parsable": "sheepdog reads sbatch's answer in its --parsable form",
}
_RESERVED_SHORT = {"-a": "--array", "-J": "--job-name"}


class Slurm(Scheduler):
    """Slurm on a login node reached over SSH (a :class:`~sheepdog.remote.Remote`)."""

    name: ClassVar[str] = "slurm"
    label: ClassVar[str] = "Slurm"
    array_index_var: ClassVar[str] = "SLURM_ARRAY_TASK_ID"
    options_label: ClassVar[str] = "sbatch"
    #: Sourced before every command on the login node (see :data:`SLURM_ENV_PREAMBLE`).
    preamble: ClassVar[str] = SLURM_ENV_PREAMBLE

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._config: SlurmConfig | None = None
        #: When each pending job was first seen waiting with ReqNodeNotAvail.
        self._req_node_since: dict[str, float] = {}

    # --- the job file ------------------------------------------------------------

    @classmethod
    def directives(
        cls, shell: str, array_size: int, options: Sequence[str], *, max_running: int | None = None
    ) -> list[str]:
        """``#SBATCH --array=1-N[%max_running]`` and one ``#SBATCH`` line per raw option.

        The interpreter is the job file's ``#!`` line: Slurm runs the script with it.
        """
        return [
            f"#SBATCH --array={array_range(array_size, max_running)}",
            *(f"#SBATCH {opt}" for opt in options),
        ]

    @classmethod
    def resource_options(cls, config: Config) -> list[str]:
        """``--mem``, ``--time``, ``--partition`` and ``--cpus-per-task`` for the typed keys.

        ``max_running`` is the ``%`` of ``--array`` (:meth:`directives`);
        ``mem_resource`` and the ``pe`` name are Grid Engine's and mean nothing here.
        """
        opts: list[str] = []
        if config.mem_gb is not None:
            opts.append(f"--mem={format_gb(config.mem_gb)}")
        if config.h_rt is not None:
            opts.append(f"--time={slurm_time(config.h_rt)}")
        if config.queue is not None:
            opts.append(f"--partition={config.queue}")
        if config.pe is not None:
            opts.append(f"--cpus-per-task={config.pe[1]}")
        return opts

    @classmethod
    def memory_limit_bytes(cls, options: Sequence[str]) -> int | None:
        """The smallest ``--mem``, or ``--mem-per-cpu`` times ``--cpus-per-task``, in bytes.

        Slurm's default is one CPU per task; of several ``--cpus-per-task``, the smallest
        counts, as with ``--mem``. 0, all of the node's memory, is no limit.
        """
        requests = list(slurm_requests(options))
        cpus = min([parse_slurm_cpus(value) for name, value in requests
                    if name == "--cpus-per-task"] or [1])
        per = {"--mem": 1, "--mem-per-cpu": cpus}
        sizes = [(parse_slurm_memory(value), per[name]) for name, value in requests
                 if name in per]
        return min((size * times for size, times in sizes if size), default=None)

    @classmethod
    def run_limit_s(cls, options: Sequence[str]) -> int | None:
        """The smallest ``--time``/``-t`` in seconds (a bare number is minutes); None if none."""
        limits = [parse_slurm_time(value) for name, value in slurm_requests(options)
                  if name == "--time"]
        return min((n for n in limits if n is not None), default=None)

    @classmethod
    def reserved_option(cls, word: str) -> str | None:
        """Why sheepdog sets ``--array``/``-a``, ``--job-name``/``-J`` or ``--parsable``."""
        if word.startswith("--"):
            return _RESERVED_LONG.get(word.split("=", 1)[0])
        long = _RESERVED_SHORT.get(word[:2]) if word.startswith("-") else None
        return _RESERVED_LONG[long] if long else None

    @classmethod
    def check_raw_options(cls, config: Config) -> None:
        """Also refuse ``ge_opts``: they are Grid Engine's options, not sbatch's."""
        if config.ge_opts is not None:
            auto = config.scheduler == "auto"
            found = f" (found by scheduler='auto' on {config.host})" if auto else ""
            raise ConfigError(
                f"config key 'ge_opts': holds Grid Engine (qsub) options, but the scheduler is "
                f"Slurm{found}; put sbatch options in scheduler_opts instead",
                key="ge_opts",
            )
        super().check_raw_options(config)

    # --- jobs ----------------------------------------------------------------------

    def submit(
        self, job_path: str, *, name: str, array_size: int, workdir: str | None = None,
        split: bool = False, max_running: int | None = None, raw_options: Sequence[str] = (),
    ) -> str:
        """``sbatch --parsable`` the job file from its directory; return the Slurm job id."""
        directory = job_path.rsplit("/", 1)[0] or "/"
        args = ["--parsable", f"--job-name={name}"]
        if workdir is not None:
            # Grid Engine's names for the output files: <name>.o<job id>.<task>. A % in the
            # path would be one of sbatch's patterns; %% is a plain %.
            where = workdir.rstrip("/").replace("%", "%%") or "/"
            # sbatch's command line wins over #SBATCH lines: what the raw options set
            # is left out.
            given = option_words(raw_options)
            for option, given_as in (
                (f"--chdir={workdir}", ("--chdir", "-D")),
                (f"--output={where}/{name}.o%A.%a", ("--output", "-o")),
                (f"--error={where}/{name}.e%A.%a", ("--error", "-e")),
            ):
                if not given.intersection(given_as):
                    args.append(option)
        if split:
            # sbatch's own --array wins over the job file's: the last job may be smaller.
            args.append(f"--array={array_range(array_size, max_running)}")
        command = f"cd {shlex.quote(directory)} && sbatch {quote_all(args)} {shlex.quote(job_path)}"
        result = self.host.run(command, error=SubmitError)
        try:
            return parse_sbatch_output(result.stdout)
        except ValueError as exc:
            raise SubmitError(
                command, result.exit_status, result.stdout, f"{result.stderr}\n{exc}",
                host=self.host.host,
            ) from exc

    def _squeue(self, selection: str) -> tuple[list[SqueueRow] | None, str]:
        """Run squeue for ``selection``; (rows, "") or (None, why it did not answer)."""
        command = f"squeue --noheader --format={shlex.quote(SQUEUE_FORMAT)} {selection}"
        result = self.host.run(command, check=False, timeout_s=60)
        said = " ".join((result.stderr or result.stdout).split())[:300]
        if result.exit_status != 0:
            if INVALID_JOB_ID.match(result.stderr.strip()) and not result.stdout.strip():
                return [], ""  # the only job asked for has left the queue
            return None, (f"{command} exited with status {result.exit_status}: "
                          f"{said or 'no output'}")
        try:
            return parse_squeue(result.stdout), ""
        except ValueError as exc:
            return None, f"{command}: {exc}"

    def delete(self, targets: Sequence[str]) -> Deletion:
        """``scancel`` jobs by id, and by name (the login user's); say which were there.

        scancel is silent either way, so squeue says first which of the jobs had not
        ended: those are the ones reported deleted.
        """
        ids = [t for t in targets if re.fullmatch(r"\d+(?:_\d+)?", t)]
        names = [t for t in targets if t not in ids]
        selections = [f"--jobs={','.join(ids)}"] if ids else []
        if names:
            selections.append(f"--user={_ME} --name={shlex.quote(','.join(names))}")
        live: list[str] = []
        try:
            for selection in selections:
                rows, why = self._squeue(selection)
                if rows is None:
                    logger.warning("could not list the jobs before cancelling them: %s", why)
                    live = list(ids)
                    break
                live += [r.job_id for r in rows if r.job_id not in live]
            commands = [f"scancel {quote_all(ids)}"] if ids else []
            commands += [f"scancel --user={_ME} --name={shlex.quote(n)}" for n in names]
            if not commands:
                return Deletion([], None, self.label)
            command = " && ".join(commands)
            result = self.host.run(command, check=False, timeout_s=30)
        except SheepdogError as exc:
            logger.warning("scancel failed: %s", exc)
            return Deletion([], str(exc), self.label)
        if result.exit_status != 0:
            said = " ".join((result.stderr or result.stdout).split())[:300]
            return Deletion([], f"{command} exited with status {result.exit_status}: "
                            f"{said or 'no output'}", self.label)
        return Deletion(live, None, self.label)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus] | None:
        """``squeue`` for these jobs; None when it fails (the state is unknown).

        squeue lists only tasks that have not ended; a job with none left has left the
        queue. "Invalid job id specified" for a single job means the same.
        """
        if not job_ids:
            return {}
        rows, why = self._squeue(f"--jobs={','.join(job_ids)}")
        if rows is None:
            # Reading a failed squeue as "no jobs" would expire and resubmit running work.
            logger.warning(
                "the cluster did not answer (%s); nothing is expired or resubmitted until "
                "it answers", why,
            )
            return None
        listing = job_statuses(rows)
        return {job: listing[job] for job in job_ids if job in listing}

    def _records(self, job_id: str) -> list[JobRecord]:
        """The array tasks of a job that left the queue, as Slurm keeps them ([] if it cannot say).

        With slurmdbd, sacct knows every task (scontrol forgets each MinJobAge after it
        ended, the first to end first), but may not know yet that a task ended: it is asked
        again while it shows one unended and squeue no longer lists the job, for at most
        :data:`SACCT_SETTLE_S`.
        """
        if not self.slurm_config().accounting:
            return self._read_records(f"scontrol -o show job {shlex.quote(job_id)}",
                                      parse_scontrol_jobs)
        command = (f"sacct --noheader --parsable2 --allocations "
                   f"--format={SACCT_FORMAT} --jobs={shlex.quote(job_id)}")
        deadline = time.monotonic() + SACCT_SETTLE_S
        while True:
            records = self._read_records(command, parse_sacct)
            if all(r.state in FINAL_STATES for r in records) or time.monotonic() >= deadline:
                return records
            # A job squeue still lists (or cannot say about) is not ended: sacct is right.
            if self.status([job_id]) != {}:
                return records
            time.sleep(1.0)

    def _read_records(
        self, command: str, parse: Callable[[str], list[JobRecord]]
    ) -> list[JobRecord]:
        result = self.host.run(command, check=False, timeout_s=30)
        if result.exit_status != 0:
            return []
        try:
            return parse(result.stdout)
        except ValueError as exc:
            logger.warning("could not read why a job ended (%s): %s", command, exc)
            return []

    def accounting(self, job_id: str) -> str:
        """Why the job's array tasks ended badly, from sacct or scontrol ("" if it cannot say).

        Without slurmdbd, ``scontrol show job`` knows a job for MinJobAge after it ends.
        """
        reasons: list[str] = []
        for record in self._records(job_id):
            why = describe_record(record)
            if why and why not in reasons:
                reasons.append(why)
        return "; ".join(reasons[:3])

    def why_waiting(self, job_id: str) -> Waiting:
        """The pending tasks' reasons (squeue ``%r``), and the one that never clears, if any."""
        rows, why = self._squeue(f"--jobs={shlex.quote(job_id)} --states=PENDING")
        if rows is None:
            return Waiting([why])
        reasons: list[str] = []
        for row in rows:
            if row.reason and row.reason not in reasons and row.reason != "None":
                reasons.append(row.reason)
        now = time.monotonic()
        if any(r.startswith("ReqNodeNotAvail") for r in reasons):
            since = self._req_node_since.setdefault(job_id, now)
        else:
            since = self._req_node_since.pop(job_id, now)
        return Waiting(reasons, permanent_reason(reasons, now - since))

    def error_reasons(self, job_id: str) -> list[str]:
        """Why a task of the job is held in an error state (SPECIAL_EXIT), from scontrol."""
        result = self.host.run(f"scontrol -o show job {shlex.quote(job_id)}", check=False)
        seen: list[str] = []
        try:
            records = parse_scontrol_jobs(result.stdout)
        except ValueError as exc:
            return [str(exc)]
        for record in records:
            if neutral_state(record.state) is State.ERROR:
                why = f"{record.state} ({record.reason})" if record.reason else record.state
                if why not in seen:
                    seen.append(why)
        return seen

    def slurm_config(self) -> SlurmConfig:
        """MaxArraySize and whether slurmdbd runs, from ``scontrol show config``, read once.

        Where it fails or says something else, Slurm's default MaxArraySize and no
        accounting are assumed, with a warning that shows the command and its answer:
        sbatch itself refuses an array over the real limit.
        """
        if self._config is None:
            try:
                result = self.host.run("scontrol show config")
                self._config = parse_scontrol_config(result.stdout)
            except (RemoteCommandError, ValueError) as exc:
                logger.warning(
                    "could not read the Slurm configuration (%s); assuming Slurm's default "
                    "MaxArraySize %d and no slurmdbd", exc, DEFAULT_MAX_ARRAY_SIZE,
                )
                self._config = SlurmConfig(DEFAULT_MAX_ARRAY_SIZE, False)
        return self._config

    def array_limits(self) -> ArrayLimits:
        """At most MaxArraySize - 1 array tasks per job (indices from 1); no running cap."""
        return self.slurm_config().array_limits


def array_range(array_size: int, max_running: int | None) -> str:
    """The ``--array`` value: ``1-N``, with ``%M`` when at most M may run at once."""
    return f"1-{array_size}" + (f"%{max_running}" if max_running else "")
