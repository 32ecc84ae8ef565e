"""``scheduler="local"``: a request's array tasks run as processes on this machine.

The same job file, worker stub and server as on a cluster: each array task
runs the job file with ``SGE_TASK_ID`` set, as Grid Engine would, from the job
file's directory. Try a map on a laptop before sending it to the cluster, and
test without one. The job files and their key files go into ``ssh_dir`` under
your home directory here; each task's output goes beside them, named as Grid
Engine names it (``<job name>.o<job id>.<task>``).

Each job's processes are recorded in a small state file in that directory, so
another process (``sheepdog status --wait``, a passive watcher) can tell
whether they still run, and ``sheepdog cancel`` can stop them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..errors import (
    FileTooLargeError,
    NotARegularFileError,
    RemoteCommandError,
    SheepdogError,
    SSHError,
)
from ..files import write_whole
from ..poll import poll_until
from ..remote import CommandResult, under_home
from .base import Deletion, JobStatus, Scheduler, State, Waiting, describe_exit
from .gridengine import GridEngine
from .stubexits import stub_exit_reasons

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["LocalHost", "LocalScheduler"]

logger = logging.getLogger(__name__)

#: Variables that would let a local task import what a cluster's task could not.
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
#: A deleted task gets SIGTERM, then SIGKILL after this long.
KILL_GRACE_S = 5.0


class LocalHost:
    """This machine as a scheduler's host: commands run in a local bash, files are written here."""

    host = "localhost"

    def run(
        self,
        command: str,
        *,
        timeout_s: float = 120.0,
        check: bool = True,
        stdin: bytes | None = None,
        error: type[RemoteCommandError] = RemoteCommandError,
    ) -> CommandResult:
        """Run ``command`` in bash from the home directory; raise ``error`` if it fails."""
        try:
            proc = subprocess.run(
                ["bash", "-c", command], input=stdin, capture_output=True, timeout=timeout_s,  # noqa: S607 - found on PATH, as a job file's shell is
                cwd=Path.home(), check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SSHError(
                f"command on localhost did not finish within {timeout_s:g} s: {command}",
                host=self.host,
            ) from exc
        result = CommandResult(command, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                               proc.stderr.decode("utf-8", "replace"))
        if check and proc.returncode != 0:
            raise error(command, proc.returncode, result.stdout, result.stderr, host=self.host)
        return result

    def absolute(self, directory: str) -> str:
        """Resolve a directory relative to the home directory, as on a head node."""
        return under_home(directory, str(Path.home()))

    def put(self, directory: str, files: Sequence[tuple[str, str, int]]) -> None:
        """Make ``directory`` (0700) and write each ``(name, text, mode)`` file, whole, into it."""
        folder = Path(self.absolute(directory))
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # an existing directory may have been group-readable
        for name, text, mode in files:
            write_whole(folder / name, text, mode)

    def list_dir(self, directory: str) -> list[str] | None:
        """The names in an absolute ``directory``, or None if it does not exist."""
        try:
            return os.listdir(directory)
        except FileNotFoundError:
            return None

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of the file at ``path`` (see :meth:`Host.read_bytes`)."""
        if max_bytes is None:
            return Path(path).read_bytes()
        # O_NONBLOCK: a FIFO opens without a writer; O_NOFOLLOW: a link is not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFileError(f"{path} is not a regular file")
            if info.st_size > max_bytes:
                raise FileTooLargeError(f"{path} holds {info.st_size} bytes, more than "
                                        f"{max_bytes}")
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FileTooLargeError(f"{path} holds more than {max_bytes} bytes")
        return data

    def remove(self, path: str) -> None:
        """Delete the file at ``path``; one already gone is fine."""
        Path(path).unlink(missing_ok=True)

    def rename(self, source: str, target: str) -> None:
        """Rename a file."""
        os.replace(source, target)

    def close(self) -> None:
        """Nothing to close."""



@dataclass
class _Job:
    """One local array job: its tasks' processes (started by this process) or their pids."""

    job_id: str
    name: str
    #: ``(pid, start time)`` of each task; the start time tells a reused pid apart.
    tasks: list[tuple[int, str]]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


#: Jobs started by this process: their Popen objects reap the tasks and hold exit statuses.
_STARTED: dict[str, _Job] = {}
_lock = threading.Lock()
_last_id = 0


def _new_job_id() -> str:
    """A numeric job id, increasing within a process, unlikely to repeat across processes."""
    global _last_id
    with _lock:
        _last_id = max(_last_id + 1, int(time.time() * 1000) % 10**12)
        return str(_last_id)


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux ``/proc``), "" where there is no /proc; None if dead."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # someone else's process: alive, if perhaps not ours
        return ""
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None  # exited, not yet reaped
    return fields[19]


