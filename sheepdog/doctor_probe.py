"""``sheepdog doctor``'s probe job: its file, its submission, and its answer or why none came.

Part of :mod:`sheepdog.doctor`: a one-task array job, with the config's options and
prologue, runs :mod:`sheepdog.programs.node_probe` under the workers' Python, which writes
what it found (the Python, the modules, which addresses of the server it reaches) as JSON
beside the job file.
"""

from __future__ import annotations

import inspect
import json
import logging
import shlex
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .client import stub
from .config import Config
from .doctor_report import FAIL, OK, Check
from .errors import SheepdogError
from .job_file import JOB_FILE_MODE, job_head
from .net import host_port
from .poll import poll_until
from .programs import program_source
from .scheduler import Scheduler

if TYPE_CHECKING:
    from .server import Server

__all__ = ["NODE_PROBE_TIMEOUT_S", "PROBE_SOURCE", "ProbeJob", "probe_job_file"]

logger = logging.getLogger("sheepdog.doctor")  # the name it logged under before the split

#: Bound on each connection the probe job tries from the execution node.
NODE_PROBE_TIMEOUT_S = 5.0

#: What the probe job runs on an execution node, under the workers' Python: the text of
#: :mod:`sheepdog.programs.node_probe`, which says what it does.
PROBE_SOURCE = program_source("node_probe")


def probe_job_file(
    config: Config, scheduler: type[Scheduler], out_path: str,
    targets: list[tuple[str, str]], *, timeout_s: float = NODE_PROBE_TIMEOUT_S,
    modules: Sequence[str] = (),
) -> str:
    """The probe job's file: the config's job head (options, prologue, Python), then the probe.

    It writes what it found as JSON to ``out_path`` (on the cluster), tries each
    ``(name, "host:port")`` of ``targets`` with a health call, bounded by ``timeout_s``,
    and imports each of ``modules`` (the worker stub's ``module_version``).
    """
    head = job_head(config.shell, config.job_options(scheduler), 1, prologue=config.prologue,
                    scheduler=scheduler, max_running=config.max_running)
    return "\n".join([
        *head,
        "# sheepdog doctor's probe job: which Python runs here, and can it reach the server?",
        PROBE_SOURCE.strip("\n"),
        "",
        "",
        inspect.getsource(stub.module_version).rstrip("\n"),
        "",
        "",
        f"probe({out_path!r}, {[list(t) for t in targets]!r}, {timeout_s!r}"
        + (f", {list(modules)!r})" if modules else ")"),
        "",
    ])


