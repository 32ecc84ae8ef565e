"""Storing a request and submitting its job: the serialised function, the cache, the job.

Part of :class:`~sheepdog.session.Session`. A submission that fails fails the
request's open tasks with the reason, after deleting any job it made.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

from . import serialisation, submit_jobs
from .config import Config
from .scheduler import Deletion, Scheduler
from .session_resources import Resources
from .sizing import array_size, request_settings
from .store import content_digest
from .stored_request import RequestJobs

__all__ = ["CACHE_CHOICES", "Submitting", "check_cache", "function_name"]

# The name it had before Session was split: a user's logging configuration may name it.
logger = logging.getLogger("sheepdog.session")

#: What ``cache=`` may be: off, on, or recompute (and store for later).
CACHE_CHOICES = (False, True, "refresh")


def check_cache(cache: object) -> None:
    """Refuse a ``cache=`` value that is not one of :data:`CACHE_CHOICES`."""
    if not (cache is True or cache is False or cache == "refresh"):
        raise ValueError(f"cache must be False, True or 'refresh', got {cache!r}")


def _quiet(message: str) -> None:
    logger.info("%s", message)



def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def function_name(f: Callable[..., Any]) -> str:
    """``module.qualname`` of a callable, as displays name a request's function.

    A script's own functions (module ``__main__``) go by their name alone.
    """
    name = getattr(f, "__qualname__", None) or type(f).__name__
    module = getattr(f, "__module__", None)
    return f"{module}.{name}" if module not in (None, "builtins", "__main__") else str(name)



class Submitting(Resources):
    """Store requests (from the cache where it can) and submit their jobs."""

    #: Why getting ready to submit failed (see ``_getting_ready``), for launch to raise.
    _ready_error: BaseException | None = None

    def submit(
        self,
        f: Callable[..., Any],
        args: Iterable[Any],
        ns: Mapping[str, Any] | None = None,
        *,
        cache: bool | str = False,
        say: Callable[[str], None] = _quiet,
    ) -> int:
        """Serialise ``f`` and each of ``args``, store them and submit the job; return the id."""
        cfg = self.config
        check_cache(cache)
        if not callable(f):
            raise TypeError(f"sheepdog.map needs a callable, got {type(f).__name__}")
        arg_list = list(args)
        payload = serialisation.serialise_function(f, dict(ns) if ns is not None else None,
                                                   mode=cfg.mode)
        blobs = serialisation.serialise_args(arg_list)
        with self._getting_ready(enabled=cache is not True):
            request_id, cached = self.store(payload, blobs, cache=cache,
                                            function=function_name(f))
        if cached:
            say(f"request {request_id}: {cached} of {len(blobs)} tasks from the cache")
        if len(blobs) > cached:
            self.launch(request_id, len(blobs) - cached, say=say)
        return request_id

    def store(
        self, payload: bytes, blobs: list[bytes], *, cache: bool | str = False,
        label: str | None = None, function: str | None = None,
    ) -> tuple[int, int]:
        """Store a serialised request; return its id and how many tasks the cache filled.

        With ``cache=True`` the tasks whose function and argument have a result
        take it at once. ``function`` names the function for displays (the
        dashboard), which cannot unpickle its payload to find out.
        """
        storage = self.storage
        options: dict[str, Any] = {} if label is None else {"label": label}
        settings = request_settings(self.config, len(blobs))
        if function is not None:
            settings["function"] = function
        request_id = storage.new_request(
            payload, b"", blobs, func_digest=content_digest(payload), digest_args=True,
            settings=settings, **options,
        )
        cached = storage.fill_from_cache(request_id) if cache is True else 0
        return request_id, cached

    @contextmanager
    def _getting_ready(self, *, enabled: bool = True) -> Iterator[None]:
        """Start the server and reach the head node on a thread while the block runs.

        Storing large arguments (hashing, writing, syncing) takes a second or more; the
        SSH login, the job directory, the cluster's limits and the server's start, which
        the submission needs first, then cost no time of their own. A failure there is
        raised by :meth:`launch`, as if it had come there; it is not tried twice (a login
        may ask for a one-time code). Not with ``cache=True``: if every task comes from
        the cache, nothing is submitted and nothing need be reached.
        """
        if not enabled:
            yield
            return
        self._ready_error = None
        thread = threading.Thread(target=self._get_ready, name="sheepdog-ready", daemon=True)
        thread.start()
        try:
            yield
        finally:
            # Bounded: every step has its own timeout (the SSH connection's, the server's start).
            thread.join()

    def _get_ready(self) -> None:
        try:
            server, scheduler, _jobdir = self.server, self.scheduler, self.jobdir
            scheduler.array_limits()  # read once per connection
            logger.debug("ready to submit to %s, served by %r", scheduler.label, server)
        except BaseException as exc:  # noqa: BLE001 - raised again by launch
            self._ready_error = exc

    def launch(
        self, request_id: int, n_tasks: int, *, say: Callable[[str], None] = _quiet
    ) -> str:
        """Submit the job for ``n_tasks`` open tasks of a stored request; return the job ids.

        If the submission fails, the request's open tasks fail with the reason, a
        job it made before failing is deleted, and the error is raised again.
        """
        scheduler = self.scheduler
        try:
            if self.config.scheduler != "local":
                cfg = self.config
                say(f"connecting to {cfg.ssh_user}@{cfg.host}:{cfg.ssh_port}")
            error, self._ready_error = self._ready_error, None
            if error is not None:
                raise error
            job_id = self._submit_stored(request_id, array_size(self.config, n_tasks))
        except BaseException as exc:  # noqa: BLE001 - recorded, then raised again
            self._submission_failed(scheduler, request_id, exc)
        jobs = "jobs" if "," in job_id else "job"
        say(f"submitted {jobs} {job_id} for request {request_id} ({n_tasks} "
            "tasks); waiting for workers")
        return job_id

    def resubmit(self, request_id: int, which: Iterable[str]) -> list[int]:
        """Run a request's chosen unfinished tasks again as a new job; return their indices.

        The request runs with the config stored with it (this session's config is
        for a request stored without one).
        """
        storage = self.storage
        self.use_stored_config(request_id)
        indices = storage.rerun_tasks(request_id, which)
        if not indices:
            return []
        self.launch(request_id, len(indices))
        return indices

    def use_stored_config(self, request_id: int) -> Config:
        """Work with the config stored with the request from now on, if it has one.

        Its scheduler, server and job directory follow; the config is returned.
        """
        stored = self.request(request_id).stored_config()
        if stored is not None and stored != self._config:
            self._adopt(stored)
        return self.config

    def _submit_stored(self, request_id: int, n_workers: int, **options: Any) -> str:
        scheduler, jobdir = self.scheduler, self.jobdir  # the head node first, then the server
        jobs = RequestJobs(self.request(request_id), self.config, scheduler, self.server)
        # Looked up on the module at each call: a test may stand in for it.
        return submit_jobs.submit_request(jobs, n_workers=n_workers, jobdir=jobdir, **options)

    def _submission_failed(
        self, scheduler: Scheduler, request_id: int, exc: BaseException
    ) -> NoReturn:
        """Fail the tasks of a request whose submission failed, after deleting any job it made.

        An interruption (Ctrl-C) or a dropped connection can come after the submission
        went through but before its answer arrived: the job is then found by its unique
        name and deleted, since nothing would ever serve it. Re-raises ``exc`` (a
        KeyboardInterrupt with one line saying what was done).
        """
        storage = self.storage
        label = scheduler.label
        interrupted = isinstance(exc, KeyboardInterrupt)
        recorded = storage.get_jobs(request_id)
        deleted = (
            Deletion([], None) if recorded and not interrupted
            else self._delete(scheduler, request_id)
        )
        if deleted.job_ids:
            message = (
                f"the submission was interrupted ({_why(exc)}) after it had created "
                f"{label} job {', '.join(deleted.job_ids)}, which was deleted"
            )
        elif interrupted:
            message = "the job was never submitted: the submission was interrupted (Ctrl-C)"
            if deleted.error:
                message += f"; whether {label} had made a job of it is unknown ({deleted.error})"
        else:
            message = f"the job was never submitted: {_why(exc)}"
        storage.fail_tasks(request_id, storage.open_task_indices(request_id), "submit", message)
        line = f"request {request_id}: {message}"
        if interrupted:
            print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(line) from None
        raise exc