def _alive(task: tuple[int, str]) -> bool:
    started = _start_time(task[0])
    return started is not None and (started == task[1] or "" in (started, task[1]))


def _none_alive(tasks: list[tuple[int, str]]) -> bool:
    return not any(_alive(task) for task in tasks)


class LocalScheduler(Scheduler):
    """Runs each array task as a local process: the same job file as on Grid Engine."""

    name: ClassVar[str] = "local"
    label: ClassVar[str] = "local"
    #: The job file is Grid Engine's, so a task's index is where Grid Engine puts it.
    array_index_var: ClassVar[str] = GridEngine.array_index_var
    #: One array task per core.
    default_max_workers: ClassVar[int] = max(1, os.cpu_count() or 1)

    def __init__(self, host: LocalHost, jobdir: str) -> None:
        super().__init__(host)
        #: Where the job files, the task output and the jobs' state files are.
        self.jobdir = jobdir

    options_label: ClassVar[str] = GridEngine.options_label

    @classmethod
    def directives(
        cls, shell: str, array_size: int, options: Sequence[str], *, max_running: int | None = None
    ) -> list[str]:
        """Grid Engine's directive lines: to a local run they are comments."""
        return GridEngine.directives(shell, array_size, options, max_running=max_running)

    @classmethod
    def resource_options(cls, config: Config) -> list[str]:
        """Grid Engine's: the worker's memory and run-time limits are read from them."""
        return GridEngine.resource_options(config)

    @classmethod
    def memory_limit_bytes(cls, options: Sequence[str]) -> int | None:
        """Grid Engine's: the job file's directives are Grid Engine's."""
        return GridEngine.memory_limit_bytes(options)

    @classmethod
    def run_limit_s(cls, options: Sequence[str]) -> int | None:
        """Grid Engine's: the job file's directives are Grid Engine's."""
        return GridEngine.run_limit_s(options)

    @classmethod
    def reserved_option(cls, word: str) -> str | None:
        """Grid Engine's: the job file is Grid Engine's."""
        return GridEngine.reserved_option(word)

    def _state_file(self, job_id: str) -> Path:
        return Path(self.jobdir) / f".local-job-{job_id}.json"

    def submit(
        self, job_path: str, *, name: str, array_size: int, workdir: str | None = None,
        split: bool = False, max_running: int | None = None, raw_options: Sequence[str] = (),
    ) -> str:
        """Start ``array_size`` processes running the job file; return the job's id."""
        job_id = _new_job_id()
        cwd = workdir or os.path.dirname(job_path)
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env.update(JOB_ID=job_id, JOB_NAME=name, PYTHONNOUSERSITE="1")
        job = _Job(job_id, name, [])
        try:
            for task in range(1, array_size + 1):
                out = Path(cwd) / f"{name}.o{job_id}.{task}"
                err = Path(cwd) / f"{name}.e{job_id}.{task}"
                with open(out, "wb") as stdout, open(err, "wb") as stderr:
                    proc = subprocess.Popen(
                        [job_path], cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                        stderr=stderr, start_new_session=True,
                        env={**env, self.array_index_var: str(task)},
                    )
                job.procs.append(proc)
                job.tasks.append((proc.pid, _start_time(proc.pid) or ""))
        except OSError as exc:
            _kill(job.tasks, job.procs)
            missing = missing_interpreter(job_path)
            if missing:  # the OSError would blame the job file, which is there
                raise SheepdogError(missing) from None
            raise SheepdogError(f"could not start local job {job_path}: {exc}") from exc
        with _lock:
            _STARTED[job_id] = job
        write_whole(self._state_file(job_id),
                     json.dumps({"name": name, "tasks": job.tasks}), 0o600)
        logger.info("started local job %s: %d processes running %s", job_id, array_size,
                    job_path)
        return job_id

    def _job(self, job_id: str) -> _Job | None:
        with _lock:
            job = _STARTED.get(job_id)
        if job is not None:
            return job
        try:
            record = json.loads(self._state_file(job_id).read_text())
        except (OSError, ValueError):
            return None
        return _Job(job_id, str(record["name"]), [(int(p), str(s)) for p, s in record["tasks"]])

    def _running(self, job: _Job) -> bool:
        if job.procs:
            return any(proc.poll() is None for proc in job.procs)
        return any(_alive(task) for task in job.tasks)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The jobs with a task still running; a job without a record here has none."""
        listed: dict[str, JobStatus] = {}
        for job_id in job_ids:
            job = self._job(job_id)
            if job is not None and self._running(job):
                listed[job_id] = JobStatus(job_id, {State.RUNNING}, {"r"})
        return listed

    def accounting(self, job_id: str) -> str:
        """Why the job's tasks ended badly, from their exit statuses (if this process ran them)."""
        job = self._job(job_id)
        reasons: list[str] = []
        for proc in job.procs if job is not None else []:
            code = proc.poll()
            status = 128 - code if code is not None and code < 0 else code
            why = describe_exit(status, " on localhost", stub_exit_reasons())
            if why and why not in reasons:
                reasons.append(why)
        return "; ".join(reasons[:3])

    def why_waiting(self, job_id: str) -> Waiting:
        """Local jobs never wait in a queue."""
        return Waiting([])

    def error_reasons(self, job_id: str) -> list[str]:
        """Local jobs have no error state."""
        return []

    def delete(self, targets: Sequence[str]) -> Deletion:
        """Stop the tasks of the jobs named by id or name (SIGTERM, then SIGKILL)."""
        wanted = set(targets)
        jobs: dict[str, _Job] = {}
        for job_id in targets:
            job = self._job(job_id)
            if job is not None:
                jobs[job_id] = job
        with _lock:
            started = list(_STARTED.values())
        for job in started:
            if job.name in wanted:
                jobs.setdefault(job.job_id, job)
        deleted = []
        for job_id, job in jobs.items():
            if self._running(job):
                _kill(job.tasks, job.procs)
                deleted.append(job_id)
        return Deletion(deleted, None, self.label)

    def close(self) -> None:
        """Reap the tasks that have ended; running ones go on, as a cluster's jobs would."""
        with _lock:
            started = list(_STARTED.values())
        for job in started:
            for proc in job.procs:
                proc.poll()


