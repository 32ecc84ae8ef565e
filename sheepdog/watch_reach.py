"""Keep the workers' way back to the server while their array tasks run.

A tunnel whose SSH connection dropped is started again; array tasks that run with
none calling in are never a silent 0 %: the watcher says so with the fix and the
tail of a worker's .e file, or, with ``connect="auto"`` started direct, moves the
request to the tunnel. Part of :class:`~sheepdog.watch.Watcher`.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import tunnel, worker_address
from .connect import ConnectMode
from .errors import SheepdogError
from .progress import finished_by_workers
from .store import JobRecord, Storage, TaskState
from .stored_request import RequestJobs, StoredRequest

if TYPE_CHECKING:
    from .config import Config
    from .scheduler import Scheduler
    from .server import Server

__all__ = ["ERR_TAIL_LINES", "WorkerReach"]

# The name it had before Watcher was split: a user's logging configuration may name it.
logger = logging.getLogger("sheepdog.watch")

#: Lines of a worker's stderr (.e) file shown when no worker calls in.
ERR_TAIL_LINES = 6


class WorkerReach:
    """Keep a request's workers able to call in, and say why when none does."""

    # Set by the Watcher.
    config: Config
    request_id: int
    scheduler: Scheduler
    server: Server | None
    passive: bool
    clock: Callable[[], float]
    notify: Callable[[str], None] | None
    silent_s: float

    #: Since when array tasks have run with none calling in (None: one has, or none runs).
    _silent_since: float | None = None
    _silence_told = False  # whether that silence was said
    _tail_told = False  # whether a worker's stderr was shown with it
    #: The mode its workers were moved to (connect="auto" moves them to the tunnel).
    _mode: ConnectMode | None = None
    #: The latest job id when a worker of it was seen to call in (a lease or a result).
    _heard_from: str | None = None
    _tunnel_down_told = False  # whether the tunnel's failure to start was said

    def _check_called_in(
        self, storage: Storage, records: list[JobRecord], live: list[Any],
        counts: dict[str, int],
    ) -> None:
        """Keep a tunnel up; when array tasks run but none calls in, say so, or move to it.

        Never a silent 0 %: a worker that cannot reach the server says why in its .e
        file, and that is shown here with the fix. With ``connect="auto"`` started
        direct, the request moves to the tunnel first (the workers find it in the
        address file at their next retry).
        """
        if self.server is None or self.passive or self.server.port is None:
            return
        last = records[-1]
        mode = self._mode or last.connect
        if mode is None:
            return  # submitted by a sheepdog without the connect key
        if mode is ConnectMode.TUNNEL:
            self._keep_tunnel(storage)
        before = last.finished_before or 0
        finished = finished_by_workers(counts)
        latest = last.job_id
        if counts.get(TaskState.LEASED, 0) or finished > before:
            self._heard_from = latest
        # Workers that called in and then went quiet (a frozen node, leases expired) reached
        # the server: a stall (stall_s) is theirs to explain, not the way back to us.
        if self._heard_from == latest or not any(j.running for j in live):
            self._silent_since = None
            return
        now = self.clock()
        if self._silent_since is None:
            self._silent_since = now
            return
        silent_s = now - self._silent_since
        if silent_s < self.silent_s:
            return
        where = last.url or ""
        if self.config.connect == ConnectMode.AUTO and mode is ConnectMode.DIRECT:
            tunnel.switch_to_tunnel(self.scheduler.host, self.server.port)
            host, port = worker_address.publish_address(self._jobs(storage, self.server),
                                                        ConnectMode.TUNNEL)
            self._mode, self._silent_since = ConnectMode.TUNNEL, now
            # Recorded: attach and serve, in another process, start the tunnel for it.
            storage.set_job_state(self.request_id, last.job_id, last.state,
                                  last.with_info(connect=ConnectMode.TUNNEL.value))
            self._tell(
                f"request {self.request_id}: connect=auto moves to the tunnel: array tasks "
                f"have run for {silent_s:.0f} s and none has called in at {where}; the "
                f"workers find the relay at {host}:{port} at their next retry"
            )
            return
        if self._silence_told:
            if not self._tail_told:
                # A worker that waits on a connection that never answers writes its reason
                # only when its attempt times out: show it when it comes.
                tail = self._worker_stderr_tail(storage)
                if tail:
                    self._tail_told = True
                    self._tell(f"request {self.request_id}: a worker's stderr ends:\n{tail}")
            return
        self._silence_told = True
        tail = self._worker_stderr_tail(storage)
        self._tail_told = bool(tail)
        fix = (
            "check that the execution nodes can reach the head node and that its sshd "
            "allows forwarding (AllowTcpForwarding)" if mode is ConnectMode.TUNNEL else
            "if the execution nodes cannot reach this machine, set connect=\"tunnel\" "
            "(or \"auto\")"
        ) + "; `sheepdog doctor CONFIG` checks each way; see \"Connecting workers to you\" in " \
            "the docs"
        self._tell(
            f"request {self.request_id}: array tasks have run for {silent_s:.0f} s and none "
            f"has called in at {where} (connect={mode}); {fix}"
            + (f". A worker's stderr ends:\n{tail}" if tail else "")
        )

    def _keep_tunnel(self, storage: Storage) -> None:
        """Start the tunnel again if its SSH connection dropped, and publish its new address."""
        assert self.server is not None
        try:
            where = worker_address.ensure_tunnel(self._jobs(storage, self.server))
        except SheepdogError as exc:
            # Said once while it stays down (a lapsed login is down until the next one); the
            # retries at every check go to the debug log.
            level = logging.DEBUG if self._tunnel_down_told else logging.WARNING
            self._tunnel_down_told = True
            logger.log(level, "request %d: the tunnel is down and could not start again: %s; "
                       "trying again at every check", self.request_id, exc)
            return
        self._tunnel_down_told = False
        if where is None:
            return
        host, port = where
        logger.warning("request %d: the tunnel started again; workers find the relay at "
                       "%s:%d at their next retry", self.request_id, host, port)

    def _worker_stderr_tail(self, storage: Storage) -> str:
        """The last lines of the newest .e file of the request's array tasks, or ''."""
        jobdir = self.scheduler.host.absolute(self.config.ssh_dir)
        name = StoredRequest(storage, self.request_id).job_name()
        pattern = f"{shlex.quote(jobdir)}/{shlex.quote(name)}.e*"
        try:
            result = self.scheduler.host.run(
                f"f=$(ls -t {pattern} 2>/dev/null | head -n 1); "
                f'[ -n "$f" ] && tail -n {ERR_TAIL_LINES} "$f"',
                check=False, timeout_s=30.0,
            )
        except SheepdogError:
            return ""
        return "\n".join("    " + line for line in result.stdout.rstrip().splitlines())

    def _jobs(self, storage: Storage, server: Server | None) -> RequestJobs:
        """The request's jobs, reached with this watcher's config and scheduler, and ``server``."""
        return RequestJobs(
            StoredRequest(storage, self.request_id), self.config, self.scheduler, server
        )

    def _tell(self, message: str) -> None:
        logger.warning("%s", message)
        if self.notify is not None:
            self.notify(message)
