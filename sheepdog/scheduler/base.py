"""What sheepdog needs from a batch scheduler: one small class per scheduler implements it.

A :class:`Scheduler` submits a job file as an array job and answers for the
jobs it made: their state in a neutral vocabulary (:class:`State`), why one
waits, why one failed, and deletes them. It also says how its job files are
written (the directive lines and the variable that holds the array index),
so one renderer (:func:`sheepdog.job_file.job_file`) writes them for all.
Where the scheduler runs, files are put and commands run by a :class:`Host`:
:class:`~sheepdog.remote.Remote` (SSH to a head node, with paramiko or, as
:class:`~sheepdog.openssh.OpenSSHRemote`, the system's ``ssh``) or this machine.

Every command string and parser of one scheduler lives in its own module
(:mod:`~sheepdog.scheduler.gridengine`, :mod:`~sheepdog.scheduler.slurm`,
:mod:`~sheepdog.scheduler.local`); :mod:`~sheepdog.scheduler.auto` asks the head node
which of the first two it runs.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from ..directives import check_raw_option
from ..errors import RemoteCommandError
from ..remote import CommandResult

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "option_words",
    "ArrayLimits",
    "CommandResult",
    "Deletion",
    "Host",
    "JobStatus",
    "Scheduler",
    "State",
    "Waiting",
    "describe_exit",
    "format_gb",
    "quote_all",
]


class State(str, enum.Enum):
    """Where an array task of a job is, in words every scheduler's states map to.

    A job the scheduler no longer lists has left the queue (``DONE``); a state
    the scheduler module does not know is ``UNKNOWN``, which is never read as
    gone: the job is still there.
    """

    QUEUED = "queued"
    RUNNING = "running"
    ERROR = "error"
    DONE = "done"
    UNKNOWN = "unknown"


@dataclass
class JobStatus:
    """What the scheduler says about one listed job: the states of its array tasks."""

    job_id: str
    #: Neutral states of the job's array tasks.
    states: set[State] = field(default_factory=set)
    #: The scheduler's own words for them (``qw``, ``Eqw``, ``r``...).
    native: set[str] = field(default_factory=set)
    #: The listing's lines for the job, for messages.
    lines: list[str] = field(default_factory=list)

    @property
    def in_error(self) -> bool:
        """True when a task of the job is in an error state (Grid Engine's ``Eqw``)."""
        return State.ERROR in self.states

    @property
    def queued(self) -> bool:
        """True when a task of the job waits in the queue."""
        return State.QUEUED in self.states

    @property
    def running(self) -> bool:
        """True when a task of the job runs."""
        return State.RUNNING in self.states


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


@dataclass(frozen=True)
class Deletion:
    """What deleting a request's jobs did."""

    #: The jobs the scheduler said it deleted (or will delete).
    job_ids: list[str]
    #: Why the jobs may still be there (the command failed or did not answer); None if it did.
    error: str | None
    #: What the scheduler's jobs are called in messages.
    label: str = "Grid Engine"

    def describe(self) -> str:
        """Say in words what was deleted, truthfully."""
        if self.error is not None:
            return f"could not delete its {self.label} jobs ({self.error})"
        if not self.job_ids:
            return "no job of it was left on the cluster"
        return f"deleted {self.label} job {', '.join(self.job_ids)}"


@dataclass(frozen=True)
class Waiting:
    """Why a queued job waits: the scheduler's reasons, and the one that never passes."""

    reasons: list[str]
    #: Set when the job can never start (an unknown resource, no queue that fits).
    permanent: str | None = None


class Host(Protocol):
    """Where a scheduler's commands run and its job files live: a head node, or this machine."""

    host: str

    def run(
        self,
        command: str,
        *,
        timeout_s: float = 120.0,
        check: bool = True,
        stdin: bytes | None = None,
        error: type[RemoteCommandError] = RemoteCommandError,
    ) -> CommandResult:
        """Run a shell command; raise ``error`` if it fails and ``check`` is set."""
        ...

    def absolute(self, directory: str) -> str:
        """Resolve a directory relative to the home directory."""
        ...

    def put(self, directory: str, files: Sequence[tuple[str, str, int]]) -> None:
        """Make ``directory`` (0700) and write ``(name, text, mode)`` files into it."""
        ...

    def list_dir(self, directory: str) -> list[str] | None:
        """The names in an absolute directory, or None if it does not exist."""
        ...

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of a file; with ``max_bytes``, of a regular file (not a link) of at
        most that many bytes, else FileTooLargeError or NotARegularFileError."""
        ...

    def remove(self, path: str) -> None:
        """Delete a file; one already gone is fine."""
        ...

    def rename(self, source: str, target: str) -> None:
        """Rename a file."""
        ...

    def close(self) -> None:
        """Let go of the connection; safe to call twice."""
        ...


class Scheduler:
    """A batch scheduler: submit array jobs, ask what became of them, delete them.

    Subclasses set the class attributes and implement the methods that raise
    NotImplementedError. Every command a subclass runs goes through
    :attr:`host`; a failed command raises
    :class:`~sheepdog.errors.RemoteCommandError` with the command, its exit
    status, stdout and stderr, and a parser says what did not match.
    """

    #: The ``scheduler`` config value that chooses this class.
    name: ClassVar[str]
    #: What the scheduler is called in messages ("Grid Engine job 42").
    label: ClassVar[str]
    #: The environment variable that holds an array task's index (from 1).
    array_index_var: ClassVar[str]
    #: At most this many array tasks when the config does not say (``workers``): on a
    #: cluster, beyond this, extra array tasks mostly wait in the queue.
    default_max_workers: ClassVar[int] = 100
    #: What the raw options of the config (``scheduler_opts``) are called in messages.
    options_label: ClassVar[str] = "scheduler"

    def __init__(self, host: Host) -> None:
        self.host = host

    @property
    def kind(self) -> type[Scheduler]:
        """The class that writes this scheduler's job files (``auto``: the one it found)."""
        return type(self)

    # --- the job file ---------------------------------------------------------------

    @classmethod
    def directives(
        cls, shell: str, array_size: int, options: Sequence[str], *, max_running: int | None = None
    ) -> list[str]:
        """The job file's directive lines: the interpreter, the array of tasks, raw options.

        ``max_running`` is the throttle for a scheduler that writes it into the array range
        (Slurm's ``%``); the others map it in :meth:`resource_options`.
        """
        raise NotImplementedError

    @classmethod
    def resource_options(cls, config: Config) -> list[str]:
        """The raw options that the config's typed resources (``mem_gb``, ``h_rt``...) stand for."""
        return []

    @classmethod
    def memory_limit_bytes(cls, options: Sequence[str]) -> int | None:
        """The memory that the options (the job file's directive lines) ask for, in bytes.

        The worker limits its address space to it, so that a task gets a MemoryError
        before the scheduler kills the job. ``options`` are the raw options and what the
        typed resources stand for (:meth:`Config.job_options
        <sheepdog.config.Config.job_options>`). None when they set no limit; ValueError
        names a value this scheduler would not read.
        """
        return None

    @classmethod
    def run_limit_s(cls, options: Sequence[str]) -> int | None:
        """The run time that the options (the job file's directive lines) allow, in seconds.

        The worker stops leasing tasks before it runs out. None when they set no limit;
        ValueError names a value this scheduler would not read.
        """
        return None

    @classmethod
    def reserved_option(cls, word: str) -> str | None:
        """Why sheepdog sets the option ``word`` (of a raw option) itself; None if it may be set."""
        return None

    @classmethod
    def check_raw_options(cls, config: Config) -> None:
        """Raise ConfigError if the config's raw options are not this scheduler's to take.

        Config checks what every scheduler needs (one line, a leading ``-``); this
        refuses the options that sheepdog sets for this scheduler's jobs itself.
        """
        for i, opt in enumerate(config.raw_options or ()):
            check_raw_option(config.raw_options_key, i, opt, cls)

    # --- jobs -------------------------------------------------------------------------

    def submit(
        self, job_path: str, *, name: str, array_size: int, workdir: str | None = None,
        split: bool = False, max_running: int | None = None, raw_options: Sequence[str] = (),
    ) -> str:
        """Submit the job file at ``job_path`` (on the host) as an array job; return its id.

        ``name`` names the job (unique per request, so it can be deleted by name when its
        id never arrived); ``array_size`` is the number of array tasks, which the job file
        already says unless ``split`` (one of several jobs of one request; ``max_running``
        is then the throttle written with the array range, as in :meth:`directives`). With
        ``workdir`` the job runs there and writes its output files there, named
        ``<name>.o<job id>.<task>`` and ``<name>.e<job id>.<task>``, except where the
        config's ``raw_options`` (its ``#$``/``#SBATCH`` lines) set the working
        directory or an output file themselves.
        """
        raise NotImplementedError

    def delete(self, targets: Sequence[str]) -> Deletion:
        """Delete jobs by id or name; jobs already gone are fine. Never raises."""
        raise NotImplementedError


    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus] | None:
        """The listed ones among ``job_ids``; None if the scheduler did not answer (unknown).

        A job not in the answer has left the queue.
        """
        raise NotImplementedError

    def accounting(self, job_id: str) -> str:
        """Why a job that left the queue ended badly, in words ("" if unknown or fine)."""
        raise NotImplementedError

    def why_waiting(self, job_id: str) -> Waiting:
        """Why a queued job waits, and whether it can ever start."""
        raise NotImplementedError

    def error_reasons(self, job_id: str) -> list[str]:
        """Why a job is in an error state (the scheduler's own words), deduplicated."""
        raise NotImplementedError

    def array_limits(self) -> ArrayLimits:
        """The cluster's limits on one array job (0: none)."""
        return ArrayLimits(0, 0)

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the host's connection; safe to call twice."""
        self.host.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quote_all(words: Sequence[str]) -> str:
    """The words quoted for a shell and joined by spaces."""
    return " ".join(shlex.quote(w) for w in words)


