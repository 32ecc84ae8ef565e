"""``scheduler="auto"``: ask the head node whether it offers ``qsub`` or ``sbatch``, once.

:class:`AutoScheduler` stands for the scheduler the head node offers. It asks on
first use, not when it is made, so a head node that cannot be reached fails the
way it does for a named scheduler: at submission (the request's tasks say they
were never submitted), or as a check the watcher retries.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, SheepdogError
from .base import ArrayLimits, Deletion, Host, JobStatus, Scheduler, Waiting
from .gridengine import GridEngine
from .slurm import Slurm

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["DETECT_COMMAND", "AutoScheduler", "detect_scheduler", "offered"]

logger = logging.getLogger(__name__)

#: What ``auto`` looks for on the head node, in order of preference: the first that answers.
_DETECT_ORDER: tuple[tuple[str, type[Scheduler]], ...] = (("qsub", GridEngine), ("sbatch", Slurm))
#: One shell command that prints which of the submit commands are on PATH, after the login
#: set-up both schedulers need; it always exits 0 when it ran.
DETECT_COMMAND = (
    GridEngine.preamble + Slurm.preamble
    + "for c in " + " ".join(c for c, _ in _DETECT_ORDER)
    + '; do command -v "$c" >/dev/null 2>&1 && echo "$c"; done; true'
)

#: What ``auto`` found, per head node and login (host, port, user, ssh_config): asked once.
_detected: dict[tuple[str, int, str, str | None], type[Scheduler]] = {}
_detected_lock = threading.Lock()


def offered(host: Host) -> list[tuple[str, type[Scheduler]]]:
    """The submit commands that a non-interactive login on ``host`` finds, each with its
    scheduler, in order of preference; a failed command raises."""
    found = host.run(DETECT_COMMAND, timeout_s=60).stdout.split()
    return [(command, cls) for command, cls in _DETECT_ORDER if command in found]


def detect_scheduler(config: Config, host: Host) -> type[Scheduler]:
    """Which scheduler the head node offers, asked once per login (host, port, user).

    Runs :data:`DETECT_COMMAND` non-interactively over ``host``; Grid Engine where both
    ``qsub`` and ``sbatch`` answer. A failed command raises (nothing is remembered); a
    head node with neither is a ConfigError that says what to do.
    """
    key = (config.host, config.ssh_port, config.ssh_user, config.ssh_config)
    with _detected_lock:
        known = _detected.get(key)
    if known is not None:
        return known
    found = offered(host)
    match = found[0][1] if found else None
    if match is None:
        raise ConfigError(
            f"config key 'scheduler': 'auto' found neither qsub nor sbatch on {config.host} "
            "(a non-interactive SSH login's PATH, after /etc/profile); set scheduler to "
            "'gridengine' or 'slurm', and make its commands found in a non-interactive "
            "login (e.g. in ~/.bashrc)",
            key="scheduler",
        )
    with _detected_lock:
        if key not in _detected:
            _detected[key] = match
            logger.info("scheduler 'auto': %s offers %s, so sheepdog uses %s",
                        config.host, " and ".join(command for command, _ in found), match.label)
        return _detected[key]


class AutoScheduler(Scheduler):
    """The scheduler the head node offers, found on first use; then every call goes to it.

    Its ``name``, ``label`` and ``array_index_var`` are the found scheduler's (asking
    the head node if it has not been asked yet); :attr:`kind` is its class.
    """

    def __init__(self, config: Config, host: Host) -> None:
        super().__init__(host)
        self.config = config
        self._found: Scheduler | None = None
        self._lock = threading.Lock()

    def found(self) -> Scheduler:
        """The scheduler the head node offers (asked once); raises if it cannot be asked."""
        with self._lock:
            if self._found is None:
                chosen = detect_scheduler(self.config, self.host)
                chosen.check_raw_options(self.config)
                # The found scheduler's environment set-up, before each of its commands.
                setattr(self.host, "preamble", getattr(chosen, "preamble", ""))  # noqa: B010
                self._found = chosen(self.host)
            return self._found

    @property
    def kind(self) -> type[Scheduler]:
        """The found scheduler's class (it writes the job file)."""
        return type(self.found())

    def __getattr__(self, name: str) -> Any:
        # Only what Scheduler declares without a value: name, label, array_index_var.
        if name in ("name", "label", "array_index_var"):
            return getattr(self.found(), name)
        raise AttributeError(name)

    def submit(
        self, job_path: str, *, name: str, array_size: int, workdir: str | None = None,
        split: bool = False, max_running: int | None = None, raw_options: Sequence[str] = (),
    ) -> str:
        """Submit with the found scheduler."""
        return self.found().submit(job_path, name=name, array_size=array_size, workdir=workdir,
                                   split=split, max_running=max_running,
                                   raw_options=raw_options)

    def delete(self, targets: Sequence[str]) -> Deletion:
        """Delete with the found scheduler; if the head node cannot be asked, say so."""
        try:
            found = self.found()
        except SheepdogError as exc:
            return Deletion([], str(exc), "cluster")
        return found.delete(targets)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus] | None:
        """The found scheduler's answer."""
        return self.found().status(job_ids)

    def accounting(self, job_id: str) -> str:
        """The found scheduler's answer."""
        return self.found().accounting(job_id)

    def why_waiting(self, job_id: str) -> Waiting:
        """The found scheduler's answer."""
        return self.found().why_waiting(job_id)

    def error_reasons(self, job_id: str) -> list[str]:
        """The found scheduler's answer."""
        return self.found().error_reasons(job_id)

    def array_limits(self) -> ArrayLimits:
        """The found scheduler's answer."""
        return self.found().array_limits()