class ProbeJob:
    """Run the probe job and take its answer (a part of the doctor's run, ``_Doctor``)."""

    if TYPE_CHECKING:  # what _Doctor gives this part
        config: Config
        timeout_s: float
        scheduler: Scheduler | None
        server: Server | None
        modules: list[str]

        def add(self, name: str, status: str, detail: str, fix: str = "") -> Check: ...

    def run_probe_job(
        self, kind: type[Scheduler], relay: tuple[str, int] | None
    ) -> dict[str, Any] | None:
        """Submit the probe job, wait for its answer (bounded), clean up; None if none came."""
        assert self.scheduler is not None and self.server is not None
        assert self.server.port is not None  # started by the server check
        cfg, scheduler, host = self.config, self.scheduler, self.scheduler.host
        direct = host_port(cfg.localhost, self.server.port)
        targets = [("direct", direct)]
        if relay is not None:
            targets.append(("tunnel", host_port(*relay)))
        jobdir = host.absolute(cfg.ssh_dir).rstrip("/")
        name = f"sheepdog_doctor_{uuid.uuid4().hex[:12]}.py"
        out_path = f"{jobdir}/{name}.json"
        job_id = ""
        try:
            text = probe_job_file(cfg, kind, out_path, targets, modules=self.modules)
            host.put(jobdir, [(name, text, JOB_FILE_MODE)])
            job_id = scheduler.submit(f"{jobdir}/{name}", name=name, array_size=1,
                                      workdir=jobdir if cfg.raw_options is None else None)
        except SheepdogError as exc:
            self.add("probe job", FAIL, f"could not submit a one-task array job: {exc}",
                     "fix what the message names, then try `sheepdog jobfile` to see a job file")
            self._remove(jobdir, name)
            return None
        said: dict[str, Any] = {}
        try:
            answered = poll_until(lambda: self._answer(out_path, job_id, said),
                                  timeout_s=self.timeout_s, interval_s=1.0, max_interval_s=5.0)
            if answered and "found" in said:
                found: dict[str, Any] = said["found"]
                self.add("probe job", OK, f"{scheduler.label} job {job_id} ran on "
                         f"{found.get('node')} and answered")
                return found
            self.add("probe job", FAIL, *self._no_answer(job_id, jobdir, name, said))
            return None
        finally:
            if job_id:
                scheduler.delete([job_id])
            self._remove(jobdir, name)

    def _answer(self, out_path: str, job_id: str, said: dict[str, Any]) -> bool:
        """Whether the probe job is over: it answered (``said["found"]``) or it left."""
        assert self.scheduler is not None
        try:
            said["found"] = json.loads(self.scheduler.host.read_bytes(out_path))
            return True
        except FileNotFoundError:
            pass
        except (SheepdogError, ValueError) as exc:
            said["error"] = str(exc)
        listing = self.scheduler.status([job_id])
        if listing is None:
            return False  # no answer from the scheduler: unknown, not gone
        job = listing.get(job_id)
        if job is not None and job.in_error:
            said["in_error"] = "; ".join(self.scheduler.error_reasons(job_id)) or "error state"
            return True
        if job is not None and job.queued:
            waiting = self.scheduler.why_waiting(job_id)
            if waiting.permanent:
                said["never"] = waiting.permanent
                return True
            said["waiting"] = "; ".join(waiting.reasons)
        # Gone: look once more, as the file may have come just before it left.
        if job is None:
            try:
                said["found"] = json.loads(self.scheduler.host.read_bytes(out_path))
            except (FileNotFoundError, SheepdogError, ValueError):
                said["gone"] = True
            return True
        return False

    def _no_answer(
        self, job_id: str, jobdir: str, name: str, said: dict[str, Any]
    ) -> tuple[str, str]:
        """Why the probe job gave no answer (the scheduler's and the job's own words), and
        what to do."""
        assert self.scheduler is not None
        label = f"{self.scheduler.label} job {job_id}"
        check = ("check the config's shell (the workers' Python, on the execution nodes), "
                 "prologue and scheduler options")
        if "in_error" in said:
            return f"{label} went into an error state: {said['in_error']}", check
        if "never" in said:
            return f"{label} can never start: {said['never']}", check
        if "gone" not in said:
            waiting = f" (it waits: {said['waiting']})" if said.get("waiting") else ""
            unreadable = f"; reading its answer failed: {said['error']}" if "error" in said else ""
            return (f"{label} did not answer within {self.timeout_s:g} s{waiting}{unreadable}",
                    "give it longer with --timeout, or look at the queue (qstat, squeue)")
        tail = self._stderr_tail(jobdir, name)
        if tail:
            return f"{label} ended without an answer; its stderr ends: {tail}", check
        return f"{label} ended without an answer and wrote no stderr", check

    def _stderr_tail(self, jobdir: str, name: str) -> str:
        assert self.scheduler is not None
        pattern = f"{shlex.quote(jobdir)}/{shlex.quote(name)}.e*"
        try:
            result = self.scheduler.host.run(
                f'f=$(ls -t {pattern} 2>/dev/null | head -n 1); [ -n "$f" ] && tail -n 6 "$f"',
                check=False, timeout_s=60)
        except SheepdogError:
            return ""
        return " | ".join(line for line in result.stdout.splitlines() if line.strip())[-600:]

    def _remove(self, jobdir: str, name: str) -> None:
        """Delete the probe job's files: job file, answer, output files (best effort)."""
        assert self.scheduler is not None
        try:
            self.scheduler.host.run(f"rm -f -- {shlex.quote(f'{jobdir}/{name}')}*",
                                    check=False, timeout_s=60)
        except SheepdogError as exc:
            logger.warning("could not delete the probe job's files %s/%s*: %s", jobdir, name, exc)