def format_gb(mem_gb: float) -> str:
    """A memory size for a scheduler option: ``2G``, or whole megabytes (``1536M``)."""
    if float(mem_gb).is_integer():
        return f"{int(mem_gb)}G"
    return f"{max(1, round(mem_gb * 1024))}M"


_SIGNALS = {9: "SIGKILL", 15: "SIGTERM", 6: "SIGABRT", 11: "SIGSEGV"}


def describe_exit(status: int | None, where: str, stub_reasons: dict[int, str]) -> str | None:
    """Say in words why an array task that exited with ``status`` ended badly (None: it did not).

    ``where`` is `` on <host>`` or empty; ``stub_reasons`` what the worker stub's exit
    statuses mean.
    """
    if status in (None, 0):
        return None
    assert status is not None
    if status > 128:
        signal = status - 128
        hint = ""
        if signal == 9:
            hint = " (killed: often an exceeded memory or time limit, or the job was deleted)"
        return f"the array task died with signal {_SIGNALS.get(signal, signal)}{hint}{where}"
    why = stub_reasons.get(status)
    if why:
        return f"the worker exited with status {status}{where}: {why}"
    return f"the array task exited with status {status}{where}"


def option_words(raw_options: Sequence[str]) -> set[str]:
    """The options that raw option lines set: ``"-o x"`` and ``"--output=x"`` give -o, --output."""
    words = set()
    for line in raw_options:
        for word in line.split():
            if word.startswith("-"):
                words.add(word.split("=", 1)[0])
    return words
