"""Exceptions raised by sheepdog.

The hierarchy::

    SheepdogError
    ├── ConfigError                 a config key is unknown, missing or of the wrong type
    ├── SerialisationError          a function or value cannot be sent to the workers
    ├── StorageError                the SQLite database is unusable or a request is unknown
    │   ├── UnknownRequestError     no request with that id in this database
    │   └── UnknownTaskError        the request has no task with that index
    ├── ServerError                 the local HTTP server could not start or stopped
    ├── DeploymentError             talking to the head node failed
    │   ├── SSHError                the SSH connection could not be made
    │   │   └── HostKeyError        the head node's host key is unknown or has changed
    │   ├── RemoteCommandError      a command on the head node exited non-zero
    │   └── SubmitError             qsub/sbatch refused the job or its answer made no sense
    ├── JobError                    the scheduler reports a job in error, or it vanished
    ├── TaskFailedError             a task failed (``errors="raise"``); wraps the RemoteError
    ├── RemoteError                 a task raised on the worker; carries the remote traceback
    ├── TimeoutError                a wait exceeded its bound (also a builtin TimeoutError)
    └── PlatformError               this is not a Unix (Windows: use WSL2); an ImportError
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence

__all__ = [
    "ConfigError",
    "FileTooLargeError",
    "NotARegularFileError",
    "DeploymentError",
    "HostKeyError",
    "JobError",
    "PlatformError",
    "RemoteCommandError",
    "RemoteError",
    "SSHError",
    "SerialisationError",
    "ServerError",
    "SheepdogError",
    "StorageError",
    "SubmitError",
    "TaskFailedError",
    "TimeoutError",
    "UnknownRequestError",
    "UnknownTaskError",
]


class SheepdogError(Exception):
    """Base class of every error sheepdog raises."""


class PlatformError(SheepdogError, ImportError):
    """This Python lacks a Unix facility sheepdog needs (on Windows: run it in WSL2).

    Raised by ``import sheepdog``; ``missing`` names what is missing.
    """

    def __init__(self, message: str, *, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)


class ConfigError(SheepdogError, ValueError):
    """A config key is unknown, missing or of the wrong type or value."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class SerialisationError(SheepdogError):
    """A function, namespace or value cannot be sent to the workers."""


class StorageError(SheepdogError):
    """The SQLite database cannot be used as asked."""


class UnknownRequestError(StorageError, LookupError, ValueError):
    """No request with this id exists in the database.

    Also a ``ValueError``, which Sheepdog 0.2's ``Storage`` raised for an unknown request.
    """

    def __init__(self, request_id: int, dbfile: str | None = None) -> None:
        where = f" in {dbfile}" if dbfile else ""
        super().__init__(f"no request {request_id}{where}")
        self.request_id = request_id
        self.dbfile = dbfile


class UnknownTaskError(StorageError, LookupError, ValueError):
    """The request has no task with this index (also a ``ValueError``, as in Sheepdog 0.2)."""

    def __init__(self, request_id: int, task_index: int, n_tasks: int) -> None:
        super().__init__(f"request {request_id} has tasks 1..{n_tasks}, not {task_index}")
        self.request_id = request_id
        self.task_index = task_index
        self.n_tasks = n_tasks


class ServerError(SheepdogError):
    """The local HTTP server could not be started, or stopped unexpectedly."""


class DeploymentError(SheepdogError):
    """Talking to the Grid Engine head node failed."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class SSHError(DeploymentError):
    """The SSH connection to the head node could not be made or was lost."""


class HostKeyError(SSHError):
    """The head node's host key is not in known_hosts, or does not match it."""


class RemoteCommandError(DeploymentError):
    """A command run on the head node exited with a non-zero status."""

    def __init__(
        self,
        command: str,
        exit_status: int,
        stdout: str,
        stderr: str,
        *,
        host: str | None = None,
    ) -> None:
        self.command = command
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command on {host or 'the head node'} exited with status {exit_status}: "
            f"{command}\nstdout: {stdout.strip()}\nstderr: {stderr.strip()}",
            host=host,
        )


class SubmitError(RemoteCommandError):
    """qsub or sbatch refused the job, or its answer did not contain a job id."""


class JobError(SheepdogError):
    """Grid Engine reports a job in an error state, or the job vanished."""

    def __init__(
        self, message: str, *, request_id: int | None = None, job_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.job_id = job_id


class RemoteError(SheepdogError):
    """A task raised an exception on a worker; carries its remote traceback."""

    def __init__(
        self,
        type_name: str,
        message: str,
        traceback: str = "",
        *,
        host: str | None = None,
        python: str | None = None,
        kind: str = "exception",
        request_id: int | None = None,
        task_index: int | None = None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.host = host
        self.python = python
        self.kind = kind
        self.request_id = request_id
        self.task_index = task_index
        self.stdout = stdout
        self.stderr = stderr

    @property
    def summary(self) -> str:
        """One line: the exception type and the first line of its message."""
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"{self.type_name}: {first}" if first else self.type_name

    def __str__(self) -> str:
        where = []
        if self.request_id is not None:
            where.append(f"request {self.request_id}")
        if self.task_index is not None:
            where.append(f"task {self.task_index}")
        if self.host:
            where.append(f"on {self.host}")
        head = f"{self.type_name}: {self.message}"
        if where:
            head += f" ({', '.join(where)})"
        if self.traceback:
            return f"{head}\n\nRemote traceback:\n{self.traceback.rstrip()}"
        return head

    @classmethod
    def from_dict(
        cls,
        data: dict[str, object],
        *,
        request_id: int | None = None,
        task_index: int | None = None,
    ) -> RemoteError:
        """Rebuild an error from the JSON dict that the worker or server stored."""

        def text(key: str) -> str:
            value = data.get(key)
            return "" if value is None else str(value)

        return cls(
            text("type") or "Error",
            text("message"),
            text("traceback"),
            host=text("host") or None,
            python=text("python") or None,
            kind=text("kind") or "exception",
            request_id=request_id,
            task_index=task_index,
            stdout=text("stdout"),
            stderr=text("stderr"),
        )


class TaskFailedError(SheepdogError):
    """One or more tasks failed and the caller asked for errors to be raised."""

    def __init__(self, message: str, errors: Sequence[RemoteError]) -> None:
        super().__init__(message)
        self.errors = list(errors)


class TimeoutError(SheepdogError, builtins.TimeoutError):
    """A wait exceeded its bound."""


class NotARegularFileError(OSError):
    """A path that should be a regular file is a directory, a FIFO, a link or a device."""


class FileTooLargeError(OSError):
    """A file is larger than its reader allows."""