def missing_interpreter(job_path: str) -> str:
    """Why the job file's ``#!`` interpreter (the config's ``shell``) cannot run; "" if it can.

    The operating system blames the job file for a missing interpreter (ENOENT names
    the file it was asked to run), so this names the one that is really missing.
    """
    try:
        with open(job_path, "rb") as fh:
            first = fh.readline(4096).decode("utf-8", "replace")
    except OSError:
        return ""
    interpreter = first[2:].split()[0] if first.startswith("#!") and first[2:].split() else ""
    if not interpreter or os.access(interpreter, os.X_OK) and os.path.isfile(interpreter):
        return ""
    why = "does not exist" if not os.path.exists(interpreter) else "is not an executable file"
    return (f"the config's shell, {interpreter}, {why} on this machine: set shell to the "
            "path of a Python here (`command -v python3` prints one)")


def _kill(tasks: list[tuple[int, str]], procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each live task's process group, SIGKILL what is left after the grace time."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [t for t in tasks if _alive(t)]
        for pid, _ in live:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + KILL_GRACE_S
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if not procs:  # another process's tasks: no wait() to block on
            poll_until(functools.partial(_none_alive, live),
                       timeout_s=max(0.0, deadline - time.monotonic()), interval_s=0.05)
        if not any(_alive(t) for t in tasks):
            return
